"""A LoRA run that works the same on one process or many (SPMD: every process runs this script).

    python examples/multihost/train_lora.py --steps 3 --out /tmp/mh
    examples/multihost/launch_local.sh 2 examples/multihost/train_lora.py --steps 3 --out /tmp/mh

Each process writes ``losses.<process>.json`` (losses, checkpoint path, two sampled rollouts); process 0
prints progress. The checkpoint is written collectively by Orbax and loads in a single process.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from jtinker import distributed

distributed.initialize()  # before any JAX computation

import jax  # noqa: E402
import numpy as np  # noqa: E402

import jtinker as tinker  # noqa: E402
from jtinker import types  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-model", default="jtinker/tiny-qwen3")
    parser.add_argument("--mesh", default=None, help="e.g. fsdp=4 (default: every device on fsdp)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    mesh = args.mesh or f"fsdp={jax.device_count()}"
    service = tinker.ServiceClient(mesh=mesh, store_dir=str(args.out / "runs"))
    training = service.create_lora_training_client(args.base_model, rank=8)  # one fresh seed for all
    rng = np.random.default_rng(0)  # the same data on every process
    data = []
    for _ in range(8):
        seq = rng.integers(0, 256, size=int(rng.integers(8, 40))).tolist()
        data.append(types.Datum(
            model_input=types.ModelInput.from_ints(seq[:-1]),
            loss_fn_inputs={"target_tokens": seq[1:], "weights": [1.0] * (len(seq) - 1)},
        ))  # fmt: skip
    losses = []
    for step in range(args.steps):
        result = training.forward_backward(data, "cross_entropy").result()
        training.optim_step(types.AdamParams(learning_rate=1e-2)).result()
        losses.append(result.metrics["loss:sum"])
        if distributed.is_primary():
            print(f"step {step}: loss {losses[-1]:.4f}", flush=True)
    path = training.save_state("final").result().path
    # Rollouts: unseeded sampling draws one seed (process 0's) for every process.
    sampler = training.save_weights_and_get_sampling_client()
    params = types.SamplingParams(max_tokens=8, temperature=1.0)
    sampled = sampler.sample(data[0].model_input, 2, params).result()
    args.out.mkdir(parents=True, exist_ok=True)
    record = {
        "process": jax.process_index(),
        "losses": losses,
        "checkpoint": path,
        "mesh": mesh,
        "samples": [s.tokens for s in sampled.sequences],
    }
    (args.out / f"losses.{jax.process_index()}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
