"""Peak memory of LoRA training: jtinker vs its analytic size and vs torch + PEFT, in the same run.

    python bench/memory.py [--model DIR] [--batch 8] [--seq 128] [--rank 32] [--steps 3] [--out FILE]

Each side trains in its own fresh subprocess (rank-32 LoRA on q, k, v, o, gate, up, down; f32;
AdamW; summed token cross-entropy; ``--batch`` x ``--seq`` tokens per step, as bench/train.py):

* ``jtinker``: the in-process Tinker API (``create_lora_training_client`` / ``forward_backward`` /
  ``optim_step``) with jtinker's defaults (no rematerialisation);
* ``jtinker_remat``: the same with ``JTINKER_REMAT=1`` (layer activations recomputed in backward);
* ``torch``: transformers + PEFT, the same model files, data and optimizer.

Peak RSS is ``getrusage(RUSAGE_SELF).ru_maxrss``. Each worker first imports its stack (and starts
the JAX backend) and records that peak as its *baseline* (interpreter + imports); the figure compared
with the analytic size is ``peak - baseline``. Both are reported. The peak is also taken per phase
(load; first step, which for jtinker includes XLA compilation; steady steps) by resetting the kernel's
high-water mark between phases (``/proc/self/clear_refs``), so compiler memory can be told apart.

Analytic size (4 bytes per f32 element). ``N = B * T`` tokens as jtinker pads them (``B``: batch
rounded up to its bucket, ``T``: seq rounded up to its length bucket; 8 x 128 needs no padding),
``L`` layers, ``H`` hidden size, ``I`` MLP size, ``q = heads * head_dim``, ``kv = kv_heads * head_dim``,
``nH`` heads, ``r`` rank:

* base weights: ``config.param_count()`` (a tied embedding counted once);
* LoRA: ``P = L * r * sum(in + out)`` over the 7 adapted linears, i.e.
  ``L * r * (6H + 2q + 2kv + 3I)`` (q: H->q, k, v: H->kv, o: q->H, gate, up: H->I, down: I->H);
* gradient accumulator: ``P``;  Adam moments: ``2P``;
* activations the backward keeps, per token and layer (no rematerialisation)::

      4H          input and output of both RMSNorms (x, norm(x), x', norm(x'))
      q + kv      q and k before the per-head QK-norm (Qwen3 only, else 0)
      q + 2kv     q, k, v as attention reads them (after RoPE)
      nH * T      softmax probabilities (one row of T keys per head)
      q           attention output (o_proj's input)
      3I          gate, up and silu(gate) * up (down_proj's input)
      7r          LoRA's ``x @ A`` for each adapted linear (the gradient of B needs it)

  plus ``2H`` per token for the final norm, so ``N * (L * per_layer + 2H)`` elements. The chunked
  unembedding is rematerialised and keeps nothing beyond the final hidden states; one chunk's
  logits (``B * min(T, 128) * V``) live only transiently and are reported, not counted.

With ``--jax-analysis`` (default) the jtinker worker also reports, after its measured phases, what
JAX actually saves for the backward (``saved_residuals``) and XLA's buffer assignment for the
compiled ``forward_backward`` program (``memory_analysis``): where the measured peak comes from.
Writes JSON to ``--out`` (default bench_results/memory.json).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from workload import add_workload_args, make_datums, make_rows, resolve_model

LINEAR_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MB = 2**20
TARGET_RATIO = 2.0  # issue #9: peak RSS <= 2x the analytic size


# --------------------------------------------------------------------------------------------------
# Analytic size


def lora_shapes(config) -> dict[str, tuple[int, int]]:
    h, i, q, kv = config.hidden_size, config.intermediate_size, config.q_size, config.kv_size
    return {
        "q_proj": (h, q),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (q, h),
        "gate_proj": (h, i),
        "up_proj": (h, i),
        "down_proj": (i, h),
    }


def activation_elements_per_token_layer(config, seq: int, rank: int) -> dict[str, int]:
    """The per-token, per-layer terms of the docstring's activation formula (f32 elements)."""
    h, i, q, kv = config.hidden_size, config.intermediate_size, config.q_size, config.kv_size
    return {
        "norm inputs/outputs (4H)": 4 * h,
        "q, k before QK-norm (q + kv)": (q + kv) if config.qk_norm else 0,
        "q, k, v after RoPE (q + 2kv)": q + 2 * kv,
        "softmax probs (nH*T)": config.num_heads * seq,
        "attention output (q)": q,
        "MLP gate, up, act (3I)": 3 * i,
        "LoRA x@A (7r)": len(LINEAR_TARGETS) * rank,
    }


def analytic(config, batch: int, seq: int, rank: int, bytes_per: int = 4) -> dict:
    """Bytes of every term of the analytic size (see the module docstring)."""
    from jtinker.batching import batch_bucket, length_bucket

    batch, seq = batch_bucket(batch), length_bucket(seq)  # the shapes jtinker actually runs
    lora = config.num_layers * rank * sum(a + b for a, b in lora_shapes(config).values())
    tokens = batch * seq
    per_layer = activation_elements_per_token_layer(config, seq, rank)
    acts = tokens * (config.num_layers * sum(per_layer.values()) + 2 * config.hidden_size)
    terms = {
        "weights": config.param_count() * bytes_per,
        "lora": lora * bytes_per,
        "grad_accumulator": lora * bytes_per,
        "adam_moments": 2 * lora * bytes_per,
        "activations": acts * bytes_per,
    }
    return {
        "bytes": terms,
        "total_bytes": sum(terms.values()),
        "lora_params": lora,
        "activation_elements_per_token_layer": per_layer,
        "logits_chunk_bytes_transient": batch * min(seq, 128) * config.vocab_size * bytes_per,
    }


# --------------------------------------------------------------------------------------------------
# Measuring (inside the workers)


def peak_mb() -> float:
    """ru_maxrss (KiB on Linux) in MiB: the high-water mark since start or since the last reset."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def status_mb(field: str = "VmRSS") -> float:
    """A ``/proc/self/status`` size in MiB: VmRSS (resident), RssAnon (heap), RssFile (mapped files)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def rss_mb() -> float:
    return status_mb("VmRSS")


def reset_peak() -> bool:
    """Resets the kernel's RSS high-water mark (Linux >= 4.0); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Phases:
    """Peak RSS per phase; the overall peak is the largest of them (what ru_maxrss alone reports)."""

    def __init__(self):
        self.baseline = peak_mb()
        self.baseline_rss = rss_mb()
        self.phases: dict[str, dict] = {}
        self.resettable = reset_peak()

    def end(self, name: str, seconds: float) -> None:
        self.phases[name] = {
            "peak_mb": peak_mb(),
            "rss_after_mb": rss_mb(),
            "rss_anon_after_mb": status_mb("RssAnon"),
            "rss_file_after_mb": status_mb("RssFile"),  # e.g. a still-mapped checkpoint
            "seconds": seconds,
        }
        reset_peak()

    def run_steps(self, step, steps: int) -> None:
        """The ``first_step`` phase (compiles), then the ``steady_steps`` phase of ``steps`` more."""
        t = time.perf_counter()
        step()
        self.end("first_step", time.perf_counter() - t)
        t = time.perf_counter()
        for _ in range(steps):
            step()
        self.end("steady_steps", (time.perf_counter() - t) / max(steps, 1))

    def result(self) -> dict:
        peak = max([self.baseline] + [p["peak_mb"] for p in self.phases.values()])
        return {
            "baseline_mb": self.baseline,
            "baseline_rss_mb": self.baseline_rss,
            "peak_mb": peak,
            "peak_minus_baseline_mb": peak - self.baseline,
            "phases": self.phases,
            "phase_reset_supported": self.resettable,
        }


def worker_jtinker(args) -> dict:
    import jax

    import jtinker as tinker
    from jtinker import types

    jax.devices()  # start the backend: part of the runtime, not of the model
    phases = Phases()

    t = time.perf_counter()
    service = tinker.ServiceClient(store_dir=tempfile.mkdtemp(prefix="jtinker-bench-memory-"))
    training = service.create_lora_training_client(
        str(args.model), rank=args.rank, seed=0, train_unembed=False
    )
    phases.end("load", time.perf_counter() - t)

    from jtinker.models import ModelConfig

    rows = make_rows(args.batch, args.seq, ModelConfig.from_pretrained(args.model).vocab_size)
    data = make_datums(types, rows)
    adam = types.AdamParams(learning_rate=1e-4)
    losses = []

    def step() -> None:
        fb = training.forward_backward(data, "cross_entropy")
        training.optim_step(adam).result()
        losses.append(fb.result().metrics["loss:sum"])

    phases.run_steps(step, args.steps)

    adapter = training._adapter
    lora_params = sum(x.size for x in jax.tree.leaves(adapter.lora))
    result = {
        **phases.result(),
        "losses": losses,
        "lora_params": int(lora_params),
        "remat": bool(adapter.base.remat),
    }
    if args.jax_analysis:
        result["jax_analysis"] = jax_analysis(adapter, data)
    return result


def jax_analysis(adapter, data) -> dict:
    """What JAX saves for the backward and XLA's buffer sizes for the engine's accumulate program.

    Reaches into the engine (``Adapter.prepare_loss``, ``CompiledSteps._program``): a diagnostic,
    best effort, run after the measured phases so it cannot affect them.
    """
    import jax.numpy as jnp
    import numpy as np

    from jtinker import train

    out: dict = {}
    try:
        base = adapter.base
        prepared = adapter.prepare_loss(data, "cross_entropy", None)
        batch = base.place_batch(prepared.batches[0][1].batch)
        loss_config = {k: jnp.float32(v) for k, v in prepared.loss_config.items()}
        static = {"config": base.config, "loss_fn": prepared.loss_fn, "remat": base.remat}
        program = adapter.steps._program("accumulate", **static)
        compiled = program.lower(adapter.grad_acc, adapter.lora, base.params, batch, loss_config).compile()
        stats = compiled.memory_analysis()
        out["xla_accumulate"] = {
            name: getattr(stats, f"{name}_size_in_bytes") / MB for name in ("argument", "output", "temp")
        }
        from jax._src.ad_checkpoint import saved_residuals

        def loss(lora):
            return train.loss_and_logprobs(lora, base.params, batch, loss_config, **static)[0]

        residuals = []
        for aval, why in saved_residuals(loss, adapter.lora):
            size = int(np.prod(aval.shape)) * aval.dtype.itemsize
            kind = "weights" if why.startswith(("from a constant", "from the argument")) else "activation"
            residuals.append((size, kind, aval.str_short(), why.split(" from ")[0]))
        acts = [r for r in residuals if r[1] == "activation"]
        by_shape: dict[str, list] = {}
        for size, _, shape, _ in acts:
            entry = by_shape.setdefault(shape, [0, 0])
            entry[0] += 1
            entry[1] += size
        out["saved_residuals"] = {
            "activation_mb": sum(r[0] for r in acts) / MB,
            "weights_and_lora_mb": sum(r[0] for r in residuals if r[1] == "weights") / MB,
            "by_shape": [
                {"shape": shape, "count": n, "mb": size / MB}
                for shape, (n, size) in sorted(by_shape.items(), key=lambda kv: -kv[1][1])[:10]
            ],
        }
    except Exception as e:  # diagnostics must never fail the benchmark
        out["error"] = f"{type(e).__name__}: {e}"
    return out


def worker_torch(args) -> dict:
    import numpy as np
    import peft
    import torch
    import transformers

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    phases = Phases()

    t = time.perf_counter()
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(args.model), dtype=torch.float32)
    model = peft.get_peft_model(
        model, peft.LoraConfig(r=args.rank, lora_alpha=32, target_modules=LINEAR_TARGETS)
    )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.0)
    phases.end("load", time.perf_counter() - t)

    ids = torch.tensor(np.asarray(make_rows(args.batch, args.seq, model.config.vocab_size)))
    inputs, targets = ids[:, :-1], ids[:, 1:]
    losses = []

    def step() -> None:
        logits = model(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1).float(), targets.flatten(), reduction="sum"
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))

    phases.run_steps(step, args.steps)
    return {**phases.result(), "losses": losses, "lora_params": sum(p.numel() for p in params)}


# --------------------------------------------------------------------------------------------------
# Driver


def run_worker(kind: str, args, env_extra: dict[str, str]) -> dict:
    """Runs ``--worker kind`` in a fresh interpreter and returns its JSON."""
    with tempfile.TemporaryDirectory(prefix="jtinker-bench-memory-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [
            sys.executable, __file__, "--worker", kind, "--worker-out", str(out), "--model", str(args.model),
            "--batch", str(args.batch), "--seq", str(args.seq), "--rank", str(args.rank),
            "--steps", str(args.steps), *([] if args.jax_analysis else ["--no-jax-analysis"]),
        ]  # fmt: skip
        env = {**os.environ, **env_extra}
        t = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0 or not out.is_file():
            raise RuntimeError(f"{kind} worker failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        result = json.loads(out.read_text())
        result["wall_s"] = time.perf_counter() - t
        return result


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_workload_args(parser, steps=3, steps_help="steady-state steps after the first")
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument("--skip-remat", action="store_true", help="no JTINKER_REMAT=1 run")
    parser.add_argument("--no-jax-analysis", dest="jax_analysis", action="store_false")
    parser.add_argument("--out", type=Path, default=Path("bench_results/memory.json"))
    parser.add_argument("--worker", choices=["jtinker", "torch"], help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        result = worker_jtinker(args) if args.worker == "jtinker" else worker_torch(args)
        args.worker_out.write_text(json.dumps(result, indent=2))
        return None

    import jax
    import transformers

    from jtinker.models import ModelConfig

    args.model = resolve_model(args.model)
    config = ModelConfig.from_pretrained(args.model)
    size = analytic(config, args.batch, args.seq, args.rank)
    analytic_mb = size["total_bytes"] / MB

    runs: dict[str, dict] = {}
    runs["jtinker"] = run_worker("jtinker", args, {"JTINKER_REMAT": "0"})
    if not args.skip_remat:
        runs["jtinker_remat"] = run_worker("jtinker", args, {"JTINKER_REMAT": "1"})
    if not args.skip_torch:
        # libgomp spin-waits by default, which collapses torch's speed on a shared machine.
        runs["torch"] = run_worker("torch", args, {"OMP_WAIT_POLICY": "PASSIVE"})

    for run in runs.values():
        run["ratio_to_analytic"] = run["peak_minus_baseline_mb"] / analytic_mb
        steady = run["phases"]["steady_steps"]["peak_mb"] - run["baseline_mb"]
        run["steady_minus_baseline_mb"] = steady
        run["steady_ratio_to_analytic"] = steady / analytic_mb

    import torch

    ours = runs["jtinker"]
    result = {
        "benchmark": "memory",
        "model": str(args.model),
        "params": config.param_count(),
        "batch": args.batch,
        "seq": args.seq,
        "rank": args.rank,
        "steps": args.steps,
        "dtype": "float32",
        "analytic": {
            **size,
            "total_mb": analytic_mb,
            "mb": {k: v / MB for k, v in size["bytes"].items()},
        },
        "analytic_mb": analytic_mb,
        "target_ratio": TARGET_RATIO,
        "jtinker_peak_minus_baseline_mb": ours["peak_minus_baseline_mb"],
        "jtinker_ratio_to_analytic": ours["ratio_to_analytic"],
        "pass": ours["ratio_to_analytic"] <= TARGET_RATIO,
        "runs": runs,
        "versions": {
            "jax": jax.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "load_average": os.getloadavg(),
    }
    if "torch" in runs:
        result["torch_peak_minus_baseline_mb"] = runs["torch"]["peak_minus_baseline_mb"]
        result["jtinker_over_torch"] = (
            ours["peak_minus_baseline_mb"] / runs["torch"]["peak_minus_baseline_mb"]
        )

    print(
        f"model {args.model.name} ({config.param_count() / 1e6:.1f}M params), batch {args.batch} x {args.seq}"
    )
    print("analytic: " + ", ".join(f"{k} {v:.0f}" for k, v in result["analytic"]["mb"].items()) + " MiB")
    print(f"analytic total: {analytic_mb:.0f} MiB")
    for name, run in runs.items():
        phase = ", ".join(f"{k} {v['peak_mb']:.0f}" for k, v in run["phases"].items())
        print(
            f"{name:14s} peak {run['peak_mb']:.0f} MiB - baseline {run['baseline_mb']:.0f} = "
            f"{run['peak_minus_baseline_mb']:.0f} MiB ({run['ratio_to_analytic']:.2f}x analytic; "
            f"steady steps {run['steady_ratio_to_analytic']:.2f}x) | phase peaks: {phase}"
        )
    analysis = ours.get("jax_analysis", {})
    if "saved_residuals" in analysis:
        print(
            f"JAX saves {analysis['saved_residuals']['activation_mb']:.0f} MiB of activations for the "
            "backward "
            f"(analytic {result['analytic']['mb']['activations']:.0f}); XLA temp buffers of forward_backward "
            f"{analysis['xla_accumulate']['temp']:.0f} MiB"
        )
    if "torch" in runs:
        print(f"jtinker / torch+PEFT (peak - baseline): {result['jtinker_over_torch']:.2f}")
    verdict = "PASS" if result["pass"] else "FAIL"
    print(f"jtinker peak / analytic: {ours['ratio_to_analytic']:.2f} (target <= {TARGET_RATIO}) {verdict}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
