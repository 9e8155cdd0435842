"""Where things live: ``JTINKER_HOME`` and the base-model name registry.

A ``base_model`` is resolved, in order, as
1. a local Hugging Face directory (it has a ``config.json``);
2. a name from ``JTINKER_MODELS`` (``name=/path,other=/path``) or ``$JTINKER_HOME/models.json``
   (``{"name": "/path"}``);
3. a built-in tiny model (``jtinker/tiny-qwen3``, ``jtinker/small-qwen3``, ...), made on first use;
   ``jtinker/quickstart`` is the quickstart's model, shaped to learn its date task quickly.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

BUILTIN_PREFIX = "jtinker/"
BUILTIN_FAMILIES = ("llama", "qwen2", "qwen3", "qwen3_moe")
BUILTIN_SIZES = ("tiny", "small")
QUICKSTART_NAME = f"{BUILTIN_PREFIX}quickstart"
_MAKE_LOCK = threading.Lock()


def home() -> Path:
    """``$JTINKER_HOME``, default ``~/.jtinker``."""
    return Path(os.environ.get("JTINKER_HOME", Path.home() / ".jtinker")).expanduser()


def env_int(name: str, default: int | None = None) -> int | None:
    """The integer environment variable ``name`` (``default`` when unset); any other text is an
    error that names the variable."""
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{name}: must be an integer, got {text!r}") from None


def builtin_names() -> list[str]:
    sized = [f"{BUILTIN_PREFIX}{size}-{family}" for size in BUILTIN_SIZES for family in BUILTIN_FAMILIES]
    return [*sized, QUICKSTART_NAME]


def registered_models() -> dict[str, str]:
    """Names from ``$JTINKER_HOME/models.json`` and ``JTINKER_MODELS`` (the latter wins)."""
    names: dict[str, str] = {}
    file = home() / "models.json"
    if file.is_file():
        names.update(json.loads(file.read_text()))
    for entry in filter(None, os.environ.get("JTINKER_MODELS", "").split(",")):
        name, sep, path = entry.partition("=")
        if not sep:
            raise ValueError(f"JTINKER_MODELS: entry {entry!r} is not name=path")
        names[name.strip()] = path.strip()
    return names


def resolve_base_model(base_model: str) -> Path:
    """The local directory of ``base_model``; ValueError naming ``base_model`` if unknown."""
    if not isinstance(base_model, str) or not base_model:
        raise ValueError(f"base_model: expected a model name or directory, got {base_model!r}")
    path = Path(base_model).expanduser()
    if (path / "config.json").is_file():
        return path
    registered = registered_models()
    if base_model in registered:
        path = Path(registered[base_model]).expanduser()
        if not (path / "config.json").is_file():
            raise ValueError(f"base_model: {base_model!r} is registered as {path}, which has no config.json")
        return path
    if base_model == QUICKSTART_NAME:
        from jtinker.quickstart import quickstart_model_dir

        with _MAKE_LOCK:
            return quickstart_model_dir()
    if base_model in builtin_names():
        size, family = base_model.removeprefix(BUILTIN_PREFIX).split("-")
        out = home() / "models" / base_model.removeprefix(BUILTIN_PREFIX)
        with _MAKE_LOCK:
            if not (out / "config.json").is_file():
                from jtinker.models import make_tiny

                make_tiny(out, family=family, size=size)
        return out
    known = sorted(registered) + builtin_names()
    raise ValueError(
        f"base_model: unknown model {base_model!r}; pass a local Hugging Face directory or one of {known} "
        "(register more with JTINKER_MODELS=name=/path or $JTINKER_HOME/models.json)"
    )
