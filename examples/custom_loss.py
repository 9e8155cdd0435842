"""A custom loss on full logits, in one forward pass: cross-entropy plus an entropy bonus.

Run: ``python examples/custom_loss.py [--steps 30]`` (offline, tiny model, ~10 s on CPU).

``forward_backward_custom(data, loss_fn, loss_type_input="logits")`` hands ``loss_fn`` each datum's
``[N, V]`` f32 logits; the loss is any JAX function of them, differentiated through the same forward
pass (Tinker's SDK needs two passes and only sees target logprobs).
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

import jtinker as tinker
from jtinker import types
from jtinker.quickstart import Codec, make_example, make_splits, quickstart_model_dir, sft_datum


def make_loss_fn(entropy_coef: float):
    def loss_fn(data: list[types.Datum], logits_list: list[jax.Array]) -> tuple[jax.Array, dict]:
        total_ce, total_entropy, n_tokens = 0.0, 0.0, 0.0
        for datum, logits in zip(data, logits_list, strict=True):
            targets = jnp.asarray(datum.loss_fn_inputs["target_tokens"].to_numpy())
            weights = jnp.asarray(datum.loss_fn_inputs["weights"].to_numpy())
            logp = jax.nn.log_softmax(logits, axis=-1)
            ce = -jnp.take_along_axis(logp, targets[:, None], axis=-1)[:, 0]
            entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
            total_ce += jnp.sum(ce * weights)
            total_entropy += jnp.sum(entropy * weights)
            n_tokens += jnp.sum(weights)
        ce, entropy = total_ce / n_tokens, total_entropy / n_tokens
        # Subtracting entropy rewards keeping some probability mass spread (less overconfident).
        return ce - entropy_coef * entropy, {"ce": ce, "entropy": entropy}

    return loss_fn


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--entropy-coef", type=float, default=0.01)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    model_dir = quickstart_model_dir()
    service = tinker.ServiceClient()
    training = service.create_lora_training_client(base_model=str(model_dir), rank=16, seed=args.seed)
    codec = Codec(training.get_tokenizer(), model_dir)
    train_dates, _ = make_splits(args.seed, eval_size=64)
    rng = random.Random(args.seed)
    loss_fn = make_loss_fn(args.entropy_coef)

    losses = []
    for step in range(args.steps):
        data = [sft_datum(codec, make_example(d)) for d in rng.sample(train_dates, args.batch_size)]
        out = training.forward_backward_custom(data, loss_fn, loss_type_input="logits").result()
        training.optim_step(types.AdamParams(learning_rate=args.lr))
        losses.append(out.metrics["loss:sum"])
        if step % 10 == 0 or step == args.steps - 1:
            m = out.metrics
            print(f"step {step:3d}  loss {m['loss:sum']:.4f}  ce {m['ce']:.4f}  entropy {m['entropy']:.4f}")
    return {"losses": losses, "first_loss": losses[0], "last_loss": losses[-1]}


if __name__ == "__main__":
    main()
