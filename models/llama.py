"""Llama 3.x, Qwen2/2.5 and Qwen3 (dense) as pure functions over a plain params pytree.

The three families differ only by flags on :class:`ModelConfig`: Qwen2 adds q/k/v biases,
Qwen3 adds a per-head RMSNorm on q and k before RoPE, Llama 3 scales RoPE frequencies.

Params (kernels are ``[in, out]``; every layer weight is stacked on a leading ``L`` axis so the
decoder runs as one ``lax.scan``)::

    embed [V, H]; norm [H]; lm_head [H, V] (absent when embeddings are tied)
    layers: input_norm [L, H], post_norm [L, H],
            q_proj [L, H, nH*D], k_proj / v_proj [L, H, nKV*D], o_proj [L, nH*D, H],
            q_bias / k_bias / v_bias (Qwen2), o_bias (Llama attention_bias),
            q_norm / k_norm [L, D] (Qwen3),
            gate_proj / up_proj [L, H, I], down_proj [L, I, H]

Qwen3-MoE swaps the MLP of its sparse layers for the block in ``models/moe.py``; the dense MLP and
the expert weights are then stacked over only the layers that carry them (``config.stack_layers``),
and the decoder runs one scan per run of same-kind layers (a single scan when all are sparse).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from . import lora as lora_lib
from . import moe, products
from .config import ModelConfig

Params = dict


@struct.dataclass
class KVCache:
    """Preallocated keys and values, ``[L, B, S, nKV, D]``. Slot ``s`` holds position ``s``."""

    k: jax.Array
    v: jax.Array

    @classmethod
    def zeros(cls, config: ModelConfig, batch: int, size: int, dtype=jnp.float32) -> KVCache:
        shape = (config.num_layers, batch, size, config.num_kv_heads, config.head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))

    @property
    def size(self) -> int:
        return self.k.shape[2]


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm as transformers does it: normalise in f32, cast back, then scale."""
    h = x.astype(jnp.float32)
    h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + eps)
    return weight * h.astype(x.dtype)


def rope(config: ModelConfig, positions: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables ``[B, T, D]`` in the half-split convention, computed in f32."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(config.inv_freq())
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """``x`` is ``[B, T, heads, D]``; rotate_half pairs dimension i with i + D/2."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


def _project(
    prologue, inputs: tuple, layer: dict, lora_layer: dict | None, names, scale, biases=None, adapters=None
):
    """``prologue(*inputs) @ W_name`` (+ bias, + LoRA) for the linears that share an input, as one
    :func:`lora.project` (its backward recomputes the prologue instead of storing its output).
    ``adapters``: ``(adapter_ids, adapter_rows)`` of a stacked adapter, else None."""
    loras = tuple(lora_layer.get(name) if lora_layer is not None else None for name in names)
    weights = tuple(layer[name] for name in names)
    if adapters is None:
        outs = lora_lib.project(prologue, inputs, weights, loras, scale)
    else:  # several adapters: the shared base linears as one op, then each adapter on its own rows
        x = prologue(*inputs) if prologue is not None else inputs[0]
        outs = lora_lib.project(None, (x,), weights, (None,) * len(names), scale)
        outs = tuple(
            y if ab is None else y + lora_lib.apply(x, ab, scale, adapters[1])
            for y, ab in zip(outs, loras, strict=True)
        )
    if biases is not None:
        outs = tuple(y + layer[b] if b in layer else y for y, b in zip(outs, biases, strict=True))
    return outs


def _swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    return jax.nn.silu(gate) * up


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Grouped-query attention with an f32 softmax.

    q ``[B, T, nH, D]``, k/v ``[B, S, nKV, D]``, mask ``[B, T, S]`` (True = attend) or None (causal).
    On an NVIDIA GPU, 16-bit inputs run cuDNN's flash attention (:func:`fused_attention`). Elsewhere
    the heads that share a key head are stacked with the query positions (``[B, nKV, G*T, D]``), so
    every product is a plain batched matmul over (batch, key head) with ``G*T`` rows.
    """
    if _cudnn_attention(q):
        try:
            return fused_attention(q, k, v, mask, implementation="cudnn")
        except NotImplementedError:  # shapes or vmapped layouts cuDNN refuses (at trace time)
            pass
    b, t, num_heads, d = q.shape
    num_kv = k.shape[2]
    g = num_heads // num_kv
    if mask is None:
        mask = jnp.tril(jnp.ones((t, k.shape[1]), bool))[None]  # broadcast over the batch below
    q = q.reshape(b, t, num_kv, g, d).transpose(0, 2, 3, 1, 4).reshape(b, num_kv, g * t, d)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    mask = jnp.broadcast_to(mask[:, None, None], (b, 1, g, t, mask.shape[-1])).reshape(b, 1, g * t, -1)
    out = _attention(q, k, v, mask).reshape(b, num_kv, g, t, d)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, num_heads * d)


def _cudnn_attention(q: jax.Array) -> bool:
    """cuDNN's flash attention takes 16-bit inputs on NVIDIA GPUs (jax.nn.dot_product_attention)."""
    device = jax.devices()[0]
    return (
        q.dtype in (jnp.bfloat16, jnp.float16)
        and device.platform == "gpu"
        and "cuda" in device.client.platform_version.lower()
    )


def fused_attention(q, k, v, mask: jax.Array | None, *, implementation: str) -> jax.Array:
    """:func:`attention` through ``jax.nn.dot_product_attention`` (``implementation``: "cudnn" for
    flash attention on NVIDIA GPUs; "xla" runs anywhere). A None mask is causal, which cuDNN skips
    instead of masking."""
    b, t, num_heads, d = q.shape
    out = jax.nn.dot_product_attention(
        q, k, v, mask=None if mask is None else mask[:, None], is_causal=mask is None,
        implementation=implementation,
    )  # fmt: skip
    return out.reshape(b, t, num_heads * d)


def _scores(q: jax.Array, k: jax.Array, mask: jax.Array, *, transposed: bool = False) -> jax.Array:
    """Masked f32 scores ``[B, nKV, M, S]`` of grouped queries ``[B, nKV, M, D]``, keys ``[B, nKV, S, D]``
    (``[B, nKV, S, M]`` if ``transposed``: computed so, not transposed afterwards)."""
    spec, mask = ("bksd,bkmd->bksm", jnp.swapaxes(mask, -1, -2)) if transposed else ("bkmd,bksd->bkms", mask)
    a, b = (k, q) if transposed else (q, k)
    s = jnp.einsum(spec, a, b, preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5
    return jnp.where(mask, s, jnp.finfo(jnp.float32).min)


@jax.custom_vjp
def _attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax attention over ``[B, nKV, rows, D]`` operands; backward as in FlashAttention: only the
    output and the row log-sum-exp are kept, the probabilities are recomputed from them."""
    return _attention_fwd(q, k, v, mask)[0]


def _attention_fwd(q, k, v, mask):
    s = _scores(q, k, mask)
    top = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - top)
    total = jnp.sum(p, axis=-1, keepdims=True)
    out = jnp.einsum("bkms,bksd->bkmd", (p / total).astype(v.dtype), v)
    return out, (q, k, v, mask, out, (top + jnp.log(total))[..., 0])


def _attention_bwd(residuals, d_out):
    q, k, v, mask, out, lse = residuals
    dt = v.dtype
    # Transposed probabilities [B, nKV, S, rows]: dv and dk are then canonical products.
    p_t = jnp.exp(_scores(q, k, mask, transposed=True) - lse[:, :, None, :])
    dv = jnp.einsum("bksm,bkmd->bksd", p_t.astype(dt), d_out)
    dp_t = jnp.einsum("bksd,bkmd->bksm", v, d_out, preferred_element_type=jnp.float32)
    row_dot = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [B, nKV, rows]
    ds_t = (p_t * (dp_t - row_dot[:, :, None, :]) * q.shape[-1] ** -0.5).astype(dt)
    dk = jnp.einsum("bksm,bkmd->bksd", ds_t, q)
    dq = jnp.einsum("bkms,bksd->bkmd", products.materialized_t(ds_t), k)
    return dq, dk, dv, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def _norm_and_rope(config: ModelConfig, q, k, cos, sin, q_norm, k_norm):
    """Qwen3's per-head QK-norm (if any), then RoPE, on projected ``q [B, T, nH, D]`` and ``k``."""
    if config.qk_norm:
        q = rms_norm(q, q_norm, config.rms_norm_eps)
        k = rms_norm(k, k_norm, config.rms_norm_eps)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin)


def _sum_in_slices(x: jax.Array, axis: int, width: int = 32) -> jax.Array:
    """``x.sum(axis)``, on CPU as a sum of sums over slices at most ``width`` wide. XLA:CPU rewrites a
    longer reduction into a reduce-window over a materialized ``x``; narrow ones fuse the product that
    makes ``x`` into the reduction, which then reads the KV cache in place. Other backends: a sum."""
    n = x.shape[axis]
    if jax.default_backend() != "cpu" or n <= width:
        return x.sum(axis)
    parts = [jax.lax.slice_in_dim(x, i, min(i + width, n), axis=axis).sum(axis) for i in range(0, n, width)]
    return functools.reduce(jnp.add, parts)


def cached_attention(q, k, v, cache_k, cache_v, start) -> jax.Array:
    """Attention for a chunk of ``T`` new tokens at positions ``start + [0, T)`` of each row.

    Keys are the cache slots before ``start`` (slot == position; later slots are stale) plus the
    chunk's own keys, causally. The cache is only read: callers write the new keys afterwards, so a
    layer scan never rebuilds the stacked cache. A chunk that fills the whole cache starts at
    position 0 (a prefill): it has no past keys, so it runs plain causal :func:`attention` (cuDNN's
    on GPUs). A chunk after cached positions runs :func:`attention` over both parts, masked; a
    single token (decode) one f32 softmax that reads the cache in place.
    """
    b, t, num_heads, d = q.shape
    if cache_k.shape[1] == t:
        return attention(q, k.astype(q.dtype), v.astype(q.dtype), None)
    if t > 1:  # 2.1x faster than the one-token form's split softmax at 32 x 256 tokens after 512 slots
        s = cache_k.shape[1]
        past = jnp.broadcast_to((jnp.arange(s)[None, :] < start[:, None])[:, None], (b, t, s))
        causal = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool))[None], (b, t, t))
        keys, values = (
            jnp.concatenate([c, x], axis=1).astype(q.dtype) for c, x in ((cache_k, k), (cache_v, v))
        )
        return attention(q, keys, values, jnp.concatenate([past, causal], axis=-1))
    # Decode: multiply-and-reduce reads the cache once, in place, with no transposed copy.
    num_kv = k.shape[2]
    q = q.reshape(b, num_kv, num_heads // num_kv, d).astype(jnp.float32) * d**-0.5
    past = jnp.arange(cache_k.shape[1])[None, :] < start[:, None]  # [B, S]
    products = q[:, None] * cache_k[:, :, :, None, :].astype(jnp.float32)  # [B, S, nKV, G, D]
    s_past = jnp.where(past[:, None, None, :], jnp.moveaxis(_sum_in_slices(products, -1), 1, -1), -jnp.inf)
    s_new = jnp.einsum("bkgd,bkd->bkg", q, k[:, 0].astype(jnp.float32))[..., None]  # [B, nKV, G, 1]
    m = jnp.maximum(s_past.max(-1, keepdims=True), s_new)
    p_past, p_new = jnp.exp(s_past - m), jnp.exp(s_new - m)
    denom = p_past.sum(-1, keepdims=True) + p_new
    # The sum over cache slots stays whole: in slices it was 6-24% faster from 8 x 1024 slots up
    # but as much slower below.
    p_by_slot = jnp.moveaxis(p_past, -1, 1)[..., None]  # [B, S, nKV, G, 1]
    out = jnp.sum(p_by_slot * cache_v[:, :, :, None, :].astype(jnp.float32), 1)  # [B, nKV, G, D]
    out = (out + p_new * v[:, 0, :, None, :].astype(jnp.float32)) / denom
    return out.astype(v.dtype).reshape(b, t, num_heads * d)


def _decoder_layer(config: ModelConfig, scale: float, sparse: bool, carry, xs):
    x, cos, sin, mask, positions, adapters = carry
    layer, lora_layer, cache_k, cache_v = xs
    b, t, _ = x.shape
    heads, kv_heads, d = config.num_heads, config.num_kv_heads, config.head_dim
    norm = functools.partial(rms_norm, eps=config.rms_norm_eps)

    q, k, v = _project(
        norm, (x, layer["input_norm"]), layer, lora_layer, ("q_proj", "k_proj", "v_proj"), scale,
        ("q_bias", "k_bias", "v_bias"), adapters,
    )  # fmt: skip
    q, k, v = q.reshape(b, t, heads, d), k.reshape(b, t, kv_heads, d), v.reshape(b, t, kv_heads, d)
    q, k = _norm_and_rope(config, q, k, cos, sin, layer.get("q_norm"), layer.get("k_norm"))
    if cache_k is None:
        # The backward recomputes the probabilities (see _attention): never stored, B * nH * T * T.
        attn = attention(q, k, v, mask)
        new_kv = (None, None)
    else:
        k, v = k.astype(cache_k.dtype), v.astype(cache_v.dtype)  # attend to what is stored
        attn = cached_attention(q, k, v, cache_k, cache_v, positions[:, 0]).astype(x.dtype)
        new_kv = (k, v)
    (o,) = _project(None, (attn,), layer, lora_layer, ("o_proj",), scale, ("o_bias",), adapters)
    x = x + o

    if sparse:
        h = rms_norm(x, layer["post_norm"], config.rms_norm_eps)
        x = x + moe.moe_block(config, h, layer, lora_layer, scale, None if adapters is None else adapters[0])
    else:
        mlp_in = (x, layer["post_norm"])
        gate, up = _project(norm, mlp_in, layer, lora_layer, ("gate_proj", "up_proj"), scale, None, adapters)
        (down,) = _project(_swiglu, (gate, up), layer, lora_layer, ("down_proj",), scale, None, adapters)
        x = x + down
    return (x, cos, sin, mask, positions, adapters), new_kv


@functools.lru_cache(maxsize=64)
def _layer_body(config: ModelConfig, scale: float, remat: bool, sparse: bool = False):
    """One cached scan body per (config, scale, remat, kind), so eager calls reuse scan's compile cache."""
    body = functools.partial(_decoder_layer, config, scale, sparse)
    if remat:
        body = jax.checkpoint(body, policy=jax.checkpoint_policies.nothing_saveable)
    return body


def _segment(config: ModelConfig, stacks: dict | None, start: int, end: int) -> dict | None:
    """The slices of stacked layer weights (params or LoRA) that layers ``[start, end)`` use.

    Stacks cover only the layers that carry them (``config.stack_layers``), so e.g. the expert
    stack's row for layer ``start`` is its position among the sparse layers.
    """
    if stacks is None:
        return None
    out = {}
    for name, stack in stacks.items():
        layers = config.stack_layers(name)
        if start not in layers:  # e.g. the dense MLP in a run of sparse layers
            continue
        first, n = layers.index(start), end - start
        out[name] = stack if n == len(layers) else jax.tree.map(lambda w, f=first, n=n: w[f : f + n], stack)
    return out


def _attention_mask(positions, segment_ids, prefix_ids, cache: KVCache | None) -> jax.Array | None:
    """``[B, T, T]`` for packed sequences; None when causal alone (or with a cache, whose
    attention derives its own mask from the positions). A token attends to earlier tokens of its
    segment and, with ``prefix_ids``, to the segment it names (a prefix placed before it)."""
    if cache is not None or segment_ids is None:
        return None
    t = positions.shape[1]
    causal = jnp.tril(jnp.ones((t, t), bool))[None]
    visible = segment_ids[:, :, None] == segment_ids[:, None, :]
    if prefix_ids is not None:
        visible |= prefix_ids[:, :, None] == segment_ids[:, None, :]
    return causal & visible


def _check_ids(name: str, ids, vocab_size: int) -> None:
    """Token ids in ``[0, vocab_size)`` (gathers would clamp others silently); only concrete ones (not
    under jit) held by this process can be read."""
    if isinstance(ids, jax.core.Tracer) or not getattr(ids, "is_fully_addressable", True):
        return  # traced, or spread over other processes
    ids = np.asarray(jax.device_get(ids))
    bad = np.argwhere((ids < 0) | (ids >= vocab_size))
    if len(bad):
        where = tuple(int(i) for i in bad[0])
        value = int(ids[where])
        raise ValueError(f"{name}: id {value} at {list(where)} is outside the vocabulary [0, {vocab_size})")


def _check_inputs(config: ModelConfig, tokens, positions, segment_ids, prefix_ids, cache, lora) -> None:
    """Shapes and types are checked when traced; token ids too when they are concrete (not under jit)."""

    def int_array(name: str, x, like: tuple | None = None) -> None:
        shape, dtype = tuple(jnp.shape(x)), jnp.result_type(x)
        if len(shape) != 2 or not jnp.issubdtype(dtype, jnp.integer) or like not in (None, shape):
            want = "[batch, seq]" if like is None else f"{list(like)} like tokens"
            raise ValueError(f"{name}: expected an int array {want}, got {dtype}{list(shape)}")

    int_array("tokens", tokens)
    for name, x in (("positions", positions), ("segment_ids", segment_ids), ("prefix_ids", prefix_ids)):
        if x is not None:
            int_array(name, x, tuple(jnp.shape(tokens)))
    if prefix_ids is not None and segment_ids is None:
        raise ValueError("prefix_ids: name segments, so segment_ids are needed too")
    _check_ids("tokens", tokens, config.vocab_size)
    if lora is not None and not isinstance(lora, lora_lib.Lora):
        raise TypeError(f"lora: expected a jtinker.models.lora.Lora (lora.init), got {type(lora).__name__}")
    rows = jnp.shape(tokens)[0]
    if cache is not None and (not isinstance(cache, KVCache) or cache.k.shape[1] != rows):
        raise ValueError(f"cache: expected a KVCache of {rows} rows (KVCache.zeros)")


def hidden_states(
    config: ModelConfig,
    params: Params,
    tokens: jax.Array,
    *,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    prefix_ids: jax.Array | None = None,
    cache: KVCache | None = None,
    lora: lora_lib.Lora | None = None,
    remat: bool = False,
) -> tuple[jax.Array, KVCache | None]:
    """Final-norm hidden states ``[B, T, H]`` and the updated cache (None without a cache).

    ``segment_ids`` keep packed sequences apart; ``prefix_ids`` (``-1``: none) let a token also
    attend to the segment it names, so one copy of a shared prefix serves every sequence after it."""
    _check_inputs(config, tokens, positions, segment_ids, prefix_ids, cache, lora)
    b, t = tokens.shape
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    x = params["embed"][tokens]
    cos, sin = rope(config, positions, x.dtype)
    mask = _attention_mask(positions, segment_ids, prefix_ids, cache)

    scale = lora.scale if lora is not None else 1.0
    lora_layers = lora.weights.get("layers") if lora is not None else None
    adapters = None if lora is None or lora.adapter_ids is None else (lora.adapter_ids, lora.adapter_rows())
    new_ks, new_vs = [], []
    # One scan per run of same-kind layers: dense and all-sparse models have exactly one.
    for start, end, sparse in config.layer_segments():
        whole = end - start == config.num_layers
        kv = (None, None) if cache is None else (cache.k, cache.v)
        xs = (
            _segment(config, params["layers"], start, end),
            _segment(config, lora_layers, start, end),
            *(c if c is None or whole else c[start:end] for c in kv),
        )
        body = _layer_body(config, scale, remat, sparse)
        (x, *_), (new_k, new_v) = jax.lax.scan(body, (x, cos, sin, mask, positions, adapters), xs)
        new_ks.append(new_k)
        new_vs.append(new_v)
    x = rms_norm(x, params["norm"], config.rms_norm_eps)
    if cache is None:
        return x, None
    new_k = new_ks[0] if len(new_ks) == 1 else jnp.concatenate(new_ks)
    new_v = new_vs[0] if len(new_vs) == 1 else jnp.concatenate(new_vs)
    rows = jnp.arange(b)[:, None]  # one scatter for all layers: slot == position
    return x, KVCache(
        k=cache.k.at[:, rows, positions].set(new_k), v=cache.v.at[:, rows, positions].set(new_v)
    )


def unembed(params: Params, hidden: jax.Array, lora: lora_lib.Lora | None = None) -> jax.Array:
    """Logits in f32. Uses ``params["lm_head"]`` when present, else the tied embedding."""
    w = params["lm_head"] if "lm_head" in params else params["embed"].T
    logits = jnp.matmul(hidden, w.astype(hidden.dtype), preferred_element_type=jnp.float32)
    if lora is not None and lora_lib.UNEMBED_TARGET in lora.weights:
        ab = lora.weights[lora_lib.UNEMBED_TARGET]
        logits = logits + lora_lib.apply(hidden, ab, lora.scale, lora.adapter_rows()).astype(jnp.float32)
    return logits


def forward(
    config: ModelConfig,
    params: Params,
    tokens: jax.Array,
    *,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    prefix_ids: jax.Array | None = None,
    cache: KVCache | None = None,
    lora: lora_lib.Lora | None = None,
    remat: bool = False,
):
    """Logits ``[B, T, V]`` (f32) for int32 tokens ``[B, T]``.

    With ``cache``, the tokens of each row sit at contiguous ``positions`` starting after what the
    cache already holds (slot == position); their keys and values are written at those slots and
    ``(logits, new_cache)`` is returned. A cache of exactly ``T`` slots is thus a prefill from
    position 0 (plain causal attention). ``segment_ids`` keep packed sequences from attending to each
    other; ``prefix_ids`` share a prefix segment (see :func:`hidden_states`).
    """
    hidden, new_cache = hidden_states(
        config,
        params,
        tokens,
        positions=positions,
        segment_ids=segment_ids,
        prefix_ids=prefix_ids,
        cache=cache,
        lora=lora,
        remat=remat,
    )
    logits = unembed(params, hidden, lora)
    return logits if cache is None else (logits, new_cache)


def token_logprobs(
    params: Params,
    hidden: jax.Array,
    targets: jax.Array,
    lora: lora_lib.Lora | None = None,
    *,
    chunk_size: int = 128,
) -> jax.Array:
    """Log-probabilities of ``targets`` (``[B, T]`` or ``[B, T, K]``) without keeping ``[B, T, V]``.

    The sequence is processed in rematerialised chunks, so the backward pass holds the logits of
    one chunk at a time.
    """
    b, t, h = hidden.shape
    shape, dtype = tuple(jnp.shape(targets)), jnp.result_type(targets)
    if shape[:2] != (b, t) or len(shape) not in (2, 3) or not jnp.issubdtype(dtype, jnp.integer):
        want = f"[{b}, {t}] or [{b}, {t}, K]"
        raise ValueError(f"targets: expected an int array {want}, got {dtype}{list(shape)}")
    head_rows = params["lm_head"].shape[1] if "lm_head" in params else params["embed"].shape[0]
    _check_ids("targets", targets, head_rows)
    chunk = min(chunk_size, t)
    pad = (-t) % chunk
    multi = targets.ndim == 3
    tgt = targets if multi else targets[..., None]
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        tgt = jnp.pad(tgt, ((0, 0), (0, pad), (0, 0)))
    n = (t + pad) // chunk
    hidden_chunks = hidden.reshape(b, n, chunk, h).swapaxes(0, 1)
    target_chunks = tgt.reshape(b, n, chunk, tgt.shape[-1]).swapaxes(0, 1)

    if lora is None or lora_lib.UNEMBED_TARGET not in lora.weights:
        head = params["lm_head"] if "lm_head" in params else params["embed"].T

        def one_chunk(h_chunk, t_chunk):
            return _head_logprobs(head, h_chunk, t_chunk)
    else:  # LoRA on the head needs the logits' gradient anyway: recompute the chunk's logits

        @jax.checkpoint
        def one_chunk(h_chunk, t_chunk):
            return _logprobs_at(unembed(params, h_chunk, lora), t_chunk)[0]

    out = jax.lax.map(lambda ht: one_chunk(*ht), (hidden_chunks, target_chunks))
    out = out.swapaxes(0, 1).reshape(b, n * chunk, tgt.shape[-1])[:, :t]
    return out if multi else out[..., 0]


def _logprobs_at(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``log_softmax(logits)`` at ``targets [..., K]``, and the log-sum-exp ``[..., 1]``."""
    lse = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    return jnp.take_along_axis(logits, targets, axis=-1) - lse, lse


def _head_logits(head: jax.Array, hidden: jax.Array) -> jax.Array:
    return jnp.matmul(hidden, head.astype(hidden.dtype), preferred_element_type=jnp.float32)


@jax.custom_vjp
def _head_logprobs(head: jax.Array, hidden: jax.Array, targets: jax.Array) -> jax.Array:
    """``log_softmax(hidden @ head)`` at ``targets [..., K]``; ``head`` is ``[H, V]``.

    The gradient to ``hidden`` is ``g * (head[:, t] - E_p[head])``, so the forward keeps the expected
    head column ``E_p[head]`` ``[..., H]`` instead of the logits, and the backward needs no product
    over the vocabulary. Only the head's own gradient (full fine-tuning) recomputes the logits; with a
    frozen head that branch is dead code and XLA removes it.
    """
    return _logprobs_at(_head_logits(head, hidden), targets)[0]


def _head_logprobs_fwd(head, hidden, targets):
    logits = _head_logits(head, hidden)
    out, lse = _logprobs_at(logits, targets)
    probs = jnp.exp(logits - lse).astype(hidden.dtype)
    expected = jnp.matmul(probs, head.astype(hidden.dtype).T, preferred_element_type=jnp.float32)
    return out, (head, hidden, targets, lse, expected)


def _head_logprobs_bwd(residuals, g):
    head, hidden, targets, lse, expected = residuals
    g_total = jnp.sum(g, axis=-1, keepdims=True)
    # Gather the target columns first: [H, ..., K] -> [..., K, H] (no transposed copy of the head).
    target_columns = jnp.moveaxis(jnp.take(head, targets, axis=1), 0, -1).astype(jnp.float32)
    d_hidden = jnp.einsum("...k,...kh->...h", g, target_columns) - g_total * expected
    probs = jnp.exp(_head_logits(head, hidden) - lse)  # the head's own gradient only (dead code otherwise)
    one_hot = jax.nn.one_hot(targets, head.shape[-1], dtype=jnp.float32)
    d_logits = jnp.einsum("...k,...kv->...v", g, one_hot) - g_total * probs
    d_head = jnp.einsum("...h,...v->hv", hidden.astype(jnp.float32), d_logits)
    return d_head.astype(head.dtype), d_hidden.astype(hidden.dtype), None


_head_logprobs.defvjp(_head_logprobs_fwd, _head_logprobs_bwd)
