"""A GRPO training step: groups of completions that share their prompt, with and without shared prefixes.

    python bench/grpo.py [--groups 4] [--group-size 8] [--prompt 256] [--steps 4] [--skip-torch] [--out FILE]

Each step is ``forward_backward`` (``importance_sampling``: a GRPO batch's loss) + ``optim_step`` on
``--groups`` prompts of ``--prompt`` tokens with ``--group-size`` completions of 32 to 128 tokens each,
rank-32 LoRA on all linear layers of the small Qwen3, f32. jtinker runs it twice on one model: with
prefix sharing (each prompt computed once, the default) and without (every datum whole, as every
other open backend does). torch+PEFT runs the same datums padded to the longest. Steps alternate
between the two jtinker engines so machine load hits both alike; medians after one warm-up step each.
Tokens/s counts the datums' tokens.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
from train import LINEAR_TARGETS
from workload import resolve_model


def make_groups(groups: int, size: int, prompt: int, vocab: int, seed: int) -> list[np.ndarray]:
    """``groups * size`` sequences: a shared prompt and a completion of 32 to 128 tokens each."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(groups):
        head = rng.integers(0, min(vocab, 256), prompt)
        out += [
            np.concatenate([head, rng.integers(0, min(vocab, 256), rng.integers(32, 129))])
            for _ in range(size)
        ]
    return out


def rl_inputs(seq: np.ndarray, prompt: int, seed: int) -> dict[str, np.ndarray]:
    """Sampler logprobs and a group-relative advantage on the completion's tokens (0 on the prompt)."""
    rng = np.random.default_rng(seed)
    n = len(seq) - 1
    completion = np.arange(n) >= prompt - 1
    return {
        "target_tokens": seq[1:].astype(np.int64),
        "logprobs": np.where(completion, rng.normal(-2.0, 0.3, n), 0.0).astype(np.float32),
        "advantages": np.where(completion, rng.normal(0.0, 1.0), 0.0).astype(np.float32),
    }


def bench_jtinker(model_dir: Path, seqs: list, prompt: int, rank: int, steps: int) -> dict:
    from jtinker import engine, train, types

    data = [
        types.Datum(
            model_input=types.ModelInput.from_ints(s[:-1].tolist()), loss_fn_inputs=rl_inputs(s, prompt, i)
        )
        for i, s in enumerate(seqs)
    ]
    hparams = train.AdamHyperparams.create(learning_rate=1e-5)
    runs = {}
    for share in (True, False):
        base = engine.BaseModel("grpo", model_dir, share_prefixes=share)
        spec = engine.LoraSpec(rank=rank, seed=0, train_unembed=False)
        adapter = base.worker.submit(lambda b=base, s=spec: b.new_adapter(s)).result()
        runs[share] = (base, adapter)

    def step(share: bool) -> tuple[float, float]:
        base, adapter = runs[share]

        def work():
            _, metrics = adapter.forward_backward(data, "importance_sampling", None, backward=True)
            adapter.optim_step(hparams)
            return metrics["loss:sum"]

        t = time.perf_counter()
        loss = base.worker.submit(work, adapter=adapter).result()
        return time.perf_counter() - t, loss

    first = {share: step(share)[0] for share in runs}
    times: dict[bool, list[float]] = {True: [], False: []}
    losses: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(steps):
        for share in runs:
            seconds, loss = step(share)
            times[share].append(seconds)
            losses[share].append(loss)
    shapes = {}
    for share, (_, adapter) in runs.items():
        batches = adapter._host_batches(data, "importance_sampling")  # micro-batches
        shapes[share] = [list((host.batch.shared or host.batch).tokens.shape) for _, host in batches]
    for base, _ in runs.values():
        base.worker.close()
    return {
        name: {
            "step_s": statistics.median(times[share]),
            "first_step_s": first[share],
            "times": times[share],
            "losses": losses[share],
            "model_rows": shapes[share],
        }
        for name, share in (("shared", True), ("unshared", False))
    }


def bench_torch(model_dir: Path, seqs: list, prompt: int, rank: int, steps: int) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=32, target_modules=LINEAR_TARGETS))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.0)
    width = max(len(s) for s in seqs) - 1
    ids, mask, targets, old, adv = (
        np.zeros((len(seqs), width), dt) for dt in (np.int64, np.int64, np.int64, np.float32, np.float32)
    )
    for i, s in enumerate(seqs):
        n, inputs = len(s) - 1, rl_inputs(s, prompt, i)
        ids[i, :n], mask[i, :n], targets[i, :n] = s[:-1], 1, inputs["target_tokens"]
        old[i, :n], adv[i, :n] = inputs["logprobs"], inputs["advantages"]
    ids, mask, targets, old, adv = map(torch.from_numpy, (ids, mask, targets, old, adv))
    times = []
    for _ in range(steps + 1):
        t = time.perf_counter()
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        logprobs = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
        loss = -(torch.exp(logprobs - old) * adv * mask).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - t)
    return {"step_s": statistics.median(times[1:]), "first_step_s": times[0], "times": times[1:]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=None, help="HF model dir (default: the small Qwen3)")
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("bench_results/grpo.json"))
    args = parser.parse_args(argv)

    from jtinker import hostmem  # noqa: F401  (before any JAX or torch work: see jtinker/hostmem.py)
    from jtinker.models import ModelConfig

    model_dir = resolve_model(args.model)
    config = ModelConfig.from_pretrained(model_dir)
    seqs = make_groups(args.groups, args.group_size, args.prompt, config.vocab_size, seed=0)
    tokens = sum(len(s) - 1 for s in seqs)
    ours = bench_jtinker(model_dir, seqs, args.prompt, args.rank, args.steps)
    result = {
        "benchmark": "grpo",
        "model": str(model_dir),
        "groups": args.groups,
        "group_size": args.group_size,
        "prompt": args.prompt,
        "completion_tokens": [32, 128],
        "rank": args.rank,
        "tokens": tokens,
        **{f"jtinker_{name}": run | {"tokens_per_s": tokens / run["step_s"]} for name, run in ours.items()},
        "sharing_speedup": ours["unshared"]["step_s"] / ours["shared"]["step_s"],
    }
    print(
        f"GRPO step, {args.groups} x {args.group_size} sequences ({tokens} tokens): shared prefixes "
        f"{result['jtinker_shared']['tokens_per_s']:.0f} tokens/s, unshared "
        f"{result['jtinker_unshared']['tokens_per_s']:.0f} ({result['sharing_speedup']:.2f}x)"
    )
    if not args.skip_torch:
        theirs = bench_torch(model_dir, seqs, args.prompt, args.rank, args.steps)
        result["torch"] = theirs | {"tokens_per_s": tokens / theirs["step_s"]}
        result["speedup_vs_torch"] = theirs["step_s"] / ours["shared"]["step_s"]
        print(
            f"torch+PEFT: {result['torch']['tokens_per_s']:.0f} tokens/s ({result['speedup_vs_torch']:.2f}x)"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
