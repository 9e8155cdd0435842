"""The functional core against transformers' own torch forward: parity, KV cache, packing, chunked
log-probs, the layer scan, and the loader's refusals."""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import shutil
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from transformers import AutoModelForCausalLM

from jtinker import models

KVCache, ModelConfig, lora, tiny = models.KVCache, models.ModelConfig, models.lora, models.tiny

TOL = 1e-4
VOCAB = tiny.SIZES["tiny"]["vocab_size"]

# Everything runs jitted (config static): eager lax.scan recompiles on every call.
fwd = jax.jit(models.forward, static_argnums=0)


def random_tokens(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, shape).astype(np.int32)


def hf_logprobs(model_dir: Path, tokens: np.ndarray) -> np.ndarray:
    """log_softmax of transformers' own f32 forward (its default causal mask, no padding)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor(tokens, dtype=torch.long)).logits
    return torch.log_softmax(logits.float(), dim=-1).numpy()


def our_logprobs(config: ModelConfig, params: dict, tokens, **kwargs) -> np.ndarray:
    return np.asarray(jax.nn.log_softmax(fwd(config, params, jnp.asarray(tokens), **kwargs), axis=-1))


def max_err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_config(model_dir: Path, **changes) -> None:
    """Sets (or, with value ``...``, deletes) config.json keys."""
    path = model_dir / "config.json"
    cfg = json.loads(path.read_text())
    for key, value in changes.items():
        if value is ...:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    path.write_text(json.dumps(cfg))


def abstract_params(config: ModelConfig) -> dict:
    tree: dict = {}
    for path, shape in models.param_shapes(config).items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = jax.ShapeDtypeStruct(shape, jnp.float32)
    return tree


# --------------------------------------------------------------------------------------------------
# 1. Parity with transformers
# --------------------------------------------------------------------------------------------------


def test_tiny_family_features(tiny_model_dir):
    """The default tiny dirs really exercise what the parity tests claim they cover."""
    config = ModelConfig.from_pretrained(tiny_model_dir)
    assert config.num_heads == 4 and config.num_kv_heads == 2  # GQA
    if config.model_type == "llama":
        assert config.rope_type == "llama3" and config.rope_factor == 8.0
        assert not config.tie_word_embeddings and not config.qkv_bias
    elif config.model_type == "qwen2":
        assert config.qkv_bias and not config.o_bias and config.tie_word_embeddings
    else:
        assert config.qk_norm and config.tie_word_embeddings
        assert config.head_dim == 32 != config.hidden_size // config.num_heads


def test_1b_size_has_llama_3_2_1b_shape():
    """``make-tiny-model --size 1b`` (issue #9's GPU benchmark) has Llama-3.2-1B's parameter count."""
    config = ModelConfig.from_hf_dict(tiny.hf_config("llama", "1b"))
    assert (config.num_layers, config.hidden_size, config.intermediate_size) == (16, 2048, 8192)
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (32, 8, 64)
    assert config.tie_word_embeddings and config.rope_type == "llama3"
    assert config.param_count() == 1_235_814_400


def test_logprob_parity_per_family(tiny_model_dir):
    tokens = random_tokens((2, 40))
    config, params = models.load_pretrained(tiny_model_dir)
    assert ("lm_head" in params) == (not config.tie_word_embeddings)
    ref = hf_logprobs(tiny_model_dir, tokens)
    assert max_err(our_logprobs(config, params, tokens), ref) <= TOL


PARITY_CASES = {
    "llama-tied": ("llama", {}, dict(tie_word_embeddings=True)),
    "qwen3-untied": ("qwen3", {}, dict(tie_word_embeddings=False)),
    "qwen2-untied": ("qwen2", {}, dict(tie_word_embeddings=False)),
    "llama-attention-bias": ("llama", {}, dict(attention_bias=True)),
    "qwen2-mqa": ("qwen2", {}, dict(num_key_value_heads=1)),
    "qwen3-mha": ("qwen3", {}, dict(num_key_value_heads=4)),
    "llama-sharded": ("llama", dict(shards=3), {}),
    "qwen3-sharded": ("qwen3", dict(shards=3), {}),
}


@pytest.mark.parametrize("case", sorted(PARITY_CASES))
def test_logprob_parity_variants(case, tiny_model_factory):
    family, factory_kwargs, overrides = PARITY_CASES[case]
    model_dir = tiny_model_factory(family, **factory_kwargs, **overrides)
    config, params = models.load_pretrained(model_dir)
    if "tie_word_embeddings" in overrides:
        assert config.tie_word_embeddings == overrides["tie_word_embeddings"]
        assert ("lm_head" in params) == (not config.tie_word_embeddings)
    if overrides.get("attention_bias"):
        assert config.qkv_bias and config.o_bias
        assert {"q_bias", "k_bias", "v_bias", "o_bias"} <= set(params["layers"])
    if "num_key_value_heads" in overrides:
        assert params["layers"]["k_proj"].shape[-1] == overrides["num_key_value_heads"] * config.head_dim
    if factory_kwargs.get("shards"):
        index = json.loads((model_dir / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) == 3
        assert not (model_dir / "model.safetensors").exists()
    tokens = random_tokens((2, 40), seed=1)
    assert max_err(our_logprobs(config, params, tokens), hf_logprobs(model_dir, tokens)) <= TOL


def test_parity_tolerance_detects_family_features(tiny_model_factory):
    """Each family-specific feature moves the log-probs by far more than TOL, so the parity tests
    above would catch it being dropped."""
    tokens = random_tokens((2, 40))
    # llama3 RoPE scaling
    d = tiny_model_factory("llama")
    config, params = models.load_pretrained(d)
    ref = hf_logprobs(d, tokens)
    wrong = our_logprobs(dataclasses.replace(config, rope_type="default"), params, tokens)
    assert max_err(wrong, ref) > 10 * TOL
    # qwen2 q/k/v biases
    d = tiny_model_factory("qwen2")
    config, params = models.load_pretrained(d)
    ref = hf_logprobs(d, tokens)
    no_bias = {**params, "layers": {k: v for k, v in params["layers"].items() if not k.endswith("_bias")}}
    assert max_err(our_logprobs(config, no_bias, tokens), ref) > 10 * TOL
    # qwen3 q/k norm
    d = tiny_model_factory("qwen3")
    config, params = models.load_pretrained(d)
    ref = hf_logprobs(d, tokens)
    assert max_err(our_logprobs(dataclasses.replace(config, qk_norm=False), params, tokens), ref) > 10 * TOL


def _v5_rope_dir(src: Path, dst: Path, nested: bool) -> Path:
    """The llama dir rewritten with transformers-v5 ``rope_parameters`` (rope_theta moved inside)."""
    model_dir = copy_dir(src, dst)
    cfg = json.loads((model_dir / "config.json").read_text())
    rope = {**cfg.pop("rope_scaling"), "rope_theta": cfg.pop("rope_theta")}
    cfg["rope_parameters"] = {"full_attention": rope} if nested else rope
    (model_dir / "config.json").write_text(json.dumps(cfg))
    return model_dir


def test_rope_parameters_v5_config(tiny_model_factory, tmp_path):
    src = tiny_model_factory("llama")
    v4 = ModelConfig.from_pretrained(src)
    flat = _v5_rope_dir(src, tmp_path / "flat", nested=False)
    nested = _v5_rope_dir(src, tmp_path / "nested", nested=True)
    assert ModelConfig.from_pretrained(flat) == v4
    assert ModelConfig.from_pretrained(nested) == v4
    assert v4.rope_theta == 500000.0 and v4.rope_type == "llama3"
    # a Qwen-style v5 config: default rope, theta only inside rope_parameters
    qwen = tiny.hf_config("qwen3")
    qwen["rope_parameters"] = {"rope_type": "default", "rope_theta": qwen.pop("rope_theta")}
    assert ModelConfig.from_hf_dict(qwen) == ModelConfig.from_hf_dict(tiny.hf_config("qwen3"))
    assert ModelConfig.from_hf_dict(qwen).rope_theta == 1e6

    tokens = random_tokens((2, 40), seed=2)
    config, params = models.load_pretrained(flat)
    assert max_err(our_logprobs(config, params, tokens), hf_logprobs(flat, tokens)) <= TOL


@pytest.mark.parametrize(
    "rope_scaling", [{"rope_type": "linear", "factor": 4.0}, {"type": "linear", "factor": 2.0}]
)
def test_linear_rope_parity(rope_scaling, tmp_path):
    model_dir = models.make_tiny(tmp_path / "m", family="qwen2", rope_scaling=rope_scaling)
    config, params = models.load_pretrained(model_dir)
    assert config.rope_type == "linear" and config.rope_factor == rope_scaling["factor"]
    tokens = random_tokens((2, 40), seed=3)
    assert max_err(our_logprobs(config, params, tokens), hf_logprobs(model_dir, tokens)) <= TOL


def test_bf16_loading_close_to_f32_reference(tiny_model_dir):
    """bf16 weights and activations vs the f32 torch reference.

    bf16 keeps 8 significant bits (unit roundoff 2^-9 ~ 2e-3). Every weight, the residual stream
    and the final hidden state are rounded, and the tiny models' logits are O(1), so each logit
    (and the logsumexp) carries errors of a few 1e-3: measured ~5-6e-3 here, and transformers' own
    bf16 forward is 5-8e-3 off its f32 forward. 2e-2 leaves ~3x headroom yet is far below what a
    real bug causes (a dropped feature moves log-probs by >= 2.6e-3 .. 0.4, a wrong weight by ~1).
    """
    tokens = random_tokens((2, 40))
    config, params = models.load_pretrained(tiny_model_dir, dtype=jnp.bfloat16)
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(params))
    logits = fwd(config, params, jnp.asarray(tokens))
    assert logits.dtype == jnp.float32
    ref = hf_logprobs(tiny_model_dir, tokens)
    err = max_err(jax.nn.log_softmax(logits, axis=-1), ref)
    assert 1e-5 < err <= 2e-2  # really ran in bf16, and is still close


def test_default_positions_are_arange(qwen3_dir):
    config, params = models.load_pretrained(qwen3_dir)
    tokens = jnp.asarray(random_tokens((2, 40)))
    explicit = fwd(config, params, tokens, positions=jnp.broadcast_to(jnp.arange(40), (2, 40)))
    np.testing.assert_allclose(fwd(config, params, tokens), explicit, rtol=0, atol=1e-6)


def test_bad_model_inputs_are_named(qwen3_dir):
    """The functional core names what is wrong instead of failing deep inside (or gathering a clamped
    id): shapes and types when traced, token ids when concrete."""
    config, params = models.load_pretrained(qwen3_dir)
    tokens = jnp.asarray(random_tokens((2, 6)))
    adapter = models.lora.init(config, rank=2, key=jax.random.key(0))
    int_array = "expected an int array"
    bad = [
        ({"tokens": tokens[0]}, f"tokens: {int_array} [batch, seq], got int32[6]"),
        ({"tokens": tokens.astype(jnp.float32)}, f"tokens: {int_array} [batch, seq], got float32[2, 6]"),
        ({"tokens": tokens.at[1, 4].set(config.vocab_size)}, f"tokens: id {config.vocab_size} at [1, 4] is"),
        ({"tokens": tokens.at[0, 2].set(-1)}, "tokens: id -1 at [0, 2] is outside the vocabulary"),
        ({"positions": jnp.zeros((2, 5), jnp.int32)}, f"positions: {int_array} [2, 6] like tokens"),
        ({"segment_ids": jnp.zeros((2, 6))}, f"segment_ids: {int_array} [2, 6] like tokens, got float"),
        ({"lora": adapter.weights}, "lora: expected a jtinker.models.lora.Lora (lora.init), got dict"),
        ({"cache": KVCache.zeros(config, 3, 8), "positions": tokens * 0}, "cache: expected a KVCache of 2"),
    ]
    for change, message in bad:
        kwargs = {"tokens": tokens, **change}
        with pytest.raises((ValueError, TypeError), match=re.escape(message)):
            models.forward(config, params, kwargs.pop("tokens"), **kwargs)
    with pytest.raises(ValueError, match=re.escape(f"tokens: {int_array} [batch, seq], got float32")):
        jax.jit(functools.partial(models.forward, config))(params, tokens.astype(jnp.float32))  # traced
    hidden, _ = models.hidden_states(config, params, tokens)
    with pytest.raises(ValueError, match=re.escape(f"targets: {int_array} [2, 6] or [2, 6, K], got")):
        models.token_logprobs(params, hidden, tokens[:, :5])
    with pytest.raises(ValueError, match=re.escape("targets: id -3 at [0, 1] is outside the vocabulary")):
        models.token_logprobs(params, hidden, tokens.at[0, 1].set(-3))


# --------------------------------------------------------------------------------------------------
# 2. KV cache
# --------------------------------------------------------------------------------------------------


def test_kv_cache_zeros_shape(qwen3_dir):
    config = ModelConfig.from_pretrained(qwen3_dir)
    cache = KVCache.zeros(config, 3, 17)
    assert cache.k.shape == cache.v.shape == (config.num_layers, 3, 17, config.num_kv_heads, config.head_dim)
    assert cache.size == 17 and not np.any(np.asarray(cache.k))


def test_kv_cache_prefill_then_decode_matches_full_forward(tiny_model_dir):
    """Right-padded rows of different lengths: prefill writes the padding slots too; decoding
    each row at its own position overwrites them."""
    config, params = models.load_pretrained(tiny_model_dir)
    lengths = np.array([5, 8])
    num_new, size = 4, 16
    full = random_tokens((2, lengths.max() + num_new), seed=4)
    pad = tiny.SPECIAL_TOKENS.index("<|pad|>") + 256
    # causal, so row r's logits up to lengths[r] + num_new are those of that row alone
    ref = fwd(config, params, jnp.asarray(full))

    prompt = full[:, : lengths.max()].copy()
    prompt[0, lengths[0] :] = pad
    t = prompt.shape[1]
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (2, t))
    cache = KVCache.zeros(config, 2, size)
    logits, cache = fwd(config, params, jnp.asarray(prompt), positions=positions, cache=cache)
    assert isinstance(cache, KVCache) and cache.k.shape[2] == size
    # the prefill wrote all t slots of both rows (padding included) and nothing beyond
    assert np.all(np.any(np.asarray(cache.k[:, :, :t]) != 0, axis=(0, 3, 4)))
    assert not np.any(np.asarray(cache.k[:, :, t:]))
    for r in range(2):  # prefill logits of the valid prompt positions
        assert max_err(logits[r, : lengths[r]], ref[r, : lengths[r]]) <= TOL

    pos = lengths.copy()
    for _ in range(num_new):
        step_tokens = full[np.arange(2), pos][:, None]
        step_positions = jnp.asarray(pos[:, None], jnp.int32)
        out, cache = fwd(config, params, jnp.asarray(step_tokens), positions=step_positions, cache=cache)
        assert out.shape == (2, 1, config.vocab_size)
        for r in range(2):
            assert max_err(out[r, 0], ref[r, pos[r]]) <= TOL
        pos = pos + 1

    # sanity: had the padding slot of row 0 stayed stale, its next logits would differ
    stale = full.copy()
    stale[0, lengths[0]] = pad
    assert (
        max_err(fwd(config, params, jnp.asarray(stale))[0, lengths[0] + 1], ref[0, lengths[0] + 1]) > 10 * TOL
    )


# --------------------------------------------------------------------------------------------------
# 3. Packed sequences
# --------------------------------------------------------------------------------------------------


def test_packed_sequences_match_separate_runs(tiny_model_dir):
    config, params = models.load_pretrained(tiny_model_dir)
    a, b = random_tokens((1, 6), seed=5), random_tokens((1, 9), seed=6)
    packed = np.concatenate([a, b], axis=1)
    positions = jnp.asarray([list(range(6)) + list(range(9))])
    got = our_logprobs(
        config, params, packed, positions=positions, segment_ids=jnp.asarray([[0] * 6 + [1] * 9])
    )
    # each alone, right-padded into one batch (causal: the padding does not reach them)
    alone = our_logprobs(config, params, np.concatenate([np.pad(a, ((0, 0), (0, 3))), b]))
    assert max_err(got[0, :6], alone[0, :6]) <= TOL
    assert max_err(got[0, 6:], alone[1]) <= TOL
    # with a single segment the second sequence attends to the first: the mask matters
    leaky = our_logprobs(config, params, packed, positions=positions, segment_ids=jnp.zeros((1, 15), int))
    assert max_err(leaky[0, 6:], alone[1]) > 10 * TOL


def test_packed_batch_with_trailing_padding_segment(qwen3_dir):
    config, params = models.load_pretrained(qwen3_dir)
    seqs = [random_tokens((5,), seed=10 + n)[:n] for n in (3, 4, 5)]
    row0 = np.concatenate([seqs[0], seqs[1], np.zeros(3, np.int32)])  # 3 + 4 + 3 padding
    row1 = np.concatenate([seqs[2], seqs[0], np.zeros(2, np.int32)])  # 5 + 3 + 2 padding
    segment_ids = jnp.asarray([[0] * 3 + [1] * 4 + [2] * 3, [0] * 5 + [1] * 3 + [2] * 2])
    positions = jnp.asarray([[0, 1, 2, 0, 1, 2, 3, 0, 0, 0], [0, 1, 2, 3, 4, 0, 1, 2, 0, 0]])
    got = our_logprobs(config, params, np.stack([row0, row1]), positions=positions, segment_ids=segment_ids)
    assert np.all(np.isfinite(got))
    alone = our_logprobs(config, params, np.stack([np.pad(x, (0, 5 - len(x))) for x in seqs]))
    assert max_err(got[0, :3], alone[0, :3]) <= TOL
    assert max_err(got[0, 3:7], alone[1, :4]) <= TOL
    assert max_err(got[1, :5], alone[2, :5]) <= TOL
    assert max_err(got[1, 5:8], alone[0, :3]) <= TOL


# --------------------------------------------------------------------------------------------------
# 4. Chunked token log-probs
# --------------------------------------------------------------------------------------------------


def _nonzero_unembed_lora(config: ModelConfig) -> lora.Lora:
    lo = lora.init(config, 4, jax.random.key(0), targets=("lm_head",), alpha=8.0)
    b = 0.3 * jax.random.normal(jax.random.key(1), lo.weights["lm_head"]["b"].shape)
    return lo.replace(weights={"lm_head": {"a": lo.weights["lm_head"]["a"], "b": b}})


def _full_logprobs(params, hidden, targets, lo):
    logp = jax.nn.log_softmax(models.unembed(params, hidden, lo), axis=-1)
    if targets.ndim == 2:
        return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return jnp.take_along_axis(logp, targets, axis=-1)


_token_logprobs = jax.jit(models.token_logprobs, static_argnames="chunk_size")
_hidden_states = jax.jit(models.hidden_states, static_argnums=0)

# untied lm_head and tied embedding without LoRA (the custom-VJP path); tied embedding with an lm_head LoRA
TOKEN_LOGPROB_CASES = [("llama", False), ("qwen3", False), ("qwen3", True)]


@pytest.mark.parametrize(("family", "with_lora"), TOKEN_LOGPROB_CASES)
def test_token_logprobs_chunked_matches_full(family, with_lora, tiny_model_factory):
    config, params = models.load_pretrained(tiny_model_factory(family))
    tokens = jnp.asarray(random_tokens((2, 13), seed=7))
    lo = _nonzero_unembed_lora(config) if with_lora else None
    hidden, _ = _hidden_states(config, params, tokens, lora=lo)
    targets = jnp.asarray(random_tokens((2, 13), seed=8))
    targets_k = jnp.asarray(random_tokens((2, 13, 3), seed=9))
    want, want_k = _full_logprobs(params, hidden, targets, lo), _full_logprobs(params, hidden, targets_k, lo)

    for chunk in (5, 64):  # 13 % 5 != 0 (a padded last chunk); chunk > T (one chunk)
        got = _token_logprobs(params, hidden, targets, lo, chunk_size=chunk)
        assert got.shape == (2, 13)
        assert max_err(got, want) <= 1e-5
        got_k = _token_logprobs(params, hidden, targets_k, lo, chunk_size=chunk)
        assert got_k.shape == (2, 13, 3)
        assert max_err(got_k, want_k) <= 1e-5
    # ... which are the plain forward's log-probs
    ref = np.take_along_axis(
        our_logprobs(config, params, tokens, lora=lo), np.asarray(targets)[..., None], -1
    )
    assert max_err(want, ref[..., 0]) <= 1e-5
    if with_lora:  # the adapter is really applied
        assert max_err(want, _full_logprobs(params, hidden, targets, None)) > 1e-2


@pytest.mark.parametrize(("family", "with_lora"), TOKEN_LOGPROB_CASES)
def test_token_logprobs_gradient_matches_full_path(family, with_lora, tiny_model_factory):
    config, params = models.load_pretrained(tiny_model_factory(family))
    tokens = jnp.asarray(random_tokens((2, 13), seed=7))
    lo = _nonzero_unembed_lora(config) if with_lora else None
    hidden, _ = _hidden_states(config, params, tokens, lora=lo)
    targets = jnp.asarray(random_tokens((2, 13), seed=12))
    targets_k = jnp.asarray(random_tokens((2, 13, 2), seed=14))
    weights = jnp.asarray(np.random.default_rng(13).standard_normal((2, 13)), jnp.float32)

    @jax.jit
    def grads(p, h, lo_):
        def chunked(p, h, lo_):
            k = models.token_logprobs(p, h, targets_k, lo_, chunk_size=5).sum()
            return jnp.sum(weights * models.token_logprobs(p, h, targets, lo_, chunk_size=5)) + k

        def full(p, h, lo_):
            k = _full_logprobs(p, h, targets_k, lo_).sum()
            return jnp.sum(weights * _full_logprobs(p, h, targets, lo_)) + k

        return jax.grad(chunked, argnums=(0, 1, 2))(p, h, lo_), jax.grad(full, argnums=(0, 1, 2))(p, h, lo_)

    g_chunk, g_full = grads(params, hidden, lo)
    assert jax.tree.structure(g_chunk) == jax.tree.structure(g_full)
    unembed_key = "lm_head" if "lm_head" in params else "embed"
    assert float(jnp.abs(g_full[0][unembed_key]).max()) > 1e-3  # a real gradient to compare
    assert float(jnp.abs(g_full[1]).max()) > 1e-3
    if with_lora:
        assert float(jnp.abs(g_full[2].weights["lm_head"]["a"]).max()) > 1e-3
    for got, want in zip(jax.tree.leaves(g_chunk), jax.tree.leaves(g_full), strict=True):
        assert max_err(got, want) <= 1e-5 * max(float(jnp.abs(want).max()), 1.0)


def test_token_logprobs_frozen_head_backward_has_no_vocab_product(tiny_model_factory):
    """With the head frozen (LoRA without an lm_head adapter), the backward reuses the forward's expected
    head column: two products over the vocabulary in all (logits, expectation), not a third to recompute."""
    config, params = models.load_pretrained(tiny_model_factory("llama"))
    hidden = jnp.ones((2, 12, config.hidden_size), jnp.float32)
    targets = jnp.zeros((2, 12), jnp.int32)

    def vocab_products(argnums):
        loss = lambda p, h: models.token_logprobs(p, h, targets, chunk_size=4).sum()  # noqa: E731
        grad = jax.value_and_grad(loss, argnums)
        hlo = jax.jit(grad).lower(params, hidden).compile().as_text()
        shapes = dict(re.findall(r"%([\w.\-]+) = (\w+\[[\d,]*\])", hlo))
        dots = re.findall(r"= (\w+\[[\d,]*\])\S* dot\(%([\w.\-]+), %([\w.\-]+)\)", hlo)
        vocab = rf"\b{config.vocab_size}\b"
        return [d for d in dots if any(re.search(vocab, x) for x in (d[0], shapes[d[1]], shapes[d[2]]))]

    assert len(vocab_products(1)) == 2  # loss and d hidden (a recompute would make it 3)
    assert len(vocab_products((0, 1))) == 4  # the head's own gradient recomputes the logits


# --------------------------------------------------------------------------------------------------
# 5. The decoder is one lax.scan over layers
# --------------------------------------------------------------------------------------------------


def _jaxpr_of_forward(config: ModelConfig, **kwargs):
    tokens = jax.ShapeDtypeStruct((2, 7), jnp.int32)
    return jax.make_jaxpr(lambda p, t: models.forward(config, p, t, **kwargs))(
        abstract_params(config), tokens
    )


@pytest.mark.parametrize("remat", [False, True])
def test_forward_scans_over_layers(remat):
    base = ModelConfig.from_hf_dict(tiny.hf_config("qwen3"))
    jaxprs = {n: _jaxpr_of_forward(dataclasses.replace(base, num_layers=n), remat=remat) for n in (2, 6)}
    for n, jaxpr in jaxprs.items():
        scans = [e for e in jaxpr.eqns if e.primitive.name == "scan"]
        assert len(scans) == 1 and scans[0].params["length"] == n
        # only the unembedding matmul lives outside the scan
        assert sum(e.primitive.name == "dot_general" for e in jaxpr.eqns) == 1
    # the traced program does not grow with depth (no Python loop over layers)
    assert len(jaxprs[2].eqns) == len(jaxprs[6].eqns)
    assert str(jaxprs[2].eqns[-1]) == str(jaxprs[6].eqns[-1])


# --------------------------------------------------------------------------------------------------
# 6. Loader refusals
# --------------------------------------------------------------------------------------------------


def _rewrite_weights(model_dir: Path, edit) -> None:
    path = model_dir / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


@pytest.fixture
def llama_copy(tiny_model_factory, tmp_path) -> Path:
    return copy_dir(tiny_model_factory("llama"), tmp_path / "llama")


@pytest.mark.parametrize(
    "name", ["model.layers.1.mlp.up_proj.weight", "lm_head.weight", "model.layers.0.input_layernorm.weight"]
)
def test_missing_tensor_is_named(llama_copy, name):
    _rewrite_weights(llama_copy, lambda t: t.pop(name))
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        models.load_pretrained(llama_copy)


@pytest.mark.parametrize(
    "name",
    ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight", "model.norm.weight"],
)
def test_wrong_shape_is_named(llama_copy, name):
    def edit(t):
        t[name] = np.zeros(t[name].shape[:-1] + (t[name].shape[-1] + 1,), np.float32)

    _rewrite_weights(llama_copy, edit)
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        models.load_pretrained(llama_copy)


def test_unexpected_tensor_is_named(llama_copy):
    name = "model.layers.0.mlp.extra_proj.weight"
    _rewrite_weights(llama_copy, lambda t: t.__setitem__(name, np.zeros((4, 4), np.float32)))
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        models.load_pretrained(llama_copy)


def test_tied_model_ignores_saved_lm_head_and_rotary_buffers(tiny_model_factory, tmp_path):
    """Tied checkpoints may still carry ``lm_head.weight``; old ones carry ``rotary_emb.inv_freq``."""
    model_dir = copy_dir(tiny_model_factory("qwen2"), tmp_path / "qwen2")
    config, params = models.load_pretrained(model_dir)

    def edit(t):
        t["lm_head.weight"] = t["model.embed_tokens.weight"].copy()
        t["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones((8,), np.float32)

    _rewrite_weights(model_dir, edit)
    _, params2 = models.load_pretrained(model_dir)
    assert "lm_head" not in params2
    jax.tree.map(np.testing.assert_array_equal, params, params2)


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        (dict(hidden_act="gelu"), "hidden_act"),
        (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "yarn"),
        (dict(rope_scaling=..., rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4}), "dynamic"),
        (dict(model_type="gpt2"), "gpt2"),
        (dict(use_sliding_window=True), "use_sliding_window"),
        (dict(mlp_bias=True), "mlp_bias"),
        (dict(partial_rotary_factor=0.5), "partial_rotary_factor"),
        (dict(pretraining_tp=2), "pretraining_tp"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_unsupported_config_is_refused(llama_copy, changes, named):
    edit_config(llama_copy, **changes)
    with pytest.raises(ValueError, match=named):
        models.load_pretrained(llama_copy)
    with pytest.raises(ValueError, match=named):
        ModelConfig.from_pretrained(llama_copy)


def test_missing_files_raise_file_not_found(tiny_model_factory, tmp_path):
    model_dir = copy_dir(tiny_model_factory("qwen3"), tmp_path / "no_config")
    (model_dir / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        models.load_pretrained(model_dir)

    model_dir = copy_dir(tiny_model_factory("qwen3"), tmp_path / "no_weights")
    (model_dir / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        models.load_pretrained(model_dir)

    model_dir = copy_dir(tiny_model_factory("llama", shards=3), tmp_path / "no_shard")
    (model_dir / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00003.safetensors"):
        models.load_pretrained(model_dir)


@pytest.mark.parametrize("packed", [False, True])
def test_fused_attention_matches_ours(packed):
    """``fused_attention`` hands jax.nn.dot_product_attention what cuDNN gets on a GPU (the same call,
    ``implementation="xla"`` here): grouped heads, a causal flag or a packed mask. Values and
    gradients must equal our kernel's."""
    from jtinker.models import llama

    b, t, heads, kv, d = 2, 12, 8, 2, 16
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (b, t, heads, d))
    k, v = (jax.random.normal(key, (b, t, kv, d)) for key in keys[1:3])
    cotangent = jax.random.normal(keys[3], (b, t, heads * d))
    mask = None
    if packed:
        segments = jnp.asarray([[0] * 5 + [1] * 7, [0] * 12])
        mask = jnp.tril(jnp.ones((t, t), bool))[None] & (segments[:, :, None] == segments[:, None, :])

    def loss(fn, q, k, v):
        return jnp.sum(fn(q, k, v, mask) * cotangent)

    ours = jax.value_and_grad(functools.partial(loss, llama.attention), argnums=(0, 1, 2))(q, k, v)
    fused = functools.partial(llama.fused_attention, implementation="xla")
    theirs = jax.value_and_grad(functools.partial(loss, fused), argnums=(0, 1, 2))(q, k, v)
    chex.assert_trees_all_close(ours, theirs, atol=1e-4, rtol=1e-4)
    if packed:  # the mask matters: causal alone differs
        causal = llama.attention(q, k, v, None)
        assert max_err(causal, llama.attention(q, k, v, mask)) > 10 * TOL
