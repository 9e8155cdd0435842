"""Qwen3-MoE: config, parity with transformers, grouped-matmul experts, LoRA on the experts
(gradients, PEFT export, merged export), expert parallelism, KV-cache sampling, and the CLI."""

from __future__ import annotations

import dataclasses
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from jtinker import models, sharding, train, types
from jtinker.engine import BaseModel, LoraSpec
from jtinker.export import export_merged, export_peft, import_peft
from jtinker.sampling import Sampler, SampleRequest

lora, ModelConfig, tiny = models.lora, models.ModelConfig, models.tiny

TOL = 1e-4
VOCAB = tiny.SIZES["tiny"]["vocab_size"]
# Dense and sparse layers interleaved, by both rules: layer 3 is on the step grid but listed in
# mlp_only_layers. Kinds D S D D D S: the dense stack has 4 rows, the expert stack 2.
MIXED = dict(num_hidden_layers=6, decoder_sparse_step=2, mlp_only_layers=(3,))  # hashable: fixture cache key
CASES = {"sparse": {}, "sparse-no-norm": dict(norm_topk_prob=False), "mixed": MIXED}

fwd = jax.jit(models.forward, static_argnums=0)


def random_tokens(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, shape).astype(np.int32)


TOKENS = random_tokens((2, 24), seed=0)


def max_err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def our_logprobs(config, params, tokens, lo=None) -> np.ndarray:
    return np.asarray(jax.nn.log_softmax(fwd(config, params, jnp.asarray(tokens), lora=lo), axis=-1))


def torch_logprobs(model, tokens) -> np.ndarray:
    with torch.no_grad():
        logits = model(torch.tensor(tokens, dtype=torch.long)).logits
    return torch.log_softmax(logits.float(), dim=-1).numpy()


def hf_model(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def with_random_b(lo: lora.Lora, seed: int = 1, std: float = 0.1) -> lora.Lora:
    leaves, treedef = jax.tree_util.tree_flatten_with_path(lo)
    keys = iter(jax.random.split(jax.random.key(seed), len(leaves)))
    new = [
        std * jax.random.normal(next(keys), x.shape, x.dtype) if path[-1].key == "b" else x
        for path, x in leaves
    ]
    return jax.tree_util.tree_unflatten(treedef, new)


class Model:
    def __init__(self, path):
        self.path = path
        self.config, self.params = models.load_pretrained(path)


_MODELS: dict = {}


@pytest.fixture(scope="module")
def model_for(tiny_model_factory):
    def get(case: str) -> Model:
        if case not in _MODELS:
            _MODELS[case] = Model(tiny_model_factory("qwen3_moe", **CASES[case]))
        return _MODELS[case]

    return get


@pytest.fixture(scope="module")
def sparse(model_for) -> Model:
    return model_for("sparse")


@pytest.fixture(scope="module")
def mixed(model_for) -> Model:
    return model_for("mixed")


# --------------------------------------------------------------------------------------------------
# config


def test_config_fields_and_layer_kinds(sparse, mixed):
    c = sparse.config
    assert (c.model_type, c.num_experts, c.num_experts_per_tok, c.moe_intermediate_size) == (
        "qwen3_moe",
        8,
        2,
        32,
    )
    assert c.norm_topk_prob and c.qk_norm and not c.tie_word_embeddings
    assert c.layer_segments() == ((0, 2, True),) and c.dense_layers == ()
    m = mixed.config
    assert m.sparse_layers == (1, 5) and m.dense_layers == (0, 2, 3, 4)
    assert m.layer_segments() == ((0, 1, False), (1, 2, True), (2, 5, False), (5, 6, True))
    shapes = {k: v.shape for k, v in mixed.params["layers"].items()}
    assert shapes["router"] == (2, 64, 8) and shapes["experts_down_proj"] == (2, 8, 32, 64)
    assert shapes["gate_proj"] == (4, 64, 128) and shapes["q_proj"][0] == 6
    # num_local_experts is transformers' attribute name for the same field
    alias = tiny.hf_config("qwen3_moe")
    alias["num_local_experts"] = alias.pop("num_experts")
    assert ModelConfig.from_hf_dict(alias) == c
    want = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(mixed.params))
    assert m.param_count() == want


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        (dict(num_experts=0), "num_experts"),
        (dict(num_experts_per_tok=9), "num_experts_per_tok"),
        (dict(moe_intermediate_size=0), "moe_intermediate_size"),
        (dict(norm_topk_prob="yes"), "norm_topk_prob"),
        (dict(decoder_sparse_step=0), "decoder_sparse_step"),
        (dict(mlp_only_layers=[2]), "mlp_only_layers"),
        (dict(mlp_only_layers=[0], intermediate_size=None), "intermediate_size"),
    ],
)
def test_bad_moe_config_is_refused(changes, named):
    with pytest.raises(ValueError, match=named):
        ModelConfig.from_hf_dict(tiny.hf_config("qwen3_moe", **changes))


# --------------------------------------------------------------------------------------------------
# parity with transformers' Qwen3MoeForCausalLM


@pytest.mark.parametrize("case", sorted(CASES))
def test_logprob_parity(model_for, case):
    m = model_for(case)
    ref = torch_logprobs(hf_model(m.path), TOKENS)
    ours = our_logprobs(m.config, m.params, TOKENS)
    assert max_err(ours, ref) <= TOL
    if case != "mixed":  # (its flipped config would be one more compile)
        # the tolerance sees routing: renormalising the top-k (or not) moves log-probs far beyond it
        flipped = dataclasses.replace(m.config, norm_topk_prob=not m.config.norm_topk_prob)
        assert max_err(our_logprobs(flipped, m.params, TOKENS), ref) > 100 * TOL


def _jaxpr(config: ModelConfig):
    tree: dict = {}
    for path, shape in models.param_shapes(config).items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = jax.ShapeDtypeStruct(shape, jnp.float32)
    tokens = jax.ShapeDtypeStruct((2, 7), jnp.int32)
    return jax.make_jaxpr(lambda p, t: models.forward(config, p, t))(tree, tokens)


def test_all_sparse_is_one_scan_of_grouped_matmuls(sparse, mixed):
    jaxprs = {n: _jaxpr(dataclasses.replace(sparse.config, num_layers=n)) for n in (2, 6)}
    for n, jaxpr in jaxprs.items():
        scans = [e for e in jaxpr.eqns if e.primitive.name == "scan"]
        assert len(scans) == 1 and scans[0].params["length"] == n
        body = str(scans[0].params["jaxpr"])
        # the three expert matmuls are grouped (rows grouped by expert; one product each, a
        # ragged_dot or, on CPU, a loop over row tiles); every other matmul is q/k/v/o, the router,
        # and attention's two
        assert body.count("custom_vmap_call") == 3 and body.count("dot_general") == 3 + 7
    assert len(jaxprs[2].eqns) == len(jaxprs[6].eqns)  # no Python loop over layers
    # mixed: one scan per run of same-kind layers
    scans = [e for e in _jaxpr(mixed.config).eqns if e.primitive.name == "scan"]
    assert [s.params["length"] for s in scans] == [1, 1, 3, 1]


GROUP_SIZES = {  # rows per group: an empty group, groups within one tile and across several
    "uneven": [0, 3, 40, 1, 0, 70, 9, 5],
    "one group": [0, 0, 128, 0],
}


@pytest.mark.parametrize("case", sorted(GROUP_SIZES))
@pytest.mark.parametrize("cpu_form", ["tiled", "dense"])
def test_grouped_matmul_matches_ragged_dot(case, cpu_form, monkeypatch):
    """The grouped product in either of its CPU forms (row tiles, or one product of rows spread over
    the groups' blocks), whatever its size, and both its gradients equal jax.lax.ragged_dot's, XLA's
    own reference."""
    monkeypatch.setattr(models.moe, "TILED_MIN_WASTE", 0 if cpu_form == "tiled" else 1 << 62)
    sizes = jnp.asarray(GROUP_SIZES[case], jnp.int32)
    rows, groups = int(sizes.sum()), len(GROUP_SIZES[case])
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (rows, 48))
    w = jax.random.normal(kw, (groups, 48, 24))
    g = jax.random.normal(kg, (rows, 24))
    got, pullback = jax.vjp(lambda x, w: models.moe.grouped_matmul(x, w, sizes), x, w)
    want, want_pullback = jax.vjp(lambda x, w: jax.lax.ragged_dot(x, w, sizes), x, w)
    assert max_err(got, want) <= 1e-4
    for ours, ref in zip(pullback(g), want_pullback(g), strict=True):
        assert max_err(ours, ref) <= 1e-4 * float(jnp.abs(ref).max())


def test_grouped_matmul_multiplies_each_row_by_its_group_only():
    """XLA:CPU lowers ragged_dot to one product of every row with every group's matrix (rows widened
    to ``[M, G*in]``): ``G`` times the multiply-adds. An expert-sized grouped product (forward and
    backward) compiles to no such operand."""
    rows, groups, fan_in, fan_out = 512, 8, 128, 64
    sizes = jnp.full((groups,), rows // groups, jnp.int32)
    x, w, g = jnp.ones((rows, fan_in)), jnp.ones((groups, fan_in, fan_out)), jnp.ones((rows, fan_out))
    widened = f"f32[{rows},{groups * fan_in}]"
    assert widened in jax.jit(jax.lax.ragged_dot).lower(x, w, sizes).compile().as_text()  # the check sees it

    def forward_backward(x, w):
        y, pullback = jax.vjp(lambda x, w: models.moe.grouped_matmul(x, w, sizes), x, w)
        return y, pullback(g)

    hlo = jax.jit(forward_backward).lower(x, w).compile().as_text()
    assert widened not in hlo and f"f32[{groups * fan_in},{fan_out}]" not in hlo


def test_small_grouped_products_read_each_matrix_in_place():
    """XLA:CPU's lowering of ragged_dot copies every group's matrix into a transposed array first; a
    several-adapter decode step did so for each stacked LoRA matrix of every layer. The grouped
    product too small to tile (forward and backward) reads the matrices as they are stored."""
    rows, groups, fan_in, fan_out = 8, 4, 64, 16
    sizes = jnp.asarray([2, 3, 0, 3], jnp.int32)
    x, w, g = jnp.ones((rows, fan_in)), jnp.ones((groups, fan_in, fan_out)), jnp.ones((rows, fan_out))
    assert not models.moe._tiled_on_cpu(rows, w)
    shapes = f"(?:{groups * fan_in},{fan_out}|{fan_in},{groups},{fan_out})"  # w's values, rearranged
    copied = re.compile(rf"= f32\[{shapes}\]\S* (?:copy\(|fusion\([^\n]*kind=kLoop)")
    assert copied.search(jax.jit(jax.lax.ragged_dot).lower(x, w, sizes).compile().as_text())  # seen

    def forward_backward(x, w):
        y, pullback = jax.vjp(lambda x, w: models.moe.grouped_matmul(x, w, sizes), x, w)
        return y, pullback(g)

    assert not copied.search(jax.jit(forward_backward).lower(x, w).compile().as_text())


# --------------------------------------------------------------------------------------------------
# LoRA on attention and experts


def test_lora_layout_targets_and_merge(sparse, mixed):
    lo = lora.init(mixed.config, 4, jax.random.key(0))
    assert lo.targets == lora.ALL_TARGETS  # module names, as PEFT's target_modules
    layers = lo.weights["layers"]
    assert layers["experts_gate_proj"]["a"].shape == (2, 8, 64, 4)
    assert layers["experts_down_proj"]["b"].shape == (2, 8, 4, 64)
    assert layers["gate_proj"]["a"].shape == (4, 64, 4) and layers["q_proj"]["a"].shape == (6, 64, 4)
    assert "router" not in layers
    only_mlp = lora.init(sparse.config, 4, jax.random.key(0), targets=lora.targets_for(False, True, False))
    assert set(only_mlp.weights["layers"]) == {"experts_gate_proj", "experts_up_proj", "experts_down_proj"}
    assert only_mlp.targets == lora.MLP_TARGETS
    # forward(lora) == forward(merge(params, lora)); the mixed model's dense layers are covered by
    # test_merged_export_writes_per_expert_keys
    config, params = sparse.config, sparse.params
    lo = with_random_b(lora.init(config, 4, jax.random.key(0)))
    merged = lora.merge(config, params, lo)
    assert merged["layers"]["experts_up_proj"].shape == params["layers"]["experts_up_proj"].shape
    got = our_logprobs(config, params, TOKENS, lo)
    assert max_err(got, our_logprobs(config, merged, TOKENS)) <= TOL
    assert max_err(got, our_logprobs(config, params, TOKENS)) > 100 * TOL


def _loss(config: ModelConfig, params: dict, lo: lora.Lora, tokens: jax.Array, targets: jax.Array):
    lp = jax.nn.log_softmax(models.forward(config, params, tokens, lora=lo), -1)
    return -jnp.sum(jnp.take_along_axis(lp, targets[..., None], -1))


value_and_grad = jax.jit(jax.value_and_grad(_loss, argnums=2), static_argnums=0)
TARGETS = random_tokens((2, 24), seed=1)


def test_lora_grad_matches_central_differences(sparse):
    config, params = sparse.config, sparse.params
    lo = with_random_b(lora.init(config, 4, jax.random.key(0)), std=0.1)
    _, g = value_and_grad(config, params, lo, TOKENS, TARGETS)
    # Along the normalised gradient of a whole leaf the slope is |g|: far above f32 noise. Top-k
    # routing is piecewise, so the step stays small enough not to flip any token's experts.
    eps = 1e-4
    for name, leaf in [
        ("experts_gate_proj", "a"),
        ("experts_up_proj", "b"),
        ("experts_down_proj", "a"),
        ("experts_down_proj", "b"),
        ("q_proj", "b"),
    ]:
        grad = g.weights["layers"][name][leaf]
        norm = float(jnp.linalg.norm(grad))
        direction = grad / norm

        def loss_at(delta, name=name, leaf=leaf, direction=direction):
            weights = jax.tree.map(lambda x: x, lo.weights)
            weights["layers"][name][leaf] = weights["layers"][name][leaf] + delta * direction
            return float(value_and_grad(config, params, lo.replace(weights=weights), TOKENS, TARGETS)[0])

        fd = (loss_at(eps) - loss_at(-eps)) / (2 * eps)
        assert norm > 10, name
        assert fd == pytest.approx(norm, rel=1e-2), (name, leaf)


def test_vmapped_adapters_match_one_by_one(sparse):
    """The engine runs several adapters in one program with jax.vmap (train.accumulate_many)."""
    config, params = sparse.config, sparse.params
    los = [with_random_b(lora.init(config, 4, jax.random.key(k)), seed=k) for k in range(2)]
    tokens, targets = np.stack([TOKENS, TARGETS]), np.stack([TARGETS, TOKENS])
    batched = jax.jit(jax.vmap(jax.value_and_grad(_loss, argnums=2), (None, None, 0, 0, 0)), static_argnums=0)
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *los)
    values, grads = batched(config, params, stacked, tokens, targets)
    for k in range(2):
        v, g = value_and_grad(config, params, los[k], tokens[k], targets[k])
        assert float(values[k]) == pytest.approx(float(v), rel=1e-5)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(g), strict=True):
            assert max_err(a[k], b) <= 1e-4 * max(1.0, float(jnp.abs(b).max()))


def test_stacked_adapters_group_rows_by_expert_and_adapter(mixed):
    """Sampling runs several adapters as one stacked LoRA: expert rows sort by (expert, adapter)."""
    config, params = mixed.config, mixed.params
    los = [with_random_b(lora.init(config, 4, jax.random.key(k)), seed=k) for k in range(3)]
    row_adapters = [0, 1, 1, 2]
    tokens = random_tokens((4, 24), seed=3)
    got = fwd(config, params, jnp.asarray(tokens), lora=lora.stack(los, jnp.asarray(row_adapters)))
    for row, k in enumerate(row_adapters):
        want = fwd(config, params, jnp.asarray(tokens[row : row + 1]), lora=los[k])[0]
        assert max_err(got[row], want) < TOL, (row, k)


# --------------------------------------------------------------------------------------------------
# export: PEFT adapter (per-expert keys) and merged HF checkpoint


def test_peft_export_loads_in_peft_with_matching_logprobs(sparse, tmp_path):
    config, params = sparse.config, sparse.params
    lo = with_random_b(lora.init(config, 4, jax.random.key(0)))
    out = export_peft(config, lo, tmp_path / "adapter", base_model_name_or_path=str(sparse.path))
    tensors = load_file(str(out / "adapter_model.safetensors"))
    r = 8  # rank 4 padded to vLLM's next allowed rank
    expert = "base_model.model.model.layers.1.mlp.experts.7."
    assert tensors[expert + "gate_proj.lora_A.weight"].shape == (r, 64)
    assert tensors[expert + "gate_proj.lora_B.weight"].shape == (32, r)
    assert tensors[expert + "down_proj.lora_A.weight"].shape == (r, 32)
    assert tensors[expert + "down_proj.lora_B.weight"].shape == (64, r)
    per_layer = 4 + 3 * config.num_experts  # attention + every expert's gate/up/down
    assert len(tensors) == 2 * (per_layer * config.num_layers + 1)
    assert not any(".mlp.gate." in k for k in tensors)  # the router is not adapted

    ours = our_logprobs(config, params, TOKENS, lo)
    assert max_err(ours, our_logprobs(config, params, TOKENS)) > 100 * TOL
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(hf_model(sparse.path), str(out)).eval()
    assert not [w for w in caught if "missing adapter keys" in str(w.message)]
    # transformers v5 fuses the experts; PEFT folds the per-expert LoRAs into its fused layout
    assert {"gate_up_proj", "down_proj"} <= set(model.peft_config["default"].target_parameters)
    assert max_err(torch_logprobs(model, TOKENS), ours) <= TOL
    # and back in: import_peft rebuilds the stacked [L, E, ...] layout
    back = import_peft(out, config)
    assert back.weights["layers"]["experts_up_proj"]["a"].shape == (2, 8, 64, r)
    assert max_err(our_logprobs(config, params, TOKENS, back), ours) <= TOL


def test_merged_export_writes_per_expert_keys(mixed, tmp_path):
    config, params = mixed.config, mixed.params
    lo = with_random_b(lora.init(config, 4, jax.random.key(0)))
    out = export_merged(mixed.path, config, params, lo, tmp_path / "merged")
    names = set(load_file(str(out / "model.safetensors")))
    assert names == set(load_file(str(mixed.path / "model.safetensors")))
    assert {"model.layers.5.mlp.experts.3.up_proj.weight", "model.layers.5.mlp.gate.weight"} <= names
    assert "model.layers.3.mlp.up_proj.weight" in names and "model.layers.3.mlp.gate.weight" not in names
    model, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    want = our_logprobs(config, params, TOKENS, lo)
    assert max_err(torch_logprobs(model.eval(), TOKENS), want) <= TOL
    # export_peft -> import_peft on a mixed model: dense-layer MLP and expert LoRAs both survive.
    # (PEFT 0.21 itself cannot load this one: on transformers v5 it retargets every gate/up/down_proj
    # to the fused experts, so the dense layers' MLP adapters would be dropped.)
    back = import_peft(export_peft(config, lo, tmp_path / "adapter", base_model_name_or_path="x"), config)
    assert set(back.weights["layers"]) == set(lo.weights["layers"])
    assert max_err(our_logprobs(config, params, TOKENS, back), want) <= TOL


# --------------------------------------------------------------------------------------------------
# expert parallelism


def _data(seed: int, count: int = 8, length: int = 16):
    rng = np.random.default_rng(seed)
    data = []
    for _ in range(count):
        seq = rng.integers(0, 256, size=length + 1).tolist()
        weights = rng.uniform(0, 1, size=length).astype(np.float32)
        data.append(types.Datum(
            model_input=types.ModelInput.from_ints(seq[:-1]),
            loss_fn_inputs={"target_tokens": seq[1:], "weights": weights},
        ))  # fmt: skip
    return data


def _train(model_dir, mesh_config: str | None):
    mesh = sharding.make_mesh(mesh_config) if mesh_config else None
    base = BaseModel("moe", model_dir, mesh=mesh)
    adapter = base.new_adapter(LoraSpec(rank=8, seed=0))
    hparams = train.AdamHyperparams.create(learning_rate=1e-2)
    losses = []
    for step in range(2):
        _, metrics = adapter.forward_backward(_data(step), "cross_entropy", None, backward=True)
        adapter.optim_step(hparams)
        losses.append(metrics["loss:sum"])
    return base, adapter, np.array(losses)


def test_fsdp_by_ep_mesh_matches_one_device(sparse):
    _, ref_adapter, ref_losses = _train(sparse.path, None)
    base, adapter, losses = _train(sparse.path, "fsdp=2,ep=4")
    assert len(base.mesh.devices.flat) == 8
    experts = base.params["layers"]["experts_gate_proj"]  # [L, E, H, Im]: experts over ep
    assert experts.sharding.spec[:3] == (None, "ep", "fsdp")
    assert {s.data.shape for s in experts.addressable_shards} == {(2, 2, 32, 32)}
    a = adapter.lora.weights["layers"]["experts_down_proj"]["a"]  # [L, E, Im, r]
    assert a.sharding.spec[:2] == (None, "ep")
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-6)
    diffs = jax.tree.map(lambda x, y: max_err(x, y), adapter.lora, ref_adapter.lora)
    assert max(jax.tree.leaves(diffs)) < 1e-5


# --------------------------------------------------------------------------------------------------
# sampling through the KV cache


def test_greedy_sampling_matches_transformers_generate(mixed):
    """Prefill and decode through the KV cache on a model with both kinds of layers (one cache,
    written by four scans); a second turn extends each first one through the prefix cache."""
    eos = 258  # <|im_end|>, generation_config.eos_token_id
    sampler = Sampler(mixed.config, mixed.params, AutoTokenizer.from_pretrained(mixed.path))
    prompts = [[5, 17, 99, 200, 33, 71, 8, 150, 42, 9], list(range(40, 53))]
    hf = hf_model(mixed.path)
    for turn in range(2):
        requests = [
            SampleRequest(prompt=p, num_samples=1, max_tokens=12, temperature=0.0, stop_token_ids=(eos,))
            for p in prompts
        ]
        results = sampler.sample(requests)
        for prompt, result in zip(prompts, results, strict=True):
            ids = torch.tensor([prompt])
            with torch.no_grad():
                out = hf.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12
                )
            want = out[0, len(prompt) :].tolist()
            want = want[: want.index(eos) + 1] if eos in want else want
            tokens, _, _ = result.sequences[0]
            assert list(tokens) == want and len(set(want)) > 1
            assert result.prompt_cache_hit_tokens == (len(prompt) - 4 if turn else 0)
        prompts = [p + list(r.sequences[0][0]) + [60, 61, 62] for p, r in zip(prompts, results, strict=True)]


# --------------------------------------------------------------------------------------------------
# CLI


def test_cli_make_tiny_model(tmp_path):
    from jtinker.cli import main

    out = tmp_path / "moe"
    assert main(["make-tiny-model", str(out), "--family", "qwen3_moe"]) == 0
    config = ModelConfig.from_pretrained(out)
    assert config.model_type == "qwen3_moe" and config.sparse_layers == (0, 1)
    keys = set(load_file(str(out / "model.safetensors")))
    assert (
        "model.layers.0.mlp.experts.7.down_proj.weight" in keys and "model.layers.1.mlp.gate.weight" in keys
    )
    _, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
