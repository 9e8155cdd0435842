"""Train briefly, save the state, and export the LoRA as a PEFT adapter directory.

Run: ``python examples/export_to_peft.py [OUT_DIR]`` (offline, tiny model, a few seconds on CPU).

The adapter loads with ``peft.PeftModel.from_pretrained(base, OUT_DIR)`` and in vLLM. The same is
available from the shell as ``jtinker export tinker://... OUT_DIR --format peft``.
"""

from __future__ import annotations

import argparse
import random
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jtinker as tinker
from jtinker import types
from jtinker.cli import load_checkpoint_lora
from jtinker.export import export_peft
from jtinker.quickstart import Codec, make_example, make_splits, quickstart_model_dir, sft_datum


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", default=None, help="default: a new temporary directory")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args(argv)
    out_dir = Path(args.out_dir or tempfile.mkdtemp(prefix="jtinker_peft_"))

    model_dir = quickstart_model_dir()
    service = tinker.ServiceClient()
    training = service.create_lora_training_client(base_model=str(model_dir), rank=16, seed=0)
    codec = Codec(training.get_tokenizer(), model_dir)
    train_dates, _ = make_splits(0, eval_size=64)
    rng = random.Random(0)
    for _ in range(args.steps):
        data = [sft_datum(codec, make_example(d)) for d in rng.sample(train_dates, 16)]
        training.forward_backward(data, "cross_entropy")
        training.optim_step(types.AdamParams(learning_rate=3e-3))

    # save_state resolves once the checkpoint is durable; its tinker:// path names it from now on.
    state_path = training.save_state("peft_export", overwrite=True).result().path
    # Reads only the small adapter (plus the base config), not the base weights.
    lora, config, model_dir, _ = load_checkpoint_lora(service.store, state_path)
    peft_dir = export_peft(config, lora, out_dir, base_model_name_or_path=str(model_dir))
    print(f"state  {state_path}")
    print(f"PEFT   {peft_dir}")
    return {
        "state_path": state_path,
        "peft_dir": str(peft_dir),
        "files": sorted(p.name for p in peft_dir.iterdir()),
    }


if __name__ == "__main__":
    main()
