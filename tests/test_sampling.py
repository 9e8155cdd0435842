"""The sampling engine against transformers / PEFT, plus its own contracts.

One ``Sampler`` per model directory is shared by the whole module (and the prompts keep to a few
bucketed shapes), so each family compiles its programs only a few times.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jtinker import sharding
from jtinker.models import load_pretrained
from jtinker.models import lora as lora_lib
from jtinker.sampling import (
    Sampler,
    SampleRequest,
    TextStream,
    _filter,
    _row_keys,
    _Rows,
    _select,
    compile_counts,
    first_stop,
)

transformers = pytest.importorskip("transformers")

EOS = 258  # <|im_end|> in the tiny tokenizer (generation_config.eos_token_id)
PROMPTS = [[5, 17, 99, 200, 33, 71, 8, 150, 42, 9], list(range(40, 53))]


class Model:
    """A tiny model loaded three ways: jtinker params, a shared Sampler, and transformers."""

    def __init__(self, path):
        self.path = path
        self.config, self.params = load_pretrained(path)
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        self.sampler = Sampler(self.config, self.params, self.tokenizer)

    def hf(self):
        return transformers.AutoModelForCausalLM.from_pretrained(self.path, dtype=torch.float32).eval()


_MODELS: dict = {}


def model_for(factory, family: str, **overrides) -> Model:
    key = (family, tuple(sorted(overrides.items())))
    if key not in _MODELS:
        _MODELS[key] = Model(factory(family, **overrides))
    return _MODELS[key]


@pytest.fixture(params=["llama", "qwen2", "qwen3"])
def family_model(request, tiny_model_factory) -> Model:
    return model_for(tiny_model_factory, request.param)


@pytest.fixture
def qwen3(tiny_model_factory) -> Model:
    return model_for(tiny_model_factory, "qwen3")


@pytest.fixture
def llama(tiny_model_factory) -> Model:
    # Untied lm_head and varied greedy text (tied tiny models tend to repeat one token).
    return model_for(tiny_model_factory, "llama")


def hf_greedy(model, prompt: list[int], n: int, **generate_kw) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=n,
            pad_token_id=259,
            **generate_kw,
        )
    return out[0, len(prompt) :].tolist()


def hf_logprobs(model, sequence: list[int]) -> np.ndarray:
    """``log p(seq[i] | seq[:i])`` for i >= 1 from a transformers forward."""
    with torch.no_grad():
        logits = model(torch.tensor([sequence])).logits[0].double()
    lp = torch.log_softmax(logits, -1)[:-1].gather(-1, torch.tensor(sequence[1:])[:, None])[:, 0]
    return lp.numpy()


def greedy(prompt, max_tokens=32, num_samples=1, **kw) -> SampleRequest:
    return SampleRequest(prompt=prompt, num_samples=num_samples, max_tokens=max_tokens, temperature=0.0, **kw)


def hf_greedy_until_eos(model, prompt: list[int], n: int) -> list[int]:
    expected = hf_greedy(model, prompt, n)
    return expected[: expected.index(EOS) + 1] if EOS in expected else expected


# ----------------------------------------------------------------------------------- reference


def test_greedy_matches_transformers(family_model):
    """Two prompts of different lengths in one batch, each equal to HF generate (up to EOS)."""
    hf = family_model.hf()
    results = family_model.sampler.sample([greedy(p, stop_token_ids=(EOS,)) for p in PROMPTS])
    for prompt, result in zip(PROMPTS, results, strict=True):
        tokens, logprobs, reason = result.sequences[0]
        assert tokens == hf_greedy_until_eos(hf, prompt, 32)
        assert reason == ("stop" if tokens[-1] == EOS else "length")
        # Logprobs of the sampled tokens are the raw log-softmax the learner would compute.
        np.testing.assert_allclose(logprobs, hf_logprobs(hf, prompt + tokens)[len(prompt) - 1 :], atol=1e-4)


def _peft_reference(model: Model, lora: lora_lib.Lora):
    """HF + PEFT with the same adapter: PEFT's A = a.T, B = b.T."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=lora.rank, lora_alpha=lora.alpha, target_modules=list(lora.targets), lora_dropout=0.0, bias="none"
    )
    peft_model = get_peft_model(model.hf(), cfg).eval()
    layers = lora.weights.get("layers", {})
    seen = 0
    for name, module in peft_model.named_modules():
        if not hasattr(module, "lora_A") or "default" not in module.lora_A:
            continue
        target = name.split(".")[-1]
        if target == lora_lib.UNEMBED_TARGET:
            a, b = lora.weights[target]["a"], lora.weights[target]["b"]
        else:
            i = int(name.split(".layers.")[1].split(".")[0])
            a, b = layers[target]["a"][i], layers[target]["b"][i]
        module.lora_A["default"].weight.data = torch.tensor(np.asarray(a).T.copy())
        module.lora_B["default"].weight.data = torch.tensor(np.asarray(b).T.copy())
        seen += 1
    assert seen == len(layers) * model.config.num_layers + (lora_lib.UNEMBED_TARGET in lora.weights)
    return peft_model


def _random_lora(config, rank=4, alpha=8.0, seed=0) -> lora_lib.Lora:
    lora = lora_lib.init(config, rank, jax.random.key(seed), alpha=alpha)
    leaves, treedef = jax.tree.flatten(lora)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    # Non-zero b (init has b = 0), large enough to change the greedy output.
    leaves = [x + 0.2 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    return jax.tree.unflatten(treedef, leaves)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_greedy_with_lora_matches_peft(tiny_model_factory, family):
    model = model_for(tiny_model_factory, family)
    lora = _random_lora(model.config)
    peft_model = _peft_reference(model, lora)
    requests = [greedy(p, stop_token_ids=(EOS,)) for p in PROMPTS]
    results = model.sampler.sample(requests, lora=lora)
    base = model.sampler.sample(requests)
    for prompt, result, base_result in zip(PROMPTS, results, base, strict=True):
        tokens, logprobs, _ = result.sequences[0]
        assert tokens != base_result.sequences[0][0], "the adapter should change the greedy output"
        assert tokens == hf_greedy_until_eos(peft_model, prompt, 32)
        np.testing.assert_allclose(
            logprobs, hf_logprobs(peft_model, prompt + tokens)[len(prompt) - 1 :], atol=1e-4
        )


def test_compute_logprobs_matches_transformers(family_model):
    prompts = [PROMPTS[0], PROMPTS[1], [7], PROMPTS[0]]  # a repeat and a single token
    out = family_model.sampler.compute_logprobs(prompts)
    hf = family_model.hf()
    for prompt, lps in zip(prompts, out, strict=True):
        assert len(lps) == len(prompt) and lps[0] is None
        if len(prompt) > 1:
            np.testing.assert_allclose(lps[1:], hf_logprobs(hf, prompt), atol=1e-4)


def test_prompt_logprobs_and_topk(qwen3):
    request = greedy(PROMPTS[1], max_tokens=4, include_prompt_logprobs=True, topk_prompt_logprobs=3)
    result = qwen3.sampler.sample([request, greedy(PROMPTS[0], max_tokens=4)])
    assert result[1].prompt_logprobs is None and result[1].topk_prompt_logprobs is None
    lp, topk = result[0].prompt_logprobs, result[0].topk_prompt_logprobs
    assert lp == pytest.approx(qwen3.sampler.compute_logprobs([PROMPTS[1]])[0], abs=1e-5)
    assert len(topk) == len(PROMPTS[1]) and topk[0] is None
    with torch.no_grad():
        logits = qwen3.hf()(torch.tensor([PROMPTS[1]])).logits[0]
    ref = torch.log_softmax(logits.double(), -1).topk(3, dim=-1)
    for i in range(1, len(PROMPTS[1])):
        assert [t for t, _ in topk[i]] == ref.indices[i - 1].tolist()
        np.testing.assert_allclose([v for _, v in topk[i]], ref.values[i - 1].numpy(), atol=1e-4)
        assert lp[i] <= topk[i][0][1] + 1e-6


def test_target_prompt_logprobs_match_transformers(qwen3):
    """Two requests on one prompt ask for different ids (each gets its own), beside a plain request."""
    prompt = PROMPTS[1]
    with torch.no_grad():
        ref = torch.log_softmax(qwen3.hf()(torch.tensor([prompt])).logits[0].double(), -1).numpy()
    rng = np.random.default_rng(0)
    asks = [rng.integers(0, qwen3.config.vocab_size, (len(prompt) - 1, k)) for k in (3, 5)]
    asks[1][::2, 1:] = -1  # cells that ask for nothing
    requests = [greedy(prompt, max_tokens=3, target_prompt_ids=ids) for ids in asks] + [greedy(prompt, 3)]
    results = qwen3.sampler.sample(requests)
    for ids, result in zip(asks, results, strict=False):
        want = np.where(ids >= 0, np.take_along_axis(ref[:-1], np.maximum(ids, 0), axis=-1), 0.0)
        assert result.target_prompt_logprobs.shape == ids.shape
        np.testing.assert_allclose(result.target_prompt_logprobs, want, atol=1e-4)
    assert results[2].target_prompt_logprobs is None
    assert results[0].sequences == results[2].sequences  # the targets change nothing else


def test_topk_sample_logprobs_match_transformers(qwen3):
    """At every sampled position, the top-k of the raw next-token distribution (what transformers
    gives for the same sequence), in a batch that mixes k = 5, k = 2 and none."""
    prompt = PROMPTS[0]
    requests = [
        SampleRequest(
            prompt=prompt, num_samples=2, max_tokens=6, temperature=1.0, seed=4, topk_sample_logprobs=5
        ),
        greedy(prompt, max_tokens=6, topk_sample_logprobs=2),
        greedy(prompt, max_tokens=6),
    ]
    results = qwen3.sampler.sample(requests)
    hf = qwen3.hf()
    for request, result in zip(requests[:2], results, strict=False):
        k = request.topk_sample_logprobs
        for (tokens, _, _), (ids, lps) in zip(result.sequences, result.sequence_topk, strict=True):
            with torch.no_grad():
                logits = hf(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1].double()
            ref = torch.log_softmax(logits, -1).topk(k, dim=-1)
            assert ids.shape == lps.shape == (len(tokens), k)
            np.testing.assert_array_equal(ids, ref.indices.numpy())
            np.testing.assert_allclose(lps, ref.values.numpy(), atol=1e-4)
    greedy_tokens, greedy_lps, _ = results[1].sequences[0]
    ids, lps = results[1].sequence_topk[0]
    assert ids[:, 0].tolist() == greedy_tokens and lps[:, 0] == pytest.approx(greedy_lps, abs=1e-6)
    assert results[2].sequence_topk is None and results[2].sequences == results[1].sequences


def test_prompt_alt_tokens_follow_the_tempered_distribution(qwen3):
    """4096 draws at one prompt position: their frequencies follow softmax(logits / T) from
    transformers, their logprobs are the raw ones, a seed repeats them and T = 0 draws the argmax."""
    prompt, n, temperature = [11, 42], 4096, 0.1
    with torch.no_grad():
        logits = qwen3.hf()(torch.tensor([prompt])).logits[0, 0].double()
    raw = torch.log_softmax(logits, -1).numpy()
    expected = torch.softmax(logits / temperature, -1).numpy()

    def draw(temperature, seed=3):
        request = SampleRequest(
            prompt=prompt,
            num_samples=1,
            max_tokens=1,
            temperature=temperature,
            seed=seed,
            prompt_alt_tokens_k=n,
        )
        tokens, logprobs = qwen3.sampler.sample([request])[0].prompt_alt_tokens
        assert tokens.shape == logprobs.shape == (1, n)
        return tokens[0], logprobs[0]

    tokens, logprobs = draw(temperature)
    np.testing.assert_allclose(logprobs, raw[tokens], atol=1e-4)
    freq = np.bincount(tokens, minlength=len(expected)) / n
    likely = expected > 0.02
    assert likely.sum() >= 3  # the test distinguishes more than a few tokens
    np.testing.assert_array_less(
        np.abs(freq - expected)[likely], 4 * np.sqrt(expected * (1 - expected) / n)[likely]
    )
    assert freq[expected < 1e-4].sum() < 0.01
    np.testing.assert_array_equal(draw(temperature)[0], tokens)  # seeded: the same draws
    assert not np.array_equal(draw(temperature, seed=4)[0], tokens)
    assert set(draw(0.0)[0].tolist()) == {int(np.argmax(raw))}


# ---------------------------------------------------------------------------------- semantics


def test_sampled_logprobs_match_compute_logprobs(qwen3):
    request = SampleRequest(
        prompt=PROMPTS[0], num_samples=3, max_tokens=20, temperature=0.7, top_p=0.9, seed=1
    )
    (result,) = qwen3.sampler.sample([request])
    assert len({tuple(seq[0]) for seq in result.sequences}) > 1, "samples should differ"
    full = qwen3.sampler.compute_logprobs([PROMPTS[0] + seq[0] for seq in result.sequences])
    for (tokens, logprobs, reason), ref in zip(result.sequences, full, strict=True):
        assert reason == "length" and len(tokens) == len(logprobs) == 20
        np.testing.assert_allclose(logprobs, ref[len(PROMPTS[0]) :], atol=1e-4)


def test_top_k_1_is_greedy(llama):
    base = llama.sampler.sample([greedy(p) for p in PROMPTS])
    topk = llama.sampler.sample(
        [SampleRequest(prompt=p, num_samples=2, max_tokens=32, temperature=1.0, top_k=1) for p in PROMPTS]
    )
    for b, t in zip(base, topk, strict=True):
        assert [seq[0] for seq in t.sequences] == [b.sequences[0][0]] * 2


def test_num_samples_share_one_prefill(llama):
    results = llama.sampler.sample(
        [greedy(PROMPTS[0], num_samples=3), greedy(PROMPTS[0]), greedy(PROMPTS[1])]
    )
    assert llama.sampler.last_stats["prefill_prompts"] == 2
    first = results[0].sequences[0]
    assert results[0].sequences == [first] * 3 and results[1].sequences == [first]


def test_stop_token_and_length(llama):
    (base,) = llama.sampler.sample([greedy(PROMPTS[1])])
    tokens = base.sequences[0][0]
    assert base.sequences[0][2] == "length" and len(tokens) == 32
    stop = tokens[5]
    cut = tokens.index(stop) + 1
    (result,) = llama.sampler.sample([greedy(PROMPTS[1], stop_token_ids=(stop, EOS))])
    assert result.sequences[0][0] == tokens[:cut] and result.sequences[0][2] == "stop"
    assert len(result.sequences[0][1]) == cut
    (short,) = llama.sampler.sample([greedy(PROMPTS[1], max_tokens=5)])
    assert short.sequences[0][0] == tokens[:5] and short.sequences[0][2] == "length"


def test_client_stops_at_eos_unless_told_otherwise(service, qwen3):
    """Tinker's SamplingParams: ``stop=None`` stops at the model's EOS, ``stop=[]`` runs to max_tokens
    and an explicit stop list replaces EOS. The same seed draws the same tokens up to the stop."""
    from jtinker import types

    client = service.create_sampling_client(base_model=str(qwen3.path))
    prompt = types.ModelInput.from_ints(PROMPTS[0])

    def draw(seed: int, **stop) -> list:
        params = types.SamplingParams(max_tokens=24, temperature=1.0, seed=seed, **stop)
        return client.sample(prompt, 4, params).result().sequences

    stopped = 0
    for seed in range(6):
        by_eos, unstopped = draw(seed), draw(seed, stop=[])
        assert [len(s.tokens) for s in unstopped] == [24] * 4
        assert all(s.stop_reason == "length" for s in unstopped)
        for short, full in zip(by_eos, unstopped, strict=True):
            if EOS in full.tokens:
                cut = full.tokens.index(EOS) + 1
                assert (short.tokens, short.stop_reason) == (full.tokens[:cut], "stop")
                stopped += 1
            else:
                assert (short.tokens, short.stop_reason) == (full.tokens, "length")
        other = full.tokens[3]
        explicit = draw(seed, stop=[other])[-1].tokens  # EOS no longer stops it, `other` does
        assert explicit == full.tokens[: full.tokens.index(other) + 1]
    assert stopped >= 2  # the tiny model does emit EOS

    # What the SDK's SamplingParams cannot say (penalties, min_p), an engine request says, with the
    # client's weights.
    extra = {"min_p": 0.05, "presence_penalty": 1.5, "frequency_penalty": 0.5}
    request = greedy(PROMPTS[0], max_tokens=12, **extra)
    got = client.submit_request(request).result().sequences[0][0]
    (want,) = qwen3.sampler.sample([request])
    (plain,) = qwen3.sampler.sample([greedy(PROMPTS[0], max_tokens=12)])
    assert got == want.sequences[0][0] != plain.sequences[0][0]


def _first_stop(tokenizer, tokens, stop) -> int | None:
    for n in range(1, len(tokens) + 1):
        if stop in tokenizer.decode(tokens[:n]):
            return n
    return None


def test_stop_string_across_tokens(llama):
    (base,) = llama.sampler.sample([greedy(PROMPTS[1])])
    tokens = base.sequences[0][0]
    # A two-token stop string that greedy decoding really produces, matched across the boundary.
    for i in range(1, len(tokens) - 1):
        stop = llama.tokenizer.decode(tokens[i : i + 2])
        n = _first_stop(llama.tokenizer, tokens, stop)
        if len(stop) == 2 and "\ufffd" not in stop and n is not None and 2 <= n < 20:
            break
    else:
        pytest.fail(f"no clean two-token stop string in {llama.tokenizer.decode(tokens)!r}")
    assert _first_stop(llama.tokenizer, tokens, stop[:1]) != n or n == 1  # needs both tokens
    llama.sampler.stop_check_interval = 4
    try:
        (result,) = llama.sampler.sample([greedy(PROMPTS[1], stop_strings=("never seen", stop))])
    finally:
        llama.sampler.stop_check_interval = 16
    got, logprobs, reason = result.sequences[0]
    assert got == tokens[:n] and reason == "stop" and len(logprobs) == n
    assert stop in llama.tokenizer.decode(got) and stop not in llama.tokenizer.decode(got[:-1])
    # Decoding stopped early (checked every 4 steps), not after all 32 steps.
    assert llama.sampler.last_stats["decode_steps"] <= n + 4 < 32


def test_first_token_comes_from_the_prefill(llama):
    """The first token is sampled from the prefill's logits, so a one-token sample (what
    ``compute_logprobs`` sends) runs no decode program, and ``n`` tokens take ``n - 1`` passes."""
    (one,) = llama.sampler.sample([greedy(PROMPTS[0], max_tokens=1)])
    assert llama.sampler.last_stats["decode_calls"] == 0 and llama.sampler.last_stats["decode_steps"] == 1
    (five,) = llama.sampler.sample([greedy(PROMPTS[0], max_tokens=5)])
    assert llama.sampler.last_stats["decode_calls"] == 1
    assert five.sequences[0][0][:1] == one.sequences[0][0]
    assert five.sequences[0][1][0] == pytest.approx(one.sequences[0][1][0], abs=1e-6)


def test_seed_determinism_independent_of_batch(llama):
    request = SampleRequest(prompt=PROMPTS[0], num_samples=2, max_tokens=16, temperature=1.0, seed=1234)
    (alone,) = llama.sampler.sample([request])
    (again,) = llama.sampler.sample([request])
    assert alone.sequences == again.sequences
    assert alone.sequences[0][0] != alone.sequences[1][0], "sample index must change the stream"
    others = [
        greedy(PROMPTS[1], max_tokens=30),
        SampleRequest(prompt=[1, 2, 3], num_samples=1, max_tokens=16, temperature=0.5, top_k=5, seed=7),
    ]
    batched = llama.sampler.sample([others[0], request, others[1]])[1]
    for a, b in zip(alone.sequences, batched.sequences, strict=True):
        assert a[0] == b[0]
        np.testing.assert_allclose(a[1], b[1], atol=1e-5)
    unseeded = [
        llama.sampler.sample([SampleRequest(prompt=PROMPTS[0], num_samples=1, max_tokens=16)])[0].sequences[
            0
        ][0]
        for _ in range(2)
    ]
    assert unseeded[0] != unseeded[1]


def test_a_cache_budget_splits_the_batch_and_refuses_what_cannot_fit(llama, monkeypatch):
    """``max_cache_bytes`` bounds one batch's KV cache (on a GPU: what would otherwise run out of
    memory): rows run in as many batches as it takes, with the same results, and one sample that
    needs more than the budget is refused by name before anything runs."""
    c = llama.config
    slot = 2 * c.num_layers * c.num_kv_heads * c.head_dim * 4  # f32
    budget = 2 * 64 * slot  # two rows of 64 slots
    bounded = Sampler(llama.config, llama.params, max_cache_bytes=budget, prefix_cache_bytes=0)
    requests = [
        SampleRequest(
            prompt=PROMPTS[i % 2], num_samples=1 + i % 2, max_tokens=20 + 5 * i, temperature=1.0, seed=i
        )
        for i in range(4)
    ]
    got = bounded.sample(requests)
    assert bounded.last_stats["decode_calls"] == 3  # rows 1 + 2 + 1 + 2 in batches of at most two
    for g, w in zip(got, llama.sampler.sample(requests), strict=True):
        for (gt, gl, gr), (wt, wl, wr) in zip(g.sequences, w.sequences, strict=True):
            assert (gt, gr) == (wt, wr)
            np.testing.assert_allclose(gl, wl, atol=1e-5)
    too_long = SampleRequest(prompt=PROMPTS[0], num_samples=1, max_tokens=130)  # 140 positions: 256 slots
    with pytest.raises(ValueError, match=r"requests\[1\]\.max_tokens: .* KV cache, over the sampler's"):
        bounded.sample([requests[0], too_long])
    for value, error in (("0", "must be > 0"), ("lots", "must be an integer")):
        monkeypatch.setenv("JTINKER_SAMPLE_CACHE_MIB", value)
        with pytest.raises(ValueError, match=f"JTINKER_SAMPLE_CACHE_MIB.*{error}"):
            Sampler(llama.config, llama.params)


def test_requests_with_different_adapters_share_one_batch(qwen3):
    """One call, four adapters (one of them the base model): one prefill and one decode, and each
    request gets what it gets alone, token for token."""
    config = qwen3.config
    # b = 0 at init: shift every weight so each adapter changes the model, differently
    los = [
        jax.tree.map(lambda x, k=k: x + 0.02 * (k + 1), lora_lib.init(config, 4, jax.random.key(k)))
        for k in range(3)
    ]
    adapters = [los[2], None, los[0], los[2], los[1]]
    requests = [
        SampleRequest(prompt=PROMPTS[i % 2][: 6 + i], num_samples=2, max_tokens=12, seed=i, temperature=1.0)
        for i in range(len(adapters))
    ]
    requests[1].include_prompt_logprobs = True
    mixed = qwen3.sampler.sample(requests, adapters)
    assert qwen3.sampler.last_stats["decode_calls"] == 1
    for request, adapter, got in zip(requests, adapters, mixed, strict=True):
        (want,) = qwen3.sampler.sample([request], adapter)
        for (gt, gl, gr), (wt, wl, wr) in zip(got.sequences, want.sequences, strict=True):
            assert (gt, gr) == (wt, wr)
            np.testing.assert_allclose(gl, wl, atol=2e-5)
    np.testing.assert_allclose(mixed[1].prompt_logprobs[1:], want_base_prompt(qwen3, requests[1]), atol=2e-5)
    tokens = [[s[0] for s in r.sequences] for r in mixed]
    assert tokens[0] != tokens[3], "different seeds"
    assert qwen3.sampler.sample([requests[0]], los[0])[0].sequences != mixed[0].sequences, "adapters differ"
    with pytest.raises(ValueError, match=r"lora\[1\]: its shapes"):
        qwen3.sampler.sample(requests[:2], [los[0], lora_lib.init(config, 8, jax.random.key(0))])
    with pytest.raises(ValueError, match="lora: got 1 adapters for 2 requests"):
        qwen3.sampler.sample(requests[:2], [los[0]])


def test_adapter_mixes_share_power_of_two_programs(qwen3):
    """Three adapters sample with the programs of four (stacks are padded to a power of two: a dummy
    adapter has no rows), and each request still gets what it gets alone."""
    los = [
        jax.tree.map(lambda x, k=k: x + 0.02 * (k + 1), lora_lib.init(qwen3.config, 4, jax.random.key(k)))
        for k in range(4)
    ]
    requests = [
        SampleRequest(prompt=PROMPTS[0][:6], num_samples=2, max_tokens=8, seed=i, temperature=1.0)
        for i in range(4)
    ]
    qwen3.sampler.sample(requests, los)
    before = compile_counts()
    three = [los[0], los[1], los[2], los[0]]
    mixed = qwen3.sampler.sample(requests, three)
    assert compile_counts() == before
    for request, adapter, got in zip(requests, three, mixed, strict=True):
        (want,) = qwen3.sampler.sample([request], adapter)
        assert [s[0] for s in got.sequences] == [s[0] for s in want.sequences]


def want_base_prompt(model, request):
    return model.sampler.compute_logprobs([request.prompt])[0][1:]


def test_bad_requests_name_the_field(qwen3):
    v = qwen3.config.vocab_size
    ok = dict(prompt=[1, 2, 3], num_samples=1, max_tokens=4)
    cases = {
        "prompt": dict(prompt=[]),
        "token id": dict(prompt=[1, v]),
        "max_tokens": dict(max_tokens=0),
        "max_position_embeddings": dict(max_tokens=qwen3.config.max_position_embeddings),
        "top_p": dict(top_p=0.0),
        "temperature": dict(temperature=-0.1),
        "num_samples": dict(num_samples=0),
        "top_k": dict(top_k=0),
        "stop_token_ids": dict(stop_token_ids=(v,)),
        "topk_prompt_logprobs": dict(topk_prompt_logprobs=-1),
        "topk_sample_logprobs": dict(topk_sample_logprobs=v + 1),
        "prompt_alt_tokens_k: must be": dict(prompt_alt_tokens_k=-1),
        "prompt_alt_tokens_k: .* exceed": dict(prompt_alt_tokens_k=1 << 20),
        "prompt_alt_tokens_k: the prompt": dict(prompt=[4], prompt_alt_tokens_k=2),
        "target_prompt_logprobs: must have shape": dict(target_prompt_ids=np.zeros((3, 1), np.int64)),
        "target_prompt_logprobs: ids must be": dict(target_prompt_ids=np.full((2, 1), v)),
        "target_prompt_logprobs: names no": dict(target_prompt_ids=np.full((2, 4), -1)),
        "target_prompt_logprobs: must hold integer": dict(target_prompt_ids=np.zeros((2, 1), np.float32)),
        "min_p: must be a number in \\[0, 1\\], got 1.5": dict(min_p=1.5),
        "presence_penalty: must be a number in \\[-2, 2\\], got -3": dict(presence_penalty=-3),
        "frequency_penalty: must be a number in \\[-2, 2\\], got nan": dict(frequency_penalty=float("nan")),
        "frequency_penalty: .* got '1'": dict(frequency_penalty="1"),
        "repetition_penalty: must be a finite number > 0 \\(1: off\\), got 0": dict(repetition_penalty=0),
        "repetition_penalty: .* got inf": dict(repetition_penalty=float("inf")),
        "repetition_penalty: .* got True": dict(repetition_penalty=True),
        "logit_bias: 9999999 is not a token id": dict(logit_bias={9999999: 1.0}),
        "logit_bias: token 5's bias must be a number in \\[-100, 100\\], got 101": dict(logit_bias={5: 101}),
        "logit_bias: keys must be token ids, got '5'": dict(logit_bias={"5": 1.0}),
        "logit_bias: must be a dict": dict(logit_bias=[5]),
    }
    for field, bad in cases.items():
        with pytest.raises(ValueError, match=field):
            qwen3.sampler.validate(SampleRequest(**{**ok, **bad}))
    with pytest.raises(ValueError, match="top_k"):
        qwen3.sampler.validate(SampleRequest(**{**ok, "top_k": -2}))
    with pytest.raises(ValueError, match="top_p"):
        qwen3.sampler.validate(SampleRequest(**{**ok, "top_p": 1.5}))
    with pytest.raises(ValueError, match=r"requests\[1\]\.top_p"):
        qwen3.sampler.sample([SampleRequest(**ok), SampleRequest(**{**ok, "top_p": 2.0})])
    with pytest.raises(ValueError, match=r"prompts\[0\]"):
        qwen3.sampler.compute_logprobs([[-1]])
    no_tokenizer = Sampler(qwen3.config, qwen3.params)
    with pytest.raises(ValueError, match="stop_strings"):
        no_tokenizer.validate(SampleRequest(**ok, stop_strings=("x",)))
    # The batch that was refused leaves the sampler usable.
    (result,) = qwen3.sampler.sample([greedy([1, 2, 3], max_tokens=4)])
    assert len(result.sequences[0][0]) == 4


def test_an_unplaced_adapter_runs_the_placed_ones_programs(tiny_model_factory):
    """On a mesh, an adapter restored unplaced (as from a checkpoint) and the same adapter placed by
    the sharding rules (as training leaves it) sample alike with the same compiled programs."""
    config, params = load_pretrained(tiny_model_factory("qwen3", max_position_embeddings=384))
    mesh = sharding.make_mesh()
    sampler = Sampler(config, params, mesh=mesh)
    lora = jax.tree.map(lambda x: x + 0.05, lora_lib.init(config, 4, jax.random.key(3)))
    placed = sharding.place_lora(mesh, sharding.ShardingRules(), lora)
    request = SampleRequest(prompt=list(range(5, 25)), num_samples=2, max_tokens=6, temperature=0.0)
    (want,) = sampler.sample([request], placed)
    before = compile_counts()
    unplaced = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), lora)
    assert jax.tree.leaves(unplaced)[0].sharding != jax.tree.leaves(placed)[0].sharding
    (got,) = sampler.sample([request], unplaced)
    assert compile_counts() == before
    assert [s[0] for s in got.sequences] == [s[0] for s in want.sequences]


def test_compile_count_is_bounded(tiny_model_factory):
    # A config no other test uses, so every program this stream needs is compiled here.
    config, params = load_pretrained(tiny_model_factory("qwen3", max_position_embeddings=512))
    sampler = Sampler(config, params)
    before = compile_counts()
    rng = np.random.default_rng(0)
    for i in range(20):
        length, max_tokens = int(rng.integers(1, 30)), int(rng.integers(1, 30))
        request = SampleRequest(
            prompt=rng.integers(0, 256, length).tolist(),
            num_samples=int(rng.integers(1, 3)),
            max_tokens=max_tokens,
            temperature=float(rng.choice([0.0, 0.7, 1.0])),
            top_k=int(rng.choice([-1, 5])),
            top_p=float(rng.choice([1.0, 0.9])),
            seed=i,
        )
        (result,) = sampler.sample([request])
        assert all(len(seq[0]) == max_tokens for seq in result.sequences)
    counts = {k: v - before[k] for k, v in compile_counts().items()}
    # Prompt buckets {16, 32}, cache buckets {32, 64}, batch buckets {1, 2}: 20 requests with 20
    # distinct (length, max_tokens, sampling params) share a handful of programs.
    assert counts["prefill"] <= 2 and counts["decode"] <= 4 and counts["grow"] <= 8, counts
    assert counts["first"] <= 2  # the token selection is keyed by the batch bucket alone
    assert counts["decode"] >= 1


# ------------------------------------------------------------------------- token selection units


def _rows(
    temperature,
    top_k,
    top_p,
    n,
    *,
    min_p=0.0,
    presence=0.0,
    frequency=0.0,
    repetition=1.0,
    context=None,
    bias=(),
) -> _Rows:
    """``n`` rows alike but for ``bias`` (one ``{token: bias}`` per row) and ``context``."""
    width = max((len(b) for b in bias), default=0)
    bias_ids, bias_values = np.full((n, width), -1, np.int32), np.zeros((n, width), np.float32)
    for row, b in enumerate(bias):
        bias_ids[row, : len(b)], bias_values[row, : len(b)] = list(b), list(b.values())
    return _Rows(
        prompt_len=jnp.ones(n, jnp.int32),
        max_tokens=jnp.ones(n, jnp.int32),
        temperature=jnp.full(n, temperature, jnp.float32),
        top_k=jnp.full(n, top_k, jnp.int32),
        top_p=jnp.full(n, top_p, jnp.float32),
        min_p=jnp.full(n, min_p, jnp.float32),
        presence=jnp.full(n, presence, jnp.float32),
        frequency=jnp.full(n, frequency, jnp.float32),
        repetition=jnp.full(n, repetition, jnp.float32),
        context=jnp.zeros((n, 0), jnp.int32) if context is None else jnp.asarray(context, jnp.int32),
        bias_ids=jnp.asarray(bias_ids),
        bias=jnp.asarray(bias_values),
        seed=jnp.zeros((n, 2), jnp.uint32),
        sample_index=jnp.arange(n, dtype=jnp.int32),
        stop_ids=jnp.full((n, 4), -1, jnp.int32),
    )


def _reference_filter(logits: np.ndarray, top_k: int, top_p: float, min_p: float = 0.0) -> np.ndarray:
    """Sort-based min-p, then top-k, then top-p (the usual definitions), in f64."""
    logits = logits.astype(np.float64)
    order = np.argsort(-logits, kind="stable")
    if min_p > 0:  # p >= min_p * p_max
        order = order[np.exp(logits[order] - logits.max()) >= min_p]
    keep = np.zeros(logits.shape, bool)
    kept = order[: top_k if top_k > 0 else len(order)]
    if top_p >= 1.0:
        keep[kept] = True
        return keep
    probs = np.exp(logits[kept] - logits[kept].max())
    probs /= probs.sum()
    before = np.cumsum(probs) - probs
    keep[kept[before < top_p]] = True
    return keep


@pytest.mark.parametrize(
    "top_k,top_p,min_p",
    [
        (-1, 1.0, 0.0),
        (5, 1.0, 0.0),
        (-1, 0.5, 0.0),
        (20, 0.8, 0.0),
        (1, 0.3, 0.0),
        (-1, 1.0, 0.1),
        (8, 0.9, 0.02),
    ],
)
def test_filter_matches_sort_reference(top_k, top_p, min_p):
    logits = np.asarray(jax.random.normal(jax.random.key(3), (6, 300)) * 3.0)
    filtered = np.asarray(_filter(jnp.asarray(logits), _rows(1.0, top_k, top_p, 6, min_p=min_p)))
    for row, out in zip(logits, filtered, strict=True):
        keep = _reference_filter(row, top_k, top_p, min_p)
        np.testing.assert_array_equal(np.isfinite(out), keep)
        np.testing.assert_array_equal(out[keep], row[keep])


def test_penalties_subtract_from_the_choice_not_the_logprob():
    """OpenAI's presence and frequency penalties over each row's sampled tokens: the greedy choice and the
    draws see penalized logits; the returned logprob stays the raw one."""
    logits = jnp.asarray([[3.0, 2.9, 2.0, 0.0], [3.0, 2.9, 2.0, 0.0]])
    history = (jnp.asarray([[0, 0, 1, 3], [0, 0, 1, 3]]), jnp.asarray([3, 2]))
    raw = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    # Row 0 sampled 0, 0, 1 (3 is past its count); row 1 sampled 0, 0.
    cases = [((0.0, 0.0), [0, 0]), ((1.2, 0.0), [2, 1]), ((0.0, 0.6), [1, 1]), ((0.6, 0.5), [2, 1])]
    for (presence, frequency), want in cases:
        rows = _rows(0.0, -1, 1.0, 2, presence=presence, frequency=frequency)
        token, logprob, _ = _select(logits, rows, _row_keys(rows), jnp.int32(3), history=history)
        assert np.asarray(token).tolist() == want, (presence, frequency)
        np.testing.assert_allclose(np.asarray(logprob), raw[[0, 1], want], atol=1e-6)
    # Drawn at temperature 1, from row 0's penalized distribution:
    rows = _rows(1.0, -1, 1.0, 20000, frequency=0.3)
    big = jnp.repeat(logits[:1], 20000, 0)
    hist = (jnp.repeat(history[0][:1], 20000, 0), jnp.full(20000, 3))
    token, _, _ = jax.jit(_select)(big, rows, _row_keys(rows), jnp.int32(3), history=hist)
    penalized = np.asarray(logits[0]) - 0.3 * np.asarray([2, 1, 0, 0])
    expected = np.exp(penalized - penalized.max())
    np.testing.assert_allclose(
        np.bincount(np.asarray(token), minlength=4) / 20000, expected / expected.sum(), atol=0.015
    )


def test_repetition_penalty_scales_the_choice_not_the_logprob():
    """transformers' repetition penalty over each row's prompt (``context``, -1 padded) and sampled
    tokens: positive logits are divided by it, negative ones multiplied; the logprob stays raw."""
    logits = jnp.asarray([[3.0, 2.5, 2.0, -0.5, -0.6], [-1.0, -1.2, -2.0, -3.0, -4.0]])
    context = [[0, -1, -1], [3, 0, -1]]  # row 0's prompt holds token 0, row 1's tokens 3 and 0
    history = (jnp.asarray([[1, 4], [1, 4]]), jnp.asarray([1, 0]))  # row 0 sampled token 1; row 1 none
    raw = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    # 1.6: row 0 scales tokens 0 and 1 to 1.875 and 1.5625 (2 leads); row 1's token 0 falls to -1.6.
    for penalty, want in [(1.0, [0, 0]), (1.1, [0, 0]), (1.6, [2, 1])]:
        rows = _rows(0.0, -1, 1.0, 2, repetition=penalty, context=context)
        token, logprob, _ = _select(logits, rows, _row_keys(rows), jnp.int32(1), history=history)
        assert np.asarray(token).tolist() == want, penalty
        np.testing.assert_allclose(np.asarray(logprob), raw[[0, 1], want], atol=1e-6)
    # The first token (nothing sampled yet) sees the prompt alone: row 0's token 1 is not penalized.
    token, _, _ = _select(logits, rows, _row_keys(rows), jnp.int32(0))
    assert np.asarray(token).tolist() == [1, 1]


def test_logit_bias_is_added_before_the_penalties():
    """OpenAI's logit bias per row (vLLM's order: before the repetition penalty); the logprob stays raw."""
    logits = jnp.asarray([[1.0, -3.0, -5.0], [1.0, -3.0, -5.0]])
    raw = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    cases = [  # (row biases, repetition penalty, choices)
        (({2: 7.0}, {}), 1.0, [2, 0]),
        (({0: -4.5, 1: 0.5}, {0: -3.9}), 1.0, [1, 0]),
        # Token 0 of row 0 biased to -2.0, then penalized to -4.0, loses to token 1 (-3.0); penalized
        # first it would win (0.5 - 3.0 = -2.5). Row 1 has no bias: 0.5 still leads.
        (({0: -3.0}, {}), 2.0, [1, 0]),
    ]
    for bias, penalty, want in cases:
        rows = _rows(0.0, -1, 1.0, 2, repetition=penalty, context=[[0], [0]], bias=[dict(b) for b in bias])
        token, logprob, _ = _select(logits, rows, _row_keys(rows), jnp.int32(0))
        assert np.asarray(token).tolist() == want, bias
        np.testing.assert_allclose(np.asarray(logprob), raw[[0, 1], want], atol=1e-6)


def test_penalized_greedy_decoding_matches_a_transformers_loop(llama):
    """Through the decode loop: greedy with presence and frequency penalties equals a step-by-step loop
    over transformers' logits that subtracts them from each sampled token's count, and differs from
    plain greedy; the logprobs stay raw (unpenalized)."""
    hf, prompt, n = llama.hf(), PROMPTS[1], 16
    penalties = {"presence_penalty": 0.8, "frequency_penalty": 0.5}
    (result,) = llama.sampler.sample([greedy(prompt, max_tokens=n, **penalties)])
    tokens, logprobs, _ = result.sequences[0]
    want, counts = [], np.zeros(llama.config.vocab_size)
    with torch.no_grad():
        for _ in range(n):
            logits = hf(torch.tensor([prompt + want])).logits[0, -1].double().numpy()
            choice = (
                logits
                - penalties["frequency_penalty"] * counts
                - penalties["presence_penalty"] * (counts > 0)
            )
            want.append(int(np.argmax(choice)))
            counts[want[-1]] += 1
    assert tokens == want
    assert tokens != hf_greedy(hf, prompt, n)  # the penalties changed the choice
    np.testing.assert_allclose(logprobs, hf_logprobs(hf, prompt + tokens)[len(prompt) - 1 :], atol=1e-4)


def test_repetition_penalty_decoding_matches_transformers_generate(llama):
    """Greedy with a repetition penalty equals transformers' ``generate(repetition_penalty=...)``: over
    the prompt from the first token on, the whole prompt when the prefix cache serves part of it, and
    per row beside an unpenalized row of the same batch. Logprobs stay raw."""
    hf, prompt, n, penalty = llama.hf(), PROMPTS[1], 12, 1.5
    (result,) = llama.sampler.sample([greedy(prompt, max_tokens=n, repetition_penalty=penalty)])
    tokens, logprobs, _ = result.sequences[0]
    assert tokens == hf_greedy(hf, prompt, n, repetition_penalty=penalty)
    assert tokens != hf_greedy(hf, prompt, n)  # the penalty changed the choice
    np.testing.assert_allclose(logprobs, hf_logprobs(hf, prompt + tokens)[len(prompt) - 1 :], atol=1e-4)

    turn = prompt + tokens + [7, 8, 9]  # extends the sequence just sampled: the prefix cache serves it
    both = llama.sampler.sample([greedy(turn, max_tokens=n, repetition_penalty=penalty), greedy(turn, n)])
    assert both[0].prompt_cache_hit_tokens > 0
    assert both[0].sequences[0][0] == hf_greedy(hf, turn, n, repetition_penalty=penalty)
    assert both[1].sequences[0][0] == hf_greedy(hf, turn, n)


def test_logit_bias_decoding_matches_transformers_generate(llama):
    """Greedy with a logit bias equals transformers' ``generate`` with the same single-token
    ``sequence_bias`` at every step; logprobs stay raw."""
    hf, prompt, n = llama.hf(), PROMPTS[0], 12
    plain = hf_greedy(hf, prompt, n)
    bias = {plain[0]: -100.0, plain[1]: -100.0, 77: 4.0, 301: 2.5}
    (result,) = llama.sampler.sample([greedy(prompt, max_tokens=n, logit_bias=bias)])
    tokens, logprobs, _ = result.sequences[0]
    assert tokens == hf_greedy(hf, prompt, n, sequence_bias=[[[t], b] for t, b in bias.items()])
    assert tokens[0] not in (plain[0], plain[1]) and tokens != plain
    np.testing.assert_allclose(logprobs, hf_logprobs(hf, prompt + tokens)[len(prompt) - 1 :], atol=1e-4)


def test_on_tokens_streams_each_sample_and_can_end_it(llama):
    """``on_tokens(sample, tokens)`` after the first token and between decode chunks: each unfinished
    sample's tokens so far, a prefix of its result. Returning False, or raising, ends that sample
    there; the batch goes on."""
    n, interval = 40, llama.sampler.stop_check_interval
    seen: dict[int, list] = {0: [], 1: []}
    streamed = greedy(PROMPTS[0], max_tokens=n, num_samples=2, on_tokens=lambda i, t: seen[i].append(t))
    (result,) = llama.sampler.sample([streamed])
    for sample, calls in seen.items():
        assert [len(c) for c in calls] == [1, 1 + interval, 1 + 2 * interval]  # the first token at once
        assert all(result.sequences[sample][0][: len(c)] == c for c in calls)

    def fail(sample, tokens):
        raise RuntimeError("the reader broke")

    ended, raised, plain = llama.sampler.sample(
        [
            greedy(PROMPTS[0], max_tokens=n, num_samples=2, on_tokens=lambda i, t: i != 0 or len(t) == 1),
            greedy(PROMPTS[0], max_tokens=n, on_tokens=fail),
            greedy(PROMPTS[1], max_tokens=n),
        ]
    )
    assert ended.sequences[0][0] == result.sequences[0][0][: 1 + interval]
    assert ended.sequences[1][0] == result.sequences[1][0]
    assert raised.sequences[0][0] == result.sequences[0][0][:1]  # it raised at the first token
    assert plain.sequences[0][0] == hf_greedy(llama.hf(), PROMPTS[1], n)


def test_text_stream_pieces_join_to_the_final_text(qwen3):
    """Token by token, the pieces never show a partial character or text past a stop string (held
    back until the next tokens tell), and with the end they join to the final text."""
    text = "naïve café — done. Ok"
    ids = qwen3.tokenizer.encode(text)
    assert len(ids) > len(text)  # byte-level pieces: characters span tokens
    for stops, final in (((), text), (("done", "zz"), "naïve café — "), (("e c",), "naïv")):
        assert text[: first_stop(text, stops)] == final
        stream, joined = TextStream(qwen3.tokenizer, stops), ""
        for n in range(1, len(ids) + 1):
            joined += stream.piece(ids[:n])
            assert final.startswith(joined) and "\ufffd" not in joined, (stops, joined)
        assert joined == final and stream.end(final) == ""  # all of it came as pieces
        assert TextStream(qwen3.tokenizer, stops).end(final) == final


def test_token_frequencies_follow_the_distribution():
    """Draws from temperature-scaled, top-k/top-p-filtered softmax, one row per sample."""
    n, temperature, top_k, top_p = 20000, 0.8, 6, 0.9
    logits = jnp.asarray(np.linspace(2.0, -2.0, 10), jnp.float32)[None].repeat(n, 0)
    rows = _rows(temperature, top_k, top_p, n)
    tokens, logprobs, _ = jax.jit(_select)(logits, rows, _row_keys(rows), jnp.int32(5))
    scaled = np.asarray(logits[0]) / temperature
    keep = _reference_filter(scaled, top_k, top_p)
    expected = np.where(keep, np.exp(scaled - scaled.max()), 0.0)
    expected /= expected.sum()
    freq = np.bincount(np.asarray(tokens), minlength=10) / n
    assert np.all(freq[~keep] == 0)
    np.testing.assert_allclose(freq, expected, atol=4 * math.sqrt(0.25 / n))
    raw = np.asarray(jax.nn.log_softmax(logits[0]))
    np.testing.assert_allclose(np.asarray(logprobs), raw[np.asarray(tokens)], atol=1e-6)
