"""Tinker's built-in token-level losses as pure JAX functions, plus config validation.

Every loss has the signature ``loss_fn(logprobs, inputs, config) -> (loss, metrics)``:

* ``logprobs``: learner target logprobs ``lp`` (f32), shape ``[B, T]``, or ``[B, T, K]`` for the
  multi-target form that Tinker accepts for ``cross_entropy`` and ``importance_sampling``.
* ``inputs``: the datum's ``loss_fn_inputs`` padded to the same shape, under Tinker's key names
  (``weights``, ``logprobs`` = sampler logprobs ``q``, ``advantages`` ``A``), plus ``mask``, a float
  ``[B, T]`` array that is 1 on real tokens and 0 on padding (positions with ``mask > 0`` are real).
  ``target_tokens`` is not passed: ``logprobs`` is already gathered at the targets. Optional
  ``segment_ids`` (int ``[B, T]``, unique per datum within a row) tells sequence-level losses which
  datum each position of a packed row belongs to; without it every row is one datum.
* ``config``: scalar hyperparameters, already merged with :data:`DEFAULT_CONFIG` by :func:`resolve`.
  Values may be Python floats or JAX scalars (so they can be traced arguments of a jitted step).

Token losses are summed, never averaged (Tinker: "we sum the token-level losses over the sequence
length"; any normalisation belongs in ``advantages``/``weights``). Padding contributes exactly 0 to the
loss and to the gradient, whatever the padded inputs hold. All metrics are sums (``:sum`` suffix), so
they add across micro-batches.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array
Metrics = dict[str, Array]
LossFn = Callable[[Array, Mapping[str, Array], Mapping[str, Any]], tuple[Array, Metrics]]

# Losses that accept [B, T, K] ("multi-target") tensors, per the Tinker docs.
MULTI_TARGET_LOSSES: frozenset[str] = frozenset({"cross_entropy", "importance_sampling"})

# Names in the newest SDK's LossFnType literal that jtinker refuses by name. Tinker publishes no definition
# of StableReinforce, nor of the "stability information" its sampler records; "custom" is handled by the
# engine (forward_backward_custom).
_KNOWN_UNSUPPORTED: dict[str, str] = {
    "stable_reinforce": "Tinker does not publish its definition; for off-policy data use 'ppo' or 'gspo'",
    "custom": "use forward_backward_custom",
}

# Inputs whose every value must be 0 or 1.
BINARY_INPUTS: frozenset[str] = frozenset({"sequence_ratio_mask"})


def _prepare(
    name: str, logprobs: Array, inputs: Mapping[str, Array], keys: tuple[str, ...]
) -> tuple[Array, Array, list[Array]]:
    """Return ``(valid, lp, [inputs...])`` with every padded position replaced by 0.

    Zeroing *before* any nonlinearity, not only masking the result: ``jnp.where`` on ``lp`` sends an
    exactly-zero cotangent to padded positions whatever happens downstream, and zeroing the other inputs
    keeps every intermediate finite (garbage such as ``lp - q = 1e4`` would make ``exp`` give ``inf`` and
    its backward pass ``0 * inf = nan``, tripping ``jax_debug_nans``).
    """
    lp = jnp.asarray(logprobs, jnp.float32)
    if lp.ndim == 3 and name not in MULTI_TARGET_LOSSES:
        raise ValueError(
            f"loss_fn={name!r} takes [B, T] logprobs; only {sorted(MULTI_TARGET_LOSSES)} accept [B, T, K]"
        )
    if lp.ndim not in (2, 3):
        raise ValueError(f"logprobs must have shape [B, T] or [B, T, K], got {lp.shape}")
    if "mask" not in inputs:
        raise ValueError("inputs must contain 'mask' (1 on real tokens, 0 on padding)")
    mask = jnp.asarray(inputs["mask"])
    if lp.ndim == 3 and mask.shape == lp.shape[:2]:
        valid = jnp.broadcast_to((mask > 0)[..., None], lp.shape)  # one mask per position covers all K
    elif mask.shape == lp.shape:
        valid = mask > 0
    else:
        raise ValueError(f"mask shape {mask.shape} does not match logprobs shape {lp.shape}")
    out = []
    for key in keys:
        if key not in inputs:
            raise ValueError(f"loss_fn={name!r} requires loss_fn_inputs[{key!r}]")
        x = jnp.asarray(inputs[key], jnp.float32)
        if x.shape != lp.shape:
            raise ValueError(
                f"loss_fn_inputs[{key!r}] shape {x.shape} does not match logprobs shape {lp.shape}"
            )
        out.append(jnp.where(valid, x, 0.0))
    return valid, jnp.where(valid, lp, 0.0), out


def _finish(valid: Array, token_loss: Array, **extra: Array) -> tuple[Array, Metrics]:
    loss = jnp.sum(jnp.where(valid, token_loss, 0.0))
    metrics: Metrics = {"loss:sum": loss}
    metrics.update({k: jnp.sum(jnp.where(valid, v, 0.0)).astype(jnp.float32) for k, v in extra.items()})
    return loss, metrics


def cross_entropy(
    logprobs: Array, inputs: Mapping[str, Array], config: Mapping[str, Any]
) -> tuple[Array, Metrics]:
    """``loss = sum(-lp * weights)``."""
    valid, lp, (w,) = _prepare("cross_entropy", logprobs, inputs, ("weights",))
    return _finish(valid, -lp * w)


def importance_sampling(
    logprobs: Array, inputs: Mapping[str, Array], config: Mapping[str, Any]
) -> tuple[Array, Metrics]:
    """``ratio = exp(lp - q)``; ``loss = -sum(ratio * A)`` (unbiased estimate of ``E_q[(p/q) A]``)."""
    valid, lp, (q, adv) = _prepare("importance_sampling", logprobs, inputs, ("logprobs", "advantages"))
    return _finish(valid, -jnp.exp(lp - q) * adv)


def _clipped_objective(ratio: Array, adv: Array, config: Mapping[str, Any]) -> tuple[Array, Array]:
    """PPO's token loss ``-min(ratio * A, clip(ratio, lo, hi) * A)``, and where its clipped branch wins."""
    lo, hi = config["clip_low_threshold"], config["clip_high_threshold"]
    unclipped = ratio * adv
    clipped = jnp.clip(ratio, lo, hi) * adv
    return -jnp.minimum(unclipped, clipped), (clipped < unclipped) & ((ratio < lo) | (ratio > hi))


def ppo(logprobs: Array, inputs: Mapping[str, Array], config: Mapping[str, Any]) -> tuple[Array, Metrics]:
    """``loss = -sum(min(ratio * A, clip(ratio, lo, hi) * A))`` with ``ratio = exp(lp - q)``.

    ``lo = config["clip_low_threshold"]`` and ``hi = config["clip_high_threshold"]`` are ratio bounds
    (defaults 0.8 / 1.2). Metric ``clipped:sum`` counts tokens whose clipped branch is the active one
    (their gradient is 0).
    """
    valid, lp, (q, adv) = _prepare("ppo", logprobs, inputs, ("logprobs", "advantages"))
    token_loss, is_clipped = _clipped_objective(jnp.exp(lp - q), adv, config)
    return _finish(valid, token_loss, **{"clipped:sum": is_clipped})


def cispo(logprobs: Array, inputs: Mapping[str, Array], config: Mapping[str, Any]) -> tuple[Array, Metrics]:
    """``loss = -sum(stop_gradient(clip(ratio, lo, hi)) * lp * A)`` with ``ratio = exp(lp - q)``.

    The clipped ratio is a constant weight, so every token keeps a REINFORCE gradient ``-w * A``
    (defaults ``lo = 0.0``, ``hi = 4.0``). Metric ``clipped:sum`` counts tokens whose ratio was clipped.
    """
    valid, lp, (q, adv) = _prepare("cispo", logprobs, inputs, ("logprobs", "advantages"))
    lo, hi = config["clip_low_threshold"], config["clip_high_threshold"]
    ratio = jnp.exp(lp - q)
    weight = jax.lax.stop_gradient(jnp.clip(ratio, lo, hi))
    is_clipped = (ratio < lo) | (ratio > hi)
    return _finish(valid, -weight * lp * adv, **{"clipped:sum": is_clipped})


def dro(logprobs: Array, inputs: Mapping[str, Array], config: Mapping[str, Any]) -> tuple[Array, Metrics]:
    """``loss = -sum(lp * A - 0.5 * beta * (lp - q)**2)``; ``beta = config["beta"]`` (required)."""
    valid, lp, (q, adv) = _prepare("dro", logprobs, inputs, ("logprobs", "advantages"))
    beta = config["beta"]
    return _finish(valid, -(lp * adv - 0.5 * beta * jnp.square(lp - q)))


def _per_sequence_sum(x: Array, inputs: Mapping[str, Array]) -> Array:
    """Each position's sum of ``x`` over its own datum (``segment_ids``; one datum a row without them)."""
    b, t = x.shape
    segments = inputs.get("segment_ids")
    if segments is None:
        return jnp.broadcast_to(jnp.sum(x, axis=1, keepdims=True), (b, t))
    flat = (jnp.arange(b)[:, None] * (t + 1) + jnp.asarray(segments, jnp.int32)).reshape(-1)
    sums = jax.ops.segment_sum(x.reshape(-1), flat, num_segments=b * (t + 1))
    return sums[flat].reshape(b, t)


def gspo(logprobs: Array, inputs: Mapping[str, Array], config: Mapping[str, Any]) -> tuple[Array, Metrics]:
    """GSPO-token (Zheng et al. 2025, "Group Sequence Policy Optimization", sec. 4.3), token-summed.

    Each datum's sequence ratio is ``s = exp(mean(lp - q))`` over the positions where
    ``sequence_ratio_mask`` is 1 (its sampled tokens). Every token's ratio ``r = sg(s) * exp(lp - sg(lp))``
    has the value ``s`` and the gradient ``s * grad(lp)``, and
    ``loss = -sum(min(r * A, clip(r, lo, hi) * A))``. With one advantage per sequence this is the paper's
    sequence-level GSPO times the sequence length (Tinker sums token losses; normalise in ``advantages``).
    Defaults ``lo = 1 - 3e-4``, ``hi = 1 + 4e-4`` are the paper's. Metric ``clipped:sum`` counts tokens whose
    clipped branch is the active one.
    """
    valid, lp, (q, adv, in_ratio) = _prepare(
        "gspo", logprobs, inputs, ("logprobs", "advantages", "sequence_ratio_mask")
    )
    log_ratio_sum = _per_sequence_sum(jax.lax.stop_gradient(lp - q) * in_ratio, inputs)
    count = _per_sequence_sum(in_ratio, inputs)
    seq_ratio = jnp.exp(log_ratio_sum / jnp.maximum(count, 1.0))  # 1 for a datum with no ratio positions
    token_ratio = seq_ratio * jnp.exp(lp - jax.lax.stop_gradient(lp))  # value s, gradient s * grad(lp)
    token_loss, is_clipped = _clipped_objective(token_ratio, adv, config)
    return _finish(valid, token_loss, **{"clipped:sum": is_clipped})


LOSSES: dict[str, LossFn] = {
    "cross_entropy": cross_entropy,
    "importance_sampling": importance_sampling,
    "ppo": ppo,
    "cispo": cispo,
    "dro": dro,
    "gspo": gspo,
}

_RL_INPUTS = ("target_tokens", "logprobs", "advantages")
REQUIRED_INPUTS: dict[str, tuple[str, ...]] = {
    "cross_entropy": ("target_tokens", "weights"),
    "importance_sampling": _RL_INPUTS,
    "ppo": _RL_INPUTS,
    "cispo": _RL_INPUTS,
    "dro": _RL_INPUTS,
    "gspo": (*_RL_INPUTS, "sequence_ratio_mask"),
}

DEFAULT_CONFIG: dict[str, dict[str, float]] = {
    "cross_entropy": {},
    "importance_sampling": {},
    # Tinker: "epsilon fixed to 0.2".
    "ppo": {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2},
    # Current cookbook default is one-sided (tutorials/202_loss_functions.py); older docs used 0.8/1.2.
    "cispo": {"clip_low_threshold": 0.0, "clip_high_threshold": 4.0},
    # Tinker documents beta only by example (0.05), with no default, so it is required.
    "dro": {},
    # The GSPO paper's clipping range (epsilon_left 3e-4, epsilon_right 4e-4): sequence ratios stay near 1.
    "gspo": {"clip_low_threshold": 1 - 3e-4, "clip_high_threshold": 1 + 4e-4},
}

# Keys with no default that the caller must supply.
REQUIRED_CONFIG_KEYS: dict[str, frozenset[str]] = {name: frozenset() for name in LOSSES} | {
    "dro": frozenset({"beta"})
}

ALLOWED_CONFIG_KEYS: dict[str, frozenset[str]] = {
    name: frozenset(DEFAULT_CONFIG[name]) | REQUIRED_CONFIG_KEYS[name] for name in LOSSES
}

_NOT_SCALAR = "loss_fn_config is for scalar hyperparameters; pass per-token tensors in loss_fn_inputs"


def _to_scalar(key: str, value: Any) -> float:
    """Convert one config value to a finite Python float, or raise ValueError naming the key."""
    if isinstance(value, bool | str | bytes):
        raise ValueError(f"loss_fn_config.{key} must be a number, got {type(value).__name__} {value!r}")
    if isinstance(value, numbers.Real):
        out = float(value)
    else:
        # Arrays/tensors of any library (numpy, jax, torch) expose ndim; sequences and mappings do not.
        ndim = getattr(value, "ndim", None)
        if ndim is None or ndim > 0:
            raise ValueError(f"loss_fn_config.{key}: {_NOT_SCALAR} (got {type(value).__name__})")
        try:
            out = float(value)
        except (TypeError, ValueError) as e:
            raise ValueError(f"loss_fn_config.{key} must be a real number, got {value!r}") from e
    if not math.isfinite(out):
        raise ValueError(f"loss_fn_config.{key} must be finite, got {out}")
    return out


def resolve(name: str, loss_fn_config: Mapping[str, Any] | None = None) -> tuple[LossFn, dict[str, float]]:
    """Look up built-in loss ``name`` and merge ``loss_fn_config`` over its defaults.

    Returns ``(loss_fn, config)`` with every config value a finite Python float. Raises ValueError
    naming ``loss_fn`` for an unknown loss and ``loss_fn_config.<key>`` for a bad key or value.
    """
    if name not in LOSSES:
        why = f" (not supported by jtinker: {_KNOWN_UNSUPPORTED[name]})" if name in _KNOWN_UNSUPPORTED else ""
        raise ValueError(f"loss_fn={name!r} is not a built-in loss{why}; expected one of {sorted(LOSSES)}")
    given = dict(loss_fn_config or {})
    allowed = ALLOWED_CONFIG_KEYS[name]
    merged = dict(DEFAULT_CONFIG[name])
    for key, value in given.items():
        # Scalar check first: a tensor under any key (Tinker issue tinker-feedback#53) gets the helpful
        # "use loss_fn_inputs" message rather than just "unknown key".
        scalar = _to_scalar(key, value)
        if key not in allowed:
            raise ValueError(
                f"loss_fn_config.{key} is not a hyperparameter of loss_fn={name!r}; "
                f"allowed keys: {sorted(allowed) or 'none'}"
            )
        merged[key] = scalar
    missing = sorted(REQUIRED_CONFIG_KEYS[name] - merged.keys())
    if missing:
        raise ValueError(f"loss_fn_config.{missing[0]} is required for loss_fn={name!r} (e.g. beta=0.05)")
    if "clip_low_threshold" in merged and merged["clip_low_threshold"] > merged["clip_high_threshold"]:
        raise ValueError(
            f"loss_fn_config.clip_low_threshold ({merged['clip_low_threshold']}) must not exceed "
            f"clip_high_threshold ({merged['clip_high_threshold']})"
        )
    return LOSSES[name], merged


__all__ = [
    "ALLOWED_CONFIG_KEYS",
    "BINARY_INPUTS",
    "DEFAULT_CONFIG",
    "LOSSES",
    "MULTI_TARGET_LOSSES",
    "REQUIRED_CONFIG_KEYS",
    "REQUIRED_INPUTS",
    "LossFn",
    "cispo",
    "cross_entropy",
    "dro",
    "gspo",
    "importance_sampling",
    "ppo",
    "resolve",
]
