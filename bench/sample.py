"""Sampling throughput: jtinker's engine vs transformers ``generate`` on the same model files.

Greedy decoding, prompt 32 tokens, 64 new tokens, batch 1/8/64, on the ``small`` qwen3 tiny model
(f32, CPU). Compile time is measured separately (first call minus a warm call); steady-state
numbers are medians over ``--repeats`` timed runs after a warm-up. Writes JSON to ``--out``.

    python bench/sample.py [--batches 1 8 64] [--repeats 3] [--out bench_results/sample.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jtinker.models import load_pretrained, make_tiny  # noqa: E402
from jtinker.sampling import SampleRequest, Sampler  # noqa: E402


def model_dir(path: Path) -> Path:
    """The ``small`` qwen3 model, made once and cached (random weights, seed 0)."""
    if not (path / "config.json").is_file():
        make_tiny(path, family="qwen3", size="small")
    return path


def prompts(batch: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, min(vocab, 256), size=(batch, length)).tolist()


def timed(fn, repeats: int) -> tuple[float, list[float]]:
    """(first-call seconds, steady-state seconds per repeat)."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return first, times


def bench_jtinker(path: Path, batches, prompt_len: int, new_tokens: int, repeats: int) -> dict:
    config, params = load_pretrained(path)
    sampler = Sampler(config, params, max_batch=max(batches))
    out = {}
    for b in batches:
        # Distinct prompts, one sample each: the full prefill + decode batch of size b.
        reqs = [
            SampleRequest(prompt=p, num_samples=1, max_tokens=new_tokens, temperature=0.0)
            for p in prompts(b, prompt_len, config.vocab_size)
        ]

        def run(reqs=reqs):
            res = sampler.sample(reqs)
            assert all(len(r.sequences[0][0]) == new_tokens for r in res)

        first, times = timed(run, repeats)
        med = statistics.median(times)
        out[b] = {
            "seconds": med,
            "tokens_per_s": b * new_tokens / med,
            "compile_s": first - med,
            "times": times,
        }
        print(f"jtinker      batch {b:3d}: {b * new_tokens / med:9.1f} tok/s  ({med:.3f} s, compile {first - med:.2f} s)")
    return out


def bench_transformers(path: Path, batches, prompt_len: int, new_tokens: int, repeats: int, threads: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    vocab = model.config.vocab_size
    out = {}
    for b in batches:
        ids = torch.tensor(prompts(b, prompt_len, vocab))

        def run(ids=ids):
            with torch.inference_mode():
                res = model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    do_sample=False,
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,
                    pad_token_id=model.config.pad_token_id,
                )
            assert res.shape == (b, prompt_len + new_tokens)

        first, times = timed(run, repeats)
        med = statistics.median(times)
        out[b] = {"seconds": med, "tokens_per_s": b * new_tokens / med, "first_call_s": first, "times": times}
        print(f"transformers batch {b:3d}: {b * new_tokens / med:9.1f} tok/s  ({med:.3f} s)")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model-dir", type=Path, default=Path.home() / ".cache" / "jtinker" / "bench-qwen3-small")
    ap.add_argument("--out", type=Path, default=Path("bench_results/sample.json"))
    ap.add_argument("--skip-transformers", action="store_true")
    args = ap.parse_args()

    threads = os.cpu_count() or 1
    path = model_dir(args.model_dir)
    print(f"model {path}, jax {jax.__version__} on {jax.devices()[0].platform}, {threads} threads")
    ours = bench_jtinker(path, args.batches, args.prompt_len, args.new_tokens, args.repeats)
    theirs = {}
    if not args.skip_transformers:
        theirs = bench_transformers(path, args.batches, args.prompt_len, args.new_tokens, args.repeats, threads)
    ratios = {b: ours[b]["tokens_per_s"] / theirs[b]["tokens_per_s"] for b in theirs}
    for b, r in ratios.items():
        print(f"batch {b:3d}: jtinker / transformers = {r:.2f}x")

    result = {
        "model": "qwen3 small (make_tiny size='small'), f32",
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "threads": threads,
        "platform": platform.platform(),
        "jax": jax.__version__,
        "jtinker": ours,
        "transformers": theirs,
        "ratio": ratios,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
