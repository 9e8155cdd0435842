"""The server's live state, layered over jtinker's one engine.

One :class:`jtinker.client.ServiceClient` owns the checkpoint store and the base models. Each SDK
``model_id`` maps to a jtinker ``TrainingClient`` and each sampling session to a jtinker
``SamplingClient``; the HTTP handlers only parse, enqueue and await. Engine work runs on the base
model's worker thread; blocking set-up (loading a base model, building a client from a checkpoint)
runs on a small thread pool, never on the event loop.

Ordering: requests for one model carry the SDK's ``seq_id`` (1, 2, ...). They are buffered per model
and released to the engine strictly in that order, so chunks the SDK sends concurrently (it sends the
first chunk of a batch last) still run in order. A request whose payload fails to parse still takes
its ``seq_id`` (its future fails with a ``user`` error), so the requests after it are not stalled.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import logging
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tinker import types as sdk
from tinker.types.try_again_response import TryAgainResponse

from jtinker import loss_handles, registry
from jtinker import types as jt
from jtinker.checkpoints import CheckpointPath, expired
from jtinker.client import STABILITY_INFO_UNSUPPORTED, ServiceClient, TrainingClient, _adam_hyperparams
from jtinker.engine import Adapter
from jtinker.export import age_recipients
from jtinker.server import wire
from jtinker.server.state.db import Database
from jtinker.server.wire import UserError

log = logging.getLogger("jtinker.server")

MAX_SEQ_AHEAD = 100_000  # a seq_id further ahead than this is a client bug, not a reordering
SEEN_SEQ_IDS = 4096  # per model: seq_id -> request_id kept for idempotent retries
MODEL_SAMPLERS = 16  # sampling clients kept for the OpenAI-compatible routes
RESULT_KEEP_AFTER_RETRIEVAL_S = 120.0
RESULT_KEEP_S = 1800.0
SWEEP_INTERVAL_S = float(os.environ.get("JTINKER_SWEEP_SECONDS", 15))  # results, sessions, checkpoint TTLs
SESSION_TIMEOUT_S = 1800.0

Op = Callable[[Any], concurrent.futures.Future]
OnResult = Callable[[Any], Any]


def classify(exc: BaseException) -> tuple[str, str]:
    """``(message, category)`` of an engine failure: bad input is the user's, the rest the server's."""
    if isinstance(
        exc, UserError | ValueError | TypeError | LookupError | FileNotFoundError | PermissionError
    ):
        return str(exc) or type(exc).__name__, "user"
    if isinstance(exc, concurrent.futures.CancelledError | asyncio.CancelledError):
        return "request was cancelled", "user"
    return f"{type(exc).__name__}: {exc}", "server"


# jtinker's extension, reachable through the SDK's standard ``create_lora_training_client(...,
# user_metadata={FULL_FINETUNE_KEY: "true"})``: a full fine-tune instead of a LoRA (rank is ignored).
FULL_FINETUNE_KEY = "jtinker_full_finetune"


def _adapter(client: TrainingClient) -> Adapter:
    """The engine adapter behind a training client. Forward/backward and optim steps go to the
    worker directly (tagged with their adapter, as the in-process client does), because the wire
    wants its own output form (``ArrayRecord``, cleaned metric names) and the optimizer's device
    scalars are made on the worker rather than on the event loop."""
    return client._adapter


def _clean_metrics(metrics: dict) -> dict[str, float]:
    """The SDK folds chunk metrics by splitting each key into exactly ``name:reduction``."""
    out = {}
    for key, value in metrics.items():
        if key.count(":") != 1:
            key = key.replace(":", "_") + ":mean"
        out[key] = float(value)
    return out


@dataclasses.dataclass
class FutureSlot:
    """One request's future: resolved on the loop, polled by ``retrieve_future``."""

    request_id: str
    owner: str
    kind: str  # the SDK's request type: ForwardBackward, Sample, OptimStep, ...
    model_id: str | None
    done: asyncio.Event
    value: Any = None
    error: str | None = None
    category: str | None = None
    created_at: float = dataclasses.field(default_factory=time.time)
    finished_at: float | None = None
    retrieved_at: float | None = None
    engine_future: concurrent.futures.Future | None = None


@dataclasses.dataclass
class _Pending:
    slot: FutureSlot
    op: Op | None  # None: the request already failed; it only holds its place in the order
    on_result: OnResult | None


class ModelSlot:
    """A training model (SDK ``model_id``) and its seq_id-ordered request buffer."""

    def __init__(self, model_id: str, owner: str, session_id: str | None, base_model: str):
        self.model_id = model_id
        self.owner = owner
        self.session_id = session_id
        self.base_model = base_model
        self.client: TrainingClient | None = None
        self.error: str | None = None  # creation failed
        self.ready = asyncio.Event()
        self.next_seq = 1
        self.pending: dict[int, _Pending] = {}
        # seq_id -> (request id, kind) of the requests taken, so a retried send gets its first answer
        self.seen: collections.OrderedDict[int, tuple[str, str]] = collections.OrderedDict()
        self.create_request_id: str | None = None
        self.unloaded = False


class SamplerSlot:
    """A sampling session and the jtinker ``SamplingClient`` behind it."""

    def __init__(
        self, sampler_id: str, owner: str, session_id: str | None, base_model: str, model_path: str | None
    ):
        self.sampler_id = sampler_id
        self.owner = owner
        self.session_id = session_id
        self.base_model = base_model
        self.model_path = model_path
        self.client: Any = None
        self.error: str | None = None
        self.ready = asyncio.Event()
        self.waiting: list[Callable[[], None]] = []  # requests that arrived while the client was built
        self.seen: collections.OrderedDict[int, tuple[str, int]] = collections.OrderedDict()


class Runtime:
    """Sessions, models, samplers and futures of one server process."""

    def __init__(
        self,
        *,
        home: Path,
        db: Database,
        mesh: Any = None,
        base_models: list[str] | None = None,
        poll_timeout_s: float = 5.0,
        max_workers: int = 4,
    ):
        self.home = Path(home)
        self.db = db
        self.service = ServiceClient(store_dir=str(self.home / "runs"), mesh=mesh)
        self.store = self.service.store
        self.allowed_bases = set(base_models) if base_models else None
        self.preload = list(base_models or [])
        self.poll_timeout_s = poll_timeout_s
        self.instance_id = uuid.uuid4().hex
        self.started_at = time.time()
        self.futures: dict[str, FutureSlot] = {}
        self.models: dict[str, ModelSlot] = {}
        self.samplers: dict[str, SamplerSlot] = {}
        # OpenAI-compatible routes' sampling clients, by (owner, model): built once, least recent dropped.
        self.model_samplers: collections.OrderedDict[tuple[str, str], Any] = collections.OrderedDict()
        self.custom_losses: dict[str, loss_handles.LossHandle] = {}  # loss_id -> handle, per session
        self.bases: dict[str, Any] = {}  # name -> jtinker BaseModel, for the status page
        self.base_errors: dict[str, str] = {}
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers, thread_name_prefix="jtinker-serve")
        self.loop: asyncio.AbstractEventLoop | None = None
        self._tasks: list[asyncio.Task] = []
        self._last_prune = time.time()
        self._expiring: set[str] = set()  # expired checkpoints being deleted

    # -- lifecycle --------------------------------------------------------------------------------
    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        lost = self.db.fail_orphaned_futures(
            self.instance_id,
            "request was lost: the server process that accepted it exited before it finished",
        )
        if lost:
            log.info("marked %d futures of a previous server process as failed", lost)
        self.db.prune_futures(older_than_s=86400)
        for name in self.preload:
            self.executor.submit(self._load_base, name, True)
        self._tasks.append(asyncio.create_task(self._sweep_loop()))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for slot in self.futures.values():
            if not slot.done.is_set():
                self.db.finish_future(slot.request_id, error="the server shut down", category="server")
        self.executor.shutdown(wait=False, cancel_futures=True)

    def _load_base(self, name: str, preload: bool = False) -> Any:
        """Runs on the thread pool; the status bookkeeping is handed to the loop (its only writer).
        Only preload failures are the operator's to see on the status page; a client's bad name
        reaches that client as a failed request."""
        assert self.loop is not None
        try:
            base = self.service.load_base_model(name)
        except BaseException as e:
            message = classify(e)[0]
            if preload:
                log.error("could not load base model %s: %s", name, message)
                self.loop.call_soon_threadsafe(self.base_errors.__setitem__, name, message)
            raise

        def loaded() -> None:
            self.bases[name] = base
            self.base_errors.pop(name, None)

        self.loop.call_soon_threadsafe(loaded)
        return base

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            try:
                self.sweep()
            except Exception:  # the sweeper must outlive any bug
                log.exception("sweep failed")

    def sweep(self, now: float | None = None) -> None:
        """Drops retrieved/old results, unloads sessions whose heartbeats stopped and deletes
        checkpoints whose ``ttl_seconds`` ran out (on the thread pool: a large one takes a while)."""
        now = time.time() if now is None else now
        for path in self.db.expired_checkpoints(now):
            if path not in self._expiring:
                self._expiring.add(path)
                self.executor.submit(self._delete_expired, path)
        for request_id, slot in list(self.futures.items()):
            if slot.finished_at is None:
                continue
            if (slot.retrieved_at and now - slot.retrieved_at > RESULT_KEEP_AFTER_RETRIEVAL_S) or (
                now - slot.finished_at > RESULT_KEEP_S
            ):
                del self.futures[request_id]
        if now - self._last_prune > 3600:  # the futures table only needs recent history
            self._last_prune = now
            self.db.prune_futures(older_than_s=86400)
        for session_id in self.db.stale_sessions(now - SESSION_TIMEOUT_S):
            log.info("session %s missed its heartbeats; finishing it", session_id)
            self.db.finish_session(session_id, "heartbeat_timeout")
            self._unload_session(session_id)

    def _delete_expired(self, path: str) -> None:
        try:
            self.store.delete(path)
        except FileNotFoundError:
            pass  # deleted by hand: only the record is left
        except Exception:
            log.exception("deleting expired checkpoint %s failed", path)
            self._expiring.discard(path)  # the next sweep tries again
            return
        self.db.delete_checkpoint(path)
        self._expiring.discard(path)
        log.info("checkpoint %s expired (ttl_seconds) and was deleted", path)

    # -- futures ----------------------------------------------------------------------------------
    def new_future(self, owner: str, kind: str, model_id: str | None) -> FutureSlot:
        slot = FutureSlot(uuid.uuid4().hex, owner, kind, model_id, asyncio.Event())
        self.futures[slot.request_id] = slot
        self.db.add_future(slot.request_id, owner, kind, model_id, self.instance_id)
        return slot

    def complete(self, slot: FutureSlot, value: Any) -> None:
        if slot.done.is_set():
            return
        slot.value, slot.finished_at = value, time.time()
        slot.done.set()
        # Small JSON results survive a restart; protobuf payloads (logprobs, samples) do not.
        self.db.finish_future(
            slot.request_id, result=wire.dump(value) if slot.kind not in _PROTO_KINDS else None
        )

    def fail(self, slot: FutureSlot, exc: BaseException | str, category: str | None = None) -> None:
        if slot.done.is_set():
            return
        message, cat = (exc, category or "server") if isinstance(exc, str) else classify(exc)
        slot.error, slot.category, slot.finished_at = message, cat, time.time()
        slot.done.set()
        self.db.finish_future(slot.request_id, error=message, category=cat)
        log.debug("request %s (%s) failed [%s]: %s", slot.request_id, slot.kind, cat, message)

    def attach(
        self,
        slot: FutureSlot,
        engine_future: concurrent.futures.Future,
        on_result: OnResult | None = None,
        on_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        """Resolves ``slot`` on the loop when ``engine_future`` (any thread) finishes."""
        slot.engine_future = engine_future

        def ok(value: Any) -> None:
            try:
                self.complete(slot, on_result(value) if on_result is not None else value)
            except BaseException as e:
                self.fail(slot, e)

        def err(exc: BaseException) -> None:
            if on_error is not None:
                on_error(exc)
            self.fail(slot, exc)

        self.on_loop(engine_future, ok, err)

    def on_loop(
        self,
        engine_future: concurrent.futures.Future,
        ok: Callable[[Any], None],
        err: Callable[[BaseException], None],
    ) -> None:
        """Runs ``ok(result)`` or ``err(exception)`` on the event loop once ``engine_future`` is done."""
        loop = self.loop
        assert loop is not None

        def settle(f: concurrent.futures.Future) -> None:
            exc = concurrent.futures.CancelledError() if f.cancelled() else f.exception()
            try:
                ok(f.result()) if exc is None else err(exc)
            except Exception:  # a hook's bug must not kill the loop's callback
                log.exception("completion hook failed")

        engine_future.add_done_callback(lambda f: loop.call_soon_threadsafe(settle, f))

    async def retrieve(self, owner: str, request_id: str, *, accept_proto: bool) -> tuple[str, Any]:
        """``("json", dict)`` or ``("proto", bytes)`` for ``retrieve_future``; long-polls briefly."""
        slot = self.futures.get(request_id)
        if slot is None or slot.owner != owner:
            return self._retrieve_from_db(owner, request_id)
        if not slot.done.is_set():
            try:
                await asyncio.wait_for(slot.done.wait(), self.poll_timeout_s)
            except TimeoutError:
                return "json", wire.dump(TryAgainResponse(request_id=request_id, queue_state="active"))
        slot.retrieved_at = time.time()
        if slot.error is not None:
            return "json", {"error": slot.error, "category": slot.category}
        return _render(slot.kind, slot.value, accept_proto)

    def _retrieve_from_db(self, owner: str, request_id: str) -> tuple[str, Any]:
        row = self.db.future(request_id)
        if row is None or row["owner"] != owner:
            raise UserError(f"unknown request_id {request_id!r}", 404)
        if row["status"] == "failed":
            return "json", {"error": row["error"], "category": row["category"] or "server"}
        if row["status"] == "complete" and row["result_json"] is not None:
            return "json", row["result_json"]
        if row["instance_id"] == self.instance_id:
            message = (
                f"the result of request {request_id} has expired (results are kept "
                f"{int(RESULT_KEEP_AFTER_RETRIEVAL_S)} s after retrieval)"
            )
        else:
            message = f"request {request_id} was lost: the server restarted before its result was retrieved"
        return "json", {"error": message, "category": "server"}

    def cancel(self, owner: str, request_id: str) -> None:
        slot = self.futures.get(request_id)
        if slot is None or slot.owner != owner or slot.done.is_set():
            return
        if slot.engine_future is not None and slot.engine_future.cancel():
            self.fail(slot, "request was cancelled by the client", "user")

    # -- sessions ---------------------------------------------------------------------------------
    def create_session(self, owner: str, req: sdk.CreateSessionRequest) -> str:
        session_id = str(uuid.uuid4())
        self.db.add_session(
            session_id, owner, req.sdk_version, req.user_metadata, req.display_name, self.instance_id
        )
        return session_id

    def own_session(self, owner: str, session_id: str, *, live: bool = True) -> dict:
        row = self.db.session(session_id)
        if row is None or row["owner"] != owner:
            raise UserError(f"unknown session {session_id!r}", 404)
        if live and row["finished_at"] is not None:
            raise UserError(
                f"session {session_id} is finished ({row['finish_reason']}); start a new ServiceClient"
            )
        return row

    def heartbeat(self, owner: str, session_id: str) -> bool:
        """False when the session is finished (the SDK stops heartbeating on 410)."""
        row = self.own_session(owner, session_id, live=False)
        if row["finished_at"] is not None:
            return False
        self.db.heartbeat(session_id)
        return True

    def finish_session(self, owner: str, session_id: str, reason: str | None) -> None:
        self.own_session(owner, session_id, live=False)
        self.db.finish_session(session_id, reason)
        self._unload_session(session_id)

    def _unload_session(self, session_id: str) -> None:
        for slot in list(self.models.values()):
            if slot.session_id == session_id:
                self._unload(slot, f"session {session_id} finished")
        for sampler in list(self.samplers.values()):
            if sampler.session_id == session_id:
                self.samplers.pop(sampler.sampler_id, None)
        for loss_id, handle in list(self.custom_losses.items()):
            if handle.session_id == session_id:
                self.custom_losses.pop(loss_id)

    # -- custom losses ----------------------------------------------------------------------------
    def create_custom_loss(self, owner: str, req: sdk.CreateCustomLossRequest) -> str:
        """Rebuilds an uploaded torch.fx loss as JAX (refusing anything off the allowlist, by node) and
        stores it for the session's ``forward_backward`` calls with ``loss_fn="custom"``."""
        self.own_session(owner, req.session_id)
        loss_id = f"{req.session_id}:loss:{req.custom_loss_seq_id}"
        if loss_id not in self.custom_losses:  # else a retried request: the same loss again
            inputs = [(i.name, i.rank) for i in req.inputs]
            nodes = [node.model_dump() for node in req.graph.nodes]
            try:
                handle = loss_handles.from_graph(req.name, inputs, nodes, req.session_id, loss_id)
            except ValueError as e:
                raise UserError(str(e)) from None
            self.custom_losses[loss_id] = handle
        future = self.new_future(owner, "CreateCustomLoss", None)
        self.complete(future, sdk.CreateCustomLossResponse(loss_id=loss_id))
        return future.request_id

    def _custom_loss(self, owner: str, call: wire.ForwardBackwardCall) -> loss_handles.LossHandle:
        if call.forward_only:
            raise UserError("loss_fn: 'custom' runs in forward_backward only, not forward")
        loss_id = (call.loss_fn_config or {}).get("loss_id")
        handle = self.custom_losses.get(loss_id) if isinstance(loss_id, str) else None
        slot = self.models.get(call.model_id)
        if handle is None or slot is None or slot.owner != owner or handle.session_id != slot.session_id:
            raise UserError(
                f"loss_fn_config.loss_id: no custom loss {loss_id!r} in this model's session "
                "(create it with ServiceClient.create_custom_loss)"
            )
        return handle  # the data is checked against it by forward_backward_custom, in seq_id order

    # -- base models ------------------------------------------------------------------------------
    def check_base_model(self, name: str) -> None:
        if not isinstance(name, str) or not name:
            raise UserError("base_model: required")
        if self.allowed_bases is not None and name not in self.allowed_bases:
            raise UserError(
                f"base_model: {name!r} is not served here; this server serves {sorted(self.allowed_bases)}",
                400,
            )

    def supported_models(self) -> list[str]:
        if self.allowed_bases is not None:
            return sorted(self.allowed_bases)
        return sorted(set(registry.registered_models()) | set(registry.builtin_names()) | set(self.bases))

    # -- checkpoints and ownership --------------------------------------------------------------------
    def own_run(self, owner: str, run_id: str) -> dict:
        row = self.db.run(run_id)
        if row is None or row["owner"] != owner:
            raise UserError(f"training run {run_id!r} not found", 404)
        return row

    def own_checkpoint(self, owner: str, path: str, field: str = "path") -> CheckpointPath:
        try:
            parsed = CheckpointPath.parse(path, field)
        except ValueError as e:
            raise UserError(str(e)) from None
        row = self.db.run(parsed.run_id)
        if row is None or row["owner"] != owner:
            raise UserError(f"{field}: checkpoint {path} not found", 404)
        if expired(self.db.checkpoint_rows(parsed.run_id).get(path, {})):
            raise UserError(f"{field}: checkpoint {path} expired (its ttl_seconds ran out)", 404)
        return parsed

    async def read_meta(self, path: str, field: str = "path") -> dict:
        try:
            return await asyncio.to_thread(self.store.read_meta, path, field)
        except FileNotFoundError as e:
            raise UserError(str(e), 404) from None
        except ValueError as e:
            raise UserError(str(e)) from None

    # -- training models --------------------------------------------------------------------------
    def _existing_model(self, owner: str, model_id: str) -> str | None:
        slot = self.models.get(model_id)
        if slot is not None:
            if slot.owner != owner:
                raise UserError(f"model {model_id} exists and belongs to another API key", 400)
            return slot.create_request_id
        if self.db.run(model_id) is not None:
            raise UserError(f"model {model_id} already exists (model_seq_id reused?)", 400)
        return None

    def _new_model(
        self,
        owner: str,
        session_id: str,
        model_id: str,
        base_model: str,
        lora: dict,
        user_metadata: dict | None,
        kind: str,
        build: Callable[[], TrainingClient],
        result: Callable[[], Any],
    ) -> str:
        slot = ModelSlot(model_id, owner, session_id, base_model)
        self.models[model_id] = slot
        self.db.add_run(model_id, owner, session_id, base_model, lora, user_metadata, self.instance_id)
        future = self.new_future(owner, kind, model_id)
        slot.create_request_id = future.request_id

        def build_with_base() -> TrainingClient:
            self._load_base(base_model)
            return build()

        def ready(client: TrainingClient) -> Any:
            slot.client = client
            slot.ready.set()
            self._pump(slot)
            return result()

        def failed(exc: BaseException) -> None:
            slot.error = f"creating model {model_id} failed: {classify(exc)[0]}"
            self.db.mark_run_corrupted(model_id)
            slot.ready.set()
            self._pump(slot)

        self.attach(future, self.executor.submit(build_with_base), ready, failed)
        return future.request_id

    def create_model(self, owner: str, req: sdk.CreateModelRequest) -> str:
        """A LoRA training client, or full fine-tuning when ``user_metadata[FULL_FINETUNE_KEY]`` is true."""
        self.own_session(owner, req.session_id)
        self.check_base_model(req.base_model)
        if req.lora_config is None:
            raise UserError("lora_config: required (jtinker trains LoRA adapters only)")
        if getattr(req.optimizer_config, "type", "adamw") != "adamw":
            raise UserError(f"optimizer_config: only AdamW is supported, got {req.optimizer_config.type!r}")
        model_id = f"{req.session_id}:train:{req.model_seq_id}"
        existing = self._existing_model(owner, model_id)
        if existing is not None:
            return existing
        lora = req.lora_config
        full = str((req.user_metadata or {}).get(FULL_FINETUNE_KEY, "")).lower() in ("1", "true", "yes")

        def build() -> TrainingClient:
            if full:  # the extension: the SDK's own call, every weight trained
                return self.service.create_full_training_client(req.base_model, model_id=model_id)
            return self.service.create_lora_training_client(
                req.base_model,
                rank=lora.rank,
                seed=lora.seed,
                train_mlp=lora.train_mlp,
                train_attn=lora.train_attn,
                train_unembed=lora.train_unembed,
                model_id=model_id,
            )

        return self._new_model(
            owner,
            req.session_id,
            model_id,
            req.base_model,
            {"full_finetune": True} if full else lora.model_dump(),
            req.user_metadata,
            "CreateModel",
            build,
            lambda: sdk.CreateModelResponse(model_id=model_id),
        )

    async def create_model_from_state(self, owner: str, req: sdk.LoadWeightsRequest) -> str:
        """``LoadWeightsRequest`` with ``session_id``: a new model whose first request is the load."""
        self.own_session(owner, req.session_id)
        if req.model_seq_id is None:
            raise UserError("model_seq_id: required with session_id")
        self.own_checkpoint(owner, req.path)
        if req.optimizer_config is not None and getattr(req.optimizer_config, "type", "adamw") != "adamw":
            raise UserError(f"optimizer_config: only AdamW is supported, got {req.optimizer_config.type!r}")
        model_id = f"{req.session_id}:train:{req.model_seq_id}"
        existing = self._existing_model(owner, model_id)
        if existing is not None:
            return existing
        meta = await self.read_meta(req.path)
        base_model = req.base_model or meta["base_model"]
        self.check_base_model(base_model)
        existing = self._existing_model(owner, model_id)  # the await above let a retry in
        if existing is not None:
            return existing
        create = (
            self.service.create_training_client_from_state_with_optimizer
            if req.optimizer
            else self.service.create_training_client_from_state
        )
        return self._new_model(
            owner,
            req.session_id,
            model_id,
            base_model,
            meta.get("lora", {}),
            req.user_metadata,
            "LoadWeights",
            lambda: create(req.path, req.base_model, model_id=model_id),
            lambda: sdk.LoadWeightsResponse(path=req.path, model_id=model_id, type="load_weights"),
        )

    def model(self, owner: str, model_id: str) -> ModelSlot:
        slot = self.models.get(model_id)
        if slot is not None and slot.owner == owner and not slot.unloaded:
            return slot
        row = self.db.run(model_id)
        if slot is None and row is not None and row["owner"] == owner:
            raise UserError(
                f"model {model_id} is not loaded in this server process (it was created before a restart, "
                "or unloaded); create a new training client from one of its checkpoints",
                404,
            )
        raise UserError(f"unknown model_id {model_id!r}", 404)

    def submit_ordered(
        self,
        owner: str,
        model_id: str,
        seq_id: int | None,
        kind: str,
        op: Op | None,
        on_result: OnResult | None = None,
        error: UserError | None = None,
    ) -> str:
        """Queues one training request at its ``seq_id``; returns its request id (the same one again
        when the SDK retries a request the server already has; a request of another kind at a used
        ``seq_id`` is refused, not answered with the first one's result)."""
        slot = self.model(owner, model_id)
        if seq_id is None:  # clients that send no seq_id run after everything already queued
            seq_id = max([slot.next_seq, *(s + 1 for s in slot.pending)])
        if not isinstance(seq_id, int) or isinstance(seq_id, bool) or seq_id < 1:
            raise UserError(f"seq_id: must be a positive integer, got {seq_id!r}")
        if seq_id in slot.seen:
            request_id, first_kind = slot.seen[seq_id]
            if first_kind != kind:
                raise UserError(
                    f"seq_id {seq_id} for model {model_id} was already used by a {first_kind} request "
                    f"(this one is {kind}): each request needs a seq_id of its own"
                )
            return request_id
        if seq_id < slot.next_seq:
            raise UserError(
                f"seq_id {seq_id} for model {model_id} was already executed (next is {slot.next_seq})"
            )
        if seq_id > slot.next_seq + MAX_SEQ_AHEAD:
            raise UserError(f"seq_id {seq_id} is too far ahead of {slot.next_seq} for model {model_id}")
        future = self.new_future(owner, kind, model_id)
        slot.seen[seq_id] = (future.request_id, kind)
        while len(slot.seen) > SEEN_SEQ_IDS:
            slot.seen.popitem(last=False)
        if error is not None:
            self.fail(future, error)
            op = None
        slot.pending[seq_id] = _Pending(future, op, on_result)
        self.db.touch_run(model_id)
        self._pump(slot)
        return future.request_id

    def _pump(self, slot: ModelSlot) -> None:
        """Releases buffered requests to the engine in seq_id order, as far as there is no gap."""
        if not slot.ready.is_set():
            return
        if slot.error is not None or slot.unloaded:
            reason = slot.error or f"model {slot.model_id} was unloaded"
            for pending in slot.pending.values():
                self.fail(pending.slot, reason, "server" if slot.error else "user")
            slot.pending.clear()
            return
        while slot.next_seq in slot.pending:
            pending = slot.pending.pop(slot.next_seq)
            slot.next_seq += 1
            if pending.op is None:
                continue
            try:
                engine_future = pending.op(slot.client)
            except BaseException as e:  # argument checks in the client raise before submitting
                self.fail(pending.slot, e)
                continue
            self.attach(pending.slot, engine_future, pending.on_result)

    def _unload(self, slot: ModelSlot, reason: str) -> None:
        slot.unloaded = True
        self.models.pop(slot.model_id, None)
        for pending in slot.pending.values():
            self.fail(pending.slot, f"model {slot.model_id} was unloaded ({reason})", "user")
        slot.pending.clear()

    def unload_model(self, owner: str, model_id: str) -> str:
        slot = self.model(owner, model_id)
        future = self.new_future(owner, "UnloadModel", model_id)
        self._unload(slot, "unload_model")
        self.complete(future, sdk.UnloadModelResponse(model_id=model_id, type="unload_model"))
        return future.request_id

    async def get_info(self, owner: str, model_id: str) -> sdk.GetInfoResponse:
        slot = self.model(owner, model_id)
        try:
            await asyncio.wait_for(slot.ready.wait(), 30)
        except TimeoutError:
            raise UserError(f"model {model_id} is still being created; retry", 409) from None
        if slot.error is not None:
            raise UserError(slot.error)
        info = slot.client.get_info()
        return sdk.GetInfoResponse(
            type="get_info",
            model_data=sdk.ModelData(
                arch=info.model_data.arch,
                model_name=info.model_data.model_name,
                tokenizer_id=info.model_data.tokenizer_id,
            ),
            model_id=model_id,
            is_lora=info.is_lora,
            lora_rank=info.lora_rank,
            model_name=info.model_name,
        )

    # -- training requests ------------------------------------------------------------------------
    def forward_backward(self, owner: str, call: wire.ForwardBackwardCall) -> str:
        error, custom = call.error, None
        if error is None and not call.data:
            error = UserError("data: empty batch; forward_backward needs at least one Datum")
        if error is None and call.loss_fn == "custom":
            try:
                custom = self._custom_loss(owner, call)
            except UserError as e:
                error = e

        def op(client: TrainingClient) -> concurrent.futures.Future:
            adapter = _adapter(client)
            return adapter.base.worker.submit_loss(
                adapter, call.data, call.loss_fn, call.loss_fn_config, backward=not call.forward_only
            )

        def custom_op(client: TrainingClient) -> concurrent.futures.Future:
            return client.forward_backward_custom(call.data, custom).future()  # one pass, the loss as JAX

        def custom_result(out: jt.ForwardBackwardOutput) -> jt.ForwardBackwardOutput:
            return dataclasses.replace(out, metrics=_clean_metrics(out.metrics))

        def on_result(result: tuple[list, dict]) -> jt.ForwardBackwardOutput:
            outputs, metrics = result
            return jt.ForwardBackwardOutput(
                loss_fn_output_type="ArrayRecord",
                loss_fn_outputs=[{k: jt.TensorData.from_numpy(v) for k, v in o.items()} for o in outputs],
                metrics=_clean_metrics(metrics),
            )

        kind = "Forward" if call.forward_only else "ForwardBackward"
        if custom is not None:
            op, on_result = custom_op, custom_result
        return self.submit_ordered(owner, call.model_id, call.seq_id, kind, op, on_result, error)

    def optim_step(self, owner: str, model_id: str, seq_id: int | None, body: dict) -> str:
        error, params = None, None
        try:
            req = wire.validate_model(sdk.OptimStepRequest, body, "optim_step")
            if not isinstance(req.optim_params, sdk.AdamParams):
                raise UserError(
                    f"optim_params: only AdamParams is supported, got {type(req.optim_params).__name__}"
                )
            params = jt.AdamParams(**req.optim_params.model_dump())
        except UserError as e:
            error = e

        def op(client: TrainingClient) -> concurrent.futures.Future:
            adapter = _adapter(client)  # tagged: other adapters' forward_backward may run first
            # The hyperparameters become device scalars on the worker, not on the event loop.
            return adapter.base.worker.submit(
                lambda: adapter.optim_step(_adam_hyperparams(params)), adapter=adapter
            )

        def on_result(metrics: dict) -> sdk.OptimStepResponse:
            return sdk.OptimStepResponse(metrics=_clean_metrics(metrics))

        return self.submit_ordered(owner, model_id, seq_id, "OptimStep", op, on_result, error)

    def save_weights(self, owner: str, model_id: str, seq_id: int | None, body: dict) -> str:
        error, req = None, None
        try:
            req = wire.validate_model(sdk.SaveWeightsRequest, body, "save_weights")
            _check_ttl(req.ttl_seconds)
        except UserError as e:
            error = e
        name = (req.path if req is not None else None) or f"state-{uuid.uuid4().hex[:8]}"

        def op(client: TrainingClient) -> concurrent.futures.Future:
            return client.save_state(name, overwrite=req.overwrite).future()

        def on_result(resp: jt.SaveWeightsResponse) -> sdk.SaveWeightsResponse:
            self.db.add_checkpoint(resp.path, model_id, owner, req.user_metadata, req.ttl_seconds)
            return sdk.SaveWeightsResponse(path=resp.path, type="save_weights")

        return self.submit_ordered(owner, model_id, seq_id, "SaveWeights", op, on_result, error)

    def save_weights_for_sampler(self, owner: str, model_id: str, seq_id: int | None, body: dict) -> str:
        error, req = None, None
        try:
            req = wire.validate_model(sdk.SaveWeightsForSamplerRequest, body, "save_weights_for_sampler")
            _check_ttl(req.ttl_seconds)
            if req.path is None and req.sampling_session_seq_id is None:
                raise UserError("save_weights_for_sampler: path or sampling_session_seq_id is required")
        except UserError as e:
            error = e
        if error is None and req.path is None:
            return self._snapshot_sampler(owner, model_id, seq_id, req.sampling_session_seq_id, req.kind)

        def op(client: TrainingClient) -> concurrent.futures.Future:
            return client.save_weights_for_sampler(req.path).future()

        def on_result(resp: jt.SaveWeightsForSamplerResponse) -> Any:
            self.db.add_checkpoint(resp.path, model_id, owner, req.user_metadata, req.ttl_seconds)
            return sdk.SaveWeightsForSamplerResponseInternal(path=resp.path, type="save_weights_for_sampler")

        return self.submit_ordered(owner, model_id, seq_id, "SaveWeightsForSampler", op, on_result, error)

    def save_weights_external(self, owner: str, model_id: str, seq_id: int | None, body: dict) -> str:
        error, req = None, None
        try:
            req = wire.validate_model(sdk.SaveWeightsExternalRequest, body, "save_weights_external")
            _check_ttl(req.ttl_seconds)
            if req.age_encryption_recipients:
                age_recipients(req.age_encryption_recipients)  # a bad key fails the request before the save
        except ValueError as e:
            error = e if isinstance(e, UserError) else UserError(str(e))

        def op(client: TrainingClient) -> concurrent.futures.Future:
            return client.save_weights_external(
                req.path, age_encryption_recipients=req.age_encryption_recipients
            ).future()

        def on_result(resp: jt.SaveWeightsExternalResponse) -> Any:
            self.db.add_checkpoint(resp.path, model_id, owner, None, req.ttl_seconds)
            size = sum(f.stat().st_size for f in self.store.files(resp.path).values())
            return sdk.SaveWeightsExternalResponseInternal(
                path=resp.path, size_bytes=size, type="save_weights_external"
            )

        return self.submit_ordered(owner, model_id, seq_id, "SaveWeightsExternal", op, on_result, error)

    def _snapshot_sampler(
        self, owner: str, model_id: str, seq_id: int | None, sampler_seq: int, kind: str = "snapshot"
    ) -> str:
        """``save_weights_and_get_sampling_client``: an in-memory snapshot, taken in request order
        (``kind="inflight"``: published to the model's inflight weights, see ``InflightWeights``)."""
        model = self.model(owner, model_id)
        sampler_id = f"{model.session_id}:sample:{sampler_seq}"
        error = None
        if sampler_id in self.samplers:
            error = UserError(f"sampling_session_seq_id {sampler_seq}: sampler {sampler_id} already exists")

        def op(client: TrainingClient) -> concurrent.futures.Future:
            return client.snapshot_sampling_client(kind or "snapshot").future()

        def on_result(sampling_client: Any) -> Any:
            sampler = SamplerSlot(sampler_id, owner, model.session_id, model.base_model, None)
            self._sampler_ready(sampler, sampling_client)
            self.samplers[sampler_id] = sampler
            self.db.add_sampler(sampler_id, owner, model.session_id, model.base_model, None, self.instance_id)
            return sdk.SaveWeightsForSamplerResponseInternal(
                sampling_session_id=sampler_id, type="save_weights_for_sampler"
            )

        return self.submit_ordered(owner, model_id, seq_id, "SaveWeightsForSampler", op, on_result, error)

    def load_weights(self, owner: str, model_id: str, seq_id: int | None, req: sdk.LoadWeightsRequest) -> str:
        error = None
        try:
            self.own_checkpoint(owner, req.path)
        except UserError as e:
            error = e

        def op(client: TrainingClient) -> concurrent.futures.Future:
            load = client.load_state_with_optimizer if req.optimizer else client.load_state
            return load(req.path).future()

        def on_result(_: Any) -> sdk.LoadWeightsResponse:
            return sdk.LoadWeightsResponse(path=req.path, model_id=model_id, type="load_weights")

        return self.submit_ordered(owner, model_id, seq_id, "LoadWeights", op, on_result, error)

    # -- sampling ---------------------------------------------------------------------------------
    def _sampler_ready(self, sampler: SamplerSlot, client: Any) -> None:
        sampler.client = client
        sampler.ready.set()
        waiting, sampler.waiting = sampler.waiting, []
        for submit in waiting:
            submit()

    async def create_sampling_session(self, owner: str, req: sdk.CreateSamplingSessionRequest) -> str:
        self.own_session(owner, req.session_id)
        sampler_id = f"{req.session_id}:sample:{req.sampling_session_seq_id}"
        existing = self.samplers.get(sampler_id)
        if existing is not None:
            if existing.owner != owner:
                raise UserError(f"sampler {sampler_id} belongs to another API key", 400)
            return sampler_id
        if req.model_path is not None:
            self.own_checkpoint(owner, req.model_path, "model_path")
            meta = await self.read_meta(req.model_path, "model_path")
            base_model = req.base_model or meta["base_model"]
        elif req.base_model is not None:
            base_model = req.base_model
        else:
            raise UserError("create_sampling_session: model_path or base_model is required")
        self.check_base_model(base_model)
        if sampler_id in self.samplers:  # a retry got in during the await
            return sampler_id
        sampler = SamplerSlot(sampler_id, owner, req.session_id, base_model, req.model_path)
        self.samplers[sampler_id] = sampler
        self.db.add_sampler(sampler_id, owner, req.session_id, base_model, req.model_path, self.instance_id)

        def build() -> Any:
            self._load_base(base_model)
            return self.service.create_sampling_client(model_path=req.model_path, base_model=req.base_model)

        def failed(exc: BaseException) -> None:
            sampler.error = f"creating sampler {sampler_id} failed: {classify(exc)[0]}"
            sampler.ready.set()
            waiting, sampler.waiting = sampler.waiting, []
            for submit in waiting:
                submit()

        # The session is usable at once; a sample sent before the client is built waits for it.
        self.on_loop(self.executor.submit(build), lambda c: self._sampler_ready(sampler, c), failed)
        return sampler_id

    async def model_sampler(self, owner: str, model: str) -> Any:
        """A sampling client for an OpenAI-style ``model``: a ``tinker://`` checkpoint of the owner's or
        a base model this server serves. Built on the thread pool once, then reused."""
        key = (owner, model)
        if key in self.model_samplers:
            self.model_samplers.move_to_end(key)
            return self.model_samplers[key]
        if model.startswith("tinker://"):
            self.own_checkpoint(owner, model, "model")
            base_model, model_path = (await self.read_meta(model, "model"))["base_model"], model
        else:
            base_model, model_path = model, None
            self.check_base_model(base_model)

        def build() -> Any:
            self._load_base(base_model)
            return self.service.create_sampling_client(
                model_path=model_path, base_model=None if model_path else base_model
            )

        try:
            client = await asyncio.wrap_future(self.executor.submit(build))
        except (ValueError, FileNotFoundError) as e:
            raise UserError(f"model: {e}", 404 if isinstance(e, FileNotFoundError) else 400) from None
        self.model_samplers[key] = client
        while len(self.model_samplers) > MODEL_SAMPLERS:
            self.model_samplers.popitem(last=False)
        return client

    def sampler_info(self, owner: str, sampler_id: str) -> sdk.GetSamplerResponse:
        sampler = self.samplers.get(sampler_id)
        if sampler is not None and sampler.owner == owner:
            return sdk.GetSamplerResponse(
                sampler_id=sampler_id, base_model=sampler.base_model, model_path=sampler.model_path
            )
        row = self.db.sampler(sampler_id)
        if row is None or row["owner"] != owner:
            raise UserError(f"unknown sampler {sampler_id!r}", 404)
        return sdk.GetSamplerResponse(
            sampler_id=sampler_id, base_model=row["base_model"], model_path=row["model_path"]
        )

    def sample(self, owner: str, req: sdk.SampleRequest) -> tuple[str, list[str]]:
        if req.sampling_session_id is None:
            raise UserError("sampling_session_id: required (create a sampling client first)")
        sampler = self.samplers.get(req.sampling_session_id)
        if sampler is None or sampler.owner != owner:
            row = self.db.sampler(req.sampling_session_id)
            if row is not None and row["owner"] == owner:
                raise UserError(
                    f"sampler {req.sampling_session_id} is not loaded in this server process (created "
                    "before a restart, or its session finished); create a new sampling client",
                    404,
                )
            raise UserError(f"unknown sampling_session_id {req.sampling_session_id!r}", 404)
        if req.record_stability_info:
            raise UserError(STABILITY_INFO_UNSUPPORTED)
        prompt = wire.model_input_from_sdk(req.prompt)
        params = wire.sampling_params_from_sdk(req.sampling_params)
        targets = req.target_prompt_logprobs
        if targets is not None:
            targets = wire.tensor_from_sdk(targets, "target_prompt_logprobs")
        last_n = req.prompt_logprobs_last_n
        if last_n is not None and (not req.prompt_logprobs or not 1 <= last_n <= prompt.length - 1):
            raise UserError(
                f"prompt_logprobs_last_n: must be between 1 and len(prompt) - 1 = {prompt.length - 1}, "
                "with prompt_logprobs set"
            )
        if req.seq_id is not None and req.seq_id in sampler.seen:
            request_id, n = sampler.seen[req.seq_id]
            return request_id, [f"{request_id}:{i}" for i in range(n)]
        future = self.new_future(owner, "Sample", None)
        if req.seq_id is not None:
            sampler.seen[req.seq_id] = (future.request_id, req.num_samples)
            while len(sampler.seen) > SEEN_SEQ_IDS:
                sampler.seen.popitem(last=False)

        def submit() -> None:
            if sampler.error is not None:
                self.fail(future, sampler.error, "server")
                return
            try:
                engine_future = sampler.client.sample(
                    prompt,
                    req.num_samples,
                    params,
                    include_prompt_logprobs=bool(req.prompt_logprobs),
                    topk_prompt_logprobs=req.topk_prompt_logprobs,
                    target_prompt_logprobs=targets,
                    topk_sample_logprobs=req.topk_sample_logprobs,
                    prompt_alt_tokens_k=req.prompt_alt_tokens_k,
                    prompt_logprobs_last_n=last_n,
                ).future()
            except BaseException as e:
                self.fail(future, e)
                return
            self.attach(future, engine_future)

        if sampler.ready.is_set():
            submit()
        else:
            sampler.waiting.append(submit)
        return future.request_id, [f"{future.request_id}:{i}" for i in range(req.num_samples)]

    # -- status -----------------------------------------------------------------------------------
    def status(self) -> dict:
        return {
            "instance_id": self.instance_id,
            "uptime_s": round(time.time() - self.started_at, 1),
            "base_models": [
                {
                    "name": name,
                    "queue_depth": base.worker.queue_depth,
                    # forward/forward_backward requests and the jitted steps they ran in (batched
                    # across models: requests / steps is the mean number of models per step)
                    "loss_requests": base.worker.loss_requests,
                    "loss_steps": base.worker.loss_steps,
                    "sample_requests": base.worker.sample_requests,  # likewise for sampling
                    "sample_batches": base.worker.sample_batches,
                    "sampled_tokens": base.worker.sampled_tokens,
                    "prefix_cache": base.prefix_cache_stats(),
                    "training_models": sum(1 for m in self.models.values() if m.base_model == name),
                    "samplers": sum(1 for s in self.samplers.values() if s.base_model == name),
                }
                for name, base in sorted(self.bases.items())
            ],
            "base_model_errors": dict(self.base_errors),
            "training_models": len(self.models),
            "samplers": len(self.samplers),
            "pending_futures": sum(1 for f in self.futures.values() if not f.done.is_set()),
            "buffered_requests": sum(len(m.pending) for m in self.models.values()),
        }


_PROTO_KINDS = {"ForwardBackward", "Forward", "Sample"}


def _render(kind: str, value: Any, accept_proto: bool) -> tuple[str, Any]:
    if kind in ("ForwardBackward", "Forward"):
        if accept_proto:
            return "proto", wire.encode_forward_backward_output(value)
        return "json", wire.forward_backward_json(value)
    if kind == "Sample":
        if accept_proto:
            return "proto", wire.encode_sample_response(value)
        return "json", wire.sample_response_json(value)
    return "json", wire.dump(value)


def _check_ttl(ttl_seconds: int | None) -> None:
    if ttl_seconds is not None and ttl_seconds <= 0:
        raise UserError(f"ttl_seconds: must be positive or None, got {ttl_seconds}")
