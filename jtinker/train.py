"""The pure training step: model + loss + optax over a LoRA-only pytree.

Everything here is a function of arrays. ``jtinker.engine`` turns Tinker ``Datum`` lists into
:class:`TrainBatch` buckets and keeps the per-adapter state between calls.

Semantics follow Tinker: losses are token sums, gradients accumulate across
``forward_backward`` calls until ``optim_step``, and ``optim_step`` is AdamW with the
hyperparameters of that call (``optax.inject_hyperparams``, so changing them never recompiles).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import struct

from jtinker import losses as losses_lib
from jtinker.models import ModelConfig, hidden_states, token_logprobs, unembed
from jtinker.models import lora as lora_lib
from jtinker.models.lora import Lora


@struct.dataclass
class SharedRows:
    """The rows a model runs when datums share prefixes: each shared prefix once, followed by the
    rest of each datum that starts with it (``prefix_ids`` names the prefix's segment, ``-1``: none).

    Each position is scored for ``targets``; ``extra_targets`` ``[E]`` are further targets scored at
    flat positions (``row * T' + column``) ``extra_source`` (a GRPO group's completions each score
    their first token at the prompt's last). ``source[b, t]`` indexes the flat scores followed by
    the extra ones: the batch's position ``(b, t)`` reads its score there, so the loss sees the
    usual per-datum layout.
    """

    tokens: jax.Array
    targets: jax.Array
    positions: jax.Array
    segment_ids: jax.Array
    prefix_ids: jax.Array
    source: jax.Array
    extra_source: jax.Array
    extra_targets: jax.Array


@struct.dataclass
class TrainBatch:
    """A padded (and possibly packed) batch. Padding has ``mask == 0`` and ``segment_ids == 0``.

    ``targets`` is ``[B, T]`` or ``[B, T, K]`` (Tinker's multi-target form); every entry of
    ``loss_inputs`` has the shape of ``targets``. With ``shared``, the model runs those rows instead
    of ``tokens``, and their scores are read into this layout.
    """

    tokens: jax.Array
    targets: jax.Array
    mask: jax.Array
    positions: jax.Array
    segment_ids: jax.Array
    loss_inputs: dict
    shared: SharedRows | None = None


@struct.dataclass
class AdamHyperparams:
    """Per-step optimizer settings, as traced scalars (Tinker's ``AdamParams``)."""

    learning_rate: jax.Array
    beta1: jax.Array
    beta2: jax.Array
    eps: jax.Array
    weight_decay: jax.Array
    grad_clip_norm: jax.Array  # 0 disables clipping

    @classmethod
    def create(
        cls,
        learning_rate: float = 1e-4,
        beta1: float = 0.9,
        beta2: float = 0.95,
        eps: float = 1e-12,
        weight_decay: float = 0.0,
        grad_clip_norm: float = 0.0,
    ) -> AdamHyperparams:
        f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
        return cls(*(f32(v) for v in (learning_rate, beta1, beta2, eps, weight_decay, grad_clip_norm)))


def optimizer() -> optax.GradientTransformation:
    """AdamW (torch semantics, decoupled weight decay) whose hyperparameters live in the state."""
    return optax.inject_hyperparams(optax.adamw, hyperparam_dtype=jnp.float32)(
        learning_rate=1e-4, b1=0.9, b2=0.95, eps=1e-12, weight_decay=0.0
    )


@struct.dataclass
class FullWeights:
    """Full fine-tuning's trainable tree: every base weight, standing where a :class:`Lora` would.

    Gradients, Adam moments and checkpoints mirror it exactly as they mirror a LoRA, so every train
    entry point and the whole engine serve both; the model sees these weights and no adapter.
    """

    weights: dict


def master_dtype(dtype) -> jnp.dtype:
    """A full fine-tune's trainable dtype for a base weight's: f32 for floating weights."""
    return jnp.dtype(jnp.float32 if jnp.issubdtype(dtype, jnp.floating) else dtype)


def master_copy(weight: jax.Array) -> jax.Array:
    """A full fine-tune's trainable copy of a base weight (see :func:`master_dtype`)."""
    return jnp.array(weight, master_dtype(weight.dtype))


def model_weights(params: dict, trainable: Lora | FullWeights | None) -> tuple[dict, Lora | None]:
    """``(params, lora)`` to run the model with: full weights replace the base (cast from their f32
    masters to the base's dtypes, so a bf16 model computes in bf16) and carry no LoRA."""
    if isinstance(trainable, FullWeights):
        return jax.tree.map(lambda w, p: w.astype(p.dtype), trainable.weights, params), None
    return params, trainable


def _run_rows(config: ModelConfig, params: dict, lora: Lora | None, batch: TrainBatch, *, remat: bool):
    """Final hidden states of the rows the model runs: ``batch.shared`` if any, else the batch's."""
    rows = batch.shared or batch
    hidden, _ = hidden_states(
        config,
        params,
        rows.tokens,
        positions=rows.positions,
        segment_ids=rows.segment_ids,
        prefix_ids=None if batch.shared is None else rows.prefix_ids,
        lora=lora,
        remat=remat,
    )
    return hidden


def _extra_hidden(hidden: jax.Array, shared: SharedRows) -> jax.Array:
    """``[E, H]``: the hidden states at the positions of the extra scores."""
    return jnp.take(hidden.reshape(-1, hidden.shape[-1]), shared.extra_source, axis=0)


def _per_datum(values: jax.Array, extra_values: jax.Array, shared: SharedRows) -> jax.Array:
    """The batch's ``[B, T, ...]`` from the shared rows' ``[B', T', ...]`` and the extra ``[E, ...]``
    values (the read's gradient sums each shared position's readers)."""
    flat = values.reshape(-1, *values.shape[2:])
    return jnp.take(jnp.concatenate([flat, extra_values]), shared.source, axis=0)


def target_logprobs(
    config: ModelConfig,
    params: dict,
    lora: Lora | FullWeights | None,
    batch: TrainBatch,
    *,
    remat: bool = True,
) -> jax.Array:
    """Learner logprobs of ``batch.targets`` (f32), never materialising all ``[B, T, V]`` logits."""
    params, lora = model_weights(params, lora)
    hidden = _run_rows(config, params, lora, batch, remat=remat)
    if batch.shared is None:
        return token_logprobs(params, hidden, batch.targets, lora)
    shared = batch.shared  # each shared position is scored once
    scores = token_logprobs(params, hidden, shared.targets, lora)
    extra = token_logprobs(params, _extra_hidden(hidden, shared)[None], shared.extra_targets[None], lora)
    return _per_datum(scores, extra[0], shared)


def loss_and_logprobs(
    lora: Lora,
    params: dict,
    batch: TrainBatch,
    loss_config: Mapping[str, jax.Array],
    *,
    config: ModelConfig,
    loss_fn: Callable,
    remat: bool = True,
):
    """``(loss, (metrics, logprobs))`` of a built-in Tinker loss; differentiable in ``lora``."""
    logprobs = target_logprobs(config, params, lora, batch, remat=remat)
    inputs = {**batch.loss_inputs, "mask": batch.mask, "segment_ids": batch.segment_ids}
    loss, metrics = loss_fn(logprobs, inputs, loss_config)
    return loss, (metrics, logprobs)


def grads_and_logprobs(lora, params, batch, loss_config, *, config, loss_fn, remat=True):
    """Gradients w.r.t. the LoRA pytree only; base params are closed over, never differentiated."""
    fn = functools.partial(loss_and_logprobs, config=config, loss_fn=loss_fn, remat=remat)
    (loss, (metrics, logprobs)), grads = jax.value_and_grad(fn, has_aux=True)(
        lora, params, batch, loss_config
    )
    return grads, loss, metrics, logprobs


def apply_optimizer(
    lora: Lora, opt_state: optax.OptState, grads: Lora, hparams: AdamHyperparams
) -> tuple[Lora, optax.OptState, dict]:
    """One AdamW update with this step's hyperparameters and optional global-norm clipping."""
    grad_norm = optax.tree.norm(grads)
    clip = hparams.grad_clip_norm
    factor = jnp.where((clip > 0) & (grad_norm > clip), clip / grad_norm, 1.0)
    grads = jax.tree.map(lambda g: g * factor, grads)
    hp = opt_state.hyperparams
    hp["learning_rate"] = hparams.learning_rate
    hp["b1"], hp["b2"] = hparams.beta1, hparams.beta2
    hp["eps"], hp["weight_decay"] = hparams.eps, hparams.weight_decay
    updates, opt_state = optimizer().update(grads, opt_state, lora)
    lora = optax.apply_updates(lora, updates)
    return lora, opt_state, {"grad_norm": grad_norm, "learning_rate": hparams.learning_rate}


def train_step(
    lora: Lora,
    opt_state: optax.OptState,
    params: dict,
    batch: TrainBatch,
    hparams: AdamHyperparams,
    loss_config: Mapping[str, jax.Array] | None = None,
    *,
    config: ModelConfig,
    loss_fn: Callable = losses_lib.LOSSES["cross_entropy"],
    remat: bool = True,
) -> tuple[Lora, optax.OptState, dict]:
    """``(lora, opt_state, params, batch) -> (lora, opt_state, metrics)`` for the functional API.

    ``jax.jit(train_step, static_argnames=("config", "loss_fn", "remat"), donate_argnums=(0, 1))``.
    """
    grads, loss, metrics, _ = grads_and_logprobs(
        lora, params, batch, loss_config or {}, config=config, loss_fn=loss_fn, remat=remat
    )
    lora, opt_state, opt_metrics = apply_optimizer(lora, opt_state, grads, hparams)
    return lora, opt_state, {**metrics, **opt_metrics, "loss": loss}


# The engine's entry points. ``CompiledSteps`` jits them with explicit output shardings so that
# donated state keeps its layout step after step (one compile per shape bucket).
def accumulate(grad_acc, lora, params, batch, loss_config, *, config, loss_fn, remat=True):
    """``grad_acc + d loss / d lora`` plus the loss, metrics and per-token logprobs."""
    grads, loss, metrics, logprobs = grads_and_logprobs(
        lora, params, batch, loss_config, config=config, loss_fn=loss_fn, remat=remat
    )
    return jax.tree.map(jnp.add, grad_acc, grads), loss, metrics, logprobs


def evaluate(lora, params, batch, loss_config, *, config, loss_fn, remat=False):
    """The forward half only: loss, metrics and logprobs, no gradients."""
    loss, (metrics, logprobs) = loss_and_logprobs(
        lora, params, batch, loss_config, config=config, loss_fn=loss_fn, remat=remat
    )
    return loss, metrics, logprobs


def logprobs_with_pullback(lora, params, batch, *, config, remat=True):
    """Forward once and keep the VJP, so a custom loss is differentiated without a second pass.

    The returned pullback is a pytree of residuals whose structure is cached with the jitted
    forward, so the jitted :func:`accumulate_pullback` compiles once per bucket, not per call.
    """
    return jax.vjp(lambda lo: target_logprobs(config, params, lo, batch, remat=remat), lora)


def full_logits(
    config: ModelConfig, params: dict, lora: Lora | None, batch: TrainBatch, *, remat: bool = True
):
    """All logits ``[B, T, V]`` in f32, for custom losses that need the whole distribution."""
    params, lora = model_weights(params, lora)
    hidden = _run_rows(config, params, lora, batch, remat=remat)
    if batch.shared is not None:
        hidden = _per_datum(hidden, _extra_hidden(hidden, batch.shared), batch.shared)
    return unembed(params, hidden, lora)


def logits_with_pullback(lora, params, batch, *, config, remat=True):
    """Like :func:`logprobs_with_pullback`, for full logits (memory ``B·T·V`` floats)."""
    return jax.vjp(lambda lo: full_logits(config, params, lo, batch, remat=remat), lora)


def _per_adapter(fn, loras, params, batch, loss_config, *, with_grads: bool):
    """``fn(lora_k, params, batch[k], loss_config[k])`` for every k in one program.

    ``jax.vmap`` over the adapters with the base params broadcast: every base matmul becomes one
    matmul over all ``K·B·T`` rows (one read of the shared weights), the LoRA matmuls become batched
    matmuls, and each adapter's loss, metrics and gradients come out separately. Adapters are stacked
    as ``models.lora.stack`` stacks them (``ADAPTER_AXIS``, right before each leaf's matrix dims), so
    the layer scan slices them as they are; a leading ``K`` would be transposed behind the layer axis.
    """
    axis = lora_lib.ADAPTER_AXIS
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs, axis), *loras)
    out_axes = (axis, 0, 0, 0) if with_grads else 0
    return jax.vmap(fn, in_axes=(axis, None, 0, 0), out_axes=out_axes)(stacked, params, batch, loss_config)


def accumulate_many(grad_accs, loras, params, batch, loss_config, active, *, config, loss_fn, remat=True):
    """:func:`accumulate` for ``K`` adapters at once (Tinker's multi-client ``forward_backward``).

    ``grad_accs`` and ``loras`` are tuples of ``K`` per-adapter trees (one layout), ``batch`` is a
    :class:`TrainBatch` whose arrays have a leading ``[K]`` axis, ``loss_config`` maps names to ``[K]``
    values and ``active`` is ``[K]`` bool: inactive slots (padding ``K`` up to its bucket) keep their
    accumulator unchanged. Returns the K new accumulators, ``[K]`` losses, ``[K]`` metrics and
    ``[K, B, T]`` logprobs.
    """
    fn = functools.partial(grads_and_logprobs, config=config, loss_fn=loss_fn, remat=remat)
    grads, loss, metrics, logprobs = _per_adapter(fn, loras, params, batch, loss_config, with_grads=True)

    def add(k, acc, g):
        return jnp.where(active[k], acc + jnp.take(g, k, lora_lib.ADAPTER_AXIS), acc)

    new_accs = tuple(
        jax.tree.map(functools.partial(add, k), grad_acc, grads) for k, grad_acc in enumerate(grad_accs)
    )
    return new_accs, loss, metrics, logprobs


def evaluate_many(loras, params, batch, loss_config, *, config, loss_fn, remat=False):
    """:func:`evaluate` for ``K`` adapters at once (shapes as in :func:`accumulate_many`)."""
    fn = functools.partial(evaluate, config=config, loss_fn=loss_fn, remat=remat)
    return _per_adapter(fn, loras, params, batch, loss_config, with_grads=False)


def accumulate_pullback(grad_acc, pullback, cotangent):
    (grads,) = pullback(cotangent)
    return jax.tree.map(jnp.add, grad_acc, grads)


def optim_update(lora, opt_state, grad_acc, hparams):
    """Applies the accumulated gradients and resets the accumulator."""
    lora, opt_state, metrics = apply_optimizer(lora, opt_state, grad_acc, hparams)
    return lora, opt_state, jax.tree.map(jnp.zeros_like, grad_acc), metrics


_STATIC = ("config", "loss_fn", "remat")


class CompiledSteps:
    """Jitted train entry points for one adapter layout on one mesh, with explicit shardings.

    ``lora`` / ``opt`` / ``params`` are pytrees of shardings for the LoRA (and anything that mirrors
    it, like gradients), the optimizer state and the base params; ``batch`` shards batch-major
    arrays by rows, ``batch_many`` their ``[K, B, ...]`` stacks (``sharding.batch_sharding``);
    ``replicated`` is for scalars and per-token outputs. One program is compiled per (entry point,
    model config, loss, remat) and shape bucket.
    """

    def __init__(self, *, lora, opt, params, batch, batch_many, replicated):
        self._lora, self._params, self._replicated = lora, params, replicated
        self._batch_many = batch_many  # stacked [K, B, ...] batches of multi-adapter steps
        state_in = (lora, params, batch)
        self._shardings = {  # (in_shardings, out_shardings, donated argument indices)
            "accumulate": ((lora, *state_in, replicated), (lora, replicated, replicated, replicated), (0,)),
            "evaluate": ((*state_in, replicated), (replicated, replicated, replicated), ()),
            # A pullback's residuals have a layout only the compiler knows: it chooses them.
            "logprobs_with_pullback": (state_in, None, ()),
            "logits_with_pullback": (state_in, None, ()),
            "accumulate_pullback": (None, lora, (0,)),
            "optim_update": ((lora, opt, lora, replicated), (lora, opt, lora, replicated), (0, 1, 2)),
        }
        self._jitted: dict[tuple, Callable] = {}

    def _many_shardings(self, name: str, k: int) -> tuple:
        """Shardings of the K-adapter entry points: one per-adapter LoRA sharding per slot."""
        loras, rep = (self._lora,) * k, self._replicated
        if name == "accumulate_many":
            ins = (loras, loras, self._params, self._batch_many, rep, rep)
            return ins, (loras, rep, rep, rep), (0,)
        return (loras, self._params, self._batch_many, rep), (rep, rep, rep), ()

    def _program(self, name: str, k: int | None = None, **static) -> Callable:
        key = (name, k, *sorted(static.items()))
        if key not in self._jitted:
            ins, outs, donate = self._shardings[name] if k is None else self._many_shardings(name, k)
            fn = functools.partial(globals()[name], **static)
            kwargs = {"in_shardings": ins} if ins is not None else {}
            self._jitted[key] = jax.jit(fn, out_shardings=outs, donate_argnums=donate, **kwargs)
        return self._jitted[key]

    def compile_count(self, name: str) -> int:
        """Programs compiled so far for entry point ``name`` (all configs and losses)."""
        return sum(f._cache_size() for key, f in self._jitted.items() if key[0] == name)

    def accumulate(self, grad_acc, lora, params, batch, loss_config, *, config, loss_fn, remat=True):
        program = self._program("accumulate", config=config, loss_fn=loss_fn, remat=remat)
        return program(grad_acc, lora, params, batch, loss_config)

    def accumulate_many(
        self, grad_accs, loras, params, batch, loss_config, active, *, config, loss_fn, remat=True
    ):
        """K adapters in one program (see :func:`accumulate_many`); one compile per K and bucket."""
        program = self._program("accumulate_many", len(loras), config=config, loss_fn=loss_fn, remat=remat)
        return program(tuple(grad_accs), tuple(loras), params, batch, loss_config, active)

    def evaluate_many(self, loras, params, batch, loss_config, *, config, loss_fn, remat=False):
        program = self._program("evaluate_many", len(loras), config=config, loss_fn=loss_fn, remat=remat)
        return program(tuple(loras), params, batch, loss_config)

    def evaluate(self, lora, params, batch, loss_config, *, config, loss_fn, remat=False):
        return self._program("evaluate", config=config, loss_fn=loss_fn, remat=remat)(
            lora, params, batch, loss_config
        )

    def logprobs_with_pullback(self, lora, params, batch, *, config, remat=True):
        return self._program("logprobs_with_pullback", config=config, remat=remat)(lora, params, batch)

    def logits_with_pullback(self, lora, params, batch, *, config, remat=True):
        return self._program("logits_with_pullback", config=config, remat=remat)(lora, params, batch)

    def accumulate_pullback(self, grad_acc, pullback, cotangent):
        return self._program("accumulate_pullback")(grad_acc, pullback, cotangent)

    def optim_update(self, lora, opt_state, grad_acc, hparams):
        return self._program("optim_update")(lora, opt_state, grad_acc, hparams)
