"""Frozen model configuration, built from a Hugging Face ``config.json``."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

SUPPORTED_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything the forward pass needs to know about a decoder-only transformer.

    Hashable, so it can be a static argument to ``jax.jit``.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position: int = 8192
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2, or Llama with attention_bias
    o_bias: bool = False  # Llama with attention_bias
    qk_norm: bool = False  # Qwen3: per-head RMSNorm on q and k before RoPE
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def inv_freq(self) -> np.ndarray:
        """RoPE inverse frequencies in f32, with the configured scaling (as transformers does)."""
        dim = self.head_dim
        inv_freq = 1.0 / (self.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
        if self.rope_type == "linear":
            inv_freq = inv_freq / self.rope_factor
        elif self.rope_type == "llama3":
            low_wavelen = self.rope_original_max_position / self.rope_low_freq_factor
            high_wavelen = self.rope_original_max_position / self.rope_high_freq_factor
            wavelen = 2 * math.pi / inv_freq
            scaled = np.where(wavelen > low_wavelen, inv_freq / self.rope_factor, inv_freq)
            smooth = (self.rope_original_max_position / wavelen - self.rope_low_freq_factor) / (
                self.rope_high_freq_factor - self.rope_low_freq_factor
            )
            medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
            inv_freq = np.where(medium, (1 - smooth) * scaled / self.rope_factor + smooth * scaled, scaled)
        return inv_freq.astype(np.float32)

    def param_count(self) -> int:
        h, i, v, n = self.hidden_size, self.intermediate_size, self.vocab_size, self.num_layers
        attn = h * (self.q_size + 2 * self.kv_size) + self.q_size * h
        per_layer = attn + 3 * h * i + 2 * h
        return v * h * (1 if self.tie_word_embeddings else 2) + n * per_layer + h

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any]) -> ModelConfig:
        """Validates an HF config dict; refuses settings whose semantics we do not implement."""
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"config.json: model_type={model_type!r} is not supported; "
                f"supported: {sorted(SUPPORTED_ARCHITECTURES)}"
            )

        def refuse(key: str, value: Any, allowed: Any) -> None:
            if hf.get(key, allowed) != allowed and hf.get(key) is not None:
                raise ValueError(f"config.json: {key}={value!r} is not supported (only {allowed!r})")

        refuse("hidden_act", hf.get("hidden_act"), "silu")
        refuse("mlp_bias", hf.get("mlp_bias"), False)
        refuse("use_sliding_window", hf.get("use_sliding_window"), False)
        refuse("partial_rotary_factor", hf.get("partial_rotary_factor"), 1.0)
        refuse("pretraining_tp", hf.get("pretraining_tp"), 1)

        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        if "full_attention" in rope:  # transformers v5 may nest by layer type
            rope = rope["full_attention"]
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"config.json: rope type {rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}"
            )
        num_heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // num_heads
        attention_bias = bool(hf.get("attention_bias", False))
        eos = hf.get("eos_token_id")
        return cls(
            model_type=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
            rope_type=rope_type,
            rope_factor=float(rope.get("factor", 1.0)),
            rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
            rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
            rope_original_max_position=int(
                rope.get("original_max_position_embeddings", hf.get("max_position_embeddings", 8192))
            ),
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or attention_bias,
            o_bias=model_type == "llama" and attention_bias,
            qk_norm=model_type == "qwen3",
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
        )

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ModelConfig:
        config_file = Path(path) / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{config_file} not found: not a Hugging Face model directory")
        return cls.from_hf_dict(json.loads(config_file.read_text()))
