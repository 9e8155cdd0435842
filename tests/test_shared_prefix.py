"""Shared-prefix training: datums that start alike (a GRPO group's prompt, a DPO pair's) have that
prefix computed once, in rows where the rest of each datum attends to it; the loss still sees every
datum whole, and every logprob, loss and gradient equals the unshared run's."""

from __future__ import annotations

import dataclasses
import shutil

import jax
import numpy as np
import pytest
from test_multi_adapter import Paused, assert_trees_close, rl_datum

import jtinker as tinker
from jtinker import batching, engine, sharding, train
from jtinker.batching import HostBatch
from jtinker.engine import LoraSpec
from jtinker.models import ModelConfig

VOCAB = 320


def group_data(
    seed: int, groups: int = 3, size: int = 4, prompt: int = 40, loner: bool = True, firsts: int | None = None
):
    """RL datums: ``groups`` prompts with ``size`` completions each (``firsts`` different first tokens,
    by default all different; exactly the prompt is shared), plus one datum sharing nothing."""
    rng, lengths = np.random.default_rng(seed), np.random.default_rng(0)  # every seed: the same shapes
    seqs = []
    for _ in range(groups):
        head = rng.integers(0, VOCAB, prompt)
        starts = rng.choice(VOCAB, firsts or size, replace=False)
        for i in range(size):
            rest = rng.integers(0, VOCAB, lengths.integers(4, 30))
            seqs.append(np.concatenate([head, [starts[i % len(starts)]], rest]))
    if loner:
        seqs.append(rng.integers(0, VOCAB, 25))
    return [rl_datum(seq, rng, prompt) for seq in seqs]


def tokens_of(data) -> list[np.ndarray]:
    return [np.asarray(d.model_input.to_ints()) for d in data]


@pytest.fixture(scope="module")
def config(qwen3_dir) -> ModelConfig:
    return ModelConfig.from_pretrained(qwen3_dir)


@pytest.fixture(scope="module")
def bases(qwen3_dir):
    """The same model with prefix sharing on and off."""
    return {share: engine.BaseModel("tiny", qwen3_dir, share_prefixes=share) for share in (True, False)}


def adapters(bases, seed: int = 0, n: int = 1) -> dict[bool, list[engine.Adapter]]:
    """``n`` adapters per base, equal across bases, with a nonzero B (LoRA changes the output)."""
    out = {}
    for share, base in bases.items():
        made = []
        for s in range(seed, seed + n):
            adapter = base.worker.submit(lambda b=base, s=s: b.new_adapter(LoraSpec(rank=4, seed=s))).result()
            lora = adapter.lora.replace(
                weights=jax.tree.map(
                    lambda w, s=s: w + 0.02 * jax.random.normal(jax.random.key(s), w.shape, w.dtype),
                    adapter.lora.weights,
                )
            )
            adapter.lora = base.place_lora_tree(lora)
            made.append(adapter)
        out[share] = made
    return out


def run(base, adapter, fn):
    return base.worker.submit(lambda: fn(adapter), adapter=adapter).result()


def assert_outputs_equal(got, want):
    (got_out, got_metrics), (want_out, want_metrics) = got, want
    assert got_metrics.keys() == want_metrics.keys()
    for key in want_metrics:
        np.testing.assert_allclose(got_metrics[key], want_metrics[key], rtol=1e-5, atol=1e-4)
    for g, w in zip(got_out, want_out, strict=True):
        np.testing.assert_allclose(g["logprobs"], w["logprobs"], rtol=0, atol=1e-5)


def test_groups_are_found_by_their_shared_prefix():
    rng = np.random.default_rng(0)
    prompt_a, prompt_b = rng.integers(0, VOCAB, 40), rng.integers(0, VOCAB, 60)
    seqs = [np.concatenate([prompt_a, [i], rng.integers(0, VOCAB, 9)]) for i in range(3)]
    seqs += [np.concatenate([prompt_b, [i], rng.integers(0, VOCAB, 5)]) for i in range(2)]
    seqs.append(rng.integers(0, VOCAB, 50))  # alone
    seqs.append(np.concatenate([prompt_b[:20], [7, 7, 7]]))  # shares 20 tokens with group b only
    items = sorted(batching.shared_prefixes(seqs), key=lambda item: item.members)
    # Group b with the last datum would share 20 tokens between 3 (saves 40); apart, 60 between 2.
    assert [(item.prefix, item.members) for item in items] == [(40, (0, 1, 2)), (60, (3, 4))]
    # A datum equal to another's prefix joins it whole; identical datums share everything.
    assert [(i.prefix, i.members) for i in batching.shared_prefixes([seqs[0], seqs[0][:45]])] == [
        (45, (0, 1))
    ]
    assert [(i.prefix, i.members) for i in batching.shared_prefixes([seqs[3], seqs[3]])] == [(66, (0, 1))]
    assert batching.shared_prefixes([seqs[0][:20], np.concatenate([seqs[0][:15], [1] * 9])]) == []  # < 16


def seen_by_datums(host) -> dict[str, np.ndarray]:
    """What the model sees and scores at each of the batch's positions, read through ``source``."""
    shared = host.batch.shared
    flat = {
        name: getattr(shared, name).reshape(-1, *getattr(shared, name).shape[2:])
        for name in ("tokens", "targets", "positions")
    }
    extra = {
        "tokens": flat["tokens"][shared.extra_source],
        "targets": shared.extra_targets,
        "positions": flat["positions"][shared.extra_source],
    }
    return {name: np.concatenate([flat[name], extra[name]])[shared.source] for name in flat}


def test_layout_reads_every_datum_from_the_shared_rows(config):
    data = group_data(1)
    ((members, host),) = batching.build_batches(data, "importance_sampling", config)
    batch, shared = host.batch, host.batch.shared
    assert shared is not None and members == list(range(len(data)))
    real = batch.mask > 0
    for name, seen in seen_by_datums(host).items():
        np.testing.assert_array_equal(seen[real], getattr(batch, name)[real])
    # Each prompt once; its last token scores each completion's own first token (3 extras a group).
    total = sum(len(t) for t in tokens_of(data))
    assert (shared.segment_ids > 0).sum() == total - 3 * (4 - 1) * 40
    assert (
        shared.extra_source.shape == (16,)
        and len(set((shared.source[real] >= shared.tokens.size).nonzero()[0])) > 0
    )
    assert (shared.source[real] >= shared.tokens.size).sum() == 3 * 3
    # The rest of a datum sees its prompt's segment; prompts and the loner see nothing else.
    assert set(np.unique(shared.prefix_ids)) - {-1} <= set(
        np.unique(shared.segment_ids[shared.segment_ids > 0])
    )
    assert (shared.prefix_ids > 0).sum() == total - 3 * 4 * 40 - 24
    # Targets that differ inside a prompt (not next tokens) are scored there as extras.
    inputs = {key: value.to_numpy().copy() for key, value in data[1].loss_fn_inputs.items()}
    inputs["target_tokens"][30] += 1
    data[1] = tinker.Datum(model_input=data[1].model_input, loss_fn_inputs=inputs)
    ((_, host),) = batching.build_batches(data, "importance_sampling", config)
    assert (host.batch.shared.source[real] >= host.batch.shared.tokens.size).sum() == 3 * 3 + 1
    for name, seen in seen_by_datums(host).items():
        np.testing.assert_array_equal(seen[real], getattr(host.batch, name)[real])
    # Padded to a multi-adapter step's larger shapes, every position still reads what it did.
    b = host.batch
    padded = engine._padded(
        b,
        (b.tokens.shape[0] + 2, b.tokens.shape[1] + 5),
        (b.shared.tokens.shape[0] + 1, b.shared.tokens.shape[1] + 7, 32),
    )
    for name, seen in seen_by_datums(HostBatch(padded, host.placements, host.num_tokens)).items():
        np.testing.assert_array_equal(seen[padded.mask > 0], getattr(b, name)[real])
    # The loss sees each datum whole, as without sharing.
    ((_, unshared),) = batching.build_batches(data, "importance_sampling", config, share_prefixes=False)
    for p, q in zip(host.placements, unshared.placements, strict=True):
        assert p.length == q.length


def test_sharing_only_where_it_pays(config):
    rng = np.random.default_rng(2)

    def datum(seq):
        inputs = {"target_tokens": seq, "weights": np.ones(len(seq), np.float32)}
        return tinker.Datum(
            model_input=tinker.ModelInput.from_ints(list(map(int, seq))), loss_fn_inputs=inputs
        )

    head = rng.integers(0, VOCAB, 16)
    # Two 256-token datums sharing 16 tokens: one row of 512 holds no fewer tokens than two of 256,
    # and its attention spans twice as far.
    pair = [datum(np.concatenate([head, rng.integers(0, VOCAB, 240)])) for _ in range(2)]
    ((_, host),) = batching.build_batches(pair, "cross_entropy", config)
    assert host.batch.shared is None and host.batch.tokens.shape == (2, 256)
    # Four sharing 200 of their 256 tokens fit one 512-token row: half the tokens, attention twice as long.
    head = rng.integers(0, VOCAB, 200)
    four = [datum(np.concatenate([head, rng.integers(0, VOCAB, 56)])) for _ in range(4)]
    ((_, host),) = batching.build_batches(four, "cross_entropy", config)
    assert host.batch.shared.tokens.shape == (1, 512)
    assert batching.token_cost(config, 512) < 2 * batching.token_cost(config, 256)
    ((_, host),) = batching.build_batches(four, "cross_entropy", config, share_prefixes=False)
    assert host.batch.shared is None


def test_rows_stay_within_the_limit(config, monkeypatch):
    """40 datums of 1,300 tokens sharing 1,200, on an 8B-shaped config (attention is cheap next to
    its projections): one 6,144-token row would be cheapest, but rows stop at ``MAX_SHARED_ROW``
    (the prefix is repeated in each) since attention's masks and scores grow with their square."""
    big = dataclasses.replace(
        config, hidden_size=4096, intermediate_size=14336, num_heads=32, num_kv_heads=8, head_dim=128,
        max_position_embeddings=8192,
    )  # fmt: skip
    rng = np.random.default_rng(3)
    head = rng.integers(0, VOCAB, 1200)
    data = []
    for _ in range(40):
        seq = np.concatenate([head, rng.integers(0, VOCAB, 100)])
        inputs = {"target_tokens": seq, "weights": np.ones(len(seq), np.float32)}
        data.append(
            tinker.Datum(model_input=tinker.ModelInput.from_ints(seq.tolist()), loss_fn_inputs=inputs)
        )

    def rows():
        ((_, host),) = batching.build_batches(data, "cross_entropy", big, max_tokens_per_batch=1 << 20)
        return host.batch.shared.tokens.shape

    assert rows() == (2, batching.MAX_SHARED_ROW)
    monkeypatch.setattr(batching, "MAX_SHARED_ROW", 1 << 20)
    assert rows() == (1, 6144)


@pytest.mark.parametrize("backward", [True, False])
def test_losses_logprobs_and_gradients_equal_unshared(bases, backward):
    data = group_data(3)
    made = adapters(bases, seed=3)
    results = {
        share: run(
            base,
            made[share][0],
            lambda a: a.forward_backward(data, "importance_sampling", None, backward=backward),
        )
        for share, base in bases.items()
    }
    assert_outputs_equal(results[True], results[False])
    grads = {share: made[share][0].grad_acc for share in bases}
    assert_trees_close(grads[True], grads[False], tol=2e-6)
    if backward:
        assert max(float(np.abs(g).max()) for g in jax.tree.leaves(grads[True])) > 1e-3


@pytest.mark.parametrize("kind", ["logprobs", "logits"])
def test_custom_loss_and_micro_batches(bases, kind):
    """A custom loss over per-datum logprobs (or full logits), in micro-batches of one group each."""
    data = group_data(4)
    made = adapters(bases, seed=4)

    def loss_fn(data, values):  # nonlinear and across datums
        if kind == "logits":
            values = [jax.nn.log_softmax(v, axis=-1)[:, :8] for v in values]
        sums = [v.sum() for v in values]
        return sum(jax.nn.softplus(a - b) for a, b in zip(sums[::2], sums[1::2], strict=False)), {}

    step = lambda a: a.forward_backward_custom(data, engine.differentiate(loss_fn), kind)
    for base in bases.values():
        base.max_tokens_per_batch = 128
    try:
        results = {share: run(base, made[share][0], step) for share, base in bases.items()}
        batches = made[True][0]._host_batches(data, None)
        assert len(batches) > 1 and all(host.batch.shared is not None for _, host in batches)
    finally:
        for base in bases.values():
            base.max_tokens_per_batch = engine.DEFAULT_MICRO_BATCH_TOKENS
    for got, want in zip(results[True][0], results[False][0], strict=True):
        np.testing.assert_allclose(got["logprobs"], want["logprobs"], rtol=0, atol=1e-5)
    assert results[True][1]["loss:sum"] == pytest.approx(results[False][1]["loss:sum"], rel=1e-5)
    # Other micro-batches sum in another order: f32 round-off (4e-5 of 17 measured with logits).
    assert_trees_close(made[True][0].grad_acc, made[False][0].grad_acc, tol=1e-5)


def test_adapters_in_one_step(bases):
    """Several clients' shared batches of different shapes run as one multi-adapter step."""
    datas = [group_data(5, groups=2, size=3), group_data(6, groups=1, size=5, prompt=70, loner=False)]
    base = bases[True]
    made = adapters(bases, seed=5, n=2)
    before = base.worker.loss_steps
    with Paused(base.worker):
        futures = [
            base.worker.submit_loss(a, d, "importance_sampling", None, backward=True)
            for a, d in zip(made[True], datas, strict=True)
        ]
    results = [f.result(120) for f in futures]
    assert base.worker.loss_steps - before == 1
    for adapter, data, result in zip(made[False], datas, results, strict=True):
        want = run(
            bases[False],
            adapter,
            lambda a, d=data: a.forward_backward(d, "importance_sampling", None, backward=True),
        )
        assert_outputs_equal(result, want)
    for got, want in zip(made[True], made[False], strict=True):
        assert_trees_close(got.grad_acc, want.grad_acc, tol=2e-6)


def test_rows_split_over_devices(qwen3_dir, bases):
    """On a data-parallel mesh the shared rows split over the devices; a datum's rows may sit on
    another device than its prompt's."""
    base = engine.BaseModel("tiny", qwen3_dir, mesh=sharding.make_mesh("dp=2,fsdp=2"))
    data = group_data(7)
    reference = adapters(bases, seed=7)[False][0]
    adapter = base.worker.submit(lambda: base.new_adapter(LoraSpec(rank=4, seed=7))).result()
    adapter.lora = base.place_lora_tree(jax.tree.map(np.asarray, reference.lora))
    ((_, host),) = adapter._host_batches(data, "importance_sampling")
    assert host.batch.shared is not None and host.batch.shared.tokens.shape[0] % 4 == 0
    step = lambda a: a.forward_backward(data, "importance_sampling", None, backward=True)
    got, want = run(base, adapter, step), run(bases[False], reference, step)
    assert_outputs_equal(got, want)
    assert_trees_close(jax.tree.map(np.asarray, adapter.grad_acc), reference.grad_acc, tol=2e-6)


def test_no_recompile_for_new_groups_of_a_bucket(bases):
    """Other prompts and completions of the same lengths, and groups whose completions start alike
    or not (the extra scores at the prompts' last tokens: 9, 3 or 6), reuse the first step's program."""
    adapter = adapters(bases, seed=8)[True][0]
    step = lambda a, s, f: a.forward_backward(
        group_data(s, firsts=f), "importance_sampling", None, backward=True
    )
    run(bases[True], adapter, lambda a: step(a, 9, 4))
    compiled = adapter.steps.compile_count("accumulate")
    for seed, firsts in ((10, 2), (11, 3)):
        data = group_data(seed, firsts=firsts)
        ((_, host),) = batching.build_batches(data, "importance_sampling", bases[True].config)
        assert np.count_nonzero(host.batch.shared.extra_source) == 3 * (firsts - 1)
        run(bases[True], adapter, lambda a, s=seed, f=firsts: step(a, s, f))
    assert adapter.steps.compile_count("accumulate") == compiled


def test_train_batch_functional_api(config, qwen3_dir):
    """``train.target_logprobs`` on a shared batch equals the model's forward on each datum alone."""
    from jtinker.models import forward, load_pretrained

    _, params = load_pretrained(qwen3_dir)
    data = group_data(12, groups=1, size=3, loner=False)
    ((members, host),) = batching.build_batches(data, "importance_sampling", config)
    assert host.batch.shared is not None
    lp = np.asarray(train.target_logprobs(config, params, None, jax.tree.map(np.asarray, host.batch)))
    for i, p in zip(members, host.placements, strict=True):
        tokens = tokens_of(data)[i]
        logits = forward(config, params, tokens[None])[0]
        want = jax.nn.log_softmax(logits)[
            np.arange(len(tokens)), data[i].loss_fn_inputs["target_tokens"].to_numpy()
        ]
        np.testing.assert_allclose(lp[p.row, p.start : p.start + p.length], want, rtol=0, atol=1e-5)


def test_multi_target_losses(bases):
    """Tinker's ``(N, K)`` targets (distillation's top-k): shared positions score all K at once."""
    data = []
    for d in group_data(13):
        tokens = np.asarray(d.model_input.to_ints())
        targets = d.loss_fn_inputs["target_tokens"].to_numpy()
        # K = 3: the next token and two that depend only on the position's own token and place.
        multi = np.stack(
            [targets, (tokens * 7 + np.arange(len(tokens))) % VOCAB, (tokens + 1) % VOCAB], axis=1
        )
        weights = np.tile(np.asarray([0.5, 0.3, 0.2], np.float32), (len(tokens), 1))
        data.append(
            tinker.Datum(
                model_input=d.model_input, loss_fn_inputs={"target_tokens": multi, "weights": weights}
            )
        )
    made = adapters(bases, seed=13)
    ((_, host),) = made[True][0]._host_batches(data, "cross_entropy")
    assert host.batch.shared is not None and host.batch.shared.targets.shape[-1] == 3
    step = lambda a: a.forward_backward(data, "cross_entropy", None, backward=True)
    results = {share: run(base, made[share][0], step) for share, base in bases.items()}
    assert_outputs_equal(results[True], results[False])
    assert_trees_close(made[True][0].grad_acc, made[False][0].grad_acc, tol=2e-6)


def test_environment_turns_it_off(qwen3_dir, tmp_path, monkeypatch):
    """``JTINKER_SHARE_PREFIXES=0`` is read when a base model loads (after ``import jtinker`` too)."""
    monkeypatch.setenv("JTINKER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("JTINKER_SHARE_PREFIXES", "0")
    model = shutil.copytree(qwen3_dir, tmp_path / "model")  # a base model of its own (loaded now)
    service = tinker.ServiceClient(store_dir=str(tmp_path / "store"))
    tc = service.create_lora_training_client(str(model), rank=4)
    assert not tc._base.share_prefixes
    ((_, host),) = tc._adapter._host_batches(group_data(14), "importance_sampling")
    assert host.batch.shared is None


def test_full_fine_tuning(bases):
    """Every weight trains (the tied embedding and head too): the gradients equal the unshared run's."""
    data = group_data(15, groups=2)
    made = {share: base.worker.submit(base.new_full_adapter).result() for share, base in bases.items()}
    step = lambda a: a.forward_backward(data, "importance_sampling", None, backward=True)
    results = {share: run(base, made[share], step) for share, base in bases.items()}
    assert_outputs_equal(results[True], results[False])
    assert_trees_close(made[True].grad_acc, made[False].grad_acc, tol=2e-6)
