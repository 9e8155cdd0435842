"""The sampler's prefix cache: a prompt that extends an earlier sequence (a multi-turn episode's next
turn, a prompt sent again) reuses its keys and values, with the same tokens and logprobs as a full
prefill, and only under the adapter that computed them."""

from __future__ import annotations

import gc

import jax
import numpy as np
import pytest

from jtinker.models import load_pretrained
from jtinker.models import lora as lora_lib
from jtinker.prefix_cache import MIN_HIT_TOKENS
from jtinker.sampling import Sampler, SampleRequest, compile_counts


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
                np.testing.assert_allclose(gl, wl, atol=1e-5)
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


def test_prompt_logprobs_are_computed_whole(pair):
    prompt = list(range(140, 175))
    pair.both([request(prompt)])
    asked = request(prompt + [1, 2], include_prompt_logprobs=True)
    (got,) = pair.cached.sample([asked])
    (want,) = pair.plain.sample([asked])
    assert got.prompt_cache_hit_tokens == 0
    np.testing.assert_allclose(got.prompt_logprobs[1:], want.prompt_logprobs[1:], atol=1e-5)


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
