"""A custom loss written in torch for SDK 0.38's ``create_custom_loss``, run by jtinker as JAX.

Run: ``python examples/torch_custom_loss.py [--steps 20]`` (offline, tiny model, ~10 s on CPU; needs
torch to trace the loss).

The loss is per datum, as the SDK defines it: ``fn(logprobs, *inputs) -> (loss, metrics)`` over the
datum's target logprobs and the ``loss_fn_inputs`` it names. Here it is a length-normalised NLL: each
answer counts the same however many tokens it has. ``create_custom_loss`` traces it with ``torch.fx``;
jtinker rebuilds the graph in JAX and ``forward_backward_custom`` differentiates it in one pass. With
``import tinker`` and ``tinker.ServiceClient(base_url=...)`` the same calls drive ``jtinker serve``: the
SDK uploads the loss and it runs on the server in one request.
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Sequence
from typing import Any

import torch

import jtinker as tinker
from jtinker import types
from jtinker.quickstart import Codec, make_example, make_splits, quickstart_model_dir, sft_datum


def mean_answer_nll(logprobs: torch.Tensor, weights: torch.Tensor):
    """The answer's mean token NLL (``weights`` mark its tokens)."""
    answer_tokens = weights.sum()
    nll = -(logprobs * weights).sum() / answer_tokens
    return nll, {"custom/nll:mean": nll, "custom/answer_tokens:sum": answer_tokens}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    model_dir = quickstart_model_dir()
    service = tinker.ServiceClient()
    training = service.create_lora_training_client(base_model=str(model_dir), rank=16, seed=args.seed)
    loss = service.create_custom_loss(mean_answer_nll, {"logprobs": 1, "weights": 1}).result()
    codec = Codec(training.get_tokenizer(), model_dir)
    train_dates, _ = make_splits(args.seed, eval_size=64)
    rng = random.Random(args.seed)

    history = []
    for step in range(args.steps):
        data = [sft_datum(codec, make_example(d)) for d in rng.sample(train_dates, args.batch_size)]
        out = training.forward_backward_custom(data, loss).result()
        training.optim_step(types.AdamParams(learning_rate=args.lr))
        history.append(out.metrics)
        if step % 5 == 0 or step == args.steps - 1:
            m = out.metrics
            nll, tokens = m["custom/nll:mean"], m["custom/answer_tokens:sum"]
            print(f"step {step:3d}  mean answer NLL {nll:.4f}  answer tokens {tokens:.0f}")
    return {"history": history}


if __name__ == "__main__":
    main()
