"""LoRA adapters as a separate pytree that mirrors the target weights.

``Lora.weights`` has the same nesting as the base params: ``weights["layers"]["q_proj"]`` holds
``{"a": [L, in, r], "b": [L, r, out]}`` next to the base kernel ``params["layers"]["q_proj"]``
of shape ``[L, in, out]``; ``weights["lm_head"]`` adapts the unembedding. The update to a kernel
``W`` is ``a @ b * scale`` with ``scale = alpha / r`` (or ``alpha / sqrt(r)`` with rsLoRA), exactly
PEFT's convention with PEFT's ``A = a.T`` and ``B = b.T``.

Targets are module names, as in PEFT's ``target_modules``. On a Qwen3-MoE model ``gate_proj``,
``up_proj`` and ``down_proj`` adapt the dense MLP of dense layers (``weights["layers"]["gate_proj"]``,
stacked over those layers) and every expert of the sparse layers
(``weights["layers"]["experts_gate_proj"]``: ``{"a": [Ls, E, in, r], "b": [Ls, E, r, out]}``).
The router is never adapted.

The model's dense linear layers (adapted or not) run through :func:`project`: ``x @ W`` plus the
low-rank branch, with a hand-written backward that stores only the layer's inputs and ``x @ a``.

Several adapters of one layout run in one batch as a *stacked* ``Lora`` (:func:`stack`): every leaf
gains an adapter axis right before its matrix dims (``a [L, K, in, r]``, experts ``[Ls, E, K, in, r]``,
``lm_head`` ``[K, H, r]``) and ``adapter_ids [B]`` names each batch row's adapter. Rows are grouped
by adapter (the ids are sorted), so each adapter multiplies only its own rows (``ragged_dot``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
from flax import struct

from .config import EXPERTS_PREFIX, ModelConfig
from .moe import grouped_matmul
from .products import kept_as_is, materialized_t, mm, mm_t

ATTN_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
UNEMBED_TARGET = "lm_head"
ALL_TARGETS = ATTN_TARGETS + MLP_TARGETS + (UNEMBED_TARGET,)
ADAPTER_AXIS = -3  # of a stacked adapter's leaves: [..., K, in, r]


@struct.dataclass
class Lora:
    """LoRA weights (the only pytree leaves) plus static hyperparameters."""

    weights: dict
    alpha: float = struct.field(pytree_node=False, default=32.0)
    use_rslora: bool = struct.field(pytree_node=False, default=False)
    adapter_ids: jax.Array | None = None  # [B], sorted; set on stacked adapters only (see :func:`stack`)

    @property
    def rank(self) -> int:
        first = next(iter(self.targets_tree().values()))
        return int(first["a"].shape[-1])

    @property
    def scale(self) -> float:
        r = self.rank
        return self.alpha / (math.sqrt(r) if self.use_rslora else r)

    @property
    def targets(self) -> tuple[str, ...]:
        """Module names adapted (``experts_gate_proj`` counts as ``gate_proj``)."""
        modules = {module_name(name) for name in self.targets_tree()}
        return tuple(name for name in ALL_TARGETS if name in modules)

    @property
    def num_adapters(self) -> int | None:
        """K of a stacked adapter; None for a single one."""
        if self.adapter_ids is None:
            return None
        return int(next(iter(self.targets_tree().values()))["a"].shape[ADAPTER_AXIS])

    def adapter_rows(self) -> jax.Array | None:
        """Batch rows per adapter, ``[K]`` (a stacked adapter's ``ragged_dot`` group sizes)."""
        if self.adapter_ids is None:
            return None
        return jnp.bincount(self.adapter_ids, length=self.num_adapters).astype(jnp.int32)

    def targets_tree(self) -> dict:
        """Flat ``{target_name: {"a", "b"}}`` view (layer weights stay stacked)."""
        flat = dict(self.weights.get("layers", {}))
        if UNEMBED_TARGET in self.weights:
            flat[UNEMBED_TARGET] = self.weights[UNEMBED_TARGET]
        return flat


def module_name(param: str) -> str:
    """The module a LoRA param stack adapts: ``experts_gate_proj`` → ``gate_proj``."""
    return param.removeprefix(EXPERTS_PREFIX)


def param_names(config: ModelConfig, target: str) -> tuple[str, ...]:
    """The param stacks a target module name adapts on this model."""
    if target not in MLP_TARGETS:
        return (target,)
    dense = (target,) if config.dense_layers else ()
    return dense + ((EXPERTS_PREFIX + target,) if config.sparse_layers else ())


def target_shape(config: ModelConfig, target: str) -> tuple[int, int]:
    """(in_features, out_features) of a LoRA target (a module name or an ``experts_*`` stack)."""
    h, i, im = config.hidden_size, config.intermediate_size, config.moe_intermediate_size
    if target.startswith(EXPERTS_PREFIX):
        return {"gate_proj": (h, im), "up_proj": (h, im), "down_proj": (im, h)}[module_name(target)]
    return {
        "q_proj": (h, config.q_size),
        "k_proj": (h, config.kv_size),
        "v_proj": (h, config.kv_size),
        "o_proj": (config.q_size, h),
        "gate_proj": (h, i),
        "up_proj": (h, i),
        "down_proj": (i, h),
        "lm_head": (h, config.vocab_size),
    }[target]


def lead_shape(config: ModelConfig, param: str) -> tuple[int, ...]:
    """Leading (stacking) dims of a LoRA param: ``[n_layers]``, ``[Ls, E]`` for experts, none for lm_head."""
    if param == UNEMBED_TARGET:
        return ()
    experts = (config.num_experts,) if param.startswith(EXPERTS_PREFIX) else ()
    return (len(config.stack_layers(param)), *experts)


def targets_for(train_attn: bool = True, train_mlp: bool = True, train_unembed: bool = True) -> tuple:
    """Tinker's ``train_attn``/``train_mlp``/``train_unembed`` flags as a target list.

    ``train_mlp`` names the MLP modules; on a MoE model they cover the experts (see module doc).
    """
    targets = (ATTN_TARGETS if train_attn else ()) + (MLP_TARGETS if train_mlp else ())
    return targets + ((UNEMBED_TARGET,) if train_unembed else ())


def init(
    config: ModelConfig,
    rank: int,
    key: jax.Array | int,
    *,
    alpha: float = 32.0,
    targets: Iterable[str] = ALL_TARGETS,
    use_rslora: bool = False,
    dtype: jnp.dtype = jnp.float32,
) -> Lora:
    """A random, PEFT-style init: ``a ~ U(±1/sqrt(in))`` (kaiming-uniform, a=sqrt(5)), ``b = 0``.

    ``key``: a ``jax.random.key`` or an int seed."""
    targets = tuple(targets)
    unknown = sorted(set(targets) - set(ALL_TARGETS))
    if unknown:
        raise ValueError(f"targets: unknown LoRA targets {unknown}; choose from {ALL_TARGETS}")
    if not targets:
        raise ValueError("targets: at least one LoRA target is required")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise ValueError(f"rank: must be a positive int, got {rank!r}")
    try:
        positive = not isinstance(alpha, bool) and 0 < float(alpha) < math.inf
    except (TypeError, ValueError):
        positive = False
    if not positive:
        raise ValueError(f"alpha: must be a positive number, got {alpha!r}")
    if isinstance(key, int) and not isinstance(key, bool):
        key = jax.random.key(key)
    try:
        keys = dict(zip(targets, jax.random.split(key, len(targets)), strict=True))
    except (TypeError, ValueError) as e:
        raise TypeError(f"key: expected jax.random.key(seed) or an int seed, got {key!r}") from e

    def make(param: str, key: jax.Array) -> dict:
        fan_in, fan_out = target_shape(config, param)
        lead = lead_shape(config, param)
        bound = 1.0 / math.sqrt(fan_in)
        a = jax.random.uniform(key, (*lead, fan_in, rank), dtype, -bound, bound)
        return {"a": a, "b": jnp.zeros((*lead, rank, fan_out), dtype)}

    weights: dict = {}
    for target in targets:
        if target == UNEMBED_TARGET:
            weights[UNEMBED_TARGET] = make(UNEMBED_TARGET, keys[target])
            continue
        params = param_names(config, target)
        # A dense model keeps its one draw per target (same adapters as before MoE support).
        subkeys = [keys[target]] if len(params) == 1 else list(jax.random.split(keys[target], len(params)))
        for param, subkey in zip(params, subkeys, strict=True):
            weights.setdefault("layers", {})[param] = make(param, subkey)
    return Lora(weights=weights, alpha=float(alpha), use_rslora=use_rslora)


def delta(ab: dict, scale: float) -> jax.Array:
    """The dense update ``a @ b * scale`` in f32 (stacked over layers when ``a`` is 3-D)."""
    a, b = ab["a"].astype(jnp.float32), ab["b"].astype(jnp.float32)
    return jnp.matmul(a, b) * scale


def merge(config: ModelConfig, params: dict, lora: Lora) -> dict:
    """Base params with the adapter folded in. A tied model gets an explicit ``lm_head``."""
    del config  # shapes come from the trees themselves
    merged = {**params, "layers": dict(params["layers"])}
    for name, ab in lora.weights.get("layers", {}).items():
        w = merged["layers"][name]
        merged["layers"][name] = (w.astype(jnp.float32) + delta(ab, lora.scale)).astype(w.dtype)
    if UNEMBED_TARGET in lora.weights:
        w = params["lm_head"] if "lm_head" in params else params["embed"].T
        merged["lm_head"] = (w.astype(jnp.float32) + delta(lora.weights["lm_head"], lora.scale)).astype(
            w.dtype
        )
    return merged


def layout(lora: Lora) -> tuple:
    """What adapters must share to be stacked: tree structure, leaf shapes and dtypes, scale."""
    leaves, treedef = jax.tree.flatten(lora.weights)
    return treedef, tuple((x.shape, jnp.dtype(x.dtype).name) for x in leaves), lora.alpha, lora.use_rslora


def stack(loras: Sequence[Lora], adapter_ids: jax.Array) -> Lora:
    """One batch's adapters as a stacked ``Lora``: row ``i`` uses ``loras[adapter_ids[i]]``.

    The adapters must share a :func:`layout`; ``adapter_ids`` must be sorted (rows grouped by adapter).
    """
    if not loras:
        raise ValueError("loras: at least one adapter is required")
    for i, lora in enumerate(loras):
        if lora.adapter_ids is not None:
            raise ValueError(f"loras[{i}]: is already stacked")
        if layout(lora) != layout(loras[0]):
            raise ValueError(f"loras[{i}]: its shapes, dtypes or alpha differ from loras[0]'s")
    weights = jax.tree.map(lambda *xs: jnp.stack(xs, axis=ADAPTER_AXIS), *[lora.weights for lora in loras])
    return Lora(weights, loras[0].alpha, loras[0].use_rslora, adapter_ids=jnp.asarray(adapter_ids, jnp.int32))


def apply(x: jax.Array, ab: dict | None, scale: float, adapter_rows: jax.Array | None = None) -> jax.Array:
    """The LoRA branch ``(x @ a) @ b * scale``, computed low-rank first (never forms ``a @ b``).

    With ``adapter_rows`` ([K], see :meth:`Lora.adapter_rows`), ``ab`` is stacked (``a [K, in, r]``)
    and the first ``adapter_rows[0]`` rows of ``x`` (its leading axis) use adapter 0, and so on.
    """
    if ab is None:
        return jnp.zeros((), x.dtype)
    if adapter_rows is None:
        return project(None, (x,), (None,), (ab,), scale)[0]
    rows = x.reshape(-1, x.shape[-1])
    per = rows.shape[0] // x.shape[0]
    sizes = adapter_rows * per  # every row of x is x.shape[1:-1] matrix rows
    low = grouped_matmul(rows, ab["a"].astype(x.dtype), sizes)
    y = grouped_matmul(low, ab["b"].astype(x.dtype), sizes) * jnp.asarray(scale, x.dtype)
    return y.reshape(*x.shape[:-1], y.shape[-1])


# --------------------------------------------------------------------------------------------------
# The adapted linear layer, with a hand-written backward.


def _cat(arrays: list, axis: int = -1) -> jax.Array:
    return arrays[0] if len(arrays) == 1 else jnp.concatenate(arrays, axis)


def _split(x: jax.Array, sizes: list[int], axis: int = -1) -> list[jax.Array]:
    if len(sizes) == 1:
        return [x]
    bounds = [sum(sizes[: i + 1]) for i in range(len(sizes) - 1)]
    return jnp.split(x, bounds, axis)


def project(
    prologue: Callable | None, inputs: tuple, weights: tuple, loras: tuple, scale: float
) -> tuple[jax.Array, ...]:
    """``x @ W_i + (x @ a_i) @ b_i * scale`` for every ``i``, with ``x = prologue(*inputs)``.

    One op for the linears that read the same input (q, k, v; gate, up). ``weights[i]`` is a base
    kernel ``[in, out_i]`` or None (LoRA branch only), ``loras[i]`` an ``{"a", "b"}`` adapter or None.
    ``prologue`` (e.g. the RMSNorm, or SwiGLU before ``down_proj``) is a cheap elementwise function
    of ``inputs``; without one, ``inputs`` is ``(x,)``. Same values as the plain expression (up to
    float reassociation); the hand-written backward

    * keeps only ``inputs`` and the rank-``r`` products ``x @ a`` for backward, recomputing the
      prologue there (activation memory: the RMSNorm output and ``silu(gate) * up`` are not stored);
    * gives every product a form XLA:CPU's fast (YNNPACK) dots take (see :func:`products.materialized_t`);
    * computes the base kernels' gradients only if something asks for them (XLA drops them when
      only the adapters are differentiated).

    The op itself takes ``[rows, features]`` activations, flattened before the prologue. Under
    ``vmap`` (several adapters) a base product then reads the prologue's ``[K, rows, in]`` output as
    ``[K * rows, in]`` and a LoRA product reads it as it is; when both reshaped a ``[K, B, T, in]``
    output, XLA computed the prologue once for each.
    """
    lead = inputs[0].shape[:-1]  # activations share it; a prologue's weights (the norm's) do not
    rows = tuple(v.reshape(-1, v.shape[-1]) if v.shape[:-1] == lead else v for v in inputs)
    outs = _project_rows(prologue, rows, weights, loras, scale)
    return tuple(y.reshape(*lead, y.shape[-1]) for y in outs)


def _project(prologue, inputs, weights, loras, scale):
    x = prologue(*inputs) if prologue is not None else inputs[0]
    outs = [None if w is None else mm(x, w) for w in weights]
    adapted = [i for i, ab in enumerate(loras) if ab is not None]
    low = []
    if adapted:
        s = jnp.asarray(scale, x.dtype)
        # One x @ a per adapter (not one x @ [a_1 | a_2 | ...]): the forward stays the same, bit for bit,
        # whatever the other adapters' ranks (a rank-padded export reimports exactly).
        low = [mm(x, loras[i]["a"].astype(x.dtype)) for i in adapted]
        for i, xa in zip(adapted, low, strict=True):
            delta = mm(xa, loras[i]["b"].astype(x.dtype)) * s
            outs[i] = delta if outs[i] is None else outs[i] + delta
    # Residuals: the op's inputs (the prologue's output is recomputed in backward) and x @ a.
    return tuple(outs), (inputs, weights, loras, low)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 4))
def _project_rows(prologue, inputs, weights, loras, scale):
    """:func:`project` on ``[rows, features]`` activations, with the hand-written backward."""
    return _project(prologue, inputs, weights, loras, scale)[0]


def _project_bwd(prologue, scale, residuals, cotangents):
    inputs, weights, loras, low = residuals
    if prologue is not None:
        x, pullback = jax.vjp(prologue, *inputs)
    else:
        x = inputs[0]
    dt = x.dtype
    gs = [g.astype(dt) for g in cotangents]
    dx = None
    dweights = []
    for g, w in zip(gs, weights, strict=True):
        if w is None:
            dweights.append(None)
            continue
        part = mm_t(g, w.astype(dt))
        dx = part if dx is None else dx + part
        dweights.append(mm(materialized_t(x), g).astype(w.dtype))  # dead unless W is trained
    adapted = [i for i, ab in enumerate(loras) if ab is not None]
    dloras: list = [None] * len(loras)
    if adapted:
        s = jnp.asarray(scale, dt)
        dlow = [mm_t(gs[i], loras[i]["b"].astype(dt)) * s for i in adapted]  # d(x @ a), [rows, r]
        for i, xa in zip(adapted, low, strict=True):
            dloras[i] = {"b": (mm(materialized_t(xa), gs[i]) * s).astype(loras[i]["b"].dtype)}
        dlow_cat = _cat(dlow)
        # d a_i = x.T @ d(x @ a_i), formed transposed ([r, in]) so the big operand stays canonical.
        # Kept as computed: XLA would fold the swap below into a "TN" dot over rows (vmapped: Eigen).
        da_t = kept_as_is(mm(materialized_t(dlow_cat), x))
        da_t = _split(da_t, [loras[i]["a"].shape[-1] for i in adapted], axis=0)
        for i, d in zip(adapted, da_t, strict=True):
            dloras[i]["a"] = jnp.swapaxes(d, -1, -2).astype(loras[i]["a"].dtype)
        part = mm_t(dlow_cat, _cat([loras[i]["a"].astype(dt) for i in adapted]))
        dx = part if dx is None else dx + part
    dinputs = pullback(dx) if prologue is not None else (dx,)
    return tuple(dinputs), tuple(dweights), tuple(dloras)


_project_rows.defvjp(_project, _project_bwd)
