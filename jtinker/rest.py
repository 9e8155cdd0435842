"""The in-process ``RestClient``: training runs and checkpoints of a local store, as the SDK reports them.

A run is listed once it has a checkpoint on disk, or while its training client is alive (for the
REST client of the :class:`~jtinker.client.ServiceClient` that made it, ``service.create_rest_client()``).
Each call does its (small, local) work at once and returns a finished
:class:`~jtinker.client.APIFuture`; errors surface from ``.result()``, as over the wire. External
weights are listed as ``file://`` URLs. Account features of the hosted service (sessions, billing,
publishing) have no local meaning and are not provided.
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import getpass
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jtinker import types
from jtinker.checkpoints import CheckpointPath, CheckpointStore, checkpoint_fields, weights_info
from jtinker.client import APIFuture, _expires_at, server_capabilities
from jtinker.errors import NotFoundError

if TYPE_CHECKING:
    from jtinker.client import ServiceClient

URLS_VALID_FOR = dt.timedelta(hours=1)  # as the hosted service's signed URLs (the CLI re-signs near the end)


def _done(fn: Callable[[], Any]) -> APIFuture:
    future: concurrent.futures.Future = concurrent.futures.Future()
    try:
        future.set_result(fn())
    except Exception as e:
        future.set_exception(e)
    return APIFuture(future)


def _owner() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no user name in this environment (e.g. a container without passwd entry)
        return "local"


class RestClient:
    """Tinker's ``RestClient`` over a local checkpoint store (default ``$JTINKER_HOME/runs``).

    Construct it directly (the SDK's connection arguments are accepted and ignored) or get one from
    ``ServiceClient.create_rest_client()``, which also sees that client's runs before they save.
    """

    def __init__(
        self, store_dir: str | Path | None = None, *, service: ServiceClient | None = None, **_: Any
    ):
        self._store = service.store if service is not None else CheckpointStore(store_dir)
        self._live_runs = service.runs if service is not None else {}

    # -- runs -----------------------------------------------------------------------------------
    def _checkpoints(self, run_id: str | None = None) -> list[types.Checkpoint]:
        return [_checkpoint(c) for c in self._store.list_checkpoints(run_id)]

    def _listed_run(self, run_id: str) -> tuple[list[dict], types.TrainingRun]:
        """The run's store listing (newest first) and the run; NotFoundError for an unknown run."""
        listed = self._store.list_checkpoints(run_id)
        live = self._live_runs.get(run_id)
        if not listed and live is None:
            raise NotFoundError(f"training_run_id: no training run {run_id!r} (none with a checkpoint)")
        checkpoints = [_checkpoint(c) for c in listed]
        times = [c.time for c in checkpoints]
        if live is None:  # described by its newest checkpoint
            meta = listed[0]["meta"]
            base_model, lora_rank = meta["base_model"], weights_info(meta)["lora_rank"]
            user_metadata = meta.get("run_user_metadata")
        else:
            info = live.get_info()
            base_model, lora_rank, user_metadata = info.model_name, info.lora_rank, live.user_metadata
            times.append(dt.datetime.fromtimestamp(live.created, dt.UTC))
        run = types.TrainingRun(
            training_run_id=run_id,
            base_model=base_model,
            model_owner=_owner(),
            is_lora=lora_rank is not None,
            lora_rank=lora_rank,
            last_request_time=max(times),
            last_checkpoint=next((c for c in checkpoints if c.checkpoint_type == "training"), None),
            last_sampler_checkpoint=next((c for c in checkpoints if c.checkpoint_type == "sampler"), None),
            user_metadata=user_metadata,
        )
        return listed, run

    def _run(self, run_id: str) -> types.TrainingRun:
        return self._listed_run(run_id)[1]

    def get_training_run(
        self, training_run_id: str, access_scope: str = "owned"
    ) -> APIFuture[types.TrainingRun]:
        return _done(lambda: self._run(training_run_id))

    def get_training_run_by_tinker_path(
        self, tinker_path: str, access_scope: str = "owned"
    ) -> APIFuture[types.TrainingRun]:
        return _done(lambda: self._run(CheckpointPath.parse(tinker_path, "tinker_path").run_id))

    def list_training_runs(
        self, limit: int = 20, offset: int = 0, access_scope: str = "owned", project_id: str | None = None
    ) -> APIFuture[types.TrainingRunsResponse]:
        """Newest activity first; ``limit`` and ``offset`` page through them."""

        def listing() -> types.TrainingRunsResponse:
            _check_page(limit, offset)
            runs = []
            for run_id in sorted({*self._store.list_runs(), *self._live_runs}):
                try:
                    runs.append(self._run(run_id))
                except NotFoundError:
                    continue  # a run directory whose checkpoints were all deleted or expired
            runs.sort(key=lambda r: r.last_request_time, reverse=True)
            cursor = types.Cursor(offset=offset, limit=limit, total_count=len(runs))
            return types.TrainingRunsResponse(training_runs=runs[offset : offset + limit], cursor=cursor)

        return _done(listing)

    # -- checkpoints ----------------------------------------------------------------------------
    def list_checkpoints(self, training_run_id: str) -> APIFuture[types.CheckpointsListResponse]:
        def listing() -> types.CheckpointsListResponse:
            listed, _ = self._listed_run(training_run_id)  # NotFoundError for an unknown run
            return types.CheckpointsListResponse(checkpoints=[_checkpoint(c) for c in listed])

        return _done(listing)

    def list_user_checkpoints(
        self, limit: int = 100, offset: int = 0
    ) -> APIFuture[types.CheckpointsListResponse]:
        """Every checkpoint of every run, newest first; ``limit`` and ``offset`` page through them."""

        def listing() -> types.CheckpointsListResponse:
            _check_page(limit, offset)
            checkpoints = self._checkpoints()
            cursor = types.Cursor(offset=offset, limit=limit, total_count=len(checkpoints))
            return types.CheckpointsListResponse(
                checkpoints=checkpoints[offset : offset + limit], cursor=cursor
            )

        return _done(listing)

    def get_weights_info_by_tinker_path(self, tinker_path: str) -> APIFuture[types.WeightsInfoResponse]:
        return _done(
            lambda: types.WeightsInfoResponse(
                **weights_info(self._store.read_meta(tinker_path, "tinker_path"))
            )
        )

    def delete_checkpoint(self, training_run_id: str, checkpoint_id: str) -> APIFuture[None]:
        """``checkpoint_id`` is ``<weights|sampler_weights|external_weights>/<name>``."""
        return self.delete_checkpoint_from_tinker_path(f"tinker://{training_run_id}/{checkpoint_id}")

    def delete_checkpoint_from_tinker_path(self, tinker_path: str) -> APIFuture[None]:
        return _done(lambda: self._store.delete(tinker_path, "tinker_path"))

    def set_checkpoint_ttl_from_tinker_path(
        self, tinker_path: str, ttl_seconds: int | None
    ) -> APIFuture[None]:
        """The checkpoint expires ``ttl_seconds`` from now (None: never)."""
        return _done(lambda: self._store.set_expiry(tinker_path, _expires_at(ttl_seconds), "tinker_path"))

    def get_external_weights_urls(self, tinker_path: str) -> APIFuture[types.ExternalWeightsUrlsResponse]:
        """``file://`` URLs of an external weights checkpoint's files (``save_weights_external``)."""

        def urls() -> types.ExternalWeightsUrlsResponse:
            files = self._store.files(tinker_path, "tinker_path")
            expires = dt.datetime.now(dt.UTC) + URLS_VALID_FOR
            return types.ExternalWeightsUrlsResponse(
                urls={name: f.resolve().as_uri() for name, f in files.items()}, expires=expires
            )

        return _done(urls)

    def get_server_capabilities(self) -> APIFuture[types.GetServerCapabilitiesResponse]:
        return _done(server_capabilities)

    # -- the SDK's deprecated async forms ----------------------------------------------------------
    async def get_training_run_async(
        self, training_run_id: str, access_scope: str = "owned"
    ) -> types.TrainingRun:
        return await self.get_training_run(training_run_id, access_scope)

    async def get_training_run_by_tinker_path_async(
        self, tinker_path: str, access_scope: str = "owned"
    ) -> types.TrainingRun:
        return await self.get_training_run_by_tinker_path(tinker_path, access_scope)

    async def list_training_runs_async(
        self, limit: int = 20, offset: int = 0, access_scope: str = "owned", project_id: str | None = None
    ) -> types.TrainingRunsResponse:
        return await self.list_training_runs(limit, offset, access_scope, project_id)

    async def list_checkpoints_async(self, training_run_id: str) -> types.CheckpointsListResponse:
        return await self.list_checkpoints(training_run_id)

    async def list_user_checkpoints_async(
        self, limit: int = 100, offset: int = 0
    ) -> types.CheckpointsListResponse:
        return await self.list_user_checkpoints(limit, offset)

    async def delete_checkpoint_async(self, training_run_id: str, checkpoint_id: str) -> None:
        return await self.delete_checkpoint(training_run_id, checkpoint_id)

    async def delete_checkpoint_from_tinker_path_async(self, tinker_path: str) -> None:
        return await self.delete_checkpoint_from_tinker_path(tinker_path)

    async def get_external_weights_urls_async(self, tinker_path: str) -> types.ExternalWeightsUrlsResponse:
        return await self.get_external_weights_urls(tinker_path)

    async def set_checkpoint_ttl_from_tinker_path_async(
        self, tinker_path: str, ttl_seconds: int | None
    ) -> None:
        return await self.set_checkpoint_ttl_from_tinker_path(tinker_path, ttl_seconds)


def _checkpoint(entry: dict) -> types.Checkpoint:
    """A :meth:`CheckpointStore.list_checkpoints` entry as the SDK's ``Checkpoint``."""
    meta = entry["meta"]
    fields = checkpoint_fields(
        entry, user_metadata=meta.get("user_metadata"), expires_at=meta.get("expires_at")
    )
    return types.Checkpoint(**fields)


def _check_page(limit: Any, offset: Any) -> None:
    for name, value, low in (("limit", limit, 1), ("offset", offset, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name}: must be an int >= {low}, got {value!r}")
