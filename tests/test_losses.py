"""Built-in losses and DPO against independent NumPy (analytic gradients) and torch-autograd references."""

from __future__ import annotations

import math
import typing

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jtinker.losses import (
    ALLOWED_CONFIG_KEYS,
    DEFAULT_CONFIG,
    LOSSES,
    MULTI_TARGET_LOSSES,
    REQUIRED_INPUTS,
    dpo_loss,
    resolve,
)

CONFIGS = {
    "cross_entropy": {},
    "importance_sampling": {},
    "ppo": {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2},
    "cispo": {"clip_low_threshold": 0.0, "clip_high_threshold": 4.0},
    "dro": {"beta": 0.05},
    # Wider than the paper's defaults so the random sequence ratios land inside and on both sides.
    "gspo": {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2},
}
SHAPES = {"bt": (4, 12), "btk": (3, 7, 4)}
CASES = [(n, s) for n in LOSSES for s in SHAPES if s == "bt" or n in MULTI_TARGET_LOSSES]


# ---------------------------------------------------------------------------------------------- data
def make_batch(shape: tuple[int, ...], seed: int = 0, garbage: bool = True) -> dict[str, np.ndarray]:
    """Random padded batch in float64. Real tokens: lp in [-4, 0]; ratio = exp(lp - q) spread over
    [e^-3, e^3] so it lands inside and on both sides of every clip range; advantages of both signs.
    Padding holds huge garbage that would overflow exp() if it were ever used."""
    rng = np.random.default_rng(seed)
    b, t = shape[:2]
    lengths = rng.integers(2, t, size=b)  # every row has padding and at least 2 real tokens
    mask = (np.arange(t)[None, :] < lengths[:, None]).astype(np.float64)
    lp = rng.uniform(-4.0, 0.0, shape)
    # A third of the log-ratios sit well inside PPO's [0.8, 1.2]; the rest spread over [-3, 3].
    near = rng.random(shape) < 1 / 3
    log_ratio = np.where(near, rng.uniform(-0.15, 0.15, shape), rng.uniform(-3, 3, shape))
    q = lp - log_ratio
    data = {
        "lp": lp,
        "logprobs": q,
        "advantages": rng.normal(0.0, 1.5, shape),
        "weights": rng.uniform(0.0, 2.0, shape),
        "sequence_ratio_mask": (rng.random(shape) < 0.7).astype(np.float64),
        "mask": mask,
    }
    if garbage:
        pad = np.broadcast_to(mask.reshape(mask.shape + (1,) * (len(shape) - 2)), shape) == 0
        data["lp"] = np.where(pad, 1e4, lp)
        data["logprobs"] = np.where(pad, -1e4, q)
        data["advantages"] = np.where(pad, 1e6, data["advantages"])
        data["weights"] = np.where(pad, -1e6, data["weights"])
        data["sequence_ratio_mask"] = np.where(pad, 1.0, data["sequence_ratio_mask"])
    return data


def valid_of(d: dict[str, np.ndarray]) -> np.ndarray:
    m = d["mask"] > 0
    return np.broadcast_to(m.reshape(m.shape + (1,) * (d["lp"].ndim - 2)), d["lp"].shape)


def to_jax(d: dict[str, np.ndarray]) -> tuple[jax.Array, dict[str, jax.Array]]:
    inputs = {k: jnp.asarray(v, jnp.float32) for k, v in d.items() if k != "lp"}
    return jnp.asarray(d["lp"], jnp.float32), inputs


def run(name: str, d: dict[str, np.ndarray], cfg: dict) -> tuple[float, np.ndarray, dict]:
    lp, inputs = to_jax(d)
    fn = LOSSES[name]
    (loss, metrics), grad = jax.value_and_grad(lambda x: fn(x, inputs, cfg), has_aux=True)(lp)
    return float(loss), np.asarray(grad, np.float64), {k: float(v) for k, v in metrics.items()}


# ------------------------------------------------------------- NumPy references (hand-derived gradients)
def np_reference(name: str, d: dict[str, np.ndarray], cfg: dict) -> tuple[float, np.ndarray, float]:
    """Returns (loss, dloss/dlp, clipped-token count). Only real tokens are read."""
    v = valid_of(d)
    lp = np.where(v, d["lp"], 0.0)
    q = np.where(v, d["logprobs"], 0.0)
    a = np.where(v, d["advantages"], 0.0)
    w = np.where(v, d["weights"], 0.0)
    n_clipped = 0.0
    if name == "cross_entropy":
        tok, g = -lp * w, -w
    elif name == "importance_sampling":
        r = np.exp(lp - q)
        tok, g = -r * a, -r * a  # d/dlp exp(lp - q) = exp(lp - q)
    elif name == "ppo":
        lo, hi = cfg["clip_low_threshold"], cfg["clip_high_threshold"]
        r = np.exp(lp - q)
        tok, g = np.zeros_like(lp), np.zeros_like(lp)
        for idx in zip(*np.nonzero(v), strict=True):
            ri, ai = r[idx], a[idx]
            surr1, surr2 = ri * ai, min(max(ri, lo), hi) * ai
            tok[idx] = -min(surr1, surr2)
            inside = lo <= ri <= hi
            # The clipped branch is constant in lp; it only wins (zero grad) when it is strictly smaller.
            if inside or surr1 <= surr2:
                g[idx] = -ri * ai
            else:
                n_clipped += 1
    elif name == "cispo":
        lo, hi = cfg["clip_low_threshold"], cfg["clip_high_threshold"]
        r = np.exp(lp - q)
        c = np.clip(r, lo, hi)
        tok, g = -c * lp * a, -c * a  # c is a constant weight
        n_clipped = float(np.sum(v & ((r < lo) | (r > hi))))
    elif name == "dro":
        beta = cfg["beta"]
        tok = -(lp * a - 0.5 * beta * (lp - q) ** 2)
        g = -(a - beta * (lp - q))
    elif name == "gspo":  # PPO's token rule with every token's ratio its row's sequence ratio
        lo, hi = cfg["clip_low_threshold"], cfg["clip_high_threshold"]
        m = np.where(v, d["sequence_ratio_mask"], 0.0)
        s = np.exp(np.sum(m * (lp - q), axis=1, keepdims=True) / np.maximum(m.sum(1, keepdims=True), 1))
        r = np.broadcast_to(s, lp.shape)
        unclipped, clipped = r * a, np.clip(r, lo, hi) * a
        tok = -np.minimum(unclipped, clipped)
        wins = (clipped < unclipped) & ((r < lo) | (r > hi))
        g = np.where(wins, 0.0, -r * a)  # d ratio_t / d lp_t = s (GSPO-token)
        n_clipped = float(np.sum(v & wins))
    else:
        raise AssertionError(name)
    return float(np.sum(tok[v])), np.where(v, g, 0.0), n_clipped


def torch_reference(name: str, d: dict[str, np.ndarray], cfg: dict) -> tuple[float, np.ndarray]:
    """Straight transcription of the Tinker docs' torch formulas, on the real tokens only."""
    v = torch.from_numpy(valid_of(d).copy())
    lp_full = torch.tensor(d["lp"], dtype=torch.float64, requires_grad=True)
    lp = lp_full[v]
    q = torch.tensor(d["logprobs"])[v]
    a = torch.tensor(d["advantages"])[v]
    w = torch.tensor(d["weights"])[v]
    ratio = torch.exp(lp - q)
    if name == "gspo":  # the GSPO paper's token form, one sequence a row
        rows = torch.from_numpy(np.nonzero(valid_of(d))[0])
        m = torch.tensor(d["sequence_ratio_mask"])[v]
        log_ratio = torch.zeros(len(d["lp"]), dtype=torch.float64).index_add(0, rows, m * (lp - q))
        count = torch.zeros(len(d["lp"]), dtype=torch.float64).index_add(0, rows, m).clamp(min=1)
        seq = torch.exp(log_ratio / count)[rows].detach()
        ratio = seq * torch.exp(lp - lp.detach())
    if name == "cross_entropy":
        loss = (-lp * w).sum()
    elif name == "importance_sampling":
        loss = -(ratio * a).sum()
    elif name in ("ppo", "gspo"):
        clipped = torch.clamp(ratio, cfg["clip_low_threshold"], cfg["clip_high_threshold"])
        loss = -torch.min(ratio * a, clipped * a).sum()
    elif name == "cispo":
        clipped = torch.clamp(ratio, cfg["clip_low_threshold"], cfg["clip_high_threshold"])
        loss = -(clipped.detach() * lp * a).sum()
    else:
        loss = -(lp * a - 0.5 * cfg["beta"] * (lp - q) ** 2).sum()
    loss.backward()
    return float(loss.detach()), lp_full.grad.numpy()


# ----------------------------------------------------------------------------------------- built-ins
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("seed", [1, 2, 3, 5, 6])
def test_test_data_exercises_every_branch(shape, seed):
    d = make_batch(SHAPES[shape], seed=seed)
    v = valid_of(d)
    r = np.exp(d["lp"][v] - d["logprobs"][v])
    a = d["advantages"][v]
    assert (a > 0).any() and (a < 0).any()
    assert (r < 0.8).any() and (r > 1.2).any() and ((r > 0.8) & (r < 1.2)).any() and (r > 4.0).any()
    # PPO: both "clipped wins" and "unclipped wins although outside the range" occur.
    out = (r < 0.8) | (r > 1.2)
    assert (out & ((r > 1.2) == (a > 0))).any() and (out & ((r > 1.2) != (a > 0))).any()


@pytest.mark.parametrize("name,shape", CASES)
def test_value_and_grad_match_references(name, shape):
    cfg = CONFIGS[name]
    d = make_batch(SHAPES[shape], seed=1)
    loss, grad, metrics = run(name, d, cfg)
    ref_loss, ref_grad, ref_clipped = np_reference(name, d, cfg)
    t_loss, t_grad = torch_reference(name, d, cfg)
    assert np.isfinite(grad).all()
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(t_loss, ref_loss, rtol=1e-10)
    np.testing.assert_allclose(t_grad, ref_grad, rtol=1e-10, atol=1e-12)
    assert metrics["loss:sum"] == loss
    if name in ("ppo", "cispo", "gspo"):
        assert metrics["clipped:sum"] == ref_clipped
        assert ref_clipped > 0


@pytest.mark.parametrize("name,shape", CASES)
def test_padding_contributes_nothing(name, shape):
    cfg = CONFIGS[name]
    dirty = make_batch(SHAPES[shape], seed=2, garbage=True)
    clean = make_batch(SHAPES[shape], seed=2, garbage=False)
    pad = ~valid_of(dirty)
    for k in ("lp", "logprobs", "advantages", "weights", "sequence_ratio_mask"):
        clean[k] = np.where(pad, 0.0, clean[k])
    # debug_nans: no intermediate (e.g. 0 * inf in the backward pass of a masked exp) may be nan either.
    with jax.debug_nans(True):
        loss_d, grad_d, _ = run(name, dirty, cfg)
    loss_c, grad_c, _ = run(name, clean, cfg)
    assert np.isfinite(loss_d) and np.isfinite(grad_d).all()
    assert loss_d == loss_c
    assert (grad_d[pad] == 0.0).all()
    np.testing.assert_array_equal(grad_d, grad_c)
    # Dropping the padding entirely (one row at a time, no mask) gives the same sum.
    total = 0.0
    for i in range(dirty["mask"].shape[0]):
        n = int(dirty["mask"][i].sum())
        row = {k: v[i : i + 1, :n] for k, v in dirty.items()}
        total += run(name, row, cfg)[0]
    np.testing.assert_allclose(loss_d, total, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("name", list(LOSSES))
def test_padding_with_infinite_learner_logprobs(name):
    # A masked vocabulary can give -inf logprobs at pad positions; they must not leak nan into the grad.
    d = make_batch(SHAPES["bt"], seed=3)
    d["lp"] = np.where(valid_of(d), d["lp"], -np.inf)
    loss, grad, _ = run(name, d, CONFIGS[name])
    assert np.isfinite(loss) and np.isfinite(grad).all()
    np.testing.assert_allclose(loss, np_reference(name, d, CONFIGS[name])[0], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("name", sorted(MULTI_TARGET_LOSSES))
def test_multi_target_mask_may_be_per_target(name):
    d = make_batch(SHAPES["btk"], seed=4)
    full = dict(d, mask=valid_of(d).astype(np.float64))
    a = run(name, d, CONFIGS[name])
    b = run(name, full, CONFIGS[name])
    assert a[0] == b[0]
    np.testing.assert_array_equal(a[1], b[1])


@pytest.mark.parametrize("name", sorted(set(LOSSES) - MULTI_TARGET_LOSSES))
def test_multi_target_rejected_where_tinker_rejects_it(name):
    lp, inputs = to_jax(make_batch(SHAPES["btk"]))
    with pytest.raises(ValueError, match=r"\[B, T, K\]"):
        LOSSES[name](lp, inputs, CONFIGS[name])


def test_bad_inputs_raise():
    lp, inputs = to_jax(make_batch(SHAPES["bt"]))
    with pytest.raises(ValueError, match="advantages"):
        LOSSES["ppo"](lp, {k: v for k, v in inputs.items() if k != "advantages"}, CONFIGS["ppo"])
    with pytest.raises(ValueError, match="mask"):
        LOSSES["cross_entropy"](lp, {"weights": inputs["weights"]}, {})
    with pytest.raises(ValueError, match="weights"):
        LOSSES["cross_entropy"](lp, dict(inputs, weights=inputs["weights"][:, :3]), {})


def test_loss_functions_jit_with_traced_config():
    d = make_batch(SHAPES["bt"], seed=5)
    lp, inputs = to_jax(d)
    for name in LOSSES:
        cfg = {"beta": 0.3} if name == "dro" else resolve(name, {})[1]
        step = jax.jit(jax.value_and_grad(LOSSES[name], has_aux=True))
        (loss, metrics), grad = step(lp, inputs, {k: jnp.float32(v) for k, v in cfg.items()})
        ref_loss, ref_grad, _ = np_reference(name, d, cfg)
        np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(np.asarray(grad), ref_grad, rtol=1e-5, atol=1e-5)
        assert metrics["loss:sum"].shape == () and loss.dtype == jnp.float32


@pytest.mark.parametrize(
    "name,override",
    [
        ("ppo", {"clip_low_threshold": 0.9, "clip_high_threshold": 1.05}),
        ("ppo", {"clip_high_threshold": 2.0}),
        ("cispo", {"clip_low_threshold": 0.5, "clip_high_threshold": 1.5}),
        ("dro", {"beta": 0.7}),
    ],
)
def test_config_overrides_take_effect(name, override):
    _, cfg = resolve(name, override)
    for k, v in override.items():
        assert cfg[k] == v
    d = make_batch(SHAPES["bt"], seed=6)
    loss, grad, _ = run(name, d, cfg)
    ref_loss, ref_grad, _ = np_reference(name, d, cfg)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-5, atol=1e-5)
    base = {"dro": {"beta": 0.05}}.get(name, DEFAULT_CONFIG[name])
    assert loss != pytest.approx(run(name, d, base)[0])


def _packed_gspo_batch(seed: int):
    """Two rows of 24, each packing three datums (segment ids = start + 1, as the engine packs them).
    Each datum's sampled tail is in the ratio mask and shares one advantage; its prompt has A = 0."""
    rng = np.random.default_rng(seed)
    rows, t = 2, 24
    lp = np.zeros((rows, t))
    q, adv, in_ratio, mask = (np.zeros((rows, t)) for _ in range(4))
    segments = np.zeros((rows, t), np.int32)
    datums = []  # (row, slice, ratio slice)
    for row in range(rows):
        start = 0
        for n, prompt in ((7, 2), (9, 3), (5, 1)):
            sl, tail = slice(start, start + n), slice(start + prompt, start + n)
            lp[row, sl] = rng.uniform(-3, 0, n)
            q[row, tail] = lp[row, tail] - rng.normal(rng.uniform(-0.4, 0.4), 0.2, n - prompt)
            adv[row, tail] = rng.choice([-1.0, 1.0]) * rng.uniform(0.5, 2.0)
            in_ratio[row, tail], mask[row, sl], segments[row, sl] = 1.0, 1.0, start + 1
            datums.append((row, sl, tail))
            start += n
    inputs = {"logprobs": q, "advantages": adv, "sequence_ratio_mask": in_ratio, "mask": mask}
    return lp, inputs, segments, datums


def test_gspo_gradient_is_the_sequence_objectives():
    """With one advantage per sequence, GSPO-token's gradient is the gradient of the paper's sequence-level
    objective times its sampled length: central finite differences of ``-n * min(s A, clip(s) A)``."""
    cfg = {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}
    lp, inputs, segments, datums = _packed_gspo_batch(seed=7)

    def objective(x):
        total = 0.0
        for row, _, tail in datums:
            s = np.exp(np.mean(x[row, tail] - inputs["logprobs"][row, tail]))
            a = inputs["advantages"][row, tail][0]
            clipped = np.clip(s, cfg["clip_low_threshold"], cfg["clip_high_threshold"])
            total -= (tail.stop - tail.start) * min(s * a, clipped * a)  # the sampled tokens' count
        return total

    jx = {k: jnp.asarray(v, jnp.float32) for k, v in inputs.items()} | {"segment_ids": jnp.asarray(segments)}
    (loss, metrics), grad = jax.value_and_grad(LOSSES["gspo"], has_aux=True)(
        jnp.asarray(lp, jnp.float32), jx, cfg
    )
    eps, fd = 1e-6, np.zeros_like(lp)
    for idx in zip(*np.nonzero(inputs["mask"]), strict=True):
        up, down = lp.copy(), lp.copy()
        up[idx] += eps
        down[idx] -= eps
        fd[idx] = (objective(up) - objective(down)) / (2 * eps)
    np.testing.assert_allclose(float(loss), objective(lp), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad), fd, atol=2e-5)
    # The data covers every branch: inside the range, clipped (zero gradient), outside but unclipped.
    ratios = [np.exp(np.mean(lp[r, t] - inputs["logprobs"][r, t])) for r, _, t in datums]
    signs = [inputs["advantages"][r, t][0] > 0 for r, _, t in datums]
    outside = [not 0.9 <= s <= 1.1 for s in ratios]
    assert any(not o for o in outside)
    assert any(o and ((s > 1.1) == pos) for o, s, pos in zip(outside, ratios, signs, strict=True))
    assert any(o and ((s > 1.1) != pos) for o, s, pos in zip(outside, ratios, signs, strict=True))
    assert metrics["clipped:sum"] > 0


def test_gspo_packed_rows_equal_each_datum_alone():
    cfg = resolve("gspo", {"clip_low_threshold": 0.7, "clip_high_threshold": 1.3})[1]
    lp, inputs, segments, datums = _packed_gspo_batch(seed=8)
    jx = {k: jnp.asarray(v, jnp.float32) for k, v in inputs.items()} | {"segment_ids": jnp.asarray(segments)}
    fn = jax.value_and_grad(LOSSES["gspo"], has_aux=True)
    (packed, _), grad = fn(jnp.asarray(lp, jnp.float32), jx, cfg)
    total = 0.0
    for row, sl, _ in datums:  # each datum alone in a row of its own, no segment ids
        alone = {k: jnp.asarray(v[row : row + 1, sl], jnp.float32) for k, v in inputs.items()}
        (loss, _), g = fn(jnp.asarray(lp[row : row + 1, sl], jnp.float32), alone, cfg)
        np.testing.assert_allclose(np.asarray(grad)[row, sl], np.asarray(g)[0], rtol=1e-6, atol=1e-7)
        total += float(loss)
    np.testing.assert_allclose(float(packed), total, rtol=1e-5)
    # Without segment ids a packed row would be one sequence: a different loss.
    (whole_rows, _), _ = fn(
        jnp.asarray(lp, jnp.float32), {k: v for k, v in jx.items() if k != "segment_ids"}, cfg
    )
    assert float(whole_rows) != pytest.approx(total, rel=1e-3)


def test_gspo_defaults_are_the_papers():
    assert resolve("gspo", None)[1] == pytest.approx(
        {"clip_low_threshold": 0.9997, "clip_high_threshold": 1.0004}
    )


# ------------------------------------------------------------------------------------------- resolve
def test_registry_is_consistent_with_sdk():
    from tinker.types.loss_fn_type import LossFnType

    assert set(LOSSES) == set(REQUIRED_INPUTS) == set(DEFAULT_CONFIG) == set(ALLOWED_CONFIG_KEYS)
    assert set(LOSSES) <= set(typing.get_args(LossFnType))
    assert REQUIRED_INPUTS["cross_entropy"] == ("target_tokens", "weights")
    for name in ("importance_sampling", "ppo", "cispo", "dro"):
        assert REQUIRED_INPUTS[name] == ("target_tokens", "logprobs", "advantages")
    assert REQUIRED_INPUTS["gspo"] == ("target_tokens", "logprobs", "advantages", "sequence_ratio_mask")
    assert sorted(MULTI_TARGET_LOSSES) == ["cross_entropy", "importance_sampling"]


def test_resolve_defaults():
    assert resolve("ppo", None)[1] == {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}
    assert resolve("cispo", {})[1] == {"clip_low_threshold": 0.0, "clip_high_threshold": 4.0}
    assert resolve("cross_entropy", None)[1] == {}
    assert resolve("importance_sampling", {})[1] == {}
    fn, cfg = resolve("dro", {"beta": 0.05})
    assert fn is LOSSES["dro"] and cfg == {"beta": 0.05}
    cfg["clip_low_threshold"] = 5.0
    resolve("ppo", None)[1]["clip_low_threshold"] = 5.0
    assert DEFAULT_CONFIG["ppo"]["clip_low_threshold"] == 0.8  # callers get a copy


@pytest.mark.parametrize(
    "value", [1, np.float32(0.25), np.array(0.25), jnp.float32(0.25), torch.tensor(0.25, dtype=torch.float64)]
)
def test_resolve_accepts_scalars_and_returns_python_floats(value):
    _, cfg = resolve("dro", {"beta": value})
    assert type(cfg["beta"]) is float and cfg["beta"] == float(value)


def test_resolve_unknown_loss():
    for name in ("foo", "stable_reinforce", "custom", "CROSS_ENTROPY"):
        with pytest.raises(ValueError, match="loss_fn"):
            resolve(name, None)
    with pytest.raises(ValueError, match="stable_reinforce.*does not publish.*'ppo' or 'gspo'"):
        resolve("stable_reinforce", None)


@pytest.mark.parametrize(
    "name,cfg", [("ppo", {"eps": 0.2}), ("cross_entropy", {"beta": 0.1}), ("dro", {"beta": 0.1, "kl": 0.0})]
)
def test_resolve_unknown_key(name, cfg):
    bad = next(k for k in cfg if k not in ALLOWED_CONFIG_KEYS[name])
    with pytest.raises(ValueError, match=rf"loss_fn_config\.{bad}\b"):
        resolve(name, cfg)


@pytest.mark.parametrize(
    "value",
    [[0.9], (0.9, 1.1), np.array([0.9, 1.0]), jnp.ones((2, 3)), torch.ones(4), {"x": 1.0}, np.zeros((1,))],
)
def test_resolve_rejects_non_scalars(value):
    with pytest.raises(ValueError, match=r"loss_fn_config\.clip_low_threshold.*loss_fn_inputs"):
        resolve("ppo", {"clip_low_threshold": value})


def test_resolve_tensor_under_unknown_key_points_to_loss_fn_inputs():
    # tinker-feedback#53: a user put advantages in loss_fn_config.
    with pytest.raises(ValueError, match=r"loss_fn_config\.advantages.*loss_fn_inputs"):
        resolve("importance_sampling", {"advantages": torch.randn(8), "kl_beta": 0.05})


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, np.float32("nan"), "0.2", True])
def test_resolve_rejects_non_finite_and_non_numbers(value):
    with pytest.raises(ValueError, match=r"loss_fn_config\.clip_high_threshold"):
        resolve("ppo", {"clip_high_threshold": value})


def test_resolve_dro_requires_beta_and_clip_order():
    with pytest.raises(ValueError, match=r"loss_fn_config\.beta"):
        resolve("dro", None)
    with pytest.raises(ValueError, match=r"loss_fn_config\.clip_low_threshold"):
        resolve("ppo", {"clip_low_threshold": 1.5})


# ----------------------------------------------------------------------------------------------- DPO
def np_dpo(pc, pr, rc, rr, beta):
    m = beta * ((pc - rc) - (pr - rr))
    n = len(pc)
    loss = np.mean(np.log1p(np.exp(-m)))  # -log(sigmoid(m))
    dm = -(1.0 / (1.0 + np.exp(m))) / n  # d loss / d m = -(1 - sigmoid(m)) / n
    metrics = {
        "dpo_loss": loss,
        "accuracy": np.mean(m > 0),
        "margin": np.mean(m),
        "chosen_reward": np.mean(beta * (pc - rc)),
        "rejected_reward": np.mean(beta * (pr - rr)),
    }
    return loss, beta * dm, -beta * dm, metrics


def test_dpo_matches_numpy():
    rng = np.random.default_rng(7)
    pc, pr, rc, rr = (rng.uniform(-60, -10, 16) for _ in range(4))
    beta = 0.3
    ref_loss, ref_gc, ref_gr, ref_metrics = np_dpo(pc, pr, rc, rr, beta)
    assert 0 < ref_metrics["accuracy"] < 1
    args = [jnp.asarray(x, jnp.float32) for x in (pc, pr, rc, rr)]
    f = jax.jit(lambda *a: dpo_loss(*a, beta=beta))
    (loss, metrics), grads = jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True)(*args)
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)
    for k, v in ref_metrics.items():
        np.testing.assert_allclose(float(metrics[k]), v, rtol=1e-5, atol=1e-6, err_msg=k)
    np.testing.assert_allclose(np.asarray(grads[0]), ref_gc, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(np.asarray(grads[1]), ref_gr, rtol=1e-4, atol=1e-7)
    assert not np.asarray(grads[2]).any() and not np.asarray(grads[3]).any()  # references are constants
    # Default beta is 0.1.
    np.testing.assert_allclose(float(dpo_loss(*args)[0]), np_dpo(pc, pr, rc, rr, 0.1)[0], rtol=1e-5)


def test_dpo_pair_mask_ignores_padded_pairs():
    rng = np.random.default_rng(8)
    pc, pr, rc, rr = (rng.uniform(-60, -10, 6) for _ in range(4))
    keep = np.array([1, 1, 0, 1, 0, 1], np.float32)
    garbage = [np.where(keep > 0, x, s * 3e38) for x, s in zip((pc, pr, rc, rr), (1, 1, -1, -1), strict=True)]
    args = [jnp.asarray(x, jnp.float32) for x in garbage]
    # The garbage overflows to inf - inf = nan if a padded pair is ever computed on; debug_nans catches it.
    with jax.debug_nans(True):
        (loss, metrics), g = jax.value_and_grad(
            lambda a, b: dpo_loss(a, b, args[2], args[3], 0.2, pair_mask=keep), (0, 1), has_aux=True
        )(args[0], args[1])
    sel = keep > 0
    ref_loss, ref_gc, _, ref_metrics = np_dpo(pc[sel], pr[sel], rc[sel], rr[sel], 0.2)
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["accuracy"]), ref_metrics["accuracy"])
    np.testing.assert_allclose(np.asarray(g[0])[sel], ref_gc, rtol=1e-4, atol=1e-7)
    assert (np.asarray(g[0])[~sel] == 0).all() and np.isfinite(np.asarray(g[1])).all()
