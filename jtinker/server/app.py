"""HTTP routes of the Tinker wire protocol (SDK 0.38), as a FastAPI app over :class:`Runtime`.

Handlers parse the request with the SDK's own types, enqueue work and return at once; results are
fetched with ``retrieve_future`` (a short long-poll, then ``try_again`` as HTTP 408). Errors always
come back as JSON ``{"detail": ...}`` with a 4xx status the SDK does not retry (400, 401, 404, 410, 413, 415);
failures of accepted work come back as ``RequestFailedResponse`` with category ``user`` or ``server``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import functools
import hashlib
import hmac
import html
import json
import logging
import secrets
import time
import urllib.parse
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from tinker import types as sdk

from jtinker.checkpoints import CheckpointPath, checkpoint_fields, expired, weights_info
from jtinker.rest import URLS_VALID_FOR
from jtinker.server import wire
from jtinker.server.auth import KeyRing
from jtinker.server.oai import OpenAIRoutes
from jtinker.server.runtime import Runtime
from jtinker.server.state.db import Database
from jtinker.server.wire import UserError

log = logging.getLogger("jtinker.server")

PROTO = "application/x-protobuf"
_INLINE_BYTES = 1 << 20  # bodies above this are decompressed and parsed on a worker thread
API = "/api/v1"
_SDK_VERSION_HEADERS = ("x-sdk-version", "x-stainless-package-version")


@dataclasses.dataclass
class ServerConfig:
    """What ``jtinker serve`` runs with (see :func:`jtinker.server.main` for the CLI)."""

    home: Path
    base_models: list[str] = dataclasses.field(default_factory=list)
    host: str = "127.0.0.1"
    port: int = 8000
    mesh: str | None = None
    db_url: str | None = None
    max_body_bytes: int = 256 * 1024 * 1024
    poll_timeout_s: float = 5.0  # retrieve_future long-poll before answering try_again
    sdk_versions: tuple[str, ...] = ("0.38",)  # accepted SDK version prefixes; "*" accepts any
    fwdbwd_max_chunk_len: int = 1024
    compress_fwdbwd: bool = True


def _sdk_version_ok(version: str, accepted: tuple[str, ...]) -> bool:
    return "*" in accepted or any(version == p or version.startswith(p + ".") for p in accepted)


def _ts(value: float | None) -> dt.datetime | None:
    return None if value is None else dt.datetime.fromtimestamp(value, dt.UTC)


def _str_dict(value: Any) -> dict[str, str] | None:
    return None if not value else {str(k): str(v) for k, v in dict(value).items()}


def _int_param(request: Request, name: str, default: int, lo: int = 0, hi: int = 10_000) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise UserError(f"{name}: expected an integer, got {raw!r}") from None
    if not lo <= value <= hi:
        raise UserError(f"{name}: must be between {lo} and {hi}, got {value}")
    return value


class Api:
    """The routes, bound to one runtime, key ring and config."""

    def __init__(self, config: ServerConfig, runtime: Runtime, keys: KeyRing):
        self.config = config
        self.runtime = runtime
        self.keys = keys
        self.url_key = secrets.token_bytes(32)  # signs download URLs: they die with this process

    # -- request plumbing -------------------------------------------------------------------------
    def authorize(self, request: Request, *, tinker_sdk: bool = True) -> str:
        """The caller's owner id; 401 without a valid key, 400 for a tinker SDK version we do not speak
        (``tinker_sdk=False``: routes for other clients, e.g. OpenAI's, which send the same headers)."""
        key = request.headers.get("x-api-key")
        auth = request.headers.get("authorization", "")
        if not key and auth.lower().startswith("bearer "):
            key = auth[7:].strip()
        if not key:
            raise UserError(
                "missing API key: send it in the X-API-Key header (tinker.ServiceClient(api_key='tml-...'))",
                401,
            )
        owner = self.keys.owner(key)
        if owner is None:
            raise UserError("invalid API key: this server does not accept it", 401)
        for header in _SDK_VERSION_HEADERS if tinker_sdk else ():
            version = request.headers.get(header)
            if version and not _sdk_version_ok(version, self.config.sdk_versions):
                raise UserError(
                    f"tinker SDK version {version} is not supported by this jtinker server "
                    f"(it speaks {', '.join(self.config.sdk_versions)}); install tinker==0.38.0",
                    400,
                )
        return owner

    async def body(self, request: Request) -> bytes:
        limit = self.config.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                raise UserError("invalid Content-Length header")
            if int(length) > limit:
                raise UserError(f"request body of {length} bytes exceeds the limit of {limit} bytes", 413)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise UserError(f"request body exceeds the limit of {limit} bytes", 413)
            chunks.append(chunk)
        raw = b"".join(chunks)
        encoding = request.headers.get("content-encoding")
        if encoding and len(raw) > _INLINE_BYTES:
            return await asyncio.to_thread(wire.decompress, raw, encoding, limit)
        return wire.decompress(raw, encoding, limit)

    async def json(self, request: Request) -> Any:
        raw = await self.body(request)
        if not raw.strip():
            return {}
        try:
            return json.loads(raw) if len(raw) <= _INLINE_BYTES else await asyncio.to_thread(json.loads, raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"request body is not valid JSON: {e}") from None

    async def parse(self, request: Request, model_cls: type, what: str) -> Any:
        return wire.validate_model(model_cls, await self.json(request), what)

    @staticmethod
    def ok(model: Any) -> JSONResponse:
        return JSONResponse(wire.dump(model) if hasattr(model, "model_dump") else model)

    @staticmethod
    def future(
        request_id: str, model_id: str | None = None, sequence_ids: list[str] | None = None
    ) -> JSONResponse:
        return JSONResponse(
            wire.dump(
                sdk.UntypedAPIFuture(
                    request_id=request_id, model_id=model_id, sample_sequence_ids=sequence_ids
                )
            )
        )

    @staticmethod
    def envelope(body: Any, what: str) -> tuple[str, int | None]:
        """``(model_id, seq_id)`` of an ordered training request, before the rest is validated."""
        if not isinstance(body, dict):
            raise UserError(f"{what}: expected a JSON object")
        model_id, seq_id = body.get("model_id"), body.get("seq_id")
        if not isinstance(model_id, str) or not model_id:
            raise UserError(f"{what}: model_id is required")
        if seq_id is not None and (not isinstance(seq_id, int) or isinstance(seq_id, bool) or seq_id < 0):
            raise UserError(f"{what}: seq_id must be a non-negative integer")
        return model_id, seq_id or None

    # -- service ----------------------------------------------------------------------------------
    async def healthz(self, request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def client_config(self, request: Request) -> JSONResponse:
        self.authorize(request)
        req = await self.parse(request, sdk.ClientConfigRequest, "client/config")
        if not _sdk_version_ok(req.sdk_version, self.config.sdk_versions):
            raise UserError(
                f"tinker SDK version {req.sdk_version} is not supported by this jtinker server "
                f"(it speaks {', '.join(self.config.sdk_versions)}); install tinker==0.38.0"
            )
        return self.ok(
            sdk.ClientConfigResponse(
                pjwt_auth_enabled=False,
                use_pyqwest_transport=False,  # plain httpx: the transport the server is tested with
                parallel_fwdbwd_chunks=True,  # chunks may arrive out of order; runtime orders by seq_id
                proto_compress_fwdbwd=self.config.compress_fwdbwd,
                fwdbwd_max_chunk_len=self.config.fwdbwd_max_chunk_len,
                sample_use_retrieve_futures=False,
                custom_loss_server_side=True,  # LossHandle losses run here, in one forward/backward
                sample_join_sampling_session=False,
            )
        )

    async def client_dynamic_config(self, request: Request) -> JSONResponse:
        self.authorize(request)
        await self.parse(request, sdk.ClientConfigRequest, "client/dynamic_config")
        return self.ok(sdk.ClientDynamicConfigResponse(sample_cancel_enabled=True))

    async def telemetry(self, request: Request) -> JSONResponse:
        self.authorize(request)
        await self.body(request)  # accepted and dropped: telemetry stays with the user
        return JSONResponse({"status": "accepted"})

    async def capabilities(self, request: Request) -> JSONResponse:
        self.authorize(request)
        models = [
            sdk.SupportedModel(model_name=name, trainable=True, sampleable=True)
            for name in self.runtime.supported_models()
        ]
        return self.ok(sdk.GetServerCapabilitiesResponse(supported_models=models))

    async def create_session(self, request: Request) -> JSONResponse:
        owner = self.authorize(request)
        req = await self.parse(request, sdk.CreateSessionRequest, "create_session")
        session_id = self.runtime.create_session(owner, req)
        return self.ok(sdk.CreateSessionResponse(session_id=session_id))

    async def session_heartbeat(self, request: Request) -> JSONResponse:
        owner = self.authorize(request)
        req = await self.parse(request, sdk.SessionHeartbeatRequest, "session_heartbeat")
        if not self.runtime.heartbeat(owner, req.session_id):
            return JSONResponse({"detail": f"session {req.session_id} is finished"}, status_code=410)
        return self.ok(sdk.SessionHeartbeatResponse())

    async def finish_session(self, request: Request) -> JSONResponse:
        owner = self.authorize(request)
        body = await self.json(request)
        reason = (
            body.get("reason", {}).get("type")
            if isinstance(body, dict) and isinstance(body.get("reason"), dict)
            else None
        )
        self.runtime.finish_session(owner, request.path_params["session_id"], reason)
        return JSONResponse({})

    async def get_session(self, request: Request) -> JSONResponse:
        owner = self.authorize(request)
        session_id = request.path_params["session_id"]
        row = self.runtime.own_session(owner, session_id, live=False)
        return self.ok(
            sdk.GetSessionResponse(
                training_run_ids=self.runtime.db.run_ids_of_session(session_id),
                sampler_ids=self.runtime.db.sampler_ids_of_session(session_id),
                user_metadata=_str_dict(row["user_metadata"]),
                display_name=row["display_name"],
            )
        )

    async def list_sessions(self, request: Request) -> JSONResponse:
        owner = self.authorize(request)
        limit, offset = _int_param(request, "limit", 20, 1), _int_param(request, "offset", 0, 0, 10**9)
        sessions, _ = self.runtime.db.sessions_of(owner, limit, offset)
        return self.ok(sdk.ListSessionsResponse(sessions=sessions))

    async def create_custom_loss(self, request: Request) -> JSONResponse:
        owner = self.authorize(request)
        req = await self.parse(request, sdk.CreateCustomLossRequest, "create_custom_loss")
        return self.future(self.runtime.create_custom_loss(owner, req))

    # -- models -----------------------------------------------------------------------------------
    async def create_model(self, request: Request) -> JSONResponse:
        owner = self.authorize(request)
        req = await self.parse(request, sdk.CreateModelRequest, "create_model")
        request_id = self.runtime.create_model(owner, req)
        return self.future(request_id, f"{req.session_id}:train:{req.model_seq_id}")

    async def get_info(self, request: Request) -> JSONResponse:
        owner = self.authorize(request)
        req = await self.parse(request, sdk.GetInfoRequest, "get_info")
        return self.ok(await self.runtime.get_info(owner, req.model_id))

    async def unload_model(self, request: Request) -> JSONResponse:
        owner = self.authorize(request)
        req = await self.parse(request, sdk.UnloadModelRequest, "unload_model")
        return self.future(self.runtime.unload_model(owner, req.model_id), req.model_id)

    async def forward_backward(self, request: Request, forward_only: bool = False) -> JSONResponse:
        owner = self.authorize(request)
        raw = await self.body(request)
        content_type = request.headers.get("content-type", "")
        if PROTO in content_type:
            parse = wire.parse_forward_backward_proto
        else:
            parse = functools.partial(wire.parse_forward_backward_json, forward_only=forward_only)
        # A big batch decodes off the loop, so other clients' requests are not held up.
        call = parse(raw) if len(raw) <= _INLINE_BYTES else await asyncio.to_thread(parse, raw)
        return self.future(self.runtime.forward_backward(owner, call), call.model_id)

    async def forward(self, request: Request) -> JSONResponse:
        return await self.forward_backward(request, forward_only=True)

    async def optim_step(self, request: Request) -> JSONResponse:
        owner = self.authorize(request)
        body = await self.json(request)
        model_id, seq_id = self.envelope(body, "optim_step")
        return self.future(self.runtime.optim_step(owner, model_id, seq_id, body), model_id)

    async def save_weights(self, request: Request) -> JSONResponse:
        owner = self.authorize(request)
        body = await self.json(request)
        model_id, seq_id = self.envelope(body, "save_weights")
        return self.future(self.runtime.save_weights(owner, model_id, seq_id, body), model_id)

    async def save_weights_for_sampler(self, request: Request) -> JSONResponse:
        owner = self.authorize(request)
        body = await self.json(request)
        model_id, seq_id = self.envelope(body, "save_weights_for_sampler")
        return self.future(self.runtime.save_weights_for_sampler(owner, model_id, seq_id, body), model_id)

    async def save_weights_external(self, request: Request) -> JSONResponse:
        owner = self.authorize(request)
        body = await self.json(request)
        model_id, seq_id = self.envelope(body, "save_weights_external")
        return self.future(self.runtime.save_weights_external(owner, model_id, seq_id, body), model_id)

    async def load_weights(self, request: Request) -> JSONResponse:
        owner = self.authorize(request)
        body = await self.json(request)
        if isinstance(body, dict) and body.get("session_id") is not None:
            req = wire.validate_model(sdk.LoadWeightsRequest, body, "load_weights")
            request_id = await self.runtime.create_model_from_state(owner, req)
            return self.future(request_id, f"{req.session_id}:train:{req.model_seq_id}")
        model_id, seq_id = self.envelope(body, "load_weights")
        try:
            req = wire.validate_model(sdk.LoadWeightsRequest, body, "load_weights")
        except UserError as e:  # the request still takes its seq_id, failing in order
            return self.future(
                self.runtime.submit_ordered(owner, model_id, seq_id, "LoadWeights", None, error=e), model_id
            )
        return self.future(self.runtime.load_weights(owner, model_id, seq_id, req), model_id)

    # -- sampling ---------------------------------------------------------------------------------
    async def create_sampling_session(self, request: Request) -> JSONResponse:
        owner = self.authorize(request)
        req = await self.parse(request, sdk.CreateSamplingSessionRequest, "create_sampling_session")
        sampler_id = await self.runtime.create_sampling_session(owner, req)
        return self.ok(sdk.CreateSamplingSessionResponse(sampling_session_id=sampler_id))

    async def get_sampler(self, request: Request) -> JSONResponse:
        owner = self.authorize(request)
        return self.ok(self.runtime.sampler_info(owner, request.path_params["sampler_id"]))

    async def asample(self, request: Request) -> JSONResponse:
        owner = self.authorize(request)
        req = await self.parse(request, sdk.SampleRequest, "asample")
        request_id, sequence_ids = self.runtime.sample(owner, req)
        return self.future(request_id, sequence_ids=sequence_ids)

    # -- futures ----------------------------------------------------------------------------------
    async def retrieve_future(self, request: Request) -> Response:
        owner = self.authorize(request)
        req = await self.parse(request, sdk.FutureRetrieveRequest, "retrieve_future")
        accept_proto = PROTO in request.headers.get("accept", "")
        kind, payload = await self.runtime.retrieve(owner, req.request_id, accept_proto=accept_proto)
        if kind == "proto":
            return Response(content=payload, media_type=PROTO)
        # "Not yet" as HTTP 408, the SDK's quiet retry (it reads the queue state from the body); a
        # 200 try_again body is also understood, but logs a warning per poll.
        return JSONResponse(payload, status_code=408 if payload.get("type") == "try_again" else 200)

    async def cancel_future(self, request: Request) -> JSONResponse:
        owner = self.authorize(request)
        body = await self.json(request)
        if not isinstance(body, dict) or not isinstance(body.get("request_id"), str):
            raise UserError("cancel_future: request_id is required")
        self.runtime.cancel(owner, body["request_id"])
        return JSONResponse({})

    # -- REST: runs and checkpoints ---------------------------------------------------------------
    async def checkpoints(self, run_id: str) -> list[sdk.Checkpoint]:
        listed = await _to_thread(self.runtime.store.list_checkpoints, run_id)
        rows = self.runtime.db.checkpoint_rows(run_id)
        now = time.time()
        out = []
        for c in listed:
            row = rows.get(c["tinker_path"], {})
            if expired(row, now):
                continue
            fields = checkpoint_fields(
                c, user_metadata=_str_dict(row.get("user_metadata")), expires_at=row.get("expires_at")
            )
            out.append(sdk.Checkpoint(**fields))
        return out

    async def _training_run(self, row: dict) -> sdk.TrainingRun:
        checkpoints = await self.checkpoints(row["run_id"])
        return sdk.TrainingRun(
            training_run_id=row["run_id"],
            base_model=row["base_model"],
            model_owner=row["owner"],
            is_lora=row["lora_rank"] is not None,  # a full fine-tune has no rank
            corrupted=bool(row["corrupted"]),
            lora_rank=row["lora_rank"],
            last_request_time=_ts(row["last_request_at"]),
            last_checkpoint=next((c for c in checkpoints if c.checkpoint_type == "training"), None),
            last_sampler_checkpoint=next((c for c in checkpoints if c.checkpoint_type == "sampler"), None),
            user_metadata=_str_dict(row["user_metadata"]),
        )

    async def list_training_runs(self, request: Request) -> JSONResponse:
        owner = self.authorize(request)
        limit, offset = _int_param(request, "limit", 20, 1), _int_param(request, "offset", 0, 0, 10**9)
        rows, total = self.runtime.db.runs_of(owner, limit, offset)
        runs = [await self._training_run(row) for row in rows]
        return self.ok(
            sdk.TrainingRunsResponse(
                training_runs=runs, cursor=sdk.Cursor(offset=offset, limit=limit, total_count=total)
            )
        )

    async def get_training_run(self, request: Request) -> JSONResponse:
        owner = self.authorize(request)
        row = self.runtime.own_run(owner, request.path_params["run_id"])
        return self.ok(await self._training_run(row))

    async def list_checkpoints(self, request: Request) -> JSONResponse:
        owner = self.authorize(request)
        run_id = request.path_params["run_id"]
        self.runtime.own_run(owner, run_id)
        return self.ok(sdk.CheckpointsListResponse(checkpoints=await self.checkpoints(run_id)))

    async def list_user_checkpoints(self, request: Request) -> JSONResponse:
        owner = self.authorize(request)
        limit, offset = _int_param(request, "limit", 100, 1), _int_param(request, "offset", 0, 0, 10**9)
        rows, _ = self.runtime.db.runs_of(owner)
        checkpoints = [c for row in rows for c in await self.checkpoints(row["run_id"])]
        checkpoints.sort(key=lambda c: c.time, reverse=True)
        return self.ok(
            sdk.CheckpointsListResponse(
                checkpoints=checkpoints[offset : offset + limit],
                cursor=sdk.Cursor(offset=offset, limit=limit, total_count=len(checkpoints)),
            )
        )

    def _checkpoint_path(self, owner: str, run_id: str, checkpoint_id: str) -> str:
        self.runtime.own_run(owner, run_id)
        path = f"tinker://{run_id}/{checkpoint_id}"
        try:
            CheckpointPath.parse(path, "checkpoint_id")
        except ValueError as e:
            raise UserError(str(e)) from None
        return path

    async def delete_checkpoint(self, request: Request) -> JSONResponse:
        owner = self.authorize(request)
        path = self._checkpoint_path(
            owner, request.path_params["run_id"], request.path_params["checkpoint_id"]
        )
        try:
            await _to_thread(self.runtime.store.delete, path)
        except FileNotFoundError as e:
            raise UserError(str(e), 404) from None
        self.runtime.db.delete_checkpoint(path)
        return JSONResponse({})

    async def set_checkpoint_ttl(self, request: Request) -> JSONResponse:
        owner = self.authorize(request)
        checkpoint_id = f"{request.path_params['kind']}/{request.path_params['name']}"
        path = self._checkpoint_path(owner, request.path_params["run_id"], checkpoint_id)
        body = await self.json(request)
        ttl = body.get("ttl_seconds") if isinstance(body, dict) else None
        if ttl is not None and (not isinstance(ttl, int) or ttl <= 0):
            raise UserError("ttl_seconds: must be a positive integer or null")
        await self.runtime.read_meta(path)  # 404 unless it exists
        row = self.runtime.db.checkpoint_rows(request.path_params["run_id"]).get(path, {})
        self.runtime.db.add_checkpoint(
            path, request.path_params["run_id"], owner, row.get("user_metadata"), ttl
        )
        return JSONResponse({})

    async def external_weights_urls(self, request: Request) -> JSONResponse:
        """Per-file download URLs of an external weights checkpoint, signed for an hour (no API key
        needed to fetch them, as with the hosted service's storage URLs)."""
        owner = self.authorize(request)
        run_id, kind, name = (request.path_params[k] for k in ("run_id", "kind", "name"))
        path = self._checkpoint_path(owner, run_id, f"{kind}/{name}")
        self.runtime.own_checkpoint(owner, path)
        try:
            files = await _to_thread(self.runtime.store.files, path)
        except FileNotFoundError as e:
            raise UserError(str(e), 404) from None
        except ValueError as e:
            raise UserError(str(e)) from None
        expires = int(time.time() + URLS_VALID_FOR.total_seconds())
        base = str(request.base_url).rstrip("/")
        urls = {
            file: f"{base}{API}/external_weights/{urllib.parse.quote(f'{run_id}/{name}/{file}')}?"
            + urllib.parse.urlencode(
                {"expires": expires, "signature": self._sign(run_id, name, file, expires)}
            )
            for file in files
        }
        return self.ok(
            sdk.ExternalWeightsUrlsResponse(urls=urls, expires=dt.datetime.fromtimestamp(expires, dt.UTC))
        )

    def _sign(self, run_id: str, name: str, file: str, expires: int) -> str:
        message = f"{run_id}/{name}/{file}/{expires}".encode()
        return hmac.new(self.url_key, message, hashlib.sha256).hexdigest()

    async def external_weights_file(self, request: Request) -> Response:
        run_id, name, file = (request.path_params[k] for k in ("run_id", "name", "file"))
        expires, signature = (
            request.query_params.get("expires", ""),
            request.query_params.get("signature", ""),
        )
        if not expires.isdigit() or not hmac.compare_digest(
            signature, self._sign(run_id, name, file, int(expires))
        ):
            raise UserError("invalid download URL: get a new one with get_external_weights_urls", 403)
        if int(expires) < time.time():
            raise UserError("expired download URL: get a new one with get_external_weights_urls", 403)
        path = f"tinker://{run_id}/external_weights/{name}"
        try:
            found = (await _to_thread(self.runtime.store.files, path)).get(file)
        except (FileNotFoundError, ValueError):
            found = None
        if found is None:
            raise UserError(f"{path}: no file {file!r}", 404)
        return FileResponse(found)

    async def weights_info(self, request: Request) -> JSONResponse:
        owner = self.authorize(request)
        body = await self.json(request)
        path = body.get("tinker_path") if isinstance(body, dict) else None
        if not isinstance(path, str):
            raise UserError("weights_info: tinker_path is required")
        self.runtime.own_checkpoint(owner, path, "tinker_path")
        meta = await self.runtime.read_meta(path, "tinker_path")
        return self.ok(sdk.WeightsInfoResponse(**weights_info(meta)))

    async def not_supported(self, request: Request) -> JSONResponse:
        self.authorize(request)
        raise UserError(f"{request.method} {request.url.path} is not supported by the jtinker server", 404)

    # -- status -----------------------------------------------------------------------------------
    async def status_json(self, request: Request) -> JSONResponse:
        return JSONResponse(self._status())

    def _status(self) -> dict:
        status = self.runtime.status()
        status["futures"] = self.runtime.db.future_counts()
        return status

    async def status_page(self, request: Request) -> HTMLResponse:
        s = self._status()
        rows = (
            "".join(
                f"<tr><td>{html.escape(b['name'])}</td><td>{b['queue_depth']}</td><td>{b['training_models']}</td>"
                f"<td>{b['samplers']}</td></tr>"
                for b in s["base_models"]
            )
            or "<tr><td colspan=4>none loaded yet</td></tr>"
        )
        errors = "".join(
            f"<li>{html.escape(k)}: {html.escape(v)}</li>" for k, v in s["base_model_errors"].items()
        )
        page = f"""<!doctype html><html><head><title>jtinker server</title></head><body>
<h1>jtinker server</h1>
<p>Tinker API at <code>{API}</code> (SDK {", ".join(self.config.sdk_versions)}); up {s["uptime_s"]} s.</p>
<table border=1 cellpadding=4><tr><th>base model</th><th>queue depth</th><th>training models</th>
<th>samplers</th></tr>{rows}</table>
{"<p>Load errors:</p><ul>" + errors + "</ul>" if errors else ""}
<p>Training models: {s["training_models"]}; samplers: {s["samplers"]};
buffered (waiting for an earlier seq_id): {s["buffered_requests"]};
pending futures: {s["pending_futures"]}.</p>
<p>Machine-readable: <a href="/status">/status</a>. Health: <a href="/healthz">/healthz</a>.</p>
</body></html>"""
        return HTMLResponse(page)


async def _to_thread(fn, *args):
    return await asyncio.to_thread(fn, *args)


def create_app(config: ServerConfig, keys: KeyRing, db: Database | None = None) -> FastAPI:
    """The ASGI app; the runtime starts (and preloads ``config.base_models``) with the app's lifespan."""
    from jtinker.server.state.db import open_database

    db = db or open_database(config.db_url, config.home)
    runtime = Runtime(
        home=config.home,
        db=db,
        mesh=config.mesh,
        base_models=config.base_models,
        poll_timeout_s=config.poll_timeout_s,
    )
    api = Api(config, runtime, keys)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await runtime.start()
        try:
            yield
        finally:
            await runtime.stop()

    app = FastAPI(title="jtinker", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.runtime = runtime
    app.state.api = api

    def route(path: str, handler, methods: tuple[str, ...] = ("POST",)) -> None:
        app.add_api_route(path, handler, methods=list(methods), include_in_schema=False)

    route("/", api.status_page, ("GET",))
    route("/status", api.status_json, ("GET",))
    route("/healthz", api.healthz, ("GET",))
    route(f"{API}/healthz", api.healthz, ("GET",))
    route(f"{API}/client/config", api.client_config)
    route(f"{API}/client/dynamic_config", api.client_dynamic_config)
    route(f"{API}/telemetry", api.telemetry)
    route(f"{API}/get_server_capabilities", api.capabilities, ("GET",))
    route(f"{API}/create_session", api.create_session)
    route(f"{API}/session_heartbeat", api.session_heartbeat)
    route(f"{API}/sessions", api.list_sessions, ("GET",))
    route(f"{API}/sessions/{{session_id}}", api.get_session, ("GET",))
    route(f"{API}/sessions/{{session_id}}/finish", api.finish_session)
    route(f"{API}/create_custom_loss", api.create_custom_loss)
    route(f"{API}/create_model", api.create_model)
    route(f"{API}/get_info", api.get_info)
    route(f"{API}/unload_model", api.unload_model)
    route(f"{API}/forward_backward", api.forward_backward)
    route(f"{API}/forward", api.forward)
    route(f"{API}/optim_step", api.optim_step)
    route(f"{API}/save_weights", api.save_weights)
    route(f"{API}/save_weights_for_sampler", api.save_weights_for_sampler)
    route(f"{API}/save_weights_external", api.save_weights_external)
    route(f"{API}/load_weights", api.load_weights)
    route(f"{API}/create_sampling_session", api.create_sampling_session)
    route(f"{API}/samplers/{{sampler_id}}", api.get_sampler, ("GET",))
    route(f"{API}/asample", api.asample)
    route(f"{API}/retrieve_future", api.retrieve_future)
    route(f"{API}/cancel_future", api.cancel_future)
    route(f"{API}/training_runs", api.list_training_runs, ("GET",))
    route(f"{API}/training_runs/{{run_id}}", api.get_training_run, ("GET",))
    route(f"{API}/training_runs/{{run_id}}/checkpoints", api.list_checkpoints, ("GET",))
    ckpt = f"{API}/training_runs/{{run_id}}/checkpoints/{{kind}}/{{name}}"
    route(f"{ckpt}/publish", api.not_supported, ("POST", "DELETE"))
    route(f"{ckpt}/ttl", api.set_checkpoint_ttl, ("PUT",))
    route(f"{ckpt}/external_weights_urls", api.external_weights_urls, ("GET",))
    route(f"{API}/external_weights/{{run_id}}/{{name}}/{{file:path}}", api.external_weights_file, ("GET",))
    route(
        f"{API}/training_runs/{{run_id}}/checkpoints/{{checkpoint_id:path}}",
        api.delete_checkpoint,
        ("DELETE",),
    )
    route(f"{API}/checkpoints", api.list_user_checkpoints, ("GET",))
    route(f"{API}/weights_info", api.weights_info)
    for path, handler, methods in OpenAIRoutes(api).routes():
        route(path, handler, methods)

    @app.exception_handler(UserError)
    async def user_error(request: Request, exc: UserError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            detail = f"the jtinker server has no route {request.method} {request.url.path}"
        elif exc.status_code == 405:
            detail = f"{request.method} is not allowed on {request.url.path}"
        else:
            detail = str(exc.detail)
        return JSONResponse({"detail": detail}, status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return JSONResponse(
            {"detail": f"internal server error: {type(exc).__name__}: {exc}"},
            status_code=500,
            headers={"x-should-retry": "false"},
        )

    return app
