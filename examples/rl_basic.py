"""Reinforcement learning with group-relative advantages and the ``importance_sampling`` loss.

Run: ``python examples/rl_basic.py [--iterations 16] [--loss ppo|gspo]`` (offline, tiny model, ~15 s on CPU).

Task, verifiable by a string compare: repeat the digit that ends the prompt, ``"qkx7"`` -> ``"7"``.
A few SFT steps give a policy that is right only sometimes; RL then raises the mean reward. Each
iteration samples a group of answers per prompt from the *current* adapter, scores them, uses
``reward - group mean`` as every answer token's advantage, and trains on the sampler's logprobs.
"""

from __future__ import annotations

import argparse
import random
import string
from collections.abc import Sequence
from typing import Any

import jtinker as tinker
from jtinker import types
from jtinker.quickstart import Codec, Example, quickstart_model_dir, sft_datum
from jtinker.trainer import group_advantages, rl_datum


def make_task(rng: random.Random) -> Example:
    letters = "".join(rng.choices(string.ascii_lowercase, k=3))
    digit = rng.choice(string.digits)
    return Example(prompt=f"{letters}{digit}", answer=digit)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warmup-steps", type=int, default=20, help="SFT steps before RL")
    parser.add_argument("--iterations", type=int, default=16)
    parser.add_argument("--prompts", type=int, default=32, help="prompts per iteration")
    parser.add_argument("--group-size", type=int, default=8, help="samples per prompt")
    parser.add_argument("--lr", type=float, default=1e-2)
    losses = ["importance_sampling", "ppo", "gspo"]
    parser.add_argument("--loss", choices=losses, default="importance_sampling")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    model_dir = quickstart_model_dir()
    service = tinker.ServiceClient()
    training = service.create_lora_training_client(base_model=str(model_dir), rank=16, seed=args.seed)
    codec = Codec(training.get_tokenizer(), model_dir)
    rng = random.Random(args.seed)
    adam = types.AdamParams(learning_rate=args.lr)
    gspo = args.loss == "gspo"  # GSPO takes the completion tokens as a sequence_ratio_mask

    # A short SFT warm start: RL needs some reward to start from, and a random policy gets ~none.
    for _ in range(args.warmup_steps):
        training.forward_backward([sft_datum(codec, make_task(rng)) for _ in range(32)], "cross_entropy")
        training.optim_step(adam)

    mean_rewards = []
    for it in range(args.iterations):
        # Sample from a snapshot of the current adapter: the policy is on-policy every iteration.
        sampler = training.save_weights_and_get_sampling_client()
        # One token is the whole answer, so the reward is simply "is that token the digit".
        params = types.SamplingParams(max_tokens=1, temperature=1.0, seed=rng.getrandbits(31))
        tasks = [make_task(rng) for _ in range(args.prompts)]
        prompts = [codec.prompt(t) for t in tasks]
        # Submit every request before waiting on any, so the engine batches them.
        futures = [sampler.sample(types.ModelInput.from_ints(p), args.group_size, params) for p in prompts]

        data, rewards = [], []
        for task, prompt, future in zip(tasks, prompts, futures, strict=True):
            sequences = future.result().sequences
            group = [float(codec.tokenizer.decode(list(s.tokens)) == task.answer) for s in sequences]
            rewards += group
            for seq, advantage in zip(sequences, group_advantages(group), strict=True):
                # All-equal groups have zero advantage everywhere: no signal, so skip them.
                if advantage != 0:
                    datum = rl_datum(prompt, seq.tokens, seq.logprobs, advantage, sequence_ratio_mask=gspo)
                    data.append(datum)
        mean_rewards.append(sum(rewards) / len(rewards))
        print(f"iter {it:2d}  mean reward {mean_rewards[-1]:.3f}  ({len(data)} trained sequences)")
        if data:
            training.forward_backward(data, args.loss)
            training.optim_step(adam)
    return {"mean_rewards": mean_rewards}


if __name__ == "__main__":
    main()
