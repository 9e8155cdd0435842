"""Tinker ``Datum`` lists → validated, packed, bucketed :class:`TrainBatch` arrays (host side).

All validation happens here, before any device work, so a rejected request changes no state.
Short datums are packed into shared rows (segment ids keep attention inside each datum, positions
restart), and rows and lengths are rounded up to a small set of buckets so a stream of
differently sized requests compiles a handful of programs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from jtinker import losses as losses_lib
from jtinker.models import ModelConfig
from jtinker.train import TrainBatch

MIN_LENGTH_BUCKET = 16
_UNSET = object()


def length_bucket(n: int, limit: int | None = None) -> int:
    """Smallest of 16, 24, 32, 48, 64, 96, ... (powers of two and 1.5×) that holds ``n``."""
    bucket = MIN_LENGTH_BUCKET
    while bucket < n:
        bucket = bucket * 3 // 2 if bucket & (bucket - 1) == 0 else bucket * 4 // 3
    return min(bucket, limit) if limit is not None and limit >= n else bucket


def batch_bucket(n: int) -> int:
    """Rows are padded to a power of two."""
    return 1 << max(0, (n - 1).bit_length())


def adapter_bucket(k: int) -> int:
    """Adapter slots of a multi-adapter step: 1, 2, 3, 4, 6, 8, 12, 16, ... (powers of two and 1.5×).

    A dummy slot costs a whole sub-batch of compute, so the buckets are finer than powers of two.
    """
    power = 1 << max(0, (k - 1).bit_length())  # smallest power of two >= k
    return power * 3 // 4 if power >= 4 and k <= power * 3 // 4 else power


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


def build_batches(
    data: Sequence,
    loss_name: str | None,
    config: ModelConfig,
    *,
    max_tokens_per_batch: int = 16384,
    row_multiple: int = 1,
) -> list[tuple[list[int], HostBatch]]:
    """Validates ``data`` and returns micro-batches as ``(datum indices, HostBatch)``.

    Each micro-batch holds at most ``max_tokens_per_batch`` padded tokens (but at least one row);
    its row count is a multiple of ``row_multiple`` (the devices the batch is split over).
    Gradients of the micro-batches add up to the gradient of the whole batch.
    """
    tokens, targets, inputs, multi_k = validate_and_extract(data, loss_name, config)
    lengths = [t.shape[0] for t in tokens]
    row_length = length_bucket(max(lengths), config.max_position_embeddings)
    placements = pack(lengths, row_length)
    num_rows = max(p.row for p in placements) + 1
    rows_per_batch = max(1, max_tokens_per_batch // row_length)
    rows_per_batch = 1 << (rows_per_batch.bit_length() - 1)  # a power of two, to reuse buckets
    keys = sorted(inputs[0])
    micro_batches = []
    for first_row in range(0, num_rows, rows_per_batch):
        members = [i for i, p in enumerate(placements) if first_row <= p.row < first_row + rows_per_batch]
        rows = min(rows_per_batch, num_rows - first_row)
        b = -(-batch_bucket(rows) // row_multiple) * row_multiple  # rows split evenly over the mesh
        tail = () if multi_k is None else (multi_k,)
        tok = np.zeros((b, row_length), np.int32)
        tgt = np.zeros((b, row_length, *tail), np.int32)
        mask = np.zeros((b, row_length), np.float32)
        positions = np.zeros((b, row_length), np.int32)
        segments = np.zeros((b, row_length), np.int32)
        loss_inputs = {k: np.zeros((b, row_length, *tail), np.float32) for k in keys}
        local = []
        for i in members:
            p = placements[i]
            row, sl = p.row - first_row, slice(p.start, p.start + p.length)
            tok[row, sl] = tokens[i]
            tgt[row, sl] = targets[i]
            mask[row, sl] = 1.0
            positions[row, sl] = np.arange(p.length)
            segments[row, sl] = p.start + 1  # unique per row, never 0 (padding)
            for k in keys:
                loss_inputs[k][row, sl] = inputs[i][k]
            local.append(Placement(row, p.start, p.length))
        batch = TrainBatch(
            tokens=tok,
            targets=tgt,
            mask=mask,
            positions=positions,
            segment_ids=segments,
            loss_inputs=loss_inputs,
        )
        micro_batches.append((members, HostBatch(batch, local, int(sum(lengths[i] for i in members)))))
    return micro_batches
