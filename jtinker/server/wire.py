"""Wire encodings of the Tinker protocol: SDK requests in, jtinker types to the engine, SDK bytes out.

Parsing reuses the SDK's own pydantic request models and protobuf schema (``tinker.proto``); the
protobuf *encoders* here are the inverses of the SDK's ``proto/response_conv.py`` decoders, and the
decoders the inverses of ``proto/request_conv.py``. Every parse error is a :class:`UserError`, which
the HTTP layer turns into a 4xx (or a ``RequestFailedResponse`` with category ``user``).
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pydantic
import zstandard
from google.protobuf.message import DecodeError
from tinker.proto import tinker_public_pb2 as pb
from tinker.types._pydantic_types.forward_backward_input import ForwardBackwardInput as _ForwardBackwardInput

from jtinker import types as jt


class UserError(ValueError):
    """A request the client got wrong; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


# -- bodies -------------------------------------------------------------------------------------------


def decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    """Undoes ``Content-Encoding: zstd`` (the SDK's compressed forward_backward), capped at ``limit``."""
    if not encoding or encoding.lower() == "identity":
        return body
    if encoding.lower() != "zstd":
        raise UserError(f"Content-Encoding {encoding!r} is not supported (use zstd or none)", 415)
    try:
        with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(body)) as reader:
            out = reader.read(limit + 1)
    except zstandard.ZstdError as e:
        raise UserError(f"body is not valid zstd: {e}") from e
    if len(out) > limit:
        raise UserError(f"decompressed body exceeds the server's limit of {limit} bytes", 413)
    return out


def validate_model(model_cls: type[pydantic.BaseModel], body: Any, what: str) -> Any:
    """``model_cls.model_validate(body)`` with a one-line error naming the bad fields."""
    if not isinstance(body, dict):
        raise UserError(f"{what}: expected a JSON object, got {type(body).__name__}")
    try:
        return model_cls.model_validate(body)
    except pydantic.ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<body>'}: {err['msg']}" for err in e.errors()[:5]
        )
        raise UserError(f"{what}: invalid request ({problems})") from None


# -- tensors and inputs -------------------------------------------------------------------------------

_PROTO_TO_NUMPY = {
    pb.DTYPE_FLOAT32: np.dtype(np.float32),
    pb.DTYPE_INT64: np.dtype(np.int64),
    pb.DTYPE_INT32: np.dtype(np.int32),
    pb.DTYPE_BFLOAT16: np.dtype(np.uint16),
}
_PROTO_TO_TENSOR_DTYPE = {
    pb.DTYPE_FLOAT32: "float32",
    pb.DTYPE_BFLOAT16: "float32",
    pb.DTYPE_INT64: "int64",
    pb.DTYPE_INT32: "int64",
}


def _frombuffer(buf: bytes, dtype: np.dtype, field: str) -> np.ndarray:
    if len(buf) % dtype.itemsize:
        raise UserError(f"{field}: {len(buf)} bytes is not a whole number of {dtype.name} values")
    return np.frombuffer(buf, dtype=dtype)


def _widen(arr: np.ndarray, proto_dtype: int) -> np.ndarray:
    if proto_dtype == pb.DTYPE_BFLOAT16:
        return (arr.astype(np.uint32) << 16).view(np.float32)
    if proto_dtype == pb.DTYPE_INT32:
        return arr.astype(np.int64)
    return arr.copy()  # frombuffer views are read-only


def tensor_from_proto(msg: pb.Tensor, field: str) -> jt.TensorData:
    np_dtype = _PROTO_TO_NUMPY.get(msg.dtype)
    if np_dtype is None:
        raise UserError(f"{field}: unsupported tensor dtype {msg.dtype}")
    dtype = _PROTO_TO_TENSOR_DTYPE[msg.dtype]
    shape = [int(s) for s in msg.shape] or None
    if shape is not None and any(s < 0 for s in shape):
        raise UserError(f"{field}: negative dimension in shape {shape}")
    if msg.HasField("sparse_csr"):
        csr = msg.sparse_csr
        values = _widen(_frombuffer(csr.values, np_dtype, field), msg.dtype)
        crow = _frombuffer(csr.crow_indices, np.dtype(np.int64), field).tolist()
        col = _frombuffer(csr.col_indices, np.dtype(np.int64), field).tolist()
        if shape is None or len(shape) != 2:
            raise UserError(f"{field}: a sparse CSR tensor needs a 2-D shape")
        if len(crow) != shape[0] + 1 or len(col) != len(values) or (crow and crow[-1] != len(values)):
            raise UserError(f"{field}: inconsistent sparse CSR indices for shape {shape}")
        if col and (min(col) < 0 or max(col) >= shape[1]):
            raise UserError(f"{field}: sparse CSR column index out of range for shape {shape}")
        if any(b < a for a, b in zip(crow, crow[1:], strict=False)):
            raise UserError(f"{field}: sparse CSR row pointers must not decrease")
        return jt.TensorData(values, dtype, shape, sparse_crow_indices=crow, sparse_col_indices=col)
    data = _widen(_frombuffer(msg.dense, np_dtype, field), msg.dtype)
    if shape is not None and math.prod(shape) != data.size:
        raise UserError(f"{field}: shape {shape} does not match {data.size} values")
    return jt.TensorData(data, dtype, shape if shape is not None else [int(data.size)])


def tensor_from_sdk(td: Any, field: str) -> jt.TensorData:
    """A JSON-path ``TensorData`` (pydantic or dataclass) as ours."""
    try:
        return jt.TensorData(
            np.asarray(td.data),
            td.dtype,
            list(td.shape) if td.shape is not None else None,
            sparse_crow_indices=td.sparse_crow_indices,
            sparse_col_indices=td.sparse_col_indices,
        )
    except (ValueError, TypeError) as e:
        raise UserError(f"{field}: {e}") from None


def _text_tokens(chunk_kind: str | None, field: str) -> None:
    if chunk_kind != "encoded_text":
        raise UserError(
            f"{field}: {chunk_kind or 'empty'} chunks are not supported by this server (text tokens only)"
        )


def _span_from_proto(
    msg: pb.ProvenanceSpan, field: str
) -> jt.PromptProvenanceSpan | jt.SampledProvenanceSpan:
    kind = msg.WhichOneof("span")
    if kind is None:
        raise UserError(f"{field}: empty provenance span")
    arm = getattr(msg, kind)
    cls = jt.SampledProvenanceSpan if kind == "sampled_tokens" else jt.PromptProvenanceSpan
    try:
        return cls(sequence_id=arm.sequence_id, offset=arm.offset, length=arm.length)
    except ValueError as e:
        raise UserError(f"{field}: {e}") from None


def datum_from_proto(msg: pb.Datum, i: int) -> jt.Datum:
    chunks = []
    for j, chunk in enumerate(msg.model_input):
        kind = chunk.WhichOneof("chunk")
        _text_tokens(kind, f"data[{i}].model_input.chunks[{j}]")
        tokens = _frombuffer(chunk.encoded_text.tokens, np.dtype(np.int32), f"data[{i}].model_input")
        chunks.append(jt.EncodedTextChunk(tokens=tokens.tolist()))
    inputs = {
        name: tensor_from_proto(tensor, f"data[{i}].loss_fn_inputs[{name!r}]")
        for name, tensor in msg.loss_fn_inputs.items()
    }
    spans: dict[str, list] = {}
    if len(msg.model_input_spans) or len(msg.loss_fn_input_spans):
        spans = {
            "model_input_spans": [
                _span_from_proto(s, f"data[{i}].model_input_spans") for s in msg.model_input_spans
            ],
            "loss_fn_input_spans": [
                _span_from_proto(s, f"data[{i}].loss_fn_input_spans") for s in msg.loss_fn_input_spans
            ],
        }
    try:
        return jt.Datum(model_input=jt.ModelInput(chunks=chunks), loss_fn_inputs=inputs, **spans)
    except (ValueError, TypeError) as e:
        raise UserError(f"data[{i}]: {e}") from None


def datum_from_sdk(d: Any, i: int) -> jt.Datum:
    chunks = []
    for j, chunk in enumerate(d.model_input.chunks):
        _text_tokens(getattr(chunk, "type", None), f"data[{i}].model_input.chunks[{j}]")
        chunks.append(jt.EncodedTextChunk(tokens=[int(t) for t in chunk.tokens]))
    inputs = {k: tensor_from_sdk(v, f"data[{i}].loss_fn_inputs[{k!r}]") for k, v in d.loss_fn_inputs.items()}
    try:
        return jt.Datum(model_input=jt.ModelInput(chunks=chunks), loss_fn_inputs=inputs)
    except (ValueError, TypeError) as e:
        raise UserError(f"data[{i}]: {e}") from None


def model_input_from_sdk(model_input: Any, field: str = "prompt") -> jt.ModelInput:
    chunks = []
    for j, chunk in enumerate(model_input.chunks):
        _text_tokens(getattr(chunk, "type", None), f"{field}.chunks[{j}]")
        chunks.append(jt.EncodedTextChunk(tokens=[int(t) for t in chunk.tokens]))
    return jt.ModelInput(chunks=chunks)


class ForwardBackwardCall:
    """A parsed forward/forward_backward request. ``error`` is set when the envelope (model_id,
    seq_id) parsed but the payload did not: the request still takes its place in the seq_id order."""

    def __init__(self, model_id: str, seq_id: int | None, forward_only: bool):
        self.model_id = model_id
        self.seq_id = seq_id
        self.forward_only = forward_only
        self.loss_fn = ""
        self.loss_fn_config: dict[str, float | str] | None = None
        self.data: list[jt.Datum] = []
        self.error: UserError | None = None


def parse_forward_backward_proto(body: bytes) -> ForwardBackwardCall:
    msg = pb.ForwardBackwardRequest()
    try:
        msg.ParseFromString(body)
    except (DecodeError, ValueError) as e:
        raise UserError(
            f"forward_backward: body is not a valid ForwardBackwardRequest protobuf ({e})"
        ) from None
    if not msg.model_id:
        raise UserError("forward_backward: model_id is required")
    call = ForwardBackwardCall(msg.model_id, msg.seq_id or None, msg.forward_only)
    try:
        call.loss_fn = msg.loss_fn
        config: dict[str, float | str] = {k: float(v) for k, v in msg.loss_fn_config.items()}
        for k, v in msg.loss_fn_config_v2.items():  # v2 wins, as on Tinker's servers
            kind = v.WhichOneof("value")
            if kind == "text":
                config[k] = v.text
            elif kind == "number":
                config[k] = v.number
        call.loss_fn_config = config or None
        call.data = [datum_from_proto(d, i) for i, d in enumerate(msg.data)]
    except UserError as e:
        call.error = e
    return call


def parse_forward_backward_json(raw: bytes, forward_only: bool) -> ForwardBackwardCall:
    """The JSON form (older SDKs, curl): ``{model_id, seq_id, forward_backward_input: {...}}``."""
    try:
        body = json.loads(raw or b"{}")
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(
            f"forward_backward: body is neither application/x-protobuf (set Content-Type) nor valid JSON: {e}"
        ) from None
    if not isinstance(body, dict) or not isinstance(body.get("model_id"), str):
        raise UserError("forward_backward: model_id is required")
    seq_id = body.get("seq_id")
    if seq_id is not None and (not isinstance(seq_id, int) or isinstance(seq_id, bool)):
        raise UserError("forward_backward: seq_id must be an integer")
    call = ForwardBackwardCall(body["model_id"], seq_id or None, bool(body.get("forward_only", forward_only)))
    try:
        fb = validate_model(
            _ForwardBackwardInput, body.get("forward_backward_input"), "forward_backward_input"
        )
        call.loss_fn = fb.loss_fn
        call.loss_fn_config = dict(fb.loss_fn_config) if fb.loss_fn_config else None
        call.data = [datum_from_sdk(d, i) for i, d in enumerate(fb.data)]
    except UserError as e:
        call.error = e
    return call


def sampling_params_from_sdk(params: Any) -> jt.SamplingParams:
    stop = params.stop
    if stop is not None and not isinstance(stop, str):
        stop = list(stop)
    return jt.SamplingParams(
        max_tokens=params.max_tokens,
        seed=params.seed,
        stop=stop,
        temperature=params.temperature,
        top_k=params.top_k,
        top_p=params.top_p,
    )


# -- responses ------------------------------------------------------------------------------------------

_TENSOR_TO_PROTO = {"float32": pb.DTYPE_FLOAT32, "int64": pb.DTYPE_INT64}


def _output_signature(output: Mapping[str, jt.TensorData]) -> tuple:
    sig = []
    for name in sorted(output):
        arr = output[name].to_numpy()
        sig.append((name, output[name].dtype, tuple(int(s) for s in arr.shape[1:])))
    return tuple(sig)


def encode_forward_backward_output(out: jt.ForwardBackwardOutput) -> bytes:
    """``ForwardBackwardOutput`` protobuf: one ``ArrayRecord`` per run of datums with equal field shapes."""
    msg = pb.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord")
    for key, value in out.metrics.items():
        msg.metrics[key] = float(value)
    outputs = out.loss_fn_outputs
    i = 0
    while i < len(outputs):
        sig = _output_signature(outputs[i])
        j = i + 1
        while j < len(outputs) and _output_signature(outputs[j]) == sig:
            j += 1
        record = msg.loss_fn_outputs.add(type_tag="ArrayRecord", num_datums=j - i)
        for name, dtype, trailing in sig:
            np_dtype = np.float32 if dtype == "float32" else np.int64
            arrays = [np.ascontiguousarray(outputs[k][name].to_numpy(), dtype=np_dtype) for k in range(i, j)]
            offsets = np.zeros(len(arrays) + 1, np.int64)
            offsets[1:] = np.cumsum([a.nbytes for a in arrays])
            field = record.fields[name]
            field.dtype = _TENSOR_TO_PROTO[dtype]
            field.trailing_shape.extend(trailing)
            field.data = b"".join(a.tobytes() for a in arrays)
            field.offsets = offsets.tobytes()
        i = j
    return msg.SerializeToString()


def _topk_to_proto(topk: jt.TopkLogprobs, msg: pb.TopkLogprobs) -> None:
    ids = np.ascontiguousarray(topk.token_ids, dtype=np.int32)
    lps = np.ascontiguousarray(topk.logprobs, dtype=np.float32)
    msg.length, msg.k = (int(ids.shape[0]), int(ids.shape[1])) if ids.ndim == 2 else (0, 0)
    msg.token_ids = ids.tobytes()
    msg.logprobs = lps.tobytes()


def _tensor_to_proto(td: jt.TensorData, msg: pb.Tensor) -> None:
    """A float32 or int64 ``TensorData`` into a proto ``Tensor``, a sparse CSR one kept sparse."""
    msg.dtype = _TENSOR_TO_PROTO[td.dtype]
    msg.shape.extend(td.shape or [])
    values = np.ascontiguousarray(td.data, dtype=np.float32 if td.dtype == "float32" else np.int64)
    if td.sparse_crow_indices is None:
        msg.dense = values.tobytes()
        return
    msg.sparse_csr.values = values.tobytes()
    msg.sparse_csr.crow_indices = np.asarray(td.sparse_crow_indices, np.int64).tobytes()
    msg.sparse_csr.col_indices = np.asarray(td.sparse_col_indices, np.int64).tobytes()


def encode_sample_response(resp: jt.SampleResponse) -> bytes:
    """``SampleResponse`` protobuf (what the SDK decodes in ``deserialize_sample_response``)."""
    msg = pb.SampleResponse(prompt_cache_hit_tokens=int(resp.prompt_cache_hit_tokens or 0))
    for seq in resp.sequences:
        out = msg.sequences.add(
            stop_reason=pb.STOP_REASON_STOP if seq.stop_reason == "stop" else pb.STOP_REASON_LENGTH,
            tokens=np.asarray(seq.tokens_np if seq.tokens_np is not None else [], np.int32).tobytes(),
        )
        if seq.logprobs_np is not None:
            out.logprobs = np.asarray(seq.logprobs_np, np.float32).tobytes()
        if seq.topk_logprobs_np is not None:
            _topk_to_proto(seq.topk_logprobs_np, out.topk_sampled_logprobs)
    if resp.prompt_logprobs_np is not None:
        msg.prompt_logprobs = np.asarray(resp.prompt_logprobs_np, np.float32).tobytes()
    if resp.topk_prompt_logprobs_np is not None:
        _topk_to_proto(resp.topk_prompt_logprobs_np, msg.topk_prompt_logprobs)
    if resp.target_prompt_logprobs is not None:
        _tensor_to_proto(resp.target_prompt_logprobs, msg.target_prompt_logprobs)
    if resp.prompt_alt_tokens is not None:
        _tensor_to_proto(resp.prompt_alt_tokens.tokens, msg.prompt_alt_tokens.tokens)
        _tensor_to_proto(resp.prompt_alt_tokens.logprobs, msg.prompt_alt_tokens.logprobs)
    return msg.SerializeToString()


def sample_response_json(resp: jt.SampleResponse) -> dict:
    """JSON fallback for clients that do not accept protobuf (the 0.38 SDK always does): the fields of
    the protobuf response, as lists (top-k: ``[token_id, logprob]`` pairs per position, null where
    none) and tensors (``{"data", "dtype", "shape"}``). Fields a request did not ask for are left out."""

    def tensor(t: jt.TensorData) -> dict:
        return {"data": t.data, "dtype": t.dtype, "shape": t.shape}

    def sequence(s: jt.SampledSequence) -> dict:
        out = {"stop_reason": s.stop_reason, "tokens": s.tokens, "logprobs": s.logprobs}
        if s.topk_logprobs is not None:
            out["topk_logprobs"] = s.topk_logprobs
        return out

    out = {
        "sequences": [sequence(s) for s in resp.sequences],
        "prompt_logprobs": resp.prompt_logprobs,
        "prompt_cache_hit_tokens": int(resp.prompt_cache_hit_tokens or 0),
        "type": "sample",
    }
    if resp.topk_prompt_logprobs is not None:
        out["topk_prompt_logprobs"] = resp.topk_prompt_logprobs
    if resp.target_prompt_logprobs is not None:
        out["target_prompt_logprobs"] = tensor(resp.target_prompt_logprobs)
    if resp.prompt_alt_tokens is not None:
        alt = resp.prompt_alt_tokens
        out["prompt_alt_tokens"] = {"tokens": tensor(alt.tokens), "logprobs": tensor(alt.logprobs)}
    return out


def forward_backward_json(out: jt.ForwardBackwardOutput) -> dict:
    return {
        "loss_fn_output_type": out.loss_fn_output_type,
        "loss_fn_outputs": [
            {k: {"data": v.data, "dtype": v.dtype, "shape": v.shape} for k, v in o.items()}
            for o in out.loss_fn_outputs
        ],
        "metrics": dict(out.metrics),
    }


def dump(model: pydantic.BaseModel) -> dict:
    """An SDK response model as the JSON the SDK validates."""
    return model.model_dump(mode="json", exclude_none=True)
