"""Checkpoints on local disk, addressed by Tinker paths, written by Orbax.

``tinker://<run_id>/weights/<name>`` (training state: LoRA, Adam state, step),
``tinker://<run_id>/sampler_weights/<name>`` (LoRA only) and
``tinker://<run_id>/external_weights/<name>`` (Hugging Face files for other frameworks, under its
``files/``: a PEFT adapter or a merged model) live under ``$JTINKER_HOME/runs/<run_id>/<kind>/<name>``.

A checkpoint whose metadata has an ``expires_at`` (Unix time, from a save's ``ttl_seconds``) is gone
once that time passes: reads and listings treat it as missing and delete it.

Every save is written by Orbax into a hidden staging directory (``.<name>.staging``, never a valid
checkpoint name) and swapped in when complete. A process killed at any point of a save leaves either
the previous or the new checkpoint complete under ``<name>`` (a swap cut short between its two
renames is finished on the next read) and nothing else that lists or loads.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import re
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from jtinker import registry
from jtinker.errors import NotFoundError

SCHEME = "tinker://"
KINDS = {"weights": "training", "sampler_weights": "sampler", "external_weights": "external"}
EXTERNAL = "external_weights"
_PATH_FORM = "tinker://<run_id>/<weights|sampler_weights|external_weights>/<name>"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
_COMPLETE_MARKER = "commit_success.txt"
_HIDDEN = re.compile(r"^\.(.+)\.(staging|old)$")  # a save's staging copy, a replaced copy


def _hidden(directory: Path, suffix: str) -> Path:
    """``.<name>.<suffix>`` beside ``directory``: a dot name is never listed, parsed or loaded."""
    return directory.with_name(f".{directory.name}.{suffix}")


def _complete(directory: Path) -> bool:
    return (directory / _COMPLETE_MARKER).is_file()


def _meta_file(directory: Path) -> Path:
    return directory / "meta" / "metadata"  # Orbax's JsonSave item "meta"


def expired(meta: dict, now: float | None = None) -> bool:
    """Whether a checkpoint's ``expires_at`` (in its metadata, or the server's record) has passed."""
    expires_at = meta.get("expires_at")
    return expires_at is not None and expires_at <= (time.time() if now is None else now)


def validate_name(name: str, field: str = "name") -> str:
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise ValueError(
            f"{field}: {name!r} is not a valid checkpoint name "
            "(1-128 letters, digits, '.', '_' or '-', not starting with a symbol, no '..')"
        )
    return name


@dataclasses.dataclass(frozen=True)
class CheckpointPath:
    run_id: str
    kind: str  # a key of KINDS
    name: str

    @classmethod
    def parse(cls, path: str, field: str = "path") -> CheckpointPath:
        parts = path[len(SCHEME) :].split("/") if isinstance(path, str) and path.startswith(SCHEME) else []
        if len(parts) != 3 or parts[1] not in KINDS or not _RUN_ID.match(parts[0]):
            raise ValueError(f"{field}: {path!r} is not a {_PATH_FORM} path")
        validate_name(parts[2], field)
        return cls(parts[0], parts[1], parts[2])

    def __str__(self) -> str:
        return f"{SCHEME}{self.run_id}/{self.kind}/{self.name}"


def new_run_id() -> str:
    """A fresh ``<uuid>:train:0``, identical on every process of a multi-process job."""
    import uuid

    import numpy as np

    from jtinker.distributed import from_process_zero

    # Every process must address the same checkpoint directories.
    value = uuid.UUID(bytes=from_process_zero(np.frombuffer(uuid.uuid4().bytes, np.uint32)).tobytes())
    return f"{value}:train:0"


class CheckpointStore:
    """Saves and restores adapter state; lists runs and checkpoints."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else registry.home() / "runs"
        self._pending: dict[Path, Future] = {}  # directory -> its save in flight (renames included)
        self._lock = threading.Lock()
        self._swap_lock = threading.Lock()  # renames of checkpoint directories, one at a time

    def directory(self, path: CheckpointPath) -> Path:
        return self.root / path.run_id / path.kind / path.name

    def resolve(self, path: str, field: str = "path") -> tuple[CheckpointPath, Path]:
        """The parsed path and its directory; NotFoundError if it is missing, incomplete or expired."""
        parsed = CheckpointPath.parse(path, field)
        self.wait_until_finished()
        directory = self.directory(parsed)
        self._recover(directory)
        if not _complete(directory) or self._live_meta(directory) is None:
            raise NotFoundError(f"{field}: checkpoint {path} not found")
        return parsed, directory

    def save(
        self,
        path: CheckpointPath,
        items: dict[str, Any],
        meta: dict[str, Any],
        *,
        overwrite: bool = False,
    ) -> Future:
        """Starts an async save; the device→host copy happens before this returns.

        The returned future resolves to ``str(path)`` once the checkpoint is durable on disk.
        """
        directory, staging = self._begin(path, overwrite)
        args = {k: ocp.args.StandardSave(v) for k, v in items.items()}
        args["meta"] = ocp.args.JsonSave(self._full_meta(path, meta))
        checkpointer = ocp.AsyncCheckpointer(ocp.CompositeCheckpointHandler())
        checkpointer.save(staging, args=ocp.args.Composite(**args))
        return self._finish_in_background(path, directory, staging, checkpointer.wait_until_finished)

    def save_files(
        self,
        path: CheckpointPath,
        write: Callable[[Path], None],
        meta: dict[str, Any],
        *,
        overwrite: bool = False,
    ) -> Future:
        """Starts a save of plain files: ``write(directory)`` fills its ``files/`` in the background
        (on process 0), swapped in complete like every save. The future resolves to ``str(path)``."""
        directory, staging = self._begin(path, overwrite)

        def write_all() -> None:
            if jax.process_index() != 0:
                return
            write(staging / "files")
            _meta_file(staging).parent.mkdir(parents=True)
            _meta_file(staging).write_text(json.dumps(self._full_meta(path, meta)))
            (staging / _COMPLETE_MARKER).write_text("")

        return self._finish_in_background(path, directory, staging, write_all)

    def _begin(self, path: CheckpointPath, overwrite: bool) -> tuple[Path, Path]:
        """Waits for a save of the same name in flight (this one sees the last), refuses an existing
        name unless ``overwrite``; returns the checkpoint's directory and its empty staging path (a save
        writes beside the target under a hidden name, then swaps in: first save or overwrite alike)."""
        directory = self.directory(path)
        with self._lock:
            previous = self._pending.get(directory)
        if previous is not None:
            wait_futures([previous])
        self._recover(directory)
        if directory.exists() and not overwrite:
            raise ValueError(f"name: checkpoint {path} already exists (pass overwrite=True to replace it)")
        directory.parent.mkdir(parents=True, exist_ok=True)
        staging = _hidden(directory, "staging")
        shutil.rmtree(staging, ignore_errors=True)  # left by a killed process
        return directory, staging

    @staticmethod
    def _full_meta(path: CheckpointPath, meta: dict[str, Any]) -> dict[str, Any]:
        return {**meta, "tinker_path": str(path), "created": dt.datetime.now(dt.UTC).isoformat()}

    def _finish_in_background(
        self, path: CheckpointPath, directory: Path, staging: Path, write: Callable[[], None]
    ) -> Future:
        """Runs ``write()`` (it completes ``staging``) off the caller's thread, then swaps it in (process
        0); the future, pending until then, resolves to ``str(path)``."""
        future: Future = Future()
        with self._lock:
            self._pending[directory] = future

        def finish() -> None:
            error = None
            try:
                write()
                if jax.process_index() == 0:
                    with self._swap_lock:
                        self._swap_in(staging, directory)
            except BaseException as e:
                error = e
            with self._lock:
                if self._pending.get(directory) is future:
                    del self._pending[directory]
            if error is None:
                future.set_result(str(path))
            else:
                future.set_exception(error)

        threading.Thread(target=finish, name="jtinker-save", daemon=True).start()
        return future

    def files(self, path: str, field: str = "path") -> dict[str, Path]:
        """An external-weights checkpoint's files, keyed by their path relative to its root."""
        parsed, directory = self.resolve(path, field)
        if parsed.kind != EXTERNAL:
            raise ValueError(f"{field}: {path} is not an external weights checkpoint ({EXTERNAL}/<name>)")
        root = directory / "files"
        return {f.relative_to(root).as_posix(): f for f in sorted(root.rglob("*")) if f.is_file()}

    def wait_until_finished(self) -> None:
        """Waits for every save in flight, its final rename included (errors stay with its future)."""
        with self._lock:
            pending = list(self._pending.values())
        wait_futures(pending)

    @staticmethod
    def _swap_in(staging: Path, directory: Path) -> None:
        """Replaces ``directory`` by the complete ``staging``. Killed between the two renames, it
        leaves both copies complete under hidden names, and :meth:`_recover` finishes the swap."""
        old = _hidden(directory, "old")
        if old.exists():
            shutil.rmtree(old)
        if directory.exists():
            directory.rename(old)
        staging.rename(directory)
        shutil.rmtree(old, ignore_errors=True)

    def _recover(self, directory: Path) -> None:
        """Finishes a swap that a killed process cut short: ``directory`` is missing or incomplete
        while its staged copy (newer) or its replaced copy (older) is complete."""
        if jax.distributed.is_initialized() and jax.process_index() != 0:
            return  # (listing checkpoints must not start a JAX backend)
        with self._lock:
            if directory in self._pending:  # this process is still saving it
                return
        with self._swap_lock:
            if _complete(directory):
                return
            for candidate in (_hidden(directory, "staging"), _hidden(directory, "old")):
                if _complete(candidate):
                    if directory.exists():
                        shutil.rmtree(directory)
                    candidate.rename(directory)
                    return

    def _live_meta(self, directory: Path) -> dict | None:
        """The metadata of the complete checkpoint at ``directory``; None once it has expired (it is
        deleted then)."""
        meta = json.loads(_meta_file(directory).read_text())
        if not expired(meta):
            return meta
        if not (jax.distributed.is_initialized() and jax.process_index() != 0):
            shutil.rmtree(directory, ignore_errors=True)
        return None

    def read_meta(self, path: str, field: str = "path") -> dict:
        _, directory = self.resolve(path, field)
        return json.loads(_meta_file(directory).read_text())

    def set_expiry(self, path: str, expires_at: float | None, field: str = "path") -> None:
        """Sets (or with None, removes) the Unix time at which the checkpoint expires."""
        _, directory = self.resolve(path, field)
        meta_file = _meta_file(directory)
        meta = {**json.loads(meta_file.read_text()), "expires_at": expires_at}
        staged = meta_file.with_name(".metadata.staging")
        staged.write_text(json.dumps(meta))
        os.replace(staged, meta_file)  # atomic: a reader sees the old or the new metadata

    def restore(self, path: str, abstract_items: dict[str, Any], field: str = "path") -> tuple[dict, dict]:
        """Restores ``abstract_items`` (trees of ``jax.ShapeDtypeStruct``) and the metadata."""
        parsed, directory = self.resolve(path, field)
        if parsed.kind == EXTERNAL:
            raise ValueError(
                f"{field}: {path} holds exported files for other frameworks; load a weights/ or "
                "sampler_weights/ checkpoint"
            )
        args = {k: ocp.args.StandardRestore(v) for k, v in abstract_items.items()}
        args["meta"] = ocp.args.JsonRestore()
        restored = ocp.Checkpointer(ocp.CompositeCheckpointHandler()).restore(
            directory, args=ocp.args.Composite(**args)
        )
        return {k: restored[k] for k in abstract_items}, restored["meta"]

    # -- listings -----------------------------------------------------------------------------
    def list_runs(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and _RUN_ID.match(p.name))

    def list_checkpoints(self, run_id: str | None = None) -> list[dict]:
        """Complete checkpoints, newest first, with their metadata."""
        self.wait_until_finished()
        runs = [run_id] if run_id is not None else self.list_runs()
        found = []
        for run in runs:
            for kind in KINDS:
                kind_dir = self.root / run / kind
                if not kind_dir.is_dir():
                    continue
                names = set()
                for entry in kind_dir.iterdir():
                    hidden = _HIDDEN.match(entry.name)
                    names.add(hidden.group(1) if hidden else entry.name)
                for name in sorted(names):
                    directory = kind_dir / name
                    if not _NAME.match(name) or ".." in name:
                        continue  # temporary files of Orbax, or not ours
                    self._recover(directory)
                    meta = self._live_meta(directory) if _complete(directory) else None
                    if meta is None:
                        continue  # an interrupted first save, or past its TTL
                    size = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
                    found.append(
                        {
                            "checkpoint_id": f"{kind}/{directory.name}",
                            "checkpoint_type": KINDS[kind],
                            "tinker_path": str(CheckpointPath(run, kind, directory.name)),
                            "time": meta.get("created"),
                            "size_bytes": size,
                            "meta": meta,
                        }
                    )
        return sorted(found, key=lambda c: c["time"] or "", reverse=True)

    def delete(self, path: str, field: str = "path") -> None:
        _, directory = self.resolve(path, field)
        shutil.rmtree(directory)


def checkpoint_fields(entry: dict, *, user_metadata: dict | None, expires_at: float | None) -> dict:
    """The SDK's ``Checkpoint`` fields for one :meth:`CheckpointStore.list_checkpoints` entry."""
    return {
        "checkpoint_id": entry["checkpoint_id"],
        "checkpoint_type": entry["checkpoint_type"],
        "time": dt.datetime.fromisoformat(entry["time"]),
        "tinker_path": entry["tinker_path"],
        "size_bytes": entry.get("size_bytes"),
        "public": False,
        "user_metadata": user_metadata,
        "expires_at": None if expires_at is None else dt.datetime.fromtimestamp(expires_at, dt.UTC),
    }


def weights_info(meta: dict) -> dict:
    """The SDK's ``WeightsInfoResponse`` fields for a checkpoint's metadata."""
    lora = meta.get("lora", {})
    return {
        "base_model": meta["base_model"],
        "is_lora": not lora.get("full_finetune", False),
        "lora_rank": lora.get("rank"),
        "train_unembed": lora.get("train_unembed"),
        "train_mlp": lora.get("train_mlp"),
        "train_attn": lora.get("train_attn"),
    }


def abstract(tree: Any) -> Any:
    """Shape/dtype (and sharding) skeleton of ``tree`` for restoring into the same layout."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
