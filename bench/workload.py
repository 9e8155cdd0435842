"""The workload the training benchmarks share: the model, the rows of tokens, their Datums, and the
command-line flags that size them. Benchmark scripts import it from ``bench/`` (their own folder)."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

DEFAULT_MODEL = "jtinker/small-qwen3"


def add_workload_args(parser: argparse.ArgumentParser, *, steps: int, steps_help: str | None = None) -> None:
    """``--model --batch --seq --rank --steps``, with the defaults every benchmark uses."""
    parser.add_argument("--model", type=Path, default=None, help="HF model dir (default: the small Qwen3)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--steps", type=int, default=steps, help=steps_help)


def resolve_model(path: Path | None) -> Path:
    """``--model``, or the built-in small Qwen3 (made on first use)."""
    from jtinker import registry

    return (path or registry.resolve_base_model(DEFAULT_MODEL)).resolve()


def make_rows(batch: int, seq: int, vocab: int = 256, seed: int = 0) -> np.ndarray:
    """``[batch, seq + 1]`` random token ids below ``min(vocab, 256)``."""
    return np.random.default_rng(seed).integers(0, min(vocab, 256), size=(batch, seq + 1))


def make_datums(ns, rows: np.ndarray) -> list:
    """One cross-entropy Datum per row (every next token weighted 1). ``ns``: ``jtinker.types`` or
    the SDK's ``tinker.types`` (same constructors)."""
    return [
        ns.Datum(
            model_input=ns.ModelInput.from_ints(row[:-1].tolist()),
            loss_fn_inputs={
                "target_tokens": ns.TensorData.from_numpy(row[1:].astype(np.int64)),
                "weights": ns.TensorData.from_numpy(np.ones(len(row) - 1, np.float32)),
            },
        )
        for row in rows
    ]
