"""The ``jtinker`` command: quickstart, train, serve, sample, tiny models, checkpoints, export, bench.

Exit codes: 0 success, 1 runtime failure, 2 usage error. Failures print one line
(``jtinker: error: ...``) unless ``--debug`` is given, which shows the full traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

PROG = "jtinker"


class UsageError(Exception):
    """A bad command line that argparse cannot catch (exit code 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one ``jtinker: error: ...`` line raised as UsageError."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


# --------------------------------------------------------------------------------------------------
# Shared helpers (also used by the quickstart)


def load_checkpoint_lora(store: Any, path: str, base_model: str | None = None) -> tuple[Any, Any, Path, dict]:
    """``(lora, model_config, model_dir, meta)`` of a ``tinker://`` checkpoint in ``store``.

    The LoRA template is rebuilt from the checkpoint's metadata, as ``create_sampling_client``
    does, so only the small adapter is read; the base weights are not loaded.
    """
    from jtinker import registry
    from jtinker.engine import lora_from_checkpoint
    from jtinker.models import ModelConfig

    name = base_model or store.read_meta(path)["base_model"]
    model_dir = registry.resolve_base_model(name)
    config = ModelConfig.from_pretrained(model_dir)
    lora, meta = lora_from_checkpoint(store, path, config, name)
    return lora, config, model_dir, meta


def export_checkpoint_peft(store: Any, path: str, out_dir: str | Path, base_model: str | None = None) -> Path:
    """Exports the adapter of a ``tinker://`` checkpoint in ``store`` as a PEFT adapter directory."""
    from jtinker.export import export_peft, peft_base_name

    lora, config, model_dir, meta = load_checkpoint_lora(store, path, base_model)
    base_name = peft_base_name(base_model or meta["base_model"], model_dir)
    return export_peft(config, lora, out_dir, base_model_name_or_path=base_name)


def _check_tinker_path(path: str) -> str:
    from jtinker.checkpoints import CheckpointPath

    try:
        CheckpointPath.parse(path, "CHECKPOINT_PATH")
    except ValueError as e:
        raise UsageError(str(e)) from None
    return path


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------------------------------
# Commands


def cmd_quickstart(args: argparse.Namespace) -> int:
    from jtinker import quickstart

    config = quickstart.QuickstartConfig(
        out_dir=Path(args.out),
        base_model=args.base_model,
        seed=args.seed,
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        rank=args.rank,
        eval_size=args.eval_size,
        progress=not args.no_progress,
    )
    summary = quickstart.run(config)
    if summary["accuracy_after"] < quickstart.TARGET_ACCURACY:
        print(
            f"{PROG}: warning: held-out accuracy {summary['accuracy_after']:.3f} is below "
            f"{quickstart.TARGET_ACCURACY} (try more --steps or another --lr)",
            file=sys.stderr,
        )
    return 0


def cmd_make_tiny_model(args: argparse.Namespace) -> int:
    from jtinker.models import make_tiny

    out = make_tiny(args.out_dir, family=args.family, size=args.size, seed=args.seed, shards=args.shards)
    print(f"wrote a {args.size} {args.family} model to {out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from jtinker.checkpoints import CheckpointStore
    from jtinker.export import export_merged, export_peft, peft_base_name

    path = _check_tinker_path(args.checkpoint_path)
    lora, config, model_dir, meta = load_checkpoint_lora(CheckpointStore(), path, args.base_model)
    full = meta["lora"].get("full_finetune", False)
    if full and args.format == "peft":
        raise ValueError(f"{path} is a full fine-tune, not an adapter: export it with --format merged")
    if full:  # f32 master weights, written in the base model's dtype unless --dtype says otherwise
        dtype = args.dtype or meta.get("dtype", "float32")
        out = export_merged(model_dir, config, lora.weights, None, args.out_dir, dtype=dtype)
        print(f"wrote merged model (full fine-tune, {dtype}) to {out}")
    elif args.format == "peft":
        base_name = peft_base_name(args.base_model or meta["base_model"], model_dir)
        out = export_peft(config, lora, args.out_dir, base_model_name_or_path=base_name)
        print(f"wrote PEFT adapter (rank {lora.rank}, targets {', '.join(lora.targets)}) to {out}")
    else:
        import jax.numpy as jnp

        from jtinker.models import load_pretrained

        _, params = load_pretrained(model_dir, dtype=jnp.float32)
        out = export_merged(model_dir, config, params, lora, args.out_dir, dtype=args.dtype)
        print(f"wrote merged model ({args.dtype or 'float32'}) to {out}")
    return 0


def _fit_to_adapter(imported: Any, template: Any) -> dict:
    """``imported``'s weights in ``template``'s layout and scale, with the same function.

    Targets the adapter lacks get ``b = 0`` (no update); ``b`` is rescaled so that
    ``a @ b * scale`` is unchanged under the template's alpha (and no rsLoRA).
    """
    import jax.numpy as jnp

    ratio = imported.scale / template.scale
    ours = template.targets_tree()
    theirs = imported.targets_tree()
    fitted = {}
    for target, ab in ours.items():
        if target in theirs:
            src = theirs[target]
            fitted[target] = {
                "a": src["a"].astype(ab["a"].dtype),
                "b": (src["b"] * ratio).astype(ab["b"].dtype),
            }
        else:
            fitted[target] = {"a": ab["a"], "b": jnp.zeros_like(ab["b"])}
    weights: dict = {}
    for target, ab in fitted.items():
        if target == "lm_head":
            weights[target] = ab
        else:
            weights.setdefault("layers", {})[target] = ab
    return weights


def cmd_import_peft(args: argparse.Namespace) -> int:
    import jtinker as tinker
    from jtinker import registry
    from jtinker.checkpoints import validate_name
    from jtinker.export import import_peft
    from jtinker.models import ModelConfig
    from jtinker.models.lora import ATTN_TARGETS, MLP_TARGETS, UNEMBED_TARGET

    try:
        validate_name(args.name, "--name")
    except ValueError as e:
        raise UsageError(str(e)) from None
    model_dir = registry.resolve_base_model(args.base_model)
    imported = import_peft(args.adapter_dir, ModelConfig.from_pretrained(model_dir))
    targets = set(imported.targets)
    service = tinker.ServiceClient()
    training = service.create_lora_training_client(
        base_model=args.base_model,
        rank=imported.rank,
        seed=0,
        train_attn=bool(targets & set(ATTN_TARGETS)),
        train_mlp=bool(targets & set(MLP_TARGETS)),
        train_unembed=UNEMBED_TARGET in targets,
    )
    # The Tinker API has no call that sets adapter weights; the fresh adapter (Adam state zero,
    # step 0) only needs its LoRA replaced, on its worker so it is ordered with other requests.
    adapter = training._adapter
    weights = _fit_to_adapter(imported, adapter.lora)
    training._submit(lambda: setattr(adapter, "lora", adapter.lora.replace(weights=weights))).result()
    path = training.save_state(args.name).result().path
    print(f"imported {args.adapter_dir} (rank {imported.rank}, targets {', '.join(imported.targets)})")
    print(path)
    return 0


def cmd_checkpoints(args: argparse.Namespace) -> int:
    from jtinker.checkpoints import CheckpointStore

    store = CheckpointStore()
    if args.action == "list":
        found = store.list_checkpoints(args.run)
        if args.json:
            print(json.dumps([{k: v for k, v in c.items() if k != "meta"} for c in found], indent=2))
            return 0
        if not found:
            print(f"no checkpoints under {store.root}")
            return 0
        rows = [
            (
                c["tinker_path"],
                c["checkpoint_type"],
                str(c["meta"].get("step", "")),
                (c["time"] or "")[:19].replace("T", " "),
                _human_bytes(c["size_bytes"]),
                str(c["meta"].get("base_model", "")),
            )
            for c in found
        ]
        header = ("PATH", "TYPE", "STEP", "CREATED (UTC)", "SIZE", "BASE MODEL")
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
        for row in [header, *rows]:
            print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)) + "  " + row[-1])
        return 0
    path = _check_tinker_path(args.path)
    if args.action == "show":
        parsed, directory = store.resolve(path)
        meta = store.read_meta(path)
        size = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
        print(
            json.dumps(
                {"tinker_path": path, "directory": str(directory), "size_bytes": size, **meta}, indent=2
            )
        )
        return 0
    store.delete(path)
    print(f"deleted {path}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    import jtinker as tinker
    from jtinker.sampling import SampleRequest, TextStream

    if args.base_model is None and args.model_path is None:
        raise UsageError("sample: --base-model or --model-path is required (see 'jtinker sample --help')")
    if args.model_path is not None:
        _check_tinker_path(args.model_path)
    if args.system is not None and not args.chat:
        raise UsageError("sample: --system needs --chat")
    service = tinker.ServiceClient()
    client = service.create_sampling_client(model_path=args.model_path, base_model=args.base_model)
    tokenizer = client.get_tokenizer()
    if args.chat and not getattr(tokenizer, "chat_template", None):
        raise UsageError("sample: --chat needs a model whose tokenizer has a chat template")
    if args.chat:
        from jtinker.data import template_tokens  # rendered as `jtinker train` renders chat data
    # The model's EOS tokens, and the tokenizer's (a chat model's end of turn).
    eos = () if tokenizer.eos_token_id is None else (tokenizer.eos_token_id,)
    stops = tuple(sorted({*client.model_config.eos_token_ids, *eos}))
    messages = [{"role": "system", "content": args.system}] if args.system else []

    def reply(prompt: list[int]) -> str:
        """Samples a completion of ``prompt``, printed as it decodes; returns its text."""
        stream = TextStream(tokenizer)
        request = SampleRequest(
            prompt=prompt,
            num_samples=1,
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            seed=args.seed,
            stop_token_ids=stops,
            on_tokens=lambda _, tokens: print(stream.piece(tokens), end="", flush=True),
        )
        ((tokens, _, _),) = client.submit_request(request).result().sequences
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        print(stream.end(text), flush=True)
        return text

    def answer(line: str) -> None:
        if not args.chat:
            reply(tokenizer.encode(line))
            return
        messages.append({"role": "user", "content": line})
        text = reply(template_tokens(tokenizer, messages, gen_prompt=True))
        messages.append({"role": "assistant", "content": text})

    if args.prompt is not None:
        answer(args.prompt)
        return 0
    interactive = sys.stdin.isatty()
    if interactive:
        what = "a message" if args.chat else "a prompt"
        print(f"enter {what} per line; Ctrl-D to quit", file=sys.stderr)
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            return 0
        line = line.rstrip("\n")
        if line:
            answer(line)


def cmd_bench(args: argparse.Namespace) -> int:
    """Benchmarks live in the source tree (bench/), next to the package. ``--all`` runs bench/report.py,
    which runs each benchmark in its own process and regenerates BENCHMARKS.md."""
    import runpy

    if args.all and args.name is not None:
        raise UsageError(f"bench: give a benchmark name or --all, not both (got {args.name!r})")
    if not args.all and args.name is None:
        raise UsageError(
            "bench: name a benchmark (train, grpo, sample, server, memory, compile) or pass --all"
        )
    name = "report" if args.all else args.name
    script = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    if not script.is_file():
        raise ValueError(f"bench: no benchmark {name!r} at {script} (benchmarks need a source checkout)")
    rest = list(args.rest)
    if args.all:
        rest += [x for skip in args.skip for x in ("--skip", skip)] + ["--reuse"] * args.reuse
        rest += ["--command", " ".join(["jtinker bench --all", *rest])]
    sys.argv = [str(script), *rest]
    sys.path.insert(0, str(script.parent))  # as `python bench/NAME.py` has it: bench/workload.py imports
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as e:  # a benchmark's argparse --help / error, or report.py's exit status
        return e.code if isinstance(e.code, int) else int(e.code is not None)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from jtinker import trainer
    from jtinker.configs import ConfigError, load_config

    overrides = list(args.overrides)
    if args.out:
        overrides.append(f"out_dir={args.out}")
    if args.no_progress:
        overrides.append("progress=false")
    try:
        config = load_config(args.config, overrides)
    except ConfigError as e:
        raise UsageError(str(e)) from None
    print(f"{config.kind} on {config.base_model} -> {Path(config.out_dir).resolve()}")
    try:
        trainer.run(config)
    except ConfigError as e:  # e.g. an out_dir that holds another run
        raise UsageError(str(e)) from None
    return 0


# --------------------------------------------------------------------------------------------------
# Parser


def build_parser() -> argparse.ArgumentParser:
    """The ``jtinker`` argument parser (subcommands, each with its own --help)."""
    parser = _Parser(
        prog=PROG,
        description="jtinker: a JAX post-training runtime that speaks the Tinker API.",
        epilog="Checkpoints and built-in models live under $JTINKER_HOME (default ~/.jtinker).",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    # --debug is accepted after the subcommand too; SUPPRESS keeps it from resetting the global one.
    common = _Parser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    from jtinker.quickstart import QuickstartConfig

    defaults = QuickstartConfig()
    p = sub.add_parser(
        parents=[common],
        name="quickstart",
        help="train a LoRA on a synthetic task and export it (offline, about a minute on CPU)",
        description=(
            "Makes a tiny model, trains a LoRA with SFT through the in-process Tinker API on date-format "
            "conversion ('2024-03-15 -> ' => '15/03/2024'), reports held-out exact match before and after, "
            "saves the training state and exports a PEFT adapter. Writes OUT/summary.json."
        ),
    )
    p.add_argument("--out", default=str(defaults.out_dir), help="output directory (default: %(default)s)")
    p.add_argument(
        "--base-model",
        metavar="M",
        help="a model directory or registered name to train on (default: a tiny model made locally)",
    )
    p.add_argument(
        "--seed", type=int, default=defaults.seed, help="seed for data split, LoRA init (default: 0)"
    )
    p.add_argument(
        "--steps", type=_positive_int, default=defaults.steps, help="optimizer steps (default: %(default)s)"
    )
    p.add_argument(
        "--batch-size",
        type=_positive_int,
        default=defaults.batch_size,
        help="examples per step (default: %(default)s)",
    )
    p.add_argument(
        "--lr", type=float, default=defaults.learning_rate, help="peak learning rate (default: %(default)s)"
    )
    p.add_argument(
        "--rank", type=_positive_int, default=defaults.rank, help="LoRA rank (default: %(default)s)"
    )
    p.add_argument(
        "--eval-size",
        type=_positive_int,
        default=defaults.eval_size,
        help="held-out examples (default: %(default)s)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_quickstart)

    p = sub.add_parser(
        parents=[common],
        name="make-tiny-model",
        help="write a tiny random Hugging Face model directory",
        description="Writes a randomly initialised model (config, safetensors, byte-level tokenizer) "
        "that loads in transformers and jtinker.",
    )
    p.add_argument("out_dir", metavar="OUT_DIR", help="directory to write")
    p.add_argument(
        "--family",
        choices=("llama", "qwen2", "qwen3", "qwen3_moe"),
        default="qwen3",
        help="default: %(default)s",
    )
    p.add_argument(
        "--size",
        choices=("tiny", "small", "1b"),  # models.tiny.SIZES (not imported: the CLI parses without JAX)
        default="tiny",
        help="tiny, small (30M) or 1b (Llama-3.2-1B's shape, for GPU benchmarks); default: %(default)s",
    )
    p.add_argument("--seed", type=int, default=0, help="weight init seed (default: 0)")
    p.add_argument("--shards", type=_positive_int, default=1, help="safetensors shards (default: 1)")
    p.set_defaults(func=cmd_make_tiny_model)

    p = sub.add_parser(
        parents=[common],
        name="export",
        help="export a checkpoint as a PEFT adapter or a merged model",
        description="Exports tinker://<run>/<weights|sampler_weights>/<name> from the local store.",
    )
    p.add_argument("checkpoint_path", metavar="CHECKPOINT_PATH", help="tinker:// path of the checkpoint")
    p.add_argument("out_dir", metavar="OUT_DIR", help="directory to write")
    p.add_argument(
        "--format",
        choices=("peft", "merged"),
        required=True,
        help="peft: adapter_config.json + adapter_model.safetensors; merged: a full HF model directory",
    )
    p.add_argument("--base-model", metavar="M", help="base model (default: the one the checkpoint records)")
    p.add_argument(
        "--dtype", choices=("float32", "bfloat16", "float16"), help="merged weights dtype (default: float32)"
    )
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        parents=[common],
        name="import-peft",
        help="import a PEFT LoRA adapter as a trainable checkpoint",
        description="Loads a PEFT adapter into a new training client and saves it with save_state; "
        "prints the tinker:// path to continue training from "
        "(ServiceClient().create_training_client_from_state(path)).",
    )
    p.add_argument("adapter_dir", metavar="ADAPTER_DIR", help="directory with adapter_config.json")
    p.add_argument("--base-model", metavar="M", required=True, help="the adapter's base model")
    p.add_argument("--name", default="imported", help="checkpoint name (default: %(default)s)")
    p.set_defaults(func=cmd_import_peft)

    p = sub.add_parser(
        parents=[common],
        name="checkpoints",
        help="list, show or delete checkpoints",
        description="Checkpoints in the local store ($JTINKER_HOME/runs).",
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True, parser_class=_Parser)
    a = actions.add_parser(
        "list", parents=[common], help="list checkpoints, newest first", description="Lists checkpoints."
    )
    a.add_argument("--run", metavar="RUN_ID", help="only this training run")
    a.add_argument("--json", action="store_true", help="machine-readable output")
    a = actions.add_parser(
        "show", parents=[common], help="print a checkpoint's metadata", description="Prints metadata as JSON."
    )
    a.add_argument("path", metavar="PATH", help="tinker:// path")
    a = actions.add_parser(
        "delete", parents=[common], help="delete a checkpoint", description="Deletes one checkpoint."
    )
    a.add_argument("path", metavar="PATH", help="tinker:// path")
    p.set_defaults(func=cmd_checkpoints)

    p = sub.add_parser(
        parents=[common],
        name="sample",
        help="sample from a base model or a checkpoint",
        description="One completion of --prompt, or of each line read from stdin until EOF, printed as it "
        "decodes. With --chat, each line is the next user message of one conversation (the tokenizer's "
        "chat template; later turns reuse the earlier ones' keys and values).",
    )
    p.add_argument("--base-model", metavar="M", help="base model (default: the checkpoint's)")
    p.add_argument("--model-path", metavar="PATH", help="tinker:// checkpoint whose adapter to apply")
    p.add_argument("--prompt", help="the prompt text (default: read prompts from stdin)")
    p.add_argument("--max-tokens", type=_positive_int, default=64, help="default: %(default)s")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default: %(default)s)")
    p.add_argument("--seed", type=int, help="sampling seed")
    p.add_argument("--chat", action="store_true", help="converse: each line is a user message")
    p.add_argument("--system", metavar="TEXT", help="with --chat: the system message")
    p.set_defaults(func=cmd_sample)

    import jtinker.server  # cheap: the HTTP stack is imported only when serving

    p = sub.add_parser(
        "serve",
        parents=[common],
        help="serve the Tinker HTTP API (tinker SDK 0.38)",
        description="Serve the Tinker HTTP API over jtinker's engine.",
    )
    jtinker.server.build_parser(p)
    p.set_defaults(func=lambda args: jtinker.server.serve_from_args(args))

    p = sub.add_parser(
        "bench",
        parents=[common],
        help="run a benchmark from bench/, or all of them into BENCHMARKS.md (--all)",
        description="Runs bench/NAME.py from the source checkout with the remaining arguments; with --all, "
        "runs every benchmark (each in its own process, about 10-15 minutes on a small CPU machine) and "
        "regenerates BENCHMARKS.md.",
        epilog="examples: jtinker bench train --steps 3; jtinker bench --all --skip server",
    )
    p.add_argument("--all", action="store_true", help="run every benchmark and regenerate BENCHMARKS.md")
    p.add_argument(
        "--skip", action="append", default=[], metavar="NAME", help="with --all: do not run NAME (repeatable)"
    )
    p.add_argument("--reuse", action="store_true", help="with --all: only re-render from bench_results/")
    p.add_argument("name", nargs="?", help="benchmark: train, sample, server, memory, compile")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments passed to the benchmark")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser(
        "train",
        parents=[common],
        help="run an SFT, RL or DPO job from a config file (resumable)",
        usage=f"{PROG} train CONFIG [KEY=VALUE ...] [--out DIR] [--no-progress] [--debug]",
        description="Runs the job in CONFIG (YAML, TOML or JSON; see configs/). Rerunning a config "
        "resumes from the last checkpoint in its out_dir, data position included. Writes "
        "OUT/metrics.jsonl, OUT/checkpoints.jsonl, OUT/summary.json and a PEFT adapter.",
        epilog="KEY=VALUE overrides a config key (dotted inside sections), e.g.\n"
        "  jtinker train configs/sft_tiny.yaml steps=50 optim.learning_rate=1e-3 data.batch_size=8",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", metavar="CONFIG", help="a config file, e.g. configs/sft_tiny.yaml")
    p.add_argument("--out", metavar="DIR", help="output directory (same as out_dir=DIR)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _version() -> str:
    from jtinker import __version__

    return __version__


def _one_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    if isinstance(error, KeyError | AttributeError | TypeError | AssertionError) or not lines:
        text = f"{type(error).__name__}: {text}"  # these say little without their type
    return text


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``jtinker`` with ``argv`` (default ``sys.argv[1:]``) and returns the exit code."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        parser = build_parser()
        try:
            args, extra = parser.parse_known_args(argv)
            if getattr(args, "command", None) == "train":  # KEY=VALUE overrides, anywhere after CONFIG
                args.overrides = [x for x in extra if "=" in x and not x.startswith("-")]
                extra = [x for x in extra if x not in args.overrides]
            if extra:
                parser.error(f"unrecognized arguments: {' '.join(extra)}")
        except SystemExit as e:  # --help / --version
            return int(e.code or 0)
        if args.command is None:
            parser.print_help()
            return 2
        return int(args.func(args))
    except UsageError as e:
        if debug:
            raise
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (``jtinker checkpoints list | head``): stop quietly, and point stdout
        # at devnull so the interpreter's final flush does not complain either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as e:
        if debug:
            raise
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
