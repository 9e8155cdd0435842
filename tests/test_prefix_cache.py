"""The sampler's prefix cache: a prompt that extends an earlier sequence (a multi-turn episode's next
turn, a prompt sent again) reuses its keys and values, with the same tokens and logprobs as a full
prefill, and only under the adapter that computed them."""

from __future__ import annotations

import asyncio
import gc

import jax
import numpy as np
import pytest

from jtinker import sharding
from jtinker.models import load_pretrained
from jtinker.models import lora as lora_lib
from jtinker.prefix_cache import MIN_HIT_TOKENS
from jtinker.sampling import Sampler, SampleRequest, _shared_prefixes, compile_counts


class Pair:
    """One model sampled with the prefix cache and without it."""

    def __init__(self, path):
        self.config, self.params = load_pretrained(path)
        self.cached = Sampler(self.config, self.params)
        self.plain = Sampler(self.config, self.params, prefix_cache_bytes=0)

    def both(self, requests, lora=None):
        got = self.cached.sample(requests, lora)
        want = self.plain.sample(requests, lora)
        for g, w in zip(got, want, strict=True):
            for (gt, gl, gr), (wt, wl, wr) in zip(g.sequences, w.sequences, strict=True):
                assert (gt, gr) == (wt, wr)
                np.testing.assert_allclose(gl, wl, atol=1e-4)  # f32, other summation orders
        return got


@pytest.fixture(scope="module")
def pair(tiny_model_factory) -> Pair:
    return Pair(tiny_model_factory("llama"))


def request(prompt, seed=0, max_tokens=12, **kw) -> SampleRequest:
    return SampleRequest(
        prompt=list(prompt), num_samples=2, max_tokens=max_tokens, temperature=1.0, seed=seed, **kw
    )


def adapter(config, seed: int) -> lora_lib.Lora:
    lora = lora_lib.init(config, 4, jax.random.key(seed))
    return jax.tree.map(lambda x: x + 0.03 * (seed + 1), lora)  # b = 0 at init: make it matter


def test_multi_turn_prompts_reuse_the_last_turn(pair):
    """Each turn's prompt is the last prompt + a sampled completion + new tokens: everything but the
    completion's last token (never fed) comes from the cache, and nothing changes but the work."""
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, 250, 20).tolist(), rng.integers(0, 250, 27).tolist()]
    for turn in range(3):
        results = pair.both([request(p, seed=turn) for p in prompts])
        hits = [r.prompt_cache_hit_tokens for r in results]
        if turn == 0:
            assert hits == [0, 0]
        else:
            assert hits == [len(p) - 5 - 1 for p in prompts]  # all but the 5 new ones and the unfed one
            assert pair.cached.last_stats["prefix_hit_tokens"] == sum(hits)
        prompts = [
            p + r.sequences[0][0] + rng.integers(0, 250, 5).tolist()
            for p, r in zip(prompts, results, strict=True)
        ]
    # A prompt sent again is served from the cache all but its last token, whose logits are needed.
    again = pair.both([request(prompts[0][:40], seed=7)])
    assert again[0].prompt_cache_hit_tokens == 39


def test_prompts_sharing_a_prefix_reuse_the_common_part(pair):
    system = list(range(100, 130))
    pair.both([request(system + [1, 2, 3, 4])])
    (result,) = pair.both([request(system + [9, 8, 7])])
    assert result.prompt_cache_hit_tokens == len(system)
    (short,) = pair.both([request(system[: MIN_HIT_TOKENS - 1] + [5, 5, 5, 5])])
    assert short.prompt_cache_hit_tokens == 0  # too short a match to be worth another program


def test_adapters_never_share_entries(pair):
    """A prefix computed under one adapter is not used by another or by the base model, and a gone
    adapter's entries go with it."""
    first, second = adapter(pair.config, 1), adapter(pair.config, 2)
    prompt = list(range(60, 90))
    pair.both([request(prompt)], first)
    (other,) = pair.both([request(prompt + [3])], second)
    (base,) = pair.both([request(prompt + [3])])
    (same,) = pair.both([request(prompt + [3])], first)
    assert other.prompt_cache_hit_tokens == 0 and base.prompt_cache_hit_tokens == 0
    assert same.prompt_cache_hit_tokens == len(prompt)
    entries = len(pair.cached.prefix_cache)
    del first
    gc.collect()
    (again,) = pair.both([request(prompt + [3])], adapter(pair.config, 1))  # equal weights, a new snapshot
    assert again.prompt_cache_hit_tokens == 0
    assert len(pair.cached.prefix_cache) < entries + 2  # the dead snapshot's entries were dropped


def test_stacked_adapters_hit_their_own_prefixes(pair):
    """One call, two adapters and the base model, each prompt extending what its own adapter sampled."""
    loras = [adapter(pair.config, 3), adapter(pair.config, 4), None]
    prompts = [list(range(10, 30)), list(range(30, 50)), list(range(50, 70))]
    first = pair.both([request(p, seed=i) for i, p in enumerate(prompts)], loras)
    turn = [p + r.sequences[1][0] + [7, 7] for p, r in zip(prompts, first, strict=True)]
    second = pair.both([request(p, seed=i) for i, p in enumerate(turn)], loras)
    assert [r.prompt_cache_hit_tokens for r in second] == [len(p) - 3 for p in turn]


def scored(prompt, seed=0, max_tokens=1, **kw) -> SampleRequest:
    """A ``compute_logprobs`` request, as the client sends it."""
    return request(prompt, seed, max_tokens, include_prompt_logprobs=True, **kw)


def both_scored(pair, requests, lora=None):
    """``pair.both``, and the same prompt logprobs with the cache as without it."""
    got = pair.both(requests, lora)
    for g, w in zip(got, pair.plain.sample(requests, lora), strict=True):
        assert g.prompt_logprobs[0] is None and len(g.prompt_logprobs) == len(w.prompt_logprobs)
        np.testing.assert_allclose(g.prompt_logprobs[1:], w.prompt_logprobs[1:], atol=1e-4)
    return got


def test_prompt_logprobs_reuse_only_scored_prefixes(pair):
    """A prefix whose logprobs were never computed (a sampled prompt) cannot serve a request for
    prompt logprobs; one that was scored can, and the suffix past it is scored against it."""
    prompt = list(range(140, 175))
    pair.both([request(prompt)])
    (got,) = both_scored(pair, [scored(prompt + [1, 2])])
    assert got.prompt_cache_hit_tokens == 0
    # Now scored: a longer prompt reuses it up to the position whose logits score the next token.
    (longer,) = both_scored(pair, [scored(prompt + [1, 2, 3, 4])])
    assert longer.prompt_cache_hit_tokens == len(prompt) + 1
    (again,) = both_scored(pair, [scored(prompt + [1, 2, 3, 4])])
    assert again.prompt_cache_hit_tokens == len(prompt) + 3  # all but the last, fed for its logits
    # Sampling on from a scored prompt replaces its entry with a longer one, which keeps its logprobs.
    pair.both([request(prompt + [1, 2, 3, 4], seed=3)])
    (extended,) = both_scored(pair, [scored(prompt + [1, 2, 3, 4, 7])])
    assert extended.prompt_cache_hit_tokens == len(prompt) + 3
    # Top-k prompt logprobs are answered by a whole prefill only.
    (top,) = pair.both([request(prompt + [1, 2, 3, 4], topk_prompt_logprobs=2)])
    assert top.prompt_cache_hit_tokens == 0


def test_a_scored_group_prefills_its_prompt_once(pair):
    """A GRPO group's sequences scored in one burst (``compute_logprobs`` of prompt + completion):
    the shared prompt is prefilled once and every sequence scores only its own tokens past it."""
    rng = np.random.default_rng(5)
    prompt = rng.integers(0, 250, 40).tolist()
    group = [prompt + rng.integers(0, 250, 6 + i).tolist() for i in range(5)]
    group.append(group[0][:42] + [9, 9, 9])  # a completion that starts like another's
    results = both_scored(pair, [scored(x, seed=i) for i, x in enumerate(group)])
    assert [r.prompt_cache_hit_tokens for r in results] == [len(prompt)] * len(group)
    assert pair.cached.last_stats["prefill_prompts"] == 1 + len(group)  # the prompt, then each suffix
    # Scored again, each sequence comes from its own entry.
    again = both_scored(pair, [scored(x, seed=i) for i, x in enumerate(group)])
    assert [r.prompt_cache_hit_tokens for r in again] == [len(x) - 1 for x in group]


def test_prompts_sharing_a_prefix_in_one_batch_prefill_it_once(pair):
    """Sampling prompts under one system prompt in one call, under two adapters and the base model:
    each adapter's prompts share their own prefill of it, and nothing else changes."""
    system = list(range(200, 236))
    loras = [adapter(pair.config, 5), adapter(pair.config, 6), None]
    prompts = [system + [i, i + 1, i + 2] for i in range(6)]
    results = pair.both([request(x, seed=i) for i, x in enumerate(prompts)], [loras[i % 3] for i in range(6)])
    assert [r.prompt_cache_hit_tokens for r in results] == [len(system)] * len(prompts)
    assert pair.cached.last_stats["prefill_prompts"] == 3 + len(prompts)  # one prefix per adapter
    # A prompt alone, or sharing less than MIN_HIT_TOKENS, is prefilled whole as before.
    short = [list(range(10, 10 + MIN_HIT_TOKENS - 1)) + [i] * 4 for i in range(3)]
    results = pair.both([request(x) for x in short])
    assert [r.prompt_cache_hit_tokens for r in results] == [0, 0, 0]


def test_shared_prefixes_are_each_groups_own():
    """Two groups under one system prompt prefill their own prompts (not just the system prompt);
    completions that start alike join their group; adapters and served prompts share nothing."""

    class Adapter:  # any weakly referenceable object keys the cache
        pass

    system = list(range(16))
    a, b = system + [1] * 20, system + [2] * 20
    prompts = [(*a, i) for i in range(3)] + [(*b, i) for i in range(3)] + [(*a, 5, 5, 1), (*a, 5, 5, 2)]
    owners, served = [None] * len(prompts), [0] * len(prompts)
    assert sorted(prefix for _, prefix in _shared_prefixes(prompts, owners, served)) == [tuple(a), tuple(b)]
    other = Adapter()
    owners = [None] * 6 + [other] * 2  # the alike completions under another adapter: a group of their own
    assert sorted(prefix for _, prefix in _shared_prefixes(prompts, owners, served)) == [
        tuple(a),
        (*a, 5, 5),
        tuple(b),
    ]
    served = [len(a)] * 3 + [0] * 5  # the cache already serves group a
    assert [prefix for _, prefix in _shared_prefixes(prompts[:6], [None] * 6, served[:6])] == [tuple(b)]


def test_the_budget_bounds_the_cache(tiny_model_factory):
    config, params = load_pretrained(tiny_model_factory("llama"))
    one_entry = 2 * config.num_layers * 64 * config.num_kv_heads * config.head_dim * 4  # 64 slots, f32
    sampler = Sampler(config, params, prefix_cache_bytes=3 * one_entry)
    for i in range(6):
        sampler.sample([request(list(range(i, i + 40)), max_tokens=8)])
        assert sampler.prefix_cache.bytes <= 3 * one_entry
    assert len(sampler.prefix_cache) == 3
    (oldest,) = sampler.sample([request(list(range(0, 40)) + [1], max_tokens=8)])
    (newest,) = sampler.sample([request(list(range(5, 45)) + [1], max_tokens=8)])
    assert oldest.prompt_cache_hit_tokens == 0 and newest.prompt_cache_hit_tokens == 40
    with pytest.raises(ValueError, match="prefix_cache_bytes"):
        Sampler(config, params, prefix_cache_bytes=-1)


_BACKEND_COMPILES = [0]


def _count_compiles(event: str, duration: float, **kwargs) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
        _BACKEND_COMPILES[0] += 1


jax.monitoring.register_event_duration_secs_listener(_count_compiles)


def test_later_turns_compile_nothing_new(pair):
    """Episodes of the same shapes reuse the programs of the first (suffixes and caches are bucketed):
    no stage program and no eager op (cutting, padding, storing entries) compiles again."""

    def episode(seed):
        rng = np.random.default_rng(seed)
        prompts = [rng.integers(0, 250, 30).tolist() for _ in range(3)]
        for turn in range(3):
            results = pair.cached.sample([request(p, seed=turn, max_tokens=10) for p in prompts])
            prompts = [p + r.sequences[0][0] + [4, 4, 4] for p, r in zip(prompts, results, strict=True)]

    episode(100)  # seeds no other test draws prompts with: no hits from their entries
    before, compiled = compile_counts(), _BACKEND_COMPILES[0]
    episode(101)
    assert compile_counts() == before and _BACKEND_COMPILES[0] == compiled
    assert before["prefill_after"] >= 1


@pytest.mark.parametrize("on_mesh", [False, True])
def test_hits_and_misses_in_any_order_compile_nothing_new(pair, on_mesh):
    """The prompts that miss the cache get zeros placed like the entries of those that hit, on a
    mesh (as the Tinker API samples) or not: which prompts hit cannot change the programs' inputs."""
    sampler = Sampler(pair.config, pair.params, mesh=sharding.make_mesh() if on_mesh else None)
    rng = np.random.default_rng(200 + on_mesh)
    fresh = lambda: rng.integers(0, 250, 30).tolist()

    def turn(prompts, extend):
        """Samples ``prompts``; returns the next turn's prompt for each one in ``extend``."""
        results = sampler.sample([request(p, max_tokens=10) for p in prompts])
        return [prompts[i] + results[i].sequences[0][0] + [4, 4, 4] for i in extend]

    first = turn([fresh() for _ in range(4)], extend=[0, 2])
    second = turn([first[0], fresh(), first[1], fresh()], extend=[1, 3])  # hit, miss, hit, miss
    before, compiled = compile_counts(), _BACKEND_COMPILES[0]
    turn([fresh(), second[0], fresh(), second[1]], extend=[])  # miss, hit, miss, hit: the same shapes
    assert sampler.last_stats["prefix_hit_tokens"] == 2 * 39  # prompt + the 9 fed tokens, twice
    assert compile_counts() == before and _BACKEND_COMPILES[0] == compiled
    assert before["prefill_after"] >= 1


def test_a_scoring_burst_through_the_tinker_api_shares_its_prompt(qwen3_dir, service):
    """The cookbook's KL penalty and distillation teachers score a group with ``compute_logprobs``
    calls gathered at once: each result equals the whole prefill's, and the responses' cache hits
    (the usage tinker-cookbook counts) show the shared prompt was not prefilled per sequence."""
    from jtinker import types

    sampling = service.create_sampling_client(base_model=str(qwen3_dir))
    rng = np.random.default_rng(9)
    prompt = rng.integers(0, 250, 48).tolist()
    group = [types.ModelInput.from_ints(prompt + rng.integers(0, 250, 5 + i).tolist()) for i in range(4)]
    one_token = types.SamplingParams(max_tokens=1)

    async def burst(score):
        return await asyncio.gather(*[score(x) for x in group])

    responses = asyncio.run(burst(lambda x: sampling.sample(x, 1, one_token, include_prompt_logprobs=True)))
    # One batch shares the prompt's prefill; split batches reuse the first's scored entry.
    assert sum(r.prompt_cache_hit_tokens for r in responses) >= (len(group) - 1) * (len(prompt) - 1)
    logprobs = asyncio.run(burst(sampling.compute_logprobs))
    for x, got, response in zip(group, logprobs, responses, strict=True):
        # Top-k prompt logprobs are always answered by a whole prefill: the reference.
        whole = sampling.sample(
            x, 1, one_token, include_prompt_logprobs=True, topk_prompt_logprobs=1
        ).result()
        assert whole.prompt_cache_hit_tokens == 0 and got[0] is None
        np.testing.assert_allclose(got[1:], whole.prompt_logprobs[1:], atol=1e-4)
        np.testing.assert_allclose(response.prompt_logprobs[1:], whole.prompt_logprobs[1:], atol=1e-4)
