"""Qwen3-MoE sparse block: a top-k router and SwiGLU experts computed as grouped matmuls.

Params of a sparse layer (kernels ``[in, out]``, stacked over the sparse layers ``Ls``)::

    router [Ls, H, E]; experts_gate_proj / experts_up_proj [Ls, E, H, Im]; experts_down_proj [Ls, E, Im, H]

LoRA on the experts mirrors them: ``{"a": [Ls, E, in, r], "b": [Ls, E, r, out]}``.

Every (token, choice) pair is one row; rows are sorted by expert so that each expert's rows are
contiguous, and ``jax.lax.ragged_dot`` multiplies each group by its own expert's matrix (on CPU,
where XLA runs it as a dense product against every expert, a loop over row tiles does: see
:func:`_tiled`; products too small to tile run dense without XLA's copy of the matrices, see
:func:`_dense`). No token is dropped (there is no capacity), so results never depend on what else is
in the batch.

``jax.lax.ragged_dot`` cannot be vmapped unless every argument is batched, and not at all once
differentiated (jax 0.10), while the engine vmaps the whole model over adapters. So the grouped
matmul carries its own VJP and, under ``vmap``, loops over the batch (the base experts are shared,
never broadcast).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .config import EXPERTS_PREFIX, ROUTER_PARAM, ModelConfig
from .products import materialized_t, mm


def route(config: ModelConfig, x: jax.Array, router: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Top-k expert ids ``[N, k]`` and their weights ``[N, k]`` (in ``x``'s dtype) for ``x [N, H]``.

    As transformers 5.24's ``Qwen3MoeTopKRouter``: logits in the activation dtype, softmax in f32,
    top-k, optional renormalisation, then cast back.
    """
    logits = mm(x, router.astype(x.dtype))
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, config.num_experts_per_tok)
    if config.norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights.astype(x.dtype), experts.astype(jnp.int32)


# Multiply-adds a dense pass would waste on other groups' matrices beyond which tiles pay for their
# loop (measured on XLA:CPU: a decode step's LoRA products stay dense, expert matmuls are tiled).
TILED_MIN_WASTE = 1 << 24


def _tiled_on_cpu(rows: int, w: jax.Array) -> bool:
    """Whether to multiply ``rows`` grouped rows by ``w [G, in, out]`` with :func:`_tiled`.

    XLA:CPU runs ``ragged_dot`` as one dense product of every row with every group's matrix (masked):
    ``G`` times the multiply-adds. Other backends have grouped-matmul kernels for ``ragged_dot``."""
    groups, fan_in, fan_out = w.shape
    return jax.default_backend() == "cpu" and rows * (groups - 1) * fan_in * fan_out >= TILED_MIN_WASTE


def _tile_rows(rows: int, num_groups: int) -> int:
    """About half a group's share of rows, in [8, 128]: partial tiles waste little, and each tile's
    product stays large enough to run at full speed (measured on XLA:CPU)."""
    half_share = -(-rows // (2 * num_groups))
    return int(min(128, max(8, -(-half_share // 8) * 8)))


def _tiles(group_sizes: jax.Array, rows: int) -> tuple[int, jax.Array, jax.Array, jax.Array, jax.Array]:
    """``(tile, group, start, count, used)``: ``tile``-row tiles (:func:`_tile_rows`) covering ``rows``
    rows grouped by ``group_sizes``, in row order. Tile ``t`` holds rows ``[start[t], start[t] + tile)``,
    of which the first ``count[t]`` belong to group ``group[t]``. The arrays have room for every split
    of the rows (each group adds at most one partial tile); the first ``used`` tiles are the ones this
    split needs."""
    num_groups = group_sizes.shape[0]
    tile = _tile_rows(rows, num_groups)
    per_group = (group_sizes + tile - 1) // tile
    tiles_end = jnp.cumsum(per_group)
    t = jnp.arange(-(-rows // tile) + num_groups)
    group = jnp.minimum(jnp.searchsorted(tiles_end, t, side="right"), num_groups - 1)
    rows_end = jnp.cumsum(group_sizes)
    start = rows_end[group] - group_sizes[group] + (t - tiles_end[group] + per_group[group]) * tile
    count = jnp.minimum(rows_end[group] - start, tile)
    return tile, group, start, count, tiles_end[-1]


def _tiled(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """``ragged_dot(x, w, group_sizes)`` one tile of rows at a time, each times its group's matrix.

    Tiles run in row order and write whole tiles: rows past a tile's own are overwritten by the
    tiles that own them, which come later (the last tile's spill into the padding). The loop runs
    only the tiles the split needs."""
    rows = x.shape[0]
    tile, group, start, _, used = _tiles(group_sizes, rows)
    padded = jnp.pad(x, ((0, tile), (0, 0)))

    def one_tile(i, out):
        y = mm(jax.lax.dynamic_slice_in_dim(padded, start[i], tile), w[group[i]])
        return jax.lax.dynamic_update_slice_in_dim(out, y, start[i], 0)

    out = jnp.zeros((rows + tile, w.shape[-1]), x.dtype)
    return jax.lax.fori_loop(0, used, one_tile, out)[:rows]


def _tiled_dw(x: jax.Array, w: jax.Array, group_sizes: jax.Array, g: jax.Array) -> jax.Array:
    """The gradient of :func:`_tiled` to ``w``: each group's rows of ``x.T @ g``, summed in f32."""
    rows = x.shape[0]
    tile, group, start, count, used = _tiles(group_sizes, rows)
    x_padded, g_padded = (jnp.pad(a, ((0, tile), (0, 0))) for a in (x, g))

    def one_tile(i, dw):
        own = (jnp.arange(tile) < count[i])[:, None]
        x_t = materialized_t(jnp.where(own, jax.lax.dynamic_slice_in_dim(x_padded, start[i], tile), 0))
        g_tile = jax.lax.dynamic_slice_in_dim(g_padded, start[i], tile)
        return dw.at[group[i]].add(jnp.matmul(x_t, g_tile, preferred_element_type=jnp.float32))

    dw = jax.lax.fori_loop(0, used, one_tile, jnp.zeros(w.shape, jnp.float32))
    return dw.astype(w.dtype)


def _own_group(group_sizes: jax.Array, rows: int) -> jax.Array:
    """``[rows, G]`` bool: row ``i`` is in group ``g`` (rows past every group are in none)."""
    row_group = jnp.searchsorted(jnp.cumsum(group_sizes), jnp.arange(rows), side="right")
    return row_group[:, None] == jnp.arange(group_sizes.shape[0])


def _spread(x: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """``[M, G * in]``: each row of ``x`` in its own group's block, zeros in the others'."""
    own = _own_group(group_sizes, x.shape[0])
    return jnp.where(own[..., None], x[:, None, :], 0).reshape(x.shape[0], -1)


def _dense(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """``ragged_dot(x, w, group_sizes)`` on CPU as one ``[M, G * in] @ [G * in, out]`` product, for
    products too small to tile. XLA:CPU's own lowering of ``ragged_dot`` is this product too, but it
    first transposes ``w`` (every group's matrix) into a new array, on every call."""
    return mm(_spread(x, group_sizes), w.reshape(-1, w.shape[-1]))


def _dense_dx(w: jax.Array, group_sizes: jax.Array, g: jax.Array) -> jax.Array:
    """The gradient of :func:`_dense` to ``x``: ``g`` times every group's ``w.T`` (read in place as
    the transposed operand of one product), each row keeping its own group's block."""
    rows, (groups, fan_in, fan_out) = g.shape[0], w.shape
    every = jax.lax.dot_general(
        g, w.reshape(-1, fan_out), (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
    )
    own = _own_group(group_sizes, rows)
    return jnp.sum(jnp.where(own[..., None], every.reshape(rows, groups, fan_in), 0), axis=1).astype(g.dtype)


def _dense_dw(x: jax.Array, w: jax.Array, group_sizes: jax.Array, g: jax.Array) -> jax.Array:
    """The gradient of :func:`_dense` to ``w``: ``spread(x).T @ g``, in f32."""
    spread = materialized_t(_spread(x, group_sizes))
    return jnp.matmul(spread, g, preferred_element_type=jnp.float32).reshape(w.shape).astype(w.dtype)


@jax.custom_batching.sequential_vmap
def _ragged_dot(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
    if _tiled_on_cpu(x.shape[0], w):
        return _tiled(x, w, group_sizes)
    if jax.default_backend() == "cpu":
        return _dense(x, w, group_sizes)
    return jax.lax.ragged_dot(x, w, group_sizes)


# dx and dw are separate programs so that an unused one (dw of the frozen base experts) is dead
# code even inside the loop ``vmap`` turns them into.
@jax.custom_batching.sequential_vmap
def _ragged_dot_dx(w: jax.Array, group_sizes: jax.Array, g: jax.Array) -> jax.Array:
    if _tiled_on_cpu(g.shape[0], w):
        return _tiled(g, jnp.swapaxes(w, -1, -2), group_sizes)
    if jax.default_backend() == "cpu":
        return _dense_dx(w, group_sizes, g)
    return jax.lax.ragged_dot(g, jnp.swapaxes(w, -1, -2), group_sizes)


@jax.custom_batching.sequential_vmap
def _ragged_dot_dw(x: jax.Array, w: jax.Array, group_sizes: jax.Array, g: jax.Array) -> jax.Array:
    if _tiled_on_cpu(x.shape[0], w):
        return _tiled_dw(x, w, group_sizes, g)
    if jax.default_backend() == "cpu":
        return _dense_dw(x, w, group_sizes, g)
    _, pullback = jax.vjp(lambda w: jax.lax.ragged_dot(x, w, group_sizes), w)
    return pullback(g)[0]


@jax.custom_vjp
def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """``x [M, in]`` with rows grouped by expert (``group_sizes [E]``) times ``w [E, in, out]``."""
    return _ragged_dot(x, w, group_sizes)


def _grouped_matmul_fwd(x, w, group_sizes):
    return _ragged_dot(x, w, group_sizes), (x, w, group_sizes)


def _grouped_matmul_bwd(residuals, g):
    x, w, group_sizes = residuals
    return _ragged_dot_dx(w, group_sizes, g), _ragged_dot_dw(x, w, group_sizes, g), None


grouped_matmul.defvjp(_grouped_matmul_fwd, _grouped_matmul_bwd)


def _grouped(
    x: jax.Array,
    layer: dict,
    lora_layer: dict | None,
    name: str,
    scale: float,
    group_sizes: jax.Array,
    lora_group_sizes: jax.Array,
) -> jax.Array:
    """``x [M, in]`` (rows sorted by expert) times each row's expert kernel, plus its LoRA branch."""
    key = EXPERTS_PREFIX + name
    y = grouped_matmul(x, layer[key].astype(x.dtype), group_sizes)
    if lora_layer is not None and key in lora_layer:
        a, b = lora_layer[key]["a"], lora_layer[key]["b"]
        if a.ndim == 4:  # a stacked adapter, [E, K, in, r]: one group per (expert, adapter)
            a, b = a.reshape(-1, *a.shape[2:]), b.reshape(-1, *b.shape[2:])
        low = grouped_matmul(x, a.astype(x.dtype), lora_group_sizes)  # [M, r]
        y = y + grouped_matmul(low, b.astype(x.dtype), lora_group_sizes) * jnp.asarray(scale, x.dtype)
    return y


def moe_block(
    config: ModelConfig,
    x: jax.Array,
    layer: dict,
    lora_layer: dict | None,
    scale: float,
    adapter_ids: jax.Array | None = None,
) -> jax.Array:
    """The sparse MLP of one layer for ``x [B, ..., H]`` (already post-attention-normed).

    ``adapter_ids [B]``: each batch row's adapter when ``lora_layer`` is stacked (``[E, K, in, r]``).
    """
    shape = x.shape
    x = x.reshape(-1, shape[-1])
    n, k = x.shape[0], config.num_experts_per_tok
    weights, experts = route(config, x, layer[ROUTER_PARAM])

    flat = experts.reshape(-1)  # row j = token j // k, choice j % k
    group_sizes = jnp.bincount(flat, length=config.num_experts).astype(jnp.int32)
    expert_loras = [ab for key, ab in (lora_layer or {}).items() if key.startswith(EXPERTS_PREFIX)]
    if adapter_ids is None or not expert_loras:
        group, num_groups = flat, config.num_experts
    else:  # sorted by (expert, adapter): still grouped by expert for the base kernels
        num_adapters = expert_loras[0]["a"].shape[-3]
        token_adapter = jnp.broadcast_to(adapter_ids.reshape(-1, *[1] * (len(shape) - 2)), shape[:-1])
        group = flat * num_adapters + jnp.repeat(token_adapter.reshape(-1), k)
        num_groups = config.num_experts * num_adapters
    order = jnp.argsort(group, stable=True)
    lora_group_sizes = jnp.bincount(group, length=num_groups).astype(jnp.int32)
    rows = x[order // k]  # [N*k, H], grouped by expert

    grouped = lambda x, name: _grouped(x, layer, lora_layer, name, scale, group_sizes, lora_group_sizes)
    gate, up = grouped(rows, "gate_proj"), grouped(rows, "up_proj")
    out = grouped(jax.nn.silu(gate) * up, "down_proj")

    # Back to (token, choice) order with a gather (cheaper to differentiate than a scatter-add).
    out = out[jnp.argsort(order)].reshape(n, k, -1)
    y = jnp.sum(out * weights[..., None], axis=1)
    return y.reshape(shape)
