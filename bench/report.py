"""Runs every benchmark in bench/ and regenerates BENCHMARKS.md (``jtinker bench --all``).

    python bench/report.py [--skip NAME ...] [--reuse] [--out BENCHMARKS.md] [--results DIR]

Each benchmark runs in its own subprocess with modest sizes (the whole suite takes roughly 10-15
minutes on a 2-core CPU machine), writes its JSON to ``--results`` (default bench_results/) and its
output to ``NAME.log`` there. A benchmark that fails is reported as failed; the others still run.
``--reuse`` skips running and rebuilds BENCHMARKS.md from the JSON already in ``--results``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"

# name -> (script, arguments with modest sizes). Each also gets ``--out RESULTS/NAME.json``.
BENCHMARKS: dict[str, tuple[str, list[str]]] = {
    "train": ("train.py", ["--steps", "8"]),
    "train_bf16": ("train.py", ["--steps", "8", "--dtype", "bfloat16"]),  # bf16 on both sides
    "grpo": ("grpo.py", ["--steps", "3"]),
    "sample": ("sample.py", ["--repeats", "5"]),
    "server": ("server.py", ["--steps", "12"]),  # paired rounds: enough for quartiles
    "memory": ("memory.py", ["--steps", "3"]),
    "compile": ("compile.py", ["--steps", "5", "--sample-repeats", "5"]),
}
TIMEOUT_S = 20 * 60  # per benchmark


# --------------------------------------------------------------------------------------------------
# Running


def _busy_cpu_seconds() -> float | None:
    """CPU seconds every process on the machine has used since boot (Linux ``/proc/stat``)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields) - idle) / os.sysconf("SC_CLK_TCK")


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # every waited-for descendant
    return usage.ru_utime + usage.ru_stime


def run_benchmark(name: str, results: Path) -> dict:
    """Runs one benchmark script; returns its run record (exit code, wall time, other processes' CPU, log)."""
    script, extra = BENCHMARKS[name]
    path = BENCH / script
    out = results / f"{name}.json"
    log = results / f"{name}.log"
    cmd = [sys.executable, str(path), *extra, "--out", str(out)]
    shown = out.relative_to(ROOT) if out.is_relative_to(ROOT) else out
    record = {
        "command": shlex.join(["python", f"bench/{script}", *extra, "--out", str(shown)]),
    }
    if not path.is_file():
        return {**record, "status": "missing", "error": f"bench/{script} does not exist"}
    if out.exists():
        out.unlink()  # never report a stale result as this run's
    print(f"== {name}: {record['command']}", flush=True)
    t, busy, ours = time.perf_counter(), _busy_cpu_seconds(), _children_cpu_seconds()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        with log.open("w") as f:
            proc = subprocess.run(
                cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=TIMEOUT_S
            )
        code = proc.returncode
    except subprocess.TimeoutExpired:
        code = "timeout"
    record.update(wall_s=time.perf_counter() - t, exit_code=code)
    if busy is not None:  # what the rest of the machine used meanwhile, in cores
        others = (_busy_cpu_seconds() - busy) - (_children_cpu_seconds() - ours)
        record["other_cores"] = max(0.0, others) / record["wall_s"]
    tail = log.read_text(errors="replace").strip().splitlines()[-8:]
    if code == 0 and out.is_file():
        record["status"] = "ok"
    else:
        record.update(status="failed", error="\n".join(tail[-4:]))
    for line in tail:
        print(f"   {line}", flush=True)
    print(f"   ({record['status']}, {record['wall_s']:.0f} s)", flush=True)
    return record


# --------------------------------------------------------------------------------------------------
# Environment


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def machine() -> dict:
    info: dict[str, str] = {}
    for line in _read("/proc/cpuinfo").splitlines():
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
    cpu = info.get("model name") or platform.processor() or platform.machine()
    # CPUs sold under one name differ a lot (an EPYC's f32 matmul peak: Zen 4 ~200, Zen 5 ~500 GFLOP/s
    # on 2 cores), and so do the ratios against torch: name the generation and vector width.
    flags = info.get("flags", "").split()
    isa = next((name for flag, name in (("avx512f", "AVX-512"), ("avx2", "AVX2")) if flag in flags), None)
    details = [f"family {info['cpu family']} model {info['model']}"] if "cpu family" in info else []
    details += [isa] if isa else []
    if details:
        cpu = f"{cpu} ({', '.join(details)})"
    mem_kb = next(
        (int(line.split()[1]) for line in _read("/proc/meminfo").splitlines() if "MemTotal" in line), 0
    )
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "memory_gib": round(mem_kb / 2**20, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def versions() -> dict:
    out = {}
    for dist in ("jax", "jaxlib", "torch", "transformers", "peft", "tinker", "jtinker"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()  # noqa: E731
    out["commit"] = git("rev-parse", "HEAD") or None
    out["dirty"] = bool(git("status", "--porcelain", "--untracked-files=no"))
    return out


# --------------------------------------------------------------------------------------------------
# Rendering

_RUNS: dict = {}  # this report's run records: the JSON of a benchmark that did not run now is stale


def _load(results: Path, name: str) -> dict | None:
    path = results / f"{name}.json"
    if _RUNS.get(name, {}).get("status", "ok") != "ok" or not path.is_file():
        return None
    return json.loads(path.read_text())


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "**FAIL**"


def _n(x: float, digits: int = 0) -> str:
    return f"{x:,.{digits}f}"


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


# Summary rows: [benchmark, metric, jtinker, baseline, ratio, target, result]


def _rows_train(d: dict) -> list[list[str]]:
    shape = f"{d['batch']}x{d['seq']}, r{d['rank']}"
    f32 = d.get("dtype", "float32") == "float32"  # issue #9's targets are for f32; bf16 is reported
    name = "train" if f32 else "train (bf16)"
    if "torch_tokens_per_s" not in d:
        return [[name, f"tokens/s ({shape})", _n(d["jtinker_tokens_per_s"]), "not run", "—", "—", "—"]]

    def target(text: str, met: bool) -> list[str]:
        return [text, _verdict(met)] if f32 else ["(none)", "info"]

    speed, mfu, torch_name = d["speedup"], d["jtinker_mfu"], "torch+PEFT" if f32 else "torch+PEFT bf16"
    return [
        [name, f"LoRA fwd+bwd+optim tokens/s ({shape})", _n(d["jtinker_tokens_per_s"]),
         f"{torch_name} {_n(d['torch_tokens_per_s'])}", f"{speed:.2f}x", *target(">= 2.0x", speed >= 2)],
        [name, "MFU vs measured matmul peak", f"{mfu:.1%}", f"{torch_name} {d['torch_mfu']:.1%}",
         f"{mfu / d['torch_mfu']:.2f}x", *target(">= 60%", mfu >= 0.6)],
    ]  # fmt: skip


def _rows_grpo(d: dict) -> list[list[str]]:
    shape = f"{d['groups']} x {d['group_size']}, {d['prompt']}-token prompts"
    ours, unshared = d["jtinker_shared"]["tokens_per_s"], d["jtinker_unshared"]["tokens_per_s"]
    rows = [
        ["train", f"GRPO step tokens/s with shared prefixes ({shape})", _n(ours),
         f"no sharing {_n(unshared)}", f"{d['sharing_speedup']:.2f}x", "(none)", "info"],
    ]  # fmt: skip
    if "torch" in d:
        rows.append(
            ["train", f"GRPO step tokens/s ({shape})", _n(ours),
             f"torch+PEFT {_n(d['torch']['tokens_per_s'])}", f"{d['speedup_vs_torch']:.2f}x", "(none)",
             "info"]
        )  # fmt: skip
    return rows


def _shapes(rows: list) -> str:
    """``[B, T]`` of each micro-batch (one ``[B, T]`` in results from before micro-batches were listed)."""
    rows = rows if isinstance(rows[0], list) else [rows]
    return " + ".join(f"{b} x {t}" for b, t in rows)


def _details_grpo(d: dict) -> list[str]:
    shared, unshared = d["jtinker_shared"], d["jtinker_unshared"]
    lines = [
        f"- `{Path(d['model']).name}`, f32, rank-{d['rank']} LoRA on all linear layers, "
        f"`importance_sampling` + AdamW; {d['groups']} prompts of {d['prompt']} tokens with "
        f"{d['group_size']} completions of "
        f"{d['completion_tokens'][0]}-{d['completion_tokens'][1]} tokens each ({_n(d['tokens'])} tokens).",
        f"- Shared prefixes: the model runs {_shapes(shared['model_rows'])} rows, "
        f"{shared['step_s']:.2f} s a step (first {shared['first_step_s']:.1f} s); without sharing "
        f"{_shapes(unshared['model_rows'])}, {unshared['step_s']:.2f} s "
        f"(first {unshared['first_step_s']:.1f} s). Steps alternate between the two; medians.",
    ]
    if "torch" in d:
        lines.append(
            f"- torch+PEFT: every datum padded to the longest, {d['torch']['step_s']:.2f} s a step, run "
            "after jtinker in the same process."
        )
    return lines


def _rows_sample(d: dict) -> list[list[str]]:
    rows = []
    for b, ratio in d["ratio"].items():
        rows.append([
            "sample", f"greedy tokens/s, batch {b} ({d['prompt_len']} + {d['new_tokens']} tokens)",
            _n(d["jtinker"][b]["tokens_per_s"]), f"transformers {_n(d['transformers'][b]['tokens_per_s'])}",
            f"{ratio:.2f}x", ">= 3.0x" if int(b) == 8 else ">= 1.0x",
            _verdict(ratio >= (3 if int(b) == 8 else 1)),
        ])  # fmt: skip
    if mt := d.get("multi_turn"):  # results from before the prefix cache have none
        rows.append([
            "sample", f"{mt['turns']}-turn episodes, batch {mt['batch']}: tokens/s with the prefix cache",
            _n(mt["cached"]["tokens_per_s"]), f"no prefix cache {_n(mt['uncached']['tokens_per_s'])}",
            f"{mt['ratio']:.2f}x", "(none)", "info",
        ])  # fmt: skip
    if sc := d.get("scoring"):  # results from before shared-prefix scoring have none
        rows.append([
            "sample", f"GRPO scoring burst ({sc['groups']} x {sc['group_size']} sequences): tokens/s",
            _n(sc["cached"]["tokens_per_s"]), f"no prefix cache {_n(sc['uncached']['tokens_per_s'])}",
            f"{sc['ratio']:.2f}x", "(none)", "info",
        ])  # fmt: skip
    return rows


def _rows_server(d: dict) -> list[list[str]]:
    single, multi = d["sdk_over_inprocess"], d["multi_over_single"]
    rows = [
        ["server", f"SDK over HTTP vs in-process, tokens/s ({d['batch']}x{d['seq']})",
         _n(d["sdk_tokens_per_s"]), f"in-process {_n(d['inprocess_tokens_per_s'])}", f"{single:.2f}",
         ">= 0.85", _verdict(single >= 0.85)],
        ["server", f"{d['clients']} SDK clients vs 1, tokens/s", _n(d["sdk_multi_tokens_per_s"]),
         f"1 client {_n(d['sdk_tokens_per_s'])}", f"{multi:.2f}", ">= 0.90", _verdict(multi >= 0.90)],
    ]  # fmt: skip
    if "sample_multi_over_serial" in d:  # results from before sampling was measured have none
        rows.append(
            ["server", f"{d['clients']} SDK sampling clients (own adapters) at once vs one by one, tokens/s",
             _n(d["sdk_sample_multi_tokens_per_s"]),
             f"one by one {_n(d['sdk_sample_serial_tokens_per_s'])}",
             f"{d['sample_multi_over_serial']:.2f}", "(none)", "info"]
        )  # fmt: skip
    if "custom_one_over_two_pass" in d:
        rows.append(
            ["server", "PPO in torch via create_custom_loss: one request vs the SDK's two passes, tokens/s",
             _n(d["custom_one_pass_tokens_per_s"]), f"two passes {_n(d['custom_two_pass_tokens_per_s'])}",
             f"{d['custom_one_over_two_pass']:.2f}", "(none)", "info"]
        )  # fmt: skip
    return rows


def _rows_memory(d: dict) -> list[list[str]]:
    target = d["target_ratio"]
    base = f"analytic {_n(d['analytic_mb'])} MiB"
    ratio = f"{d['jtinker_ratio_to_analytic']:.2f}x analytic"
    if "torch_peak_minus_baseline_mb" in d:
        base += f"; torch+PEFT {_n(d['torch_peak_minus_baseline_mb'])} MiB"
        ratio += f" ({d['jtinker_over_torch']:.2f}x torch)"
    rows = [
        ["memory", f"peak RSS - imports, training ({d['batch']}x{d['seq']}, r{d['rank']})",
         f"{_n(d['jtinker_peak_minus_baseline_mb'])} MiB", base, ratio, f"<= {target:g}x analytic",
         _verdict(d["pass"])],
    ]  # fmt: skip
    remat = d["runs"].get("jtinker_remat")
    if remat:
        r = remat["ratio_to_analytic"]
        rows.append([
            "memory", "the same with JTINKER_REMAT=1", f"{_n(remat['peak_minus_baseline_mb'])} MiB",
            f"analytic {_n(d['analytic_mb'])} MiB", f"{r:.2f}x analytic", f"<= {target:g}x analytic",
            _verdict(r <= target),
        ])  # fmt: skip
    return rows


def _rows_compile(d: dict) -> list[list[str]]:
    return [
        ["compile", "first train step compile (first - steady step)", f"{d['train_compile_s']:.1f} s",
         f"warm persistent cache {d['train_compile_warm_cache_s']:.1f} s",
         f"{d['ratio_to_target']:.2f}x target", f"<= {d['target_s']:g} s", _verdict(d["pass"])],
        ["compile", "JAX compile work in the first step (trace + lower + XLA)",
         f"{d['train_compile_work_s']:.1f} s",
         f"warm persistent cache {d['train_compile_work_warm_cache_s']:.1f} s",
         f"{d['warm_cache_speedup']:.0f}x less with the cache", "—", "—"],
        ["compile", "first sample call overhead (first - steady call)", f"{d['sample_compile_s']:.1f} s",
         f"warm persistent cache {d['sample_compile_warm_cache_s']:.1f} s", "—", "—", "—"],
    ]  # fmt: skip


# Details sections


def _details_train(d: dict) -> list[str]:
    dtype = {"float32": "f32", "bfloat16": "bf16"}[d.get("dtype", "float32")]
    weights = "f32" if dtype == "f32" else "bf16 base weights and activations, f32 LoRA and Adam (both sides)"
    body = [
        f"- Model `{Path(d['model']).name}` ({d['params'] / 1e6:.1f}M params), {weights}, rank-{d['rank']} "
        f"LoRA on q/k/v/o/gate/up/down, AdamW, summed cross-entropy; batch {d['batch']} x {d['seq']}.",
        f"- Measured {dtype} matmul peak: {_n(d['matmul_peak_gflops'])} GFLOP/s ({d['device']}"
        f"{'' if dtype == 'f32' else '; bf16 operands, f32 results'}).",
        f"- jtinker: {_n(d['jtinker_tokens_per_s'])} tokens/s, MFU {d['jtinker_mfu']:.1%}, first step "
        f"{d['jtinker_first_step_s']:.1f} s (compile included).",
    ]
    if "torch_tokens_per_s" in d:
        body.append(
            f"- torch+PEFT: {_n(d['torch_tokens_per_s'])} tokens/s, MFU {d['torch_mfu']:.1%}, first step "
            f"{d['torch_first_step_s']:.1f} s. Speedup {d['speedup']:.2f}x."
        )
    body.append(
        "- The two sides run one after the other in one process, not interleaved, and torch shares the "
        "process with XLA's thread pool (bench/sample.py and bench/memory.py give torch its own process with "
        "OMP_WAIT_POLICY=PASSIVE): on a loaded machine the torch number is likely pessimistic. The memory "
        "benchmark's s/step column is a second, separate-process comparison."
    )
    return body


def _details_sample(d: dict) -> list[str]:
    rows = [
        [b, _n(d["jtinker"][b]["tokens_per_s"], 1),
         _n(d["transformers"][b]["tokens_per_s"], 1) if b in d["transformers"] else "—",
         f"{d['ratio'][b]:.2f}x" if b in d["ratio"] else "—", f"{d['jtinker'][b]['compile_s']:.1f}"]
        for b in d["jtinker"]
    ]  # fmt: skip
    lines = [
        f"- {d['model']}; greedy, prompt {d['prompt_len']}, {d['new_tokens']} new tokens; medians of "
        f"{d['repeats']} interleaved runs after a warm-up; {d['threads']} threads; transformers in its own "
        f"process (OMP_WAIT_POLICY={d.get('omp_wait_policy')}).",
        "",
        _md_table(["batch", "jtinker tok/s", "transformers tok/s", "ratio", "jtinker compile (s)"], rows),
    ]
    return lines + _details_multi_turn(d.get("multi_turn")) + _details_scoring(d.get("scoring"))


def _details_scoring(sc: dict | None) -> list[str]:
    if not sc:
        return []
    return [
        f"- Scoring: {sc['groups']} groups of {sc['group_size']} sequences (a shared "
        f"{sc['prompt_len']}-token prompt plus a completion of 32 to 128 tokens each) scored in one call, "
        f"prompt logprobs as `compute_logprobs` asks for them. Median burst: {sc['cached']['seconds']:.2f} s "
        "with the prefix "
        f"cache (each group's prompt prefilled once), {sc['uncached']['seconds']:.2f} s without "
        f"({sc['ratio']:.2f}x).",
    ]


def _details_multi_turn(mt: dict | None) -> list[str]:
    if not mt:
        return []
    return [
        "",
        f"- Multi-turn: {mt['batch']} episodes of {mt['turns']} turns; the first prompt has "
        f"{mt['first_prompt_len']} tokens and each turn samples {mt['turn_tokens']} tokens (temperature 1) "
        f"and appends them and {mt['turn_tokens']} new tokens: each prompt extends the last turn's sequence. "
        f"Median episode: {mt['cached']['seconds']:.2f} s with the prefix cache, "
        f"{mt['uncached']['seconds']:.2f} s without ({mt['ratio']:.2f}x); {mt['hit_tokens']:,} prompt "
        "tokens were served from the cache.",
    ]


def _details_server(d: dict) -> list[str]:
    lines = [
        f"- Batch {d['batch']} x {d['seq']}, rank {d['rank']}. Median step: in-process "
        f"{d['inprocess_step_s'] * 1e3:.0f} ms, SDK {d['sdk_step_s'] * 1e3:.0f} ms, "
        f"{d['clients']} SDK clients {d['sdk_multi_round_s'] * 1e3:.0f} ms per round.",
    ]
    if "multi_over_single_quartiles" in d:  # results from before the paired rounds have none
        low, _, high = d["multi_over_single_quartiles"]
        lines.append(
            f"- {d['clients']} clients vs 1: the median over rounds of paired steps run moments apart; "
            f"quartiles {low:.2f}-{high:.2f}."
        )
    if "sdk_sample_s" in d:
        lines.append(
            f"- Sampling {d['batch']} x {d['sample_tokens']} tokens: one client "
            f"{d['sdk_sample_s'] * 1e3:.0f} ms; {d['clients']} clients with their own adapters "
            f"{d['sdk_sample_multi_round_s'] * 1e3:.0f} ms per round at once (one batch), "
            f"{d['sdk_sample_serial_s'] * 1e3:.0f} ms one after another (each decode step of the batch reads "
            f"all {d['clients']} adapters)."
        )
    if "custom_one_pass_step_s" in d:
        lines.append(
            f"- A PPO step written per datum in torch: uploaded with `create_custom_loss`, one "
            f"`forward_backward` request, {d['custom_one_pass_step_s'] * 1e3:.0f} ms; the same loss as a "
            "callable (the SDK's forward, torch on the client, backward) "
            f"{d['custom_two_pass_step_s'] * 1e3:.0f} ms."
        )
    return lines


def _details_memory(d: dict) -> list[str]:
    mb = d["analytic"]["mb"]
    per = d["analytic"]["activation_elements_per_token_layer"]
    rows = []
    for name, r in d["runs"].items():
        phases = [
            f"{r['phases'][p]['peak_mb'] - r['baseline_mb']:.0f}"
            for p in ("load", "first_step", "steady_steps")
        ]
        rows.append([
            name, f"{r['baseline_mb']:.0f}", f"{r['peak_mb']:.0f}", f"{r['peak_minus_baseline_mb']:.0f}",
            f"{r['ratio_to_analytic']:.2f}", *phases, f"{r['phases']['steady_steps']['seconds']:.2f}",
        ])  # fmt: skip
    header = [
        "run",
        "baseline",
        "peak",
        "peak - baseline",
        "x analytic",
        "load",
        "first step",
        "steady",
        "s/step",
    ]
    body = [
        f"- Analytic size {d['analytic_mb']:.0f} MiB = "
        + ", ".join(f"{k.replace('_', ' ')} {v:.0f}" for k, v in mb.items())
        + " MiB. Activations kept for the backward, f32 elements per token and layer: "
        + ", ".join(f"{k} {v}" for k, v in per.items() if v)
        + " (formula in bench/memory.py).",
        "",
        _md_table(header, rows),
        "",
        "MiB. *baseline*: peak RSS after the imports, before the model loads. Phase columns: the peak during "
        "that phase minus the baseline (the kernel's high-water mark is reset between phases). jtinker's "
        "*first step* includes XLA compilation. jtinker's steady peak varies between runs by about one XLA "
        "temp buffer: the allocator set up by jtinker/hostmem.py keeps freed memory in one heap, so when a "
        "small allocation lands in a step's freed temp block, the next step's temp goes above it "
        "(JTINKER_TUNE_MALLOC=0 gives a steadier, higher peak and a slower step).",
    ]
    analysis = d["runs"]["jtinker"].get("jax_analysis", {})
    if "saved_residuals" in analysis:
        res, xla = analysis["saved_residuals"], analysis["xla_accumulate"]
        body += [
            "",
            f"- Where jtinker's peak goes: JAX saves {res['activation_mb']:.0f} MiB of activations for the "
            f"backward (analytic: {mb['activations']:.0f} MiB); XLA's temp buffers for the forward_backward "
            f"program total {xla['temp']:.0f} MiB. Largest saved activations ([layers, batch, seq, ...]): "
            + ", ".join(f"{r['count']} x `{r['shape']}` ({r['mb']:.0f} MiB)" for r in res["by_shape"][:6])
            + ".",
        ]
    load = d["runs"]["jtinker"]["phases"]["load"]
    state = mb["weights"] + mb["lora"] + mb["grad_accumulator"] + mb["adam_moments"]
    if "rss_file_after_mb" in load:
        after = load["rss_after_mb"] - d["runs"]["jtinker"]["baseline_mb"]
        body.append(
            f"- After loading, jtinker's RSS is {after:.0f} MiB over the baseline for {state:.0f} MiB of "
            f"weights and LoRA state; {load['rss_file_after_mb']:.0f} MiB of its RSS is then file-backed "
            "(mapped files)."
        )
    return body


def _details_compile(d: dict) -> list[str]:
    rows = []
    for name, r in d["runs"].items():
        e, s = r["events"]["first_step"], r["events"]["first_sample"]
        rows.append([
            name, f"{r['first_step_s']:.1f}", f"{r['step_s']:.1f}", f"{r['train_compile_s']:.1f}",
            f"{e['xla_compile_s']:.1f} / {e['trace_s'] + e['lower_s']:.1f} / {e['cache_hits']}",
            f"{r['first_sample_s']:.1f}", f"{r['sample_s']:.1f}",
            f"{s['xla_compile_s']:.1f} / {s['trace_s'] + s['lower_s']:.1f} / {s['cache_hits']}",
            f"{r['time_to_first_step_s']:.1f}",
        ])  # fmt: skip
    header = [
        "run", "first step", "steady step", "first - steady", "XLA / trace+lower / cache hits",
        "first sample", "steady sample", "sample XLA / trace+lower / cache hits",
        "process start to first step",
    ]  # fmt: skip
    shipped = (
        " with its own persistent cache, empty at the start"
        if d["jtinker_enables_persistent_cache"]
        else " (off on CPU: `JTINKER_COMPILE_CACHE=1` turns jtinker's persistent cache on)"
    )
    body = [
        f"- Train step batch {d['batch']} x {d['seq']}, rank {d['rank']}; sampling {d['sample']['batch']} "
        f"prompts of {d['sample']['prompt_len']} tokens, {d['sample']['new_tokens']} new tokens. Each run is "
        "a fresh process.",
        "",
        _md_table(header, rows),
        "",
        f"Seconds. `default` is jtinker as shipped, in a fresh `JTINKER_HOME`{shipped}; "
        "`cache_cold` and `cache_warm` set "
        "`JAX_COMPILATION_CACHE_DIR` to one directory (empty, then filled by `cache_cold`) and "
        "`JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0`.",
    ]
    if d["runs"]["default"]["events"]["first_sample"].get("imported_transformers"):
        body.append(
            "- The first sample call also builds the base model's sampler, which loads the tokenizer and so "
            "imports transformers (seconds): most of the first-sample overhead that a warm cache leaves is "
            "that import."
        )
    return body


SECTIONS = [  # name, title, summary rows, details
    ("train", "train: LoRA training throughput vs torch + PEFT", _rows_train, _details_train),
    ("train_bf16", "train_bf16: the same in bf16, both sides", _rows_train, _details_train),
    ("grpo", "grpo: a GRPO step with shared prefixes", _rows_grpo, _details_grpo),
    ("sample", "sample: generation throughput vs transformers generate", _rows_sample, _details_sample),
    ("server", "server: the Tinker SDK over HTTP vs the in-process API", _rows_server, _details_server),
    ("memory", "memory: peak RSS vs the analytic size and torch + PEFT", _rows_memory, _details_memory),
    ("compile", "compile: first-step compile time and the persistent cache", _rows_compile, _details_compile),
]


def _safe(build, data: dict, fallback):
    try:
        return build(data)
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:  # e.g. a JSON from an older script
        return fallback(f"{type(e).__name__}: {e}")


def summary(results: Path, runs: dict) -> list[list[str]]:
    rows = []
    for name, _, build, _ in SECTIONS:
        data = _load(results, name)
        status = runs.get(name, {}).get("status", "not run")
        if data is None:
            rows.append([name, "—", status, "—", "—", "—", "—"])
        else:
            rows += _safe(build, data, lambda err, name=name: [[name, "—", f"unreadable ({err})", *"————"]])
    return rows


def details(results: Path, runs: dict) -> list[str]:
    out: list[str] = []
    for name, title, _, build in SECTIONS:
        run = runs.get(name, {})
        out.append(f"### {title}\n")
        if run.get("command"):
            load = f", other processes {run['other_cores']:.2f} cores" if "other_cores" in run else ""
            wall = f" ({run['wall_s']:.0f} s{load})" if "wall_s" in run else ""
            out.append(f"`{run['command']}`{wall}\n")
        data = _load(results, name)
        if data is None:
            out.append(f"Not measured ({run.get('status', 'not run')}).\n")
            if run.get("error"):
                out.append(f"```\n{run['error']}\n```\n")
            continue
        out += _safe(build, data, lambda err, name=name: [f"Could not render ({err}); see {name}.json."])
        out.append("")
    return out


def render(results: Path, runs: dict, env: dict, command: str, date: str) -> str:
    _RUNS.clear()
    _RUNS.update(runs)
    m, v = env["machine"], env["versions"]
    others = [r["other_cores"] for r in runs.values() if "other_cores" in r]
    commit = (v["commit"] or "unknown")[:12] + (" plus uncommitted changes" if v["dirty"] else "")
    lines = [
        "# jtinker benchmarks",
        "",
        f"Generated by `{command}` on {date}. Each benchmark measures jtinker and its baseline in the same "
        "run: medians over repeated steps, warm-up excluded, compile time reported separately. Raw JSON and "
        "logs go to `bench_results/`.",
        "",
        f"- Machine: {m['cpu']}, {m['cores']} cores ({m['cores_usable']} usable), "
        f"{m['memory_gib']} GiB memory, {m['platform']}",
        f"- Versions: jax {v['jax']}, jaxlib {v['jaxlib']}, torch {v['torch']}, "
        f"transformers {v['transformers']}, peft {v['peft']}, tinker SDK {v['tinker']}, Python {m['python']}",
        f"- jtinker {v['jtinker']} at commit {commit}",
    ]
    if others:
        lines.append(
            f"- CPU used by other processes while each benchmark ran: {min(others):.2f} to "
            f"{max(others):.2f} cores on average"
        )
    if others and max(others) > 0.25 * m["cores_usable"]:
        lines += [
            "",
            "> **Noisy run.** Other jobs used over a quarter of the cores while a benchmark ran, so absolute "
            "timings are noisy and pessimistic. Compare the ratios: each benchmark measures jtinker and "
            "its baseline in the same run.",
        ]
    lines += [
        "",
        "## Summary",
        "",
        _md_table(
            ["benchmark", "metric", "jtinker", "baseline", "ratio", "target", "result"],
            summary(results, runs),
        ),
        "",
        "Targets are issue #9's (train in f32 >= 2x torch+PEFT and >= 60% MFU; sample >= 3x at batch 8); "
        "other batch sizes show parity as the bar, and bf16 training is compared with torch+PEFT in bf16.",
        "",
        "## Details",
        "",
        *details(results, runs),
        "## Reproducing",
        "",
        "`jtinker bench --all` (the same as `python bench/report.py`) runs every benchmark above and "
        "rewrites this file; `jtinker bench NAME [ARGS]` runs one (`python bench/NAME.py --help` lists its "
        "options); "
        "`python bench/report.py --reuse` re-renders this file from `bench_results/`.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--skip", action="append", default=[], choices=sorted(BENCHMARKS), help="do not run NAME"
    )
    parser.add_argument("--reuse", action="store_true", help="render from the JSON already in --results")
    parser.add_argument("--results", type=Path, default=ROOT / "bench_results")
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--command", default=None, help=argparse.SUPPRESS)  # as shown in BENCHMARKS.md
    args = parser.parse_args(argv)
    command = args.command or shlex.join(
        ["python", "bench/report.py", *(sys.argv[1:] if argv is None else argv)]
    )

    args.results.mkdir(parents=True, exist_ok=True)
    runs_file = args.results / "runs.json"
    if args.reuse:
        saved = json.loads(runs_file.read_text()) if runs_file.is_file() else {}
        runs, env, date = saved.get("runs", {}), saved.get("env") or {}, saved.get("date")
        command = saved.get("command", command)
    else:
        env = {"machine": machine(), "versions": versions()}
        date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
        t = time.perf_counter()
        runs = {}
        for name in BENCHMARKS:
            if name in args.skip:
                runs[name] = {"status": "skipped"}
                continue
            runs[name] = run_benchmark(name, args.results)
        print(f"all benchmarks: {time.perf_counter() - t:.0f} s")
        runs_file.write_text(
            json.dumps({"runs": runs, "env": env, "date": date, "command": command}, indent=2)
        )
    if not env:
        env = {"machine": machine(), "versions": versions()}
    args.out.write_text(render(args.results, runs, env, command, date or "unknown date"))
    print(f"wrote {args.out}")
    return 0 if all(r.get("status") in ("ok", "skipped") for r in runs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
