"""Sampling throughput: jtinker's engine vs transformers ``generate`` on the same model files.

Greedy decoding of ``--new-tokens`` (64) after a ``--prompt-len`` (32) prompt, batch 1/8/64, on the
``small`` qwen3 model from ``make_tiny`` (random weights, f32, CPU). Tokens/s counts generated
tokens over the wall time of the whole call (prefill included).

transformers runs in a separate worker process: XLA's and torch's CPU thread pools spin-wait and
slow each other down badly when they share a process. The two engines are timed *interleaved*
(jtinker, transformers, jtinker, ...) so load from other processes hits both alike. Compile time
is reported separately (first call minus the steady-state median); steady-state numbers are
medians over ``--repeats`` runs after one warm-up run. The sampler's prefix cache is off for this
comparison: the runs repeat their prompts, and transformers keeps nothing between calls.

Multi-turn episodes (``--turns`` 4, 0: skip) measure the prefix cache: batch 8, each turn samples
``--turn-tokens`` (32) tokens at temperature 1 and appends them plus as many new "user" tokens to
the prompt (128 tokens at first), so turn ``t``'s prompt extends turn ``t - 1``'s sequence. jtinker
with its prefix cache vs without it, episodes interleaved, medians over ``--repeats`` episodes of
fresh prompts after two warm-up episodes (which compile every bucket).

Scoring (``--score-groups`` 4, 0: skip) measures a GRPO-shaped ``compute_logprobs`` burst: groups
of 8 sequences, each a shared 128-token prompt plus its own completion of 32 to 128 tokens, scored
in one call as the client sends them (prompt logprobs, one sampled token). With the prefix cache each
group's prompt is prefilled once; without it every sequence is prefilled whole. Fresh sequences
each repeat. Writes JSON to ``--out``.

    python bench/sample.py [--batches 1 8 64] [--repeats 5] [--turns 4] [--out bench_results/sample.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

DEFAULT_MODEL_DIR = Path.home() / ".cache" / "jtinker" / "bench-qwen3-small"


def model_dir(path: Path) -> Path:
    """The ``small`` qwen3 model, made once and cached (random weights, seed 0)."""
    if not (path / "config.json").is_file():
        from jtinker.models import make_tiny

        make_tiny(path, family="qwen3", size="small")
    return path


def make_prompts(batch: int, length: int, seed: int = 0) -> list[list[int]]:
    import numpy as np

    return np.random.default_rng(seed + batch).integers(0, 256, size=(batch, length)).tolist()


def transformers_worker(
    conn, path: str, threads: int, prompt_len: int, new_tokens: int, omp_wait_policy: str
) -> None:
    """Serves ``("run", batch) -> seconds`` requests over ``conn`` with HF ``generate``."""
    # libgomp reads this when torch loads it. Spin-waiting (the default) collapses torch's
    # throughput by up to 10x whenever another process competes for the cores.
    os.environ["OMP_WAIT_POLICY"] = omp_wait_policy
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    conn.send(("ready", torch.__version__))
    while True:
        msg = conn.recv()
        if msg[0] == "stop":
            return
        ids = torch.tensor(make_prompts(msg[1], prompt_len))
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,  # no early EOS: the same work as jtinker
                pad_token_id=model.config.pad_token_id,
            )
        elapsed = time.perf_counter() - t0
        assert out.shape == (msg[1], prompt_len + new_tokens)
        conn.send(("done", elapsed))


def multi_turn(config, params, args) -> dict:
    """Episodes of ``args.turns`` turns, with the prefix cache and without it (see the module doc)."""
    import numpy as np

    from jtinker.sampling import Sampler, SampleRequest

    batch, first, new = 8, 128, args.turn_tokens
    samplers = {"cached": Sampler(config, params), "uncached": Sampler(config, params, prefix_cache_bytes=0)}

    def episode(sampler, seed: int) -> float:
        rng = np.random.default_rng(1000 + seed)
        prompts = [rng.integers(0, 256, first).tolist() for _ in range(batch)]
        t0 = time.perf_counter()
        for _ in range(args.turns):
            reqs = [
                SampleRequest(prompt=p, num_samples=1, max_tokens=new, temperature=1.0, seed=i)
                for i, p in enumerate(prompts)
            ]
            out = sampler.sample(reqs)
            prompts = [
                p + r.sequences[0][0] + rng.integers(0, 256, new).tolist()
                for p, r in zip(prompts, out, strict=True)
            ]
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {name: [] for name in samplers}
    for seed in range(2 + args.repeats):
        for name, sampler in samplers.items():
            elapsed = episode(sampler, seed)
            if seed >= 2:
                times[name].append(elapsed)
    cached, uncached = (statistics.median(times[name]) for name in ("cached", "uncached"))
    tokens = batch * new * args.turns
    print(
        f"multi-turn ({args.turns} turns, batch {batch}): "
        f"prefix cache {tokens / cached:.1f} tok/s ({cached:.2f} s)"
        f" | none {tokens / uncached:.1f} tok/s ({uncached:.2f} s) | ratio {uncached / cached:.2f}x",
        flush=True,
    )
    return {
        "turns": args.turns,
        "batch": batch,
        "first_prompt_len": first,
        "turn_tokens": new,
        "cached": {"seconds": cached, "tokens_per_s": tokens / cached, "times": times["cached"]},
        "uncached": {"seconds": uncached, "tokens_per_s": tokens / uncached, "times": times["uncached"]},
        "ratio": uncached / cached,
        "hit_tokens": samplers["cached"].prefix_cache.hit_tokens,
    }


def scoring(config, params, args) -> dict:
    """A GRPO-shaped scoring burst, with the prefix cache and without it (see the module doc)."""
    import numpy as np

    from jtinker.sampling import Sampler, SampleRequest

    size, prompt_len = 8, 128
    samplers = {"cached": Sampler(config, params), "uncached": Sampler(config, params, prefix_cache_bytes=0)}

    def burst(seed: int) -> list:
        rng = np.random.default_rng(2000 + seed)
        sequences = []
        for _ in range(args.score_groups):
            prompt = rng.integers(0, 256, prompt_len).tolist()
            sequences += [prompt + rng.integers(0, 256, rng.integers(32, 129)).tolist() for _ in range(size)]
        return [
            SampleRequest(
                prompt=x, num_samples=1, max_tokens=1, temperature=1.0, include_prompt_logprobs=True
            )
            for x in sequences
        ]

    times: dict[str, list[float]] = {name: [] for name in samplers}
    for seed in range(2 + args.repeats):
        requests = burst(seed)
        for name, sampler in samplers.items():
            t0 = time.perf_counter()
            sampler.sample(requests)
            if seed >= 2:
                times[name].append(time.perf_counter() - t0)
    tokens = sum(len(r.prompt) for r in requests)
    cached, uncached = (statistics.median(times[name]) for name in ("cached", "uncached"))
    print(
        f"scoring ({args.score_groups} groups of {size}): prefix cache {tokens / cached:.1f} tok/s "
        f"({cached:.2f} s) | none {tokens / uncached:.1f} tok/s ({uncached:.2f} s)"
        f" | ratio {uncached / cached:.2f}x",
        flush=True,
    )
    return {
        "groups": args.score_groups,
        "group_size": size,
        "prompt_len": prompt_len,
        "cached": {"seconds": cached, "tokens_per_s": tokens / cached, "times": times["cached"]},
        "uncached": {"seconds": uncached, "tokens_per_s": tokens / uncached, "times": times["uncached"]},
        "ratio": uncached / cached,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    ap.add_argument("--out", type=Path, default=Path("bench_results/sample.json"))
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--turns", type=int, default=4, help="multi-turn episode length (0: skip)")
    ap.add_argument("--turn-tokens", type=int, default=32)
    ap.add_argument("--score-groups", type=int, default=4, help="groups in the scoring burst (0: skip)")
    ap.add_argument(
        "--omp-wait-policy",
        default="PASSIVE",
        help="OMP_WAIT_POLICY for the transformers worker (PASSIVE is robust to a loaded machine)",
    )
    args = ap.parse_args()

    threads = len(os.sched_getaffinity(0))
    path = model_dir(args.model_dir)

    worker = conn = None
    torch_version = None
    if not args.skip_transformers:
        conn, child = mp.get_context("spawn").Pipe()
        worker = mp.get_context("spawn").Process(
            target=transformers_worker,
            args=(child, str(path), threads, args.prompt_len, args.new_tokens, args.omp_wait_policy),
            daemon=True,
        )
        worker.start()
        _, torch_version = conn.recv()

        def run_hf(batch: int) -> float:
            conn.send(("run", batch))
            return conn.recv()[1]

    import jax

    from jtinker.models import load_pretrained
    from jtinker.sampling import Sampler, SampleRequest

    print(f"model {path}, jax {jax.__version__} ({jax.devices()[0].platform}), {threads} threads")
    config, params = load_pretrained(path)
    sampler = Sampler(config, params, max_batch=max(args.batches), prefix_cache_bytes=0)

    def run_jt(batch: int) -> float:
        reqs = [
            SampleRequest(prompt=p, num_samples=1, max_tokens=args.new_tokens, temperature=0.0)
            for p in make_prompts(batch, args.prompt_len)
        ]
        t0 = time.perf_counter()
        res = sampler.sample(reqs)
        elapsed = time.perf_counter() - t0
        assert all(len(r.sequences[0][0]) == args.new_tokens for r in res)
        return elapsed

    results: dict = {"jtinker": {}, "transformers": {}, "ratio": {}}
    for b in args.batches:
        tokens = b * args.new_tokens
        first = run_jt(b)  # compiles
        run_jt(b)  # warm-up
        if worker:
            run_hf(b)  # warm-up
        jt_times, hf_times = [], []
        for _ in range(args.repeats):
            jt_times.append(run_jt(b))
            if worker:
                hf_times.append(run_hf(b))
        jt = statistics.median(jt_times)
        results["jtinker"][b] = {
            "seconds": jt,
            "tokens_per_s": tokens / jt,
            "compile_s": max(first - jt, 0.0),
            "times": jt_times,
        }
        line = f"batch {b:3d}: jtinker {tokens / jt:8.1f} tok/s ({jt:.3f} s; compile {first - jt:.1f} s)"
        if worker:
            hf = statistics.median(hf_times)
            results["transformers"][b] = {"seconds": hf, "tokens_per_s": tokens / hf, "times": hf_times}
            results["ratio"][b] = hf / jt
            line += f" | transformers {tokens / hf:8.1f} tok/s ({hf:.3f} s) | ratio {hf / jt:.2f}x"
        print(line, flush=True)
    if worker:
        conn.send(("stop",))
        worker.join(timeout=10)
    if args.turns:
        results["multi_turn"] = multi_turn(config, params, args)
    if args.score_groups:
        results["scoring"] = scoring(config, params, args)

    results.update(
        model="qwen3 'small' from make_tiny (8 layers, hidden 512, vocab 8192), f32, random weights",
        prompt_len=args.prompt_len,
        new_tokens=args.new_tokens,
        repeats=args.repeats,
        threads=threads,
        platform=platform.platform(),
        processor=platform.processor(),
        jax=jax.__version__,
        torch=torch_version,
        omp_wait_policy=args.omp_wait_policy,
        load_average=os.getloadavg(),
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
