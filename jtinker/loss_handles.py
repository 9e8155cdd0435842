"""SDK 0.38's ``create_custom_loss``: a per-datum torch loss, traced once, that runs as JAX.

``ServiceClient.create_custom_loss(fn, input_ranks)`` (in process) and the server's
``/create_custom_loss`` (the SDK uploads the traced graph) both end in a :class:`LossHandle` whose
graph :func:`jtinker.losses.custom.compile_graph` rebuilt as a JAX function. ``forward_backward_custom``
then differentiates it in one forward/backward pass, with no torch and no second pass. Where the graph
has an exact padded form (:func:`jtinker.losses.custom.compile_masked`), the whole batch runs as one
program per (rows, length) bucket, so datums of new lengths compile nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from jtinker.batching import batch_bucket, length_bucket
from jtinker.losses import custom

# A per-datum custom loss in torch: (logprobs, *the loss_fn_inputs it reads) -> (loss, metrics).
PerDatumLossFn = Callable[..., tuple[Any, Mapping[str, Any]]]


@dataclasses.dataclass(frozen=True)
class LossHandle:
    """A custom loss from ``create_custom_loss``; pass it to ``forward_backward_custom``.

    ``inputs`` are ``(name, rank)``: ``logprobs`` first, then the ``loss_fn_inputs`` keys the loss
    reads in the order it takes them. ``graph`` is the traced loss as the SDK sends it.
    """

    name: str
    inputs: tuple[tuple[str, int], ...]
    session_id: str
    graph: tuple[dict, ...] = dataclasses.field(repr=False)
    loss_id: str | None = None
    # Per datum, jitted: (logprobs, *inputs) -> ((loss, metrics), d loss / d logprobs).
    fn: Callable = dataclasses.field(repr=False, compare=False, default=None)
    # The whole batch in one call, each datum padded to a length bucket: (lengths, logprobs, *inputs) ->
    # ((losses, metrics), grads), one row per datum; None for a graph with no padded form.
    batched: Callable | None = dataclasses.field(repr=False, compare=False, default=None)

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.inputs[1:])

    @property
    def unbatched_reason(self) -> str | None:
        """Why a batch runs one program per distinct datum length (the first node with no padded form);
        None when it runs padded, one program per (rows, length) bucket."""
        return None if self.batched is not None else custom.masked_refusal(self.name, self.inputs, self.graph)

    def check_data(self, data: Sequence) -> None:
        """Every datum carries each input the loss reads, at its declared rank (``logprobs`` has the
        rank of ``target_tokens``); raises ``ValueError`` naming the datum and key."""
        (_, logprobs_rank), *inputs = self.inputs
        for i, datum in enumerate(data):
            fn_inputs = getattr(datum, "loss_fn_inputs", None) or {}
            for key, rank in [("target_tokens", logprobs_rank), *inputs]:
                if key not in fn_inputs:
                    raise ValueError(
                        f"data[{i}].loss_fn_inputs[{key!r}]: missing; loss {self.name!r} reads it"
                    )
                self._input(fn_inputs, key, rank, i)

    def _input(self, fn_inputs: Mapping, key: str, rank: int, i: int) -> np.ndarray:
        value = fn_inputs[key]
        arr = np.asarray(value.to_numpy() if hasattr(value, "to_numpy") else value)
        if rank == 0 and arr.size == 1:  # protobuf has no empty shape: a scalar arrives as [1]
            return arr.reshape(())
        if arr.ndim != rank:
            raise ValueError(
                f"data[{i}].loss_fn_inputs[{key!r}]: rank {arr.ndim}, but loss {self.name!r} declared "
                f"rank {rank}"
            )
        return arr

    def value_and_grad(self, data: Sequence, logprobs_list: Sequence) -> tuple[tuple[float, dict], list]:
        """``((loss, metrics), grads)`` for ``Adapter.forward_backward_custom``: per-datum losses summed,
        ``:sum`` metrics summed and ``:mean`` metrics averaged over the data, gradients per datum.

        The batch runs as one program per (row, length) bucket when the graph has a padded form and
        every ``[T, ...]`` input is as long as its datum; else one program per distinct datum shape.
        """
        logprobs = [np.asarray(lp, np.float32) for lp in logprobs_list]
        inputs = [
            [self._input(d.loss_fn_inputs, key, rank, i) for key, rank in self.inputs[1:]]
            for i, d in enumerate(data)
        ]
        pairs = zip(logprobs, inputs, strict=True)
        aligned = all(x.ndim == 0 or len(x) == len(lp) for lp, xs in pairs for x in xs)
        if self.batched is not None and aligned:
            return self._padded_value_and_grad(logprobs, inputs)
        total, sums, grads = 0.0, {}, []
        for lp, xs in zip(logprobs, inputs, strict=True):
            (loss, metrics), grad = self.fn(lp, *xs)
            total = total + loss
            grads.append(grad)
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + value
        return _reduce(total, sums, len(logprobs)), grads

    def _padded_value_and_grad(self, logprobs: list, inputs: list) -> tuple[tuple[float, dict], list]:
        n, lengths = len(logprobs), [len(lp) for lp in logprobs]
        rows, length = batch_bucket(n), length_bucket(max(lengths))

        def stack(arrays: list[np.ndarray]) -> np.ndarray:
            # Edge padding: padded positions repeat real values, so every intermediate stays finite.
            pad = [
                np.pad(a, [(0, length - len(a))] + [(0, 0)] * (a.ndim - 1), "edge") if a.ndim else a
                for a in arrays
            ]
            return np.stack(pad + [pad[0]] * (rows - n))  # spare rows repeat row 0; dropped below

        columns = [stack([xs[j] for xs in inputs]) for j in range(len(self.inputs) - 1)]
        padded_lengths = np.asarray(lengths + [lengths[0]] * (rows - n), np.int32)
        (losses, metrics), grads = self.batched(padded_lengths, stack(logprobs), *columns)
        grads = np.asarray(grads)
        sums = {key: np.asarray(value)[:n].sum() for key, value in metrics.items()}
        return _reduce(np.asarray(losses)[:n].sum(), sums, n), [grads[i, :t] for i, t in enumerate(lengths)]


def _reduce(total: Any, sums: dict, n: int) -> tuple[float, dict]:
    return float(total), {k: float(v) / n if k.endswith(":mean") else float(v) for k, v in sums.items()}


def from_graph(
    name: str,
    inputs: Sequence[tuple[str, int]],
    graph: Sequence[Mapping],
    session_id: str,
    loss_id: str | None,
) -> LossHandle:
    """A handle for an uploaded graph; ``ValueError`` naming the node if it is not allowed."""
    inputs = tuple((str(n), int(r)) for n, r in inputs)
    nodes = tuple(dict(node) for node in graph)
    # The loss and its gradient: per datum shape, or per padded batch shape when the graph allows it.
    fn = jax.jit(jax.value_and_grad(custom.compile_graph(name, inputs, nodes), has_aux=True))
    masked = custom.compile_masked(name, inputs, nodes)
    batched = (
        None if masked is None else jax.jit(jax.vmap(jax.value_and_grad(masked, argnums=1, has_aux=True)))
    )
    return LossHandle(name, inputs, session_id, nodes, loss_id, fn, batched)


def create(fn: PerDatumLossFn, input_ranks: Mapping[str, int], session_id: str) -> LossHandle:
    """Traces a torch loss (``torch.fx``, under the SDK's rules) into a handle that runs as JAX."""
    traced = custom.trace(fn, input_ranks)
    return from_graph(traced.name, traced.inputs, traced.nodes, session_id, None)
