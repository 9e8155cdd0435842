"""Direct Preference Optimization (DPO) through ``forward_backward_custom`` and ``jtinker.losses.dpo_loss``.

Run: ``python examples/dpo.py [--steps 15]`` (offline, tiny model, ~15 s on CPU).

Preference pairs come from the quickstart's date task: the chosen answer is the correct date, the
rejected one the same date with day and month swapped. Reference logprobs come from the base model
(a ``SamplingClient`` with no adapter); the policy's are the target logprobs handed to the custom loss.
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
from jtinker.losses import dpo_loss
from jtinker.quickstart import Codec, Example, make_example, make_splits, quickstart_model_dir
from jtinker.trainer import full_sequence, sequence_logprob


def pair_data(
    codec: Codec, chosen: Example, rejected: Example
) -> tuple[list[types.Datum], list[list[float]]]:
    """Two data (chosen, rejected); each datum's ``weights`` mark its answer tokens."""
    data, masks = [], []
    for ex in (chosen, rejected):
        prompt, answer = codec.prompt(ex), codec.answer(ex)
        tokens = prompt + answer
        mask = [0.0] * (len(prompt) - 1) + [1.0] * len(answer)
        data.append(
            types.Datum(
                model_input=types.ModelInput.from_ints(tokens[:-1]),
                loss_fn_inputs={"target_tokens": tokens[1:], "weights": mask},
            )
        )
        masks.append(mask)
    return data, masks


def make_dpo_loss(masks: list[list[float]], ref_chosen: jax.Array, ref_rejected: jax.Array, beta: float):
    """A ``forward_backward_custom`` loss over data that alternate chosen, rejected."""

    def loss_fn(data: list[types.Datum], logprobs_list: list[jax.Array]) -> tuple[jax.Array, dict]:
        # Sequence logprob = the sum of its answer-token logprobs (the mask zeroes the prompt).
        seq = jnp.stack([jnp.sum(lp * jnp.asarray(m)) for lp, m in zip(logprobs_list, masks, strict=True)])
        return dpo_loss(seq[0::2], seq[1::2], ref_chosen, ref_rejected, beta=beta)

    return loss_fn


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--pairs", type=int, default=16, help="preference pairs per step")
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    model_dir = quickstart_model_dir()
    service = tinker.ServiceClient()
    training = service.create_lora_training_client(base_model=str(model_dir), rank=16, seed=args.seed)
    reference = service.create_sampling_client(base_model=str(model_dir))  # no adapter: the base model
    codec = Codec(training.get_tokenizer(), model_dir)
    train_dates, _ = make_splits(args.seed, eval_size=64)
    rng = random.Random(args.seed)

    history = []
    for step in range(args.steps):
        data, masks = [], []
        for date in rng.sample([d for d in train_dates if d.day != d.month], args.pairs):
            chosen = make_example(date)
            rejected = Example(chosen.prompt, date.strftime("%m/%d/%Y"))  # a plausible wrong answer
            d, m = pair_data(codec, chosen, rejected)
            data += d
            masks += m
        # Submit every reference request before waiting on any, so the engine batches them.
        futures = [reference.compute_logprobs(full_sequence(d)) for d in data]
        ref = [sequence_logprob(f.result(), m) for f, m in zip(futures, masks, strict=True)]
        ref_chosen, ref_rejected = jnp.array(ref[0::2]), jnp.array(ref[1::2])

        loss_fn = make_dpo_loss(masks, ref_chosen, ref_rejected, args.beta)
        metrics = training.forward_backward_custom(data, loss_fn).result().metrics
        training.optim_step(types.AdamParams(learning_rate=args.lr))
        history.append({k: float(metrics[k]) for k in ("dpo_loss", "accuracy", "margin")})
        print(f"step {step:2d}  " + "  ".join(f"{k} {v:.3f}" for k, v in history[-1].items()))
    return {"history": history}


if __name__ == "__main__":
    main()
