"""LoRA as a separate pytree: init, merge, gradients, scaling, validation, and parity with PEFT."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from transformers import AutoModelForCausalLM

from jtinker import models

lora, ModelConfig = models.lora, models.ModelConfig

TOL = 1e-4
VOCAB = models.tiny.SIZES["tiny"]["vocab_size"]
fwd = jax.jit(models.forward, static_argnums=0)


def random_tokens(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, shape).astype(np.int32)


TOKENS = jnp.asarray(random_tokens((2, 40), seed=0))  # the shape test_models uses: shared compiles
TARGETS = jnp.asarray(random_tokens((2, 40), seed=1))


def max_err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def with_random_b(lo: lora.Lora, seed: int = 1, std: float = 0.1) -> lora.Lora:
    """The same adapter with every ``b`` drawn from N(0, std) (init leaves it at zero)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(lo)
    keys = iter(jax.random.split(jax.random.key(seed), len(leaves)))
    new = [
        std * jax.random.normal(next(keys), x.shape, x.dtype) if path[-1].key == "b" else x
        for path, x in leaves
    ]
    return jax.tree_util.tree_unflatten(treedef, new)


def get(tree: dict, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def leaf_paths(lo: lora.Lora) -> list[tuple[str, ...]]:
    """``("layers", "q_proj", "a")``-style paths of every leaf in ``lo.weights``."""
    paths, _ = jax.tree_util.tree_flatten_with_path(lo.weights)
    return [tuple(k.key for k in path) for path, _ in paths]


@pytest.fixture(scope="module")
def qwen3(qwen3_dir):
    return models.load_pretrained(qwen3_dir)


# --------------------------------------------------------------------------------------------------
# init
# --------------------------------------------------------------------------------------------------


def test_init_shapes_bounds_and_zero_b(qwen3):
    config, _ = qwen3
    lo = lora.init(config, 4, jax.random.key(0))
    assert lo.rank == 4 and lo.alpha == 32.0 and lo.scale == 8.0 and not lo.use_rslora
    assert lo.targets == lora.ALL_TARGETS
    assert set(lo.weights) == {"layers", "lm_head"}
    assert set(lo.weights["layers"]) == set(lora.ATTN_TARGETS + lora.MLP_TARGETS)
    for target, ab in lo.targets_tree().items():
        fan_in, fan_out = lora.target_shape(config, target)
        lead = () if target == "lm_head" else (config.num_layers,)
        assert ab["a"].shape == (*lead, fan_in, 4) and ab["b"].shape == (*lead, 4, fan_out)
        assert ab["a"].dtype == ab["b"].dtype == jnp.float32
        assert not np.any(np.asarray(ab["b"]))  # b == 0: the adapter starts as a no-op
        bound = 1 / math.sqrt(fan_in)  # kaiming-uniform(a=sqrt(5)) as PEFT
        a = np.asarray(ab["a"])
        assert np.all(np.abs(a) <= bound) and np.abs(a).max() > 0.8 * bound and a.std() > 0.4 * bound
    # qwen3's head_dim * heads != hidden: q/o targets use q_size, k/v use kv_size
    assert lora.target_shape(config, "q_proj") == (config.hidden_size, config.num_heads * config.head_dim)
    assert lora.target_shape(config, "o_proj") == (config.num_heads * config.head_dim, config.hidden_size)
    assert lora.target_shape(config, "v_proj") == (config.hidden_size, config.num_kv_heads * config.head_dim)
    # targets get independent draws, and the key matters
    q, k = lo.weights["layers"]["q_proj"]["a"], lo.weights["layers"]["k_proj"]["a"]
    assert not np.allclose(q[..., : k.shape[-2], :], k)
    assert not np.allclose(lora.init(config, 4, jax.random.key(1)).weights["layers"]["q_proj"]["a"], q)


def test_init_subset_and_dtype(qwen3):
    config, _ = qwen3
    lo = lora.init(config, 2, jax.random.key(0), targets=("lm_head",), dtype=jnp.bfloat16)
    assert set(lo.weights) == {"lm_head"} and lo.targets == ("lm_head",)
    assert lo.weights["lm_head"]["a"].dtype == jnp.bfloat16
    lo = lora.init(config, 2, jax.random.key(0), targets=("v_proj", "q_proj"))
    assert set(lo.weights) == {"layers"} and lo.targets == ("q_proj", "v_proj")


def test_zero_b_lora_leaves_logits_exactly_unchanged(tiny_model_dir):
    config, params = models.load_pretrained(tiny_model_dir)
    lo = lora.init(config, 4, jax.random.key(0))
    np.testing.assert_array_equal(fwd(config, params, TOKENS, lora=lo), fwd(config, params, TOKENS))


# --------------------------------------------------------------------------------------------------
# forward(lora=L) == forward(merge(params, L))
# --------------------------------------------------------------------------------------------------


MERGE_CASES = {
    "llama-untied-all": ("llama", {}, lora.ALL_TARGETS),
    "qwen3-tied-all": ("qwen3", {}, lora.ALL_TARGETS),
    "qwen2-tied-unembed-only": ("qwen2", {}, ("lm_head",)),
    "llama-bias-attn": ("llama", dict(attention_bias=True), lora.ATTN_TARGETS),
}


@pytest.mark.parametrize("case", sorted(MERGE_CASES))
def test_lora_forward_equals_merged_forward(case, tiny_model_factory):
    family, overrides, targets = MERGE_CASES[case]
    config, params = models.load_pretrained(tiny_model_factory(family, **overrides))
    lo = with_random_b(lora.init(config, 4, jax.random.key(0), alpha=8.0, targets=targets))
    merged = lora.merge(config, params, lo)

    got = fwd(config, params, TOKENS, lora=lo)
    want = fwd(config, merged, TOKENS)
    assert max_err(got, want) <= TOL
    assert max_err(got, fwd(config, params, TOKENS)) > 0.05  # the adapter really does something

    # merge leaves untargeted weights (and the input embedding) alone, and never edits params
    assert merged["embed"] is params["embed"]
    for name, w in params["layers"].items():
        if name not in targets:
            assert merged["layers"][name] is w
        else:
            assert max_err(merged["layers"][name], w) > 0
    if "lm_head" in targets:
        assert merged["lm_head"].shape == (config.hidden_size, config.vocab_size)
        if config.tie_word_embeddings:
            assert "lm_head" not in params  # the tied model gets its own head; embed stays tied input
    else:
        assert ("lm_head" in merged) == ("lm_head" in params)


def test_merge_is_w_plus_scaled_ab(qwen3):
    config, params = qwen3
    lo = with_random_b(lora.init(config, 3, jax.random.key(2), alpha=6.0, targets=("down_proj", "lm_head")))
    merged = lora.merge(config, params, lo)
    a, b = (np.asarray(x) for x in lo.weights["layers"]["down_proj"].values())
    assert lo.scale == 2.0
    for layer in range(config.num_layers):
        want = np.asarray(params["layers"]["down_proj"][layer]) + 2.0 * a[layer] @ b[layer]
        np.testing.assert_allclose(merged["layers"]["down_proj"][layer], want, rtol=1e-5, atol=1e-6)
    a, b = (np.asarray(x) for x in lo.weights["lm_head"].values())
    head = np.asarray(params["embed"]).T + 2.0 * a @ b
    np.testing.assert_allclose(merged["lm_head"], head, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# stacked adapters: several adapters in one batch, each row with its own
# --------------------------------------------------------------------------------------------------

ROW_ADAPTERS = [0, 0, 1, 2]  # sorted: rows grouped by adapter


def stacked_rows(config, n: int = 3):
    los = [with_random_b(lora.init(config, 4, jax.random.key(k)), seed=10 + k) for k in range(n)]
    tokens = jnp.asarray(random_tokens((len(ROW_ADAPTERS), 40), seed=5))
    return los, lora.stack(los, jnp.asarray(ROW_ADAPTERS)), tokens


def test_stacked_adapters_give_each_row_its_own_adapter(tiny_model_dir):
    config, params = models.load_pretrained(tiny_model_dir)
    los, stacked, tokens = stacked_rows(config)
    assert stacked.num_adapters == 3 and stacked.weights["layers"]["q_proj"]["a"].shape[1] == 3
    got = fwd(config, params, tokens, lora=stacked)
    for row, k in enumerate(ROW_ADAPTERS):
        want = fwd(config, params, tokens[row : row + 1], lora=los[k])[0]
        assert max_err(got[row], want) < TOL, (row, k)
    # and not some other row's adapter
    assert max_err(got[2], fwd(config, params, tokens[2:3], lora=los[0])[0]) > 100 * TOL


def test_stacked_adapter_gradients_match_each_adapter_alone(qwen3):
    """The grouped (ragged_dot) LoRA branch is differentiable: each adapter's slice of the stacked
    gradient is that adapter's gradient on its own rows."""
    config, params = qwen3
    los, stacked, tokens = stacked_rows(config)
    targets = jnp.roll(tokens, 1, axis=1)

    def loss(weights, lo, tokens, targets):  # w.r.t. the weights: a stacked Lora also holds int ids
        logits = models.forward(config, params, tokens, lora=lo.replace(weights=weights))
        return jnp.sum(jnp.take_along_axis(logits, targets[..., None], axis=-1))

    grad = jax.jit(jax.grad(loss))
    g = grad(stacked.weights, stacked, tokens, targets)
    for k in range(3):
        rows = slice(ROW_ADAPTERS.index(k), len(ROW_ADAPTERS) - ROW_ADAPTERS[::-1].index(k))
        want = grad(los[k].weights, los[k], tokens[rows], targets[rows])
        for path in leaf_paths(los[k]):
            got = np.take(np.asarray(get(g, path)), k, axis=lora.ADAPTER_AXIS)
            w = np.asarray(get(want, path))
            assert max_err(got, w) <= 1e-4 * max(1.0, float(np.abs(w).max())), (k, path)


def test_stack_refuses_adapters_of_different_layouts(qwen3):
    config, _ = qwen3
    ids, rank4 = jnp.asarray([0, 1]), lora.init(config, 4, jax.random.key(0))
    for other in (lora.init(config, 8, jax.random.key(1)), lora.init(config, 4, jax.random.key(1), alpha=8)):
        with pytest.raises(ValueError, match=r"loras\[1\]: its shapes, dtypes or alpha differ"):
            lora.stack([rank4, other], ids)


# --------------------------------------------------------------------------------------------------
# gradients w.r.t. the adapter
# --------------------------------------------------------------------------------------------------


def make_loss(config: ModelConfig):
    """Mean target *logit* as a function of (params, lora).

    Its gradient takes the same path as a log-prob loss's, but the loss is O(0.1) rather than
    ~log(V) ~ 5.8, so the f32 rounding of its value (ulp ~1e-8 instead of 5e-7) stays far below
    what the finite-difference check can resolve.
    """

    def loss(params, lo):
        logits = models.forward(config, params, TOKENS, lora=lo)
        return jnp.mean(jnp.take_along_axis(logits, TARGETS[..., None], axis=-1))

    return loss


@pytest.fixture(scope="module")
def qwen3_grads(qwen3):
    """``(loss, grad)`` w.r.t. the adapter only (argnums=1), at a zero-b and a random-b adapter."""
    config, params = qwen3
    value_and_grad = jax.jit(jax.value_and_grad(make_loss(config), argnums=1))
    lo0 = lora.init(config, 4, jax.random.key(0), alpha=8.0)
    lo = with_random_b(lo0)
    return value_and_grad, lo0, value_and_grad(params, lo0)[1], lo, value_and_grad(params, lo)[1]


def test_grad_mirrors_lora_and_is_nonzero_everywhere(qwen3_grads):
    _, _, _, lo, g = qwen3_grads
    # grad over the adapter argument only: a Lora of the same structure, shapes, dtypes and statics
    assert isinstance(g, lora.Lora)
    assert jax.tree.structure(g) == jax.tree.structure(lo)
    assert (g.alpha, g.use_rslora) == (lo.alpha, lo.use_rslora)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), g) == jax.tree.map(lambda x: (x.shape, x.dtype), lo)
    assert len(leaf_paths(g)) == 2 * len(lora.ALL_TARGETS)
    for path in leaf_paths(g):
        x = np.asarray(get(g.weights, path))
        assert np.all(np.isfinite(x)), path
        if path[0] == "layers":  # every layer of every stacked target gets a gradient
            assert np.all(np.abs(x).reshape(x.shape[0], -1).max(axis=1) > 1e-6), path
        else:
            assert np.abs(x).max() > 1e-6, path


def test_grad_at_init_only_reaches_b(qwen3_grads):
    """With b == 0, d/da vanishes (it is multiplied by b) while d/db does not: PEFT's init."""
    _, _, g0, _, _ = qwen3_grads
    for path in leaf_paths(g0):
        x = np.asarray(get(g0.weights, path))
        if path[-1] == "a":
            assert not np.any(x), path
        else:
            assert np.abs(x).max() > 1e-6, path


def test_grad_matches_chain_rule_through_merged_weights(qwen3, qwen3_grads):
    """dL/da = dL/dW @ b.T * s and dL/db = a.T @ dL/dW * s, with W the merged kernel."""
    config, params = qwen3
    _, _, _, lo, g = qwen3_grads
    merged = lora.merge(config, params, lo)
    g_merged = jax.jit(jax.grad(lambda p: make_loss(config)(p, None)))(merged)
    s = lo.scale
    for target in ("q_proj", "v_proj", "o_proj", "down_proj", "lm_head"):
        ab = lo.targets_tree()[target]
        gw = g_merged["lm_head"] if target == "lm_head" else g_merged["layers"][target]
        ga, gb = g.targets_tree()[target]["a"], g.targets_tree()[target]["b"]
        want_a = jnp.matmul(gw, jnp.swapaxes(ab["b"], -1, -2)) * s
        want_b = jnp.matmul(jnp.swapaxes(ab["a"], -1, -2), gw) * s
        for got, want in ((ga, want_a), (gb, want_b)):
            scale = float(jnp.abs(want).max())
            assert scale > 1e-6
            assert max_err(got, want) <= 1e-4 * scale, target


def test_grad_matches_central_differences(qwen3, qwen3_grads):
    """f32 central differences, eps = 1e-3, at the largest-gradient entry of a few leaves."""
    _, params = qwen3
    value_and_grad, _, _, lo, g = qwen3_grads
    eps = 1e-3
    for path in [("layers", "q_proj", "b"), ("layers", "down_proj", "a"), ("lm_head", "a"), ("lm_head", "b")]:
        grad_leaf = np.asarray(get(g.weights, path))
        idx = np.unravel_index(np.argmax(np.abs(grad_leaf)), grad_leaf.shape)

        def loss_at(delta, path=path, idx=idx):
            weights = jax.tree.map(lambda x: x, lo.weights)
            parent = get(weights, path[:-1])
            parent[path[-1]] = parent[path[-1]].at[idx].add(delta)
            return float(value_and_grad(params, lo.replace(weights=weights))[0])

        fd = (loss_at(eps) - loss_at(-eps)) / (2 * eps)
        assert abs(grad_leaf[idx]) > 1e-3, path
        assert fd == pytest.approx(float(grad_leaf[idx]), rel=1e-2), path


# --------------------------------------------------------------------------------------------------
# targets, scaling, validation
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attn", [False, True])
@pytest.mark.parametrize("mlp", [False, True])
@pytest.mark.parametrize("unembed", [False, True])
def test_targets_for(attn, mlp, unembed):
    targets = lora.targets_for(train_attn=attn, train_mlp=mlp, train_unembed=unembed)
    want = (
        (set(lora.ATTN_TARGETS) if attn else set())
        | (set(lora.MLP_TARGETS) if mlp else set())
        | ({"lm_head"} if unembed else set())
    )
    assert set(targets) == want and len(targets) == len(want)


def test_targets_for_defaults_to_everything():
    assert set(lora.targets_for()) == set(lora.ALL_TARGETS)
    assert set(lora.ALL_TARGETS) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
        "lm_head",
    }


@pytest.mark.parametrize("rank", [1, 4, 16])
def test_scale_plain_and_rslora(qwen3, rank):
    config, _ = qwen3
    head = ("lm_head",)
    plain = lora.init(config, rank, jax.random.key(0), alpha=16.0, targets=head)
    assert not plain.use_rslora and plain.scale == pytest.approx(16.0 / rank)
    rs = lora.init(config, rank, jax.random.key(0), alpha=16.0, targets=head, use_rslora=True)
    assert rs.use_rslora and rs.scale == pytest.approx(16.0 / math.sqrt(rank))


def test_rslora_forward_uses_alpha_over_sqrt_rank(qwen3):
    """rsLoRA(alpha, r) behaves exactly like plain LoRA with alpha' = alpha * sqrt(r)."""
    config, params = qwen3
    rank, alpha = 4, 8.0
    rs = with_random_b(lora.init(config, rank, jax.random.key(0), alpha=alpha, use_rslora=True))
    plain = lora.Lora(weights=rs.weights, alpha=alpha * math.sqrt(rank))
    plain_same_alpha = lora.Lora(weights=rs.weights, alpha=alpha)
    got = fwd(config, params, TOKENS, lora=rs)
    assert max_err(got, fwd(config, params, TOKENS, lora=plain)) <= 1e-5
    assert max_err(got, fwd(config, params, TOKENS, lora=plain_same_alpha)) > 0.05
    assert max_err(got, fwd(config, lora.merge(config, params, rs), TOKENS)) <= TOL


@pytest.mark.parametrize("rank", [0, -2, 2.5, "4", None, True])
def test_bad_rank_is_refused(qwen3, rank):
    config, _ = qwen3
    with pytest.raises(ValueError, match="rank"):
        lora.init(config, rank, jax.random.key(0))


@pytest.mark.parametrize("alpha", [0, -8.0, float("inf"), float("nan"), "x", None, True])
def test_bad_alpha_is_refused(qwen3, alpha):
    config, _ = qwen3
    with pytest.raises(ValueError, match="alpha: must be a positive number"):
        lora.init(config, 4, jax.random.key(0), alpha=alpha)


def test_key_is_a_prng_key_or_an_int_seed(qwen3):
    config, _ = qwen3
    by_seed, by_key = lora.init(config, 4, 7), lora.init(config, 4, jax.random.key(7))
    chex.assert_trees_all_equal(by_seed.weights, by_key.weights)
    with pytest.raises(TypeError, match="key: expected jax.random.key"):
        lora.init(config, 4, "seed")


def test_bad_targets_are_refused(qwen3):
    config, _ = qwen3
    with pytest.raises(ValueError, match=r"targets.*'attn'"):
        lora.init(config, 4, jax.random.key(0), targets=("q_proj", "attn"))
    with pytest.raises(ValueError, match="targets.*embed_tokens"):
        lora.init(config, 4, jax.random.key(0), targets=["embed_tokens"])
    with pytest.raises(ValueError, match="targets"):
        lora.init(config, 4, jax.random.key(0), targets=())
    with pytest.raises(ValueError, match="targets"):
        lora.init(config, 4, jax.random.key(0), targets=lora.targets_for(False, False, False))


# --------------------------------------------------------------------------------------------------
# PEFT parity
# --------------------------------------------------------------------------------------------------


def peft_logprobs(model_dir, lo: lora.Lora, tokens: np.ndarray) -> np.ndarray:
    """Our adapter copied into a PEFT model (PEFT's ``A = a.T``, ``B = b.T`` per layer)."""
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    peft_config = peft.LoraConfig(
        r=lo.rank,
        lora_alpha=lo.alpha,
        target_modules=list(lo.targets),
        lora_dropout=0.0,
        use_rslora=lo.use_rslora,
    )
    model = peft.get_peft_model(hf, peft_config).eval()
    copied = 0
    for name, module in model.named_modules():
        if not hasattr(module, "lora_A") or "default" not in module.lora_A:
            continue
        target = name.rsplit(".", 1)[-1]
        ab = lo.targets_tree()[target]
        if target == "lm_head":
            a, b = ab["a"], ab["b"]
        else:
            layer = int(name.split(".layers.")[1].split(".")[0])
            a, b = ab["a"][layer], ab["b"][layer]
        with torch.no_grad():
            module.lora_A["default"].weight.copy_(torch.from_numpy(np.array(a).T))
            module.lora_B["default"].weight.copy_(torch.from_numpy(np.array(b).T))
        assert module.scaling["default"] == pytest.approx(lo.scale)
        copied += 1
    num_layers = hf.config.num_hidden_layers
    assert copied == sum(1 if t == "lm_head" else num_layers for t in lo.targets)
    with torch.no_grad():
        logits = model(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits
    return torch.log_softmax(logits.float(), dim=-1).numpy()


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
@pytest.mark.parametrize(("family", "use_rslora"), [("llama", False), ("qwen3", True)])
def test_lora_forward_matches_peft(family, use_rslora, tiny_model_factory):
    model_dir = tiny_model_factory(family)
    config, params = models.load_pretrained(model_dir)
    lo = with_random_b(lora.init(config, 4, jax.random.key(3), alpha=8.0, use_rslora=use_rslora), std=0.2)
    ours = jax.nn.log_softmax(fwd(config, params, TOKENS, lora=lo), axis=-1)
    theirs = peft_logprobs(model_dir, lo, np.asarray(TOKENS))
    assert max_err(ours, theirs) <= TOL
    assert max_err(ours, jax.nn.log_softmax(fwd(config, params, TOKENS), axis=-1)) > 0.1
