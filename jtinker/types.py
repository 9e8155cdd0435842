"""Tinker API data types, mirrored from the official ``tinker`` SDK (0.38) without pydantic.

Every class keeps the SDK's name, fields, defaults, constructor and helper methods, so a script written
against ``tinker.types`` runs unchanged against ``jtinker.types``:

- classes that are pydantic models in the SDK (``ModelInput``, ``AdamParams``, ``SamplingParams``, the
  responses, ...) are frozen keyword-only dataclasses here, because pydantic constructors take keywords only;
- classes that are dataclasses in the SDK (``TensorData``, ``Datum``, ``SampledSequence``,
  ``SampleResponse``, ``ForwardBackwardOutput``, ...) keep the SDK's positional field order.

All of them share ``_Model``, which gives pydantic-style ``model_dump`` / ``model_validate`` /
``model_copy`` from the constructor signature and type hints, so there is no per-class conversion code.
``model_validate`` also reads attributes of foreign objects (the SDK's own instances), and ``rebuild_as``
goes the other way, into any namespace with same-named classes (e.g. ``tinker.types``).

torch is optional and only imported inside the torch helpers.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import functools
import inspect
import json
import math
import sys
import types as _pytypes
import typing
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeAlias, TypeVar, Union

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    import torch

__all__ = [
    # aliases
    "CheckpointType",
    "LossFnInputs",
    "LossFnOutput",
    "LossFnType",
    "ModelID",
    "ModelInputChunk",
    "OptimizerConfig",
    "OptimParams",
    "ProvenanceSpans",
    "RequestID",
    "StopReason",
    "TensorDtype",
    # model input and training data
    "TensorData",
    "EncodedTextChunk",
    "ImageChunk",
    "ImageAssetPointerChunk",
    "ModelInput",
    "PromptProvenanceSpan",
    "SampledProvenanceSpan",
    "Datum",
    # optimizer
    "AdamParams",
    "AdamOptimizerConfig",
    "DimuonOptimizerConfig",
    "DimuonParams",
    # sampling
    "SamplingParams",
    "TopkLogprobs",
    "PromptAltTokens",
    "SampledSequence",
    "SampleResponse",
    # training responses
    "ForwardBackwardOutput",
    "OptimStepResponse",
    "SaveWeightsResponse",
    "SaveWeightsForSamplerResponse",
    "SaveWeightsForSamplerResponseInternal",
    "SaveWeightsExternalResponse",
    "LoadWeightsResponse",
    "ModelData",
    "GetInfoResponse",
    "LoraConfig",
    # service / rest responses
    "SupportedModel",
    "GetServerCapabilitiesResponse",
    "GetSamplerResponse",
    "WeightsInfoResponse",
    "ExternalWeightsUrlsResponse",
    "Checkpoint",
    "ParsedCheckpointTinkerPath",
    "Cursor",
    "CheckpointsListResponse",
    "TrainingRun",
    "TrainingRunsResponse",
    # conversion helper
    "rebuild_as",
]

_M = TypeVar("_M", bound="_Model")

TensorDtype: TypeAlias = Literal["int64", "float32"]
StopReason: TypeAlias = Literal["length", "stop"]
LossFnType: TypeAlias = Literal[
    "cross_entropy", "importance_sampling", "ppo", "cispo", "dro", "gspo", "stable_reinforce", "custom"
]
CheckpointType: TypeAlias = Literal["training", "sampler", "external"]
ModelID: TypeAlias = str
RequestID: TypeAlias = str

# Frozen + keyword-only: the shape of a pydantic model's constructor.
_pydantic_like = dataclasses.dataclass(frozen=True, kw_only=True)


# --------------------------------------------------------------------------------------------------------
# Generic conversion: one mixin for every type
# --------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Spec:
    """What ``_Model`` needs to know about a class, derived once from its signature and hints."""

    public: tuple[str, ...]  # constructor parameters that model_dump emits
    accepted: frozenset[str]  # public plus underscored parameters (the SDK's private list storage)
    hints: dict[str, Any]
    np_dtypes: dict[str, Any]  # ndarray fields: dtype to restore from JSON lists


@functools.cache
def _spec(cls: type) -> _Spec:
    names = tuple(inspect.signature(cls).parameters)
    np_dtypes = {f.name: f.metadata["np_dtype"] for f in dataclasses.fields(cls) if "np_dtype" in f.metadata}
    return _Spec(
        public=tuple(n for n in names if not n.startswith("_")),
        accepted=frozenset(names),
        hints=typing.get_type_hints(cls),
        np_dtypes=np_dtypes,
    )


_SCALARS = (int, float, str, bool, type(None))


def _jsonable(value: Any, exclude_none: bool) -> Any:
    """Turn a value into plain JSON-friendly Python (dicts, lists, scalars)."""
    if isinstance(value, _Model):
        return value.model_dump(exclude_none=exclude_none)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        return {k: _jsonable(v, exclude_none) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        if all(type(v) in _SCALARS for v in value):  # fast path for token lists
            return list(value)
        return [_jsonable(v, exclude_none) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bytes):  # the SDK sends image bytes as base64 text
        return base64.b64encode(value).decode("ascii")
    return value


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, _Model)


@functools.cache
def _type_tag(cls: type) -> str | None:
    """The default of a ``type`` discriminator field, if the class has one."""
    f = {f.name: f for f in dataclasses.fields(cls)}.get("type")
    return f.default if f is not None and isinstance(f.default, str) else None


def _pick_member(models: list[type[_Model]], value: Any) -> type[_Model]:
    """Choose the union member for a dict (by its ``type`` tag) or a foreign object (by class name)."""
    if not isinstance(value, Mapping):
        for m in models:
            if type(value).__name__ == m.__name__:
                return m
    tag = value.get("type") if isinstance(value, Mapping) else getattr(value, "type", None)
    matches = [m for m in models if _type_tag(m) == tag]
    if len(matches) != 1:
        names = ", ".join(m.__name__ for m in models)
        raise ValueError(f"cannot tell which of {names} a value with type={tag!r} is")
    return matches[0]


def _coerce(value: Any, hint: Any, np_dtype: Any = None) -> Any:
    """Convert a JSON-ish or foreign value into what the type hint asks for (our classes, arrays, ...)."""
    if value is None or hint is None:
        return value
    origin = typing.get_origin(hint)
    if origin is Union or origin is _pytypes.UnionType:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return _coerce(value, args[0], np_dtype)
        models = [a for a in args if _is_model(a)]
        # Plain values (stop strings, token lists) and our own instances need no conversion.
        if not models or isinstance(value, (*models, str, bytes, list, tuple)):
            return value
        return _pick_member(models, value).model_validate(value)
    if origin in (list, Sequence):
        (arg,) = typing.get_args(hint) or (Any,)
        if arg in _SCALARS or arg is Any:
            return list(value)
        return [_coerce(v, arg) for v in value]
    if origin is tuple:  # (token_id, logprob) pairs arrive as JSON lists
        return tuple(value)
    if origin in (dict, Mapping):
        _, arg = typing.get_args(hint) or (Any, Any)
        return {k: _coerce(v, arg) for k, v in value.items()}
    if _is_model(hint):
        return hint.model_validate(value)
    if hint is np.ndarray:
        return np.asarray(value, dtype=np_dtype)
    if hint is datetime and isinstance(value, str):
        return datetime.fromisoformat(value)
    if hint is bytes and isinstance(value, str):
        return base64.b64decode(value)
    return value


class _Model:
    """Pydantic-style conversion shared by every type, driven by the constructor signature and hints."""

    # Dict keys accepted by model_validate for underscored constructor parameters: the SDK keeps list
    # views in private fields whose public names (``tokens``, ``prompt_logprobs``) are the wire JSON keys.
    _aliases: ClassVar[dict[str, str]] = {}

    def _init_kwargs(self) -> dict[str, Any]:
        """Public constructor arguments that rebuild this object."""
        return {name: getattr(self, name) for name in _spec(type(self)).public}

    def model_dump(self, *, exclude_none: bool = False) -> dict[str, Any]:
        """Plain JSON-friendly dict of the constructor arguments (ndarrays become lists, bytes base64)."""
        out = {k: _jsonable(v, exclude_none) for k, v in self._init_kwargs().items()}
        return {k: v for k, v in out.items() if v is not None} if exclude_none else out

    def model_dump_json(self, *, indent: int | None = None, exclude_none: bool = False) -> str:
        return json.dumps(self.model_dump(exclude_none=exclude_none), indent=indent)

    @classmethod
    def model_validate(cls: type[_M], obj: Any) -> _M:
        """Build from a dict (e.g. an SDK ``model_dump()``) or from any object with the same attributes
        (e.g. the SDK's own instance). Unknown keys are ignored, as the SDK's response models do."""
        if isinstance(obj, cls):
            return obj
        spec = _spec(cls)
        if isinstance(obj, Mapping):
            raw = {cls._aliases.get(k, k): v for k, v in obj.items()}
            raw = {k: v for k, v in raw.items() if k in spec.accepted}
        else:
            raw = {k: getattr(obj, k) for k in spec.accepted if hasattr(obj, k)}
        return cls(**{k: _coerce(v, spec.hints.get(k), spec.np_dtypes.get(k)) for k, v in raw.items()})

    def model_copy(self: _M, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> _M:
        """A copy with some constructor arguments replaced (objects are immutable, so this is the edit)."""
        kwargs = {**self._init_kwargs(), **(update or {})}
        return type(self)(**(copy.deepcopy(kwargs) if deep else kwargs))


def rebuild_as(obj: Any, *namespaces: Any) -> Any:
    """Rebuild our objects (recursively through lists and dicts) as the same-named classes of the first
    namespace that has them, e.g. ``rebuild_as(resp, tinker.types)``. Pydantic targets are validated from
    ``model_dump()``; dataclass targets are called with the constructor arguments."""
    if isinstance(obj, list):
        return [rebuild_as(v, *namespaces) for v in obj]
    if isinstance(obj, dict):
        return {k: rebuild_as(v, *namespaces) for k, v in obj.items()}
    if not isinstance(obj, _Model):
        return obj
    name = type(obj).__name__
    target = next((getattr(ns, name) for ns in namespaces if hasattr(ns, name)), None)
    if target is None:
        raise LookupError(f"no class named {name} in the given namespaces")
    if hasattr(target, "model_validate") and not _is_model(target):
        return target.model_validate(obj.model_dump())
    return target(**{k: rebuild_as(v, *namespaces) for k, v in obj._init_kwargs().items()})


# --------------------------------------------------------------------------------------------------------
# TensorData
# --------------------------------------------------------------------------------------------------------


def _torch() -> Any:
    try:
        import torch
    except ImportError as e:  # torch is an optional extra
        raise ImportError("PyTorch is not installed; install torch to use the torch helpers.") from e
    return torch


def _check_pad_value(pad_value: Any) -> int:
    """The SDK insists on an integer pad (numpy integers accepted, bool rejected)."""
    if isinstance(pad_value, bool) or not isinstance(pad_value, (int, np.integer)):
        raise TypeError(f"pad_value must be an integer, got {type(pad_value).__name__}: {pad_value!r}")
    return int(pad_value)


def _np_dtype(dtype: TensorDtype) -> type[np.generic]:
    if dtype == "float32":
        return np.float32
    if dtype == "int64":
        return np.int64
    raise ValueError(f"Unsupported TensorDtype: {dtype}")


def _tensor_dtype(dtype: np.dtype) -> TensorDtype:
    # Same rule as the SDK: any float becomes float32, any signed int int64, the rest is refused.
    if dtype.kind == "f":
        return "float32"
    if dtype.kind == "i":
        return "int64"
    raise ValueError(f"Unsupported numpy dtype: {dtype}")


@dataclasses.dataclass(frozen=True, eq=False, init=False)
class TensorData(_Model):
    """A tensor as a flat list of numbers plus dtype and shape; stored as a numpy array.

    When ``sparse_crow_indices``/``sparse_col_indices`` are set the tensor is sparse CSR: ``data`` holds
    only the listed values and every other entry takes the ``pad_value`` given to ``to_numpy``.
    """

    dtype: TensorDtype
    shape: list[int] | None = None
    sparse_crow_indices: list[int] | None = None
    sparse_col_indices: list[int] | None = None
    _numpy: np.ndarray = dataclasses.field(repr=False)

    def __init__(
        self,
        data: list[int] | list[float] | np.ndarray | None = None,
        dtype: TensorDtype | None = None,
        shape: list[int] | None = None,
        sparse_crow_indices: list[int] | None = None,
        sparse_col_indices: list[int] | None = None,
    ) -> None:
        if dtype is None:
            raise TypeError("TensorData requires `dtype`")
        np_dtype = _np_dtype(dtype)
        if isinstance(data, np.ndarray):
            # Keep the caller's buffer when possible; copy read-only ones so torch.from_numpy won't warn.
            arr = data.astype(np_dtype) if data.dtype != np_dtype else data
            arr = arr if arr.flags.writeable else arr.copy()
        elif data is None:
            arr = np.empty(0, dtype=np_dtype)
        else:
            arr = np.asarray(data, dtype=np_dtype)
        if sparse_crow_indices is None and shape is not None and list(arr.shape) != list(shape):
            arr = arr.reshape(shape)
        object.__setattr__(self, "dtype", dtype)
        object.__setattr__(self, "shape", None if shape is None else list(shape))
        object.__setattr__(self, "sparse_crow_indices", sparse_crow_indices)
        object.__setattr__(self, "sparse_col_indices", sparse_col_indices)
        object.__setattr__(self, "_numpy", arr)

    @property
    def data(self) -> list[int] | list[float]:
        """Flattened tensor data as a list of numbers."""
        return self._numpy.reshape(-1).tolist()

    def _init_kwargs(self) -> dict[str, Any]:
        # Hand over the backing array rather than the `data` list: dumps and rebuilds skip a list copy.
        return {
            "data": self._numpy.reshape(-1),
            "dtype": self.dtype,
            "shape": self.shape,
            "sparse_crow_indices": self.sparse_crow_indices,
            "sparse_col_indices": self.sparse_col_indices,
        }

    @classmethod
    def from_numpy(cls, array: npt.NDArray[Any]) -> TensorData:
        return cls(data=array, dtype=_tensor_dtype(array.dtype), shape=list(array.shape))

    @classmethod
    def from_torch(cls, tensor: torch.Tensor) -> TensorData:
        torch = _torch()
        t = tensor.detach().cpu()
        if t.dtype == torch.bfloat16:  # numpy has no bfloat16; the wire dtype is float32 anyway
            t = t.float()
        return cls.from_numpy(t.contiguous().numpy())

    @classmethod
    def from_torch_sparse(cls, tensor: torch.Tensor, pad_value: int = 0) -> TensorData:
        """Sparse CSR TensorData from a dense 2-D torch tensor, leaving out entries equal to ``pad_value``.

        Falls back to dense when the tensor is not 2-D or CSR would not save space.
        """
        pad_value = _check_pad_value(pad_value)
        dense = cls.from_torch(tensor)
        arr = dense._numpy
        if arr.ndim != 2:
            return dense
        mask = arr != pad_value
        nnz = int(mask.sum())
        if (arr.shape[0] + 1) + 2 * nnz >= arr.size:  # CSR cost: row pointers + columns + values
            return dense
        _, cols = np.nonzero(mask)  # row-major, i.e. CSR order
        crow = np.concatenate([[0], np.cumsum(mask.sum(axis=1))])
        return cls(
            data=arr[mask],
            dtype=dense.dtype,
            shape=list(arr.shape),
            sparse_crow_indices=crow.tolist(),
            sparse_col_indices=cols.tolist(),
        )

    def to_numpy(self, pad_value: int = 0) -> npt.NDArray[Any]:
        """The tensor as a numpy array; sparse CSR is densified with ``pad_value`` in unlisted entries.

        Dense tensors return the backing array itself (no copy), as the SDK does.
        """
        if self.sparse_crow_indices is None:
            return self._numpy
        if self.sparse_col_indices is None or self.shape is None:
            raise ValueError("sparse TensorData needs sparse_col_indices and shape")
        pad_value = _check_pad_value(pad_value)
        dense = np.full(self.shape, pad_value, dtype=self._numpy.dtype)
        crow = np.asarray(self.sparse_crow_indices, dtype=np.int64)
        rows = np.repeat(np.arange(len(crow) - 1), np.diff(crow))
        dense[rows, np.asarray(self.sparse_col_indices, dtype=np.int64)] = self._numpy.reshape(-1)
        return dense

    def to_torch(self, pad_value: int = 0) -> torch.Tensor:
        return _torch().from_numpy(self.to_numpy(pad_value))

    def tolist(self, pad_value: int = 0) -> list[Any]:
        return self.to_numpy(pad_value).tolist()


# --------------------------------------------------------------------------------------------------------
# Model input
# --------------------------------------------------------------------------------------------------------


@_pydantic_like
class EncodedTextChunk(_Model):
    tokens: Sequence[int]
    """Array of token IDs"""

    type: Literal["encoded_text"] = "encoded_text"

    def __post_init__(self) -> None:
        # Own a plain list, as pydantic validation would; numpy input becomes Python ints.
        toks = self.tokens
        object.__setattr__(self, "tokens", toks.tolist() if isinstance(toks, np.ndarray) else list(toks))

    @property
    def length(self) -> int:
        return len(self.tokens)


def _decode_b64(value: bytes | str) -> bytes:
    return base64.b64decode(value) if isinstance(value, str) else value


@_pydantic_like
class ImageChunk(_Model):
    """An image in the prompt. Accepted for API compatibility; jtinker's text-only models cannot run it."""

    data: bytes
    format: Literal["png", "jpeg"]
    expected_tokens: int | None = None
    """Number of tokens the image represents; needed for ``length``."""

    type: Literal["image"] = "image"

    def __post_init__(self) -> None:
        object.__setattr__(self, "data", _decode_b64(self.data))  # base64 text on the wire

    @property
    def length(self) -> int:
        if self.expected_tokens is None:
            raise ValueError("ImageChunk expected_tokens needs to be set in order to compute the length")
        return self.expected_tokens


@_pydantic_like
class ImageAssetPointerChunk(_Model):
    """An image referenced by path or URL. Accepted for API compatibility only, like ``ImageChunk``."""

    format: Literal["png", "jpeg"]
    location: str
    expected_tokens: int | None = None
    type: Literal["image_asset_pointer"] = "image_asset_pointer"

    @property
    def length(self) -> int:
        if self.expected_tokens is None:
            raise ValueError(
                "ImageAssetPointerChunk expected_tokens needs to be set in order to compute the length"
            )
        return self.expected_tokens


ModelInputChunk: TypeAlias = EncodedTextChunk | ImageAssetPointerChunk | ImageChunk


@_pydantic_like
class ModelInput(_Model):
    chunks: list[ModelInputChunk]
    """Sequence of input chunks"""

    def __post_init__(self) -> None:
        object.__setattr__(self, "chunks", list(self.chunks))

    @classmethod
    def from_ints(cls, tokens: Sequence[int]) -> ModelInput:
        """A ModelInput holding one text chunk with these tokens."""
        return cls(chunks=[EncodedTextChunk(tokens=tokens)])

    def to_ints(self) -> list[int]:
        """All tokens as one list; raises if any chunk is not text."""
        if not all(isinstance(chunk, EncodedTextChunk) for chunk in self.chunks):
            raise ValueError(
                "to_ints only supported for ModelInput with EncodedTextChunks, got "
                f"{[type(chunk) for chunk in self.chunks]}"
            )
        return [token for chunk in self.chunks for token in chunk.tokens]

    @property
    def length(self) -> int:
        """Total context length used by this ModelInput."""
        return sum(chunk.length for chunk in self.chunks)

    @classmethod
    def empty(cls) -> ModelInput:
        return cls(chunks=[])

    def append(self, chunk: ModelInputChunk) -> ModelInput:
        """A new ModelInput with the chunk added."""
        return ModelInput(chunks=[*self.chunks, chunk])

    def append_int(self, token: int) -> ModelInput:
        """A new ModelInput with one more token (as its own chunk)."""
        return self.append(EncodedTextChunk(tokens=[token]))


# --------------------------------------------------------------------------------------------------------
# Datum and provenance
# --------------------------------------------------------------------------------------------------------


def _check_span(span: PromptProvenanceSpan | SampledProvenanceSpan) -> None:
    name = type(span).__name__
    if span.length < 0:
        raise ValueError(f"{name}.length must be >= 0, got {span.length}")
    if not span.sequence_id:
        raise ValueError(f"{name}.sequence_id must be non-empty")
    if span.offset < 0:
        raise ValueError(f"{name}.offset must be >= 0, got {span.offset}")


@_pydantic_like
class PromptProvenanceSpan(_Model):
    """Datum positions that are positions ``[offset, offset + length)`` of a sampled sequence's prompt."""

    sequence_id: str
    offset: int = 0
    length: int

    def __post_init__(self) -> None:
        _check_span(self)


@_pydantic_like
class SampledProvenanceSpan(_Model):
    """Datum positions that are positions ``[offset, offset + length)`` of a sequence's sampled tokens."""

    sequence_id: str
    offset: int = 0
    length: int

    def __post_init__(self) -> None:
        _check_span(self)


ProvenanceSpans: TypeAlias = list[PromptProvenanceSpan | SampledProvenanceSpan]
LossFnInputs: TypeAlias = dict[str, TensorData]

# dtype for plain Python lists, per loss_fn_inputs key (the SDK's _KEY_TO_TYPE).
_KEY_TO_TYPE: dict[str, TensorDtype] = {
    "target_tokens": "int64",
    "weights": "float32",
    "advantages": "float32",
    "logprobs": "float32",
    "clip_low_threshold": "float32",
    "clip_high_threshold": "float32",
    "sequence_ratio_mask": "float32",
}
_SPARSE_ELIGIBLE_KEYS = frozenset({"target_tokens", "weights"})


def _ragged_error(key: str) -> ValueError:
    return ValueError(f"{key} must be a rectangular numeric array; ragged nested lists are not supported")


def _list_dtype(key: str) -> TensorDtype:
    if key not in _KEY_TO_TYPE:
        raise KeyError(
            f"cannot infer a dtype for list loss_fn_inputs[{key!r}]; pass a numpy array or TensorData"
        )
    return _KEY_TO_TYPE[key]


def _to_tensor_data(key: str, value: Any) -> TensorData:
    """Convert a loss_fn_inputs value (TensorData, torch tensor, numpy array, list) as the SDK does."""
    if isinstance(value, TensorData):
        return value
    torch = sys.modules.get("torch")  # a torch tensor implies torch is already imported
    if torch is not None and isinstance(value, torch.Tensor):
        if key in _SPARSE_ELIGIBLE_KEYS and value.ndim == 2:
            return TensorData.from_torch_sparse(value)
        return TensorData.from_torch(value)
    if isinstance(value, np.ndarray):
        return TensorData.from_numpy(value)
    if isinstance(value, list):
        try:
            array = np.asarray(value)
        except ValueError as exc:
            if any(isinstance(item, list) for item in value):
                raise _ragged_error(key) from exc
            raise
        if array.dtype.kind in ("f", "i", "u"):
            return TensorData.from_numpy(array.astype(_np_dtype(_list_dtype(key))))
        if any(isinstance(item, list) for item in value):
            raise _ragged_error(key)
        return TensorData(data=value, dtype=_list_dtype(key), shape=[len(value)])
    if type(value).__name__ == "TensorData":  # e.g. the SDK's own TensorData
        return TensorData.model_validate(value)
    if hasattr(value, "__array__"):  # jax arrays and other array-likes
        return TensorData.from_numpy(np.asarray(value))
    raise TypeError(f"Unsupported loss_fn_inputs value for {key!r}: {type(value).__name__}")


def _check_tiling(kwarg: str, spans: ProvenanceSpans, expected_length: int) -> None:
    total = sum(span.length for span in spans)
    if total != expected_length:
        raise ValueError(
            f"with_provenance {kwarg} spans cover {total} positions but the field has "
            f"{expected_length}; the runs must tile it exactly"
        )


@dataclasses.dataclass(frozen=True)
class Datum(_Model):
    """One training example: a model input and its per-token loss inputs (``target_tokens``, ...)."""

    model_input: ModelInput
    loss_fn_inputs: LossFnInputs = dataclasses.field(default_factory=dict)
    model_input_spans: ProvenanceSpans | None = None
    """Provenance runs tiling ``model_input``; attach via ``with_provenance``."""

    loss_fn_input_spans: ProvenanceSpans | None = None
    """Provenance runs tiling ``loss_fn_inputs["target_tokens"]``; attach via ``with_provenance``."""

    def __post_init__(self) -> None:
        inputs = {key: _to_tensor_data(key, value) for key, value in self.loss_fn_inputs.items()}
        object.__setattr__(self, "loss_fn_inputs", inputs)
        for name in ("model_input_spans", "loss_fn_input_spans"):
            for span in getattr(self, name) or ():
                if not isinstance(span, (PromptProvenanceSpan, SampledProvenanceSpan)):
                    raise TypeError(
                        f"{name} entries must be PromptProvenanceSpan or SampledProvenanceSpan, "
                        f"got {type(span).__name__}"
                    )
        if (self.model_input_spans is None) != (self.loss_fn_input_spans is None):
            raise ValueError("provenance comes as a pair: set both span lists or neither")

    def with_provenance(self, model_input: ProvenanceSpans, loss_fn_inputs: ProvenanceSpans) -> Datum:
        """A copy carrying provenance spans for ``model_input`` and ``loss_fn_inputs`` (tiling checked)."""
        _check_tiling("model_input", model_input, self.model_input.length)
        target_tokens = self.loss_fn_inputs.get("target_tokens")
        if target_tokens is not None and target_tokens.shape is not None and len(target_tokens.shape) == 1:
            _check_tiling("loss_fn_inputs", loss_fn_inputs, target_tokens.shape[0])
        return dataclasses.replace(self, model_input_spans=model_input, loss_fn_input_spans=loss_fn_inputs)


# --------------------------------------------------------------------------------------------------------
# Optimizer
# --------------------------------------------------------------------------------------------------------


@_pydantic_like
class AdamParams(_Model):
    """AdamW hyperparameters for one ``optim_step`` (decoupled weight decay; 0.0 clip norm = no clipping)."""

    learning_rate: float = 0.0001
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0


@_pydantic_like
class AdamOptimizerConfig(_Model):
    """Optimizer family chosen at model creation: AdamW."""

    type: Literal["adamw"] = "adamw"


@_pydantic_like
class DimuonOptimizerConfig(_Model):
    """Optimizer family chosen at model creation: Dimuon."""

    type: Literal["dimuon"] = "dimuon"
    version: Literal[1] = 1


@_pydantic_like
class DimuonParams(_Model):
    """Hyperparameters for one Dimuon optimizer step."""

    type: Literal["dimuon"] = "dimuon"
    learning_rate: float
    grad_clip_norm: float = 0.0
    beta1: float = 0.9

    def __post_init__(self) -> None:
        # The SDK's pydantic constraints: lr >= 0, 0 <= beta1 < 1, no inf/nan.
        if not all(math.isfinite(v) for v in (self.learning_rate, self.grad_clip_norm, self.beta1)):
            raise ValueError("DimuonParams values must be finite")
        if self.learning_rate < 0 or not 0 <= self.beta1 < 1:
            raise ValueError("DimuonParams needs learning_rate >= 0 and 0 <= beta1 < 1")


OptimizerConfig: TypeAlias = AdamOptimizerConfig | DimuonOptimizerConfig
OptimParams: TypeAlias = AdamParams | DimuonParams


# --------------------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------------------


@_pydantic_like
class SamplingParams(_Model):
    max_tokens: int | None = None
    """Maximum number of tokens to generate"""

    seed: int | None = None
    """Random seed for reproducible generation"""

    stop: str | Sequence[str] | Sequence[int] | None = None
    """Stop strings or token ids. ``None`` keeps implicit EOS stopping; ``[]`` disables all stops."""

    temperature: float = 1
    top_k: int = -1
    """Top-k sampling (-1 for no limit)"""

    top_p: float = 1


_MASK_LOGPROB = -99999.0  # the SDK's filler for empty top-k slots (with token id 0)


@dataclasses.dataclass(frozen=True)
class TopkLogprobs(_Model):
    """Top-k tokens at each position as dense ``(length, k)`` matrices; empty slots are (0, -99999.0)."""

    token_ids: np.ndarray = dataclasses.field(metadata={"np_dtype": np.int32})
    logprobs: np.ndarray = dataclasses.field(metadata={"np_dtype": np.float32})


def _topk_to_lists(topk: TopkLogprobs) -> list[list[tuple[int, float]] | None]:
    """Per position, the (token_id, logprob) pairs without filler, or None for an all-filler row."""
    out: list[list[tuple[int, float]] | None] = []
    for ids, lps in zip(topk.token_ids.tolist(), topk.logprobs.tolist(), strict=True):
        pairs = [(t, lp) for t, lp in zip(ids, lps, strict=True) if not (t == 0 and lp == _MASK_LOGPROB)]
        out.append(pairs or None)
    return out


def _topk_from_lists(rows: Sequence[Sequence[tuple[int, float]] | None]) -> TopkLogprobs:
    """Inverse of ``_topk_to_lists``: pad rows to a common k with the filler."""
    k = max((len(r) for r in rows if r), default=0) or (1 if rows else 0)
    ids = np.zeros((len(rows), k), dtype=np.int32)
    lps = np.full((len(rows), k), _MASK_LOGPROB, dtype=np.float32)
    for i, row in enumerate(rows):
        for j, (t, lp) in enumerate(row or ()):
            ids[i, j], lps[i, j] = t, lp
    return TopkLogprobs(token_ids=ids, logprobs=lps)


@dataclasses.dataclass(frozen=True)
class PromptAltTokens(_Model):
    """``k`` independent draws at every prompt position after the first, as two ``[len - 1, k]`` tensors."""

    tokens: TensorData
    logprobs: TensorData


@dataclasses.dataclass(frozen=True)
class SampledSequence(_Model):
    """One sampled sequence. Numpy fields hold the data; ``tokens``/``logprobs`` are cached list views.

    The SDK's private ``_*_list`` arguments are accepted too and are copied into the numpy fields, so that
    dumps and conversions carry the data however the object was built.
    """

    stop_reason: StopReason
    sequence_id: str
    """Session-scoped identifier, distinct per sequence (used by provenance spans)."""

    tokens_np: np.ndarray | None = dataclasses.field(
        default=None, repr=False, metadata={"np_dtype": np.int32}
    )
    logprobs_np: np.ndarray | None = dataclasses.field(
        default=None, repr=False, metadata={"np_dtype": np.float32}
    )
    topk_logprobs_np: TopkLogprobs | None = dataclasses.field(default=None, repr=False)
    _tokens_list: list[int] | None = dataclasses.field(default=None, repr=False)
    _logprobs_list: list[float] | None = dataclasses.field(default=None, repr=False)
    _topk_logprobs_list: list[list[tuple[int, float]] | None] | None = dataclasses.field(
        default=None, repr=False
    )

    _aliases: ClassVar[dict[str, str]] = {
        "tokens": "_tokens_list",
        "logprobs": "_logprobs_list",
        "topk_logprobs": "_topk_logprobs_list",
    }

    def __post_init__(self) -> None:
        if self.tokens_np is None and self._tokens_list is not None:
            object.__setattr__(self, "tokens_np", np.asarray(self._tokens_list, dtype=np.int32))
        if self.logprobs_np is None and self._logprobs_list is not None:
            object.__setattr__(self, "logprobs_np", np.asarray(self._logprobs_list, dtype=np.float32))
        if self.topk_logprobs_np is None and self._topk_logprobs_list is not None:
            object.__setattr__(self, "topk_logprobs_np", _topk_from_lists(self._topk_logprobs_list))

    @functools.cached_property
    def tokens(self) -> list[int]:
        """Generated token IDs as a Python list."""
        if self._tokens_list is not None:
            return self._tokens_list
        return [] if self.tokens_np is None else self.tokens_np.tolist()

    @functools.cached_property
    def logprobs(self) -> list[float] | None:
        """Logprob of each generated token, or None if not requested."""
        if self._logprobs_list is not None:
            return self._logprobs_list
        return None if self.logprobs_np is None else self.logprobs_np.tolist()

    @functools.cached_property
    def topk_logprobs(self) -> list[list[tuple[int, float]] | None] | None:
        """Per generated position, up to k (token_id, logprob) pairs (None where empty), if requested."""
        if self._topk_logprobs_list is not None:
            return self._topk_logprobs_list
        return None if self.topk_logprobs_np is None else _topk_to_lists(self.topk_logprobs_np)


@dataclasses.dataclass(frozen=True)
class SampleResponse(_Model):
    """Sampled sequences plus optional prompt logprobs (numpy fields, with cached list views)."""

    sequences: Sequence[SampledSequence]
    prompt_logprobs_np: np.ndarray | None = dataclasses.field(
        default=None, repr=False, metadata={"np_dtype": np.float32}
    )
    """Prompt logprobs, float32 of shape (prompt_length,), NaN where not computed (e.g. position 0)."""

    topk_prompt_logprobs_np: TopkLogprobs | None = dataclasses.field(default=None, repr=False)
    target_prompt_logprobs: TensorData | None = None
    """Logprobs of the ids requested via ``target_prompt_logprobs`` (same shape; 0.0 where -1)."""

    prompt_cache_hit_tokens: int = 0
    """Prompt tokens billed as prefix-cache hits."""

    prompt_alt_tokens: PromptAltTokens | None = None
    _prompt_logprobs_list: list[float | None] | None = dataclasses.field(default=None, repr=False)
    _topk_prompt_logprobs_list: list[list[tuple[int, float]] | None] | None = dataclasses.field(
        default=None, repr=False
    )

    _aliases: ClassVar[dict[str, str]] = {
        "prompt_logprobs": "_prompt_logprobs_list",
        "topk_prompt_logprobs": "_topk_prompt_logprobs_list",
    }

    def __post_init__(self) -> None:
        object.__setattr__(self, "sequences", list(self.sequences))
        if self.prompt_logprobs_np is None and self._prompt_logprobs_list is not None:
            lps = [math.nan if v is None else v for v in self._prompt_logprobs_list]
            object.__setattr__(self, "prompt_logprobs_np", np.asarray(lps, dtype=np.float32))
        if self.topk_prompt_logprobs_np is None and self._topk_prompt_logprobs_list is not None:
            object.__setattr__(
                self, "topk_prompt_logprobs_np", _topk_from_lists(self._topk_prompt_logprobs_list)
            )

    @functools.cached_property
    def prompt_logprobs(self) -> list[float | None] | None:
        """Prompt logprobs as a list with None where not computed (always position 0), if requested."""
        if self._prompt_logprobs_list is not None:
            return self._prompt_logprobs_list
        if self.prompt_logprobs_np is None:
            return None
        return [None if math.isnan(v) else v for v in self.prompt_logprobs_np.tolist()]

    @functools.cached_property
    def topk_prompt_logprobs(self) -> list[list[tuple[int, float]] | None] | None:
        """Per prompt position, up to k (token_id, logprob) pairs (None where not computed), if requested."""
        if self._topk_prompt_logprobs_list is not None:
            return self._topk_prompt_logprobs_list
        return None if self.topk_prompt_logprobs_np is None else _topk_to_lists(self.topk_prompt_logprobs_np)


# --------------------------------------------------------------------------------------------------------
# Training responses
# --------------------------------------------------------------------------------------------------------

LossFnOutput: TypeAlias = dict[str, TensorData]


@dataclasses.dataclass(frozen=True)
class ForwardBackwardOutput(_Model):
    loss_fn_output_type: str
    """Class name of the loss output records (e.g. 'ArrayRecord')."""

    loss_fn_outputs: list[LossFnOutput]
    """One dict per datum, e.g. ``{"logprobs": TensorData}``."""

    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    """Metrics named ``name:reduction``, e.g. ``loss:sum``."""


@_pydantic_like
class OptimStepResponse(_Model):
    metrics: dict[str, float] | None = None


@_pydantic_like
class SaveWeightsResponse(_Model):
    path: str
    """A tinker URI for the saved training state"""

    type: Literal["save_weights"] | None = None


@_pydantic_like
class SaveWeightsForSamplerResponse(_Model):
    path: str
    """A tinker URI for the sampler weights"""

    type: Literal["save_weights_for_sampler"] | None = None


@_pydantic_like
class SaveWeightsExternalResponse(_Model):
    path: str
    """A tinker URI for the external-format model weights"""

    type: Literal["save_weights_external"] | None = None


@_pydantic_like
class SaveWeightsForSamplerResponseInternal(_Model):
    """What the server returns for save_weights_for_sampler: a path and/or an ephemeral sampling session."""

    path: str | None = None
    sampling_session_id: str | None = None
    type: Literal["save_weights_for_sampler"] | None = None


@_pydantic_like
class LoadWeightsResponse(_Model):
    path: str | None = None
    model_id: str | None = None
    type: Literal["load_weights"] | None = None


@_pydantic_like
class ModelData(_Model):
    arch: str | None = None
    model_name: str | None = None
    tokenizer_id: str | None = None


@_pydantic_like
class GetInfoResponse(_Model):
    type: Literal["get_info"] | None = None
    model_data: ModelData
    model_id: ModelID
    optimizer_config: OptimizerConfig = dataclasses.field(default_factory=AdamOptimizerConfig)
    is_lora: bool | None = None
    lora_rank: int | None = None
    model_name: str | None = None


@_pydantic_like
class LoraConfig(_Model):
    rank: int
    seed: int | None = None
    train_unembed: bool = True
    train_mlp: bool = True
    """Whether to add LoRA to the MLP layers (including MoE layers)"""

    train_attn: bool = True


# --------------------------------------------------------------------------------------------------------
# Service and REST responses
# --------------------------------------------------------------------------------------------------------


@_pydantic_like
class SupportedModel(_Model):
    model_name: str | None = None
    max_context_length: int | None = None
    trainable: bool | None = None
    sampleable: bool | None = None


@_pydantic_like
class GetServerCapabilitiesResponse(_Model):
    supported_models: list[SupportedModel]


@_pydantic_like
class GetSamplerResponse(_Model):
    sampler_id: str
    base_model: str
    model_path: str | None = None


@_pydantic_like
class ExternalWeightsUrlsResponse(_Model):
    urls: dict[str, str]
    """Download URL per file, keyed by the file path relative to the checkpoint root"""

    expires: datetime
    """When the URLs expire"""


@_pydantic_like
class WeightsInfoResponse(_Model):
    """Minimal information for loading a checkpoint."""

    base_model: str
    optimizer_config: OptimizerConfig = dataclasses.field(default_factory=AdamOptimizerConfig)
    is_lora: bool
    lora_rank: int | None = None
    train_unembed: bool | None = None
    train_mlp: bool | None = None
    train_attn: bool | None = None


@_pydantic_like
class Checkpoint(_Model):
    checkpoint_id: str
    checkpoint_type: CheckpointType
    time: datetime
    tinker_path: str
    size_bytes: int | None = None
    public: bool = False
    user_metadata: dict[str, str] | None = None
    expires_at: datetime | None = None
    """When the checkpoint expires (None = never)"""


_SEGMENT_TO_TYPE: dict[str, CheckpointType] = {
    "weights": "training",
    "sampler_weights": "sampler",
    "external_weights": "external",
}


@_pydantic_like
class ParsedCheckpointTinkerPath(_Model):
    tinker_path: str
    training_run_id: str
    checkpoint_type: CheckpointType
    checkpoint_id: str
    """``<segment>/<name>``, e.g. ``weights/000100``"""

    @classmethod
    def from_tinker_path(cls, tinker_path: str) -> ParsedCheckpointTinkerPath:
        """Parse ``tinker://<run_id>/<weights|sampler_weights|external_weights>/<name>``."""
        if not tinker_path.startswith("tinker://"):
            raise ValueError(f"Invalid tinker path: {tinker_path}")
        parts = tinker_path[len("tinker://") :].split("/")
        if len(parts) != 3 or parts[1] not in _SEGMENT_TO_TYPE:
            raise ValueError(f"Invalid tinker path: {tinker_path}")
        return cls(
            tinker_path=tinker_path,
            training_run_id=parts[0],
            checkpoint_type=_SEGMENT_TO_TYPE[parts[1]],
            checkpoint_id="/".join(parts[1:]),
        )


@_pydantic_like
class Cursor(_Model):
    offset: int
    limit: int
    total_count: int


@_pydantic_like
class CheckpointsListResponse(_Model):
    checkpoints: list[Checkpoint]
    cursor: Cursor | None = None
    """Pagination (None when unpaginated)"""


@_pydantic_like
class TrainingRun(_Model):
    training_run_id: str
    base_model: str
    model_owner: str
    is_lora: bool
    corrupted: bool = False
    lora_rank: int | None = None
    last_request_time: datetime
    last_checkpoint: Checkpoint | None = None
    last_sampler_checkpoint: Checkpoint | None = None
    user_metadata: dict[str, str] | None = None


@_pydantic_like
class TrainingRunsResponse(_Model):
    training_runs: list[TrainingRun]
    cursor: Cursor
