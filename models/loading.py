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

from .config import EXPERTS_PREFIX, ROUTER_PARAM, ModelConfig

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


def hf_names(config: ModelConfig, path: tuple[str, ...]) -> list[str]:
    """Every on-disk tensor name of a param, in stacking order (layer-major, then expert)."""
    hf_name = param_layout(config)[path][0]
    if path[0] != "layers":
        return [hf_name]
    layers = config.stack_layers(path[1])
    if "{e}" in hf_name:
        return [hf_name.format(i=i, e=e) for i in layers for e in range(config.num_experts)]
    return [hf_name.format(i=i) for i in layers]


def hf_shape(hf_name: str, transposed: bool, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of one on-disk tensor of a param whose per-layer shape (ours) is ``shape``.

    Per-expert names (``{e}``) hold one expert each: our leading expert axis is not on disk.
    """
    if "{e}" in hf_name:
        shape = shape[1:]
    return tuple(reversed(shape)) if transposed else tuple(shape)


def param_layout(config: ModelConfig) -> dict[tuple[str, ...], tuple[str, bool, tuple[int, ...]]]:
    """Our param path → (HF name, with ``{i}`` for the layer and ``{e}`` for the expert;
    transposed?; our shape per layer)."""
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
    }
    if config.dense_layers:
        layout[("layers", "gate_proj")] = (layer + "mlp.gate_proj.weight", True, (h, i))
        layout[("layers", "up_proj")] = (layer + "mlp.up_proj.weight", True, (h, i))
        layout[("layers", "down_proj")] = (layer + "mlp.down_proj.weight", True, (i, h))
    if config.sparse_layers:
        e, im = config.num_experts, config.moe_intermediate_size
        expert = layer + "mlp.experts.{e}."
        layout[("layers", ROUTER_PARAM)] = (layer + "mlp.gate.weight", True, (h, e))
        layout[("layers", EXPERTS_PREFIX + "gate_proj")] = (expert + "gate_proj.weight", True, (e, h, im))
        layout[("layers", EXPERTS_PREFIX + "up_proj")] = (expert + "up_proj.weight", True, (e, h, im))
        layout[("layers", EXPERTS_PREFIX + "down_proj")] = (expert + "down_proj.weight", True, (e, im, h))
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
        path: ((len(config.stack_layers(path[1])), *shape) if path[0] == "layers" else shape)
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
    for path in layout:
        for name in hf_names(config, path):
            expected.add(name)
            if name not in reader.keys():  # noqa: SIM118 (reader is not a mapping)
                raise ValueError(f"{model_dir}: checkpoint tensor {name!r} is missing")
    for path, (hf_name, transposed, shape) in layout.items():
        want = hf_shape(hf_name, transposed, shape)
        for check in hf_names(config, path):
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
    shapes = param_shapes(config)
    from tqdm.auto import tqdm

    flat = {}
    # A bar on terminals only (disable=None): a large checkpoint streams for a while.
    for path, (hf_name, transposed, _) in tqdm(
        layout.items(), desc="loading weights", unit="param", disable=None
    ):

        def read(index: tuple, path=path, hf_name=hf_name, transposed=transposed) -> np.ndarray:
            def one(name: str, idx: tuple) -> np.ndarray:
                t = reader.get(name)
                t = t.T if transposed else t
                return np.asarray(t[idx], dtype=np_dtype)

            if path[0] != "layers":
                return one(hf_name, index)
            layers = config.stack_layers(path[1])[index[0]]
            if "{e}" in hf_name:  # one tensor per (layer, expert): stack both axes
                experts = range(config.num_experts)[index[1]]
                return np.stack(
                    [np.stack([one(hf_name.format(i=i, e=e), index[2:]) for e in experts]) for i in layers]
                )
            return np.stack([one(hf_name.format(i=i), index[1:]) for i in layers])

        full_shape = shapes[path]
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
