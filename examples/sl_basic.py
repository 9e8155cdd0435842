"""Supervised fine-tuning (SFT) of a LoRA with the built-in ``cross_entropy`` loss.

Run: ``python examples/sl_basic.py [--steps 40]`` (offline, tiny model, a few seconds on CPU).

The task is the quickstart's date-format conversion (``"2024-03-15 -> "`` -> ``"15/03/2024"``).
Each datum is a next-token pair (inputs ``tokens[:-1]``, targets ``tokens[1:]``) with weight 0 on
prompt tokens, so only the answer is learned.
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Sequence
from typing import Any

import jtinker as tinker
from jtinker import types
from jtinker.quickstart import Codec, make_example, make_splits, quickstart_model_dir


def sft_datum(codec: Codec, example: Any) -> types.Datum:
    """Weight 0 on the prompt, 1 on the answer and its eos token."""
    prompt, answer = codec.prompt(example), codec.answer(example)
    tokens = prompt + answer
    weights = [0.0] * (len(prompt) - 1) + [1.0] * len(answer)
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": weights},
    )


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    model_dir = str(quickstart_model_dir())  # made once under $JTINKER_HOME/models, then reused
    service = tinker.ServiceClient()
    training = service.create_lora_training_client(base_model=model_dir, rank=16, seed=args.seed)
    codec = Codec(training.get_tokenizer(), quickstart_model_dir())
    train_dates, _ = make_splits(args.seed, eval_size=64)

    rng = random.Random(args.seed)
    losses = []
    for step in range(args.steps):
        batch = [make_example(d) for d in rng.sample(train_dates, args.batch_size)]
        fb = training.forward_backward([sft_datum(codec, e) for e in batch], "cross_entropy")
        # Submitted before fb resolves: calls on one client run in order, so this overlaps nicely.
        training.optim_step(types.AdamParams(learning_rate=args.lr))
        # The built-in losses are sums over tokens; divide by the weight-1 count for a per-token loss.
        n_tokens = sum(len(codec.answer(e)) for e in batch)
        losses.append(fb.result().metrics["loss:sum"] / n_tokens)
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  loss {losses[-1]:.4f}")
    return {"losses": losses, "first_loss": losses[0], "last_loss": losses[-1]}


if __name__ == "__main__":
    main()
