"""Server-side custom losses: the tinker SDK 0.38 wire form of a per-datum torch loss, run as JAX.

``ServiceClient.create_custom_loss(fn, input_ranks)`` traces ``fn(logprobs, *inputs) -> (loss, metrics)``
with ``torch.fx`` and uploads the graph as plain data (``CustomLossGraph``: nodes of ``op``, ``name``,
``target``, ``args``, ``kwargs``). :func:`trace` reproduces that encoding without the SDK (client side and
tests); :func:`compile_graph` rebuilds a graph as a pure JAX function that runs in the same
forward/backward call as the model: its gradient with respect to the logprobs is pulled back through the
model's stored VJP (see ``jtinker.loss_handles``), with no second forward pass.

The graph is untrusted input from HTTP clients. Nothing in it is evaluated: every target is looked up in
the tables below, and anything else is refused by :func:`compile_graph` before it returns. Ops follow
torch semantics (``dim``/``keepdim``/``dtype`` arguments, negative dims, broadcasting, ``max(dim=...)``
returning ``(values, indices)``, unbiased ``std``/``var``); 64-bit dtypes become 32-bit unless
``jax_enable_x64`` is on.

Allowed ``call_function`` targets (see :data:`SUPPORTED_FUNCTIONS`):

* ``operator``: add sub mul truediv floordiv pow neg pos abs getitem gt ge lt le eq ne and_ or_ invert
  matmul; ``getattr`` for the attributes in :data:`SUPPORTED_ATTRIBUTES` (shape dtype ndim T device, and
  values/indices of ``max``/``min`` with ``dim``).
* ``torch``: exp log log1p expm1 sqrt rsqrt square abs neg sign sigmoid tanh relu clamp clip clamp_min
  clamp_max minimum maximum where sum mean max min amax amin logsumexp prod std var any all count_nonzero
  cumsum softmax log_softmax pow mul add sub div matmul reshape flatten squeeze unsqueeze transpose
  permute t stack cat concat zeros_like ones_like full_like tensor detach clone numel masked_fill gather
  isfinite isnan isinf nan_to_num logical_and logical_or logical_not, ``torch.special.expit``.
* ``torch.nn.functional``: logsigmoid softplus relu sigmoid tanh softmax log_softmax mse_loss.
* ``math``: log exp sqrt pow fabs.

``call_method`` targets (see :data:`SUPPORTED_METHODS`) are the Tensor methods of the torch functions
above, plus view expand contiguous float double long int bool to type_as size dim. In-place methods
(``add_`` ...), ``item``/``tolist``, ``call_module`` and ``get_attr`` nodes are refused.

:func:`compile_graph` checks structure, targets, references, placeholders, argument encoding, argument
names and counts, and the output form up front. Value-dependent problems (a non-scalar or non-float loss,
inputs of the wrong rank, a bad argument type or shape) raise ``ValueError`` naming the loss and node when
the function first runs, i.e. while tracing under ``jax.jit`` and before any computation. Boolean-mask
indexing has a data-dependent shape and therefore fails under ``jit`` just as it does in JAX.
"""

from __future__ import annotations

import inspect
import math
import operator
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "MAX_ELEMENTS",
    "MAX_NODES",
    "SUPPORTED_ATTRIBUTES",
    "SUPPORTED_FUNCTIONS",
    "SUPPORTED_METHODS",
    "TracedLoss",
    "compile_graph",
    "trace",
]

Array = jax.Array
CustomLossFn = Callable[..., tuple[Array, dict[str, Array]]]

# The SDK's rules (tinker/lib/public_interfaces/custom_loss.py): a loss that passes there passes here.
_METRIC_KEY = re.compile(r"custom/[a-z0-9_./-]{1,64}:(sum|mean)")
_INPUT_NAME = re.compile(r"[a-z_][a-z0-9_]{0,63}")
_MAX_INPUTS = 16
_HOST_METHODS = frozenset({"item", "numpy", "tolist"})
_ALLOWED_FUNCTION_MODULES = ("torch", "math", "operator", "_operator")

# Bounds on what an untrusted graph may ask for: real losses have tens of nodes and per-datum arrays far
# below a GiB; shape arithmetic never needs more than 64-bit ints or long tuples.
MAX_NODES = 4096
MAX_ELEMENTS = 1 << 28
_MAX_DEPTH = 16
_MAX_TUPLE = 64
_INT_LIMIT = 1 << 63
_NODE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,255}")


# --------------------------------------------------------------------------------------------- tracing
@dataclass(frozen=True)
class TracedLoss:
    """A traced per-datum loss in the SDK's wire form.

    ``inputs`` is ``logprobs`` then the ``loss_fn_inputs`` keys the loss reads, each with its rank;
    ``nodes`` are plain dicts equal to ``CustomLossNode.model_dump()`` of the SDK's ``encode_graph``.
    """

    name: str
    inputs: tuple[tuple[str, int], ...]
    nodes: tuple[dict[str, Any], ...]


def trace(fn: Callable[..., Any], input_ranks: Mapping[str, int]) -> TracedLoss:
    """Trace ``fn(logprobs, *inputs) -> (loss, metrics)`` with torch.fx; checks and encoding match the SDK."""
    try:
        import torch.fx
        from torch.fx.node import _get_qualified_name
    except ImportError as e:
        raise ImportError("PyTorch is not installed. Cannot create a custom loss.") from e

    name = _fn_name(fn)
    inputs = _inputs(fn, input_ranks)
    try:
        graph = torch.fx.symbolic_trace(fn)
    except Exception as e:
        raise ValueError(
            f"create_custom_loss: {name} cannot be traced by torch.fx: {e}. Custom losses "
            "cannot branch on tensor values or call libraries other than torch and math."
        ) from e
    _check_graph(name, graph)

    nodes = []
    for node in graph.graph.nodes:
        if node.op == "call_function":
            target = _get_qualified_name(node.target)
            # fx records Python operators from CPython's private _operator module; the wire uses operator.
            if target.startswith("_operator."):
                target = "operator." + target.removeprefix("_operator.")
        else:
            target = str(node.target)
        nodes.append(
            {
                "op": node.op,
                "name": node.name,
                "target": target,
                "args": [_encode_arg(name, a) for a in node.args],
                "kwargs": {k: _encode_arg(name, a) for k, a in node.kwargs.items()},
            }
        )
    return TracedLoss(name=name, inputs=inputs, nodes=tuple(nodes))


def _fn_name(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__name__", type(fn).__name__)


def _inputs(fn: Callable[..., Any], input_ranks: Mapping[str, int]) -> tuple[tuple[str, int], ...]:
    name = _fn_name(fn)
    params = list(inspect.signature(fn).parameters.values())
    if not params or params[0].name != "logprobs":
        raise ValueError(
            f"create_custom_loss: {name} must take logprobs as its first parameter, followed "
            "by the loss_fn_inputs it reads, e.g. def loss(logprobs, advantages)"
        )
    if len(params) > _MAX_INPUTS:
        raise ValueError(
            f"create_custom_loss: {name} takes {len(params)} parameters; a custom loss "
            f"takes at most {_MAX_INPUTS}, logprobs included"
        )
    for param in params:
        if not _INPUT_NAME.fullmatch(param.name):
            raise ValueError(
                f"create_custom_loss: {name} parameter {param.name!r} must be a lowercase "
                "name of letters, digits and underscores"
            )
        if param.kind not in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD):
            raise ValueError(
                f"create_custom_loss: {name} parameter {param.name!r} must be a plain "
                "positional parameter; *args, **kwargs and keyword-only parameters are not "
                "supported"
            )
        if param.default is not param.empty:
            raise ValueError(
                f"create_custom_loss: {name} parameter {param.name!r} has a default; every "
                "parameter after logprobs names a required loss_fn_inputs key"
            )
    names = [param.name for param in params]
    if set(input_ranks) != set(names):
        raise ValueError(
            f"create_custom_loss: input_ranks must give a rank for each parameter of "
            f"{name} ({', '.join(names)}), got {sorted(input_ranks)}"
        )
    for key in names:
        rank = input_ranks[key]
        # The SDK's pydantic model takes Literal[0, 1, 2]; bool is an int but not a rank.
        if isinstance(rank, bool) or rank not in (0, 1, 2):
            raise ValueError(f"create_custom_loss: input_ranks[{key!r}] must be 0, 1 or 2, got {rank!r}")
    if input_ranks["logprobs"] == 0:
        raise ValueError("create_custom_loss: logprobs has rank 1 ([T]) or 2 ([T, K])")
    return tuple((key, int(input_ranks[key])) for key in names)


def _check_graph(name: str, graph: Any) -> None:
    import builtins

    import torch

    for node in graph.graph.nodes:
        if node.op == "call_function":
            target = node.target
            module = getattr(target, "__module__", None) or ""
            if target is not builtins.getattr and module.split(".")[0] not in _ALLOWED_FUNCTION_MODULES:
                raise ValueError(
                    f"create_custom_loss: {name} calls {getattr(target, '__qualname__', target)!r} "
                    f"from {module or 'an unknown module'!r}; custom losses may only call "
                    "torch and math"
                )
        elif node.op == "call_method":
            if not hasattr(torch.Tensor, node.target):
                raise ValueError(
                    f"create_custom_loss: {name} calls method {node.target!r}, which is not a "
                    "torch.Tensor method"
                )
            if node.target == "backward":
                raise ValueError(
                    f"create_custom_loss: {name} calls backward(); return the loss and "
                    "forward_backward_custom runs the backward pass"
                )
            if node.target in _HOST_METHODS:
                raise ValueError(
                    f"create_custom_loss: {name} calls {node.target}(), which leaves torch; "
                    "keep every value, metrics included, as a tensor"
                )
        elif node.op == "call_module":
            raise ValueError(
                f"create_custom_loss: {name} calls module {node.target!r}; custom losses cannot "
                "use torch.nn modules, only functions such as torch.nn.functional"
            )
        elif node.op == "get_attr":
            raise ValueError(
                f"create_custom_loss: {name} captures a tensor ({node.target!r}); a custom loss "
                "may only read logprobs and the loss_fn_inputs it names"
            )
        elif node.op == "output":
            _check_output(name, node.args[0])


def _check_output(name: str, output: Any) -> None:
    import torch.fx

    if not (isinstance(output, (tuple, list)) and len(output) == 2):
        raise ValueError(f"create_custom_loss: {name} must return (loss, metrics)")
    if not isinstance(output[0], torch.fx.Node):
        raise ValueError(
            f"create_custom_loss: {name} must return its loss as a torch.Tensor, got {output[0]!r}"
        )
    metrics = output[1]
    if not isinstance(metrics, dict):
        raise ValueError(f"create_custom_loss: {name} must return its metrics as a dict")
    for key, value in metrics.items():
        if not (isinstance(key, str) and _METRIC_KEY.fullmatch(key)):
            raise ValueError(
                f"create_custom_loss: {name} metric {key!r} must be named custom/<name>:sum or "
                "custom/<name>:mean in lowercase; the suffix says how it combines across datums"
            )
        if not isinstance(value, torch.fx.Node):
            raise ValueError(
                f"create_custom_loss: {name} metric {key!r} must be a torch.Tensor, got {value!r}"
            )


def _encode_arg(name: str, arg: Any) -> Any:
    import torch
    import torch.fx

    if isinstance(arg, torch.fx.Node):
        return {"ref": arg.name}
    if isinstance(arg, float) and not math.isfinite(arg):
        return {"float": str(arg)}
    if arg is None or isinstance(arg, (bool, int, float, str)):
        return arg
    if isinstance(arg, list):
        return [_encode_arg(name, a) for a in arg]
    if isinstance(arg, tuple):
        return {"tuple": [_encode_arg(name, a) for a in arg]}
    if isinstance(arg, dict) and all(isinstance(key, str) for key in arg):
        return {"dict": {key: _encode_arg(name, a) for key, a in arg.items()}}
    if isinstance(arg, slice):
        return {"slice": [_encode_arg(name, a) for a in (arg.start, arg.stop, arg.step)]}
    if arg is Ellipsis:
        return {"ellipsis": True}
    kinds = {
        torch.dtype: "dtype",
        torch.device: "device",
        torch.layout: "layout",
        torch.memory_format: "memory_format",
    }
    if (kind := kinds.get(type(arg))) is not None:
        return {kind: str(arg).removeprefix("torch.")}
    raise ValueError(
        f"create_custom_loss: {name} passes a {type(arg).__name__} argument, which a "
        "custom loss cannot send to the server"
    )


# ------------------------------------------------------------------------------------- decoded values
@dataclass(frozen=True)
class _Ref:
    name: str


@dataclass(frozen=True)
class _Device:
    """A torch device: JAX places arrays itself, so ``.to(device)`` and ``device=`` are no-ops."""

    name: str


@dataclass(frozen=True)
class _Opaque:
    """A torch layout or memory format: no effect on values."""

    kind: str
    name: str


class _MinMax(NamedTuple):
    """``torch.max(x, dim)``'s ``(values, indices)``."""

    values: Array
    indices: Array


_DTYPES = {
    name: np.dtype(dt)
    for name, dt in {
        "float32": np.float32,
        "float64": np.float64,
        "float16": np.float16,
        "bfloat16": jnp.bfloat16,
        "int8": np.int8,
        "int16": np.int16,
        "int32": np.int32,
        "int64": np.int64,
        "uint8": np.uint8,
        "bool": np.bool_,
    }.items()
}
_LAYOUTS = frozenset({"strided"})
_MEMORY_FORMATS = frozenset({"contiguous_format", "preserve_format", "channels_last", "channels_last_3d"})


def _dtype(d: Any) -> np.dtype:
    # x64 off: int64/float64 requests become int32/float32, as JAX's own defaults do.
    if not isinstance(d, np.dtype):
        raise TypeError(f"expected a dtype, got {d!r}")
    return jax.dtypes.canonicalize_dtype(d)


def _opt_dtype(d: Any) -> np.dtype | None:
    return None if d is None else _dtype(d)


def _fl(x: Any) -> Any:
    """Integer and bool tensors become the default float, as torch promotes them for float-only ops."""
    x = jnp.asarray(x)
    return x if jnp.issubdtype(x.dtype, jnp.inexact) else x.astype(jnp.float32)


def _axes(dim: Any) -> int | tuple[int, ...] | None:
    """A torch ``dim``: None, an int or a list/tuple of ints; an empty list means every dim."""
    if dim is None:
        return None
    if isinstance(dim, (list, tuple)):
        return tuple(operator.index(d) for d in dim) or None
    return operator.index(dim)


def _is_number(x: Any) -> bool:
    return isinstance(x, (bool, int, float, jax.Array, np.ndarray, np.generic))


def _numbers(*xs: Any) -> None:
    # Python's operators on lists or strings could build huge objects (``[0] * 10**12``): numbers only.
    for x in xs:
        if not _is_number(x):
            raise TypeError(f"operands must be tensors or numbers, got {type(x).__name__}")


# ------------------------------------------------------------------------------------------- operator
def _binary(fn: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    def impl(a: Any, b: Any, /) -> Any:
        _numbers(a, b)
        return fn(a, b)

    return impl


def _unary_op(fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def impl(a: Any, /) -> Any:
        _numbers(a)
        return fn(a)

    return impl


def _op_add(a: Any, b: Any, /) -> Any:
    if isinstance(a, tuple) and isinstance(b, tuple):  # shape arithmetic: x.shape[:-1] + (1,)
        return a + b
    _numbers(a, b)
    return a + b


def _op_pow(a: Any, b: Any, /) -> Any:
    _numbers(a, b)
    if isinstance(a, int) and isinstance(b, int) and abs(a) > 1 and b > 0 and b * a.bit_length() > 128:
        raise ValueError(f"integer power {a} ** {b} is too large")
    return a**b


def _index(idx: Any) -> Any:
    # torch treats a list index as an index tensor; JAX wants an array.
    if isinstance(idx, list):
        return jnp.asarray(idx)
    if isinstance(idx, tuple):
        return tuple(_index(i) for i in idx)
    return idx


def _op_getitem(obj: Any, idx: Any, /) -> Any:
    if isinstance(obj, (jax.Array, np.ndarray)):
        return jnp.asarray(obj)[_index(idx)]
    if isinstance(obj, (tuple, list)) and (isinstance(idx, (int, slice)) or _is_int_scalar(idx)):
        return obj[idx if isinstance(idx, slice) else operator.index(idx)]
    raise TypeError(f"cannot index a {type(obj).__name__} with {type(idx).__name__}")


def _is_int_scalar(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic)) and jnp.issubdtype(x.dtype, jnp.integer)


# ---------------------------------------------------------------------------------------------- getattr
def _attr_shape(x: Any) -> tuple[int, ...]:
    return tuple(jnp.shape(x))


def _attr_t(x: Any) -> Array:
    return jnp.asarray(x).T


def _attr_minmax(field: str) -> Callable[[Any], Any]:
    def get(x: Any) -> Any:
        if not isinstance(x, _MinMax):
            raise TypeError(f".{field} needs the result of max/min with dim, got {type(x).__name__}")
        return getattr(x, field)

    return get


_ATTRIBUTES: dict[str, Callable[[Any], Any]] = {
    "shape": _attr_shape,
    "dtype": lambda x: jnp.asarray(x).dtype,
    "ndim": lambda x: jnp.ndim(x),
    "T": _attr_t,
    "device": lambda x: _Device("jax"),
    "values": _attr_minmax("values"),
    "indices": _attr_minmax("indices"),
}
SUPPORTED_ATTRIBUTES: frozenset[str] = frozenset(_ATTRIBUTES)


def _getattr(obj: Any, name: str, /) -> Any:
    if name not in _ATTRIBUTES:  # also checked at compile time; a name is never looked up on the object
        raise ValueError(f"attribute {name!r} is not allowed")
    if name in ("values", "indices") or isinstance(obj, (jax.Array, np.ndarray)):
        return _ATTRIBUTES[name](obj)
    raise TypeError(f"getattr {name!r} needs a tensor, got {type(obj).__name__}")


# ----------------------------------------------------------------------------------- torch: elementwise
def _float_unary(fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def impl(input: Any) -> Any:
        return fn(_fl(input))

    return impl


def _plain_unary(fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def impl(input: Any) -> Any:
        return fn(jnp.asarray(input))

    return impl


def _clamp(input: Any, min: Any = None, max: Any = None) -> Array:
    # where-based so that, like torch, values exactly at a bound keep their gradient.
    if min is None and max is None:
        raise ValueError("clamp needs min or max")
    out = jnp.asarray(input)
    if min is not None:
        out = jnp.where(out < min, min, out)
    if max is not None:
        out = jnp.where(out > max, max, out)
    return out


def _clamp_min(input: Any, min: Any) -> Array:
    return _clamp(input, min=min)


def _clamp_max(input: Any, max: Any) -> Array:
    return _clamp(input, max=max)


def _where(condition: Any, input: Any, other: Any) -> Array:
    return jnp.where(condition, input, other)


def _where_method(input: Any, condition: Any, other: Any) -> Array:
    return jnp.where(condition, input, other)


def _minimum(input: Any, other: Any) -> Array:
    return jnp.minimum(input, other)


def _maximum(input: Any, other: Any) -> Array:
    return jnp.maximum(input, other)


def _pow(input: Any, exponent: Any) -> Array:
    return jnp.power(input, exponent)


def _add(input: Any, other: Any, *, alpha: Any = 1) -> Array:
    return jnp.add(input, other if alpha == 1 else jnp.multiply(other, alpha))


def _sub(input: Any, other: Any, *, alpha: Any = 1) -> Array:
    return jnp.subtract(input, other if alpha == 1 else jnp.multiply(other, alpha))


def _mul(input: Any, other: Any) -> Array:
    return jnp.multiply(input, other)


def _div(input: Any, other: Any, *, rounding_mode: str | None = None) -> Array:
    if rounding_mode is None:
        return jnp.true_divide(input, other)
    if rounding_mode == "floor":
        return jnp.floor_divide(input, other)
    if rounding_mode == "trunc":
        out = jnp.trunc(jnp.true_divide(input, other))
        return out.astype(jnp.result_type(input, other))
    raise ValueError(f"div rounding_mode must be None, 'trunc' or 'floor', got {rounding_mode!r}")


def _matmul(input: Any, other: Any) -> Array:
    return jnp.matmul(input, other)


def _masked_fill(input: Any, mask: Any, value: Any) -> Array:
    x = jnp.asarray(input)
    return jnp.where(mask, jnp.asarray(value).astype(x.dtype), x)


def _nan_to_num(input: Any, nan: Any = 0.0, posinf: Any = None, neginf: Any = None) -> Array:
    return jnp.nan_to_num(jnp.asarray(input), nan=nan, posinf=posinf, neginf=neginf)


def _logical_and(input: Any, other: Any) -> Array:
    return jnp.logical_and(input, other)


def _logical_or(input: Any, other: Any) -> Array:
    return jnp.logical_or(input, other)


def _relu_f(input: Any, inplace: bool = False) -> Array:
    if inplace is not False:
        raise ValueError("relu(inplace=True) is not supported")
    return jax.nn.relu(jnp.asarray(input))


def _softplus(input: Any, beta: Any = 1.0, threshold: Any = 20.0) -> Array:
    # torch: log(1 + exp(beta x)) / beta, linear above the threshold; logaddexp never overflows.
    x = _fl(input)
    bx = x * beta
    return jnp.where(bx > threshold, x, jnp.logaddexp(0.0, bx) / beta)


def _mse_loss(
    input: Any,
    target: Any,
    size_average: Any = None,
    reduce: Any = None,
    reduction: str = "mean",
    weight: Any = None,
) -> Array:
    if size_average is not None or reduce is not None or weight is not None:
        raise ValueError("mse_loss supports only reduction=; size_average, reduce and weight must be None")
    d = jnp.square(_fl(input) - target)
    if reduction == "none":
        return d
    if reduction == "sum":
        return jnp.sum(d)
    if reduction == "mean":
        return jnp.mean(d)
    raise ValueError(f"mse_loss reduction must be 'none', 'mean' or 'sum', got {reduction!r}")


# ------------------------------------------------------------------------------------ torch: reductions
def _sum(input: Any, dim: Any = None, keepdim: bool = False, *, dtype: Any = None) -> Array:
    return jnp.sum(jnp.asarray(input), axis=_axes(dim), keepdims=keepdim, dtype=_opt_dtype(dtype))


def _mean(input: Any, dim: Any = None, keepdim: bool = False, *, dtype: Any = None) -> Array:
    return jnp.mean(jnp.asarray(input), axis=_axes(dim), keepdims=keepdim, dtype=_opt_dtype(dtype))


def _prod(input: Any, dim: Any = None, keepdim: bool = False, *, dtype: Any = None) -> Array:
    return jnp.prod(jnp.asarray(input), axis=_axes(dim), keepdims=keepdim, dtype=_opt_dtype(dtype))


def _minmax(argfn: Callable[..., Array], full: Callable[..., Array], pair: Callable[..., Array]) -> Callable:
    def impl(input: Any, dim: Any = None, keepdim: bool = False, *, other: Any = None) -> Any:
        x = jnp.asarray(input)
        # torch.max(x, y) is the elementwise maximum; torch.max(x, dim) returns (values, indices).
        if other is not None or isinstance(dim, (jax.Array, np.ndarray)):
            return pair(x, dim if other is None else other)
        if dim is None:
            return full(x)
        axis = operator.index(dim)
        if x.ndim == 0:
            return _MinMax(x, jnp.zeros((), jnp.int32))
        idx = argfn(x, axis=axis, keepdims=True)
        # Gather at the index, so the gradient goes to that one element as in torch (not split over ties).
        values = jnp.take_along_axis(x, idx, axis=axis)
        if not keepdim:
            values, idx = jnp.squeeze(values, axis), jnp.squeeze(idx, axis)
        return _MinMax(values, idx)

    return impl


def _amax(input: Any, dim: Any = (), keepdim: bool = False) -> Array:
    return jnp.max(jnp.asarray(input), axis=_axes(dim), keepdims=keepdim)


def _amin(input: Any, dim: Any = (), keepdim: bool = False) -> Array:
    return jnp.min(jnp.asarray(input), axis=_axes(dim), keepdims=keepdim)


def _logsumexp(input: Any, dim: Any, keepdim: bool = False) -> Array:
    return jax.nn.logsumexp(_fl(input), axis=_axes(dim), keepdims=keepdim)


def _variance(input: Any, dim: Any, unbiased: Any, keepdim: bool, correction: Any) -> Array:
    if isinstance(dim, bool):  # torch.var(x, False): the legacy positional ``unbiased``
        dim, unbiased = None, dim
    if correction is None:
        correction = 0 if unbiased is False else 1
    return jnp.var(_fl(input), axis=_axes(dim), ddof=correction, keepdims=keepdim)


def _var(
    input: Any, dim: Any = None, unbiased: Any = None, keepdim: bool = False, *, correction: Any = None
) -> Array:
    return _variance(input, dim, unbiased, keepdim, correction)


def _std(
    input: Any, dim: Any = None, unbiased: Any = None, keepdim: bool = False, *, correction: Any = None
) -> Array:
    return jnp.sqrt(_variance(input, dim, unbiased, keepdim, correction))


def _any(input: Any, dim: Any = None, keepdim: bool = False) -> Array:
    return jnp.any(jnp.asarray(input), axis=_axes(dim), keepdims=keepdim)


def _all(input: Any, dim: Any = None, keepdim: bool = False) -> Array:
    return jnp.all(jnp.asarray(input), axis=_axes(dim), keepdims=keepdim)


def _count_nonzero(input: Any, dim: Any = None) -> Array:
    return jnp.count_nonzero(jnp.asarray(input), axis=_axes(dim))


def _cumsum(input: Any, dim: Any, *, dtype: Any = None) -> Array:
    return jnp.cumsum(jnp.asarray(input), axis=operator.index(dim), dtype=_opt_dtype(dtype))


def _softmax_input(input: Any, dim: Any, dtype: Any) -> tuple[Array, int]:
    x = jnp.asarray(input).astype(_dtype(dtype)) if dtype is not None else _fl(input)
    if dim is None:  # torch's legacy implicit dim for F.softmax(x)
        dim = 0 if x.ndim in (0, 1, 3) else 1
    return x, operator.index(dim)


def _softmax(input: Any, dim: Any, dtype: Any = None) -> Array:
    x, axis = _softmax_input(input, dim, dtype)
    return jax.nn.softmax(x, axis=axis)


def _log_softmax(input: Any, dim: Any, dtype: Any = None) -> Array:
    x, axis = _softmax_input(input, dim, dtype)
    return jax.nn.log_softmax(x, axis=axis)


def _softmax_f(input: Any, dim: Any = None, _stacklevel: int = 3, dtype: Any = None) -> Array:
    return _softmax(input, dim, dtype)


def _log_softmax_f(input: Any, dim: Any = None, _stacklevel: int = 3, dtype: Any = None) -> Array:
    return _log_softmax(input, dim, dtype)


# ---------------------------------------------------------------------------------------- torch: shapes
def _shape_args(args: tuple[Any, ...]) -> tuple[int, ...]:
    if len(args) == 1 and isinstance(args[0], (tuple, list)):
        args = tuple(args[0])
    if len(args) > _MAX_TUPLE:
        raise ValueError(f"shape has {len(args)} dims")
    return tuple(operator.index(a) for a in args)


def _reshape(input: Any, *args: Any, shape: Any = None) -> Array:
    return jnp.reshape(jnp.asarray(input), _shape_args(args if shape is None else (shape,)))


def _view(input: Any, *args: Any, size: Any = None) -> Array:
    if len(args) == 1 and isinstance(args[0], np.dtype):
        raise ValueError("view(dtype) is not supported")
    return _reshape(input, *(args if size is None else (size,)))


def _flatten(input: Any, start_dim: int = 0, end_dim: int = -1) -> Array:
    x = jnp.asarray(input)
    if x.ndim == 0:
        return x.reshape(1)
    s, e = operator.index(start_dim) % x.ndim, operator.index(end_dim) % x.ndim
    if s > e:
        raise ValueError("flatten start_dim must not come after end_dim")
    return x.reshape(x.shape[:s] + (math.prod(x.shape[s : e + 1]),) + x.shape[e + 1 :])


def _squeeze(input: Any, dim: Any = None) -> Array:
    x = jnp.asarray(input)
    if dim is None:
        return jnp.squeeze(x)
    if x.ndim == 0:
        return x
    dims = dim if isinstance(dim, (tuple, list)) else (dim,)
    # torch leaves a named dim whose size is not 1 alone; jnp.squeeze would raise.
    axes = tuple(d % x.ndim for d in (operator.index(d) for d in dims) if x.shape[d] == 1)
    return jnp.squeeze(x, axes) if axes else x


def _unsqueeze(input: Any, dim: int) -> Array:
    return jnp.expand_dims(jnp.asarray(input), operator.index(dim))


def _transpose(input: Any, dim0: int, dim1: int) -> Array:
    return jnp.swapaxes(jnp.asarray(input), operator.index(dim0), operator.index(dim1))


def _permute(input: Any, *args: Any, dims: Any = None) -> Array:
    return jnp.transpose(jnp.asarray(input), _shape_args(args if dims is None else (dims,)))


def _t(input: Any) -> Array:
    x = jnp.asarray(input)
    if x.ndim > 2:
        raise ValueError(f"t() expects a tensor of at most 2 dims, got {x.ndim}")
    return x.T


def _expand(input: Any, *args: Any, size: Any = None) -> Array:
    x = jnp.asarray(input)
    sizes = list(_shape_args(args if size is None else (size,)))
    lead = len(sizes) - x.ndim
    if lead < 0:
        raise ValueError(f"expand to {len(sizes)} dims is fewer than the tensor's {x.ndim}")
    for i, s in enumerate(sizes):
        if s == -1:  # -1 keeps an existing dim's size
            if i < lead:
                raise ValueError("expand: -1 is not allowed for a new leading dim")
            sizes[i] = x.shape[i - lead]
    if math.prod(sizes) > MAX_ELEMENTS:
        raise ValueError(f"expand to {tuple(sizes)} exceeds {MAX_ELEMENTS} elements")
    return jnp.broadcast_to(x, tuple(sizes))


def _tensors(tensors: Any) -> list[Array]:
    if not isinstance(tensors, (list, tuple)):
        raise TypeError(f"expected a list of tensors, got {type(tensors).__name__}")
    return [jnp.asarray(t) for t in tensors]


def _stack(tensors: Any, dim: int = 0) -> Array:
    return jnp.stack(_tensors(tensors), axis=operator.index(dim))


def _cat(tensors: Any, dim: int = 0) -> Array:
    return jnp.concatenate(_tensors(tensors), axis=operator.index(dim))


def _gather(input: Any, dim: int, index: Any, *, sparse_grad: bool = False) -> Array:
    x, idx = jnp.asarray(input), jnp.asarray(index)
    axis = operator.index(dim) % max(x.ndim, 1)
    if idx.ndim != x.ndim:
        raise ValueError(f"gather index has {idx.ndim} dims, input has {x.ndim}")
    # torch allows an index smaller than the input in the other dims: gather from that corner.
    x = x[tuple(slice(None) if d == axis else slice(0, idx.shape[d]) for d in range(x.ndim))]
    return jnp.take_along_axis(x, idx, axis=axis)


# ------------------------------------------------------------------------------ torch: creation, dtypes
def _like(input: Any, fill: Any, dtype: Any) -> Array:
    x = jnp.asarray(input)
    return jnp.full(x.shape, fill, dtype=x.dtype if dtype is None else _dtype(dtype))


def _zeros_like(
    input: Any,
    *,
    dtype: Any = None,
    layout: Any = None,
    device: Any = None,
    pin_memory: Any = None,
    requires_grad: Any = False,
    memory_format: Any = None,
) -> Array:
    return _like(input, 0, dtype)


def _ones_like(
    input: Any,
    *,
    dtype: Any = None,
    layout: Any = None,
    device: Any = None,
    pin_memory: Any = None,
    requires_grad: Any = False,
    memory_format: Any = None,
) -> Array:
    return _like(input, 1, dtype)


def _full_like(
    input: Any,
    fill_value: Any,
    *,
    dtype: Any = None,
    layout: Any = None,
    device: Any = None,
    pin_memory: Any = None,
    requires_grad: Any = False,
    memory_format: Any = None,
) -> Array:
    return _like(input, fill_value, dtype)


def _tensor(
    data: Any, *, dtype: Any = None, device: Any = None, requires_grad: Any = False, pin_memory: Any = False
) -> Array:
    _python_numbers(data)
    if dtype is None:
        # torch's inference: bool stays bool, ints are int64, anything with a float is the default float32.
        kind = np.asarray(data).dtype.kind
        dtype = np.dtype(np.bool_ if kind == "b" else np.int64 if kind in "iu" else np.float32)
    return jnp.asarray(data, dtype=_dtype(dtype))


def _python_numbers(data: Any, depth: int = 0) -> None:
    if isinstance(data, (list, tuple)) and depth < 4:
        for d in data:
            _python_numbers(d, depth + 1)
    elif not isinstance(data, (bool, int, float)):
        raise TypeError(
            f"torch.tensor data must be Python numbers or lists of them, got {type(data).__name__}"
        )


def _detach(input: Any) -> Array:
    return jax.lax.stop_gradient(input)


def _identity(input: Any, *, memory_format: Any = None) -> Array:
    return jnp.asarray(input)


def _contiguous(input: Any, memory_format: Any = None) -> Array:
    return jnp.asarray(input)


def _cast(dtype: Any) -> Callable[..., Array]:
    def impl(input: Any, memory_format: Any = None) -> Array:
        return jnp.asarray(input).astype(_dtype(np.dtype(dtype)))

    return impl


def _to(
    input: Any,
    *args: Any,
    dtype: Any = None,
    device: Any = None,
    non_blocking: Any = False,
    copy: Any = False,
    memory_format: Any = None,
) -> Array:
    # torch's overloads: to(dtype), to(device, dtype), to(other); trailing bools are non_blocking/copy.
    x = jnp.asarray(input)
    for a in args:
        if isinstance(a, np.dtype):
            dtype = a
        elif isinstance(a, (jax.Array, np.ndarray)):
            dtype = a.dtype
        elif not isinstance(a, (_Device, str, bool)):
            raise TypeError(f"to() got an unsupported argument {type(a).__name__}")
    return x if dtype is None else x.astype(_dtype(dtype))


def _type_as(input: Any, other: Any) -> Array:
    return jnp.asarray(input).astype(jnp.asarray(other).dtype)


def _size(input: Any, dim: Any = None) -> Any:
    shape = tuple(jnp.shape(input))
    return shape if dim is None else shape[operator.index(dim)]


def _numel(input: Any) -> int:
    return int(jnp.size(input))


def _ndim(input: Any) -> int:
    return int(jnp.ndim(input))


# ------------------------------------------------------------------------------------------------ math
def _math(fn: Callable[..., Any], jfn: Callable[..., Any]) -> Callable[..., Any]:
    # Python numbers keep math's double precision; tensors go through jnp.
    def impl(*args: Any) -> Any:
        _numbers(*args)
        if all(isinstance(a, (bool, int, float)) for a in args):
            return fn(*args)
        return jfn(*(_fl(a) for a in args))

    return impl


def _math_log(x: Any, base: Any = None, /) -> Any:
    if base is None:
        return _math(math.log, jnp.log)(x)
    return _math(math.log, lambda a, b: jnp.log(a) / jnp.log(b))(x, base)


def _math_unary(fn: Callable[..., Any], jfn: Callable[..., Any]) -> Callable[[Any], Any]:
    impl = _math(fn, jfn)

    def unary(x: Any, /) -> Any:
        return impl(x)

    return unary


def _math_pow(x: Any, y: Any, /) -> Any:
    return _math(math.pow, jnp.power)(x, y)


# ----------------------------------------------------------------------------------------------- tables
_TORCH_ELEMENTWISE: dict[str, Callable[..., Any]] = {
    "exp": _float_unary(jnp.exp),
    "log": _float_unary(jnp.log),
    "log1p": _float_unary(jnp.log1p),
    "expm1": _float_unary(jnp.expm1),
    "sqrt": _float_unary(jnp.sqrt),
    "rsqrt": _float_unary(jax.lax.rsqrt),
    "sigmoid": _float_unary(jax.nn.sigmoid),
    "tanh": _float_unary(jnp.tanh),
    "square": _plain_unary(jnp.square),
    "abs": _plain_unary(jnp.abs),
    "neg": _plain_unary(jnp.negative),
    "sign": _plain_unary(jnp.sign),
    "relu": _plain_unary(jax.nn.relu),
    "isfinite": _plain_unary(jnp.isfinite),
    "isnan": _plain_unary(jnp.isnan),
    "isinf": _plain_unary(jnp.isinf),
    "logical_not": _plain_unary(jnp.logical_not),
}

# Functions that exist as torch.<name> and as Tensor.<name> with the same argument order.
_TORCH_SHARED: dict[str, Callable[..., Any]] = {
    **_TORCH_ELEMENTWISE,
    "clamp": _clamp,
    "clip": _clamp,
    "clamp_min": _clamp_min,
    "clamp_max": _clamp_max,
    "minimum": _minimum,
    "maximum": _maximum,
    "sum": _sum,
    "mean": _mean,
    "max": _minmax(jnp.argmax, jnp.max, jnp.maximum),
    "min": _minmax(jnp.argmin, jnp.min, jnp.minimum),
    "amax": _amax,
    "amin": _amin,
    "logsumexp": _logsumexp,
    "prod": _prod,
    "std": _std,
    "var": _var,
    "any": _any,
    "all": _all,
    "count_nonzero": _count_nonzero,
    "cumsum": _cumsum,
    "softmax": _softmax,
    "log_softmax": _log_softmax,
    "pow": _pow,
    "mul": _mul,
    "add": _add,
    "sub": _sub,
    "div": _div,
    "matmul": _matmul,
    "reshape": _reshape,
    "flatten": _flatten,
    "squeeze": _squeeze,
    "unsqueeze": _unsqueeze,
    "transpose": _transpose,
    "permute": _permute,
    "t": _t,
    "detach": _detach,
    "clone": _identity,
    "numel": _numel,
    "masked_fill": _masked_fill,
    "gather": _gather,
    "nan_to_num": _nan_to_num,
    "logical_and": _logical_and,
    "logical_or": _logical_or,
}

_FUNCTIONS: dict[str, Callable[..., Any]] = {
    # Python operators, as fx records them.
    "operator.add": _op_add,
    "operator.sub": _binary(operator.sub),
    "operator.mul": _binary(operator.mul),
    "operator.truediv": _binary(operator.truediv),
    "operator.floordiv": _binary(operator.floordiv),
    "operator.pow": _op_pow,
    "operator.neg": _unary_op(operator.neg),
    "operator.pos": _unary_op(operator.pos),
    "operator.abs": _unary_op(operator.abs),
    "operator.gt": _binary(operator.gt),
    "operator.ge": _binary(operator.ge),
    "operator.lt": _binary(operator.lt),
    "operator.le": _binary(operator.le),
    "operator.eq": _binary(operator.eq),
    "operator.ne": _binary(operator.ne),
    "operator.and_": _binary(operator.and_),
    "operator.or_": _binary(operator.or_),
    "operator.invert": _unary_op(operator.invert),
    "operator.matmul": _binary(operator.matmul),
    "operator.getitem": _op_getitem,
    "getattr": _getattr,  # builtins.getattr, as fx names it; the attribute must be a listed literal
    **{f"torch.{name}": fn for name, fn in _TORCH_SHARED.items()},
    "torch.where": _where,
    "torch.stack": _stack,
    "torch.cat": _cat,
    "torch.concat": _cat,
    "torch.zeros_like": _zeros_like,
    "torch.ones_like": _ones_like,
    "torch.full_like": _full_like,
    "torch.tensor": _tensor,
    "torch._C._special.special_expit": _TORCH_ELEMENTWISE["sigmoid"],
    # torch.nn.functional: builtins are recorded under torch._C._nn, Python functions under their module.
    "torch._C._nn.log_sigmoid": _float_unary(jax.nn.log_sigmoid),
    "torch._C._nn.softplus": _softplus,
    "torch.nn.functional.relu": _relu_f,
    "torch.nn.functional.sigmoid": _TORCH_ELEMENTWISE["sigmoid"],
    "torch.nn.functional.tanh": _TORCH_ELEMENTWISE["tanh"],
    "torch.nn.functional.softmax": _softmax_f,
    "torch.nn.functional.log_softmax": _log_softmax_f,
    "torch.nn.functional.mse_loss": _mse_loss,
    "math.log": _math_log,
    "math.exp": _math_unary(math.exp, jnp.exp),
    "math.sqrt": _math_unary(math.sqrt, jnp.sqrt),
    "math.fabs": _math_unary(math.fabs, jnp.abs),
    "math.pow": _math_pow,
}

_METHODS: dict[str, Callable[..., Any]] = {
    **_TORCH_SHARED,
    "where": _where_method,
    "view": _view,
    "expand": _expand,
    "contiguous": _contiguous,
    "float": _cast(np.float32),
    "double": _cast(np.float64),
    "long": _cast(np.int64),
    "int": _cast(np.int32),
    "bool": _cast(np.bool_),
    "to": _to,
    "type_as": _type_as,
    "size": _size,
    "dim": _ndim,
}

SUPPORTED_FUNCTIONS: frozenset[str] = frozenset(_FUNCTIONS)
SUPPORTED_METHODS: frozenset[str] = frozenset(_METHODS)
_SIGNATURES = {id(fn): inspect.signature(fn) for fn in (*_FUNCTIONS.values(), *_METHODS.values())}


# --------------------------------------------------------------------------------------------- compile
@dataclass(frozen=True)
class _Step:
    name: str
    target: str
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


def compile_graph(name: str, inputs: Sequence[Any], nodes: Sequence[Any]) -> CustomLossFn:
    """Rebuild a wire-form custom loss as ``f(logprobs, *inputs) -> (loss, metrics)`` in JAX.

    ``inputs`` is ``[(name, rank), ...]`` starting with ``("logprobs", 1 | 2)`` (objects with ``name`` and
    ``rank``, like the SDK's ``CustomLossInput``, also work); ``nodes`` are ``CustomLossNode`` dicts (or
    models). Raises ``ValueError`` naming the loss, node and target for anything not allowed. The returned
    function is pure and traceable under ``jax.jit``, ``jax.grad`` and ``jax.vmap``; it returns an f32
    scalar loss and a dict of f32 scalar metrics.
    """
    loss = name if isinstance(name, str) else repr(name)

    def fail(msg: str, node: Mapping[str, Any] | None = None) -> ValueError:
        where = ""
        if node is not None:
            where = f" node {node.get('name')!r} ({node.get('op')} {node.get('target')!r})"
        return ValueError(f"custom loss {loss!r}{where}: {msg}")

    specs = _input_specs(inputs, fail)
    if not isinstance(nodes, Sequence) or isinstance(nodes, (str, bytes)):
        raise fail("nodes must be a list")
    if len(nodes) > MAX_NODES:
        raise fail(f"has {len(nodes)} nodes; at most {MAX_NODES} are allowed")
    if len(nodes) < len(specs) + 1:
        raise fail(f"has {len(nodes)} nodes; it needs a placeholder per input and an output")

    known: set[str] = set()
    placeholders: list[str] = []
    steps: list[_Step] = []
    output: Any = None
    for i, raw in enumerate(nodes):
        node = _node_dict(raw, i, fail)
        op, node_name, target = node["op"], node["name"], node["target"]
        if node_name in known:
            raise fail("duplicate node name", node)
        if output is not None:
            raise fail("comes after the output node", node)
        if i < len(specs) and op != "placeholder":
            raise fail(f"node {i} must be the placeholder for input {specs[i][0]!r}", node)
        args = [_decode(a, known, 0, node, fail) for a in node["args"]]
        kwargs = {k: _decode(v, known, 0, node, fail) for k, v in node["kwargs"].items()}

        if op == "placeholder":
            if i >= len(specs) or target != specs[i][0]:
                expected = f"input {specs[i][0]!r}" if i < len(specs) else "no more placeholders"
                raise fail(f"placeholder {i} must be {expected}; inputs are {[s[0] for s in specs]}", node)
            if args or kwargs:
                raise fail("placeholders take no arguments (inputs have no defaults)", node)
            placeholders.append(node_name)
        elif op == "output":
            if target != "output" or len(args) != 1 or kwargs:
                raise fail("the output node must be output(result) with one argument", node)
            output = _check_output_value(args[0], node, fail)
            continue
        elif op in ("call_function", "call_method"):
            table = _FUNCTIONS if op == "call_function" else _METHODS
            fn = table.get(target)
            if fn is None:
                kind = "function" if op == "call_function" else "Tensor method"
                raise fail(f"{kind} {target!r} is not allowed in a custom loss", node)
            if op == "call_method" and not args:
                raise fail("a method call needs the tensor it is called on", node)
            if target == "getattr" and not (
                len(args) == 2 and isinstance(args[1], str) and args[1] in _ATTRIBUTES
            ):
                raise fail(f"getattr may only read the attributes {sorted(_ATTRIBUTES)}", node)
            try:
                _SIGNATURES[id(fn)].bind(*args, **kwargs)
            except TypeError as e:
                raise fail(f"bad arguments: {e}", node) from e
            steps.append(_Step(node_name, target, fn, tuple(args), kwargs))
        elif op in ("call_module", "get_attr"):
            what = "torch.nn modules" if op == "call_module" else "captured tensors or parameters"
            raise fail(f"{op} nodes are not allowed: custom losses cannot use {what}", node)
        else:
            raise fail(f"unknown op {op!r}", node)
        known.add(node_name)
    if output is None:
        raise fail("has no output node")
    return _build(loss, specs, tuple(placeholders), tuple(steps), output)


def _input_specs(inputs: Sequence[Any], fail: Callable[..., ValueError]) -> tuple[tuple[str, int], ...]:
    specs = []
    for item in inputs:
        if isinstance(item, (tuple, list)) and len(item) == 2:
            key, rank = item
        elif hasattr(item, "name") and hasattr(item, "rank"):
            key, rank = item.name, item.rank
        else:
            raise fail(f"each input must be (name, rank), got {item!r}")
        if not (isinstance(key, str) and _INPUT_NAME.fullmatch(key)):
            raise fail(f"input name {key!r} must be a lowercase name of letters, digits and underscores")
        if isinstance(rank, bool) or rank not in (0, 1, 2):
            raise fail(f"input {key!r} rank must be 0, 1 or 2, got {rank!r}")
        specs.append((key, int(rank)))
    if not specs or specs[0][0] != "logprobs" or specs[0][1] == 0:
        raise fail("the first input must be logprobs, with rank 1 ([T]) or 2 ([T, K])")
    if len(specs) > _MAX_INPUTS:
        raise fail(f"takes {len(specs)} inputs; at most {_MAX_INPUTS} are allowed, logprobs included")
    if len({k for k, _ in specs}) != len(specs):
        raise fail(f"input names repeat: {[k for k, _ in specs]}")
    return tuple(specs)


def _node_dict(raw: Any, i: int, fail: Callable[..., ValueError]) -> dict[str, Any]:
    if hasattr(raw, "model_dump") and not isinstance(raw, Mapping):
        raw = raw.model_dump()
    if not isinstance(raw, Mapping):
        raise fail(f"node {i} must be an object, got {type(raw).__name__}")
    extra = set(raw) - {"op", "name", "target", "args", "kwargs"}
    node = {"args": [], "kwargs": {}, **raw}
    if extra:
        raise fail(f"node {i} has unknown fields {sorted(map(str, extra))}", node)
    for field in ("op", "name", "target"):
        if not isinstance(node.get(field), str):
            raise fail(f"node {i} needs a string {field!r}", node)
    if not _NODE_NAME.fullmatch(node["name"]):
        raise fail(f"node {i} name must be an identifier of at most 256 characters", node)
    if not isinstance(node["args"], list):
        raise fail("args must be a list", node)
    if not (isinstance(node["kwargs"], Mapping) and all(isinstance(k, str) for k in node["kwargs"])):
        raise fail("kwargs must be an object with string keys", node)
    return node


def _decode(
    arg: Any, known: set[str], depth: int, node: Mapping[str, Any], fail: Callable[..., ValueError]
) -> Any:
    """An encoded argument as a Python value, with node references as ``_Ref``; never evaluates anything."""
    if depth > _MAX_DEPTH:
        raise fail(f"arguments nest deeper than {_MAX_DEPTH}", node)
    if arg is None or isinstance(arg, (bool, str, float)):
        return arg
    if isinstance(arg, int):
        if not -_INT_LIMIT <= arg < _INT_LIMIT:
            raise fail(f"integer argument {arg} does not fit in 64 bits", node)
        return arg
    if isinstance(arg, list):
        return [_decode(a, known, depth + 1, node, fail) for a in arg]
    if not (isinstance(arg, Mapping) and len(arg) == 1):
        raise fail(f"malformed argument {arg!r}: expected a JSON scalar, a list or a one-key object", node)
    ((kind, value),) = arg.items()
    if kind == "ref":
        if not isinstance(value, str) or value not in known:
            raise fail(f"refers to {value!r}, which is not an earlier node", node)
        return _Ref(value)
    if kind == "tuple" and isinstance(value, list):
        return tuple(_decode(a, known, depth + 1, node, fail) for a in value)
    if kind == "dict" and isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
        return {k: _decode(v, known, depth + 1, node, fail) for k, v in value.items()}
    if kind == "slice" and isinstance(value, list) and len(value) == 3:
        parts = [_decode(a, known, depth + 1, node, fail) for a in value]
        if not all(p is None or type(p) is int or isinstance(p, _Ref) for p in parts):
            raise fail(f"slice bounds must be ints, None or node references, got {value!r}", node)
        return slice(*parts)
    if kind == "ellipsis" and value is True:
        return Ellipsis
    if kind == "float" and value in ("inf", "-inf", "nan"):
        return float(value)
    if kind == "dtype" and isinstance(value, str) and value in _DTYPES:
        return _DTYPES[value]
    if kind == "device" and isinstance(value, str) and len(value) <= 64:
        return _Device(value)
    if kind == "layout" and value in _LAYOUTS:
        return _Opaque(kind, value)
    if kind == "memory_format" and value in _MEMORY_FORMATS:
        return _Opaque(kind, value)
    raise fail(f"malformed or unsupported argument {arg!r}", node)


def _check_output_value(value: Any, node: Mapping[str, Any], fail: Callable[..., ValueError]) -> Any:
    if not (isinstance(value, (tuple, list)) and len(value) == 2):
        raise fail("the loss must return (loss, metrics)", node)
    loss, metrics = value
    if not isinstance(loss, _Ref):
        raise fail(f"the loss must be a tensor computed by the graph, got {loss!r}", node)
    if not isinstance(metrics, dict):
        raise fail("the metrics must be a dict", node)
    for key, metric in metrics.items():
        if not _METRIC_KEY.fullmatch(key):
            raise fail(
                f"metric {key!r} must be named custom/<name>:sum or custom/<name>:mean in lowercase", node
            )
        if not isinstance(metric, _Ref):
            raise fail(f"metric {key!r} must be a tensor computed by the graph, got {metric!r}", node)
    return (loss, metrics)


# -------------------------------------------------------------------------------------------------- run
def _resolve(value: Any, env: Mapping[str, Any]) -> Any:
    if isinstance(value, _Ref):
        return env[value.name]
    if isinstance(value, list):
        return [_resolve(v, env) for v in value]
    if isinstance(value, tuple):
        return tuple(_resolve(v, env) for v in value)
    if isinstance(value, dict):
        return {k: _resolve(v, env) for k, v in value.items()}
    if isinstance(value, slice):
        return slice(_resolve(value.start, env), _resolve(value.stop, env), _resolve(value.step, env))
    return value


def _check_result(value: Any, depth: int = 0) -> None:
    # Shapes are static under jit, so this runs while tracing, before anything is allocated.
    if isinstance(value, (jax.Array, np.ndarray)):
        if value.size > MAX_ELEMENTS:
            raise ValueError(f"produces {value.size} elements (shape {value.shape}); at most {MAX_ELEMENTS}")
    elif isinstance(value, int) and not isinstance(value, bool):
        if not -_INT_LIMIT <= value < _INT_LIMIT:
            raise ValueError("produces an integer that does not fit in 64 bits")
    elif isinstance(value, (tuple, list)):
        if len(value) > _MAX_TUPLE or depth > 2:
            raise ValueError(f"produces a sequence of {len(value)} items")
        for v in value:
            _check_result(v, depth + 1)


def _build(
    loss: str,
    specs: tuple[tuple[str, int], ...],
    placeholders: tuple[str, ...],
    steps: tuple[_Step, ...],
    output: tuple[_Ref, dict[str, _Ref]],
) -> CustomLossFn:
    def custom_loss(logprobs: Any, *inputs: Any) -> tuple[Array, dict[str, Array]]:
        values = (logprobs, *inputs)
        if len(values) != len(specs):
            raise ValueError(f"custom loss {loss!r} takes {[s[0] for s in specs]}, got {len(values)} arrays")
        env: dict[str, Any] = {}
        for (key, rank), node_name, value in zip(specs, placeholders, values, strict=True):
            arr = jnp.asarray(value)
            if arr.ndim != rank:
                raise ValueError(
                    f"custom loss {loss!r} input {key!r} must have rank {rank}, got shape {tuple(arr.shape)}"
                )
            env[node_name] = arr
        for step in steps:
            try:
                out = step.fn(*_resolve(step.args, env), **_resolve(step.kwargs, env))
                _check_result(out)
            except Exception as e:
                raise ValueError(f"custom loss {loss!r} node {step.name!r} ({step.target}): {e}") from e
            env[step.name] = out
        result = _resolve(output[0], env)
        if not isinstance(result, jax.Array) or result.ndim != 0:
            shape = tuple(result.shape) if isinstance(result, jax.Array) else type(result).__name__
            raise ValueError(f"custom loss {loss!r} must return a scalar tensor loss, got {shape}")
        if not jnp.issubdtype(result.dtype, jnp.floating):
            raise ValueError(f"custom loss {loss!r} must return a floating-point loss, got {result.dtype}")
        metrics = {}
        for key, ref in output[1].items():
            value = env[ref.name]
            if not isinstance(value, jax.Array) or value.ndim != 0:
                raise ValueError(f"custom loss {loss!r} metric {key!r} must be a scalar tensor")
            metrics[key] = value.astype(jnp.float32)
        return result.astype(jnp.float32), metrics

    custom_loss.__name__ = custom_loss.__qualname__ = (
        f"custom_loss_{loss}" if loss.isidentifier() else "custom_loss"
    )
    return custom_loss
