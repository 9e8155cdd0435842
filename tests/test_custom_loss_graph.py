"""jtinker.losses.custom: torch.fx tracing in the SDK's wire form, and the graph rebuilt as JAX.

Every loss is written in torch, traced, compiled, and checked against the torch function run directly
(values, metrics, and the gradient w.r.t. logprobs from torch autograd). compile_masked's padded form is
checked the same way, on batches of datums of different lengths padded to one bucket.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jtinker.losses.custom import (
    MAX_ELEMENTS,
    SUPPORTED_ATTRIBUTES,
    SUPPORTED_FUNCTIONS,
    SUPPORTED_METHODS,
    UNMASKED_TARGETS,
    TracedLoss,
    compile_graph,
    compile_masked,
    masked_refusal,
    trace,
)

torch = pytest.importorskip("torch")
F = torch.nn.functional

T, K = 6, 4
ATOL = RTOL = 1e-5


# ------------------------------------------------------------------------------------------ inputs
def _logprobs(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return rng.uniform(-3.0, -0.05, shape).astype(np.float32)


def _normal(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return rng.normal(0.0, 1.0, shape).astype(np.float32)


def _mask(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    m = (rng.uniform(size=shape) > 0.35).astype(np.float32)
    m.flat[0], m.flat[-1] = 1.0, 0.0  # both values present
    return m


def _index(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return rng.integers(0, min(T, K), (shape[0], 1)).astype(np.int64)


def _near(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    # Replaced by logprobs + noise in make_inputs, so PPO ratios straddle the clip range.
    return rng.normal(0.0, 0.3, shape).astype(np.float32)


def _positive(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return rng.uniform(0.5, 2.0, shape).astype(np.float32)


@dataclass
class Case:
    fn: Callable
    ranks: dict[str, int]
    gens: dict[str, Callable] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return self.fn.__name__


def make_inputs(case: Case, seed: int = 0, length: int = T) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for name, rank in case.ranks.items():
        shape = ((), (length,), (length, K))[rank]
        gen = _logprobs if name == "logprobs" else case.gens.get(name, _normal)
        value = gen(rng, shape)
        if gen is _near:
            value = (out[0] + value).astype(np.float32)
        out.append(value)
    return out


# ------------------------------------------------------------------------------- realistic losses
def ppo_loss(logprobs, sampling_logprobs, advantages):
    ratio = torch.exp(logprobs - sampling_logprobs)
    clipped = torch.clamp(ratio, min=0.8, max=1.2)
    objective = torch.minimum(ratio * advantages, clipped * advantages)
    return -objective.sum(), {
        "custom/clip_frac:mean": (ratio != clipped).float().mean(),
        "custom/ratio:mean": ratio.mean().detach(),
        "custom/tokens:sum": torch.ones_like(ratio).sum(),
    }


def importance_sampling_loss(logprobs, sampling_logprobs, advantages):
    ratio = (logprobs - sampling_logprobs).exp()
    return -(ratio * advantages).sum(), {"custom/kl_sample_train:mean": (sampling_logprobs - logprobs).mean()}


def dpo_like_loss(logprobs, ref_logprob_sum, beta, sign):
    margin = beta * (logprobs.sum() - ref_logprob_sum)
    loss = -F.logsigmoid(sign * margin)
    return loss, {"custom/reward:mean": margin.detach(), "custom/accuracy:mean": (sign * margin > 0).float()}


def kl_penalty_loss(logprobs, ref_logprobs, mask, advantages):
    log_ratio = ref_logprobs - logprobs
    kl = torch.exp(log_ratio) - log_ratio - 1  # the k3 estimator
    n = mask.sum().clamp_min(1.0)
    policy = -(logprobs * advantages * mask).sum() / n
    entropy = -(logprobs.exp() * logprobs * mask).sum()
    loss = policy + 0.1 * (kl * mask).sum() / n - 0.01 * entropy
    return loss, {"custom/kl:mean": (kl * mask).sum() / n, "custom/entropy:sum": entropy.detach()}


def multi_target_loss(logprobs, weights):
    logp = logprobs - torch.logsumexp(logprobs, dim=-1, keepdim=True)
    best = logp.max(dim=-1)
    ce = -(weights * logp).sum(dim=1)
    loss = ce.mean() + 0.1 * F.softplus(-3.0 * best.values - 2.0, beta=2.0, threshold=1.0).sum()
    return loss, {
        "custom/top1:mean": (best.indices == 0).float().mean(),
        "custom/max_logp:sum": best[0].sum(),
    }


def shifted_token_loss(logprobs, advantages, mask):
    n = logprobs.shape[0]
    cur, prev = logprobs[1:], logprobs[:-1]
    delta = torch.where(advantages[1:] > 0, cur - prev, (cur - prev) * 0.5)
    valid = mask[1:] > 0.5
    delta = delta.masked_fill(~valid, 0.0)
    even = logprobs[::2].sum() + logprobs[..., None][-1, 0]
    loss = -delta.sum() / n - F.logsigmoid(even) + torch.clamp(logprobs, -2.0, -0.5).sum()
    return loss, {"custom/valid:sum": valid.float().sum(), "custom/len:mean": torch.full_like(logprobs[0], n)}


REALISTIC = [
    Case(ppo_loss, {"logprobs": 1, "sampling_logprobs": 1, "advantages": 1}, {"sampling_logprobs": _near}),
    Case(
        importance_sampling_loss,
        {"logprobs": 1, "sampling_logprobs": 1, "advantages": 1},
        {"sampling_logprobs": _near},
    ),
    Case(dpo_like_loss, {"logprobs": 1, "ref_logprob_sum": 0, "beta": 0, "sign": 0}, {"beta": _positive}),
    Case(
        kl_penalty_loss,
        {"logprobs": 1, "ref_logprobs": 1, "mask": 1, "advantages": 1},
        {"ref_logprobs": _near, "mask": _mask},
    ),
    Case(multi_target_loss, {"logprobs": 2, "weights": 2}, {"weights": _positive}),
    Case(shifted_token_loss, {"logprobs": 1, "advantages": 1, "mask": 1}, {"mask": _mask}),
]


# ------------------------------------------------------------------------- one case per op family
def _pw(t):
    """Position-weighted sum: tells a transposed or reordered tensor from the right one."""
    flat = t.flatten()
    return (flat * torch.ones_like(flat).cumsum(0)).sum()


def unary_functions(logprobs):
    x, p = logprobs, -logprobs
    y = (
        torch.exp(x)
        + torch.log(p)
        + torch.log1p(p)
        + torch.expm1(x)
        + torch.sqrt(p)
        + torch.rsqrt(p)
        + torch.square(x)
        + torch.abs(x + 1)
        + torch.neg(x)
        + torch.sign(x + 1) * x
        + torch.sigmoid(x)
        + torch.tanh(x)
        + torch.relu(x + 1)
        + torch.special.expit(2 * x)
        + F.relu(x + 1.5)
        + F.logsigmoid(x)
        + F.softplus(x)
        + F.softplus(3 * x + 2, beta=2.0, threshold=1.0)
    )
    return _pw(y), {}


def unary_methods(logprobs):
    x, p = logprobs, -logprobs
    y = (
        x.exp()
        + p.log()
        + p.log1p()
        + x.expm1()
        + p.sqrt()
        + p.rsqrt()
        + x.square()
        + (x + 1).abs()
        + x.neg()
        + (x + 1).sign() * x
        + x.sigmoid()
        + x.tanh()
        + (x + 1).relu()
    )
    return _pw(y), {}


def python_operators(logprobs, other):
    a, b = logprobs, other
    y = (a + b) - a * 2.0 + a / (abs(b) + 1) + (+a) + (-a) + a**2 + 2**a + (a @ b) + 1 - b
    keep = ((a > -1) & (b < 0.5)) | (a >= b) | (a <= -2.5) | (a == b) | ~(a != a)
    metrics = {"custom/floordiv:sum": (a // 0.5).sum(), "custom/kept:sum": keep.float().sum()}
    return _pw(torch.where(keep, y, 0.0)) + a.sum() / a.shape[0], metrics


def reductions(logprobs):
    x = logprobs
    terms = [
        x.sum(),
        x.sum(-1).max(),
        torch.sum(x, dim=(0, 1)),
        _pw(x.sum(dim=0, keepdim=True)),
        x.sum(dtype=torch.float32),
        x.mean(),
        _pw(torch.mean(x, 1)),
        _pw(x.prod(dim=1)),
        torch.prod(x[0]),
        x.std(),
        _pw(x.std(dim=0)),
        _pw(torch.std(x, dim=1, correction=0)),
        x.var(unbiased=False),
        _pw(torch.var(x, 0, True, True)),
        x.amax(),
        _pw(torch.amax(x, dim=-1)),
        _pw(x.amin(dim=0)),
        torch.amin(x),
        x.max(),
        torch.min(x),
        _pw(x.logsumexp(dim=1)),
        torch.logsumexp(x, dim=(0, 1)),
        _pw(x.cumsum(dim=0)),
        _pw(torch.cumsum(x, 1)),
    ]
    return _pw(torch.stack(terms)), {"custom/count:sum": torch.count_nonzero(x > -1).float()}


def max_min_dim(logprobs, other):
    x = logprobs
    r = x.max(dim=1)
    s = torch.min(x, 0)
    u = x.min(dim=-1, keepdim=True)
    loss = (
        _pw(r[0]) + _pw(r.values) + _pw(s.values) + _pw(u[0]) + _pw(torch.max(x, other)) + _pw(x.min(other))
    )
    return loss, {
        "custom/argmax:sum": r.indices.float().sum(),
        "custom/argmin:sum": s[1].float().sum() + u.indices.float().sum(),
    }


def softmaxes(logprobs):
    x = logprobs
    y = (
        torch.softmax(x, dim=-1)
        + x.softmax(1)
        + F.softmax(x, dim=0)
        + F.softmax(x)
        + torch.log_softmax(x, 1)
        + x.log_softmax(dim=-1, dtype=torch.float32)
        + F.log_softmax(x, dim=0)
        + torch.softmax(x, 0, torch.float32)
    )
    return _pw(y * x), {}


def shapes(logprobs):
    x = logprobs
    parts = [
        x.reshape(-1),
        x.reshape(2, -1),
        torch.reshape(x, (x.shape[0] * x.shape[1],)),
        x.view(x.size(0), 2, -1),
        x.view((-1,)),
        torch.flatten(x.view(x.size(0), 2, -1), 1),
        x.flatten(1, -1),
        x.unsqueeze(0).squeeze(0),
        torch.squeeze(x[:, :1], -1),
        x.squeeze(0),
        torch.unsqueeze(x, -1),
        x.transpose(0, 1),
        torch.transpose(x, -1, -2),
        x.permute(1, 0),
        torch.permute(x, (1, 0)),
        x.t(),
        torch.t(x),
        x.T,
        x[:, :1].expand(-1, 4),
        x[0].expand(3, -1),
        torch.stack([x[0], x[1]], dim=1),
        torch.cat([x, x[:2]]),
        torch.concat([x, x], dim=1),
        x.contiguous(),
        torch.clone(x),
        x.clone(),
        x[1, ::2],
        x[[0, 2]],
        x[None, ..., 1:3],
    ]
    loss = sum(_pw(p) for p in parts) + (x * x.detach()).sum() + torch.detach(x).sum()
    metrics = {
        "custom/numel:sum": torch.full_like(x[0, 0], x.numel()) + torch.numel(x),
        "custom/dims:mean": torch.full_like(x[0, 0], x.dim() * 10 + x.ndim + x.size(1) + x.shape[-1]),
        "custom/size:sum": torch.full_like(x[0, 0], x.size()[0]),
    }
    return loss, metrics


def dtypes(logprobs, mask):
    x = logprobs
    y = (
        x.to(torch.float32)
        + x.to(x.dtype)
        + x.to(x.device)
        + x.to("cpu", torch.float32)
        + x.to(mask)
        + x.to(dtype=torch.float32)
        + x.float()
        + x.double()
        + (x > -1).long()
        + (x > -1).int()
        + (x + 1).bool()
        + mask.type_as(x)
        + torch.zeros_like(x)
        + torch.ones_like(x, dtype=torch.float32)
        + torch.full_like(x, 2.0)
        + torch.full_like(x, 3.7, dtype=torch.int64)
    )
    return _pw(y * x), {}


def masks(logprobs, mask):
    x = logprobs
    m = mask > 0.5
    y = (
        x.masked_fill(~m, 0.0)
        + torch.masked_fill(x, m, -1.0)
        + torch.where(torch.logical_and(m, x < -1), x, 2 * x)
        + torch.where(m.logical_or(x > -0.5), 0.5 * x, x)
        + torch.where(torch.logical_or(m, x < -2.0), x, 0.0)
        + x.where(torch.logical_not(m), -x)
        + x.where(m.logical_not().logical_and(x > -2.0), 3 * x)
        + x.nan_to_num()
    )
    logm = torch.log(mask)  # -inf where mask is 0
    metrics = {
        "custom/any:sum": m.any().float()
        + torch.any(m, dim=0).float()
        + torch.all(m).float()
        + m.all().float(),
        "custom/nonzero:sum": torch.count_nonzero(m).float() + m.count_nonzero().float(),
        "custom/finite:sum": torch.isfinite(logm).float().sum()
        + x.isnan().float().sum()
        + torch.isnan(x).sum(),
        "custom/inf:sum": torch.isinf(logm).float().sum()
        + logm.isinf().float().sum()
        + logm.isfinite().sum(),
        "custom/nan_to_num:sum": torch.nan_to_num(logm, neginf=-5.0).sum() + logm.isnan().sum(),
    }
    return _pw(y), metrics


def gathers(logprobs, index):
    x = logprobs
    y = torch.gather(x, 1, index).sum() + _pw(x.gather(-1, index)) + _pw(x.gather(0, index[:3]))
    return y, {}


def clamps(logprobs, lo):
    x = logprobs
    y = (
        torch.clamp(x, min=-2.0)
        + torch.clamp(x, max=-0.5)
        + torch.clamp(x, -2.0, -0.5)
        + x.clamp(lo, lo + 1)
        + torch.clip(x, min=lo)
        + x.clip(max=-1.0)
        + torch.clamp_min(x, -1.5)
        + x.clamp_max(-1.0)
        + torch.clamp_max(x, lo + 0.5)
        + torch.clamp(x, min=lo)
        + torch.minimum(x, lo)
        + x.maximum(lo)
        + x.minimum(lo * 2)
        + torch.maximum(x, lo * 2)
    )
    return _pw(y), {}


def arithmetic(logprobs, other):
    x, o, p = logprobs, other, -logprobs
    y = (
        torch.add(x, o, alpha=2.0)
        + x.add(o)
        + torch.sub(x, o, alpha=0.5)
        + x.sub(o)
        + torch.mul(x, o)
        + x.mul(2.0)
        + torch.div(x, o.abs() + 1)
        + x.div(2.0)
        + torch.pow(x, 2)
        + x.pow(3)
        + torch.pow(2.0, x)
        + p.pow(o)
        + F.mse_loss(x, o, reduction="none")
    )
    loss = _pw(y) + torch.matmul(x, o) + x.matmul(o) + F.mse_loss(x, o) + F.mse_loss(x, o, reduction="sum")
    metrics = {
        "custom/floor:sum": x.div(0.3, rounding_mode="floor").sum(),
        "custom/trunc:sum": torch.div(x, 0.3, rounding_mode="trunc").sum(),
    }
    return loss, metrics


OPS = [
    Case(unary_functions, {"logprobs": 1}),
    Case(unary_methods, {"logprobs": 1}),
    Case(python_operators, {"logprobs": 1, "other": 1}),
    Case(reductions, {"logprobs": 2}),
    Case(max_min_dim, {"logprobs": 2, "other": 2}),
    Case(softmaxes, {"logprobs": 2}),
    Case(shapes, {"logprobs": 2}),
    Case(dtypes, {"logprobs": 1, "mask": 1}, {"mask": _mask}),
    Case(masks, {"logprobs": 1, "mask": 1}, {"mask": _mask}),
    Case(gathers, {"logprobs": 2, "index": 2}, {"index": _index}),
    Case(
        clamps, {"logprobs": 1, "lo": 1}, {"lo": lambda rng, s: rng.uniform(-2.5, -1.0, s).astype(np.float32)}
    ),
    Case(arithmetic, {"logprobs": 1, "other": 1}),
]
ALL = REALISTIC + OPS


# ----------------------------------------------------------------------------------------- helpers
def torch_reference(fn: Callable, arrays: list[np.ndarray]) -> tuple[float, dict[str, float], np.ndarray]:
    tensors = [torch.from_numpy(a.copy()) for a in arrays]
    tensors[0].requires_grad_(True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Implicit dimension choice")  # F.softmax(x) in `softmaxes`
        loss, metrics = fn(*tensors)
    loss.backward()
    grad = tensors[0].grad
    grad = np.zeros_like(arrays[0]) if grad is None else grad.numpy()
    return float(loss.detach()), {k: float(v.detach()) for k, v in metrics.items()}, grad


def compiled(case: Case) -> Callable:
    traced = trace(case.fn, case.ranks)
    return compile_graph(traced.name, traced.inputs, traced.nodes)


def jax_value_and_grad(f: Callable, arrays: list[np.ndarray]):
    rest = [jnp.asarray(a) for a in arrays[1:]]
    # jit: one compile per loss is much faster than dispatching each op of a big graph eagerly.
    step = jax.jit(jax.value_and_grad(lambda lp: f(lp, *rest), has_aux=True))
    (loss, metrics), grad = step(jnp.asarray(arrays[0]))
    return loss, metrics, grad


def assert_matches_torch(case: Case, f: Callable, seed: int = 0) -> None:
    arrays = make_inputs(case, seed)
    want_loss, want_metrics, want_grad = torch_reference(case.fn, arrays)
    # assert_allclose treats NaN == NaN as equal: keep the references finite so a match means something.
    assert np.isfinite([want_loss, *want_metrics.values()]).all() and np.isfinite(want_grad).all()
    assert np.abs(want_grad).sum() > 0
    loss, metrics, grad = jax_value_and_grad(f, arrays)
    assert loss.shape == () and loss.dtype == jnp.float32
    np.testing.assert_allclose(float(loss), want_loss, atol=ATOL, rtol=RTOL)
    assert set(metrics) == set(want_metrics)
    for key, value in metrics.items():
        assert value.shape == () and value.dtype == jnp.float32, key
        np.testing.assert_allclose(float(value), want_metrics[key], atol=ATOL, rtol=RTOL, err_msg=key)
    np.testing.assert_allclose(np.asarray(grad), want_grad, atol=ATOL, rtol=RTOL)


def _graph(*body: dict, inputs: tuple[str, ...] = ("logprobs",), loss: str = "y", metrics=None) -> list[dict]:
    """A hand-written wire graph: placeholders, the body nodes, then output(loss, metrics)."""
    nodes = [{"op": "placeholder", "name": n, "target": n, "args": [], "kwargs": {}} for n in inputs]
    nodes += [{"kwargs": {}, **node} for node in body]
    out = {"tuple": [{"ref": loss}, {"dict": metrics or {}}]}
    nodes.append({"op": "output", "name": "output", "target": "output", "args": [out], "kwargs": {}})
    return nodes


def _call(name: str, target: str, *args, op: str = "call_function", **kwargs) -> dict:
    return {"op": op, "name": name, "target": target, "args": list(args), "kwargs": kwargs}


def _ref(name: str) -> dict:
    return {"ref": name}


# ------------------------------------------------------------------------- JAX matches torch directly
@pytest.mark.parametrize("case", ALL, ids=lambda c: c.id)
def test_compiled_loss_matches_torch(case: Case) -> None:
    assert_matches_torch(case, compiled(case))


@pytest.mark.parametrize("case", REALISTIC, ids=lambda c: c.id)
def test_compiled_loss_eagerly_and_under_vmap(case: Case) -> None:
    f = compiled(case)
    arrays = make_inputs(case, seed=1)
    (loss, metrics), grad = jax.value_and_grad(f, has_aux=True)(*map(jnp.asarray, arrays))
    want_loss, want_metrics, want_grad = torch_reference(case.fn, arrays)
    np.testing.assert_allclose(float(loss), want_loss, atol=ATOL, rtol=RTOL)
    for key, value in want_metrics.items():
        np.testing.assert_allclose(float(metrics[key]), value, atol=ATOL, rtol=RTOL, err_msg=key)
    np.testing.assert_allclose(np.asarray(grad), want_grad, atol=ATOL, rtol=RTOL)

    # A batch of equal-length datums under vmap gives each datum's own loss.
    batch = [make_inputs(case, seed=s) for s in (2, 3, 4)]
    stacked = [jnp.stack([b[i] for b in batch]) for i in range(len(arrays))]
    losses, _ = jax.jit(jax.vmap(f))(*stacked)
    np.testing.assert_allclose(
        np.asarray(losses), [torch_reference(case.fn, b)[0] for b in batch], atol=ATOL, rtol=RTOL
    )


def test_hand_written_targets_match_references() -> None:
    """Targets fx never records from real torch code (aliases, torch.tensor, math) still work."""
    lp = _logprobs(np.random.default_rng(5), (T,))
    x = torch.from_numpy(lp.copy())
    p = -x  # math.log and math.sqrt need positive values
    cases = [
        (_call("a", "torch.nn.functional.sigmoid", _ref("logprobs")), torch.sigmoid(x)),
        (_call("a", "torch.nn.functional.tanh", _ref("logprobs")), torch.tanh(x)),
        (_call("a", "torch.tensor", 2.5), torch.tensor(2.5)),
        (_call("a", "torch.tensor", [1, 2, 3], dtype={"dtype": "float32"}), torch.tensor([1.0, 2.0, 3.0])),
        (_call("a", "math.log", 8.0, 2.0), torch.tensor(3.0)),
        (_call("a", "math.log", _ref("p")), torch.log(p)),
        (_call("a", "math.exp", _ref("logprobs")), torch.exp(x)),
        (_call("a", "math.sqrt", 2.0), torch.tensor(math.sqrt(2.0))),
        (_call("a", "math.sqrt", _ref("p")), torch.sqrt(p)),
        (_call("a", "math.pow", _ref("logprobs"), 2), x**2),
        (_call("a", "math.pow", 2.0, 0.5), torch.tensor(math.sqrt(2.0))),
        (_call("a", "math.fabs", _ref("logprobs")), x.abs()),
        (_call("a", "math.exp", 1), torch.tensor(math.e)),
    ]
    for node, want in cases:
        body = [
            _call("p", "operator.neg", _ref("logprobs")),
            node,
            _call("y", "sum", _ref("a"), op="call_method"),
        ]
        f = compile_graph("hand", [("logprobs", 1)], _graph(*body))
        loss, _ = f(jnp.asarray(lp))
        assert np.isfinite(float(loss))
        np.testing.assert_allclose(float(loss), float(want.sum()), rtol=RTOL, err_msg=node["target"])

    # torch.tensor infers like torch: ints are integral (usable as an index), bools are bool (~ is not).
    body = [
        _call("a", "torch.tensor", [2, 0]),
        _call("b", "torch.tensor", True),
        _call("c", "operator.getitem", _ref("logprobs"), _ref("a")),
        _call("d", "operator.invert", _ref("b")),
        _call("y", "sum", _ref("c"), op="call_method"),
    ]
    f = compile_graph("infer", [("logprobs", 1)], _graph(*body, metrics={"custom/not_b:sum": _ref("d")}))
    loss, metrics = f(jnp.asarray(lp))
    np.testing.assert_allclose(float(loss), lp[2] + lp[0], rtol=RTOL)
    assert float(metrics["custom/not_b:sum"]) == 0.0


def test_every_supported_target_is_exercised() -> None:
    """Every allowlisted function, method and attribute is used by a traced test loss or a hand-made graph."""
    functions, methods, attributes = set(), set(), set()
    for case in ALL:
        for node in trace(case.fn, case.ranks).nodes:
            if node["op"] == "call_function":
                functions.add(node["target"])
                if node["target"] == "getattr":
                    attributes.add(node["args"][1])
            elif node["op"] == "call_method":
                methods.add(node["target"])
    functions |= {"torch.nn.functional.sigmoid", "torch.nn.functional.tanh", "torch.tensor"}
    functions |= {"math.log", "math.exp", "math.sqrt", "math.pow", "math.fabs"}
    assert SUPPORTED_FUNCTIONS - functions == set()
    assert SUPPORTED_METHODS - methods == set()
    assert SUPPORTED_ATTRIBUTES - attributes == set()


# ------------------------------------------------------------------------------ trace == the SDK's
@pytest.mark.parametrize("case", ALL, ids=lambda c: c.id)
def test_trace_matches_sdk_encoding(case: Case) -> None:
    pytest.importorskip("tinker")
    from tinker.lib.public_interfaces.custom_loss import encode_graph, trace_loss

    ours = trace(case.fn, case.ranks)
    handle = trace_loss(case.fn, case.ranks, "s")
    assert isinstance(ours, TracedLoss)
    assert ours.name == handle.name == case.fn.__name__
    assert ours.inputs == tuple((i.name, i.rank) for i in handle.inputs)
    assert list(ours.nodes) == [n.model_dump() for n in encode_graph(handle).nodes]


def _branch(logprobs):
    if logprobs.sum() > 0:
        return logprobs.sum(), {}
    return -logprobs.sum(), {}


_CAPTURED = torch.ones(T)


def _captured(logprobs):
    return (logprobs * _CAPTURED).sum(), {}


_LINEAR = torch.nn.Linear(T, 1)


def _module(logprobs):
    return _LINEAR(logprobs).sum(), {}


class _ModuleLoss(torch.nn.Module):
    """An nn.Module as the loss: its Linear submodule is traced as a call_module node."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(T, 1)
        self.__signature__ = inspect.signature(self.forward)  # what the SDK inspects for the inputs

    def forward(self, logprobs):
        return self.lin(logprobs).sum(), {}


def _item(logprobs):
    return logprobs.sum(), {"custom/x:sum": logprobs.sum().item()}


def _bad_metric(logprobs):
    return logprobs.sum(), {"loss:sum": logprobs.sum()}


def _not_tensor_metric(logprobs):
    return logprobs.sum(), {"custom/x:sum": 1.0}


def _numpy_call(logprobs):
    return torch.from_numpy(np.ones(3)).sum() + logprobs.sum(), {}


def _no_logprobs(x):
    return x.sum(), {}


def _star(logprobs, *rest):
    return logprobs.sum(), {}


def _default(logprobs, advantages=None):
    return logprobs.sum(), {}


def _plain(logprobs, advantages):
    return (logprobs * advantages).sum(), {}


def _scalar_loss(logprobs):
    return 1.0, {}


def _backward(logprobs):
    logprobs.sum().backward()
    return logprobs.sum(), {}


@pytest.mark.parametrize(
    ("fn", "ranks", "needle"),
    [
        (_branch, {"logprobs": 1}, "cannot be traced by torch.fx"),
        (_captured, {"logprobs": 1}, "captures a tensor"),
        (_module, {"logprobs": 1}, "module is not installed as a submodule"),
        (
            _ModuleLoss(),
            {"logprobs": 1},
            "_ModuleLoss calls module 'lin'; custom losses cannot use torch.nn modules",
        ),
        (_item, {"logprobs": 1}, "calls item()"),
        (_bad_metric, {"logprobs": 1}, "metric 'loss:sum' must be named custom/<name>:sum"),
        (_not_tensor_metric, {"logprobs": 1}, "metric 'custom/x:sum' must be a torch.Tensor"),
        (_numpy_call, {"logprobs": 1}, "_numpy_call captures a tensor"),
        (_plain, {"logprobs": 1}, "input_ranks must give a rank for each parameter of _plain"),
        (_plain, {"logprobs": 0, "advantages": 1}, "logprobs has rank 1"),
        (_no_logprobs, {"x": 1}, "must take logprobs as its first parameter"),
        (_star, {"logprobs": 1}, "parameter 'rest' must be a plain positional parameter"),
        (_default, {"logprobs": 1, "advantages": 1}, "parameter 'advantages' has a default"),
        (_scalar_loss, {"logprobs": 1}, "must return its loss as a torch.Tensor"),
        (_backward, {"logprobs": 1}, "calls backward()"),
    ],
    ids=lambda v: getattr(v, "__name__", type(v).__name__) if callable(v) else None,
)
def test_trace_rejects_what_the_sdk_rejects(fn, ranks, needle) -> None:
    pytest.importorskip("tinker")
    from tinker.lib.public_interfaces.custom_loss import trace_loss

    with pytest.raises(ValueError) as sdk:
        trace_loss(fn, ranks, "s")
    with pytest.raises(ValueError) as ours:
        trace(fn, ranks)
    assert str(ours.value) == str(sdk.value)
    assert str(ours.value).startswith("create_custom_loss: ")
    assert needle in str(ours.value)


def test_trace_rejects_bad_ranks() -> None:
    with pytest.raises(ValueError, match=r"input_ranks\['advantages'\] must be 0, 1 or 2"):
        trace(_plain, {"logprobs": 1, "advantages": 3})


# ------------------------------------------------------------------- compile_graph refuses bad graphs
def _base() -> tuple[list[tuple[str, int]], list[dict]]:
    traced = trace(_plain, {"logprobs": 1, "advantages": 1})
    return list(traced.inputs), copy.deepcopy(list(traced.nodes))


def _node(nodes: list[dict], name: str) -> dict:
    return next(n for n in nodes if n["name"] == name)


def _set(node_name: str, /, **fields) -> Callable[[list[dict]], None]:
    def mutate(nodes: list[dict]) -> None:
        _node(nodes, node_name).update(fields)

    return mutate


def _insert(index: int, node: dict) -> Callable[[list[dict]], None]:
    return lambda nodes: nodes.insert(index, node)


def _output(value) -> Callable[[list[dict]], None]:
    return _set("output", args=[value])


_EVAL = _call("evil", "builtins.eval", "__import__('os').system('touch PWNED')")
HOSTILE = {
    "os_system": (
        _set("mul", target="os.system", args=["touch PWNED"]),
        "'os.system' is not allowed",
    ),
    "builtins_eval": (_insert(2, _EVAL), "function 'builtins.eval' is not allowed"),
    "eval": (_set("mul", target="eval"), "function 'eval' is not allowed"),
    "posix_system": (_set("mul", target="posix.system"), "'posix.system' is not allowed"),
    "torch_load": (_set("mul", target="torch.load"), "'torch.load' is not allowed"),
    "method_item": (_set("sum_1", target="item"), "Tensor method 'item' is not allowed"),
    "method_inplace": (_set("sum_1", target="add_"), "Tensor method 'add_' is not allowed"),
    "method_dunder": (_set("sum_1", target="__class__"), "Tensor method '__class__' is not allowed"),
    "getattr_dunder": (
        _insert(2, _call("g", "getattr", _ref("logprobs"), "__class__")),
        "getattr may only read the attributes",
    ),
    "getattr_nonliteral": (
        _insert(2, _call("g", "getattr", _ref("logprobs"), _ref("advantages"))),
        "getattr may only read",
    ),
    "call_module": (_set("mul", op="call_module", target="linear"), "call_module nodes are not allowed"),
    "get_attr": (
        _set("mul", op="get_attr", target="_tensor_constant0", args=[]),
        "get_attr nodes are not allowed",
    ),
    "unknown_op": (_set("mul", op="call_python"), "unknown op 'call_python'"),
    "undefined_ref": (_set("mul", args=[_ref("logprobs"), _ref("nope")]), "refers to 'nope'"),
    "forward_ref": (_set("mul", args=[_ref("logprobs"), _ref("sum_1")]), "refers to 'sum_1'"),
    "ref_not_string": (_set("mul", args=[_ref("logprobs"), {"ref": 3}]), "refers to 3"),
    "unknown_arg_kind": (_set("mul", args=[_ref("logprobs"), {"code": "1+1"}]), "malformed or unsupported"),
    "two_key_arg": (
        _set("mul", args=[_ref("logprobs"), {"ref": "logprobs", "tuple": []}]),
        "malformed argument",
    ),
    "bad_slice": (_set("mul", args=[_ref("logprobs"), {"slice": [1]}]), "malformed or unsupported"),
    "slice_of_floats": (_set("mul", args=[_ref("logprobs"), {"slice": [0.5, None, None]}]), "slice bounds"),
    "bad_float": (_set("mul", args=[_ref("logprobs"), {"float": "1e400"}]), "malformed or unsupported"),
    "bad_dtype": (_set("mul", args=[_ref("logprobs"), {"dtype": "complex64"}]), "malformed or unsupported"),
    "huge_int": (_set("mul", args=[_ref("logprobs"), 10**30]), "does not fit in 64 bits"),
    "tuple_arg": (_set("mul", args=[_ref("logprobs"), (1, 2)]), "malformed argument"),
    "deep_args": (_set("mul", args=[_ref("logprobs"), [[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]), "nest deeper"),
    "bad_kwarg": (_set("sum_1", kwargs={"out": _ref("mul")}), "bad arguments"),
    "too_many_args": (_set("mul", args=[_ref("logprobs"), 1, 2]), "bad arguments"),
    "method_without_self": (_set("sum_1", args=[]), "needs the tensor it is called on"),
    "extra_field": (_set("mul", code="print(1)"), "unknown fields ['code']"),
    "name_not_identifier": (_set("mul", name="a b"), "name must be an identifier"),
    "duplicate_name": (_set("sum_1", name="mul"), "duplicate node name"),
    "placeholder_swapped": (
        lambda nodes: nodes.__setitem__(slice(0, 2), [nodes[1], nodes[0]]),
        "placeholder 0 must be input 'logprobs'",
    ),
    "placeholder_missing": (
        lambda nodes: nodes.pop(1),
        "node 1 must be the placeholder for input 'advantages'",
    ),
    "placeholder_extra": (
        _insert(2, {"op": "placeholder", "name": "extra", "target": "extra", "args": [], "kwargs": {}}),
        "placeholder 2 must be no more placeholders",
    ),
    "placeholder_default": (_set("advantages", args=[1.0]), "placeholders take no arguments"),
    "no_output": (lambda nodes: nodes.pop(), "has no output node"),
    "node_after_output": (
        lambda nodes: nodes.append(_call("late", "torch.exp", _ref("mul"))),
        "after the output",
    ),
    "output_not_pair": (_output(_ref("sum_1")), "must return (loss, metrics)"),
    "output_loss_constant": (_output({"tuple": [1.0, {"dict": {}}]}), "loss must be a tensor computed"),
    "output_metrics_list": (_output({"tuple": [_ref("sum_1"), []]}), "metrics must be a dict"),
    "output_bad_metric_key": (
        _output({"tuple": [_ref("sum_1"), {"dict": {"Custom/X:sum": _ref("sum_1")}}]}),
        "metric 'Custom/X:sum' must be named",
    ),
    "output_metric_constant": (
        _output({"tuple": [_ref("sum_1"), {"dict": {"custom/x:sum": 1.0}}]}),
        "metric 'custom/x:sum' must be a tensor",
    ),
    "node_not_object": (lambda nodes: nodes.insert(2, "torch.exp"), "node 2 must be an object"),
}


def _replace_strings(value, old: str, new: str):
    if isinstance(value, str):
        return value.replace(old, new)
    if isinstance(value, (list, tuple)):
        return type(value)(_replace_strings(v, old, new) for v in value)
    if isinstance(value, dict):
        return {k: _replace_strings(v, old, new) for k, v in value.items()}
    return value


@pytest.mark.parametrize("mutation", HOSTILE.values(), ids=HOSTILE.keys())
def test_compile_graph_rejects(mutation, tmp_path) -> None:
    mutate, needle = mutation
    inputs, nodes = _base()
    compile_graph("ok", inputs, nodes)  # the unmutated graph compiles
    mutate(nodes)
    # Payloads that would create a file if anything in the graph were ever evaluated.
    pwned = tmp_path / "pwned"
    nodes = _replace_strings(nodes, "PWNED", str(pwned))
    with pytest.raises(ValueError, match="custom loss 'plain'") as err:
        compile_graph("plain", inputs, nodes)
    assert needle in str(err.value)
    assert not pwned.exists()


def test_compile_graph_error_names_node_and_target() -> None:
    inputs, nodes = _base()
    _set("mul", target="os.system")(nodes)
    with pytest.raises(ValueError) as err:
        compile_graph("plain", inputs, nodes)
    assert str(err.value).startswith("custom loss 'plain' node 'mul' (call_function 'os.system'): ")


@pytest.mark.parametrize(
    ("inputs", "needle"),
    [
        ([("advantages", 1), ("logprobs", 1)], "the first input must be logprobs"),
        ([("logprobs", 0), ("advantages", 1)], "the first input must be logprobs"),
        ([("logprobs", 1), ("advantages", 3)], "rank must be 0, 1 or 2"),
        ([("logprobs", 1), ("Advantages", 1)], "must be a lowercase name"),
        ([("logprobs", 1), ("logprobs", 1)], "input names repeat"),
        ([("logprobs", 1)], "placeholder 1 must be no more placeholders"),
        ([("logprobs", 1), ("weights", 1)], "placeholder 1 must be input 'weights'"),
    ],
)
def test_compile_graph_rejects_inputs_not_matching_placeholders(inputs, needle) -> None:
    nodes = _base()[1]
    with pytest.raises(ValueError, match="custom loss 'plain'") as err:
        compile_graph("plain", inputs, nodes)
    assert needle in str(err.value)


def test_compile_graph_accepts_sdk_models() -> None:
    tinker = pytest.importorskip("tinker")
    traced = trace(_plain, {"logprobs": 1, "advantages": 1})
    graph = tinker.types.CustomLossGraph.model_validate({"nodes": list(traced.nodes)})
    inputs = [tinker.types.CustomLossInput(name=n, rank=r) for n, r in traced.inputs]
    f = compile_graph(traced.name, inputs, graph.nodes)
    loss, _ = f(jnp.arange(3.0), jnp.ones(3))
    assert float(loss) == 3.0


# ------------------------------------------------------------------------------ call-time checks
def _vector_loss(logprobs):
    return logprobs * 2, {}


def test_non_scalar_loss_raises_at_call_time() -> None:
    # Compiling cannot know shapes; the first call (or jit trace) raises, naming the loss.
    f = compiled(Case(_vector_loss, {"logprobs": 1}))
    with pytest.raises(
        ValueError, match=r"custom loss '_vector_loss' must return a scalar tensor loss, got \(6,\)"
    ):
        f(jnp.zeros(T))
    with pytest.raises(ValueError, match="must return a scalar tensor loss"):
        jax.jit(f)(jnp.zeros(T))


def test_non_float_and_non_scalar_metrics_raise() -> None:
    body = [_call("y", "operator.gt", _ref("logprobs"), 0), _call("s", "sum", _ref("y"), op="call_method")]
    with pytest.raises(ValueError, match="must return a floating-point loss"):
        compile_graph("ints", [("logprobs", 1)], _graph(*body, loss="s"))(jnp.zeros(T))
    body = [
        _call("y", "exp", _ref("logprobs"), op="call_method"),
        _call("s", "sum", _ref("y"), op="call_method"),
    ]
    f = compile_graph("m", [("logprobs", 1)], _graph(*body, loss="s", metrics={"custom/v:sum": _ref("y")}))
    with pytest.raises(ValueError, match="metric 'custom/v:sum' must be a scalar tensor"):
        f(jnp.zeros(T))


def test_input_rank_and_count_are_checked() -> None:
    f = compiled(Case(_plain, {"logprobs": 1, "advantages": 1}))
    with pytest.raises(ValueError, match="input 'advantages' must have rank 1, got shape \\(6, 2\\)"):
        f(jnp.zeros(T), jnp.zeros((T, 2)))
    with pytest.raises(ValueError, match="takes \\['logprobs', 'advantages'\\], got 1 arrays"):
        f(jnp.zeros(T))


def test_runtime_errors_name_the_node() -> None:
    # relu(inplace=True) would mutate its input in torch; a pure rebuild cannot honour that.
    body = [
        _call("r", "torch.nn.functional.relu", _ref("logprobs"), inplace=True),
        _call("y", "sum", _ref("r"), op="call_method"),
    ]  # noqa: E501
    f = compile_graph("inplace", [("logprobs", 1)], _graph(*body))
    with pytest.raises(
        ValueError, match=r"custom loss 'inplace' node 'r' \(torch.nn.functional.relu\): .*inplace"
    ):
        f(jnp.zeros(T))
    # Python operators refuse sequences, so a graph cannot build huge lists or strings.
    body = [_call("m", "operator.mul", [0], 10**12), _call("y", "sum", _ref("logprobs"), op="call_method")]
    with pytest.raises(ValueError, match="node 'm' \\(operator.mul\\): operands must be tensors or numbers"):
        compile_graph("seq", [("logprobs", 1)], _graph(*body))(jnp.zeros(T))
    body = [_call("p", "operator.pow", 10**18, 10**18), _call("y", "sum", _ref("logprobs"), op="call_method")]
    with pytest.raises(ValueError, match="integer power .* is too large"):
        compile_graph("pow", [("logprobs", 1)], _graph(*body))(jnp.zeros(T))


def test_oversized_intermediates_are_refused_while_tracing() -> None:
    def outer(logprobs):
        return (logprobs[:, None] * logprobs[None, :]).sum(), {}

    f = compiled(Case(outer, {"logprobs": 1}))
    n = math.isqrt(MAX_ELEMENTS) + 1
    with pytest.raises(ValueError, match=f"at most {MAX_ELEMENTS}"):
        jax.eval_shape(f, jax.ShapeDtypeStruct((n,), jnp.float32))
    assert float(f(jnp.ones(3))[0]) == 9.0


# ------------------------------------------------------------------ compile_masked: padded to a bucket
BUCKET = 32
LENGTHS = (1, 5, 17, 31)

# Losses of this file that compile_masked refuses, with the reason: the exact function serves them.
MASKED_NONE = {
    "shifted_token_loss": "slicing T other than by [a:-b]",  # logprobs[::2]
    "python_operators": "node 'matmul' (operator.matmul): no masked form",  # a @ b over T
    "shapes": "node 'reshape_1' (reshape): reshape of a value with T",  # x.reshape(2, -1)
    "gathers": "slicing T other than by [a:-b]",  # index[:3]
    "arithmetic": "node 'matmul' (torch.matmul): no masked form",
}


def _pad(a: np.ndarray, n: int, fill: float | None = None) -> np.ndarray:
    """The first n rows of a, padded along axis 0 to BUCKET with its last row (or with fill)."""
    if a.ndim == 0:
        return a
    if fill is None or not np.issubdtype(a.dtype, np.floating):
        tail = np.repeat(a[n - 1 : n], BUCKET - n, axis=0)
    else:
        tail = np.full((BUCKET - n, *a.shape[1:]), fill, a.dtype)
    return np.concatenate([a[:n], tail])


def masked(case: Case) -> Callable | None:
    traced = trace(case.fn, case.ranks)
    return compile_masked(traced.name, traced.inputs, traced.nodes)


def batch_step(g: Callable, fast_compile: bool = False) -> Callable:
    # fast_compile: the same program with less LLVM optimization, ~40% less compile time for big test graphs.
    options = {"xla_backend_optimization_level": 0} if fast_compile else None
    return jax.jit(jax.vmap(jax.value_and_grad(g, argnums=1, has_aux=True)), compiler_options=options)


def assert_masked_matches_torch(
    case: Case, g: Callable, lengths=LENGTHS, seed: int = 0, fast_compile: bool = True
) -> None:
    """One jitted, vmapped call on datums of different lengths equals torch on each unpadded datum."""
    datums = [make_inputs(case, seed + i, length=n) for i, n in enumerate(lengths)]
    step = batch_step(g, fast_compile)

    def run(fill):
        pairs = list(zip(datums, lengths, strict=True))
        stacked = [np.stack([_pad(d[i], n, fill) for d, n in pairs]) for i in range(len(datums[0]))]
        return step(jnp.asarray(lengths, jnp.int32), *map(jnp.asarray, stacked))

    (loss, metrics), grad = run(None)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "std\\(\\): degrees of freedom")
        warnings.filterwarnings("ignore", "var\\(\\): degrees of freedom")
        references = [torch_reference(case.fn, arrays) for arrays in datums]
    for k, (n, (want_loss, want_metrics, want_grad)) in enumerate(zip(lengths, references, strict=True)):
        msg = f"{case.id} length {n}"
        np.testing.assert_allclose(float(loss[k]), want_loss, atol=ATOL, rtol=RTOL, err_msg=msg)
        assert set(metrics) == set(want_metrics)
        for key, value in metrics.items():
            np.testing.assert_allclose(
                float(value[k]), want_metrics[key], atol=ATOL, rtol=RTOL, err_msg=f"{msg} {key}"
            )
        np.testing.assert_allclose(np.asarray(grad[k][:n]), want_grad, atol=ATOL, rtol=RTOL, err_msg=msg)
        assert np.all(np.asarray(grad[k][n:]) == 0), msg  # padded positions: exactly zero

    # Padding with NaN instead of the last row changes nothing: inputs are re-padded on entry.
    (loss2, metrics2), grad2 = run(np.nan)
    np.testing.assert_array_equal(np.asarray(loss2), np.asarray(loss))
    for key in metrics:
        np.testing.assert_array_equal(np.asarray(metrics2[key]), np.asarray(metrics[key]))
    np.testing.assert_array_equal(np.asarray(grad2), np.asarray(grad))


@pytest.mark.parametrize("case", ALL, ids=lambda c: c.id)
def test_masked_matches_exact_on_padded_batches(case: Case) -> None:
    traced = trace(case.fn, case.ranks)
    g = compile_masked(traced.name, traced.inputs, traced.nodes)
    if case.id in MASKED_NONE:
        assert g is None
        assert MASKED_NONE[case.id] in masked_refusal(traced.name, traced.inputs, traced.nodes)
        return
    assert g is not None, masked_refusal(traced.name, traced.inputs, traced.nodes)
    assert masked_refusal(traced.name, traced.inputs, traced.nodes) is None
    assert_masked_matches_torch(case, g, fast_compile=case not in REALISTIC)


def test_masked_covers_the_common_rl_losses() -> None:
    common = {"ppo_loss", "importance_sampling_loss", "dpo_like_loss", "kl_penalty_loss", "multi_target_loss"}
    assert common <= {c.id for c in ALL} - set(MASKED_NONE)
    assert {"matmul", "operator.matmul", "torch.matmul"} == UNMASKED_TARGETS


def test_masked_equals_compile_graph_and_compiles_once() -> None:
    """Against the exact JAX function itself, and one program for every length of the bucket."""
    case = REALISTIC[0]
    traced = trace(case.fn, case.ranks)
    f = compile_graph(traced.name, traced.inputs, traced.nodes)
    g = compile_masked(traced.name, traced.inputs, traced.nodes)
    traces = []

    def counted(*args):
        traces.append(1)
        return g(*args)

    step = jax.jit(jax.value_and_grad(counted, argnums=1, has_aux=True))
    for n in (3, 32):
        arrays = make_inputs(case, seed=n, length=n)
        (want, want_metrics), want_grad = jax.jit(jax.value_and_grad(f, has_aux=True))(*arrays)
        (loss, metrics), grad = step(jnp.int32(n), *(jnp.asarray(_pad(a, n)) for a in arrays))
        np.testing.assert_allclose(float(loss), float(want), rtol=1e-6, atol=1e-6)
        for key, value in want_metrics.items():
            np.testing.assert_allclose(float(metrics[key]), float(value), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(np.asarray(grad[:n]), np.asarray(want_grad), rtol=1e-6, atol=1e-6)
    assert len(traces) == 1


# One loss per masked rule family; metrics name each rule, so a failure points at it.
def reductions_over_t(logprobs, flag):
    x, p, m = logprobs, torch.exp(0.1 * logprobs), flag > 0.5
    values = {
        "sum": x.sum(),
        "sum_dim": torch.sum(x, dim=0),
        "sum_keep": x.sum(0, keepdim=True)[0],
        "mean": x.mean(),
        "mean_dim": torch.mean(x, -1),
        "max": x.max(),
        "min": torch.min(x),
        "amax": x.amax(),
        "amin": torch.amin(x, dim=0),
        "lse": torch.logsumexp(x, 0),
        "prod": p.prod(),
        "var0": torch.var(x, 0, False, True)[0],
        "max_dim": x.max(dim=0).values,
        "min_dim_keep": torch.min(x, 0, keepdim=True)[0][0],
        "mse_mean": F.mse_loss(x, p),
        "mse_sum": F.mse_loss(p, x, reduction="sum"),
    }
    loss = sum(v * (i + 1) for i, v in enumerate(values.values()))
    metrics = {f"custom/{k}:sum": v.detach() for k, v in values.items()}
    metrics |= {
        # At length 1: 0 and NaN as in torch; kept out of the loss, whose gradient at sqrt(0) is NaN in JAX.
        "custom/std0:sum": x.std(correction=0),
        "custom/std:sum": x.std(),
        "custom/var:sum": torch.var(x, dim=0),
        "custom/any:sum": m.any().float() + torch.any(x > 0).float(),
        "custom/all:sum": torch.all(m).float() + (x < 0).all(dim=0).float(),
        "custom/count:sum": torch.count_nonzero(m).float() + m.count_nonzero(dim=0).float(),
        "custom/argmax:sum": x.max(dim=0).indices.float(),
        "custom/argmin:sum": torch.min(x, 0, keepdim=True)[1].float().sum(),
    }
    return loss, metrics


def reductions_over_t_and_k(logprobs, flag, w):
    x, p, m, wk = logprobs, torch.exp(0.1 * logprobs), flag > 0.5, w.sum(0)
    scalars = [
        x.sum((0, 1)),
        x.sum(dim=[]),
        x.mean(),
        x.amax((0, 1)),
        x.amin(),
        torch.logsumexp(x, (0, 1)),
        p.prod(),
        x.var((0, 1), correction=0),
        x.min(),
    ]
    over_t = [  # [K] or [1, K]: no T left
        x.sum(0),
        x.sum(0, keepdim=True),
        x.mean(0),
        x.amax(0),
        x.amin(0, keepdim=True),
        torch.logsumexp(x, 0),
        p.prod(0),
        x.var(0, keepdim=True, unbiased=False),
        x.max(0).values,
        x.min(0)[0],
        x.T.sum(1),
        x.T.max(1).values,
    ]
    over_k = [x.sum(1), x.mean(1), x.amax(1), x.std(1), x.max(1).values]  # [T]
    over_k_keep = [x.sum(1, keepdim=True), x.mean(1, keepdim=True), x.logsumexp(1, keepdim=True)]  # [T, 1]
    over_k_keep += [p.prod(1, keepdim=True), x.max(1, keepdim=True).values]
    loss = sum(v * (i + 1) for i, v in enumerate(scalars)) + sum((v * wk).sum() for v in over_t)
    loss = loss + sum((v * w[:, 0]).sum() for v in over_k) + sum((v * w[:, :1]).sum() for v in over_k_keep)
    metrics = {
        "custom/argmax_t:sum": (x.max(0).indices.float() * wk).sum(),
        "custom/argmin_t_keep:sum": (x.min(0, keepdim=True).indices.float() * wk).sum(),
        "custom/argmax_k:sum": (x.max(1).indices.float() * w[:, 0]).sum(),
        "custom/argmax_t_of_t:sum": (x.T.max(1).indices.float() * wk).sum(),
        "custom/std_t:sum": ((x.std(0) + x.std(0, correction=0)) * wk).sum(),  # NaN at length 1, as in torch
        "custom/any:sum": (m.any(0).float() * wk).sum()
        + (m.any(1).float() * w[:, 0]).sum()
        + m.any().float(),
        "custom/all:sum": (m.all(0).float() * wk).sum()
        + (m.all(1, keepdim=True).float() * w[:, :1]).sum()
        + m.all().float(),
        "custom/count:sum": (torch.count_nonzero(m, 0).float() * wk).sum()
        + (m.count_nonzero(1).float() * w[:, 0]).sum()
        + torch.count_nonzero(m, (0, 1)).float(),
    }
    return loss, metrics


def softmax_over_t(logprobs, other):
    x = logprobs
    rows = [
        torch.softmax(x, 0),
        x.log_softmax(0),
        F.log_softmax(x, dim=0, dtype=torch.float32),
        x.softmax(-1),
        x.log_softmax(1),
        x.T.softmax(1).T,
        F.softmax(x),  # the legacy implicit dim: 1 for rank 2
    ]
    vectors = [F.softmax(x[:, 0], dim=0) * 3, torch.log_softmax(x[:, 1], -1), F.softmax(x[:, 2])]
    loss = sum((v * other).sum() for v in rows) + sum((v * other[:, 0]).sum() for v in vectors)
    return loss, {"custom/lsm_t_max:sum": x.log_softmax(0).amax(), "custom/sm_t:sum": _pw(x.softmax(0))}


def cumsum_over_t(logprobs, other):
    x = logprobs
    c, ck = torch.cumsum(x, dim=0), x.cumsum(1)
    c1 = x[:, 0].cumsum(0)
    loss = (c * other).sum() + c.amax() + c1.max() + (c1 * x[:, 1]).mean()
    loss = (
        loss + torch.cumsum(x.exp(), 0).logsumexp(0).sum() + (ck * other).sum() + x.flatten().cumsum(0).min()
    )
    return loss, {"custom/last:sum": c1.max(dim=0)[1].float(), "custom/pw:sum": _pw(c)}


def shapes_keeping_t(logprobs, index):
    x = logprobs
    parts = [
        x[:, 0],
        x[..., 1],
        x[:, 1:],
        x[:, None, 2],
        x[:, -1],
        x[..., None],
        x[:, 1:3:2],
        x[0:, :2],
        x.unsqueeze(1).squeeze(1),
        x.unsqueeze(0).squeeze(0),
        torch.squeeze(x.sum(1, keepdim=True), -1),
        x[:, :1].expand(-1, 3),
        torch.stack([x[:, 0], x[:, 1]], dim=1),
        torch.cat([x, x[:, :2]], dim=1),
        x.gather(1, index),
        torch.gather(x, -1, index.expand(-1, 2)),
        x.flatten(),
        x.reshape(-1),
        x.view(-1),
        x.flatten(1),
        x.unsqueeze(-1).flatten(1),
        x[:, :1] * x,
        x.contiguous().clone().detach() * x,
    ]
    # T second: flattening those would merge T after K (refused), so they are turned back first.
    moved = [
        x.T,
        x.t(),
        x.transpose(0, 1),
        torch.permute(x, (1, 0)),
        torch.stack([x[:, 0], x[:, 1]]),
        x[:, 0].expand(2, -1),
    ]
    loss = sum(_pw(p) for p in parts) + sum(_pw(m.T) for m in moved) + x.flatten().softmax(0).max()
    loss = loss + x.reshape(-1).amax()
    loss = loss + x.sum() / x.size(-1) + x.shape[-1] * x.mean() + x.dim() + x.ndim + x.size()[1]
    return loss, {"custom/flat_argmax:sum": torch.max(x.flatten(), 0).indices.float()}


def scalar_broadcast(logprobs, beta, bias):
    x = logprobs
    y = x * beta + bias
    z = torch.where(x > bias, x, beta)
    loss = (y.sum(1) * beta).mean() + z.mean() + torch.clamp(x, min=bias).sum() + (x - bias).pow(2).amax()
    loss = loss + F.mse_loss(x, torch.full_like(x, 1.0) * bias) + F.softplus(x * beta).sum()
    return loss, {"custom/margin:mean": (x.sum() - bias).detach()}


def sizes_of_t(logprobs, weights):
    # The size of T read as shape, size(dim), numel and through a flatten, in arithmetic: the true length.
    x = logprobs
    n, k = x.shape
    flat = x.flatten()
    loss = -(x * weights).sum() / n + x.sum() / x.numel() + flat.sum() / flat.shape[0] * 0.5
    loss = loss + x.mean() / math.sqrt(x.size(0)) - (n - 1) / (n + 2) * x.sum(1).mean() + abs(-n) // 2 * 0.01
    loss = loss + (x.sum(0) * (n > 3)).sum() / n / k + math.log(n + 1) * x.amax() - (n * 0.5 - n) * x.mean()
    zero = x.sum().detach() * 0
    return loss, {"custom/tokens:sum": zero + n, "custom/long:mean": zero + (n >= 8)}


def ends_of_t(logprobs, advantages, weights):
    # T indexed at 0 (always valid) and at -1 (read at the true last position, not the padded one).
    x, a = logprobs, advantages[0]  # a per-sequence advantage, repeated along T
    loss = -(x.sum(1) * a).sum() + x[-1].sum() * 2 + x[0, 1] - x[-1, -1] * 0.5
    loss = loss + (x * weights)[:, None][-1].sum()
    loss = loss + x.flatten()[-1] + x.flatten()[0] + x[..., 0][-1] + x.T[:, -1].sum() + x.cumsum(0)[-1].mean()
    return loss, {"custom/last:mean": x[-1].mean().detach(), "custom/first:sum": x[0][0]}


MASKED_RULES = [
    Case(reductions_over_t, {"logprobs": 1, "flag": 1}, {"flag": _mask}),
    Case(reductions_over_t_and_k, {"logprobs": 2, "flag": 2, "w": 2}, {"flag": _mask}),
    Case(softmax_over_t, {"logprobs": 2, "other": 2}),
    Case(cumsum_over_t, {"logprobs": 2, "other": 2}),
    Case(shapes_keeping_t, {"logprobs": 2, "index": 2}, {"index": _index}),
    Case(scalar_broadcast, {"logprobs": 2, "beta": 0, "bias": 0}, {"beta": _positive}),
    Case(sizes_of_t, {"logprobs": 2, "weights": 2}),
    Case(ends_of_t, {"logprobs": 2, "advantages": 1, "weights": 2}),
]


@pytest.mark.parametrize("case", MASKED_RULES, ids=lambda c: c.id)
def test_masked_rules(case: Case) -> None:
    g = masked(case)
    assert g is not None, masked_refusal(*dataclasses.astuple(trace(case.fn, case.ranks)))
    assert_masked_matches_torch(case, g)


def slices_of_t(logprobs, advantages, mask):
    # T cut by literal slices at either end: shifted differences, a window, their sizes and last entries.
    x = logprobs
    cur, prev = x[1:], x[:-1]
    delta = torch.where(advantages[1:, None] > 0, cur - prev, (cur - prev) * 0.5)
    delta = delta.masked_fill(~(mask[1:, None] > 0.5), 0.0)
    window = x[2:-1][1:]
    loss = -delta.sum() / x.shape[0] + window.exp().sum() / window.size(0) + cur[-1].sum() + prev[0].sum()
    loss = loss + cur.softmax(0)[-1].sum() + prev.cumsum(0)[-1].mean() + cur.amax(0).sum() + prev[:, 1:].std()
    weights = torch.ones_like(cur).cumsum(1)  # position weights along K (flattening a slice of T falls back)
    loss = loss + (torch.stack([cur, prev]).sum(0) * weights).sum() + (cur.T * weights.T).sum()
    loss = loss + delta.sum(1).flatten().sum()
    return loss, {"custom/steps:sum": torch.full_like(x[0, 0], prev.shape[0]), "custom/d:mean": delta.mean()}


def test_masked_slices_of_t() -> None:
    """Literal slices of T keep the padded form: lengths the slices leave non-empty, against torch."""
    case = Case(slices_of_t, {"logprobs": 2, "advantages": 1, "mask": 1}, {"mask": _mask})
    g = masked(case)
    assert g is not None, masked_refusal(*dataclasses.astuple(trace(case.fn, case.ranks)))
    assert_masked_matches_torch(case, g, lengths=(5, 9, 17, 32))
    with pytest.raises(ValueError, match="slices 4 positions off T: pad logprobs to more than 4 positions"):
        g(3, jnp.zeros((4, 2)), jnp.zeros(4), jnp.zeros(4))


def test_masked_extreme_ties_at_the_identity() -> None:
    """max over T of all -inf: the gradient is shared by the valid entries only, as in the exact run."""
    body = [
        _call("a", "amax", _ref("logprobs"), op="call_method"),
        _call("b", "max", _ref("logprobs"), op="call_method"),
        _call("y", "operator.add", _ref("a"), _ref("b")),
    ]
    nodes = _graph(*body)
    f, g = compile_graph("ties", [("logprobs", 1)], nodes), compile_masked("ties", [("logprobs", 1)], nodes)
    lp = np.full(3, -np.inf, np.float32)
    (want, _), want_grad = jax.value_and_grad(f, has_aux=True)(jnp.asarray(lp))
    (loss, _), grad = jax.jit(jax.value_and_grad(g, argnums=1, has_aux=True))(3, jnp.asarray(_pad(lp, 3)))
    assert float(loss) == float(want) == -np.inf
    np.testing.assert_allclose(np.asarray(grad[:3]), np.asarray(want_grad))
    np.testing.assert_allclose(np.asarray(want_grad), [2 / 3] * 3)
    assert np.all(np.asarray(grad[3:]) == 0)


def _x_rank(logprobs, w):
    return (logprobs @ w).sum(), {}


def _slice_t_step(logprobs):
    return logprobs[::2].sum(), {}


def _slice_t_window(logprobs):
    return logprobs[-3:].sum(), {}  # the last 3: where they start depends on the length


def _slice_t_empty(logprobs):
    return logprobs[:0].sum() + logprobs[1:0].sum(), {}


def _cut_too_much(logprobs):
    return logprobs[5:][:-4].sum(), {}


def _cut_merged(logprobs):
    return logprobs[1:].flatten().sum(), {}


def _cuts_misaligned(logprobs):
    return (logprobs[1:] * logprobs[2:-1]).sum(), {}


def _second(logprobs):
    return logprobs[1] + logprobs.sum(), {}  # the exact run raises for a length of 1


def _second_last(logprobs):
    return logprobs[-2], {}


def _bool_mask(logprobs, mask):
    return logprobs[mask > 0].sum(), {}


def _index_tensor(logprobs, index):
    return logprobs[index[:, 0]].sum(), {}


def _reshape_t(logprobs):
    return logprobs.reshape(2, -1).sum(), {}


def _t_against_k(logprobs, weights):
    return (logprobs * weights).sum(), {}  # [T] * [T, K]: T meets K


def _outer(logprobs):
    return (logprobs[:, None] * logprobs[None, :]).sum(), {}


def _size_pow(logprobs):
    return logprobs.sum() / logprobs.shape[0] ** 2, {}


def _size_squared(logprobs):
    return logprobs.sum() / (logprobs.shape[0] * logprobs.size(0)), {}


def _size_big_literal(logprobs):
    return logprobs.sum() / (logprobs.numel() * 4096), {}


def _size_times_size(logprobs, other):
    return logprobs.sum() / (logprobs.shape[0] * other.shape[1]), {}  # a Python int of unknown size


def _t_fills(logprobs):
    return torch.full_like(logprobs, logprobs).sum(), {}


def _size_slices(logprobs):
    return logprobs.exp()[: logprobs.shape[0]].sum(), {}


def _size_exp(logprobs):
    return logprobs.sum() * math.exp(logprobs.size(0)), {}


def _squeeze_all(logprobs):
    return logprobs.squeeze().sum(), {}


def _flatten_t_minor(logprobs):
    return _pw(logprobs.T.flatten()), {}


def _merged_with_plain(logprobs):
    return (logprobs.flatten() * logprobs[:, 0]).sum(), {}


def _cat_t(logprobs):
    return torch.cat([logprobs, logprobs]).sum(), {}


def _reduced_against_t(logprobs, other):
    return (logprobs.sum(0) + other).sum(), {}  # [K] + [T]


def _dim_not_literal(logprobs):
    return logprobs.sum(logprobs.dim() - 2).sum(), {}


def _expand_t(logprobs):
    return logprobs[:, :1].expand(3, 2).sum(), {}


def _vector_output(logprobs):
    return logprobs * 2, {}


MASKED_REFUSED = [
    (_x_rank, {"logprobs": 1, "w": 1}, "no masked form"),
    (_slice_t_step, {"logprobs": 1}, "slicing T other than by [a:-b]"),
    (_slice_t_window, {"logprobs": 1}, "slicing T other than by [a:-b]"),
    (_slice_t_empty, {"logprobs": 1}, "slicing T other than by [a:-b]"),
    (_cut_too_much, {"logprobs": 1}, "slicing more than 8 positions off T"),
    (_cut_merged, {"logprobs": 2}, "a slice of T merged with other axes"),
    (_cuts_misaligned, {"logprobs": 1}, "T broadcast against another axis"),
    (_second, {"logprobs": 1}, "indexing T other than at 0 or -1"),
    (_second_last, {"logprobs": 1}, "indexing T other than at 0 or -1"),
    (_bool_mask, {"logprobs": 1, "mask": 1}, "index"),
    (_index_tensor, {"logprobs": 1, "index": 2}, "index"),
    (_reshape_t, {"logprobs": 2}, "reshape of a value with T"),
    (_t_against_k, {"logprobs": 1, "weights": 2}, "T broadcast against another axis"),
    (_outer, {"logprobs": 1}, "two T axes"),
    (_size_pow, {"logprobs": 1}, "pow of a number from the size of T"),
    (_size_squared, {"logprobs": 1}, "mul of a number from the size of T"),
    (_size_big_literal, {"logprobs": 1}, "mul of a number from the size of T"),
    (_size_times_size, {"logprobs": 1, "other": 2}, "mul of a number from the size of T"),
    (_t_fills, {"logprobs": 1}, "fill value from T"),
    (_size_slices, {"logprobs": 1}, "index slice(None, <a number from the size of T>, None)"),
    (_size_exp, {"logprobs": 1}, "exp of a number from the size of T"),
    (_squeeze_all, {"logprobs": 2}, "squeeze of an axis of unknown size"),
    (_flatten_t_minor, {"logprobs": 2}, "T merged after another axis"),
    (_merged_with_plain, {"logprobs": 2}, "T broadcast against another axis"),
    (_cat_t, {"logprobs": 1}, "cat along T"),
    (_reduced_against_t, {"logprobs": 2, "other": 1}, "T broadcast against another axis"),
    (_dim_not_literal, {"logprobs": 2}, "is not a literal int"),
    (_expand_t, {"logprobs": 2}, "expand of T to a fixed size"),
    (_vector_output, {"logprobs": 1}, "loss 'mul' has T"),
]


@pytest.mark.parametrize(
    ("fn", "ranks", "needle"), MASKED_REFUSED, ids=[c[0].__name__ for c in MASKED_REFUSED]
)
def test_masked_refuses(fn, ranks, needle) -> None:
    traced = trace(fn, ranks)
    assert compile_masked(traced.name, traced.inputs, traced.nodes) is None
    assert needle in masked_refusal(traced.name, traced.inputs, traced.nodes)
    compile_graph(traced.name, traced.inputs, traced.nodes)  # the exact function still serves it


def test_masked_checks_its_inputs() -> None:
    traced = trace(_plain, {"logprobs": 1, "advantages": 1})
    g = compile_masked(traced.name, traced.inputs, traced.nodes)
    with pytest.raises(ValueError, match="input 'advantages' has 5 positions along T, logprobs has 8"):
        g(3, jnp.zeros(8), jnp.zeros(5))
    with pytest.raises(ValueError, match="length must be an int scalar"):
        g(3.0, jnp.zeros(8), jnp.zeros(8))
    with pytest.raises(ValueError, match="input 'advantages' must have rank 1"):
        g(3, jnp.zeros(8), jnp.zeros((8, 2)))
    with pytest.raises(ValueError, match="custom loss '_plain' node 'mul' \\(call_function 'os.system'\\)"):
        nodes = copy.deepcopy(list(traced.nodes))
        _set("mul", target="os.system")(nodes)
        compile_masked(traced.name, traced.inputs, nodes)
