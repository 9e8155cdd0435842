"""Cross-adapter batching: ``forward``/``forward_backward`` of several LoRA clients waiting together on
one base model run as one jitted step (``jax.vmap`` over the adapters, base weights shared), their
sampling requests as one batch (a stacked LoRA), and each gives what it would give alone."""

from __future__ import annotations

import threading
import time

import jax
import numpy as np
import pytest

import jtinker as tinker
from jtinker import batching, engine, train
from jtinker.engine import LoraSpec
from jtinker.sampling import SampleRequest

VOCAB = 320
RANK = 4


@pytest.fixture(scope="module")
def base(qwen3_dir):
    return engine.BaseModel("tiny", qwen3_dir)


def make_data(seed: int, lengths) -> list[tinker.Datum]:
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        seq = rng.integers(0, VOCAB, n + 1)
        weights = np.ones(n, np.float32)
        weights[: n // 3] = 0.0
        out.append(
            tinker.Datum(
                model_input=tinker.ModelInput.from_ints(seq[:-1].tolist()),
                loss_fn_inputs={"target_tokens": seq[1:], "weights": weights},
            )
        )
    return out


def rl_datum(seq: np.ndarray, rng: np.random.Generator, prompt: int | None = None) -> tinker.Datum:
    """An RL datum on ``seq``: sampler logprobs, and per-token advantages (or, with ``prompt``, one
    group-relative advantage on the completion after the first ``prompt`` tokens)."""
    n = len(seq) - 1
    logprobs = rng.normal(-3.0, 0.5, n).astype(np.float32)
    if prompt is None:
        advantages = rng.normal(0.0, 1.0, n)
    else:
        advantages = np.where(np.arange(n) < prompt - 1, 0.0, rng.normal(0.0, 1.0))
    return tinker.Datum(
        model_input=tinker.ModelInput.from_ints(seq[:-1].tolist()),
        loss_fn_inputs={
            "target_tokens": seq[1:],
            "logprobs": logprobs,
            "advantages": advantages.astype(np.float32),
        },
    )


def rl_data(seed: int, lengths) -> list[tinker.Datum]:
    rng = np.random.default_rng(seed)
    return [rl_datum(rng.integers(0, VOCAB, n + 1), rng) for n in lengths]


# Different lengths and counts per adapter: the group pads each to a common [B, T] bucket.
DATA_LENGTHS = [(12, 9, 14, 7), (5, 30), (20,), (3, 4, 5, 6, 7, 8, 9, 10)]


def new_adapters(base, n: int, seed0: int = 0) -> list[engine.Adapter]:
    return [
        base.worker.submit(lambda s=s: base.new_adapter(LoraSpec(rank=RANK, seed=s))).result()
        for s in range(seed0, seed0 + n)
    ]


class Paused:
    """Holds the worker on a barrier task so that requests submitted meanwhile arrive together."""

    def __init__(self, worker):
        self.worker = worker
        self.release = threading.Event()

    def __enter__(self):
        started = threading.Event()

        def hold():
            started.set()
            self.release.wait(30)

        self.done = self.worker.submit(hold)
        started.wait(30)
        return self

    def __exit__(self, *exc):
        self.release.set()
        self.done.result(30)


def submit_all(base, adapters, datas, loss="cross_entropy", configs=None, backward=True):
    configs = configs or [None] * len(adapters)
    with Paused(base.worker):
        return [
            base.worker.submit_loss(a, d, loss, c, backward=backward)
            for a, d, c in zip(adapters, datas, configs, strict=True)
        ]


def alone(base, adapter, data, loss="cross_entropy", config=None, backward=True):
    return base.worker.submit(
        lambda: adapter.forward_backward(data, loss, config, backward=backward), adapter=adapter
    ).result()


def assert_results_equal(got, want):
    (got_out, got_metrics), (want_out, want_metrics) = got, want
    assert got_metrics.keys() == want_metrics.keys()
    for key in want_metrics:
        np.testing.assert_allclose(got_metrics[key], want_metrics[key], rtol=2e-6, atol=1e-5)
    for g, w in zip(got_out, want_out, strict=True):
        np.testing.assert_allclose(g["logprobs"], w["logprobs"], rtol=1e-6, atol=2e-6)


def assert_trees_close(a, b, tol=5e-6):
    """Equal to ``tol`` of each leaf's scale (f32 sums over differently batched matmuls)."""
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        y = np.asarray(y)
        np.testing.assert_allclose(np.asarray(x), y, rtol=0, atol=tol * max(1.0, float(np.abs(y).max())))


def test_four_adapters_in_one_step_equal_each_alone(base):
    datas = [make_data(10 + i, lengths) for i, lengths in enumerate(DATA_LENGTHS)]
    grouped, single = new_adapters(base, 4), new_adapters(base, 4)
    steps = grouped[0].steps
    before = base.worker.loss_steps
    futures = submit_all(base, grouped, datas)
    results = [f.result(120) for f in futures]
    assert base.worker.loss_steps - before == 1  # four requests, one jitted step
    assert steps.compile_count("accumulate_many") == 1
    for adapter, data, result in zip(single, datas, results, strict=True):
        assert_results_equal(result, alone(base, adapter, data))
    for g, s in zip(grouped, single, strict=True):
        assert_trees_close(g.grad_acc, s.grad_acc)

    adam = train.AdamHyperparams.create(learning_rate=1e-3)  # Adam amplifies float noise of tiny grads by lr
    for adapter in grouped + single:
        base.worker.submit(lambda a=adapter: a.optim_step(adam), adapter=adapter).result()
    for g, s in zip(grouped, single, strict=True):
        assert_trees_close(g.lora, s.lora)
        assert_trees_close(g.opt_state, s.opt_state)

    # Six and then five adapters (one dummy slot) share a bucket: one more program, not two.
    more, more_single = new_adapters(base, 2, seed0=4), new_adapters(base, 2, seed0=4)
    for n in (6, 5):
        datas = [make_data(20 + n + i, DATA_LENGTHS[i % 4]) for i in range(n)]
        futures = submit_all(base, (grouped + more)[:n], datas)
        for adapter, data, future in zip((single + more_single)[:n], datas, futures, strict=True):
            assert_results_equal(future.result(120), alone(base, adapter, data))
    assert steps.compile_count("accumulate_many") == 2
    # The dummy slot's accumulator came back untouched: it is reused as zeros.
    pools = list(base._zero_pool.values())
    assert sum(len(pool) for pool in pools) == 1
    for pool in pools:
        for tree in pool:
            assert all(not np.asarray(x).any() for x in jax.tree.leaves(tree))


def test_lock_step_clients_regroup_after_a_pause(base):
    """Clients that shared a step come back as one step after a pause (an eval, a checkpoint), however
    long: their rhythm no longer predicts them, but having run together does."""
    worker = engine.Worker(base, "regroup-test")
    try:
        adapters = new_adapters(base, 3, seed0=90)
        datas = [make_data(30 + i, (10,)) for i in range(3)]
        with Paused(worker):
            first = [
                worker.submit_loss(a, d, "cross_entropy", backward=True)
                for a, d in zip(adapters, datas, strict=True)
            ]
        [f.result(120) for f in first]
        time.sleep(0.3)  # the pause
        worker.submit(lambda: None).result(60)  # the worker is idle: its bookkeeping is done
        worker._loss_rhythm.seconds = 1.0  # as for a real model: the window is then GATHER_MAX_SECONDS
        before = worker.loss_steps
        lead = worker.submit_loss(adapters[0], datas[0], "cross_entropy", backward=True)
        time.sleep(0.02)  # the others arrive a little later, as HTTP requests do
        rest = [
            worker.submit_loss(a, d, "cross_entropy", backward=True)
            for a, d in zip(adapters[1:], datas[1:], strict=True)
        ]
        [f.result(120) for f in [lead, *rest]]
        assert worker.loss_steps - before == 1
    finally:
        worker.close()


def test_only_a_steady_rhythm_is_waited_for():
    """The worker waits for a client whose next request its rhythm predicts: one whose last two gaps
    agree, not one whose loop alternates between this model and other work, nor one it already
    waited for in vain."""
    rhythm = engine._Rhythm()
    for t in (0.0, 1.0, 2.0):
        rhythm.tick("steady", t)
    for t in (0.0, 3.0, 4.0):  # gaps of 3 s and then 1 s: its next request may come any time
        rhythm.tick("alternating", t)
    assert rhythm.due("me", now=2.98, deadline=3.05) == {"steady"}
    assert rhythm.due("me", now=4.98, deadline=5.05) == set()
    assert rhythm.due("me", now=4.2, deadline=4.25) == set()  # the steady one is overdue by a gap

    rhythm.missed.add("steady")  # waited for, and it did not come
    assert rhythm.due("me", now=2.98, deadline=3.05) == set()
    rhythm.tick("steady", 3.1)  # it came back, on its beat
    assert rhythm.due("me", now=4.15, deadline=4.25) == {"steady"}


def test_batch_buckets():
    assert [batching.batch_bucket(k) for k in range(1, 18)] == [
        1, 2, 3, 4, 6, 6, 8, 8, 12, 12, 12, 12, 16, 16, 16, 16, 24,
    ]  # fmt: skip


def test_forward_only_and_per_adapter_loss_configs(base):
    adapters = new_adapters(base, 2, seed0=40)
    datas = [rl_data(1, (9, 11)), rl_data(2, (13,))]
    configs = [{"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}, None]
    before = base.worker.loss_steps
    futures = submit_all(base, adapters, datas, "ppo", configs, backward=False)
    results = [f.result(120) for f in futures]
    assert base.worker.loss_steps - before == 1
    for adapter, data, config, result in zip(adapters, datas, configs, results, strict=True):
        assert_results_equal(result, alone(base, adapter, data, "ppo", config, backward=False))
    # forward_backward with different clip thresholds per adapter, in one step
    fresh = new_adapters(base, 2, seed0=40)
    futures = submit_all(base, adapters, datas, "ppo", configs)
    for adapter, data, config, future in zip(fresh, datas, configs, futures, strict=True):
        assert_results_equal(future.result(120), alone(base, adapter, data, "ppo", config))
    for a, f in zip(adapters, fresh, strict=True):
        assert_trees_close(a.grad_acc, f.grad_acc)


def test_bad_request_fails_alone(base):
    adapters = new_adapters(base, 3, seed0=60)
    bad = make_data(3, (8,))
    bad[0] = tinker.Datum(
        model_input=tinker.ModelInput.from_ints([1, 2, VOCAB + 5]),
        loss_fn_inputs={"target_tokens": [2, 3, 4], "weights": [1.0, 1.0, 1.0]},
    )
    datas = [make_data(4, (10,)), bad, make_data(5, (6, 6))]
    futures = submit_all(base, adapters, datas)
    with pytest.raises(ValueError, match=r"data\[0\]\.model_input"):
        futures[1].result(120)
    assert not any(np.asarray(x).any() for x in jax.tree.leaves(adapters[1].grad_acc))
    fresh = new_adapters(base, 3, seed0=60)
    for i in (0, 2):
        assert_results_equal(futures[i].result(120), alone(base, fresh[i], datas[i]))


def test_order_per_adapter_is_kept(base):
    """A's second forward_backward must not join A's first; B's may jump A's optim_step."""
    a, b = new_adapters(base, 2, seed0=80)
    a_ref, b_ref = new_adapters(base, 2, seed0=80)
    d1, d2, d3 = make_data(7, (10,)), make_data(8, (10,)), make_data(9, (10,))
    adam = train.AdamHyperparams.create(learning_rate=0.05)
    with Paused(base.worker):
        f1 = base.worker.submit_loss(a, d1, "cross_entropy", backward=True)
        opt = base.worker.submit(lambda: a.optim_step(adam), adapter=a)
        f2 = base.worker.submit_loss(a, d2, "cross_entropy", backward=True)
        f3 = base.worker.submit_loss(b, d3, "cross_entropy", backward=True)
    r1, _, r2, r3 = f1.result(120), opt.result(120), f2.result(120), f3.result(120)
    assert_results_equal(r1, alone(base, a_ref, d1))
    base.worker.submit(lambda: a_ref.optim_step(adam), adapter=a_ref).result()
    assert_results_equal(r2, alone(base, a_ref, d2))  # ran after the optim_step
    assert_results_equal(r3, alone(base, b_ref, d3))
    assert_trees_close(a.lora, a_ref.lora)
    assert_trees_close(a.grad_acc, a_ref.grad_acc)


def test_sampling_requests_of_many_adapters_run_as_one_batch(base):
    """Four adapters and the base model sampling together: one Sampler call (a stacked LoRA),
    and every request gets the tokens it gets alone."""
    from jtinker.sampling import SampleRequest

    adapters = new_adapters(base, 4, seed0=20)
    loras = [jax.tree.map(lambda x, k=k: x + 0.02 * (k + 1), a.lora) for k, a in enumerate(adapters)]
    loras.append(None)
    requests = [
        SampleRequest(prompt=[3 + k, 40, 41, 42 + k], num_samples=2, max_tokens=10, seed=k) for k in range(5)
    ]
    before = base.worker.sample_batches
    with Paused(base.worker):
        futures = [base.worker.submit_sample(r, lo) for r, lo in zip(requests, loras, strict=True)]
    together = [f.result(60) for f in futures]
    assert base.worker.sample_batches == before + 1
    for request, lo, got in zip(requests, loras, together, strict=True):
        want = base.worker.submit_sample(request, lo).result(60)
        assert [s[0] for s in got.sequences] == [s[0] for s in want.sequences]
        for g, w in zip(got.sequences, want.sequences, strict=True):
            np.testing.assert_allclose(g[1], w[1], atol=2e-5)
    assert together[0].sequences != together[4].sequences


def test_lock_step_samplers_regroup(base):
    """Sampling clients that shared a batch wait briefly for each other: their next requests, a few ms
    apart as HTTP requests are, still run as one batch."""
    worker = engine.Worker(base, "sample-regroup-test")
    try:
        loras = [adapter.lora for adapter in new_adapters(base, 3, seed0=95)]

        def sample(lora):
            request = SampleRequest(prompt=[1, 2, 3], num_samples=1, max_tokens=4, temperature=0.0)
            return worker.submit_sample(request, lora)

        with Paused(worker):
            first = [sample(lora) for lora in loras]
        [f.result(120) for f in first]
        assert worker.sample_batches == 1
        worker.submit(lambda: None).result(60)  # the worker is idle: its bookkeeping is done
        worker._sample_rhythm.seconds = 1.0  # as for a real model: the window is then GATHER_MAX_SECONDS
        lead = sample(loras[0])
        time.sleep(0.02)
        rest = [sample(lora) for lora in loras[1:]]
        [f.result(120) for f in [lead, *rest]]
        assert worker.sample_batches == 2
        alone = sample(loras[1])  # peers that do not come cost one short window, then it runs alone
        alone.result(120)
        assert worker.sample_batches == 3
    finally:
        worker.close()


def test_a_burst_of_sampling_requests_runs_as_one_batch(base, monkeypatch):
    """Requests sent at once land some ms apart (client threads, HTTP handlers): the worker waits until
    none has come for a quiet period, so the whole burst runs as one batch even when it spans longer
    than that period."""
    monkeypatch.setattr(engine, "SAMPLE_QUIET_SECONDS", (0.05, 0.05))  # wide margins for a loaded machine
    monkeypatch.setattr(engine, "GATHER_MAX_SECONDS", 1.0)
    worker = engine.Worker(base, "sample-burst-test")
    try:
        worker._sample_rhythm.seconds = 1.0  # as after a real call: a burst may take up to half of it
        request = SampleRequest(prompt=[1, 2, 3], num_samples=1, max_tokens=4, temperature=0.0)
        futures = []
        for adapter in new_adapters(base, 4, seed0=120):  # 20 ms apart: 60 ms in all, over the period
            futures.append(worker.submit_sample(request, adapter.lora))
            time.sleep(0.02)
        [f.result(120) for f in futures]
        assert worker.sample_batches == 1
    finally:
        worker.close()
