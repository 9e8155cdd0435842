"""Stream Hugging Face safetensors checkpoints into the stacked params pytree.

Tensors are memory-mapped and copied straight into their destination arrays (or, with a sharding,
only each device's slice is read), so the checkpoint is never held twice in host memory.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from .config import ModelConfig

_SAFETENSORS_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
}
# Buffers transformers may serialise that carry no weights.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class SafetensorsReader:
    """Name → memory-mapped numpy view over one ``model.safetensors`` or a sharded index."""

    def __init__(self, model_dir: str | Path):
        model_dir = Path(model_dir)
        index_file = model_dir / "model.safetensors.index.json"
        if index_file.is_file():
            weight_map = json.loads(index_file.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        elif (model_dir / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise FileNotFoundError(
                f"{model_dir}: no model.safetensors or model.safetensors.index.json found"
            )
        self._entries: dict[str, tuple[Path, str, tuple[int, ...], int, int]] = {}
        for name in files:
            path = model_dir / name
            if not path.is_file():
                raise FileNotFoundError(f"{path}: listed in the index but missing")
            with path.open("rb") as f:
                (header_len,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(header_len))
            base = 8 + header_len
            for key, info in header.items():
                if key == "__metadata__":
                    continue
                begin, end = info["data_offsets"]
                self._entries[key] = (path, info["dtype"], tuple(info["shape"]), base + begin, base + end)
        self._maps: dict[Path, np.memmap] = {}

    def keys(self) -> set[str]:
        return set(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][2]

    def get(self, name: str) -> np.ndarray:
        """A zero-copy view of one tensor."""
        if name not in self._entries:
            raise KeyError(f"checkpoint tensor {name!r} is missing")
        path, dtype, shape, begin, end = self._entries[name]
        if dtype not in _SAFETENSORS_DTYPES:
            raise ValueError(f"checkpoint tensor {name!r} has unsupported dtype {dtype}")
        if path not in self._maps:
            self._maps[path] = np.memmap(path, dtype=np.uint8, mode="r")
        raw = self._maps[path][begin:end]
        return raw.view(_SAFETENSORS_DTYPES[dtype]).reshape(shape)


def hf_names(hf_name: str, num_layers: int) -> list[str]:
    """Expands a ``{i}`` layer template into one name per layer."""
    return [hf_name.format(i=i) for i in range(num_layers)] if "{i}" in hf_name else [hf_name]


def param_layout(config: ModelConfig) -> dict[tuple[str, ...], tuple[str, bool, tuple[int, ...]]]:
    """Our param path → (HF name, with ``{i}`` for the layer; transposed?; our shape per layer)."""
    h, i, d = config.hidden_size, config.intermediate_size, config.head_dim
    q, kv = config.q_size, config.kv_size
    layer = "model.layers.{i}."
    layout = {
        ("embed",): ("model.embed_tokens.weight", False, (config.vocab_size, h)),
        ("norm",): ("model.norm.weight", False, (h,)),
        ("layers", "input_norm"): (layer + "input_layernorm.weight", False, (h,)),
        ("layers", "post_norm"): (layer + "post_attention_layernorm.weight", False, (h,)),
        ("layers", "q_proj"): (layer + "self_attn.q_proj.weight", True, (h, q)),
        ("layers", "k_proj"): (layer + "self_attn.k_proj.weight", True, (h, kv)),
        ("layers", "v_proj"): (layer + "self_attn.v_proj.weight", True, (h, kv)),
        ("layers", "o_proj"): (layer + "self_attn.o_proj.weight", True, (q, h)),
        ("layers", "gate_proj"): (layer + "mlp.gate_proj.weight", True, (h, i)),
        ("layers", "up_proj"): (layer + "mlp.up_proj.weight", True, (h, i)),
        ("layers", "down_proj"): (layer + "mlp.down_proj.weight", True, (i, h)),
    }
    if not config.tie_word_embeddings:
        layout[("lm_head",)] = ("lm_head.weight", True, (h, config.vocab_size))
    if config.qkv_bias:
        layout[("layers", "q_bias")] = (layer + "self_attn.q_proj.bias", False, (q,))
        layout[("layers", "k_bias")] = (layer + "self_attn.k_proj.bias", False, (kv,))
        layout[("layers", "v_bias")] = (layer + "self_attn.v_proj.bias", False, (kv,))
    if config.o_bias:
        layout[("layers", "o_bias")] = (layer + "self_attn.o_proj.bias", False, (h,))
    if config.qk_norm:
        layout[("layers", "q_norm")] = (layer + "self_attn.q_norm.weight", False, (d,))
        layout[("layers", "k_norm")] = (layer + "self_attn.k_norm.weight", False, (d,))
    return layout


def param_shapes(config: ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Full (stacked) shape of every param path."""
    return {
        path: ((config.num_layers, *shape) if path[0] == "layers" else shape)
        for path, (_, _, shape) in param_layout(config).items()
    }


def _unflatten(flat: dict[tuple[str, ...], jax.Array]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def load_params(
    config: ModelConfig,
    model_dir: str | Path,
    *,
    dtype=jnp.float32,
    sharding_for: Callable[[tuple[str, ...], tuple[int, ...]], jax.sharding.Sharding] | None = None,
) -> dict:
    """Reads every weight of ``config`` from ``model_dir``.

    ``sharding_for(path, shape)`` places each param; each device then reads only its own slice.
    """
    reader = SafetensorsReader(model_dir)
    layout = param_layout(config)
    expected: set[str] = set()
    for hf_name, _, _ in layout.values():
        for name in hf_names(hf_name, config.num_layers):
            expected.add(name)
            if name not in reader.keys():  # noqa: SIM118 (reader is not a mapping)
                raise ValueError(f"{model_dir}: checkpoint tensor {name!r} is missing")
    for hf_name, transposed, shape in layout.values():
        want = tuple(reversed(shape)) if transposed else shape
        for check in hf_names(hf_name, config.num_layers):
            if reader.shape(check) != want:
                raise ValueError(
                    f"{model_dir}: checkpoint tensor {check!r} has shape {reader.shape(check)}, "
                    f"config.json implies {want}"
                )
    allowed_extra = {"lm_head.weight"} if config.tie_word_embeddings else set()
    unexpected = sorted(
        k for k in reader.keys() - expected - allowed_extra if not k.endswith(_IGNORED_SUFFIXES)
    )
    if unexpected:
        raise ValueError(
            f"{model_dir}: checkpoint has tensors this {config.model_type} config does not use: "
            f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
        )

    np_dtype = np.dtype(dtype)
    flat = {}
    for path, (hf_name, transposed, _) in layout.items():
        stacked = path[0] == "layers"
        full_shape = param_shapes(config)[path]

        def read(index: tuple, hf_name=hf_name, transposed=transposed, stacked=stacked) -> np.ndarray:
            def one(name: str, idx: tuple) -> np.ndarray:
                t = reader.get(name)
                t = t.T if transposed else t
                return np.asarray(t[idx], dtype=np_dtype)

            if not stacked:
                return one(hf_name, index)
            layers = range(config.num_layers)[index[0]]
            return np.stack([one(hf_name.format(i=i), index[1:]) for i in layers])

        if sharding_for is None:
            flat[path] = jnp.asarray(read(tuple(slice(None) for _ in full_shape)))
        else:
            sharding = sharding_for(path, full_shape)
            flat[path] = jax.make_array_from_callback(full_shape, sharding, read)
    return _unflatten(flat)


def load_pretrained(
    path: str | Path,
    dtype=jnp.float32,
    *,
    sharding_for: Callable[[tuple[str, ...], tuple[int, ...]], jax.sharding.Sharding] | None = None,
    mesh: jax.sharding.Mesh | None = None,
    rules=None,
) -> tuple[ModelConfig, dict]:
    """``config, params = load_pretrained(hf_dir, dtype=jnp.bfloat16[, mesh=mesh])``.

    With ``mesh`` each param is loaded straight into its shards by ``rules`` (default
    ``jtinker.sharding.ShardingRules()``); a mesh that does not divide the model fails first.
    """
    config = ModelConfig.from_pretrained(path)
    if mesh is not None:
        from jtinker import sharding

        rules = rules or sharding.ShardingRules()
        for param_path, shape in param_shapes(config).items():
            sharding.param_sharding(mesh, rules, param_path, shape)
        sharding_for = lambda p, shape: sharding.param_sharding(mesh, rules, p, shape)  # noqa: E731
    return config, load_params(config, path, dtype=dtype, sharding_for=sharding_for)
