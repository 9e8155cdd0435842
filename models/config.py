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
    "qwen3_moe": "Qwen3MoeForCausalLM",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
# Per-layer weights that only some layers of a mixture-of-experts model carry (see ``stack_layers``):
# dense layers hold the SwiGLU MLP, sparse layers the router and the stacked experts.
DENSE_MLP_PARAMS = ("gate_proj", "up_proj", "down_proj")
ROUTER_PARAM = "router"
EXPERTS_PREFIX = "experts_"  # experts_gate_proj [L, E, H, Im], experts_up_proj, experts_down_proj


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
    # Qwen3-MoE (num_experts == 0: every layer is dense)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """config.json's ``eos_token_id`` (an int or a list) as a tuple; empty when it has none."""
        eos = self.eos_token_id
        return () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def is_sparse(self, layer: int) -> bool:
        """transformers' rule: layer ``i`` is a MoE layer unless listed in ``mlp_only_layers``
        or off the ``decoder_sparse_step`` grid."""
        return (
            self.num_experts > 0
            and layer not in self.mlp_only_layers
            and (layer + 1) % self.decoder_sparse_step == 0
        )

    @property
    def sparse_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_layers) if self.is_sparse(i))

    @property
    def dense_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_layers) if not self.is_sparse(i))

    @property
    def is_moe(self) -> bool:
        return bool(self.sparse_layers)

    def stack_layers(self, name: str) -> tuple[int, ...]:
        """The layers whose weights the stacked param ``params["layers"][name]`` holds, in order.

        Attention and norms exist in every layer; the dense MLP only in dense layers, the router
        and experts only in sparse ones, so those stacks are shorter than ``num_layers``.
        """
        if name in DENSE_MLP_PARAMS:
            return self.dense_layers
        if name == ROUTER_PARAM or name.startswith(EXPERTS_PREFIX):
            return self.sparse_layers
        return tuple(range(self.num_layers))

    def layer_segments(self) -> tuple[tuple[int, int, bool], ...]:
        """Maximal runs ``(start, end, sparse)`` of consecutive layers of one kind.

        The decoder runs one ``lax.scan`` per run: a single one for dense and all-sparse models.
        """
        runs: list[tuple[int, int, bool]] = []
        for i in range(self.num_layers):
            sparse = self.is_sparse(i)
            if runs and runs[-1][2] == sparse:
                runs[-1] = (runs[-1][0], i + 1, sparse)
            else:
                runs.append((i, i + 1, sparse))
        return tuple(runs)

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
        attn += (self.q_size + 2 * self.kv_size) * self.qkv_bias + h * self.o_bias
        attn += 2 * self.head_dim * self.qk_norm
        mlp = len(self.dense_layers) * 3 * h * i
        moe = len(self.sparse_layers) * self.num_experts * h * (3 * self.moe_intermediate_size + 1)
        return v * h * (1 if self.tie_word_embeddings else 2) + n * (attn + 2 * h) + mlp + moe + h

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
        moe = _moe_fields(hf) if model_type == "qwen3_moe" else {}
        return cls(
            model_type=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            # an all-sparse MoE config may leave out the (unused) dense width
            intermediate_size=int(hf.get("intermediate_size") or 0) if moe else hf["intermediate_size"],
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
            # Qwen2 hard-codes o_proj without bias; Llama and Qwen3(-MoE) follow attention_bias.
            o_bias=model_type != "qwen2" and attention_bias,
            qk_norm=model_type in ("qwen3", "qwen3_moe"),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
            **moe,
        )

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ModelConfig:
        config_file = Path(path) / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{config_file} not found: not a Hugging Face model directory")
        return cls.from_hf_dict(json.loads(config_file.read_text()))


def _moe_fields(hf: dict[str, Any]) -> dict[str, Any]:
    """Validated Qwen3-MoE fields of an HF config dict (transformers' defaults where absent)."""

    def integer(key: str, value: Any, minimum: int) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise ValueError(f"config.json: {key}={value!r} must be an int >= {minimum}")
        return value

    # transformers maps num_experts to num_local_experts; either may be on disk
    key = "num_experts" if "num_experts" in hf else "num_local_experts"
    num_experts = integer(key, hf.get(key, 128), 1)
    top_k = integer("num_experts_per_tok", hf.get("num_experts_per_tok", 8), 1)
    if top_k > num_experts:
        raise ValueError(f"config.json: num_experts_per_tok={top_k} exceeds {key}={num_experts}")
    norm_topk_prob = hf.get("norm_topk_prob", False)
    if not isinstance(norm_topk_prob, bool):
        raise ValueError(f"config.json: norm_topk_prob={norm_topk_prob!r} must be true or false")
    num_layers = hf["num_hidden_layers"]
    only = hf.get("mlp_only_layers") or []
    if not isinstance(only, list | tuple) or any(
        not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < num_layers for i in only
    ):
        raise ValueError(
            f"config.json: mlp_only_layers={only!r} must be a list of layer indices in [0, {num_layers})"
        )
    fields = dict(
        num_experts=num_experts,
        num_experts_per_tok=top_k,
        moe_intermediate_size=integer("moe_intermediate_size", hf.get("moe_intermediate_size", 768), 1),
        norm_topk_prob=norm_topk_prob,
        decoder_sparse_step=integer("decoder_sparse_step", hf.get("decoder_sparse_step", 1), 1),
        mlp_only_layers=tuple(sorted(set(only))),
    )
    # Only dense layers use intermediate_size; a stand-in config applies the one sparsity rule.
    dense = ModelConfig("qwen3_moe", 1, 1, 0, num_layers, 1, 1, 1, **fields).dense_layers
    width = hf.get("intermediate_size")
    if dense and (not isinstance(width, int) or isinstance(width, bool) or width < 1):
        raise ValueError(
            f"config.json: intermediate_size={width!r} must be a positive int: layers {list(dense)} "
            "are dense (mlp_only_layers / decoder_sparse_step)"
        )
    return fields
