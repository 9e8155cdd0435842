"""The sampling engine: batched prefill + on-device decode over a preallocated KV cache.

``Sampler.sample(requests, lora)`` runs every request of one call as one batch:

* **Prefill** each *distinct* prompt once (``[P, Tp]``, prompt lengths bucketed to powers of two,
  at least 16), then **grow** the cache to one row per sample (``num_samples`` share the prompt's
  prefill) and ``S`` slots (a power of two >= prompt + max_tokens), and sample each row's **first**
  token from the prefill's logits.
* **Decode** in one ``jax.jit`` program: a ``lax.while_loop`` that feeds the last token, samples
  the next one and exits as soon as every row has stopped (a stop token id, or its own
  ``max_tokens``); ``n`` tokens take ``n - 1`` forward passes (``compute_logprobs``: none). The
  cache and the output buffers are donated, so they are updated in place. Sampling parameters
  (temperature, top_k, top_p, min_p, penalties, seeds, stop ids, max_tokens) are per-row
  *arrays*, so mixing requests never recompiles; the programs are keyed only by the bucketed
  shapes ``(P, Tp)`` (prefill), ``(P, Tp, B, S)`` (grow, a cheap one), ``B`` (first) and ``(B, S)``
  (decode, and the cheap start of its outputs; batch sizes are powers of two; first and decode also
  by the stop-id list, sampled top-k and logit-bias widths, powers of two too, and by whether any
  row has a repetition penalty), by the model config and by the LoRA tree structure. The jits are
  module-level, so all Samplers of a process share them.
* **Prefix cache** (:mod:`jtinker.prefix_cache`): after decoding, each row's keys and values are kept
  under its adapter (with its prompt's logprobs, when they were computed); a later prompt sharing 16+
  leading tokens with one prefills only the rest (``_prefill_after``: the suffix at its positions,
  attending to the cached prefix). Prompts of one call that share 16+ leading tokens which no entry
  holds get them prefilled once first (a GRPO group's sequences scored together, prompts under one
  system prompt). Prompt logprobs reuse only prefixes whose logprobs are kept; top-k prompt logprobs
  and the other per-position queries need the whole prefill.
* **Stop strings** are matched on the host on the decoded text (across token boundaries). When a
  batch has stop strings, the decode loop runs in chunks of ``stop_check_interval`` steps and rows
  whose text already contains a stop string are marked done between chunks (early exit); the
  sequence is then cut at (and includes) the token that completes the first stop string.
* **Streaming**: a request's ``on_tokens(sample, tokens)`` is called after the first token and then
  between chunks of ``stop_check_interval`` steps, on the sampling thread, with each unfinished
  sample's tokens so far; returning False (or raising) ends that sample there, e.g. when its reader
  has gone. The result still comes whole.

Sampling semantics (per row): ``logit_bias`` (OpenAI's) first adds to the logits of its token ids.
``repetition_penalty`` (transformers' and vLLM's) then divides the positive logits of tokens in the
prompt or sampled so far by the penalty and multiplies the negative ones by it.
``presence_penalty`` and ``frequency_penalty`` (OpenAI's) then subtract
``presence * [count > 0] + frequency * count``, ``count`` being how often each token was sampled so far
in that row. Then ``temperature == 0`` is greedy (argmax); otherwise logits are divided by
the temperature, tokens less likely than ``min_p`` times the likeliest are dropped, the rest restricted
to the ``top_k`` largest (``-1``: off) and then to the smallest set of most likely tokens whose
probability reaches ``top_p`` (ties at either threshold are kept), and a token is drawn by inverse-CDF
sampling. The uniform draw of row ``i`` at step ``t`` uses ``fold_in(fold_in(key(seed), sample_index), t)``,
so a seeded request gives the same tokens run to run and whatever else is in the batch; ``seed=None``
draws a fresh seed.

**Returned logprobs** of sampled tokens are ``log_softmax`` of the *raw* (temperature 1, unfiltered)
logits at the chosen token: Tinker's definition, i.e. the logprob the learner computes for that
token with ``forward``/``compute_logprobs`` on the same sequence (not the logprob under the
temperature/top-k/top-p-modified distribution that actually drew it).

Prompt logprobs follow Tinker: ``prompt_logprobs[0]`` is ``None`` and entry ``i`` is
``log p(prompt[i] | prompt[:i])``; ``topk_prompt_logprobs[i]`` is the top-k ``(token_id, logprob)``
of the distribution predicting position ``i`` (``None`` at position 0); ``target_prompt_ids[i, j]``
asks for ``log p(target_prompt_ids[i, j] | prompt[:i + 1])`` (``-1``: nothing).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import math
import secrets
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jtinker import prefix_cache, sharding
from jtinker.distributed import from_process_zero
from jtinker.models import KVCache, ModelConfig, hidden_states, token_logprobs, unembed
from jtinker.models import lora as lora_lib
from jtinker.registry import env_int
from jtinker.train import model_weights

log = logging.getLogger(__name__)

MIN_PROMPT_BUCKET = 16
MIN_CACHE_BUCKET = 32
MIN_STOP_ID_WIDTH = 4
MAX_LOGIT_BIAS = 1024  # token ids one request may bias
CDF_BLOCK = 256  # two-level inverse CDF: block sums first, then one block's cumsum
TOPK_PROMPT_CHUNK = 128
MAX_PROMPT_DRAWS = 1 << 20  # prompt_alt_tokens_k times the positions it draws at
DEFAULT_PREFIX_CACHE_MIB = 1024  # JTINKER_PREFIX_CACHE_MIB overrides it; 0 turns the cache off


def bucket(n: int, minimum: int = 1) -> int:
    """The smallest power of two >= ``max(n, minimum)``."""
    return 1 << (max(n, minimum) - 1).bit_length()


@dataclasses.dataclass
class SampleRequest:
    """One prompt to sample ``num_samples`` continuations of."""

    prompt: list[int]
    num_samples: int
    max_tokens: int
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    min_p: float = 0.0  # drop tokens less likely than min_p times the likeliest (0: off)
    presence_penalty: float = 0.0  # subtracted from the logits of tokens this row has sampled
    frequency_penalty: float = 0.0  # ... times how often it sampled them
    repetition_penalty: float = 1.0  # divides (multiplies if < 0) logits of prompt and sampled tokens
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit, in [-100, 100]
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    seed: int | None = None
    include_prompt_logprobs: bool = False
    topk_prompt_logprobs: int = 0
    target_prompt_ids: np.ndarray | None = None  # [len(prompt) - 1, K] token ids, -1 = none
    topk_sample_logprobs: int = 0  # the top-k (token, logprob) at every sampled position
    prompt_alt_tokens_k: int = 0  # tokens drawn at every prompt position (at ``temperature``)
    on_tokens: Callable[[int, list[int]], bool | None] | None = None  # streaming: see the module doc


@dataclasses.dataclass
class SampleResult:
    """``sequences``: one ``(tokens, logprobs, stop_reason)`` per sample, stop_reason "stop"|"length"."""

    sequences: list[tuple[list[int], list[float], str]]
    prompt_logprobs: list[float | None] | None = None
    topk_prompt_logprobs: list[list[tuple[int, float]] | None] | None = None
    target_prompt_logprobs: np.ndarray | None = None  # [len(prompt) - 1, K] f32, 0.0 where the id was -1
    # Per sample, ``(ids, logprobs)`` ``[len(tokens), k]`` with ``topk_sample_logprobs = k``.
    sequence_topk: list[tuple[np.ndarray, np.ndarray]] | None = None
    # ``(tokens, logprobs)`` ``[len(prompt) - 1, prompt_alt_tokens_k]``: draws at prompt positions 1...
    prompt_alt_tokens: tuple[np.ndarray, np.ndarray] | None = None
    prompt_cache_hit_tokens: int = 0  # leading prompt tokens whose keys and values were reused


def first_stop(text: str, stops: Sequence[str]) -> int | None:
    """Where the first of ``stops`` begins in ``text`` (None: nowhere)."""
    return min((i for i in (text.find(s) for s in stops) if i >= 0), default=None)


@dataclasses.dataclass
class TextStream:
    """A sample's text as it streams (``SampleRequest.on_tokens``): ``piece(tokens)`` is the text new
    since the last piece, cut at a stop string, holding back what later tokens may still change (a
    stop string's possible start, a partial character, trailing whitespace); ``end(text)`` is the
    rest of the final text."""

    tokenizer: Any
    stops: Sequence[str] = ()
    sent: int = 0  # characters given out

    def piece(self, tokens: list[int]) -> str:
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        cut = first_stop(text, self.stops)
        if cut is None:
            held = max(map(len, self.stops), default=1) - 1
            text = text[: len(text) - held].rstrip("\ufffd \t\n")
        return self.end(text[:cut])

    def end(self, text: str) -> str:
        piece = text[self.sent :]
        self.sent = max(self.sent, len(text))
        return piece


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class _Rows(NamedTuple):
    """Per-row sampling parameters (device arrays; never donated, never static)."""

    prompt_len: jax.Array  # [B] int32
    max_tokens: jax.Array  # [B] int32, 0 for padding rows
    temperature: jax.Array  # [B] f32
    top_k: jax.Array  # [B] int32, <= 0 = off
    top_p: jax.Array  # [B] f32
    min_p: jax.Array  # [B] f32, 0 = off
    presence: jax.Array  # [B] f32 presence penalty, 0 = off
    frequency: jax.Array  # [B] f32 frequency penalty, 0 = off
    repetition: jax.Array  # [B] f32 repetition penalty, 1 = off
    context: jax.Array  # [B, C] int32 prompt tokens, padded with -1 (C = 0: no row has a repetition penalty)
    bias_ids: jax.Array  # [B, W] int32 token ids whose logits ``bias`` adds to, padded with -1 (W may be 0)
    bias: jax.Array  # [B, W] f32
    seed: jax.Array  # [B, 2] uint32 (threefry key data: seed >> 32, seed & 0xffffffff)
    sample_index: jax.Array  # [B] int32
    stop_ids: jax.Array  # [B, W] int32, padded with -1


class _Out(NamedTuple):
    """What decoding produces, row by row."""

    last: jax.Array  # [B] int32, last sampled token (the next one to feed)
    tokens: jax.Array  # [B, S] int32
    logprobs: jax.Array  # [B, S] f32
    done: jax.Array  # [B] bool
    stopped: jax.Array  # [B] bool, ended on a stop token id
    count: jax.Array  # [B] int32, tokens produced
    topk_ids: jax.Array  # [B, S, K] int32, the top-K tokens at each step (K = 0: none asked)
    topk_logprobs: jax.Array  # [B, S, K] f32, their raw logprobs


class _PromptQueries(NamedTuple):
    """Per-prompt questions the prefill answers at every position ``i`` (about token ``i + 1``)."""

    target_ids: jax.Array  # [P, Tp, K] int32: ids whose logprobs to pick (-1: none; K may be 0)
    alt_uniforms: jax.Array  # [P, Tp, A] f32 in (0, 1): one per token to draw (A may be 0)
    alt_temperature: jax.Array  # [P] f32: the draws' temperature (0: the argmax)


class _State(NamedTuple):
    cache: KVCache
    step: jax.Array  # [] int32, index of the next token to produce
    out: _Out


# ---------------------------------------------------------------------------------------------
# Token selection (all per-row arrays, so one program serves every mix of parameters)


def _sortable(x: jax.Array) -> jax.Array:
    """f32 → uint32 with the same order, so thresholds can be found by exact bisection."""
    i = jax.lax.bitcast_convert_type(x, jnp.uint32)
    return jnp.where((i >> 31) == 1, ~i, i | jnp.uint32(0x80000000))


def _max_threshold(keys: jax.Array, measure, target: jax.Array) -> jax.Array:
    """Per row, the largest ``T`` with ``measure(keys >= T) >= target`` (32 bisection steps).

    A full sort of the vocabulary is ~50x slower than this on CPU.
    """
    b = keys.shape[0]

    def body(_, lohi):
        lo, hi = lohi
        mid = lo + ((hi - lo) >> 1) + (hi > lo).astype(jnp.uint32)
        ok = measure(keys >= mid[:, None]) >= target
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

    lo = jnp.zeros((b,), jnp.uint32)
    hi = jnp.full((b,), 0xFFFFFFFF, jnp.uint32)
    lo, _ = jax.lax.fori_loop(0, 32, body, (lo, hi))
    return lo


def _filter(scaled: jax.Array, rows: _Rows) -> jax.Array:
    """Sets logits outside the min-p, top-k and top-p (nucleus) sets to -inf."""
    neg_inf = jnp.float32(-jnp.inf)
    top_k, top_p, min_p = rows.top_k, rows.top_p, rows.min_p

    def apply_min_p(x):  # p < min_p * p_max  <=>  x < max(x) + log(min_p)
        floor = jnp.max(x, axis=-1) + jnp.log(jnp.where(min_p > 0, min_p, 1.0))
        return jnp.where((min_p[:, None] > 0) & (x < floor[:, None]), neg_inf, x)

    def apply_top_k(x):
        keys = _sortable(x)
        t = _max_threshold(keys, lambda m: jnp.sum(m, axis=-1, dtype=jnp.int32), top_k)
        return jnp.where((top_k[:, None] > 0) & (keys < t[:, None]), neg_inf, x)

    def apply_top_p(x):
        probs = jax.nn.softmax(x, axis=-1)
        keys = _sortable(x)
        t = _max_threshold(keys, lambda m: jnp.sum(jnp.where(m, probs, 0.0), axis=-1), top_p)
        return jnp.where((top_p[:, None] < 1.0) & (keys < t[:, None]), neg_inf, x)

    scaled = jax.lax.cond(jnp.any(min_p > 0), apply_min_p, lambda x: x, scaled)
    scaled = jax.lax.cond(jnp.any(top_k > 0), apply_top_k, lambda x: x, scaled)
    return jax.lax.cond(jnp.any(top_p < 1.0), apply_top_p, lambda x: x, scaled)


def _choice_logits(logits: jax.Array, rows: _Rows, history: tuple[jax.Array, jax.Array] | None) -> jax.Array:
    """Each row's logit bias, the repetition penalty over its prompt and sampled tokens, then OpenAI's
    presence and frequency penalties over its sampled tokens ``history`` (``(tokens [B, S], count [B])``;
    None: none sampled yet)."""
    by_row = jnp.arange(logits.shape[0])[:, None]
    if rows.bias_ids.shape[1]:  # W = 0: no row of this batch has a logit bias
        bias = jnp.where(rows.bias_ids >= 0, rows.bias, 0.0)
        logits = logits.at[by_row, jnp.maximum(rows.bias_ids, 0)].add(bias)
    repeating = rows.context.shape[1] > 0  # C = 0: no row of this batch has a repetition penalty
    if history is None and not repeating:
        return logits

    def penalize(logits):  # a neutral row (penalty 1, presence and frequency 0) keeps its logits exactly
        counts = jnp.zeros_like(logits)
        if history is not None:
            tokens, count = history
            sampled = (jnp.arange(tokens.shape[1])[None, :] < count[:, None]).astype(jnp.float32)
            counts = counts.at[by_row, tokens].add(sampled)
        if repeating:
            in_prompt = (rows.context >= 0).astype(jnp.float32)
            seen = counts.at[by_row, jnp.maximum(rows.context, 0)].add(in_prompt) > 0
            penalty = rows.repetition[:, None]
            logits = jnp.where(seen, jnp.where(logits > 0, logits / penalty, logits * penalty), logits)
        return logits - rows.frequency[:, None] * counts - rows.presence[:, None] * (counts > 0)

    active = (rows.presence != 0) | (rows.frequency != 0) | (rows.repetition != 1)
    return jax.lax.cond(jnp.any(active), penalize, lambda x: x, logits)


def _last_nonzero(mask: jax.Array) -> jax.Array:
    n = mask.shape[-1]
    return n - 1 - jnp.argmax(mask[..., ::-1], axis=-1)


def _inverse_cdf(scaled: jax.Array, u: jax.Array) -> jax.Array:
    """Draws one token per row from ``softmax(scaled)`` given uniforms ``u`` in (0, 1).

    Two levels (block sums, then one block's cumsum) instead of a cumsum over the whole vocab.
    """
    b, v = scaled.shape
    blk = min(CDF_BLOCK, v)
    nb = -(-v // blk)
    p = jnp.exp(scaled - jnp.max(scaled, axis=-1, keepdims=True))
    p = jnp.pad(p, ((0, 0), (0, nb * blk - v))).reshape(b, nb, blk)
    block_sums = jnp.sum(p, axis=-1)
    block_cdf = jnp.cumsum(block_sums, axis=-1)
    x = u * block_cdf[:, -1]
    # Clamping to the last non-empty block/token guards against rounding at the top end.
    blk_idx = jnp.minimum(jnp.sum(block_cdf < x[:, None], axis=-1), _last_nonzero(block_sums > 0))
    take = lambda a: jnp.take_along_axis(a, blk_idx[:, None], axis=-1)[:, 0]
    x_in = x - (take(block_cdf) - take(block_sums))
    row = jnp.take_along_axis(p, blk_idx[:, None, None], axis=1)[:, 0]
    within = jnp.sum(jnp.cumsum(row, axis=-1) < x_in[:, None], axis=-1)
    within = jnp.minimum(within, _last_nonzero(row > 0))
    return (blk_idx * blk + within).astype(jnp.int32)


def _row_keys(rows: _Rows) -> jax.Array:
    base = jax.random.wrap_key_data(rows.seed, impl="threefry2x32")
    return jax.vmap(jax.random.fold_in)(base, rows.sample_index)


def _select(logits: jax.Array, rows: _Rows, keys: jax.Array, step: jax.Array, topk: int = 0, history=None):
    """Next token per row, its raw (temperature-1, unpenalized) logprob and the ``topk`` most likely
    tokens'. ``history``: see :func:`_choice_logits`."""
    choice = _choice_logits(logits, rows, history)
    greedy = jnp.argmax(choice, axis=-1).astype(jnp.int32)
    is_greedy = rows.temperature <= 0.0

    def stochastic(choice):
        temp = jnp.where(is_greedy, 1.0, rows.temperature)
        scaled = _filter(choice / temp[:, None], rows)
        step_keys = jax.vmap(jax.random.fold_in, (0, None))(keys, step)
        tiny = jnp.finfo(jnp.float32).tiny
        u = jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32, tiny, 1.0))(step_keys)
        return _inverse_cdf(scaled, u)

    # An all-greedy batch skips the filtering and the draw entirely.
    token = jax.lax.cond(jnp.all(is_greedy), lambda _: greedy, stochastic, choice)
    token = jnp.where(is_greedy, greedy, token)
    lse = jax.nn.logsumexp(logits, axis=-1)
    logprob = jnp.take_along_axis(logits, token[:, None], axis=-1)[:, 0] - lse
    if not topk:
        return token, logprob, None
    top_logits, top_ids = jax.lax.top_k(logits, topk)
    return token, logprob, (top_ids, top_logits - lse[:, None])


def _record(out: _Out, rows: _Rows, step: jax.Array, token: jax.Array, logprob: jax.Array, top) -> _Out:
    active = ~out.done
    tokens = jax.lax.dynamic_update_slice(out.tokens, jnp.where(active, token, 0)[:, None], (0, step))
    logprobs = jax.lax.dynamic_update_slice(out.logprobs, jnp.where(active, logprob, 0.0)[:, None], (0, step))
    topk_ids, topk_logprobs = out.topk_ids, out.topk_logprobs
    if top is not None:
        at_step = lambda buf, x: jax.lax.dynamic_update_slice(buf, x[:, None], (0, step, 0))
        topk_ids = at_step(topk_ids, top[0])
        topk_logprobs = at_step(topk_logprobs, top[1])
    hit = jnp.any(token[:, None] == rows.stop_ids, axis=-1) & active
    count = out.count + active.astype(jnp.int32)
    done = out.done | hit | (active & (count >= rows.max_tokens))
    return _Out(
        last=jnp.where(active, token, out.last),
        tokens=tokens,
        logprobs=logprobs,
        done=done,
        stopped=out.stopped | hit,
        count=count,
        topk_ids=topk_ids,
        topk_logprobs=topk_logprobs,
    )


# ---------------------------------------------------------------------------------------------
# The compiled programs


def _prefill_shape(prompts: list[tuple[int, ...]]) -> tuple[int, int]:
    """The bucketed ``[P, Tp]`` that a prefill of ``prompts`` (and its per-position queries) pads to."""
    return bucket(len(prompts)), bucket(max(len(x) for x in prompts), MIN_PROMPT_BUCKET)


def _prefill(
    config: ModelConfig,
    cache_dtype,
    params,
    lora,
    tokens,
    lengths,
    queries: _PromptQueries | None = None,
    *,
    want_lp: bool,
    topk: int,
):
    """Runs ``[P, Tp]`` prompts; returns their cache, next-token logits, prompt logprobs and the
    answers to ``queries`` (if any)."""
    params, lora = model_weights(params, lora)  # a full fine-tune's weights replace the base
    p, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (p, t))
    cache = KVCache.zeros(config, p, t, cache_dtype)
    hidden, cache = hidden_states(config, params, tokens, positions=positions, cache=cache, lora=lora)
    last = hidden[jnp.arange(p), lengths - 1]
    result: dict[str, Any] = {"cache": cache, "logits": unembed(params, last, lora)}
    if want_lp:
        # Position i predicts token i + 1; the wrapped-around last target is dropped.
        targets = jnp.roll(tokens, -1, axis=1)
        result["prompt_lp"] = token_logprobs(params, hidden, targets, lora)[:, :-1]
    if queries is None:
        queries = _PromptQueries(jnp.zeros((p, t, 0), jnp.int32), jnp.zeros((p, t, 0)), jnp.zeros(p))
    k, a = queries.target_ids.shape[-1], queries.alt_uniforms.shape[-1]
    if topk or k or a:
        chunk = min(TOPK_PROMPT_CHUNK, t)
        n = t // chunk  # t and chunk are powers of two
        temperature = jnp.broadcast_to(queries.alt_temperature[:, None], (p, chunk)).reshape(-1)

        def one_chunk(args):
            h, ids, uniforms = args
            logits = unembed(params, h, lora)
            lsm = jax.nn.log_softmax(logits, axis=-1)
            top = jax.lax.top_k(lsm, topk) if topk else ()
            picked = jnp.where(ids >= 0, jnp.take_along_axis(lsm, jnp.maximum(ids, 0), axis=-1), 0.0)
            if not a:
                return top, picked, ()
            flat = logits.reshape(p * chunk, -1)
            scaled = flat / jnp.where(temperature > 0, temperature, 1.0)[:, None]
            draw = jax.vmap(lambda u: _inverse_cdf(scaled, u), in_axes=1, out_axes=1)
            drawn = draw(uniforms.reshape(p * chunk, a))
            greedy = jnp.argmax(flat, axis=-1).astype(jnp.int32)
            drawn = jnp.where(temperature[:, None] > 0, drawn, greedy[:, None]).reshape(p, chunk, a)
            return top, picked, (drawn, jnp.take_along_axis(lsm, drawn, axis=-1))

        by_chunk = lambda x: x.reshape(p, n, chunk, *x.shape[2:]).swapaxes(0, 1)
        unchunk = lambda x: x.swapaxes(0, 1).reshape(p, t, x.shape[-1])
        chunks = (by_chunk(hidden), by_chunk(queries.target_ids), by_chunk(queries.alt_uniforms))
        top, picked, alt = jax.lax.map(one_chunk, chunks)
        if topk:
            result["topk_lp"] = unchunk(top[0])[:, :-1]
            result["topk_ids"] = unchunk(top[1])[:, :-1]
        if k:
            result["target_lp"] = unchunk(picked)
        if a:
            result["alt_tokens"], result["alt_lp"] = unchunk(alt[0]), unchunk(alt[1])
    return result


def _prefill_after(
    config: ModelConfig,
    cache_dtype,
    params,
    lora,
    past_k,
    past_v,
    starts,
    tokens,
    lengths,
    *,
    slots: int,
    want_lp: bool = False,
):
    """Prefill of ``[P, Tn]`` prompt suffixes at positions ``starts + [0, Tn)``, attending to the
    cached keys and values of the first ``starts[i]`` positions (``past_k``/``past_v``: one
    ``[L, Tc, nKV, D]`` per prompt). Returns a ``slots``-slot cache, the next-token logits and, with
    ``want_lp``, the logprobs of suffix tokens ``1..Tn-1`` (``suffix_lp[:, i]``: token ``i + 1``)."""
    params, lora = model_weights(params, lora)
    p, t = tokens.shape

    def fit(past):
        x = jnp.stack(past, axis=1).astype(cache_dtype)  # [L, P, Tc, nKV, D]
        return jnp.pad(x, ((0, 0), (0, 0), (0, slots - x.shape[2]), (0, 0), (0, 0)))

    positions = starts[:, None] + jnp.arange(t, dtype=jnp.int32)[None]
    cache = KVCache(k=fit(past_k), v=fit(past_v))
    hidden, cache = hidden_states(config, params, tokens, positions=positions, cache=cache, lora=lora)
    last = hidden[jnp.arange(p), lengths - 1]
    result = {"cache": cache, "logits": unembed(params, last, lora)}
    if want_lp:
        result["suffix_lp"] = token_logprobs(params, hidden, jnp.roll(tokens, -1, axis=1), lora)[:, :-1]
    return result


@functools.partial(jax.jit, static_argnames=("slots",))
def _fit_slots(k: jax.Array, v: jax.Array, *, slots: int) -> tuple[jax.Array, jax.Array]:
    """A cached ``[L, T, nKV, D]`` pair cut or zero-padded to ``slots`` positions."""
    fit = lambda x: jnp.pad(x[:, :slots], ((0, 0), (0, max(0, slots - x.shape[1])), (0, 0), (0, 0)))
    return fit(k), fit(v)


@functools.partial(jax.jit, static_argnames=("slots",))
def _row_slots(cache: KVCache, row: jax.Array, *, slots: int) -> tuple[jax.Array, jax.Array]:
    """Row ``row``'s first ``slots`` positions of a ``[L, B, S, nKV, D]`` cache, for the prefix cache."""
    take = lambda x: jax.lax.dynamic_index_in_dim(x, row, axis=1, keepdims=False)[:, :slots]
    return take(cache.k), take(cache.v)


def _grow(cache: KVCache, logits: jax.Array, src: jax.Array, *, size: int) -> tuple[KVCache, jax.Array]:
    """One cache row per sample (rows share their prompt's prefill), padded to ``size`` slots, and
    each row's next-token logits."""

    def grow(x):
        x = jnp.take(x, src, axis=1)
        return jnp.pad(x, ((0, 0), (0, 0), (0, size - x.shape[2]), (0, 0), (0, 0)))

    return KVCache(k=grow(cache.k), v=grow(cache.v)), jnp.take(logits, src, axis=0)


def _first(logits: jax.Array, rows: _Rows, *, topk: int):
    """Each row's first token (step 0), its logprob and top-k, from its next-token ``logits`` ``[B, V]``.

    A program of its own: the token selection compiles slowly (a second on CPU), and this way it is
    keyed by the batch size alone, not also by the prompts' count and length and the cache's size."""
    return _select(logits, rows, _row_keys(rows), jnp.zeros((), jnp.int32), topk)


def _start(token: jax.Array, logprob: jax.Array, top, rows: _Rows, *, size: int) -> tuple[jax.Array, _Out]:
    """The decode outputs, ``size`` slots a row, with the first token recorded; the next step is 1."""
    b, k = token.shape[0], 0 if top is None else top[0].shape[-1]
    out = _Out(
        last=jnp.zeros(b, jnp.int32),
        tokens=jnp.zeros((b, size), jnp.int32),
        logprobs=jnp.zeros((b, size), jnp.float32),
        done=rows.max_tokens <= 0,  # padding rows never run
        stopped=jnp.zeros(b, bool),
        count=jnp.zeros(b, jnp.int32),
        topk_ids=jnp.zeros((b, size, k), jnp.int32),
        topk_logprobs=jnp.zeros((b, size, k), jnp.float32),
    )
    step = jnp.zeros((), jnp.int32)
    return step + 1, _record(out, rows, step, token, logprob, top)


def _decode_step(config: ModelConfig, params, lora, tokens: jax.Array, positions: jax.Array, cache: KVCache):
    """One token per row at ``positions`` ``[B]``: f32 logits ``[B, V]`` and the updated cache."""
    hidden, cache = hidden_states(
        config, params, tokens[:, None], positions=positions[:, None], cache=cache, lora=lora
    )
    return unembed(params, hidden[:, 0], lora), cache


def _decode(config: ModelConfig, params, lora, state: _State, rows: _Rows, end_step: jax.Array) -> _State:
    """Produces tokens until every row is done or ``step == end_step``.

    Step ``t >= 1`` feeds token ``t - 1`` at position ``prompt_len + t - 1`` and samples token ``t``
    (step 0's token comes from the prefill's logits, in :func:`_first`). The last slot is scratch:
    since ``size >= prompt_len + max_tokens`` and the final token is never fed, no real position
    reaches it. Finished rows feed into it, so every row runs the same body.
    """
    params, lora = model_weights(params, lora)
    keys = _row_keys(rows)
    scratch = state.cache.size - 1

    def cond(carry):
        step, out, _ = carry
        return (step < end_step) & ~jnp.all(out.done)

    def body(carry):
        step, out, cache = carry
        positions = jnp.where(out.done, scratch, rows.prompt_len + step - 1)
        logits, cache = _decode_step(config, params, lora, out.last, positions, cache)
        topk = state.out.topk_ids.shape[-1]
        token, logprob, top = _select(logits, rows, keys, step, topk, history=(out.tokens, out.count))
        return step + 1, _record(out, rows, step, token, logprob, top), cache

    step, out, cache = jax.lax.while_loop(cond, body, (state.step, state.out, state.cache))
    return _State(cache=cache, step=step, out=out)


# Module-level jits with the config as a static argument: every Sampler over the same model shares
# the compiled programs, so e.g. a new Sampler per saved adapter compiles nothing.
# One set of programs per placement of the cache (``None``: let the compiler choose). The cache is
# pinned by the sharding rules (rows over the batch axes, kv heads over ``tp``), so decode keeps the
# donated cache's layout step after step.
_PROGRAMS: dict[tuple, Any] = {}


def _program(
    kind: str,
    cache: NamedSharding | None,
    replicated: NamedSharding | None,
    want_lp=False,
    topk=0,
    targets=False,
    alt=False,
):
    key = (kind, cache, replicated, want_lp, topk, targets, alt)
    if key not in _PROGRAMS:
        kv = None if cache is None else KVCache(k=cache, v=cache)
        # Decode keeps the cache in the layout the grow program leaves it in: donated in place.
        state = None if kv is None else _State(cache=kv, step=replicated, out=replicated)
        if kind == "prefill_after":
            outs = None
            if kv is not None:
                outs = {"cache": kv, "logits": replicated} | ({"suffix_lp": replicated} if want_lp else {})
            fn = jax.jit(
                _prefill_after,
                static_argnames=("config", "cache_dtype", "slots", "want_lp"),
                out_shardings=outs,
            )
        elif kind == "prefill":
            outs = None
            if kv is not None:
                names = ["logits"] + ["prompt_lp"] * want_lp + ["topk_lp", "topk_ids"] * bool(topk)
                names += ["target_lp"] * targets + ["alt_tokens", "alt_lp"] * alt
                outs = {"cache": kv, **{name: replicated for name in names}}
            fn = jax.jit(
                _prefill, static_argnames=("config", "cache_dtype", "want_lp", "topk"), out_shardings=outs
            )
        elif kind == "grow":
            fn = jax.jit(
                _grow, static_argnames=("size",), out_shardings=None if kv is None else (kv, replicated)
            )
        elif kind == "first":
            fn = jax.jit(_first, static_argnames=("topk",), out_shardings=replicated)
        elif kind == "start":
            fn = jax.jit(_start, static_argnames=("size",), out_shardings=replicated)
        else:
            fn = jax.jit(
                _decode,
                static_argnames=("config",),
                donate_argnames=("state",),
                out_shardings=state,
                compiler_options=decode_compiler_options(),
            )
        _PROGRAMS[key] = fn
    return _PROGRAMS[key]


@functools.cache
def decode_compiler_options() -> dict[str, str] | None:
    """XLA:CPU compiles decode without YNNPACK's reduce fusions.

    Those take decode's multiply-and-reduce attention over the KV cache, and a library fusion needs
    its operands as whole buffers: every step then copied each layer's cache slice out of the stacked
    cache (14% of decode time at batch 64). As XLA loop fusions they read the cache in place: decode
    measured 1.15-1.3x faster at batch 8 to 64 and with long caches, within 1-4% at batch 1. The
    option is experimental, so a jax without it decodes with its defaults. Other backends: none.
    """
    if jax.default_backend() != "cpu":
        return None
    options = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}
    try:
        jax.jit(lambda x: x + 1, compiler_options=options).lower(np.float32(0)).compile()
    except jax.errors.JaxRuntimeError:
        return None
    return options


# XLA compilations (or persistent-cache loads) of each stage's function, process-wide, counted as
# JAX reports them: jits of one function with other settings (placements, compiler options) keep
# compile caches of their own, so no one cache sees them all.
_COMPILES = dict.fromkeys(("prefill", "prefill_after", "grow", "first", "start", "decode"), 0)


def _count_compile(event: str, duration: float, **kwargs: Any) -> None:
    stage = str(kwargs.get("fun_name", "")).removeprefix("jit(").removesuffix(")").removeprefix("_")
    if event == "/jax/core/compile/backend_compile_duration" and stage in _COMPILES:
        _COMPILES[stage] += 1


jax.monitoring.register_event_duration_secs_listener(_count_compile)


def compile_counts() -> dict[str, int]:
    """Programs compiled so far by each stage, process-wide (one per distinct bucketed shape,
    config, LoRA structure and placement)."""
    return dict(_COMPILES)


# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Row:
    request: int
    sample: int


_stack_adapters = jax.jit(lora_lib.stack)


@dataclasses.dataclass
class _Adapters:
    """One call's distinct adapters and each request's index among them."""

    distinct: list
    slot: list[int]

    def for_rows(self, requests: list[int]) -> tuple[Any, list[int] | None]:
        """The adapter for a chunk of rows, stacked when they use several, and each row's index in it.

        Stacks are padded to a power of two, so varying mixes of clients reuse few programs. Unlike a
        training step's dummy slot (a whole sub-batch of compute: ``batching.batch_bucket``), a dummy
        adapter here has no rows: it costs one adapter's weight reads per decode step."""
        used = sorted({self.slot[i] for i in requests})
        if len(used) == 1:
            return self.distinct[used[0]], None
        members = [self.distinct[s] for s in used]
        members += [members[0]] * (bucket(len(members)) - len(members))
        local = {s: i for i, s in enumerate(used)}
        row_adapter = [local[self.slot[i]] for i in requests]
        # Placeholder ids (one per adapter: shapes depend on the bucket only, so no recompiles);
        # prefill and decode set their own rows' ids (_with_adapter_ids).
        return _stack_adapters(members, jnp.arange(len(members))), row_adapter


def _with_adapter_ids(lora, adapters: list[int] | None, rows: int):
    """A stacked ``lora`` with ids for ``rows`` batch rows (padding rows use the last adapter)."""
    if adapters is None:
        return lora
    ids = np.full(rows, adapters[-1], np.int32)
    ids[: len(adapters)] = adapters
    return lora.replace(adapter_ids=jnp.asarray(ids))


def _shared_prefixes(
    prompts: list[tuple[int, ...]], owners: list, served: list[int]
) -> list[tuple[int, tuple[int, ...]]]:
    """The prefixes worth prefilling once for several prompts of a batch: ``(i, prefix)`` with
    ``i`` a prompt that starts with ``prefix`` (its adapter computes it).

    Each prompt is keyed by the longest prefix it shares with another prompt of its adapter (its
    neighbours in sorted order); a key of two or more prompts not already served (``served[i]``: the
    positions a cache entry serves) is a prefix to prefill. A key that only extends a chosen one by
    less than that one's length joins it instead (a GRPO group's completions that start alike)."""
    keyed = [
        (prefix_cache.owner_key(o), np.asarray(x, np.int32)) for o, x in zip(owners, prompts, strict=True)
    ]
    order = sorted(
        (i for i, (k, _) in enumerate(keyed) if k is not None), key=lambda i: (keyed[i][0], prompts[i])
    )
    shared = dict.fromkeys(order, 0)
    for a, b in itertools.pairwise(order):
        (owner_a, x), (owner_b, y) = keyed[a], keyed[b]
        if owner_a == owner_b:
            n = prefix_cache.common_prefix(x, y)
            shared[a], shared[b] = max(shared[a], n), max(shared[b], n)
    members: dict[tuple, list[int]] = {}
    for i, n in shared.items():
        if n >= max(prefix_cache.MIN_HIT_TOKENS, served[i] + 1):
            members.setdefault((keyed[i][0], prompts[i][:n]), []).append(i)
    chosen: list[tuple] = []
    for owner, prefix in sorted(members, key=lambda key: len(key[1])):
        if len(members[owner, prefix]) < 2:
            continue
        if any(o == owner and prefix[: len(p)] == p and len(prefix) < 2 * len(p) for o, p in chosen):
            continue
        chosen.append((owner, prefix))
    return [(members[key][0], key[1]) for key in chosen]


class Sampler:
    """Samples from ``params`` (optionally with a LoRA adapter applied on the fly).

    ``tokenizer`` (anything with ``decode(list[int]) -> str``) is needed only for stop strings.
    ``prefix_cache_bytes``: the budget of the :mod:`~jtinker.prefix_cache` (None: the environment's
    ``JTINKER_PREFIX_CACHE_MIB``, else 1 GiB; 0: off). It is off on multi-process runs, whose
    processes could disagree on when a dead adapter's entries go.
    ``max_cache_bytes``: the most one batch's KV cache may take; a call whose rows need more runs
    them in several batches, and a single sample that needs more is refused (None: the
    environment's ``JTINKER_SAMPLE_CACHE_MIB``, else half of the accelerator memory free at each
    call on one process, else no bound).
    """

    def __init__(
        self,
        config: ModelConfig,
        params: dict,
        tokenizer: Any = None,
        *,
        cache_dtype=None,
        max_batch: int = 64,
        stop_check_interval: int = 16,
        mesh: jax.sharding.Mesh | None = None,
        rules: sharding.ShardingRules | None = None,
        prefix_cache_bytes: int | None = None,
        max_cache_bytes: int | None = None,
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch: must be >= 1, got {max_batch}")
        if max_cache_bytes is None and (mib := env_int("JTINKER_SAMPLE_CACHE_MIB")) is not None:
            max_cache_bytes = mib << 20
        if max_cache_bytes is not None and max_cache_bytes <= 0:
            raise ValueError(
                f"max_cache_bytes (JTINKER_SAMPLE_CACHE_MIB): must be > 0, got {max_cache_bytes}"
            )
        self.max_cache_bytes = max_cache_bytes
        if prefix_cache_bytes is None:
            prefix_cache_bytes = env_int("JTINKER_PREFIX_CACHE_MIB", DEFAULT_PREFIX_CACHE_MIB) << 20
        if jax.process_count() > 1:
            prefix_cache_bytes = 0
        self.prefix_cache = prefix_cache.PrefixCache(prefix_cache_bytes)
        self.config = config
        self.params = params
        self.tokenizer = tokenizer
        self.cache_dtype = jnp.dtype(cache_dtype or params["embed"].dtype)
        self.max_batch = max_batch
        self.stop_check_interval = stop_check_interval
        self.mesh = mesh
        self.rules = rules or sharding.ShardingRules()
        self.last_stats: dict[str, int] = {}

    def _placement(self, rows: int, slots: int) -> tuple[NamedSharding | None, NamedSharding | None]:
        """(cache, replicated) shardings for a ``[L, rows, slots, nKV, D]`` cache on the mesh."""
        if self.mesh is None:
            return None, None
        c = self.config
        shape = (c.num_layers, rows, slots, c.num_kv_heads, c.head_dim)
        axes = ("layers", "batch", "seq", "kv_heads", "head_dim")
        cache = sharding.fitted_sharding(self.mesh, self.rules, axes, shape)
        return cache, NamedSharding(self.mesh, PartitionSpec())

    # ----------------------------------------------------------------------------- validation

    def _check_prompt(self, prompt: Sequence[int], field: str = "prompt") -> None:
        if len(prompt) == 0:
            raise ValueError(f"{field}: must not be empty")
        vocab = self.config.vocab_size
        for t in prompt:
            if not isinstance(t, (int, np.integer)) or isinstance(t, bool):
                raise ValueError(f"{field}: must be a list of int token ids, got {t!r}")
            if not 0 <= t < vocab:
                raise ValueError(f"{field}: token id {t} is outside [0, {vocab})")
        if len(prompt) > self.config.max_position_embeddings:
            raise ValueError(
                f"{field}: length {len(prompt)} exceeds max_position_embeddings "
                f"{self.config.max_position_embeddings}"
            )

    def _check_logit_bias(self, bias: dict[int, float] | None) -> None:
        if bias is None:
            return
        if not isinstance(bias, dict) or len(bias) > MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias: must be a dict of at most {MAX_LOGIT_BIAS} ids, got {bias!r:.80}")
        for token, value in bias.items():
            if isinstance(token, bool) or not isinstance(token, (int, np.integer)):
                raise ValueError(f"logit_bias: keys must be token ids, got {token!r}")
            if not 0 <= token < self.config.vocab_size:
                raise ValueError(f"logit_bias: {token} is not a token id in [0, {self.config.vocab_size})")
            if not _is_real(value) or not -100 <= value <= 100:
                raise ValueError(
                    f"logit_bias: token {token}'s bias must be a number in [-100, 100], got {value!r}"
                )

    def validate(self, request: SampleRequest) -> None:
        """Raises ``ValueError`` naming the offending field."""
        r = request
        self._check_prompt(r.prompt)
        if not isinstance(r.num_samples, int) or r.num_samples < 1:
            raise ValueError(f"num_samples: must be an int >= 1, got {r.num_samples!r}")
        if not isinstance(r.max_tokens, int) or r.max_tokens < 1:
            raise ValueError(f"max_tokens: must be an int >= 1, got {r.max_tokens!r}")
        limit = self.config.max_position_embeddings
        if len(r.prompt) + r.max_tokens > limit:
            raise ValueError(
                f"max_tokens: prompt length {len(r.prompt)} + max_tokens {r.max_tokens} exceeds "
                f"the model's max_position_embeddings {limit}"
            )
        need = self._cache_bytes(1, len(r.prompt) + r.max_tokens)
        if self.max_cache_bytes is not None and need > self.max_cache_bytes:
            raise ValueError(
                f"max_tokens: prompt length {len(r.prompt)} + max_tokens {r.max_tokens} needs "
                f"{need >> 20} MiB of KV cache, over the sampler's {self.max_cache_bytes >> 20} MiB "
                "(JTINKER_SAMPLE_CACHE_MIB)"
            )
        if not math.isfinite(r.temperature) or r.temperature < 0:
            raise ValueError(f"temperature: must be finite and >= 0, got {r.temperature!r}")
        if not isinstance(r.top_k, int) or not (r.top_k == -1 or r.top_k >= 1):
            raise ValueError(f"top_k: must be -1 (off) or an int >= 1, got {r.top_k!r}")
        if not (0.0 < r.top_p <= 1.0):
            raise ValueError(f"top_p: must be in (0, 1], got {r.top_p!r}")
        for field, lo, hi in (("min_p", 0, 1), ("presence_penalty", -2, 2), ("frequency_penalty", -2, 2)):
            value = getattr(r, field)
            if not _is_real(value) or not lo <= value <= hi:
                raise ValueError(f"{field}: must be a number in [{lo}, {hi}], got {value!r}")
        self._check_logit_bias(r.logit_bias)
        penalty = r.repetition_penalty
        if not _is_real(penalty) or not 0 < penalty < math.inf:
            raise ValueError(f"repetition_penalty: must be a finite number > 0 (1: off), got {penalty!r}")
        for t in r.stop_token_ids:
            if not isinstance(t, (int, np.integer)) or not 0 <= t < self.config.vocab_size:
                raise ValueError(f"stop_token_ids: {t!r} is not a token id in [0, {self.config.vocab_size})")
        for s in r.stop_strings:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop_strings: {s!r} is not a non-empty string")
        if r.stop_strings and self.tokenizer is None:
            raise ValueError("stop_strings: this sampler has no tokenizer to match stop strings with")
        if r.seed is not None and (not isinstance(r.seed, (int, np.integer)) or isinstance(r.seed, bool)):
            raise ValueError(f"seed: must be an int or None, got {r.seed!r}")
        for field in ("topk_prompt_logprobs", "topk_sample_logprobs"):
            k = getattr(r, field)
            if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= self.config.vocab_size:
                raise ValueError(f"{field}: must be an int in [0, vocab_size], got {k!r}")
        if r.target_prompt_ids is not None:
            self._check_target_ids(r.target_prompt_ids, len(r.prompt))
        a = r.prompt_alt_tokens_k
        if not isinstance(a, int) or isinstance(a, bool) or a < 0:
            raise ValueError(f"prompt_alt_tokens_k: must be an int >= 0, got {a!r}")
        if a and len(r.prompt) < 2:
            raise ValueError(
                "prompt_alt_tokens_k: the prompt needs 2 or more tokens (draws follow position 0)"
            )
        if a * (len(r.prompt) - 1) > MAX_PROMPT_DRAWS:
            raise ValueError(
                f"prompt_alt_tokens_k: {a} draws at {len(r.prompt) - 1} positions exceed {MAX_PROMPT_DRAWS}"
            )

    def _check_target_ids(self, ids: Any, prompt_len: int) -> None:
        field = "target_prompt_logprobs"
        ids = np.asarray(ids)
        vocab = self.config.vocab_size
        if ids.ndim != 2 or ids.shape[0] != prompt_len - 1 or ids.shape[1] < 1:
            raise ValueError(
                f"{field}: must have shape [len(prompt) - 1, K >= 1] = [{prompt_len - 1}, K], "
                f"got {list(ids.shape)}"
            )
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"{field}: must hold integer token ids, got dtype {ids.dtype}")
        if ids.shape[1] > vocab:
            raise ValueError(f"{field}: K = {ids.shape[1]} exceeds the vocabulary size {vocab}")
        if ((ids < -1) | (ids >= vocab)).any():
            raise ValueError(f"{field}: ids must be token ids in [0, {vocab}) or -1 (none)")
        if not (ids >= 0).any():
            raise ValueError(f"{field}: names no token id (every cell is -1)")

    # ------------------------------------------------------------------------------- sampling

    def sample(self, requests: Sequence[SampleRequest], lora: Any = None) -> list[SampleResult]:
        """Samples every request; all of them share one prefill batch and one decode batch
        (``max_batch`` rows at a time). Any invalid request raises before any work is done.

        ``lora``: the adapter every request samples with, or a list with one per request (None:
        the base model). Different adapters share the batch as one stacked adapter (each row
        multiplies only its own adapter); they must then be LoRAs of one :func:`lora.layout`.
        """
        for i, r in enumerate(requests):
            try:
                self.validate(r)
            except ValueError as e:
                raise ValueError(f"requests[{i}].{e}") from None
        adapters = self._adapter_slots(requests, lora)
        adapters.distinct = [self._placed(x) for x in adapters.distinct]
        owners = list(lora) if isinstance(lora, (list, tuple)) else [lora] * len(requests)
        seeds = [r.seed % (1 << 64) if r.seed is not None else secrets.randbits(64) for r in requests]
        if any(r.seed is None for r in requests) and jax.process_count() > 1:
            # Fresh seeds are drawn per process; every process of the SPMD programs must use one set.
            words = from_process_zero(np.array([(x >> 32, x & 0xFFFFFFFF) for x in seeds], np.uint32))
            seeds = [(int(hi) << 32) | int(lo) for hi, lo in words]
        results = [
            SampleResult(sequences=[None] * r.num_samples)  # type: ignore[list-item]
            for r in requests
        ]
        # Rows grouped by adapter: a stacked adapter's rows must be (see models.lora.stack).
        order = sorted(range(len(requests)), key=lambda i: adapters.slot[i])
        rows = [_Row(i, s) for i in order for s in range(requests[i].num_samples)]
        self.last_stats = {"prefill_prompts": 0, "prefix_hit_tokens": 0, "decode_steps": 0, "decode_calls": 0}
        for chunk in self._batches(requests, rows):
            self._run(requests, seeds, owners, chunk, results, *adapters.for_rows([r.request for r in chunk]))
        return results

    def _placed(self, lora: Any) -> Any:
        """``lora`` on the mesh by the sharding rules: an adapter restored from a checkpoint and one
        fresh from training then run the same programs (jit keys on its arguments' placements)."""
        if self.mesh is None or lora is None:
            return lora
        return sharding.place_lora(self.mesh, self.rules, lora)

    def _cache_bytes(self, rows: int, length: int) -> int:
        """Bytes of the decode cache of ``rows`` rows up to ``length`` positions, as bucketed."""
        c = self.config
        slot = 2 * c.num_layers * c.num_kv_heads * c.head_dim * self.cache_dtype.itemsize
        return min(bucket(rows), self.max_batch) * max(bucket(length), MIN_CACHE_BUCKET) * slot

    def _cache_budget(self) -> int | None:
        if self.max_cache_bytes is not None or jax.process_count() > 1:  # processes must batch alike
            return self.max_cache_bytes
        stats = jax.devices()[0].memory_stats()  # None on CPU
        if not stats or "bytes_limit" not in stats:
            return None
        return (stats["bytes_limit"] - stats.get("bytes_in_use", 0)) // 2

    def _batches(self, requests: Sequence[SampleRequest], rows: list[_Row]) -> list[list[_Row]]:
        """``rows`` in order, in batches of at most ``max_batch`` whose cache fits the budget."""
        budget = self._cache_budget()
        batches: list[list[_Row]] = [[]]
        longest = 0
        for row in rows:
            n = len(requests[row.request].prompt) + requests[row.request].max_tokens
            batch = batches[-1]
            fits = budget is None or self._cache_bytes(len(batch) + 1, max(longest, n)) <= budget
            if batch and (len(batch) == self.max_batch or not fits):
                batches.append([])
                longest = 0
            batches[-1].append(row)
            longest = max(longest, n)
        return batches

    @staticmethod
    def _adapter_slots(requests: Sequence[SampleRequest], lora: Any) -> _Adapters:
        if not isinstance(lora, (list, tuple)):
            return _Adapters([lora], [0] * len(requests))
        if len(lora) != len(requests):
            raise ValueError(f"lora: got {len(lora)} adapters for {len(requests)} requests")
        distinct = list({id(x): x for x in lora}.values())
        slot_of = {id(x): i for i, x in enumerate(distinct)}
        loras = [x for x in distinct if x is not None]
        if len(distinct) > 1:
            for i, x in enumerate(lora):
                if x is None:
                    continue
                if not isinstance(x, lora_lib.Lora):
                    raise ValueError(f"lora[{i}]: a {type(x).__name__} cannot share a batch with others")
                if lora_lib.layout(x) != lora_lib.layout(loras[0]):
                    raise ValueError(f"lora[{i}]: its shapes, dtypes or alpha differ from the others'")
            # The base model as an adapter whose update is exactly zero.
            distinct = [jax.tree.map(jnp.zeros_like, loras[0]) if x is None else x for x in distinct]
        return _Adapters(distinct, [slot_of[id(x)] for x in lora])

    def _run(
        self, requests, seeds, owners, rows: list[_Row], results: list[SampleResult], lora, row_adapter
    ) -> None:
        """``owners[i]``: the adapter request ``i`` asked for (the prefix cache's key);
        ``row_adapter[j]``: row ``j``'s index into a stacked ``lora`` (None: a single adapter)."""
        request_adapter = {row.request: a for row, a in zip(rows, row_adapter or [], strict=False)}

        def prompt_key(i: int) -> tuple:
            # A request with per-position queries prefills its own row (they are part of its input).
            queries = requests[i].target_prompt_ids is not None or requests[i].prompt_alt_tokens_k
            return request_adapter.get(i), tuple(requests[i].prompt), i if queries else None

        # Prefill each distinct (adapter, prompt) once.
        prompt_index: dict[tuple, int] = {}
        for row in rows:
            prompt_index.setdefault(prompt_key(row.request), len(prompt_index))
        prompts = [prompt for _, prompt, _ in prompt_index]
        prompt_adapter = [a for a, _, _ in prompt_index] if row_adapter else None
        # Prompt logprobs once per request, in the first group that holds one of its samples.
        lp_needed = [
            i
            for i in sorted({row.request for row in rows})
            if (
                requests[i].include_prompt_logprobs
                or requests[i].topk_prompt_logprobs
                or requests[i].target_prompt_ids is not None
                or requests[i].prompt_alt_tokens_k
            )
            and results[i].prompt_logprobs is None
            and results[i].topk_prompt_logprobs is None
            and results[i].target_prompt_logprobs is None
            and results[i].prompt_alt_tokens is None
        ]
        want_lp = any(requests[i].include_prompt_logprobs for i in lp_needed)
        topk = max([requests[i].topk_prompt_logprobs for i in lp_needed], default=0)
        topk = bucket(topk) if topk else 0  # fewer distinct programs; sliced per request below
        topk = min(topk, self.config.vocab_size)
        prompt_owner = {}
        for row in rows:
            prompt_owner.setdefault(prompt_index[prompt_key(row.request)], owners[row.request])
        # Per-position queries past the prompt's own logprobs need the whole prefill; otherwise
        # cached prefixes are not recomputed.
        whole = any(
            requests[i].topk_prompt_logprobs
            or requests[i].target_prompt_ids is not None
            or requests[i].prompt_alt_tokens_k
            for i in lp_needed
        )
        hits = None
        if not whole:
            owner_of = [prompt_owner[i] for i in range(len(prompts))]
            hits = self._prefix_hits(prompts, owner_of, lora, prompt_adapter, scored=want_lp)
        if hits and any(hits):
            pre = self._run_prefill_after(prompts, lora, hits, adapters=prompt_adapter, want_lp=want_lp)
            for row in rows:
                hit = hits[prompt_index[prompt_key(row.request)]]
                results[row.request].prompt_cache_hit_tokens = hit[1] if hit else 0
        else:  # the per-position queries (host arrays, seeded draws) only a whole prefill answers
            askers = [None if i is None else requests[i] for _, _, i in prompt_index]
            owner_seeds = [None if i is None else seeds[i] for _, _, i in prompt_index]
            queries = self._queries(prompts, askers, owner_seeds)
            pre = self._run_prefill(
                prompts, lora, want_lp=want_lp, topk=topk, adapters=prompt_adapter, queries=queries
            )
        if want_lp:
            pre["prompt_lp"] = np.asarray(pre["prompt_lp"])  # one transfer; kept with the prefixes too
        prompt_scores = pre.get("prompt_lp")
        for i in lp_needed:
            self._fill_prompt_logprobs(results[i], requests[i], pre, prompt_index[prompt_key(i)])

        # One decode row per sample.
        n = len(rows)
        b = min(bucket(n), self.max_batch)
        size = bucket(max(len(requests[r.request].prompt) + requests[r.request].max_tokens for r in rows))
        size = max(size, MIN_CACHE_BUCKET, pre["cache"].size)
        width = bucket(
            max((len(requests[r.request].stop_token_ids) for r in rows), default=0), MIN_STOP_ID_WIDTH
        )
        repeating = any(requests[r.request].repetition_penalty != 1 for r in rows)
        biased = max((len(requests[r.request].logit_bias or ()) for r in rows), default=0)
        bias_width = bucket(biased, MIN_STOP_ID_WIDTH) if biased else 0
        host = {
            "prompt_len": np.ones(b, np.int32),
            "max_tokens": np.zeros(b, np.int32),
            "temperature": np.zeros(b, np.float32),
            "top_k": np.full(b, -1, np.int32),
            "top_p": np.ones(b, np.float32),
            "min_p": np.zeros(b, np.float32),
            "presence": np.zeros(b, np.float32),
            "frequency": np.zeros(b, np.float32),
            "repetition": np.ones(b, np.float32),
            "context": np.full((b, size if repeating else 0), -1, np.int32),
            "bias_ids": np.full((b, bias_width), -1, np.int32),
            "bias": np.zeros((b, bias_width), np.float32),
            "seed": np.zeros((b, 2), np.uint32),
            "sample_index": np.zeros(b, np.int32),
            "stop_ids": np.full((b, width), -1, np.int32),
        }
        src = np.zeros(b, np.int32)
        for j, row in enumerate(rows):
            r = requests[row.request]
            seed = seeds[row.request]
            src[j] = prompt_index[prompt_key(row.request)]
            host["prompt_len"][j] = len(r.prompt)
            host["max_tokens"][j] = r.max_tokens
            host["temperature"][j] = r.temperature
            host["top_k"][j] = r.top_k
            host["top_p"][j] = r.top_p
            host["min_p"][j] = r.min_p
            host["presence"][j] = r.presence_penalty
            host["frequency"][j] = r.frequency_penalty
            host["repetition"][j] = r.repetition_penalty
            if repeating:
                host["context"][j, : len(r.prompt)] = r.prompt
            if r.logit_bias:
                host["bias_ids"][j, : len(r.logit_bias)] = list(r.logit_bias)
                host["bias"][j, : len(r.logit_bias)] = list(r.logit_bias.values())
            host["seed"][j] = (seed >> 32, seed & 0xFFFFFFFF)
            host["sample_index"][j] = row.sample
            host["stop_ids"][j, : len(r.stop_token_ids)] = r.stop_token_ids
        device_rows = _Rows(**{k: jnp.asarray(v) for k, v in host.items()})
        topk_sample = max(requests[r.request].topk_sample_logprobs for r in rows)
        topk_sample = min(bucket(topk_sample), self.config.vocab_size) if topk_sample else 0
        lora = _with_adapter_ids(lora, row_adapter, b)

        placement = self._placement(b, size)
        cache, logits = _program("grow", *placement)(pre["cache"], pre["logits"], jnp.asarray(src), size=size)
        del pre
        first = _program("first", *placement)(logits, device_rows, topk=topk_sample)
        step, out = _program("start", *placement)(*first, device_rows, size=size)
        state = _State(cache=cache, step=step, out=out)
        stop_rows = [j for j, row in enumerate(rows) if requests[row.request].stop_strings]
        streamed = {j: 0 for j, row in enumerate(rows) if requests[row.request].on_tokens}  # count sent
        total = int(host["max_tokens"].max())
        chunk = self.stop_check_interval if stop_rows or streamed else total
        step = 1  # the first program sampled token 0: one-token samples need no decode call
        check = bool(streamed)  # streaming readers get the first token before decoding goes on
        while step < total:
            if check:  # between chunks: stop strings and streaming readers may end rows early
                out = jax.device_get(state.out)
                done = self._checked(out, requests, rows, stop_rows, streamed)
                if done.all():
                    break
                if (done != out.done).any():
                    state = state._replace(out=state.out._replace(done=jnp.asarray(done)))
            step = min(step + chunk, total)
            state = _program("decode", *placement)(
                self.config, self.params, lora, state, device_rows, jnp.int32(step)
            )
            self.last_stats["decode_calls"] += 1
            check = bool(stop_rows or streamed)

        out = jax.device_get(state.out)
        self.last_stats["decode_steps"] += int(state.step)
        for j, row in enumerate(rows):
            r = requests[row.request]
            count = int(out.count[j])
            reason = "stop" if out.stopped[j] else "length"
            if r.stop_strings:
                cut = self._stop_string_cut(out.tokens[j, :count], r.stop_strings)
                if cut is not None:
                    count, reason = cut, "stop"
            results[row.request].sequences[row.sample] = (
                out.tokens[j, :count].tolist(),
                out.logprobs[j, :count].tolist(),
                reason,
            )
            if k := r.topk_sample_logprobs:
                if results[row.request].sequence_topk is None:
                    results[row.request].sequence_topk = [None] * r.num_samples  # type: ignore[list-item]
                results[row.request].sequence_topk[row.sample] = (
                    out.topk_ids[j, :count, :k].copy(),
                    out.topk_logprobs[j, :count, :k].copy(),
                )
        self._keep_prefixes(requests, owners, rows, out, state.cache, src, prompt_scores)

    def _keep_prefixes(
        self, requests, owners, rows: list[_Row], out: _Out, cache: KVCache, src, prompt_scores
    ) -> None:
        """Puts each row's keys and values in the prefix cache: its prompt and all of its tokens but
        the last, which was never fed (rows stopped early fed their scratch slot after it), with its
        prompt's logprobs when they were computed (``prompt_scores[src[j]]``: row ``j``'s prompt's)."""
        if not self.prefix_cache.max_bytes:
            return
        self.prefix_cache.prune()
        kept = set()
        for j, row in enumerate(rows):
            owner = owners[row.request]
            prompt = requests[row.request].prompt
            fed = max(int(out.count[j]) - 1, 0)
            tokens = (*prompt, *out.tokens[j, :fed].tolist())
            if len(tokens) < prefix_cache.MIN_HIT_TOKENS or (id(owner), tokens) in kept:
                continue
            if prefix_cache.owner_key(owner) is None:  # e.g. a full fine-tune's weights
                continue
            kept.add((id(owner), tokens))
            k, v = _row_slots(cache, jnp.int32(j), slots=bucket(len(tokens)))
            scores = None if prompt_scores is None else prompt_scores[src[j], : len(prompt) - 1]
            self.prefix_cache.insert(owner, tokens, k, v, scores)

    def _prefix_hits(self, prompts: list[tuple[int, ...]], owners: list, lora, adapters, *, scored: bool):
        """Each prompt's prefix-cache hit (:meth:`PrefixCache.lookup`), once the prefixes that
        prompts of this batch share and no entry serves are prefilled and kept: a GRPO group's
        sequences scored together, or prompts under one long system prompt, prefill it once."""
        lookup = lambda: [
            self.prefix_cache.lookup(o, x, scored=scored) for o, x in zip(owners, prompts, strict=True)
        ]
        hits = lookup()
        if not self.prefix_cache.max_bytes:
            return hits
        served = [hit[1] if hit else 0 for hit in hits]
        shared = _shared_prefixes(prompts, owners, served)
        if not shared:
            return hits
        leaders = [i for i, _ in shared]
        pre = self._run_prefill(
            [prefix for _, prefix in shared],
            lora,
            want_lp=scored,
            topk=0,
            adapters=None if adapters is None else [adapters[i] for i in leaders],
        )
        scores = nexts = None
        if scored:  # the members' next tokens are scored from the prefix's last logits, not fed again
            scores = np.asarray(pre["prompt_lp"])
            nexts = np.asarray(jax.nn.log_softmax(pre["logits"].astype(jnp.float32), axis=-1))
        for g, (i, prefix) in enumerate(shared):
            k, v = _row_slots(pre["cache"], jnp.int32(g), slots=bucket(len(prefix)))
            logprobs = None if scores is None else scores[g, : len(prefix) - 1]
            self.prefix_cache.insert(owners[i], prefix, k, v, logprobs, None if nexts is None else nexts[g])
        return lookup()

    @staticmethod
    def _queries(
        prompts: list[tuple[int, ...]], askers: list[SampleRequest | None], seeds: list[int | None]
    ) -> _PromptQueries | None:
        """Host arrays (padded to the prefill's bucketed ``[P, Tp]``) of what each prompt's owning
        request asks at its positions: target ids, and uniforms for its alternative tokens (drawn
        from its seed, so a seeded request draws the same tokens every time). None: nothing asked."""
        asks = [(i, r) for i, r in enumerate(askers) if r is not None]
        if not asks:
            return None
        p, t = _prefill_shape(prompts)
        k = max([r.target_prompt_ids.shape[1] for _, r in asks if r.target_prompt_ids is not None], default=0)
        a = max([r.prompt_alt_tokens_k for _, r in asks], default=0)
        target_ids = np.full((p, t, bucket(k) if k else 0), -1, np.int32)
        uniforms = np.full((p, t, bucket(a) if a else 0), 0.5, np.float32)
        temperature = np.zeros(p, np.float32)
        for i, r in asks:
            if r.target_prompt_ids is not None:
                rows, cols = r.target_prompt_ids.shape
                target_ids[i, :rows, :cols] = r.target_prompt_ids
            if r.prompt_alt_tokens_k:
                rng = np.random.default_rng(seeds[i])
                draws = rng.random((len(r.prompt) - 1, r.prompt_alt_tokens_k), dtype=np.float32)
                uniforms[i, : len(r.prompt) - 1, : r.prompt_alt_tokens_k] = np.maximum(draws, 1e-7)
                temperature[i] = r.temperature
        return _PromptQueries(target_ids, uniforms, temperature)

    def _run_prefill(
        self,
        prompts: list[tuple[int, ...]],
        lora,
        *,
        want_lp: bool,
        topk: int,
        adapters: list | None = None,
        queries: _PromptQueries | None = None,
    ) -> dict:
        p, t = _prefill_shape(prompts)
        lora = _with_adapter_ids(lora, adapters, p)
        tokens = np.zeros((p, t), np.int32)
        lengths = np.ones(p, np.int32)
        for i, x in enumerate(prompts):
            tokens[i, : len(x)] = x
            lengths[i] = len(x)
        self.last_stats["prefill_prompts"] = self.last_stats.get("prefill_prompts", 0) + len(prompts)
        program = _program(
            "prefill",
            *self._placement(p, t),
            want_lp=want_lp,
            topk=topk,
            targets=queries is not None and bool(queries.target_ids.shape[-1]),
            alt=queries is not None and bool(queries.alt_uniforms.shape[-1]),
        )
        return program(
            self.config,
            self.cache_dtype,
            self.params,
            lora,
            jnp.asarray(tokens),
            jnp.asarray(lengths),
            None if queries is None else jax.tree.map(jnp.asarray, queries),
            want_lp=want_lp,
            topk=topk,
        )

    def _run_prefill_after(
        self, prompts: list[tuple[int, ...]], lora, hits: list, *, adapters=None, want_lp: bool = False
    ) -> dict:
        """:func:`_prefill_after` of ``prompts`` past their cached prefixes (``hits[i]``: the prefix
        cache's ``(entry, length)``, or None to prefill it whole). ``want_lp``: also each prompt's
        logprobs (``prompt_lp``, as :func:`_prefill` has them), the cached part's from the entries
        (their hits came from scored lookups)."""
        p = bucket(len(prompts))
        starts = np.zeros(p, np.int32)
        starts[: len(hits)] = [hit[1] if hit else 0 for hit in hits]
        tn = bucket(max(len(x) - int(n) for x, n in zip(prompts, starts, strict=False)), MIN_PROMPT_BUCKET)
        slots = bucket(int(starts.max()) + tn)
        tc = min(slots, max(hit[0].k.shape[1] for hit in hits if hit))
        c = self.config
        shape = (c.num_layers, tc, c.num_kv_heads, c.head_dim)
        # Hits and misses alike in one placement: else each pattern of which prompts hit would be
        # a program of its own (jit keys on every argument's placement).
        if self.mesh is None:
            place = next(hit[0].k.sharding for hit in hits if hit)
        else:
            place = sharding.fitted_sharding(
                self.mesh, self.rules, ("layers", "seq", "kv_heads", "head_dim"), shape
            )
        none = jax.device_put(jnp.zeros(shape, self.cache_dtype), place)
        past = [
            jax.device_put(_fit_slots(hit[0].k, hit[0].v, slots=tc), place) if hit else (none, none)
            for hit in hits
        ]
        past += [(none, none)] * (p - len(hits))
        tokens = np.zeros((p, tn), np.int32)
        lengths = np.ones(p, np.int32)
        for i, x in enumerate(prompts):
            tokens[i, : len(x) - starts[i]] = x[starts[i] :]
            lengths[i] = len(x) - starts[i]
        self.last_stats["prefill_prompts"] += len(prompts)
        self.last_stats["prefix_hit_tokens"] += int(starts.sum())
        self.prefix_cache.hit_tokens += int(starts.sum())
        program = _program("prefill_after", *self._placement(p, slots), want_lp=want_lp)
        pre = program(
            self.config,
            self.cache_dtype,
            self.params,
            _with_adapter_ids(lora, adapters, p),
            tuple(k for k, _ in past),
            tuple(v for _, v in past),
            jnp.asarray(starts),
            jnp.asarray(tokens),
            jnp.asarray(lengths),
            slots=slots,
            want_lp=want_lp,
        )
        if want_lp:  # prompt_lp[i, t - 1] = lp(token t): the entry's up to the start, then the suffix's
            suffix = np.asarray(pre.pop("suffix_lp"))
            scores = np.zeros((len(prompts), max(len(x) for x in prompts) - 1), np.float32)
            for i, (x, hit) in enumerate(zip(prompts, hits, strict=True)):
                start = int(starts[i])
                if start:
                    scores[i, :start] = hit[0].prompt_logprobs(x, start)
                scores[i, start : len(x) - 1] = suffix[i, : len(x) - 1 - start]
            pre["prompt_lp"] = scores
        return pre

    @staticmethod
    def _fill_prompt_logprobs(result: SampleResult, request: SampleRequest, pre: dict, i: int) -> None:
        n = len(request.prompt)
        if request.include_prompt_logprobs:
            lp = np.asarray(pre["prompt_lp"][i, : n - 1])
            result.prompt_logprobs = [None, *lp.tolist()]
        k = request.topk_prompt_logprobs
        if k:
            ids = np.asarray(pre["topk_ids"][i, : n - 1, :k]).tolist()
            vals = np.asarray(pre["topk_lp"][i, : n - 1, :k]).tolist()
            result.topk_prompt_logprobs = [None] + [
                list(zip(ti, tv, strict=True)) for ti, tv in zip(ids, vals, strict=True)
            ]
        if request.target_prompt_ids is not None:
            rows, k = request.target_prompt_ids.shape
            result.target_prompt_logprobs = np.asarray(pre["target_lp"][i, :rows, :k], np.float32)
        if a := request.prompt_alt_tokens_k:
            result.prompt_alt_tokens = (
                np.asarray(pre["alt_tokens"][i, : n - 1, :a], np.int64),
                np.asarray(pre["alt_lp"][i, : n - 1, :a], np.float32),
            )

    def _checked(self, out: _Out, requests: list, rows: list, stop_rows: list, streamed: dict) -> np.ndarray:
        """Rows done after a chunk: those whose text already holds a stop string, and streamed rows
        whose reader ended them (each reader gets its row's tokens when it has new ones)."""
        done = out.done.copy()
        for j in stop_rows:
            stops = requests[rows[j].request].stop_strings
            if not done[j] and self._stop_string_cut(out.tokens[j, : out.count[j]], stops):
                done[j] = True
        for j, sent in streamed.items():
            if not done[j] and out.count[j] > sent:
                streamed[j] = int(out.count[j])
                tokens = out.tokens[j, : out.count[j]].tolist()
                try:
                    done[j] = requests[rows[j].request].on_tokens(rows[j].sample, tokens) is False
                except Exception:  # one reader's failure ends its sample, not the batch
                    log.warning("on_tokens raised: sample ended", exc_info=True)
                    done[j] = True
        return done

    def _stop_string_cut(self, tokens: Sequence[int], stop_strings: Sequence[str]) -> int | None:
        """The smallest ``n`` such that ``decode(tokens[:n])`` contains a stop string, else None."""
        decode = lambda n: self.tokenizer.decode(list(map(int, tokens[:n])))
        found = lambda text: any(s in text for s in stop_strings)
        if len(tokens) == 0 or not found(decode(len(tokens))):
            return None
        lo, hi = 1, len(tokens)  # decoded prefixes only grow, so containment is monotone in n
        while lo < hi:
            mid = (lo + hi) // 2
            if found(decode(mid)):
                hi = mid
            else:
                lo = mid + 1
        return lo

    # ---------------------------------------------------------------------------- logprobs

    def compute_logprobs(
        self, prompts: Sequence[Sequence[int]], lora: lora_lib.Lora | None = None
    ) -> list[list[float | None]]:
        """``[None, lp(t1 | t0), lp(t2 | t0 t1), ...]`` per prompt (Tinker's ``compute_logprobs``)."""
        for i, p in enumerate(prompts):
            self._check_prompt(p, f"prompts[{i}]")
        out: list[list[float | None]] = []
        lora = self._placed(lora)
        for start in range(0, len(prompts), self.max_batch):
            group = [tuple(int(t) for t in p) for p in prompts[start : start + self.max_batch]]
            distinct = list(dict.fromkeys(group))
            pre = self._run_prefill(distinct, lora, want_lp=True, topk=0)
            lp = np.asarray(pre["prompt_lp"])
            index = {p: i for i, p in enumerate(distinct)}
            out.extend([None, *lp[index[p], : len(p) - 1].tolist()] for p in group)
        return out
