"""Tinker ``Datum`` lists → validated, packed, bucketed :class:`TrainBatch` arrays (host side).

All validation happens here, before any device work, so a rejected request changes no state.
Short datums are packed into shared rows (segment ids keep attention inside each datum, positions
restart), and rows and lengths are rounded up to a small set of buckets so a stream of
differently sized requests compiles a handful of programs. Datums that start alike (a GRPO group's
prompt) can have that prefix computed once (:class:`~jtinker.train.SharedRows`), when the cost
model says it pays.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

import numpy as np

from jtinker import losses as losses_lib
from jtinker.models import ModelConfig
from jtinker.prefix_cache import common_prefix
from jtinker.train import SharedRows, TrainBatch

MIN_LENGTH_BUCKET = 16
MIN_SHARED_PREFIX = 16  # shorter common prefixes are not worth a layout of their own
# Rows of shared prefixes grow to at most this many tokens (or the datums' own length bucket, if
# longer): attention's masks and scores grow with the square of the row.
MAX_SHARED_ROW = 4096
_UNSET = object()


def length_bucket(n: int, limit: int | None = None) -> int:
    """Smallest of 16, 24, 32, 48, 64, 96, ... (powers of two and 1.5×) that holds ``n``."""
    bucket = MIN_LENGTH_BUCKET
    while bucket < n:
        bucket = bucket * 3 // 2 if bucket & (bucket - 1) == 0 else bucket * 4 // 3
    return min(bucket, limit) if limit is not None and limit >= n else bucket


def batch_bucket(n: int) -> int:
    """Rows of a batch, adapter slots of a multi-adapter step: 1, 2, 3, 4, 6, 8, 12, 16, ... (powers
    of two and 1.5×). A padded row or slot costs a whole one of compute, so the buckets are finer than
    powers of two: at most a third is padding, for twice the programs."""
    power = 1 << max(0, (n - 1).bit_length())  # smallest power of two >= n
    return power * 3 // 4 if power >= 4 and n <= power * 3 // 4 else power


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where one datum landed: ``row``, ``start`` offset and ``length`` tokens."""

    row: int
    start: int
    length: int


@dataclasses.dataclass
class HostBatch:
    batch: TrainBatch  # numpy arrays
    placements: list[Placement]
    num_tokens: int


def _field(i: int, key: str) -> str:
    return f"data[{i}].loss_fn_inputs[{key!r}]"


def validate_and_extract(
    data: Sequence, loss_name: str | None, config: ModelConfig
) -> tuple[list[np.ndarray], list[np.ndarray], list[dict[str, np.ndarray]], int | None]:
    """Checks every datum and returns (tokens, targets, float inputs, K or None).

    ``loss_name=None`` (custom losses) uses ``target_tokens`` only and passes other keys through.
    """
    if loss_name is not None and loss_name not in losses_lib.LOSSES:
        raise ValueError(f"loss_fn: unknown loss {loss_name!r}; choose from {sorted(losses_lib.LOSSES)}")
    if not data:
        raise ValueError("data: empty batch; forward_backward needs at least one Datum")
    required = losses_lib.REQUIRED_INPUTS[loss_name] if loss_name else ("target_tokens",)
    allowed = set(required)
    tokens_list, targets_list, inputs_list = [], [], []
    multi_k = _UNSET
    for i, datum in enumerate(data):
        try:
            tokens = np.asarray(datum.model_input.to_ints(), dtype=np.int64)
        except (AttributeError, ValueError) as e:
            raise ValueError(f"data[{i}].model_input: {e}") from e
        n = tokens.shape[0]
        if n == 0:
            raise ValueError(f"data[{i}].model_input: empty sequence")
        if n > config.max_position_embeddings:
            raise ValueError(
                f"data[{i}].model_input: sequence length {n} exceeds the model's maximum "
                f"{config.max_position_embeddings}"
            )
        if tokens.min() < 0 or tokens.max() >= config.vocab_size:
            raise ValueError(f"data[{i}].model_input: token ids must be in [0, {config.vocab_size})")
        fn_inputs = dict(datum.loss_fn_inputs)
        if loss_name is None:
            fn_inputs = {k: v for k, v in fn_inputs.items() if k in allowed}
        for key in required:
            if key not in fn_inputs:
                raise ValueError(f"{_field(i, key)}: required by loss {loss_name!r} but missing")
        for key in fn_inputs:
            if key not in allowed:
                raise ValueError(
                    f"{_field(i, key)}: not an input of loss {loss_name!r} (expected {sorted(allowed)})"
                )
        arrays = {}
        for key, value in fn_inputs.items():
            arr = value.to_numpy() if hasattr(value, "to_numpy") else np.asarray(value)
            if arr.ndim not in (1, 2) or arr.shape[0] != n:
                raise ValueError(
                    f"{_field(i, key)}: shape {tuple(arr.shape)} does not match model_input length {n} "
                    "(expected (N,) or (N, K))"
                )
            k = arr.shape[1] if arr.ndim == 2 else None
            if multi_k is _UNSET:
                multi_k = k
            elif k != multi_k:
                raise ValueError(f"{_field(i, key)}: every input must be (N,) or share one (N, K) shape")
            arrays[key] = arr
        targets = arrays.pop("target_tokens")  # required by every loss, checked above
        multi_k = None if multi_k is _UNSET else multi_k
        if not np.issubdtype(targets.dtype, np.integer) and not np.all(targets == np.round(targets)):
            raise ValueError(f"{_field(i, 'target_tokens')}: must be integer token ids")
        targets = targets.astype(np.int64)
        if targets.min() < 0 or targets.max() >= config.vocab_size:
            raise ValueError(f"{_field(i, 'target_tokens')}: token ids must be in [0, {config.vocab_size})")
        for key, arr in arrays.items():
            arr = arr.astype(np.float32)
            if not np.all(np.isfinite(arr)):
                raise ValueError(f"{_field(i, key)}: contains NaN or inf")
            if key in losses_lib.BINARY_INPUTS and not np.all((arr == 0) | (arr == 1)):
                raise ValueError(f"{_field(i, key)}: every value must be 0 or 1")
            arrays[key] = arr
        tokens_list.append(tokens)
        targets_list.append(targets)
        inputs_list.append(arrays)
    keys = set(inputs_list[0])
    for i, arrays in enumerate(inputs_list):
        if set(arrays) != keys:
            raise ValueError(f"data[{i}].loss_fn_inputs: every datum must carry the same keys {sorted(keys)}")
    return tokens_list, targets_list, inputs_list, multi_k


def pack(lengths: Sequence[int], row_length: int) -> list[Placement]:
    """First-fit decreasing: datums are placed, longest first, in the first row with room."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    free: list[int] = []
    placements: list[Placement | None] = [None] * len(lengths)
    for i in order:
        n = lengths[i]
        row = next((r for r, room in enumerate(free) if room >= n), None)
        if row is None:
            free.append(row_length)
            row = len(free) - 1
        placements[i] = Placement(row, row_length - free[row], n)
        free[row] -= n
    return placements  # type: ignore[return-value]


@dataclasses.dataclass(frozen=True)
class _Item:
    """What the model runs as one piece: a datum alone (``prefix == 0``), or the first ``prefix``
    tokens that ``members`` share once, followed by each member's rest."""

    prefix: int
    members: tuple[int, ...]

    def length(self, lengths: Sequence[int]) -> int:
        return self.prefix + sum(lengths[i] - self.prefix for i in self.members)


def shared_prefixes(tokens: Sequence[np.ndarray], min_length: int = MIN_SHARED_PREFIX) -> list[_Item]:
    """Groups of two or more datums and the prefix each group shares, chosen to save the most tokens.

    Sorted datums share prefixes with their neighbours; a run of neighbours sharing ``m >= min_length``
    tokens is one group unless splitting it where it shares least saves more (a GRPO group's prompt,
    or two groups whose prompts start alike). Datums in no group are left out."""
    order = sorted(range(len(tokens)), key=lambda i: tokens[i].tolist())
    lcp = [common_prefix(tokens[a], tokens[b]) for a, b in itertools.pairwise(order)]
    best: dict[tuple[int, int], tuple[int, list[_Item]]] = {}
    # Post-order over [lo, hi] ranges of ``order``, split at their least shared neighbours.
    stack: list[tuple[int, int, int | None]] = [(0, len(order) - 1, None)]  # (lo, hi, cut once split)
    while stack:
        lo, hi, cut = stack.pop()
        if hi <= lo:
            best[lo, hi] = (0, [])
            continue
        if cut is None:
            cut = min(range(lo, hi), key=lambda j: lcp[j])
            stack += [(lo, hi, cut), (lo, cut, None), (cut + 1, hi, None)]
            continue
        (left, left_items), (right, right_items) = best.pop((lo, cut)), best.pop((cut + 1, hi))
        whole = (hi - lo) * lcp[cut] if lcp[cut] >= min_length else -1
        if whole >= left + right:
            best[lo, hi] = (whole, [_Item(lcp[cut], tuple(sorted(order[lo : hi + 1])))])
        else:
            best[lo, hi] = (left + right, left_items + right_items)
    return best[0, len(order) - 1][1] if order else []


def token_cost(config: ModelConfig, row_length: int) -> float:
    """Training FLOPs of one token per layer in rows of ``row_length``: the projections forward and
    their input gradients, attention over the whole row (a packed row's masked scores are computed
    too) forward and backward (which recomputes the scores: about 2.5 forwards)."""
    heads = config.num_heads * config.head_dim
    mlp = config.intermediate_size
    if config.num_experts:
        mlp = config.num_experts_per_tok * config.moe_intermediate_size
    projections = config.hidden_size * (2 * heads + 2 * config.num_kv_heads * config.head_dim + 3 * mlp)
    return 2 * (2 * projections) + 3.5 * (4 * row_length * heads)


def _micro_batches(items: list[_Item], lengths: Sequence[int], row_length: int, max_tokens: int):
    """Items packed into rows of ``row_length`` and split into micro-batches of whole rows:
    ``[(rows, [(item, Placement)])]``."""
    placements = pack([item.length(lengths) for item in items], row_length)
    num_rows = max(p.row for p in placements) + 1
    rows_per_batch = max(1, max_tokens // row_length)
    while batch_bucket(rows_per_batch) > rows_per_batch:  # a bucket itself, to reuse its programs
        rows_per_batch -= 1
    out = []
    for first in range(0, num_rows, rows_per_batch):
        placed = [
            (item, dataclasses.replace(p, row=p.row - first))
            for item, p in zip(items, placements, strict=True)
            if first <= p.row < first + rows_per_batch
        ]
        out.append((min(rows_per_batch, num_rows - first), placed))
    return out


def _plan(tokens, lengths, row_length, config, max_tokens, share_prefixes):
    """The cheapest layout by :func:`token_cost`: each datum alone, or shared prefixes once in rows
    of one of the length buckets up to 8 times the datums' row length and ``MAX_SHARED_ROW`` (a
    group too long for a row is split, its prefix repeated). Returns ``(row_length, micro-batches,
    shares)``."""
    alone = [_Item(0, (i,)) for i in range(len(lengths))]
    groups = shared_prefixes(tokens) if share_prefixes else []
    plans = [(row_length, alone)]
    grouped = {i for group in groups for i in group.members}
    caps = [row_length]
    while groups and length_bucket(caps[-1] + 1) <= min(8 * row_length, max(row_length, MAX_SHARED_ROW)):
        caps.append(length_bucket(caps[-1] + 1))
    for cap in caps if groups else ():
        items = [item for item in alone if item.members[0] not in grouped]
        for group in groups:
            chunks: list[list[int]] = []  # first fit, longest rests first
            for i in sorted(group.members, key=lambda i: -lengths[i]):
                fits = [c for c in chunks if _Item(group.prefix, (*c, i)).length(lengths) <= cap]
                if fits:
                    fits[0].append(i)
                else:
                    chunks.append([i])
            items += [_Item(group.prefix if len(c) > 1 else 0, tuple(sorted(c))) for c in chunks]
        plans.append((cap, items))
    laid_out = [(rows, _micro_batches(items, lengths, rows, max_tokens), items) for rows, items in plans]

    def cost(plan):
        rows, micro_batches, _ = plan
        return sum(batch_bucket(n) for n, _ in micro_batches) * rows * token_cost(config, rows)

    rows, micro_batches, items = min(laid_out, key=cost)  # ties keep the earlier plan: no sharing first
    return rows, micro_batches, any(item.prefix for item in items)


def build_batches(
    data: Sequence,
    loss_name: str | None,
    config: ModelConfig,
    *,
    max_tokens_per_batch: int = 16384,
    row_multiple: int = 1,
    share_prefixes: bool = True,
) -> list[tuple[list[int], HostBatch]]:
    """Validates ``data`` and returns micro-batches as ``(datum indices, HostBatch)``.

    Each micro-batch holds at most ``max_tokens_per_batch`` padded tokens (but at least one row);
    its row count is a multiple of ``row_multiple`` (the devices the batch is split over).
    Gradients of the micro-batches add up to the gradient of the whole batch.
    With ``share_prefixes``, datums that start alike (a GRPO group's prompt, a DPO pair's) have
    their common prefix computed once when :func:`token_cost` says it pays (``TrainBatch.shared``).
    """
    tokens, targets, inputs, multi_k = validate_and_extract(data, loss_name, config)
    lengths = [t.shape[0] for t in tokens]
    row_length = length_bucket(max(lengths), config.max_position_embeddings)
    model_length, plan, shares = _plan(
        tokens, lengths, row_length, config, max_tokens_per_batch, share_prefixes
    )
    keys = sorted(inputs[0])
    tail = () if multi_k is None else (multi_k,)
    padded_rows = lambda n: -(-batch_bucket(n) // row_multiple) * row_multiple  # split evenly over the mesh
    micro_batches = []
    for num_rows, placed in plan:
        members = sorted(i for item, _ in placed for i in item.members)
        if shares:  # the loss sees each datum whole, packed as if nothing were shared
            local = dict(zip(members, pack([lengths[i] for i in members], row_length), strict=True))
        else:
            local = {item.members[0]: p for item, p in placed}
        b = padded_rows(max(p.row for p in local.values()) + 1)
        tok = np.zeros((b, row_length), np.int32)
        tgt = np.zeros((b, row_length, *tail), np.int32)
        mask = np.zeros((b, row_length), np.float32)
        positions = np.zeros((b, row_length), np.int32)
        segments = np.zeros((b, row_length), np.int32)
        loss_inputs = {k: np.zeros((b, row_length, *tail), np.float32) for k in keys}
        for i in members:
            p = local[i]
            row, sl = p.row, slice(p.start, p.start + p.length)
            tok[row, sl] = tokens[i]
            tgt[row, sl] = targets[i]
            mask[row, sl] = 1.0
            positions[row, sl] = np.arange(p.length)
            segments[row, sl] = p.start + 1  # unique per row, never 0 (padding)
            for k in keys:
                loss_inputs[k][row, sl] = inputs[i][k]
        batch = TrainBatch(
            tokens=tok,
            targets=tgt,
            mask=mask,
            positions=positions,
            segment_ids=segments,
            loss_inputs=loss_inputs,
            shared=_shared_rows(
                placed, local, tokens, targets, padded_rows(num_rows), model_length, b, row_length
            )
            if shares
            else None,
        )
        placements = [local[i] for i in members]
        micro_batches.append((members, HostBatch(batch, placements, int(sum(lengths[i] for i in members)))))
    return micro_batches


def _shared_rows(
    placed, local, tokens, targets, rows: int, length: int, loss_rows: int, loss_length: int
) -> SharedRows:
    """The model's rows for ``placed`` items, and where each datum position (``local``) reads them.

    A shared position is scored for its first reader's target; a reader whose target differs (a
    GRPO group's completions at the prompt's last token) gets an extra score there."""
    tok = np.zeros((rows, length), np.int32)
    tgt = np.zeros((rows, length, *targets[0].shape[1:]), np.int32)
    positions = np.zeros((rows, length), np.int32)
    segments = np.zeros((rows, length), np.int32)
    prefix_ids = np.full((rows, length), -1, np.int32)
    source = np.zeros((loss_rows, loss_length), np.int32)
    extras: dict[tuple, int] = {}  # (flat position, target bytes) -> index
    extra_source, extra_targets = [], []
    for item, p in placed:
        at, prefix, first = p.start, item.prefix, item.members[0]
        shared = slice(at, at + prefix)
        tok[p.row, shared], tgt[p.row, shared] = tokens[first][:prefix], targets[first][:prefix]
        positions[p.row, shared] = np.arange(prefix)
        segments[p.row, shared] = at + 1
        prefix_at, at = at, at + prefix
        for i in item.members:
            rest = slice(at, at + len(tokens[i]) - prefix)
            tok[p.row, rest], tgt[p.row, rest] = tokens[i][prefix:], targets[i][prefix:]
            positions[p.row, rest] = np.arange(prefix, len(tokens[i]))
            segments[p.row, rest] = at + 1
            if prefix:
                prefix_ids[p.row, rest] = prefix_at + 1
            flat = p.row * length + np.concatenate(
                [np.arange(prefix_at, prefix_at + prefix), np.arange(at, rest.stop)]
            )
            differ = targets[i][:prefix] != targets[first][:prefix]
            differ = differ.any(axis=tuple(range(1, differ.ndim)))  # any of a position's K targets
            for j in np.flatnonzero(differ):
                key = (int(flat[j]), targets[i][j].tobytes())
                if key not in extras:
                    extras[key] = len(extra_source)
                    extra_source.append(flat[j])
                    extra_targets.append(targets[i][j])
                flat[j] = rows * length + extras[key]
            q = local[i]
            source[q.row, q.start : q.start + q.length] = flat
            at = rest.stop
    # Sized by the datum count (an RL loop's is fixed) rather than by the extras (how many of a
    # group's completions start alike varies step to step): next-token datums need at most one each.
    e = batch_bucket(max(len(local), len(extra_source)))
    extra = np.zeros((e, *targets[0].shape[1:]), np.int32)
    extra[: len(extra_targets)] = extra_targets
    return SharedRows(
        tokens=tok,
        targets=tgt,
        positions=positions,
        segment_ids=segments,
        prefix_ids=prefix_ids,
        source=source,
        extra_source=np.pad(np.asarray(extra_source, np.int32), (0, e - len(extra_source))),
        extra_targets=extra,
    )
