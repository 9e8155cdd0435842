"""Run configs for ``jtinker train``: YAML or TOML files validated into frozen dataclasses.

A config names the job (``kind: sft | rl | dpo``), the base model, the data and the optimizer::

    kind: sft
    base_model: jtinker/tiny-qwen3
    out_dir: runs/sft_tiny
    steps: 100
    data: {train: data/date_sft.jsonl, batch_size: 16}
    optim: {learning_rate: 3e-3, schedule: cosine, warmup_steps: 10}

Every key is checked: an unknown or mistyped key is an error that names it (``optim.lerning_rate``) and
suggests the closest known one. ``key=value`` overrides (``optim.learning_rate=1e-4``) are parsed as
YAML scalars and checked the same way. Relative data paths are relative to the config file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

__all__ = ["ConfigError", "TrainConfig", "load_config", "config_to_dict"]

Kind = Literal["sft", "rl", "dpo"]


class ConfigError(ValueError):
    """A config that cannot be run; the message names the file and the offending key."""


@dataclasses.dataclass(frozen=True)
class LoraSection:
    rank: int = 32
    seed: int | None = None  # None: the run's seed
    train_attn: bool = True
    train_mlp: bool = True
    train_unembed: bool = True


@dataclasses.dataclass(frozen=True)
class DataSection:
    train: str = ""  # JSONL: chat ``messages``, ``prompt``/``completion``, or preference rows
    eval: str | None = None  # held-out JSONL of the same kind
    batch_size: int = 8  # examples (SFT), preference pairs (DPO) or prompts (RL) per step
    shuffle: bool = True  # a seeded shuffle, reshuffled every epoch
    eval_size: int = 64  # held-out examples used per evaluation
    eval_max_tokens: int = 32  # greedy decode length of SFT's exact-match evaluation


@dataclasses.dataclass(frozen=True)
class OptimSection:
    learning_rate: float = 1e-4
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # the decay's floor, as a fraction of ``learning_rate``
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0  # 0 disables clipping


@dataclasses.dataclass(frozen=True)
class RLSection:
    group_size: int = 8  # samples per prompt; advantages are reward minus the group mean
    max_tokens: int = 16
    temperature: float = 1.0
    loss: Literal["importance_sampling", "ppo", "cispo", "gspo"] = "importance_sampling"
    # exact_match, match_fraction (share of answer characters right, in place: a graded signal), or
    # "module:function" / "path/file.py:function" taking (prompt, completion, answer) -> float
    reward: str = "exact_match"


@dataclasses.dataclass(frozen=True)
class DPOSection:
    beta: float = 0.1  # reference logprobs come from the base model (the adapter switched off)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    kind: Kind = "sft"
    base_model: str = ""  # a model directory, a registered name, or a built-in tiny model
    out_dir: str = ""  # metrics.jsonl, checkpoints.jsonl, config.json and the TensorBoard logs
    steps: int = 100
    seed: int = 0
    loss: Literal["cross_entropy"] = "cross_entropy"  # SFT's loss
    dtype: Literal["float32", "bfloat16"] = "float32"
    mesh: str | None = None  # e.g. "fsdp=8" or "dp=2,fsdp=4"; default: one device
    init_from: str | None = None  # weights to start from: a tinker:// path, or an out_dir of an earlier run
    resume: bool = True  # continue from the last checkpoint in out_dir, data position included
    save_every: int = 0  # steps between checkpoints; 0 saves only at the end
    eval_every: int = 0  # steps between evaluations on data.eval; 0 evaluates only at the end
    tensorboard: bool = False  # also write TensorBoard events to out_dir/tensorboard (tensorboardX)
    progress: bool = True  # progress bars on stderr
    lora: LoraSection = LoraSection()
    data: DataSection = DataSection()
    optim: OptimSection = OptimSection()
    rl: RLSection = RLSection()
    dpo: DPOSection = DPOSection()

    def __post_init__(self) -> None:
        for field, value in (("base_model", self.base_model), ("out_dir", self.out_dir)):
            if not value:
                raise ConfigError(f"{field}: required")
        if not self.data.train:
            raise ConfigError("data.train: required (a JSONL file)")
        for field, value, low in (
            ("steps", self.steps, 1),
            ("save_every", self.save_every, 0),
            ("eval_every", self.eval_every, 0),
            ("lora.rank", self.lora.rank, 1),
            ("data.batch_size", self.data.batch_size, 1),
            ("data.eval_size", self.data.eval_size, 1),
            ("data.eval_max_tokens", self.data.eval_max_tokens, 1),
            ("optim.warmup_steps", self.optim.warmup_steps, 0),
            ("rl.group_size", self.rl.group_size, 1),
            ("rl.max_tokens", self.rl.max_tokens, 1),
        ):
            if value < low:
                raise ConfigError(f"{field}: must be >= {low}, got {value}")
        for field, value in (
            ("optim.learning_rate", self.optim.learning_rate),
            ("dpo.beta", self.dpo.beta),
        ):
            if not value > 0:
                raise ConfigError(f"{field}: must be > 0, got {value}")
        if not 0 <= self.optim.min_lr_ratio <= 1:
            raise ConfigError(f"optim.min_lr_ratio: must be in [0, 1], got {self.optim.min_lr_ratio}")
        if self.rl.temperature < 0:
            raise ConfigError(f"rl.temperature: must be >= 0, got {self.rl.temperature}")
        if self.rl.reward not in ("exact_match", "match_fraction") and ":" not in self.rl.reward:
            raise ConfigError(
                "rl.reward: expected 'exact_match', 'match_fraction' or 'module:function', "
                f"got {self.rl.reward!r}"
            )


def load_config(
    path: str | Path, overrides: Sequence[str] = (), *, base_dir: str | Path | None = None
) -> TrainConfig:
    """Reads a ``.yaml``/``.yml``/``.toml``/``.json`` config, applies ``key=value`` overrides, validates.

    Relative ``data.train`` / ``data.eval`` paths are resolved against the config file's directory.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    raw = _read(path)
    for item in overrides:
        _apply_override(raw, item)
    config = _build(TrainConfig, raw, str(path), "")
    root = Path(base_dir) if base_dir is not None else path.resolve().parent
    data = config.data
    resolved = {
        k: str(root / v) if v is not None and not Path(v).is_absolute() else v
        for k, v in (("train", data.train), ("eval", data.eval))
    }
    return dataclasses.replace(config, data=dataclasses.replace(data, **resolved))


def config_to_dict(config: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def _read(path: Path) -> dict[str, Any]:
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    try:
        if suffix in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(text)
        elif suffix == ".toml":
            raw = tomllib.loads(text)
        elif suffix == ".json":
            raw = json.loads(text)
        else:
            raise ConfigError(f"{path}: unknown config format {suffix!r}; use .yaml, .toml or .json")
    except ConfigError:
        raise
    except Exception as exc:  # the parser's own message says where
        raise ConfigError(f"{path}: cannot parse: {' '.join(str(exc).split())}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(raw).__name__}")
    return raw


def _apply_override(raw: dict[str, Any], item: str) -> None:
    import yaml

    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r}: expected key=value, e.g. optim.learning_rate=1e-4")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    *parents, leaf = key.strip().split(".")
    node = raw
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {part} is not a section")
        node = child
    node[leaf] = value


def _build(cls: type, raw: Any, source: str, prefix: str) -> Any:
    """``cls(**raw)`` with every key and value checked against ``cls``'s type hints."""
    where = prefix.rstrip(".") or "the top level"
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: {where}: expected a mapping, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in raw.items():
        name = f"{prefix}{key}"
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ConfigError(
                f"{source}: {name}: unknown key{hint}; known keys here: {', '.join(sorted(fields))}"
            )
        kwargs[key] = _check(hints[key], value, source, name)
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {prefix}{exc}") from None


def _check(hint: Any, value: Any, source: str, name: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, source, f"{name}.")
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _check(inner, value, source, name)
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{source}: {name}: must be one of {choices}, got {value!r}")
        return value
    if hint is float and isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
        with contextlib.suppress(ValueError):
            value = float(value)
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, int | float) and not isinstance(value, bool),
        str: isinstance(value, str),
    }.get(hint)
    if ok is None:
        raise TypeError(f"unsupported config type {hint!r} for {name}")
    if not ok:
        raise ConfigError(f"{source}: {name}: expected {hint.__name__}, got {value!r}")
    return float(value) if hint is float else value
