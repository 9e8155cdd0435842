"""Direct Preference Optimization on per-sequence summed logprobs (for ``forward_backward_custom``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def dpo_loss(
    chosen_logprobs: Array,
    rejected_logprobs: Array,
    ref_chosen_logprobs: Array,
    ref_rejected_logprobs: Array,
    beta: float = 0.1,
    *,
    pair_mask: Array | None = None,
) -> tuple[Array, dict[str, Array]]:
    """Standard DPO: ``loss = -mean(log_sigmoid(beta * ((pc - rc) - (pr - rr))))``.

    Inputs are ``[N]`` arrays of sequence logprobs (token logprobs summed over the completion): policy
    chosen ``pc`` / rejected ``pr`` and reference chosen ``rc`` / rejected ``rr``. Unlike the built-in
    token losses this one is a MEAN over pairs, as in the DPO paper and the tinker-cookbook's
    ``train_dpo``; scale by N if a sum is wanted. Reference logprobs are constants (stop_gradient).

    ``pair_mask`` (optional ``[N]``, 1 = real pair) lets padded pairs in a fixed-shape batch be ignored;
    means are then over real pairs only.

    Metrics (all means over pairs): ``dpo_loss``; ``accuracy``, the fraction with
    ``chosen_reward > rejected_reward``; ``margin = chosen_reward - rejected_reward``; ``chosen_reward =
    beta * (pc - rc)``; ``rejected_reward = beta * (pr - rr)``.
    """
    pc = jnp.asarray(chosen_logprobs, jnp.float32)
    pr = jnp.asarray(rejected_logprobs, jnp.float32)
    rc = jax.lax.stop_gradient(jnp.asarray(ref_chosen_logprobs, jnp.float32))
    rr = jax.lax.stop_gradient(jnp.asarray(ref_rejected_logprobs, jnp.float32))
    shapes = {pc.shape, pr.shape, rc.shape, rr.shape}
    if len(shapes) != 1 or pc.ndim != 1:
        raise ValueError(f"dpo_loss expects four [N] arrays of the same shape, got {sorted(shapes)}")
    if pair_mask is None:
        valid = jnp.ones(pc.shape, bool)
    else:
        valid = jnp.asarray(pair_mask) > 0
        if valid.shape != pc.shape:
            raise ValueError(f"pair_mask shape {valid.shape} does not match logprobs shape {pc.shape}")
    # Zero padded pairs before the nonlinearity so garbage there cannot produce nan gradients.
    pc, pr, rc, rr = (jnp.where(valid, x, 0.0) for x in (pc, pr, rc, rr))
    n = jnp.maximum(jnp.sum(valid), 1).astype(jnp.float32)

    def mean(x: Array) -> Array:
        return jnp.sum(jnp.where(valid, x, 0.0)) / n

    chosen_reward = beta * (pc - rc)
    rejected_reward = beta * (pr - rr)
    margin = chosen_reward - rejected_reward
    loss = mean(-jax.nn.log_sigmoid(margin))
    metrics = {
        "dpo_loss": loss,
        "accuracy": mean((margin > 0).astype(jnp.float32)),
        "margin": mean(margin),
        "chosen_reward": mean(chosen_reward),
        "rejected_reward": mean(rejected_reward),
    }
    return loss, metrics


__all__ = ["dpo_loss"]
