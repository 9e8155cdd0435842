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

:func:`compile_masked` builds the same loss for arrays padded along T to a length bucket,
``g(length, logprobs, *inputs)``, equal to the exact function on the unpadded arrays, so that one compiled
program (and one ``vmap`` over a batch) serves every datum length of a bucket. A static pass decides, per
node, where the T axis is; it returns None (the caller keeps the exact per-length function) for anything
whose padded result could differ. Masked mode covers: every elementwise op above (arithmetic, comparisons,
logical ops, unary math, clamp, where, masked_fill, nan_to_num, casts, ``*_like``, activations, math.*) when
T axes line up under broadcasting; sum mean prod amax amin max min (with indices) logsumexp std var any all
count_nonzero and mse_loss over any dims, T included; softmax, log_softmax and cumsum along any axis;
getitem that keeps T whole; unsqueeze, squeeze of a size-1 axis, transpose, permute, t, ``.T``, expand,
stack, cat (not along T), gather (not along T), flatten and reshape(-1) with T leading; dim, ndim, dtype,
and shape/size of axes other than T. It refuses slicing or indexing T, the size of T (``shape[0]``,
``numel``), matmul, other reshapes, and dims or sizes that are not literals in ops on values with T.
"""

from __future__ import annotations

import functools
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
    "UNMASKED_TARGETS",
    "MaskedLossFn",
    "TracedLoss",
    "compile_graph",
    "compile_masked",
    "masked_refusal",
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
        return _minmax_along(x, x, axis, keepdim, argfn)

    return impl


def _minmax_along(x: Array, scan: Array, axis: int, keepdim: bool, argfn: Callable[..., Array]) -> _MinMax:
    """``max``/``min`` with ``dim``: the arg-extreme of ``scan`` (``x``, or ``x`` with masked-out entries)."""
    idx = argfn(scan, axis=axis, keepdims=True)
    # Gather at the index, so the gradient goes to that one element as in torch (not split over ties).
    values = jnp.take_along_axis(x, idx, axis=axis)
    if not keepdim:
        values, idx = jnp.squeeze(values, axis), jnp.squeeze(idx, axis)
    return _MinMax(values, idx)


def _amax(input: Any, dim: Any = (), keepdim: bool = False) -> Array:
    return jnp.max(jnp.asarray(input), axis=_axes(dim), keepdims=keepdim)


def _amin(input: Any, dim: Any = (), keepdim: bool = False) -> Array:
    return jnp.min(jnp.asarray(input), axis=_axes(dim), keepdims=keepdim)


def _logsumexp(input: Any, dim: Any, keepdim: bool = False) -> Array:
    return jax.nn.logsumexp(_fl(input), axis=_axes(dim), keepdims=keepdim)


def _variance(
    input: Any, dim: Any, unbiased: Any, keepdim: bool, correction: Any, where: Any = None
) -> Array:
    if isinstance(dim, bool):  # torch.var(x, False): the legacy positional ``unbiased``
        dim, unbiased = None, dim
    if correction is None:
        correction = 0 if unbiased is False else 1
    return jnp.var(_fl(input), axis=_axes(dim), ddof=correction, keepdims=keepdim, where=where)


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


class _Graph(NamedTuple):
    """A checked wire graph, ready to run."""

    loss: str
    specs: tuple[tuple[str, int], ...]
    placeholders: tuple[str, ...]
    steps: tuple[_Step, ...]
    output: tuple[_Ref, dict[str, _Ref]]


def compile_graph(name: str, inputs: Sequence[Any], nodes: Sequence[Any]) -> CustomLossFn:
    """Rebuild a wire-form custom loss as ``f(logprobs, *inputs) -> (loss, metrics)`` in JAX.

    ``inputs`` is ``[(name, rank), ...]`` starting with ``("logprobs", 1 | 2)`` (objects with ``name`` and
    ``rank``, like the SDK's ``CustomLossInput``, also work); ``nodes`` are ``CustomLossNode`` dicts (or
    models). Raises ``ValueError`` naming the loss, node and target for anything not allowed. The returned
    function is pure and traceable under ``jax.jit``, ``jax.grad`` and ``jax.vmap``; it returns an f32
    scalar loss and a dict of f32 scalar metrics.
    """
    return _build(_parse(name, inputs, nodes))


def _parse(name: str, inputs: Sequence[Any], nodes: Sequence[Any]) -> _Graph:
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
    return _Graph(loss, specs, tuple(placeholders), tuple(steps), output)


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


def _build(graph: _Graph) -> CustomLossFn:
    def custom_loss(logprobs: Any, *inputs: Any) -> tuple[Array, dict[str, Array]]:
        return _evaluate(graph, (logprobs, *inputs))

    return _named(custom_loss, "custom_loss", graph.loss)


def _named(fn: Callable[..., Any], prefix: str, loss: str) -> Callable[..., Any]:
    fn.__name__ = fn.__qualname__ = f"{prefix}_{loss}" if loss.isidentifier() else prefix
    return fn


def _evaluate(
    graph: _Graph, values: tuple[Any, ...], masked: _Masked | None = None
) -> tuple[Array, dict[str, Array]]:
    """Run the graph on ``values`` (``logprobs, *inputs``); ``masked`` runs it on padded arrays instead."""
    loss, specs = graph.loss, graph.specs
    if len(values) != len(specs):
        raise ValueError(f"custom loss {loss!r} takes {[s[0] for s in specs]}, got {len(values)} arrays")
    env: dict[str, Any] = {}
    for (key, rank), node_name, value in zip(specs, graph.placeholders, values, strict=True):
        arr = jnp.asarray(value)
        if arr.ndim != rank:
            raise ValueError(
                f"custom loss {loss!r} input {key!r} must have rank {rank}, got shape {tuple(arr.shape)}"
            )
        env[node_name] = arr if masked is None else masked.input(loss, key, arr)
    for i, step in enumerate(graph.steps):
        args, kwargs = _resolve(step.args, env), _resolve(step.kwargs, env)
        try:
            out = step.fn(*args, **kwargs) if masked is None else masked.run(i, step, args, kwargs)
            _check_result(out)
        except Exception as e:
            raise ValueError(f"custom loss {loss!r} node {step.name!r} ({step.target}): {e}") from e
        env[step.name] = out
    result = _resolve(graph.output[0], env)
    if not isinstance(result, jax.Array) or result.ndim != 0:
        shape = tuple(result.shape) if isinstance(result, jax.Array) else type(result).__name__
        raise ValueError(f"custom loss {loss!r} must return a scalar tensor loss, got {shape}")
    if not jnp.issubdtype(result.dtype, jnp.floating):
        raise ValueError(f"custom loss {loss!r} must return a floating-point loss, got {result.dtype}")
    metrics = {}
    for key, ref in graph.output[1].items():
        value = env[ref.name]
        if not isinstance(value, jax.Array) or value.ndim != 0:
            raise ValueError(f"custom loss {loss!r} metric {key!r} must be a scalar tensor")
        metrics[key] = value.astype(jnp.float32)
    return result.astype(jnp.float32), metrics


# ----------------------------------------------------------------------------------------------- masked
# compile_masked runs the same loss on arrays padded along T to a bucket length L, so that one compiled
# program serves every datum length up to L. A static pass over the graph (_analyze) tracks, for every value,
# which axis is T (merged with the axes after it by a flatten, or with literal slices cut off its ends: its
# valid entries are always a prefix); it refuses anything whose padded result could differ from the exact
# one, and marks the few steps that must see the true length (reductions, softmax and cumsum along T, T's
# size and its last entry). Every other step runs the exact op on the padded arrays: it acts on each
# position alone, so valid positions are unaffected.
#
# Invariants of the masked run: every T axis holds the exact values at its valid positions; its padded
# positions hold finite values copied from valid rows (inputs are re-padded on entry, softmax and cumsum
# along T re-padded after), they never reach a value without T (reductions replace them by their identity
# with `where`), and no gradient flows out of them (the re-padding fills are stop_gradient'ed and `where`'s
# backward is a select), so the gradient at padded logprobs positions is exactly zero.

MaskedLossFn = Callable[..., tuple[Array, dict[str, Array]]]

_T = "T"  # a T axis in an abstract shape


@dataclass(frozen=True)
class _Merged:
    """A T axis merged with the axes after it (flatten/reshape at node ``node``): T * S entries exactly,
    L * S padded, the valid ones first. Only axes merged by the same node are known to have the same S."""

    node: str


@dataclass(frozen=True)
class _Cut:
    """A T axis (plain or merged) with ``cut`` positions sliced off its ends by literal slices (``x[1:]``,
    ``x[:-1]``): ``T * S - cut`` entries exactly, ``L * S - cut`` padded, the valid ones first. Axes with the
    same base and cut line up position by position, as they do in the exact run."""

    base: Any
    cut: int


_MAX_CUT = 8  # positions sliced off T in all; padded lengths are longer (length buckets start at 16)


def _is_t(d: Any) -> bool:
    return isinstance(d, (_Merged, _Cut)) or (isinstance(d, str) and d == _T)


class _NoMask(Exception):
    """No exact masked form for a node (for a value without T: its shape cannot be inferred)."""


@dataclass(frozen=True)
class _Val:
    """An abstract value. ``shape``: sizes (int when known, None when not, or a T marker), or None when
    unknown (never for a value with T). ``tensor``: whether it is an array (None: unknown)."""

    shape: tuple[Any, ...] | None = None
    tensor: bool | None = None


@dataclass(frozen=True)
class _ShapeOf:
    """``x.shape`` or ``x.size()`` of a value with T: only its entries other than T may be read."""

    shape: tuple[Any, ...]


@dataclass(frozen=True)
class _ByLength:
    """A number computed from the size of T (``x.shape[0]``, ``x.size(0)``, ``x.numel()``): a Python int in
    the exact run, the same number as a traced int32 scalar in the masked one. Only :func:`_r_python`'s
    operators take it, so it never sizes or indexes anything."""

    def __repr__(self) -> str:
        return "<a number from the size of T>"


@dataclass(frozen=True)
class _PairOf:
    """``max``/``min`` with ``dim``: (values, indices)."""

    values: _Val
    indices: _Val


_ANY = _Val()
_PY_INT = _Val((), False)
_BY_LENGTH = _ByLength()
_IGNORED = (type(None), str, np.dtype, _Device, _Opaque)
Rule = Callable[[inspect.BoundArguments, str], tuple[Any, Callable[..., Any] | None]]


def _has_t(v: Any) -> bool:
    if isinstance(v, _Val):
        return v.shape is not None and any(map(_is_t, v.shape))
    if isinstance(v, (_ShapeOf, _ByLength)):
        return True
    if isinstance(v, _PairOf):
        return _has_t(v.values) or _has_t(v.indices)
    if isinstance(v, (list, tuple)):
        return any(map(_has_t, v))
    if isinstance(v, dict):
        return any(map(_has_t, v.values()))
    if isinstance(v, slice):
        return _has_t((v.start, v.stop, v.step))
    return False


def _t_axis(shape: tuple[Any, ...]) -> int | None:
    axes = [i for i, d in enumerate(shape) if _is_t(d)]
    if len(axes) > 1:  # e.g. an outer product of two T vectors
        raise _NoMask("two T axes")
    return axes[0] if axes else None


def _known(v: Any) -> tuple[Any, ...]:
    """The shape of an operand: a Python number or a value of known shape."""
    if isinstance(v, (bool, int, float)):
        return ()
    if isinstance(v, _Val) and v.shape is not None:
        return v.shape
    raise _NoMask(f"operand of unknown shape {v!r}")


def _lit_int(v: Any) -> int:
    if type(v) is int:
        return v
    raise _NoMask(f"{v!r} is not a literal int")


def _axis_of(d: Any, rank: int) -> int:
    d = _lit_int(d)
    if not -rank <= d < rank:
        raise _NoMask(f"axis {d} out of range for rank {rank}")
    return d % rank


def _axes_of(dim: Any, rank: int) -> tuple[int, ...]:
    """A torch ``dim`` as the tuple of axes it reduces (None or an empty list: all of them)."""
    dims = dim if isinstance(dim, (list, tuple)) else (() if dim is None else (dim,))
    axes = tuple(_axis_of(d, rank) for d in dims) or tuple(range(rank))
    if len(set(axes)) != len(axes):
        raise _NoMask("repeated axes")
    return axes


def _reduced(shape: tuple[Any, ...], axes: tuple[int, ...], keepdim: Any) -> tuple[Any, ...]:
    if not isinstance(keepdim, bool):
        raise _NoMask("keepdim must be a literal bool")
    return tuple(1 if i in axes else d for i, d in enumerate(shape) if keepdim or i not in axes)


def _broadcast(shapes: Sequence[tuple[Any, ...]]) -> tuple[Any, ...]:
    """torch's right-aligned broadcasting; a T axis may only meet the same T axis or a size-1 axis."""
    rank = max((len(s) for s in shapes), default=0)
    out: list[Any] = []
    for i in range(rank):
        dims = [s[i - rank + len(s)] for s in shapes if i - rank + len(s) >= 0]
        ts = {d for d in dims if _is_t(d)}
        if ts:
            if len(ts) > 1 or any(not _is_t(d) and d != 1 for d in dims):
                raise _NoMask("T broadcast against another axis")
            out.append(ts.pop())
            continue
        big = {d for d in dims if d != 1}
        if None in big:
            out.append(None)
        elif len(big) > 1:
            raise _NoMask("shapes do not broadcast")
        else:
            out.append(big.pop() if big else 1)
    return tuple(out)


def _same(shapes: Sequence[tuple[Any, ...]]) -> list[Any]:
    """The common shape of stack/cat operands: T axes must line up exactly (no broadcasting)."""
    if not shapes or len({len(s) for s in shapes}) != 1:
        raise _NoMask("operands of different ranks")
    out = []
    for dims in zip(*shapes, strict=True):
        ts = {d for d in dims if _is_t(d)}
        if ts and (len(ts) > 1 or not all(map(_is_t, dims))):
            raise _NoMask("T against another axis")
        known = {d for d in dims if d is not None}
        out.append(known.pop() if len(known) == 1 else None)
    return out


def _merge(shape: tuple[Any, ...], s: int, e: int, node: str) -> Any:
    """The size of axes s..e of ``shape`` merged into one (flatten, reshape(-1))."""
    part = shape[s : e + 1]
    if not any(map(_is_t, part)):
        return math.prod(part) if all(type(d) is int for d in part) else None
    if not _is_t(part[0]):  # T not leading: its valid entries would not be a prefix
        raise _NoMask("T merged after another axis")
    if isinstance(part[0], _Cut) and len(part) > 1:
        raise _NoMask("a slice of T merged with other axes")
    return part[0] if len(part) == 1 else _Merged(node)


def _flat(ba: inspect.BoundArguments) -> list[Any]:
    out: list[Any] = []
    for key, value in ba.arguments.items():
        variadic = ba.signature.parameters[key].kind is inspect.Parameter.VAR_POSITIONAL
        out.extend(value if variadic else (value,))
    return out


# ---------------------------------------------------------------------------------------- masked: rules
def _r_elementwise(ba: inspect.BoundArguments, node: str) -> tuple[Any, None]:
    ops = [v for v in _flat(ba) if not isinstance(v, _IGNORED)]
    return _Val(_broadcast([_known(v) for v in ops]), True), None


# Operators that take a number from the size of T. Its traced int32 form must equal Python's int, so besides
# it they take only tensors, floats, bools and small int literals, and no pow or exp: sums and products then
# stay in int32's range for any T below 2**20. A product of two such numbers is refused for the same reason.
_BY_LENGTH_OPS = frozenset(
    ("add", "sub", "mul", "truediv", "floordiv", "neg", "pos", "abs", "gt", "ge", "lt", "le", "eq", "ne")
    + ("log", "sqrt", "fabs")
)
_BY_LENGTH_LITERAL = 1024


def _with_length(v: Any) -> bool:
    """Whether ``v`` may meet a number from the size of T (see above)."""
    if isinstance(v, _Val):
        return v.tensor is True
    return isinstance(v, (_ByLength, bool, float)) or (type(v) is int and abs(v) <= _BY_LENGTH_LITERAL)


def _r_python(op: str) -> Rule:
    """operator and math: Python numbers give a Python number; a number from the size of T gives one too."""

    def rule(ba: inspect.BoundArguments, node: str) -> tuple[Any, None]:
        ops = [v for v in _flat(ba) if not isinstance(v, _IGNORED)]
        by_length = sum(isinstance(v, _ByLength) for v in ops)
        if by_length and (
            op not in _BY_LENGTH_OPS or (op == "mul" and by_length > 1) or not all(map(_with_length, ops))
        ):
            raise _NoMask(f"{op} of a number from the size of T")
        shapes = [() if isinstance(v, _ByLength) else _known(v) for v in ops]
        if any(isinstance(v, _Val) and v.tensor for v in ops):
            return _Val(_broadcast(shapes), True), None
        return (_BY_LENGTH if by_length else _Val(_broadcast(shapes), None)), None

    return rule


def _r_cast(ba: inspect.BoundArguments, node: str) -> tuple[Any, None]:
    # to(other) and type_as(other) read only other's dtype.
    return _Val(_known(ba.arguments["input"]), True), None


def _r_like(ba: inspect.BoundArguments, node: str) -> tuple[Any, None]:
    fill = ba.arguments.get("fill_value")
    if _has_t(fill) and not isinstance(fill, _ByLength):
        raise _NoMask("fill value from T")
    return _Val(_known(ba.arguments["input"]), True), None


def _r_reduce(masked: Callable[..., Any]) -> Rule:
    def rule(ba: inspect.BoundArguments, node: str) -> tuple[Any, Callable[..., Any] | None]:
        a = ba.arguments
        shape = _known(a["input"])
        dim = a.get("dim")
        if masked is _mr_variance and isinstance(dim, bool):  # var(x, False): the legacy ``unbiased``
            dim = None
        axes = _axes_of(dim, len(shape))
        t = _t_axis(shape)
        runner = functools.partial(masked, t=t) if t is not None and t in axes else None
        return _Val(_reduced(shape, axes, a.get("keepdim", False)), True), runner

    return rule


def _r_minmax(is_max: bool) -> Rule:
    def rule(ba: inspect.BoundArguments, node: str) -> tuple[Any, Callable[..., Any] | None]:
        a = ba.arguments
        x, dim, other = a["input"], a["dim"], a["other"]
        if other is not None or (isinstance(dim, _Val) and dim.tensor is True):  # elementwise max(x, y)
            return _Val(_broadcast([_known(x), _known(dim if other is None else other)]), True), None
        shape = _known(x)
        t = _t_axis(shape)
        if dim is None:
            runner = None if t is None else functools.partial(_mr_extreme_all, t=t, is_max=is_max)
            return _Val((), True), runner
        if not shape:
            return _PairOf(_Val((), True), _Val((), True)), None
        axis = _axis_of(dim, len(shape))
        out = _Val(_reduced(shape, (axis,), a["keepdim"]), True)
        runner = functools.partial(_mr_minmax_dim, t=t, is_max=is_max) if axis == t else None
        return _PairOf(out, out), runner

    return rule


def _r_cumsum(ba: inspect.BoundArguments, node: str) -> tuple[Any, Callable[..., Any] | None]:
    shape = _known(ba.arguments["input"])
    axis, t = _axis_of(ba.arguments["dim"], len(shape)), _t_axis(shape)
    return _Val(shape, True), functools.partial(_mr_repadded, t=t) if axis == t else None


def _r_softmax(log: bool) -> Rule:
    def rule(ba: inspect.BoundArguments, node: str) -> tuple[Any, Callable[..., Any] | None]:
        shape = _known(ba.arguments["input"])
        dim = ba.arguments["dim"]
        if dim is None:  # torch's legacy implicit dim, as _softmax_input
            dim = 0 if len(shape) in (0, 1, 3) else 1
        axis, t = _axis_of(dim, len(shape)), _t_axis(shape)
        return _Val(shape, True), functools.partial(_mr_softmax, t=t, log=log) if axis == t else None

    return rule


def _r_mse(ba: inspect.BoundArguments, node: str) -> tuple[Any, Callable[..., Any] | None]:
    a = ba.arguments
    shape = _broadcast([_known(a["input"]), _known(a["target"])])
    if a["reduction"] == "none":
        return _Val(shape, True), None
    if a["reduction"] not in ("mean", "sum"):
        raise _NoMask("unknown reduction")
    t = _t_axis(shape)
    return _Val((), True), None if t is None else functools.partial(_mr_mse, t=t)


def _r_flatten(ba: inspect.BoundArguments, node: str) -> tuple[Any, None]:
    shape = _known(ba.arguments["input"])
    if not shape:
        return _Val((1,), True), None
    s, e = _axis_of(ba.arguments["start_dim"], len(shape)), _axis_of(ba.arguments["end_dim"], len(shape))
    if s > e:
        raise _NoMask("start_dim after end_dim")
    return _Val((*shape[:s], _merge(shape, s, e, node), *shape[e + 1 :]), True), None


def _r_reshape(ba: inspect.BoundArguments, node: str) -> tuple[Any, None]:
    a = ba.arguments
    shape = _known(a["input"])
    extra = a.get("shape", a.get("size"))
    sizes = _shape_args(a["args"] if extra is None else (extra,))
    if sizes == (-1,):  # reshape(-1) is flatten()
        return _Val((_merge(shape, 0, len(shape) - 1, node),) if shape else (1,), True), None
    if _has_t(a["input"]):
        raise _NoMask("reshape of a value with T")
    return _Val(tuple(None if s == -1 else s for s in sizes), True), None


def _r_squeeze(ba: inspect.BoundArguments, node: str) -> tuple[Any, None]:
    shape, dim = _known(ba.arguments["input"]), ba.arguments["dim"]
    if not shape:
        return _Val((), True), None
    # Only axes of known size: squeeze() would drop T when T == 1.
    axes = (
        range(len(shape))
        if dim is None
        else _axes_of(dim if isinstance(dim, (list, tuple)) else [dim], len(shape))
    )
    if not all(type(shape[i]) is int for i in axes):
        raise _NoMask("squeeze of an axis of unknown size")
    return _Val(tuple(d for i, d in enumerate(shape) if not (i in axes and d == 1)), True), None


def _r_unsqueeze(ba: inspect.BoundArguments, node: str) -> tuple[Any, None]:
    shape = _known(ba.arguments["input"])
    d = _axis_of(ba.arguments["dim"], len(shape) + 1)
    return _Val((*shape[:d], 1, *shape[d:]), True), None


def _r_transpose(ba: inspect.BoundArguments, node: str) -> tuple[Any, None]:
    shape = list(_known(ba.arguments["input"]))
    i, j = _axis_of(ba.arguments["dim0"], len(shape)), _axis_of(ba.arguments["dim1"], len(shape))
    shape[i], shape[j] = shape[j], shape[i]
    return _Val(tuple(shape), True), None


def _r_permute(ba: inspect.BoundArguments, node: str) -> tuple[Any, None]:
    a = ba.arguments
    shape = _known(a["input"])
    perm = [_axis_of(p, len(shape)) for p in _shape_args(a["args"] if a["dims"] is None else (a["dims"],))]
    if sorted(perm) != list(range(len(shape))):
        raise _NoMask("not a permutation")
    return _Val(tuple(shape[p] for p in perm), True), None


def _r_t(ba: inspect.BoundArguments, node: str) -> tuple[Any, None]:
    shape = _known(ba.arguments["input"])
    if len(shape) > 2:
        raise _NoMask("t() of more than 2 dims")
    return _Val(shape[::-1], True), None


def _r_expand(ba: inspect.BoundArguments, node: str) -> tuple[Any, None]:
    a = ba.arguments
    shape = _known(a["input"])
    sizes = _shape_args(a["args"] if a["size"] is None else (a["size"],))
    lead = len(sizes) - len(shape)
    if lead < 0 or any(s < 0 for s in sizes[:lead]):
        raise _NoMask("bad expand")
    out = list(sizes[:lead])
    for s, d in zip(sizes[lead:], shape, strict=True):
        if s != -1 and _is_t(d):
            raise _NoMask("expand of T to a fixed size")
        out.append(d if s == -1 else s)
    return _Val(tuple(out), True), None


def _r_stack(ba: inspect.BoundArguments, node: str) -> tuple[Any, None]:
    tensors = ba.arguments["tensors"]
    if not isinstance(tensors, (list, tuple)):
        raise _NoMask("stack of a non-list")
    shape = _same([_known(v) for v in tensors])
    d = _axis_of(ba.arguments["dim"], len(shape) + 1)
    return _Val((*shape[:d], len(tensors), *shape[d:]), True), None


def _r_cat(ba: inspect.BoundArguments, node: str) -> tuple[Any, None]:
    tensors = ba.arguments["tensors"]
    if not isinstance(tensors, (list, tuple)):
        raise _NoMask("cat of a non-list")
    shape = _same([_known(v) for v in tensors])
    d = _axis_of(ba.arguments["dim"], len(shape))
    if _is_t(shape[d]):
        raise _NoMask("cat along T")
    shape[d] = None
    return _Val(tuple(shape), True), None


def _r_gather(ba: inspect.BoundArguments, node: str) -> tuple[Any, None]:
    # Along an axis other than T, with the index's T axis where the input's is (then _gather's corner slice
    # keeps all of T, as it does in the exact run): each row picks from its own row.
    xs, ix = _known(ba.arguments["input"]), _known(ba.arguments["index"])
    axis = _lit_int(ba.arguments["dim"]) % max(len(xs), 1)
    tx, ti = _t_axis(xs), _t_axis(ix)
    if len(xs) != len(ix) or tx != ti or (tx is not None and (xs[tx] != ix[tx] or axis == tx)):
        raise _NoMask("gather along T or with T misaligned")
    return _Val(ix, True), None


def _index_shape(shape: tuple[Any, ...], idx: Any) -> tuple[tuple[Any, ...], tuple[int, int] | None]:
    """Basic indexing with literal ints, slices, None and Ellipsis: the result's shape, and where T is
    indexed by -1 (``(item, axis)``: the index item and the input axis), which the masked run reads at the
    true last position. T may be indexed at 0 or -1 (a length is at least 1) and sliced by ``[a:-b]``
    (``a, b >= 0``): what that cuts off either end is the same for every length."""
    items = idx if isinstance(idx, tuple) else (idx,)
    for it in items:
        if not (
            it is None
            or it is Ellipsis
            or type(it) is int
            or (
                isinstance(it, slice)
                and all(p is None or type(p) is int for p in (it.start, it.stop, it.step))
            )
        ):
            raise _NoMask(f"index {it!r}")
    consumed = sum(1 for it in items if type(it) is int or isinstance(it, slice))
    ellipses = sum(1 for it in items if it is Ellipsis)
    if ellipses > 1 or consumed > len(shape):
        raise _NoMask("too many indices")
    if not ellipses:
        items = (*items, Ellipsis)
    out: list[Any] = []
    last = None
    i = 0
    for pos, it in enumerate(items):
        if it is None:
            out.append(1)
        elif it is Ellipsis:
            k = len(shape) - consumed
            out.extend(shape[i : i + k])
            i += k
        else:
            d = shape[i]
            i += 1
            if _is_t(d):
                if type(it) is int:
                    if it not in (0, -1):
                        raise _NoMask("indexing T other than at 0 or -1")
                    last = (pos, i - 1) if it == -1 else last
                else:
                    out.append(_sliced_t(d, it))
            elif isinstance(it, slice):
                out.append(len(range(d)[it]) if type(d) is int else None)
            elif type(d) is int and not -d <= it < d:
                raise _NoMask("index out of range")
    return tuple(out), last


def _sliced_t(d: Any, it: slice) -> Any:
    """The T marker of ``x[it]`` along T: ``[a:-b]`` cuts a + b positions for every length."""
    start, stop = it.start or 0, 0 if it.stop is None else it.stop
    if it.step not in (None, 1) or start < 0 or (it.stop is not None and stop >= 0):  # x[:0] is empty
        raise _NoMask("slicing T other than by [a:-b]")
    if start - stop == 0:
        return d
    base, cut = (d.base, d.cut) if isinstance(d, _Cut) else (d, 0)
    if cut + start - stop > _MAX_CUT:
        raise _NoMask(f"slicing more than {_MAX_CUT} positions off T")
    return _Cut(base, cut + start - stop)


def _r_getitem(ba: inspect.BoundArguments, node: str) -> tuple[Any, Callable[..., Any] | None]:
    obj, idx = ba.arguments["obj"], ba.arguments["idx"]
    if isinstance(obj, _PairOf):
        i = _lit_int(idx)
        if i not in (-2, -1, 0, 1):
            raise _NoMask("index of a (values, indices) pair")
        return (obj.values, obj.indices)[i], None
    if isinstance(obj, _ShapeOf):
        if _is_t(obj.shape[_axis_of(idx, len(obj.shape))]):
            return _BY_LENGTH, _mr_size_of_t
        return _PY_INT, None
    if not (isinstance(obj, _Val) and obj.shape is not None and obj.tensor):
        raise _NoMask("index of an unknown value")
    shape, last = _index_shape(obj.shape, idx)
    return _Val(shape, True), None if last is None else functools.partial(_mr_last_of_t, last=last)


def _r_getattr(ba: inspect.BoundArguments, node: str) -> tuple[Any, None]:
    obj, attr = ba.arguments["obj"], ba.arguments["name"]
    if attr in ("values", "indices"):
        if not isinstance(obj, _PairOf):
            raise _NoMask("values/indices of a non-pair")
        return getattr(obj, attr), None
    if not (isinstance(obj, _Val) and obj.shape is not None and obj.tensor):
        raise _NoMask("attribute of an unknown value")
    if attr == "shape":
        return (_ShapeOf(obj.shape) if _has_t(obj) else _ANY), None
    if attr == "ndim":
        return _PY_INT, None
    if attr == "T":
        return _Val(obj.shape[::-1], True), None
    return _Val(None, False), None  # dtype, device


def _r_size(ba: inspect.BoundArguments, node: str) -> tuple[Any, Callable[..., Any] | None]:
    x, dim = ba.arguments["input"], ba.arguments["dim"]
    shape = _known(x)
    if dim is None:
        return (_ShapeOf(shape) if _has_t(x) else _ANY), None
    if _is_t(shape[_axis_of(dim, len(shape))]):
        return _BY_LENGTH, _mr_size_of_t
    return _PY_INT, None


def _r_numel(ba: inspect.BoundArguments, node: str) -> tuple[Any, Callable[..., Any] | None]:
    t = _t_axis(_known(ba.arguments["input"]))
    return (_PY_INT, None) if t is None else (_BY_LENGTH, functools.partial(_mr_numel, t=t))


def _r_ndim(ba: inspect.BoundArguments, node: str) -> tuple[Any, None]:
    return _PY_INT, None


def _r_tensor(ba: inspect.BoundArguments, node: str) -> tuple[Any, None]:
    data = ba.arguments["data"]
    _python_numbers(data)  # no node values inside
    return _Val(tuple(np.shape(data)), True), None


# ------------------------------------------------------------------------------------ masked: run time
class _Ctx(NamedTuple):
    length: Array  # the datum's true T (an int scalar, traced under jit and vmap)
    size: int  # L, the padded length of logprobs' axis 0


def _valid(ctx: _Ctx, size: int) -> Array:
    # A T axis of size L * S - cut (S = 1 unless merged by flatten; cut < L positions sliced off) has
    # length * S - cut valid entries, first.
    merged = -(-size // ctx.size)
    return ctx.length * merged - (ctx.size * merged - size)


def _tmask(ctx: _Ctx, x: Array, t: int) -> Array:
    size = x.shape[t]
    mask = jnp.arange(size) < _valid(ctx, size)
    return mask.reshape((1,) * t + (size,) + (1,) * (x.ndim - t - 1))


def _repad(ctx: _Ctx, y: Array, t: int) -> Array:
    """``y`` with its padded positions along axis t replaced by its last valid row, as constants."""
    size = y.shape[t]
    if size == 0:
        return y
    last = jnp.clip(_valid(ctx, size) - 1, 0, size - 1)
    edge = jax.lax.dynamic_index_in_dim(y, last, axis=t, keepdims=True)
    return jnp.where(_tmask(ctx, y, t), y, jax.lax.stop_gradient(edge))


def _extreme_identity(dtype: Any, is_max: bool) -> Array:
    if jnp.issubdtype(dtype, jnp.inexact):
        value: Any = -np.inf if is_max else np.inf
    elif jnp.issubdtype(dtype, jnp.bool_):
        value = not is_max
    else:
        value = jnp.iinfo(dtype).min if is_max else jnp.iinfo(dtype).max
    return jnp.asarray(value, dtype)


def _masked_extreme(
    x: Array, mask: Array, axes: tuple[int, ...] | None, keepdims: bool, is_max: bool
) -> Array:
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return _masked_extreme_float(x, mask, axes, keepdims, is_max)
    reduce = jnp.max if is_max else jnp.min
    return reduce(jnp.where(mask, x, _extreme_identity(x.dtype, is_max)), axis=axes, keepdims=keepdims)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4))
def _masked_extreme_float(
    x: Array, mask: Array, axes: tuple[int, ...] | None, keepdims: bool, is_max: bool
) -> Array:
    reduce = jnp.max if is_max else jnp.min
    return reduce(jnp.where(mask, x, _extreme_identity(x.dtype, is_max)), axis=axes, keepdims=keepdims)


@_masked_extreme_float.defjvp
def _masked_extreme_jvp(
    axes: tuple[int, ...] | None, keepdims: bool, is_max: bool, primals: Any, tangents: Any
) -> tuple[Array, Array]:
    # JAX's rule for reduce_max/min (elements equal to the result share the tangent equally), counting only
    # valid elements: a padded identity never takes a share, even when the result is the identity itself.
    x, mask = primals
    dx = tangents[0]
    ans = _masked_extreme_float(x, mask, axes, keepdims, is_max)
    full = ans if keepdims else jnp.expand_dims(ans, tuple(range(x.ndim)) if axes is None else axes)
    at = jnp.logical_and(x == full, mask).astype(dx.dtype)
    return ans, jnp.sum(dx * at, axis=axes, keepdims=keepdims) / jnp.sum(at, axis=axes, keepdims=keepdims)


def _norm_axes(dim: Any, ndim: int) -> tuple[int, ...] | None:
    axes = _axes(dim)
    if axes is None:
        return None
    return tuple(d % ndim for d in (axes if isinstance(axes, tuple) else (axes,)))


# Masked forms of the steps that see the true length: (ctx, fn, bound arguments, T axis) -> value. They
# mirror the exact implementations above, with JAX's own ``where=`` or an identity in the padded positions.
def _mr_jnp(reduce: Callable[..., Array]) -> Callable[..., Array]:
    def impl(ctx: _Ctx, fn: Callable[..., Any], ba: inspect.BoundArguments, *, t: int) -> Array:
        a = ba.arguments
        x = jnp.asarray(a["input"])
        extra = {"dtype": _opt_dtype(a["dtype"])} if "dtype" in a else {}
        return reduce(x, axis=_axes(a["dim"]), keepdims=a["keepdim"], where=_tmask(ctx, x, t), **extra)

    return impl


def _mr_extreme(is_max: bool) -> Callable[..., Array]:
    def impl(ctx: _Ctx, fn: Callable[..., Any], ba: inspect.BoundArguments, *, t: int) -> Array:
        x = jnp.asarray(ba.arguments["input"])
        axes = _norm_axes(ba.arguments["dim"], x.ndim)
        return _masked_extreme(x, _tmask(ctx, x, t), axes, ba.arguments["keepdim"], is_max)

    return impl


def _mr_extreme_all(
    ctx: _Ctx, fn: Callable[..., Any], ba: inspect.BoundArguments, *, t: int, is_max: bool
) -> Array:
    x = jnp.asarray(ba.arguments["input"])
    return _masked_extreme(x, _tmask(ctx, x, t), None, False, is_max)


def _mr_minmax_dim(
    ctx: _Ctx, fn: Callable[..., Any], ba: inspect.BoundArguments, *, t: int, is_max: bool
) -> _MinMax:
    a = ba.arguments
    x = jnp.asarray(a["input"])
    # The first extreme of the valid entries: a padded identity never wins, and ties keep the lowest index.
    scan = jnp.where(_tmask(ctx, x, t), x, _extreme_identity(x.dtype, is_max))
    argfn = jnp.argmax if is_max else jnp.argmin
    return _minmax_along(x, scan, operator.index(a["dim"]), a["keepdim"], argfn)


def _mr_logsumexp(ctx: _Ctx, fn: Callable[..., Any], ba: inspect.BoundArguments, *, t: int) -> Array:
    a = ba.arguments
    x = _fl(a["input"])
    x = jnp.where(_tmask(ctx, x, t), x, -jnp.inf)
    return jax.nn.logsumexp(x, axis=_axes(a["dim"]), keepdims=a["keepdim"])


def _mr_variance(ctx: _Ctx, fn: Callable[..., Any], ba: inspect.BoundArguments, *, t: int) -> Array:
    a = ba.arguments
    mask = _tmask(ctx, jnp.asarray(a["input"]), t)
    out = _variance(a["input"], a["dim"], a["unbiased"], a["keepdim"], a["correction"], where=mask)
    return jnp.sqrt(out) if fn is _std else out


def _mr_count_nonzero(ctx: _Ctx, fn: Callable[..., Any], ba: inspect.BoundArguments, *, t: int) -> Array:
    x = jnp.asarray(ba.arguments["input"])
    x = jnp.where(_tmask(ctx, x, t), x, jnp.zeros((), x.dtype))
    return jnp.count_nonzero(x, axis=_axes(ba.arguments["dim"]))


def _mr_repadded(ctx: _Ctx, fn: Callable[..., Any], ba: inspect.BoundArguments, *, t: int) -> Array:
    # cumsum along T: the valid prefix does not see the padding; the padded tail is re-padded.
    return _repad(ctx, fn(*ba.args, **ba.kwargs), t)


def _mr_size_of_t(ctx: _Ctx, fn: Callable[..., Any], ba: inspect.BoundArguments) -> Array:
    # The op gives the padded size of a T axis (L * S - cut); the exact run sees length * S - cut.
    return _valid(ctx, fn(*ba.args, **ba.kwargs))


def _mr_last_of_t(
    ctx: _Ctx, fn: Callable[..., Any], ba: inspect.BoundArguments, *, last: tuple[int, int]
) -> Array:
    # x[..., -1, ...] on T: the last valid position, not the last padded one (whose gradient must stay zero).
    obj, idx = ba.arguments["obj"], ba.arguments["idx"]
    item, axis = last
    items = list(idx) if isinstance(idx, tuple) else [idx]
    items[item] = _valid(ctx, jnp.shape(obj)[axis]) - 1
    return fn(obj, tuple(items) if isinstance(idx, tuple) else items[0])


def _mr_numel(ctx: _Ctx, fn: Callable[..., Any], ba: inspect.BoundArguments, *, t: int) -> Array:
    shape = jnp.shape(ba.arguments["input"])
    return math.prod(shape[:t] + shape[t + 1 :]) * _valid(ctx, shape[t])


def _mr_softmax(ctx: _Ctx, fn: Callable[..., Any], ba: inspect.BoundArguments, *, t: int, log: bool) -> Array:
    a = ba.arguments
    x, axis = _softmax_input(a["input"], a["dim"], a["dtype"])
    x = jnp.where(_tmask(ctx, x, t), x, -jnp.inf)  # exp(-inf) = 0: the padding adds nothing to the sum
    y = (jax.nn.log_softmax if log else jax.nn.softmax)(x, axis=axis)
    return _repad(ctx, y, t)


def _mr_mse(ctx: _Ctx, fn: Callable[..., Any], ba: inspect.BoundArguments, *, t: int) -> Array:
    a = dict(ba.arguments)
    reduction = a.pop("reduction")
    d = _mse_loss(**a, reduction="none")
    mask = _tmask(ctx, d, t)
    return jnp.sum(d, where=mask) if reduction == "sum" else jnp.mean(d, where=mask)


_MASK_ELEMENTWISE = (
    "clamp clip clamp_min clamp_max minimum maximum pow mul add sub div masked_fill nan_to_num logical_and "
    "logical_or detach clone"
)
_MASK_PYTHON = "add sub mul truediv floordiv pow neg pos abs gt ge lt le eq ne and_ or_ invert"


def _masked_rules() -> dict[int, Rule]:
    """Each allowlisted op's masked rule, by implementation (torch.sum and Tensor.sum share one)."""
    by_name: dict[str, Rule] = {
        **dict.fromkeys(_TORCH_ELEMENTWISE, _r_elementwise),
        **dict.fromkeys(_MASK_ELEMENTWISE.split(), _r_elementwise),
        "sum": _r_reduce(_mr_jnp(jnp.sum)),
        "mean": _r_reduce(_mr_jnp(jnp.mean)),
        "prod": _r_reduce(_mr_jnp(jnp.prod)),
        "any": _r_reduce(_mr_jnp(jnp.any)),
        "all": _r_reduce(_mr_jnp(jnp.all)),
        "amax": _r_reduce(_mr_extreme(True)),
        "amin": _r_reduce(_mr_extreme(False)),
        "logsumexp": _r_reduce(_mr_logsumexp),
        "std": _r_reduce(_mr_variance),
        "var": _r_reduce(_mr_variance),
        "count_nonzero": _r_reduce(_mr_count_nonzero),
        "max": _r_minmax(True),
        "min": _r_minmax(False),
        "cumsum": _r_cumsum,
        "softmax": _r_softmax(False),
        "log_softmax": _r_softmax(True),
        "reshape": _r_reshape,
        "flatten": _r_flatten,
        "squeeze": _r_squeeze,
        "unsqueeze": _r_unsqueeze,
        "transpose": _r_transpose,
        "permute": _r_permute,
        "t": _r_t,
        "numel": _r_numel,
        "gather": _r_gather,
    }
    rules = {id(_TORCH_SHARED[name]): rule for name, rule in by_name.items()}
    functions: dict[str, Rule] = {
        **{f"operator.{op}": _r_python(op) for op in _MASK_PYTHON.split()},
        **{f"math.{op}": _r_python(op) for op in ("log", "exp", "sqrt", "fabs", "pow")},
        "operator.getitem": _r_getitem,
        "getattr": _r_getattr,
        "torch.where": _r_elementwise,
        "torch.stack": _r_stack,
        "torch.cat": _r_cat,
        "torch.concat": _r_cat,
        "torch.zeros_like": _r_like,
        "torch.ones_like": _r_like,
        "torch.full_like": _r_like,
        "torch.tensor": _r_tensor,
        "torch._C._nn.log_sigmoid": _r_elementwise,
        "torch._C._nn.softplus": _r_elementwise,
        "torch.nn.functional.relu": _r_elementwise,
        "torch.nn.functional.softmax": _r_softmax(False),
        "torch.nn.functional.log_softmax": _r_softmax(True),
        "torch.nn.functional.mse_loss": _r_mse,
    }
    methods: dict[str, Rule] = {
        **dict.fromkeys(("where", "contiguous", "float", "double", "long", "int", "bool"), _r_elementwise),
        "view": _r_reshape,
        "expand": _r_expand,
        "to": _r_cast,
        "type_as": _r_cast,
        "size": _r_size,
        "dim": _r_ndim,
    }
    rules |= {id(_FUNCTIONS[target]): rule for target, rule in functions.items()}
    rules |= {id(_METHODS[target]): rule for target, rule in methods.items()}
    return rules


_MASK_RULES = _masked_rules()
# Allowlisted targets with no masked form at all (on values with T): matrix products mix T with other axes.
UNMASKED_TARGETS: frozenset[str] = frozenset(
    t for t, fn in (*_FUNCTIONS.items(), *_METHODS.items()) if id(fn) not in _MASK_RULES
)


_Plan = tuple[tuple[Any, Callable[..., Any] | None], ...]


def _analyze(graph: _Graph) -> tuple[_Plan | None, str | None]:
    """Per step: its abstract value and its masked runner (None: run the exact op); or why there is none."""
    env: dict[str, Any] = {}
    for (_, rank), node in zip(graph.specs, graph.placeholders, strict=True):
        env[node] = _Val((_T, *(None,) * (rank - 1)) if rank else (), True)
    plan = []
    for step in graph.steps:
        args, kwargs = _resolve(step.args, env), _resolve(step.kwargs, env)
        with_t = _has_t((args, kwargs))
        rule = _MASK_RULES.get(id(step.fn))
        where = f"node {step.name!r} ({step.target})"
        try:
            if rule is None:
                raise _NoMask("no masked form")
            bound = _SIGNATURES[id(step.fn)].bind(*args, **kwargs)
            bound.apply_defaults()
            value, runner = rule(bound, step.name)
            for part in (value.values, value.indices) if isinstance(value, _PairOf) else (value,):
                if isinstance(part, (_Val, _ShapeOf)) and part.shape is not None:
                    _t_axis(part.shape)  # at most one T axis
        except Exception as e:
            if with_t:
                return None, f"{where}: {e}"
            value, runner = _ANY, None  # no T: the step runs as is; only its shape is unknown
        if not with_t:
            if _has_t(value):  # T comes only from the inputs; a rule that says otherwise is not trusted
                return None, f"{where}: T out of nowhere"
            runner = None
        env[step.name] = value
        plan.append((value, runner))
    for key, ref in (("loss", graph.output[0]), *graph.output[1].items()):
        if _has_t(env[ref.name]):  # not a scalar: the exact run raises
            return None, f"{key} {ref.name!r} has T"
    return tuple(plan), None


def _dims(value: Any) -> tuple[Any, ...]:
    """Every axis of an abstract value's shape(s)."""
    parts = (value.values, value.indices) if isinstance(value, _PairOf) else (value,)
    return tuple(d for p in parts if isinstance(p, (_Val, _ShapeOf)) and p.shape for d in p.shape)


def masked_refusal(name: str, inputs: Sequence[Any], nodes: Sequence[Any]) -> str | None:
    """Why :func:`compile_masked` returns None for this graph (its first refused node), else None."""
    return _analyze(_parse(name, inputs, nodes))[1]


def _shape_agrees(dims: Sequence[int], shape: tuple[Any, ...], size: int) -> bool:
    if len(dims) != len(shape):
        return False
    for d, a in zip(dims, shape, strict=True):
        if isinstance(a, _Cut):
            if a.cut >= size or (d + a.cut) % size or (not isinstance(a.base, _Merged) and d + a.cut != size):
                return False
        elif isinstance(a, _Merged):
            if d % size:
                return False
        elif (_is_t(a) and d != size) or (type(a) is int and d != a):
            return False
    return True


class _Masked:
    """What _evaluate needs for a masked run: the plan, the true length and the padded length."""

    def __init__(self, plan: _Plan, ctx: _Ctx) -> None:
        self.plan, self.ctx = plan, ctx

    def input(self, loss: str, key: str, arr: Array) -> Array:
        if arr.ndim == 0:
            return arr
        if arr.shape[0] != self.ctx.size:
            raise ValueError(
                f"custom loss {loss!r} input {key!r} has {arr.shape[0]} positions along T, logprobs has "
                f"{self.ctx.size}: pad every input with T to the same length"
            )
        return _repad(self.ctx, arr, 0)

    def run(self, i: int, step: _Step, args: Any, kwargs: Any) -> Any:
        value, runner = self.plan[i]
        if runner is None:
            out = step.fn(*args, **kwargs)
        else:
            bound = _SIGNATURES[id(step.fn)].bind(*args, **kwargs)
            bound.apply_defaults()
            out = runner(self.ctx, step.fn, bound)
        # Shapes are static: while tracing, check the analysis against what the op really returned.
        parts = [(value, out)]
        if isinstance(value, _PairOf):
            if not isinstance(out, _MinMax):
                raise ValueError(f"masked run expected (values, indices), got {type(out).__name__}")
            parts = [(value.values, out.values), (value.indices, out.indices)]
        for abstract, got in parts:
            if isinstance(abstract, _ByLength) and np.ndim(got) != 0:
                raise ValueError(f"masked run expected a number, got shape {np.shape(got)}")
            if isinstance(abstract, (_Val, _ShapeOf)) and abstract.shape is not None:
                dims = tuple(got) if isinstance(abstract, _ShapeOf) else np.shape(got)
                if not _shape_agrees(dims, abstract.shape, self.ctx.size):
                    raise ValueError(f"masked run expected shape {abstract.shape}, got {dims}")
        return out


def compile_masked(name: str, inputs: Sequence[Any], nodes: Sequence[Any]) -> MaskedLossFn | None:
    """The loss of :func:`compile_graph` on arrays padded along T: ``g(length, logprobs, *inputs)``.

    ``length`` is the datum's true T (an int scalar, may be traced); ``logprobs`` and every input of rank
    >= 1 have their T axis (axis 0) padded to the same ``L >= length >= 1`` (edge padding is expected, but
    any padding works: inputs are re-padded on entry); rank-0 inputs are scalars. ``(loss, metrics)`` equal
    the exact function's on the unpadded arrays (to float rounding, reductions may sum in another order),
    ``jax.grad`` with respect to ``logprobs`` equals the exact gradient on the first ``length`` positions
    and is exactly zero on the padded ones; ``g`` works under ``jax.jit``, ``jax.vmap`` (with a per-datum
    ``length``) and ``jax.grad``, so one program serves every length of a bucket and a whole batch.

    Returns None when the graph uses anything whose padded result could differ from the exact one (the
    caller then runs the exact function per length): slicing T other than by literal ``[a:-b]`` (at most
    8 positions in all; then ``L`` must be longer than that), indexing T other than at 0 and -1 (-1 is read
    at the true last position), matrix products, reshapes other than a T-leading flatten, T broadcast
    against another axis, two T axes in one value, dims or sizes that are not literals in ops on values with
    T, and the size of T used other than in arithmetic (``x.sum() / x.shape[0]`` is exact: the size read is
    the true length). Raises
    ``ValueError`` for graphs that :func:`compile_graph` refuses.
    """
    graph = _parse(name, inputs, nodes)
    plan = _analyze(graph)[0]
    if plan is None:
        return None
    most_cut = max((d.cut for value, _ in plan for d in _dims(value) if isinstance(d, _Cut)), default=0)

    def masked_loss(length: Any, logprobs: Any, *inputs: Any) -> tuple[Array, dict[str, Array]]:
        n = jnp.asarray(length)
        if n.ndim != 0 or not jnp.issubdtype(n.dtype, jnp.integer):
            raise ValueError(
                f"custom loss {graph.loss!r} length must be an int scalar, got {n.dtype}{n.shape}"
            )
        lp = jnp.asarray(logprobs)
        size = lp.shape[0] if lp.ndim else 1
        if size == 0:
            raise ValueError(f"custom loss {graph.loss!r} needs logprobs padded to at least one position")
        if size <= most_cut:
            raise ValueError(
                f"custom loss {graph.loss!r} slices {most_cut} positions off T: pad logprobs to more than "
                f"{most_cut} positions"
            )
        return _evaluate(graph, (lp, *inputs), _Masked(plan, _Ctx(n, size)))

    return _named(masked_loss, "masked_loss", graph.loss)
