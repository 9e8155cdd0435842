"""Tiny, randomly initialised Hugging Face model directories, made locally without a hub or torch.

The directory holds ``config.json``, ``model.safetensors`` (or shards plus an index), and a
byte-level tokenizer with ChatML special tokens and chat template, so it loads in transformers
(``AutoModelForCausalLM`` / ``AutoTokenizer``) as well as in jtinker.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from .config import EXPERTS_PREFIX, ROUTER_PARAM, SUPPORTED_ARCHITECTURES, ModelConfig
from .loading import hf_names, hf_shape, param_layout

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
    ),
    "small": dict(
        vocab_size=8192,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=4096,
    ),
    # Llama-3.2-1B's shape (1.24B parameters), for accelerator benchmarks: too big for tests.
    "1b": dict(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=131072,
        tie_word_embeddings=True,
    ),
}

FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(
        tie_word_embeddings=False,
        rope_theta=500000.0,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=64,
        ),
    ),
    "qwen2": dict(tie_word_embeddings=True, rope_theta=1000000.0),
    "qwen3": dict(tie_word_embeddings=True, rope_theta=1000000.0),
    # Like Qwen3-30B-A3B (untied, renormalised top-k), with 8 experts, top-2.
    "qwen3_moe": dict(
        tie_word_embeddings=False,
        rope_theta=1000000.0,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        output_router_logits=False,
        router_aux_loss_coef=0.001,
    ),
}


def make_tokenizer(out_dir: Path) -> None:
    """A byte-level BPE tokenizer (256 byte tokens, no merges) plus ChatML specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(byte_alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        bos_token=None,
        unk_token=None,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))


def hf_config(family: str, size: str = "tiny", **overrides: Any) -> dict[str, Any]:
    if family not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"family: {family!r} is not one of {sorted(SUPPORTED_ARCHITECTURES)}")
    if size not in SIZES:
        raise ValueError(f"size: {size!r} is not one of {sorted(SIZES)}")
    cfg: dict[str, Any] = {
        "architectures": [SUPPORTED_ARCHITECTURES[family]],
        "model_type": family,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "initializer_range": 0.02,
        "attention_dropout": 0.0,
        "bos_token_id": None,
        "eos_token_id": 258,  # <|im_end|>
        "pad_token_id": 259,
        "use_cache": True,
        "torch_dtype": "float32",
        **FAMILY_DEFAULTS[family],
        **SIZES[size],
    }
    if family == "llama":
        cfg["attention_bias"] = False
        cfg["mlp_bias"] = False
    if family in ("qwen3", "qwen3_moe"):
        cfg["head_dim"] = 2 * cfg["hidden_size"] // cfg["num_attention_heads"] if size == "tiny" else 64
        cfg["attention_bias"] = False
    if family == "qwen3_moe":
        cfg["moe_intermediate_size"] = cfg["intermediate_size"] // 4
    if family in ("qwen2", "qwen3", "qwen3_moe"):
        cfg["use_sliding_window"] = False
        cfg["sliding_window"] = None
    cfg.update(overrides)
    return cfg


def random_weights(config: ModelConfig, seed: int = 0, std: float = 0.02) -> dict[str, np.ndarray]:
    """HF-named f32 tensors: normal(0, std) matrices, unit norms, small random biases.

    Router and expert matrices are drawn at ``1/sqrt(fan_in)`` instead, so routing is decisive
    (no near-ties in top-k) and the experts move the output well beyond test tolerances.
    """
    rng = np.random.default_rng(seed)
    tensors = {}
    for path, (hf_name, transposed, shape) in param_layout(config).items():
        one_shape = hf_shape(hf_name, transposed, shape)
        moe = path[-1] == ROUTER_PARAM or path[-1].startswith(EXPERTS_PREFIX)
        for name in hf_names(config, path):
            if path[-1].endswith("norm"):
                value = 1.0 + 0.1 * rng.standard_normal(one_shape)
            elif path[-1].endswith("bias"):
                value = 0.1 * rng.standard_normal(one_shape)
            elif moe:
                value = rng.standard_normal(one_shape) / np.sqrt(one_shape[-1])
            else:
                value = std * rng.standard_normal(one_shape)
            tensors[name] = value.astype(np.float32)
    return tensors


def save_weights(tensors: dict[str, np.ndarray], out_dir: Path, shards: int = 1) -> None:
    """``model.safetensors``, or ``shards`` files plus ``model.safetensors.index.json``."""
    if shards <= 1:
        save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
        return
    names = sorted(tensors)
    groups = [names[i::shards] for i in range(shards)]
    weight_map, total = {}, 0
    for k, group in enumerate(groups, start=1):
        file = f"model-{k:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n] for n in group}, str(out_dir / file), metadata={"format": "pt"})
        for n in group:
            weight_map[n] = file
            total += tensors[n].nbytes
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def make_tiny(
    out_dir: str | Path,
    family: str = "qwen3",
    size: str = "tiny",
    *,
    seed: int = 0,
    shards: int = 1,
    **overrides: Any,
) -> Path:
    """Writes a complete HF model directory and returns its path.

    ``overrides`` are ``config.json`` keys, e.g. ``tie_word_embeddings=False``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = hf_config(family, size, **overrides)
    config = ModelConfig.from_hf_dict(cfg)
    make_tokenizer(out)
    save_weights(random_weights(config, seed), out, shards)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    (out / "generation_config.json").write_text(
        json.dumps({"eos_token_id": cfg["eos_token_id"], "pad_token_id": cfg["pad_token_id"]}, indent=2)
    )
    return out
