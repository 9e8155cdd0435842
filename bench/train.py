"""LoRA training throughput: jtinker vs torch + PEFT, measured in the same run.

    python bench/train.py [--model DIR] [--batch 8] [--seq 128] [--rank 32] [--steps 6] [--out FILE]
                          [--dtype float32|bfloat16] [--skip-torch]

Both sides train the same model files on the same data: rank-32 LoRA on all linear layers
(q, k, v, o, gate, up, down), in ``--dtype`` (f32 by default; with bf16 the base weights and
activations are bf16 and the LoRA master weights f32 on both sides), AdamW, summed token
cross-entropy. One step is ``forward_backward`` + ``optim_step``. Reported: median tokens/s over
the timed steps (warm-up excluded), the first step (compile) separately, the ratio, and MFU against a
measured matmul peak.

On a GPU (issue #9's H100 run: a Llama-3.2-1B-shaped model in bf16 at 8 x 2048, no torch),
``bash bench/gpu_train.sh`` makes the model and runs::

    python bench/train.py --model DIR --batch 8 --seq 2048 --dtype bfloat16 --skip-torch

Both run in one process after ``import jtinker``, which sets glibc's allocator up for XLA:CPU
(``jtinker/hostmem.py``; torch gains 1-5% from it too). ``JTINKER_TUNE_MALLOC=0`` measures without.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
from workload import add_workload_args, make_datums, make_rows, resolve_model

LINEAR_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def matmul_peak_gflops(dtype: str = "float32", n: int | None = None, repeats: int = 10) -> float:
    """Measured matmul throughput of this machine's first device through XLA, in ``dtype``
    (``n``: the square size; 2048 on a CPU, 8192 on an accelerator). Low-precision operands multiply
    into f32 results, as the model's products do (XLA:CPU's native bf16 kernels need that form)."""
    import jax
    import jax.numpy as jnp

    n = n or (2048 if jax.default_backend() == "cpu" else 8192)
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.dtype(dtype))
    f = jax.jit(lambda x: jnp.matmul(x, x, preferred_element_type=jnp.float32))
    f(a).block_until_ready()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * n**3 / min(times) / 1e9


def model_flops_per_token(config, seq: int, rank: int) -> float:
    """LoRA training FLOPs per token: forward + input-gradient backward (base weights get no grads).

    Matmuls: 2 FLOPs per weight forward, 2 more for the activation gradient. Attention scores and
    values add 4·T·q_size per token forward (causal: half used, counted in full as is customary),
    doubled for backward. LoRA factors: 6 FLOPs per LoRA weight (forward, both gradients).
    """
    h, i, q, kv, n = (
        config.hidden_size,
        config.intermediate_size,
        config.q_size,
        config.kv_size,
        config.num_layers,
    )
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * i
    lora = n * rank * ((h + q) + 2 * (h + kv) + (q + h) + 2 * (h + i) + (i + h))
    dense = n * per_layer + h * config.vocab_size
    attention = n * 4 * seq * q
    return 4 * dense + 2 * attention + 6 * lora


def bench_jtinker(model_dir: Path, tokens: np.ndarray, rank: int, steps: int, dtype: str) -> dict:
    import jax.numpy as jnp

    import jtinker as tinker
    from jtinker import types

    service = tinker.ServiceClient(dtype=jnp.dtype(dtype))
    training = service.create_lora_training_client(str(model_dir), rank=rank, seed=0, train_unembed=False)
    data = make_datums(types, tokens)
    adam = types.AdamParams(learning_rate=1e-4)
    times, losses = [], []
    for _ in range(steps + 1):
        t = time.perf_counter()
        fb = training.forward_backward(data, "cross_entropy")
        training.optim_step(adam).result()
        losses.append(fb.result().metrics["loss:sum"])
        times.append(time.perf_counter() - t)
    return {"first_step_s": times[0], "step_s": statistics.median(times[1:]), "losses": losses}


def bench_torch(model_dir: Path, tokens: np.ndarray, rank: int, steps: int, dtype: str) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, dtype))
    # PEFT keeps a bf16 model's adapters in f32 (autocast_adapter_dtype), as jtinker does.
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=32, target_modules=LINEAR_TARGETS))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.0)
    ids = torch.tensor(tokens)
    inputs, targets = ids[:, :-1], ids[:, 1:]
    times, losses = [], []
    for _ in range(steps + 1):
        t = time.perf_counter()
        logits = model(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1).float(), targets.flatten(), reduction="sum"
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        times.append(time.perf_counter() - t)
    return {"first_step_s": times[0], "step_s": statistics.median(times[1:]), "losses": losses}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_workload_args(parser, steps=6)
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument(
        "--dtype", choices=("float32", "bfloat16"), default="float32", help="weights and compute, both sides"
    )
    parser.add_argument("--out", type=Path, default=Path("bench_results/train.json"))
    args = parser.parse_args(argv)
    import jax

    from jtinker import hostmem  # before any JAX or torch work: see jtinker/hostmem.py
    from jtinker.models import ModelConfig

    if not args.skip_torch:
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
    model_dir = resolve_model(args.model)
    config = ModelConfig.from_pretrained(model_dir)
    tokens = make_rows(args.batch, args.seq, config.vocab_size)
    num_tokens = args.batch * args.seq

    peak = matmul_peak_gflops(args.dtype)
    ours = bench_jtinker(model_dir, tokens, args.rank, args.steps, args.dtype)
    theirs = None if args.skip_torch else bench_torch(model_dir, tokens, args.rank, args.steps, args.dtype)
    flops = model_flops_per_token(config, args.seq, args.rank) * num_tokens
    result = {
        "benchmark": "train",
        "model": str(model_dir),
        "params": config.param_count(),
        "batch": args.batch,
        "seq": args.seq,
        "rank": args.rank,
        "dtype": args.dtype,
        "device": jax.devices()[0].device_kind,
        "malloc_tuned": hostmem.tuned,
        "matmul_peak_gflops": peak,
        "jtinker_tokens_per_s": num_tokens / ours["step_s"],
        "jtinker_first_step_s": ours["first_step_s"],
        "jtinker_mfu": flops / ours["step_s"] / 1e9 / peak,
        "jtinker_losses": ours["losses"],
    }
    if theirs is not None:
        result.update(
            torch_tokens_per_s=num_tokens / theirs["step_s"],
            torch_first_step_s=theirs["first_step_s"],
            torch_mfu=flops / theirs["step_s"] / 1e9 / peak,
            torch_losses=theirs["losses"],
            speedup=theirs["step_s"] / ours["step_s"],
        )
    tuned = ", glibc malloc tuned" if hostmem.tuned else ""
    print(f"{args.dtype} matmul peak: {peak:.0f} GFLOP/s ({result['device']}{tuned})")
    print(
        f"jtinker: {result['jtinker_tokens_per_s']:.0f} tokens/s, MFU {result['jtinker_mfu']:.1%}, "
        f"first step {ours['first_step_s']:.1f} s"
    )
    if theirs is not None:
        print(
            f"torch+PEFT: {result['torch_tokens_per_s']:.0f} tokens/s, MFU {result['torch_mfu']:.1%}, "
            f"first step {theirs['first_step_s']:.1f} s"
        )
        print(f"speedup jtinker / torch+PEFT: {result['speedup']:.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
