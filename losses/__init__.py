"""Loss functions: Tinker's built-in token losses (:mod:`.tinker`), DPO (:mod:`.dpo`), and SDK 0.38's
custom losses (torch.fx graphs) rebuilt as JAX (:mod:`.custom`)."""

from .dpo import dpo_loss
from .tinker import (
    ALLOWED_CONFIG_KEYS,
    BINARY_INPUTS,
    DEFAULT_CONFIG,
    LOSSES,
    MULTI_TARGET_LOSSES,
    REQUIRED_CONFIG_KEYS,
    REQUIRED_INPUTS,
    LossFn,
    cispo,
    cross_entropy,
    dro,
    gspo,
    importance_sampling,
    ppo,
    resolve,
)

__all__ = [
    "ALLOWED_CONFIG_KEYS",
    "BINARY_INPUTS",
    "DEFAULT_CONFIG",
    "LOSSES",
    "MULTI_TARGET_LOSSES",
    "REQUIRED_CONFIG_KEYS",
    "REQUIRED_INPUTS",
    "LossFn",
    "cispo",
    "cross_entropy",
    "dpo_loss",
    "dro",
    "gspo",
    "importance_sampling",
    "ppo",
    "resolve",
]
