"""Pure-function models over plain pytrees: ``config, params = load_pretrained(dir)``,
``logits = forward(config, params, tokens, lora=lora)``."""

from . import lora, moe
from .config import ModelConfig
from .llama import KVCache, forward, hidden_states, token_logprobs, unembed
from .loading import SafetensorsReader, load_params, load_pretrained, param_layout, param_shapes
from .tiny import make_tiny

__all__ = [
    "KVCache",
    "ModelConfig",
    "SafetensorsReader",
    "forward",
    "hidden_states",
    "load_params",
    "load_pretrained",
    "lora",
    "make_tiny",
    "moe",
    "param_layout",
    "param_shapes",
    "token_logprobs",
    "unembed",
]
