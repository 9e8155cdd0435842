"""Meshes and sharding rules as data.

Every array has logical axis names (``vocab``, ``embed``, ``heads``, ``mlp``, ``layers``, ``batch``,
...). :class:`ShardingRules` maps logical names to mesh axes (``dp``, ``fsdp``, ``tp``, ``ep``).
Changing parallelism means editing the rules or the mesh shape, never the model code.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("dp", "fsdp", "tp", "ep")
AxisRule = str | tuple[str, ...] | None

DEFAULT_RULES: tuple[tuple[str, AxisRule], ...] = (
    ("batch", ("dp", "fsdp")),
    ("seq", None),
    ("vocab", "tp"),
    ("embed", "fsdp"),
    ("heads", "tp"),
    ("kv_heads", "tp"),
    ("mlp", "tp"),
    ("experts", "ep"),
    ("layers", None),
    ("norm", None),
    ("head_dim", None),
    ("lora_rank", None),
)

# Logical axes of every base param (see models/llama.py and models/moe.py for the layout). Experts
# are split over ``ep``; the router's expert dim stays whole, since every token scores every expert.
PARAM_AXES: dict[tuple[str, ...], tuple[str | None, ...]] = {
    ("embed",): ("vocab", "embed"),
    ("norm",): ("norm",),
    ("lm_head",): ("embed", "vocab"),
    ("layers", "input_norm"): ("layers", "norm"),
    ("layers", "post_norm"): ("layers", "norm"),
    ("layers", "q_proj"): ("layers", "embed", "heads"),
    ("layers", "k_proj"): ("layers", "embed", "kv_heads"),
    ("layers", "v_proj"): ("layers", "embed", "kv_heads"),
    ("layers", "o_proj"): ("layers", "heads", "embed"),
    ("layers", "q_bias"): ("layers", "heads"),
    ("layers", "k_bias"): ("layers", "kv_heads"),
    ("layers", "v_bias"): ("layers", "kv_heads"),
    ("layers", "o_bias"): ("layers", "norm"),
    ("layers", "q_norm"): ("layers", "head_dim"),
    ("layers", "k_norm"): ("layers", "head_dim"),
    ("layers", "gate_proj"): ("layers", "embed", "mlp"),
    ("layers", "up_proj"): ("layers", "embed", "mlp"),
    ("layers", "down_proj"): ("layers", "mlp", "embed"),
    ("layers", "router"): ("layers", "embed", None),
    ("layers", "experts_gate_proj"): ("layers", "experts", "embed", "mlp"),
    ("layers", "experts_up_proj"): ("layers", "experts", "embed", "mlp"),
    ("layers", "experts_down_proj"): ("layers", "experts", "mlp", "embed"),
}


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the mesh axes; their product must equal the number of devices used."""

    dp: int = 1
    fsdp: int = 1
    tp: int = 1
    ep: int = 1

    def __post_init__(self) -> None:
        for axis in MESH_AXES:
            size = getattr(self, axis)
            if not isinstance(size, int) or isinstance(size, bool) or size < 1:
                raise ValueError(f"mesh: {axis}={size!r} must be an int >= 1")

    @classmethod
    def parse(cls, text: str) -> MeshConfig:
        """``"fsdp=4,tp=2"`` → ``MeshConfig(fsdp=4, tp=2)``."""
        sizes: dict[str, int] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            name, sep, value = part.partition("=")
            if not sep or name not in MESH_AXES or not value.isdigit() or int(value) < 1:
                raise ValueError(f"mesh: {part!r} is not axis=size with axis in {MESH_AXES} and size >= 1")
            sizes[name] = int(value)
        return cls(**sizes)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(getattr(self, axis) for axis in MESH_AXES)

    @property
    def size(self) -> int:
        return math.prod(self.shape)


def make_mesh(
    config: MeshConfig | Mapping[str, int] | str | None = None, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """A mesh with named axes ``dp, fsdp, tp, ep`` (Auto axis types, so jit shardings drive layout).

    ``config``: a :class:`MeshConfig`, ``{"fsdp": 4, "tp": 2}`` or ``"fsdp=4,tp=2"``; None is one device."""
    if config is None:
        config = MeshConfig()
    elif isinstance(config, str):
        config = MeshConfig.parse(config)
    elif isinstance(config, Mapping):
        unknown = sorted(set(config) - set(MESH_AXES))
        if unknown:
            raise ValueError(f"mesh: unknown axes {unknown}; the axes are {MESH_AXES}")
        config = MeshConfig(**config)
    elif not isinstance(config, MeshConfig):
        kind = type(config).__name__
        raise TypeError(f"mesh: expected a MeshConfig, a dict or 'axis=size,...', got {kind}")
    devices = list(devices if devices is not None else jax.devices())
    if config.size > len(devices):
        raise ValueError(f"mesh: {config} needs {config.size} devices, only {len(devices)} available")
    grid = np.asarray(devices[: config.size]).reshape(config.shape)
    return Mesh(grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Logical axis name → mesh axis (or axes, or None for replicated)."""

    rules: tuple[tuple[str, AxisRule], ...] = DEFAULT_RULES

    def replace(self, **overrides: AxisRule) -> ShardingRules:
        table = dict(self.rules)
        table.update(overrides)
        return ShardingRules(tuple(table.items()))

    def spec(self, logical_axes: Sequence[str | None]) -> PartitionSpec:
        table = dict(self.rules)
        used: set[str] = set()
        out = []
        for name in logical_axes:
            rule = table.get(name) if name is not None else None
            axes = (rule,) if isinstance(rule, str) else tuple(rule or ())
            axes = tuple(a for a in axes if a not in used)  # a mesh axis shards one dim at most
            used.update(axes)
            out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
        return PartitionSpec(*out)


def _axis_size(mesh: Mesh, entry: Any) -> int:
    if entry is None:
        return 1
    names = (entry,) if isinstance(entry, str) else entry
    return math.prod(mesh.shape[n] for n in names)


def checked_sharding(mesh: Mesh, spec: PartitionSpec, shape: Sequence[int], what: str) -> NamedSharding:
    """A NamedSharding, after checking that every sharded dimension divides evenly."""
    for dim, (size, entry) in enumerate(
        zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=False)
    ):
        parts = _axis_size(mesh, entry)
        if size % parts:
            raise ValueError(
                f"mesh: {what} dimension {dim} has size {size}, which mesh axes {entry!r} ({parts} devices) "
                "do not divide; change the mesh shape or the sharding rules"
            )
    return NamedSharding(mesh, spec)


def fitted_sharding(
    mesh: Mesh, rules: ShardingRules, logical_axes: Sequence[str | None], shape: Sequence[int]
) -> NamedSharding:
    """For activations and caches: the rules' sharding, minus mesh axes on dims they do not divide."""
    spec = rules.spec(logical_axes)
    fitted = [
        entry if size % _axis_size(mesh, entry) == 0 else None
        for size, entry in zip(shape, spec, strict=False)
    ]
    return NamedSharding(mesh, PartitionSpec(*fitted))


def param_sharding(
    mesh: Mesh, rules: ShardingRules, path: tuple[str, ...], shape: Sequence[int]
) -> NamedSharding:
    """Sharding of a base param, by its path in the params pytree."""
    if path not in PARAM_AXES:
        raise KeyError(f"no logical axes declared for param {'/'.join(path)}")
    return checked_sharding(mesh, rules.spec(PARAM_AXES[path]), shape, "/".join(path))


def _lora_axes(path: tuple[str, ...], leaf_name: str) -> tuple[str, ...]:
    """A LoRA factor's axes follow its base kernel: a = [..., in, rank], b = [..., rank, out]."""
    kernel = PARAM_AXES[path] if path in PARAM_AXES else PARAM_AXES[("layers", path[-1])]
    *lead, fan_in, fan_out = kernel
    return (*lead, fan_in, "lora_rank") if leaf_name == "a" else (*lead, "lora_rank", fan_out)


def tree_paths(tree: Any) -> list[tuple[tuple[str, ...], Any]]:
    """(string key path, leaf) pairs of a pytree of dicts / dataclasses."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path), leaf) for path, leaf in flat]


def params_shardings(mesh: Mesh, rules: ShardingRules, params: Mapping) -> Any:
    """A pytree of NamedShardings matching ``params`` (or a tree of shapes)."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    paths = [p for p, _ in tree_paths(params)]
    shardings = [param_sharding(mesh, rules, p, np.shape(x)) for p, x in zip(paths, leaves, strict=True)]
    return jax.tree_util.tree_unflatten(treedef, shardings)


def lora_shardings(mesh: Mesh, rules: ShardingRules, tree: Any) -> Any:
    """Shardings for a LoRA pytree, or any tree that mirrors it (gradients, Adam moments).

    Leaves are recognised by their path ending in ``.../<target>/a`` or ``.../<target>/b``. A full
    fine-tune's trainable tree (``weights/<param path>``, and Adam moments mirroring it) is sharded like
    the base params. Any other leaf (step counts, hyperparameters) is replicated.
    """
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    out = []
    for path, leaf in tree_paths(tree):
        shape = np.shape(leaf)
        full = next((path[i + 1 :] for i, k in enumerate(path) if k == "weights"), None)
        if full in PARAM_AXES:
            out.append(param_sharding(mesh, rules, full, shape))
        elif (
            len(path) >= 2
            and path[-1] in ("a", "b")
            and (path[-2] == "lm_head" or ("layers", path[-2]) in PARAM_AXES)
        ):
            target = ("lm_head",) if path[-2] == "lm_head" else ("layers", path[-2])
            spec = rules.spec(_lora_axes(target, path[-1]))
            out.append(checked_sharding(mesh, spec, shape, "lora/" + "/".join(target) + "/" + path[-1]))
        else:
            out.append(NamedSharding(mesh, PartitionSpec()))
    del leaves
    return jax.tree_util.tree_unflatten(treedef, out)


def place_lora(mesh: Mesh, rules: ShardingRules, tree: Any) -> Any:
    """Puts a LoRA-shaped tree (weights, grads, Adam state) on ``mesh`` by :func:`lora_shardings`."""
    return jax.device_put(tree, lora_shardings(mesh, rules, tree))


def batch_sharding(mesh: Mesh, rules: ShardingRules, ndim: int, *, stacked: bool = False) -> NamedSharding:
    """Batch-major arrays ``[B, T, ...]``: rows split over the batch axes. ``stacked``: ``[K, B, T, ...]``,
    one sub-batch per adapter of a multi-adapter step; the adapter axis stays whole."""
    lead = (None,) if stacked else ()
    return NamedSharding(mesh, rules.spec(lead + ("batch",) + (None,) * (ndim - 1 - len(lead))))


def batch_multiple(mesh: Mesh, rules: ShardingRules) -> int:
    """Rows per batch must be a multiple of this many devices."""
    return _axis_size(mesh, rules.spec(("batch",))[0])


__all__ = [
    "DEFAULT_RULES",
    "MESH_AXES",
    "PARAM_AXES",
    "MeshConfig",
    "ShardingRules",
    "batch_multiple",
    "batch_sharding",
    "checked_sharding",
    "fitted_sharding",
    "lora_shardings",
    "make_mesh",
    "param_sharding",
    "params_shardings",
]
