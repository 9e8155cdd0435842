"""The HTTP server's cost: the real tinker SDK against ``jtinker serve`` vs the in-process API.

    python bench/server.py [--model DIR] [--batch 8] [--seq 128] [--rank 32] [--steps 6] [--clients 4]
                           [--sample-tokens 32] [--out FILE]

One step is ``forward_backward`` + ``optim_step`` on the same model, LoRA and batch, measured three ways
in the same run:

* ``inprocess``: ``import jtinker as tinker`` (no HTTP);
* ``sdk``: ``tinker.ServiceClient(base_url=...)`` against a ``jtinker serve`` subprocess on 127.0.0.1;
* ``sdk_multi``: ``--clients`` SDK clients (one ServiceClient each, one thread each, starting each
  round together), each with ``batch / clients`` sequences, vs the one SDK client with the whole
  batch. The server runs the clients' concurrent ``forward_backward`` requests as one jitted step.
* ``sample`` / ``sample_multi``: likewise for sampling, ``batch`` samples of ``--sample-tokens`` tokens
  from one SDK sampling client vs ``--clients`` sampling clients (each its own adapter) sampling
  ``batch / clients`` each at once. The server runs them as one batch (a stacked LoRA); also timed
  one client after another (``sample_serial``), the cost without cross-adapter batching.
* ``custom_one_pass`` / ``custom_two_pass``: a PPO step written per datum in torch, through the SDK:
  as a ``create_custom_loss`` handle the server runs in one ``forward_backward`` request, vs the same
  loss as a callable, which the SDK runs in two passes (a forward, torch on the client, a backward).

The setups take turns in blocks (so a drift in machine load affects all of them alike); within a
block, the setups compared with each other alternate step by step (``sdk`` with ``sdk_multi``; the
three sampling setups), so each of their ratios is a median over rounds run moments apart. Reported:
median step time over the timed steps (warm-up steps, which compile, and the first step of each block
excluded), tokens/s, and the ratios sdk / inprocess (of medians: another process) and multi / single
(paired; targets: >= 0.85 and >= 0.90).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from workload import add_workload_args, make_datums, make_rows, resolve_model

# Steady-state calls repeat their prompts, which the sampler's prefix cache would serve: measure the
# work of fresh prompts (bench/sample.py measures the cache on multi-turn episodes).
os.environ.setdefault("JTINKER_PREFIX_CACHE_MIB", "0")
# The two-pass custom loss runs torch in this process: its OpenMP threads must not spin after each step,
# taking the cores from the setups measured next (the loss itself is a few ops on [T] arrays).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

WARMUP = 2
BLOCK = 3  # timed rounds per block
API_KEY = "tml-jtinker-bench-key-0000"


def step(training, adam, data) -> None:
    """One training step: ``forward_backward`` + ``optim_step`` submitted back to back, both awaited."""
    fb = training.forward_backward(data, "cross_entropy")
    opt = training.optim_step(adam)
    fb.result()
    opt.result()


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``python -m jtinker.server`` on a free loopback port, preloading ``model_dir``."""

    def __init__(self, model_dir: Path, home: Path):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        home.mkdir(parents=True, exist_ok=True)
        self.log = home / "server.log"
        env = {**os.environ, "JTINKER_API_KEYS": API_KEY, "TINKER_TELEMETRY": "0"}
        cmd = [
            sys.executable, "-m", "jtinker.server", "--port", str(self.port), "--home", str(home),
            "--base-model", str(model_dir), "--log-level", "warning",
        ]  # fmt: skip
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log.open("ab"), stderr=subprocess.STDOUT)

    def wait(self, timeout: float = 300) -> None:
        import httpx

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError("server did not come up")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def ppo_in_torch(logprobs, sampling_logprobs, advantages):
    """PPO's clipped objective for one datum, as a ``create_custom_loss`` function."""
    import torch

    ratio = torch.exp(logprobs - sampling_logprobs)
    return -torch.minimum(ratio * advantages, torch.clamp(ratio, 0.8, 1.2) * advantages).sum(), {}


def ppo_batch_in_torch(data, logprobs_list):
    """The same loss over a batch, as a ``forward_backward_custom`` callable (the SDK's two-pass path)."""
    total = sum(
        ppo_in_torch(
            lp, d.loss_fn_inputs["sampling_logprobs"].to_torch(), d.loss_fn_inputs["advantages"].to_torch()
        )[0]
        for d, lp in zip(data, logprobs_list, strict=True)
    )
    return total, {}


def rl_datums(ns, rows: np.ndarray) -> list:
    """``make_datums``' rows with what the PPO loss reads: sampling logprobs and advantages."""
    rng = np.random.default_rng(1)
    return [
        ns.Datum(
            model_input=d.model_input,
            loss_fn_inputs={
                "target_tokens": d.loss_fn_inputs["target_tokens"],
                "sampling_logprobs": ns.TensorData.from_numpy(
                    rng.normal(-5.5, 0.2, len(row) - 1).astype(np.float32)
                ),
                "advantages": ns.TensorData.from_numpy(rng.normal(0, 1, len(row) - 1).astype(np.float32)),
            },
        )
        for d, row in zip(make_datums(ns, rows), rows, strict=True)
    ]


def custom_step(training, adam, data, loss) -> None:
    fb = training.forward_backward_custom(data, loss)
    opt = training.optim_step(adam)
    fb.result()
    opt.result()


def sdk_client(url: str, model_dir: Path, rank: int, seed: int):
    import tinker

    service = tinker.ServiceClient(base_url=url, api_key=API_KEY)
    return service.create_lora_training_client(str(model_dir), rank=rank, seed=seed).result()


def sample(sampler, prompt, num_samples: int, params) -> None:
    sampler.sample(prompt=prompt, num_samples=num_samples, sampling_params=params).result()


def setups(
    url: str, model_dir: Path, rows: np.ndarray, rank: int, clients: int, store: Path, sample_tokens: int
) -> dict:
    """name -> a callable running one step (or one lock-step round of ``clients`` SDK clients)."""
    import tinker

    import jtinker
    from jtinker import types as jt

    local = jtinker.ServiceClient(store_dir=str(store)).create_lora_training_client(
        str(model_dir), rank=rank, seed=0
    )
    local_data, local_adam = make_datums(jt, rows), jt.AdamParams(learning_rate=1e-4)
    remote, data = sdk_client(url, model_dir, rank, 0), make_datums(tinker.types, rows)
    adam = tinker.types.AdamParams(learning_rate=1e-4)
    many = [sdk_client(url, model_dir, rank, seed) for seed in range(1, clients + 1)]
    shares = [make_datums(tinker.types, part) for part in np.array_split(rows, clients)]
    pool = ThreadPoolExecutor(clients)  # one thread per client: they submit at the same time

    def round_of_clients() -> None:
        for f in [pool.submit(step, tc, adam, d) for tc, d in zip(many, shares, strict=True)]:
            f.result()

    # Sampling: no stop at all (not even EOS), so every sample runs all ``sample_tokens`` steps.
    prompt = tinker.types.ModelInput.from_ints(rows[0, :16].tolist())
    params = tinker.types.SamplingParams(max_tokens=sample_tokens, temperature=1.0, seed=0, stop=[])
    one_sampler = remote.save_weights_and_get_sampling_client("bench-sampler").result()
    samplers = [
        tc.save_weights_and_get_sampling_client(f"bench-sampler-{i}").result() for i, tc in enumerate(many)
    ]
    batch, share = len(rows), len(rows) // clients

    def round_of_samplers() -> None:
        for f in [pool.submit(sample, sc, prompt, share, params) for sc in samplers]:
            f.result()

    def samplers_one_by_one() -> None:  # what the round costs when the server cannot batch it
        for sc in samplers:
            sample(sc, prompt, share, params)

    import torch

    torch.set_num_threads(1)
    custom_service = tinker.ServiceClient(base_url=url, api_key=API_KEY)
    custom = custom_service.create_lora_training_client(str(model_dir), rank=rank, seed=0).result()
    ranks = {"logprobs": 1, "sampling_logprobs": 1, "advantages": 1}
    handle = custom_service.create_custom_loss(ppo_in_torch, ranks).result()
    rl_data = rl_datums(tinker.types, rows)

    return {
        "inprocess": lambda: step(local, local_adam, local_data),
        "custom_one_pass": lambda: custom_step(custom, adam, rl_data, handle),
        "custom_two_pass": lambda: custom_step(custom, adam, rl_data, ppo_batch_in_torch),
        "sdk": lambda: step(remote, adam, data),
        "sdk_multi": round_of_clients,
        "sample": lambda: sample(one_sampler, prompt, batch, params),
        "sample_multi": round_of_samplers,
        "sample_serial": samplers_one_by_one,
    }


# Setups compared with each other run in alternation within one block (paired rounds); the blocks of
# the three groups alternate, so a drift in machine load hits every setup alike. Each block starts
# with one untimed step that only wakes its process up.
GROUPS = (
    ("inprocess",),
    ("sdk", "sdk_multi"),
    ("sample", "sample_multi", "sample_serial"),
    ("custom_one_pass", "custom_two_pass"),
)


def measure(runs: dict, steps: int) -> dict[str, list[float]]:
    """``steps`` timed calls of every setup; ``times[name][i]`` of one group come from the same round."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    while len(times["inprocess"]) < steps:
        for group in GROUPS:
            runs[group[0]]()
            for _ in range(min(BLOCK, steps - len(times[group[0]]))):
                # Rotate the order each round: no setup always runs right after another.
                shift = len(times[group[0]]) % len(group)
                for name in group[shift:] + group[:shift]:
                    times[name].append(timed(runs[name]))
    return times


def paired_ratios(fast: list[float], slow: list[float]) -> list[float]:
    """Per round, ``fast / slow`` step times: the throughput of ``slow``'s setup over ``fast``'s."""
    return [f / s for f, s in zip(fast, slow, strict=True)]


def server_stats(url: str) -> dict:
    import httpx

    return httpx.get(f"{url}/status", timeout=10).json()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_workload_args(parser, steps=6)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--sample-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("bench_results/server.json"))
    args = parser.parse_args(argv)
    if args.batch % args.clients:
        parser.error("--batch must be a multiple of --clients")

    # The SDK would post its telemetry to this server, which drops it: do not spend the client's time.
    os.environ.setdefault("TINKER_TELEMETRY", "0")
    import jax

    from jtinker.models import ModelConfig

    model_dir = resolve_model(args.model)
    config = ModelConfig.from_pretrained(model_dir)
    rows = make_rows(args.batch, args.seq, config.vocab_size)
    tokens = args.batch * args.seq

    with tempfile.TemporaryDirectory(prefix="jtinker-bench-server-") as tmp:
        home = Path(tmp)
        server = Server(model_dir, home / "server")
        try:
            server.wait()
            runs = setups(
                server.url, model_dir, rows, args.rank, args.clients, home / "store", args.sample_tokens
            )
            for _ in range(WARMUP):
                for run in runs.values():
                    run()
            times = measure(runs, args.steps)
            status = server_stats(server.url)
        finally:
            server.stop()
    med = {name: statistics.median(t) for name, t in times.items()}
    med["multi"] = med["sdk_multi"]
    multi_ratios = paired_ratios(times["sdk"], times["sdk_multi"])
    sampled = args.batch * args.sample_tokens
    result = {
        "benchmark": "server",
        "model": str(model_dir),
        "params": config.param_count(),
        "batch": args.batch,
        "seq": args.seq,
        "rank": args.rank,
        "clients": args.clients,
        "device": jax.devices()[0].device_kind,
        "inprocess_step_s": med["inprocess"],
        "sdk_step_s": med["sdk"],
        "sdk_multi_round_s": med["multi"],
        "inprocess_tokens_per_s": tokens / med["inprocess"],
        "sdk_tokens_per_s": tokens / med["sdk"],
        "sdk_multi_tokens_per_s": tokens / med["multi"],
        "sdk_over_inprocess": med["inprocess"] / med["sdk"],
        "multi_over_single": statistics.median(multi_ratios),
        "multi_over_single_quartiles": statistics.quantiles(multi_ratios, n=4),
        "sample_tokens": args.sample_tokens,
        "sdk_sample_s": med["sample"],
        "sdk_sample_multi_round_s": med["sample_multi"],
        "sdk_sample_tokens_per_s": sampled / med["sample"],
        "sdk_sample_multi_tokens_per_s": sampled / med["sample_multi"],
        "sdk_sample_serial_s": med["sample_serial"],
        "sdk_sample_serial_tokens_per_s": sampled / med["sample_serial"],
        "sample_multi_over_single": statistics.median(paired_ratios(times["sample"], times["sample_multi"])),
        "sample_multi_over_serial": statistics.median(
            paired_ratios(times["sample_serial"], times["sample_multi"])
        ),
        "custom_one_pass_step_s": med["custom_one_pass"],
        "custom_two_pass_step_s": med["custom_two_pass"],
        "custom_one_pass_tokens_per_s": tokens / med["custom_one_pass"],
        "custom_two_pass_tokens_per_s": tokens / med["custom_two_pass"],
        "custom_one_over_two_pass": statistics.median(
            paired_ratios(times["custom_two_pass"], times["custom_one_pass"])
        ),
        "step_times": times,
        "server_status": status,
    }
    print(
        f"model {model_dir.name} ({config.param_count() / 1e6:.1f}M params), batch {args.batch} x {args.seq}"
    )
    print(
        f"in-process: {med['inprocess'] * 1e3:.1f} ms/step, {result['inprocess_tokens_per_s']:.0f} tokens/s"
    )
    print(f"SDK over HTTP: {med['sdk'] * 1e3:.1f} ms/step, {result['sdk_tokens_per_s']:.0f} tokens/s")
    print(
        f"{args.clients} SDK clients x batch {args.batch // args.clients}: "
        f"{med['multi'] * 1e3:.1f} ms/round, {result['sdk_multi_tokens_per_s']:.0f} tokens/s"
    )
    print(f"SDK / in-process throughput: {result['sdk_over_inprocess']:.2f} (target >= 0.85)")
    low, _, high = result["multi_over_single_quartiles"]
    print(
        f"{args.clients} clients / 1 client throughput: {result['multi_over_single']:.2f} (target >= 0.90; "
        f"median of paired rounds, quartiles {low:.2f}-{high:.2f})"
    )
    print(
        f"sampling {args.batch} x {args.sample_tokens} tokens: 1 client {med['sample'] * 1e3:.1f} ms, "
        f"{args.clients} clients {med['sample_multi'] * 1e3:.1f} ms per round; "
        f"{args.clients} / 1 throughput {result['sample_multi_over_single']:.2f}; "
        f"{result['sample_multi_over_serial']:.2f}x faster than one client after another"
    )
    print(
        f"PPO in torch via create_custom_loss: one request {med['custom_one_pass'] * 1e3:.1f} ms/step vs "
        f"the SDK's two passes {med['custom_two_pass'] * 1e3:.1f} ms/step: "
        f"{result['custom_one_over_two_pass']:.2f}x"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
