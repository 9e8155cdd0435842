"""SDK 0.38's ``create_custom_loss``: a per-datum torch loss, traced once, that runs as JAX.

``ServiceClient.create_custom_loss(fn, input_ranks)`` (in process) and the server's
``/create_custom_loss`` (the SDK uploads the traced graph) both end in a :class:`LossHandle` whose
graph :func:`jtinker.losses.custom.compile_graph` rebuilt as a JAX function. ``forward_backward_custom``
then differentiates it in one forward/backward pass, with no torch and no second pass.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

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
    fn: Callable = dataclasses.field(repr=False, compare=False, default=None)  # per datum, jitted

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.inputs[1:])

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

    def batch_loss(self) -> Callable:
        """``loss_fn(data, logprobs_list) -> (loss, metrics)`` for ``forward_backward_custom``: the
        per-datum losses summed; ``:sum`` metrics summed and ``:mean`` metrics averaged over data."""

        def loss_fn(data: Sequence, logprobs_list: Sequence) -> tuple[jax.Array, dict]:
            total, sums = jnp.float32(0), {}
            for i, (datum, logprobs) in enumerate(zip(data, logprobs_list, strict=True)):
                fn_inputs = datum.loss_fn_inputs
                inputs = [
                    jnp.asarray(self._input(fn_inputs, k, rank, i), jnp.float32)
                    for k, rank in self.inputs[1:]
                ]
                loss, metrics = self.fn(logprobs, *inputs)
                total = total + loss
                for key, value in metrics.items():
                    sums[key] = sums.get(key, 0.0) + value
            return total, {k: v / len(data) if k.endswith(":mean") else v for k, v in sums.items()}

        return loss_fn


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
    # One small program per distinct datum shape, reused across steps.
    fn = jax.jit(custom.compile_graph(name, inputs, nodes))
    return LossHandle(name, inputs, session_id, nodes, loss_id, fn)


def create(fn: PerDatumLossFn, input_ranks: Mapping[str, int], session_id: str) -> LossHandle:
    """Traces a torch loss (``torch.fx``, under the SDK's rules) into a handle that runs as JAX."""
    traced = custom.trace(fn, input_ranks)
    return from_graph(traced.name, traced.inputs, traced.nodes, session_id, None)
