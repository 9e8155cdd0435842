"""Loss functions: Tinker's built-in token losses (:mod:`.tinker`) and DPO (:mod:`.dpo`)."""

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
