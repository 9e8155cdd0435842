"""Training through the in-process Tinker API: gradients (vs torch + PEFT), accumulation, custom
losses, AdamW, validation, compile counts, pipelining, multi-target and packing."""

from __future__ import annotations

import asyncio
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jtinker as tinker
from jtinker.batching import build_batches

VOCAB = 320  # the tiny models' vocabulary
RANK = 4
ALPHA = 32.0
LENGTHS = (12, 9, 14, 7)  # pack into one [4, 16] batch


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("JTINKER_HOME", str(tmp_path / "home"))


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    return tinker.ServiceClient(store_dir=str(tmp_path_factory.mktemp("store")))


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def make_datum(seq, weights=None, **extra) -> tinker.Datum:
    """``seq`` of n + 1 tokens: input ``seq[:-1]``, targets ``seq[1:]``."""
    seq = np.asarray(seq)
    n = len(seq) - 1
    if weights is None:
        weights = np.ones(n, np.float32)
        weights[: n // 3] = 0.0  # a "prompt" that does not count
    inputs = {"target_tokens": seq[1:].astype(np.int64), "weights": np.asarray(weights, np.float32), **extra}
    return tinker.Datum(model_input=tinker.ModelInput.from_ints(seq[:-1].tolist()), loss_fn_inputs=inputs)


def make_data(lengths=LENGTHS, seed=0) -> list[tinker.Datum]:
    rng = np.random.default_rng(seed)
    return [make_datum(rng.integers(0, VOCAB, n + 1)) for n in lengths]


def tokens_of(d: tinker.Datum) -> np.ndarray:
    return np.asarray(d.model_input.to_ints())


def inputs_of(d: tinker.Datum, key: str) -> np.ndarray:
    return d.loss_fn_inputs[key].to_numpy()


def on_worker(tc, fn):
    """Runs ``fn`` on the client's worker thread (ordered with its requests)."""
    return tc._submit(fn).result()


def lora_np(tc):
    return on_worker(tc, lambda: jax.tree.map(np.array, tc._adapter.lora))


def grads_np(tc):
    return on_worker(tc, lambda: jax.tree.map(np.array, tc._adapter.grad_acc))


def leaves(tree) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def flat(tree) -> np.ndarray:
    return np.concatenate([x.ravel() for x in leaves(tree)]).astype(np.float64)


def with_random_b(lo, seed: int, std: float = 0.05):
    """The same adapter with every ``b`` drawn from N(0, std), so gradients w.r.t. ``a`` are non-zero."""
    paths, treedef = jax.tree_util.tree_flatten_with_path(lo)
    keys = iter(jax.random.split(jax.random.key(seed), len(paths)))
    new = [
        std * jax.random.normal(next(keys), x.shape, x.dtype) if path[-1].key == "b" else x
        for path, x in paths
    ]
    return jax.tree_util.tree_unflatten(treedef, new)


def new_client(service, model_dir, seed=0, *, random_b=True, rank=RANK):
    tc = service.create_lora_training_client(str(model_dir), rank=rank, seed=seed)
    if random_b:
        lo = tc._base.place_lora_tree(with_random_b(tc._adapter.lora, seed + 1000))
        on_worker(tc, lambda: setattr(tc._adapter, "lora", lo))
    return tc


def compiled(tc, name: str) -> int:
    """Programs compiled for the client's train entry point ``name`` (per base model and adapter layout)."""
    return tc._adapter.steps.compile_count(name)


def assert_trees_close(got, want, rtol=1e-4, atol_scale=1e-5):
    """Leafwise ``|got - want| <= rtol * |want| + atol_scale * max|want|``."""
    for g, w in zip(leaves(got), leaves(want), strict=True):
        assert g.shape == w.shape
        scale = float(np.abs(w).max())
        np.testing.assert_allclose(g, w, rtol=rtol, atol=atol_scale * scale + 1e-12)


def assert_grads_zero(tc):
    for g in leaves(grads_np(tc)):
        assert not np.any(g)


def logprobs_of(result) -> list[np.ndarray]:
    return [out["logprobs"].to_numpy() for out in result.loss_fn_outputs]


ADAM = tinker.AdamParams(learning_rate=1e-3)


# --------------------------------------------------------------------------------------------------
# gradients vs torch + PEFT
# --------------------------------------------------------------------------------------------------


def peft_grads(model_dir, lo, data):
    """Loss, per-datum logprobs and LoRA grads of Tinker's cross_entropy in torch + PEFT."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(lo.targets), lora_dropout=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(hf, config).eval()
    modules = {}
    for name, module in model.named_modules():
        if not hasattr(module, "lora_A") or "default" not in module.lora_A:
            continue
        target = name.rsplit(".", 1)[-1]
        ab = lo.targets_tree()[target]
        layer = None if target == "lm_head" else int(name.split(".layers.")[1].split(".")[0])
        a, b = (ab["a"], ab["b"]) if layer is None else (ab["a"][layer], ab["b"][layer])
        with torch.no_grad():
            module.lora_A["default"].weight.copy_(torch.from_numpy(np.array(a).T))
            module.lora_B["default"].weight.copy_(torch.from_numpy(np.array(b).T))
        assert module.scaling["default"] == pytest.approx(ALPHA / RANK)
        modules[target, layer] = module
    assert len(modules) == sum(1 if t == "lm_head" else hf.config.num_hidden_layers for t in lo.targets)
    total, logprobs = 0.0, []
    for d in data:
        logits = model(torch.tensor(tokens_of(d))[None]).logits[0].float()
        lp = torch.log_softmax(logits, -1)[
            torch.arange(logits.shape[0]), torch.tensor(inputs_of(d, "target_tokens"))
        ]
        total = total + (-lp * torch.tensor(inputs_of(d, "weights"))).sum()
        logprobs.append(lp.detach().numpy())
    total.backward()
    grads = {
        key: (m.lora_A["default"].weight.grad.numpy().T, m.lora_B["default"].weight.grad.numpy().T)
        for key, m in modules.items()
    }
    return float(total.detach()), logprobs, grads


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_lora_grads_match_peft(family, service, tiny_model_factory):
    """One forward_backward's accumulated LoRA grads equal torch + PEFT's (qwen3: tied lm_head)."""
    model_dir = tiny_model_factory(family)
    tc = new_client(service, model_dir, seed=1)
    data = make_data(seed=1)
    result = tc.forward_backward(data, "cross_entropy").result()
    ours, lo = grads_np(tc), tc._adapter.lora
    assert "lm_head" in lo.targets and ("lm_head" in tc._base.params) == (family == "llama")

    loss, logprobs, theirs = peft_grads(model_dir, lo, data)
    assert result.metrics["loss:sum"] == pytest.approx(loss, rel=1e-5)
    for got, want in zip(logprobs_of(result), logprobs, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-4)
    ours_tree = ours.targets_tree()
    for (target, layer), (ga, gb) in theirs.items():
        a, b = ours_tree[target]["a"], ours_tree[target]["b"]
        a, b = (a, b) if layer is None else (a[layer], b[layer])
        for got, want in ((a, ga), (b, gb)):
            scale = float(np.abs(want).max())
            assert scale > 1e-4, (target, layer)  # non-trivial, for a as well as b
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * scale, err_msg=f"{target}[{layer}]")


def test_bf16_lora_grads_match_f32(service, qwen3_dir, tmp_path):
    """A bf16 base model (bf16 products with f32 results, f32 LoRA master weights) gives the f32
    model's LoRA gradients to bf16 accuracy: every product's operands are rounded to 8 significant
    bits (unit roundoff 2^-9), and through a few layers the errors add up to a few percent."""
    bf16 = tinker.ServiceClient(store_dir=str(tmp_path / "bf16"), dtype=jnp.bfloat16)
    data = make_data(seed=3)
    grads = []
    for svc in (service, bf16):
        tc = new_client(svc, qwen3_dir, seed=3)
        tc.forward_backward(data, "cross_entropy").result()
        grads.append(grads_np(tc))
    assert tc._base.params["embed"].dtype == jnp.bfloat16
    for want, got in zip(leaves(grads[0]), leaves(grads[1]), strict=True):
        assert got.dtype == np.float32
        error = np.linalg.norm(got - want) / np.linalg.norm(want)
        assert 1e-3 < error < 6e-2  # really bf16 (1.3-4.5% here), and still the same gradient


# --------------------------------------------------------------------------------------------------
# accumulation and custom losses
# --------------------------------------------------------------------------------------------------


def test_two_halves_accumulate_to_the_full_batch(service, qwen3_dir):
    data = make_data(seed=2)
    halves, full = new_client(service, qwen3_dir, seed=2), new_client(service, qwen3_dir, seed=2)
    halves.forward_backward(data[:2], "cross_entropy").result()
    halves.forward_backward(data[2:], "cross_entropy").result()
    full.forward_backward(data, "cross_entropy").result()
    # Two programs sum the tokens in a different order: f32 round-off, not a semantic difference.
    assert_trees_close(grads_np(halves), grads_np(full), rtol=1e-4, atol_scale=1e-6)

    before = flat(lora_np(full))
    grad_diff = np.abs(flat(grads_np(halves)) - flat(grads_np(full))).max()
    adam = tinker.AdamParams(learning_rate=1e-3, eps=1e-3, weight_decay=0.1)  # eps: no sign(0 ± noise)
    halves.optim_step(adam).result()
    full.optim_step(adam).result()
    after_halves, after_full = flat(lora_np(halves)), flat(lora_np(full))
    assert np.abs(after_full - before).max() > 1e-4  # the step did something
    # A first Adam step moves by lr * g / (|g| + eps), whose slope in g is at most lr / eps = 1: the two
    # updates differ by no more than the gradients' round-off (plus the parameters' own f32 rounding).
    np.testing.assert_allclose(after_halves, after_full, rtol=0, atol=grad_diff + 1e-7)
    assert_grads_zero(halves)  # optim_step resets the accumulator


def test_micro_batches_add_up_to_the_whole_batch(service, qwen3_dir, tmp_path, monkeypatch):
    """``JTINKER_MICRO_BATCH_TOKENS`` caps the padded tokens of one program call (less activation
    memory): a batch split into several micro-batches gives the whole batch's logprobs and gradient."""
    import shutil

    data = make_data(lengths=(12, 9, 14, 7, 13, 10), seed=4)
    copies = [tmp_path / "same-model", tmp_path / "same-model-again"]  # base models of their own,
    for copy in copies:  # which read the setting when they load
        shutil.copytree(qwen3_dir, copy)
    monkeypatch.setenv("JTINKER_MICRO_BATCH_TOKENS", "16")
    split = new_client(service, copies[0], seed=4)
    assert split._base.max_tokens_per_batch == 16
    assert (
        len(build_batches(data, "cross_entropy", split._base.config, max_tokens_per_batch=16)) == 5
    )  # 9 + 7 pack
    whole = new_client(service, qwen3_dir, seed=4)
    outputs = [tc.forward_backward(data, "cross_entropy").result() for tc in (split, whole)]
    for got, want in zip(*(logprobs_of(o) for o in outputs), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)
    assert outputs[0].metrics["loss:sum"] == pytest.approx(outputs[1].metrics["loss:sum"], rel=1e-5)
    # Five programs sum the tokens in another order than one: f32 round-off (up to 2e-6 of the largest).
    assert_trees_close(grads_np(split), grads_np(whole), rtol=1e-4, atol_scale=1e-5)
    monkeypatch.setenv("JTINKER_MICRO_BATCH_TOKENS", "0")
    with pytest.raises(ValueError, match="JTINKER_MICRO_BATCH_TOKENS"):
        service.create_lora_training_client(str(copies[1]), rank=RANK)


def dpo_like(data, logprobs):
    """A nonlinear, cross-datum loss: -logsigmoid(beta * margin) over (chosen, rejected) pairs."""
    sums = [jnp.sum(lp * jnp.asarray(inputs_of(d, "weights"))) for d, lp in zip(data, logprobs, strict=True)]
    beta = 0.5
    loss = -jax.nn.log_sigmoid(beta * (sums[0] - sums[1])) - jax.nn.log_sigmoid(beta * (sums[2] - sums[3]))
    return loss, {"margin:sum": sums[0] - sums[1] + sums[2] - sums[3]}


def test_custom_loss_equals_two_pass_surrogate(service, qwen3_dir):
    """Tinker's forward_backward_custom: forward, d loss / d logprobs, then cross_entropy(-grad)."""
    data = make_data(seed=3)
    one_pass, two_pass = new_client(service, qwen3_dir, seed=3), new_client(service, qwen3_dir, seed=3)
    custom = one_pass.forward_backward_custom(data, dpo_like).result()

    forward = two_pass.forward(data, "cross_entropy").result()
    assert_grads_zero(two_pass)  # forward only
    logprobs = [jnp.asarray(lp) for lp in logprobs_of(forward)]
    (loss, metrics), dloss = jax.value_and_grad(dpo_like, argnums=1, has_aux=True)(data, logprobs)
    surrogate = [
        tinker.Datum(
            model_input=d.model_input,
            loss_fn_inputs={"target_tokens": inputs_of(d, "target_tokens"), "weights": -np.asarray(g)},
        )
        for d, g in zip(data, dloss, strict=True)
    ]
    two_pass.forward_backward(surrogate, "cross_entropy").result()

    assert custom.metrics["loss:sum"] == pytest.approx(float(loss), rel=1e-5)
    assert custom.metrics["margin:sum"] == pytest.approx(float(metrics["margin:sum"]), rel=1e-5)
    for got, want in zip(logprobs_of(custom), logprobs, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)
    assert min(float(np.abs(g).max()) for g in dloss) > 1e-3  # every datum gets gradient
    assert_trees_close(grads_np(one_pass), grads_np(two_pass), rtol=1e-4, atol_scale=1e-5)


def test_custom_cross_entropy_equals_builtin(service, qwen3_dir):
    def ce(data, logprobs):
        loss = sum(
            jnp.sum(-lp * jnp.asarray(inputs_of(d, "weights"))) for d, lp in zip(data, logprobs, strict=True)
        )
        return loss, {}

    data = make_data(seed=4)
    custom, builtin = new_client(service, qwen3_dir, seed=4), new_client(service, qwen3_dir, seed=4)
    got = custom.forward_backward_custom(data, ce).result()
    want = builtin.forward_backward(data, "cross_entropy").result()
    assert got.metrics["loss:sum"] == pytest.approx(want.metrics["loss:sum"], rel=1e-6)
    for a, b in zip(logprobs_of(got), logprobs_of(want), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert_trees_close(grads_np(custom), grads_np(builtin), rtol=1e-5, atol_scale=1e-6)


def _rl_data(tc, seed: int) -> list[tinker.Datum]:
    """Datums with ``advantages`` and ``sampling_logprobs`` near the model's own logprobs, so some
    ratios leave PPO's [0.8, 1.2] band."""
    rng = np.random.default_rng(seed)
    data = make_data(seed=seed)
    current = logprobs_of(tc.forward(data, "cross_entropy").result())
    return [
        tinker.Datum(
            model_input=d.model_input,
            loss_fn_inputs={
                "target_tokens": inputs_of(d, "target_tokens"),
                "sampling_logprobs": (lp + rng.normal(0, 0.3, lp.shape)).astype(np.float32),
                "advantages": rng.normal(0, 1, lp.shape).astype(np.float32),
            },
        )
        for d, lp in zip(data, current, strict=True)
    ]


def test_create_custom_loss_runs_a_torch_loss_as_jax(service, qwen3_dir):
    """SDK 0.38's ``create_custom_loss``: PPO written per datum in torch, traced and run as JAX in one
    pass, gives the built-in ``ppo`` loss's value, logprobs and gradient; metrics combine by suffix."""
    torch = pytest.importorskip("torch")

    def ppo_in_torch(logprobs, sampling_logprobs, advantages):
        ratio = torch.exp(logprobs - sampling_logprobs)
        objective = torch.minimum(ratio * advantages, torch.clamp(ratio, 0.8, 1.2) * advantages)
        return -objective.sum(), {
            "custom/ratio:mean": ratio.mean(),
            "custom/tokens:sum": torch.ones_like(ratio).sum(),
        }

    ranks = {"logprobs": 1, "sampling_logprobs": 1, "advantages": 1}
    handle = service.create_custom_loss(ppo_in_torch, ranks).result()
    assert isinstance(handle, tinker.LossHandle) and handle.input_names == ("sampling_logprobs", "advantages")
    custom, builtin = new_client(service, qwen3_dir, seed=5), new_client(service, qwen3_dir, seed=5)
    data = _rl_data(custom, 5)
    got = custom.forward_backward_custom(data, handle).result()
    # The built-in loss reads the sampling logprobs under "logprobs" (a custom loss's first parameter).
    renamed = [
        tinker.Datum(
            model_input=d.model_input,
            loss_fn_inputs={
                "target_tokens": inputs_of(d, "target_tokens"),
                "logprobs": inputs_of(d, "sampling_logprobs"),
                "advantages": inputs_of(d, "advantages"),
            },
        )
        for d in data
    ]
    want = builtin.forward_backward(renamed, "ppo").result()

    assert want.metrics["clipped:sum"] > 0  # the clipped branch is exercised
    assert got.metrics["loss:sum"] == pytest.approx(want.metrics["loss:sum"], rel=1e-5)
    ratios = [
        np.exp(lp - inputs_of(d, "sampling_logprobs")) for d, lp in zip(data, logprobs_of(got), strict=True)
    ]
    assert got.metrics["custom/ratio:mean"] == pytest.approx(np.mean([r.mean() for r in ratios]), rel=1e-5)
    assert got.metrics["custom/tokens:sum"] == sum(r.size for r in ratios)
    for a, b in zip(logprobs_of(got), logprobs_of(want), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert_trees_close(grads_np(custom), grads_np(builtin), rtol=1e-4, atol_scale=1e-5)


_BACKEND_COMPILES = [0]


def _count_compiles(event: str, duration: float, **kwargs) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
        _BACKEND_COMPILES[0] += 1


jax.monitoring.register_event_duration_secs_listener(_count_compiles)


def test_a_custom_loss_handle_compiles_nothing_for_new_lengths(service, qwen3_dir):
    """The loss runs on the batch padded to a (rows, length) bucket: datums of lengths never seen
    before, in the same buckets, compile nothing (no loss program, no eager op), even with the loss
    normalised by the size of T (read as the true length in the padded program)."""
    torch = pytest.importorskip("torch")

    def kl_penalized(logprobs, sampling_logprobs, advantages):
        ratio = torch.exp(logprobs - sampling_logprobs)
        pg = -(ratio * advantages).sum() / logprobs.shape[0]
        return pg + 0.1 * (logprobs - sampling_logprobs).pow(2).mean(), {}

    ranks = {"logprobs": 1, "sampling_logprobs": 1, "advantages": 1}
    handle = service.create_custom_loss(kl_penalized, ranks).result()
    assert handle.batched is not None and handle.unbatched_reason is None  # the graph has a padded form

    def every_other(logprobs, sampling_logprobs, advantages):
        return -(logprobs[::2] * advantages[::2]).sum(), {}

    strided = service.create_custom_loss(every_other, ranks).result()
    assert strided.batched is None and "slicing T other than by [a:-b]" in strided.unbatched_reason
    tc = new_client(service, qwen3_dir, seed=7)

    def call(lengths, seed):
        rng = np.random.default_rng(seed)

        def floats(n, mean):
            return rng.normal(mean, 1, n).astype(np.float32)

        data = [
            make_datum(
                rng.integers(0, VOCAB, n + 1), sampling_logprobs=floats(n, -5), advantages=floats(n, 0)
            )
            for n in lengths
        ]
        return tc.forward_backward_custom(data, handle).result()

    call([20, 25, 30, 27], seed=1)
    compiled = _BACKEND_COMPILES[0]
    out = call([21, 26, 29, 22], seed=2)
    assert _BACKEND_COMPILES[0] == compiled
    assert np.isfinite(out.metrics["loss:sum"]) and [len(lp) for lp in logprobs_of(out)] == [21, 26, 29, 22]


def test_create_custom_loss_rejects_bad_losses_and_data_by_name(service, qwen3_dir):
    """A loss the SDK's rules refuse fails at creation; data missing an input, or with the wrong rank,
    fails the call before anything accumulates."""
    torch = pytest.importorskip("torch")

    def uses_numpy(logprobs):
        return torch.as_tensor(np.asarray(1.0)) * logprobs.sum(), {}

    with pytest.raises(ValueError, match="create_custom_loss: uses_numpy"):
        service.create_custom_loss(uses_numpy, {"logprobs": 1}).result()

    def weighted(logprobs, advantages, beta):
        return -(logprobs * advantages).sum() * beta, {}

    handle = service.create_custom_loss(weighted, {"logprobs": 1, "advantages": 1, "beta": 0}).result()
    tc = new_client(service, qwen3_dir, seed=6)
    good = [make_datum(np.arange(6) + 1, advantages=np.ones(5, np.float32), beta=np.float32(0.5))]
    missing = [make_datum(np.arange(6) + 1, beta=np.float32(0.5))]
    with pytest.raises(ValueError, match=r"data\[0\]\.loss_fn_inputs\['advantages'\]: missing"):
        tc.forward_backward_custom(missing, handle)
    wrong_rank = [
        make_datum(np.arange(6) + 1, advantages=np.ones(5, np.float32), beta=np.ones(3, np.float32))
    ]
    with pytest.raises(
        ValueError, match=r"loss_fn_inputs\['beta'\]: rank 1, but loss 'weighted' declared rank 0"
    ):
        tc.forward_backward_custom(wrong_rank, handle)
    assert_grads_zero(tc)
    out = tc.forward_backward_custom(good, handle).result()
    lp = logprobs_of(out)[0]
    assert out.metrics["loss:sum"] == pytest.approx(-0.5 * lp.sum(), rel=1e-5)


def test_custom_loss_on_full_logits(service, qwen3_dir):
    """The logits hook: a cross-entropy written on full logits equals the built-in one, and a
    loss that needs the whole distribution (entropy bonus) changes the gradient."""

    def ce_from_logits(data, logits_list):
        loss = 0.0
        for d, logits in zip(data, logits_list, strict=True):
            targets = jnp.asarray(inputs_of(d, "target_tokens"), jnp.int32)
            lp = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), targets[:, None], -1)[:, 0]
            loss = loss + jnp.sum(-lp * jnp.asarray(inputs_of(d, "weights")))
        return loss, {"vocab:max": float(logits_list[0].shape[-1])}

    def ce_minus_entropy(data, logits_list):
        loss, _ = ce_from_logits(data, logits_list)
        entropy = sum(-jnp.sum(jax.nn.softmax(x) * jax.nn.log_softmax(x)) for x in logits_list)
        return loss - 0.1 * entropy, {}

    data = make_data(seed=5)
    logits_client, builtin = new_client(service, qwen3_dir, seed=5), new_client(service, qwen3_dir, seed=5)
    got = logits_client.forward_backward_custom(data, ce_from_logits, loss_type_input="logits").result()
    want = builtin.forward_backward(data, "cross_entropy").result()
    assert got.metrics["loss:sum"] == pytest.approx(want.metrics["loss:sum"], rel=1e-5)
    assert got.metrics["vocab:max"] == service._base(str(qwen3_dir)).config.vocab_size
    for a, b in zip(logprobs_of(got), logprobs_of(want), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert_trees_close(grads_np(logits_client), grads_np(builtin), rtol=1e-4, atol_scale=1e-6)

    entropy_client = new_client(service, qwen3_dir, seed=5)
    entropy_client.forward_backward_custom(data, ce_minus_entropy, loss_type_input="logits").result()
    a, b = grads_np(entropy_client), grads_np(builtin)
    assert (
        max(float(np.abs(x - y).max()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))
        > 1e-4
    )
    with pytest.raises(ValueError, match="loss_type_input"):
        builtin.forward_backward_custom(data, ce_from_logits, loss_type_input="probs")


# --------------------------------------------------------------------------------------------------
# training end to end; shared base model
# --------------------------------------------------------------------------------------------------


def test_memorises_four_sequences(service, qwen3_dir):
    tc = new_client(service, qwen3_dir, seed=5, random_b=False)
    rng = np.random.default_rng(5)
    data = [make_datum(rng.integers(0, VOCAB, n + 1), np.ones(n)) for n in LENGTHS]
    adam = tinker.AdamParams(learning_rate=5e-3)
    losses = []
    for _ in range(50):
        fb = tc.forward_backward(data, "cross_entropy")
        tc.optim_step(adam)
        losses.append(fb.result().metrics["loss:sum"])
    final = tc.forward(data, "cross_entropy").result().metrics["loss:sum"]
    assert losses[0] > 100  # ~ log(320) per token at the start
    assert final <= 0.1 * losses[0], (losses[0], losses[-1], final)


def test_two_clients_share_one_base_and_train_independently(service, qwen3_dir, tmp_path):
    one = new_client(service, qwen3_dir, seed=6)
    two = new_client(service, qwen3_dir, seed=7)
    other_service = tinker.ServiceClient(store_dir=str(tmp_path / "other"))
    three = other_service.create_lora_training_client(str(qwen3_dir), rank=2, seed=8)
    base = one._adapter.base
    assert two._adapter.base is base and three._adapter.base is base
    for x, y in zip(jax.tree.leaves(base.params), jax.tree.leaves(two._adapter.base.params), strict=True):
        assert x is y
    params_before = [np.array(x) for x in jax.tree.leaves(base.params)]
    two_before = lora_np(two)
    one_before = lora_np(one)

    data = make_data(seed=6)
    one.forward_backward(data, "cross_entropy").result()
    one.optim_step(tinker.AdamParams(learning_rate=1e-2)).result()
    assert np.abs(flat(lora_np(one)) - flat(one_before)).max() > 1e-3
    for x, y in zip(leaves(lora_np(two)), leaves(two_before), strict=True):
        np.testing.assert_array_equal(x, y)
    assert_grads_zero(two)
    for x, y in zip(jax.tree.leaves(base.params), params_before, strict=True):
        np.testing.assert_array_equal(np.asarray(x), y)  # the shared base is never trained

    # two's results depend on two's adapter only
    alone = new_client(service, qwen3_dir, seed=7)
    got = two.forward_backward(data, "cross_entropy").result()
    want = alone.forward_backward(data, "cross_entropy").result()
    assert got.metrics == want.metrics
    for x, y in zip(leaves(grads_np(two)), leaves(grads_np(alone)), strict=True):
        np.testing.assert_array_equal(x, y)


# --------------------------------------------------------------------------------------------------
# validation: every bad input is a ValueError naming the field, and changes nothing
# --------------------------------------------------------------------------------------------------


def _seq(n, seed=0):
    return np.random.default_rng(seed).integers(0, VOCAB, n + 1)


def _rl_datum(n=8, **overrides):
    seq = _seq(n, 1)
    inputs = {
        "target_tokens": seq[1:],
        "logprobs": -np.ones(n, np.float32),
        "advantages": np.linspace(-1, 1, n).astype(np.float32),
    }
    inputs.update(overrides)
    inputs = {k: v for k, v in inputs.items() if v is not None}
    return tinker.Datum(model_input=tinker.ModelInput.from_ints(seq[:-1].tolist()), loss_fn_inputs=inputs)


def _ce_datum(n=8, tokens=None, targets=None, weights=None, drop=()):
    seq = _seq(n, 2)
    inputs = {
        "target_tokens": seq[1:] if targets is None else np.asarray(targets),
        "weights": np.ones(n, np.float32) if weights is None else np.asarray(weights, np.float32),
    }
    inputs = {k: v for k, v in inputs.items() if k not in drop}
    toks = seq[:-1] if tokens is None else np.asarray(tokens)
    return tinker.Datum(model_input=tinker.ModelInput.from_ints(toks.tolist()), loss_fn_inputs=inputs)


def _bad(n=8, idx=3, value=np.nan):
    x = np.ones(n, np.float32)
    x[idx] = value
    return x


def _tokens_with(value, n=8):
    t = _seq(n, 2)[:-1].copy()
    t[2] = value
    return t


GOOD = _ce_datum(6)
BAD_REQUESTS = {
    # id: (loss_fn, data, loss_fn_config, pattern the message must match)
    "weights-shorter": (
        "cross_entropy",
        [GOOD, _ce_datum(8, weights=np.ones(7))],
        None,
        r"data\[1\].*weights",
    ),
    "targets-longer": ("cross_entropy", [GOOD, _ce_datum(8, targets=_seq(9)[1:])], None, r"target_tokens"),
    "token-negative": (
        "cross_entropy",
        [GOOD, _ce_datum(8, tokens=_tokens_with(-1))],
        None,
        r"data\[1\]\.model_input",
    ),
    "token-vocab": ("cross_entropy", [GOOD, _ce_datum(8, tokens=_tokens_with(VOCAB))], None, r"model_input"),
    "target-negative": (
        "cross_entropy",
        [GOOD, _ce_datum(8, targets=_tokens_with(-1))],
        None,
        r"target_tokens",
    ),
    "target-vocab": (
        "cross_entropy",
        [GOOD, _ce_datum(8, targets=_tokens_with(VOCAB))],
        None,
        r"target_tokens",
    ),
    "empty-batch": ("cross_entropy", [], None, r"data"),
    "nan-advantages": (
        "importance_sampling",
        [_rl_datum(), _rl_datum(advantages=_bad())],
        None,
        "advantages",
    ),
    "inf-advantages": ("ppo", [_rl_datum(advantages=_bad(value=np.inf))], None, "advantages"),
    "inf-weights": ("cross_entropy", [GOOD, _ce_datum(8, weights=_bad(value=-np.inf))], None, "weights"),
    "nan-weights": ("cross_entropy", [_ce_datum(8, weights=_bad())], None, "weights"),
    "nan-logprobs": ("importance_sampling", [_rl_datum(), _rl_datum(logprobs=_bad())], None, "logprobs"),
    "unknown-loss": ("cross_entropyy", [GOOD], None, "loss_fn"),
    "missing-weights": ("cross_entropy", [GOOD, _ce_datum(8, drop=("weights",))], None, "weights"),
    "missing-targets": ("cross_entropy", [_ce_datum(8, drop=("target_tokens",))], None, "target_tokens"),
    "missing-advantages": ("ppo", [_rl_datum(advantages=None)], None, "advantages"),
    "missing-ratio-mask": ("gspo", [_rl_datum()], None, r"data\[0\].*sequence_ratio_mask.*missing"),
    "fractional-ratio-mask": (
        "gspo",
        [_rl_datum(sequence_ratio_mask=np.ones(8)), _rl_datum(sequence_ratio_mask=np.full(8, 0.5))],
        None,
        r"data\[1\].*sequence_ratio_mask.*0 or 1",
    ),
    "stable-reinforce": ("stable_reinforce", [_rl_datum()], None, "stable_reinforce.*not supported"),
    "tensor-in-config": (
        "ppo",
        [_rl_datum()],
        {"clip_low_threshold": np.array([0.8, 0.9])},
        "loss_fn_config",
    ),
    "unknown-config-key": ("cross_entropy", [GOOD], {"beta": 0.1}, "loss_fn_config"),
    "too-long": ("cross_entropy", [GOOD, _ce_datum(1025)], None, r"data\[1\]\.model_input.*1024"),
}


@pytest.fixture(scope="module")
def validating_client(service, qwen3_dir):
    return new_client(service, qwen3_dir, seed=9)


# The custom path takes no loss name or config and reads only target_tokens itself.
CUSTOM_CASES = (
    "targets-longer",
    "token-negative",
    "token-vocab",
    "target-negative",
    "target-vocab",
    "empty-batch",
    "missing-targets",
    "too-long",
)
CASES = [("forward_backward", c) for c in sorted(BAD_REQUESTS)] + [
    ("forward_backward_custom", c) for c in CUSTOM_CASES
]


@pytest.mark.parametrize(("method", "case"), CASES)
def test_bad_input_is_refused_and_changes_nothing(method, case, validating_client):
    tc = validating_client
    loss_fn, data, config, pattern = BAD_REQUESTS[case]

    def call():
        if method == "forward_backward":
            return tc.forward_backward(data, loss_fn, config).result()
        return tc.forward_backward_custom(data, lambda d, lps: (sum(jnp.sum(lp) for lp in lps), {})).result()

    before = lora_np(tc)
    with pytest.raises(ValueError, match=pattern):
        call()
    assert_grads_zero(tc)
    for x, y in zip(leaves(lora_np(tc)), leaves(before), strict=True):
        np.testing.assert_array_equal(x, y)

    # the worker survived: a good request right after works, then the accumulator is cleared again
    result = tc.forward_backward([GOOD], "cross_entropy").result()
    assert np.isfinite(result.metrics["loss:sum"])
    assert max(float(np.abs(g).max()) for g in leaves(grads_np(tc))) > 0
    on_worker(
        tc, lambda: setattr(tc._adapter, "grad_acc", jax.tree.map(jnp.zeros_like, tc._adapter.grad_acc))
    )


def test_bad_optimizer_params_and_failing_custom_loss(validating_client):
    tc = validating_client
    for field, params in [
        ("learning_rate", tinker.AdamParams(learning_rate=float("nan"))),
        ("beta2", tinker.AdamParams(beta2=1.0)),
        ("eps", tinker.AdamParams(eps=-1.0)),
    ]:
        with pytest.raises(ValueError, match=rf"adam_params\.{field}"):
            tc.optim_step(params).result()

    def broken(data, logprobs):
        raise ValueError("my loss is broken")

    with pytest.raises(ValueError, match="my loss is broken"):
        tc.forward_backward_custom([GOOD], broken).result()
    assert_grads_zero(tc)
    assert np.isfinite(tc.forward([GOOD], "cross_entropy").result().metrics["loss:sum"])


def test_unknown_base_model_is_refused(service):
    with pytest.raises(ValueError, match="base_model"):
        service.create_lora_training_client("no-such-org/no-such-model", rank=RANK)
    with pytest.raises(ValueError, match="rank"):
        service.create_lora_training_client("jtinker/tiny-qwen3", rank=0)


# --------------------------------------------------------------------------------------------------
# compilation
# --------------------------------------------------------------------------------------------------


def test_a_stream_of_shapes_compiles_a_handful_of_programs(service, qwen3_dir):
    tc = new_client(service, qwen3_dir, seed=10)
    rng = np.random.default_rng(10)
    stream = [
        [3],
        [5, 8],
        [7, 4, 6],
        [8],
        [2, 2, 3, 4],
        [6, 6, 6],
        [5, 3, 8, 7, 4, 2],
        [4, 4],
        [8, 8, 1],
        [7],
    ]
    stream += [[3, 6, 2, 5, 8], [1, 2]]  # 12 different requests, at most 8 tokens a datum
    assert len({tuple(lengths) for lengths in stream}) == 12
    requests = [[make_datum(rng.integers(0, VOCAB, n + 1)) for n in lengths] for lengths in stream]
    config = tc._base.config
    shapes = {b.batch.tokens.shape for r in requests for _, b in build_batches(r, "cross_entropy", config)}
    assert len(shapes) <= 3, shapes

    before = compiled(tc, "accumulate")
    for data in requests:
        tc.forward_backward(data, "cross_entropy").result()
    assert compiled(tc, "accumulate") - before <= len(shapes)

    # optimizer hyperparameters are traced: changing every one of them never recompiles
    tc.optim_step(ADAM).result()
    before = compiled(tc, "optim_update")
    for i, (lr, b1, b2, eps, wd, clip) in enumerate(
        [
            (1e-3, 0.9, 0.95, 1e-12, 0.0, 0.0),
            (2e-4, 0.8, 0.99, 1e-8, 0.1, 1.0),
            (5e-5, 0.0, 0.5, 1e-6, 0.01, 1e3),
        ]
    ):
        tc.forward_backward(requests[i], "cross_entropy").result()
        params = tinker.AdamParams(
            learning_rate=lr, beta1=b1, beta2=b2, eps=eps, weight_decay=wd, grad_clip_norm=clip
        )
        tc.optim_step(params).result()
    assert compiled(tc, "optim_update") == before


# --------------------------------------------------------------------------------------------------
# optim_step vs a NumPy AdamW
# --------------------------------------------------------------------------------------------------


def test_optim_step_matches_numpy_adamw(service, qwen3_dir):
    tc = new_client(service, qwen3_dir, seed=11)
    data = make_data(seed=11)
    steps = [
        tinker.AdamParams(learning_rate=1e-2, beta2=0.95, eps=1e-12, weight_decay=0.1, grad_clip_norm=0.5),
        tinker.AdamParams(learning_rate=5e-3, beta1=0.8, beta2=0.95, eps=1e-12, weight_decay=0.0),
        tinker.AdamParams(learning_rate=2e-3, beta2=0.99, eps=1e-8, weight_decay=0.05, grad_clip_norm=1e4),
    ]
    p = flat(lora_np(tc))
    m, v = np.zeros_like(p), np.zeros_like(p)
    for t, hp in enumerate(steps, start=1):
        tc.forward_backward(data, "cross_entropy").result()
        g = flat(grads_np(tc))
        norm = float(np.sqrt(np.sum(g**2)))
        if t == 1:
            assert norm > 2 * hp.grad_clip_norm  # clipping is active on the first step
        if hp.grad_clip_norm > 0 and norm > hp.grad_clip_norm:
            g = g * hp.grad_clip_norm / norm
        m = hp.beta1 * m + (1 - hp.beta1) * g
        v = hp.beta2 * v + (1 - hp.beta2) * g**2
        m_hat, v_hat = m / (1 - hp.beta1**t), v / (1 - hp.beta2**t)
        p = p - hp.learning_rate * (m_hat / (np.sqrt(v_hat) + hp.eps) + hp.weight_decay * p)

        metrics = tc.optim_step(hp).result().metrics
        assert metrics["grad_norm"] == pytest.approx(norm, rel=1e-5)
        got = flat(lora_np(tc))
        np.testing.assert_allclose(got, p, rtol=0, atol=2e-6)
    assert tc._adapter.step == len(steps)


# --------------------------------------------------------------------------------------------------
# pipelining and asyncio
# --------------------------------------------------------------------------------------------------


def test_pipelined_and_async_requests_equal_sequential(service, qwen3_dir):
    first, second = make_data(seed=12), make_data((5, 11, 8), seed=13)
    adam = tinker.AdamParams(learning_rate=1e-2)

    sequential = new_client(service, qwen3_dir, seed=12)
    want1 = sequential.forward_backward(first, "cross_entropy").result()
    sequential.optim_step(adam).result()
    want3 = sequential.forward_backward(second, "cross_entropy").result()

    pipelined = new_client(service, qwen3_dir, seed=12)
    f1 = pipelined.forward_backward(first, "cross_entropy")
    f2 = pipelined.optim_step(adam)
    f3 = pipelined.forward_backward(second, "cross_entropy")
    got3, got2, got1 = f3.result(), f2.result(), f1.result()
    assert f1.done() and f2.done() and f3.done()
    assert "grad_norm" in got2.metrics

    async def run(tc):
        fut = await tc.forward_backward_async(first, "cross_entropy")
        assert isinstance(fut, tinker.APIFuture)
        res1 = await fut
        res2 = await (await tc.optim_step_async(adam))
        fut3 = await tc.forward_backward_async(second, "cross_entropy")
        return res1, res2, await fut3.result_async(timeout=60)

    asynchronous = new_client(service, qwen3_dir, seed=12)
    async1, _, async3 = asyncio.run(run(asynchronous))

    for got in ((got1, got3), (async1, async3)):
        for g, w in zip(got, (want1, want3), strict=True):
            assert g.metrics == w.metrics
            for a, b in zip(logprobs_of(g), logprobs_of(w), strict=True):
                np.testing.assert_array_equal(a, b)
    for tc in (pipelined, asynchronous):
        for a, b in zip(leaves(lora_np(tc)), leaves(lora_np(sequential)), strict=True):
            np.testing.assert_array_equal(a, b)
        for a, b in zip(leaves(grads_np(tc)), leaves(grads_np(sequential)), strict=True):
            np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------------------------------
# multi-target and packing
# --------------------------------------------------------------------------------------------------


def test_multi_target_cross_entropy(service, qwen3_dir):
    tc = new_client(service, qwen3_dir, seed=14)
    rng = np.random.default_rng(14)
    n, k = 10, 3
    tokens = rng.integers(0, VOCAB, n)
    targets = rng.integers(0, VOCAB, (n, k))
    weights = rng.uniform(0, 1, (n, k)).astype(np.float32)
    datum = tinker.Datum(
        model_input=tinker.ModelInput.from_ints(tokens.tolist()),
        loss_fn_inputs={"target_tokens": targets, "weights": weights},
    )
    result = tc.forward_backward([datum], "cross_entropy").result()
    (lp,) = logprobs_of(result)
    assert lp.shape == (n, k)
    for j in range(k):  # column j is the single-target logprob of targets[:, j]
        single = make_datum(np.concatenate([tokens, [0]]), np.ones(n))
        single = tinker.Datum(
            model_input=single.model_input,
            loss_fn_inputs={"target_tokens": targets[:, j], "weights": np.ones(n)},
        )
        (want,) = logprobs_of(tc.forward([single], "cross_entropy").result())
        np.testing.assert_allclose(lp[:, j], want, atol=1e-5)
    assert result.metrics["loss:sum"] == pytest.approx(float(np.sum(-lp * weights)), rel=1e-5)
    assert max(float(np.abs(g).max()) for g in leaves(grads_np(tc))) > 0


def test_rows_pad_to_the_next_row_bucket(qwen3_dir):
    """Datums too long to share a row take one each, and the rows pad to 1.5x steps, not powers of
    two: 5 rows run as 6 (not 8), 9 as 12 (not 16)."""
    from jtinker.models import ModelConfig

    config = ModelConfig.from_pretrained(qwen3_dir)
    rng = np.random.default_rng(5)
    for n, rows in ((5, 6), (7, 8), (9, 12), (13, 16)):
        data = [make_datum(rng.integers(0, VOCAB, 61)) for _ in range(n)]  # 60 tokens: rows of 64
        ((_, host),) = build_batches(data, "cross_entropy", config, share_prefixes=False)
        assert host.batch.tokens.shape == (rows, 64) and host.batch.mask.sum() == 60 * n


def test_packed_batch_equals_each_datum_alone(service, qwen3_dir):
    tc = new_client(service, qwen3_dir, seed=15)
    rng = np.random.default_rng(15)
    data = [make_datum(rng.integers(0, VOCAB, n + 1)) for n in rng.integers(2, 9, 12)]
    ((_, host),) = build_batches(data, "cross_entropy", tc._base.config)
    assert host.batch.tokens.shape[0] < len(data) // 2  # really packed: several datums per row

    packed = tc.forward(data, "cross_entropy").result()
    alone = [tc.forward([d], "cross_entropy").result() for d in data]
    for d, got, want in zip(data, logprobs_of(packed), alone, strict=True):
        assert got.shape == (len(tokens_of(d)),)
        np.testing.assert_allclose(got, logprobs_of(want)[0], atol=1e-5)
    total = sum(r.metrics["loss:sum"] for r in alone)
    assert packed.metrics["loss:sum"] == pytest.approx(total, rel=1e-5)


def test_gspo_sequence_ratios_per_datum_in_packed_rows(service, qwen3_dir):
    """``gspo`` through the client: datums packed into shared rows each get their own sequence ratio (over
    their sampled tokens), checked in NumPy from the learner logprobs the call returns."""
    tc = new_client(service, qwen3_dir, seed=16)
    rng = np.random.default_rng(16)
    data, refs = [], []
    for n, prompt in ((9, 3), (5, 2), (11, 4), (4, 1)):
        seq = rng.integers(0, VOCAB, n + 1)
        tail = np.arange(n) >= prompt
        sampler = np.where(tail, rng.uniform(-6, -4, n), 0.0).astype(np.float32)
        adv = np.where(tail, rng.choice([-1.0, 1.0]), 0.0).astype(np.float32)
        inputs = {"target_tokens": seq[1:], "logprobs": sampler, "advantages": adv}
        inputs["sequence_ratio_mask"] = tail.astype(np.float32)
        data.append(
            tinker.Datum(model_input=tinker.ModelInput.from_ints(seq[:-1].tolist()), loss_fn_inputs=inputs)
        )
        refs.append((tail, sampler, adv))
    ((_, host),) = build_batches(data, "gspo", tc._base.config)
    assert host.batch.tokens.shape[0] < len(data)  # packed: several datums share a row
    config = {"clip_low_threshold": 0.5, "clip_high_threshold": 2.0}
    result = tc.forward_backward(data, "gspo", config).result()
    want = 0.0
    for lp, (tail, sampler, adv) in zip(logprobs_of(result), refs, strict=True):
        s = np.exp(np.mean(lp[tail] - sampler[tail]))
        want += float(np.sum(-np.minimum(s * adv, np.clip(s, 0.5, 2.0) * adv)))
    assert result.metrics["loss:sum"] == pytest.approx(want, rel=1e-5)
    assert result.metrics["clipped:sum"] > 0  # the sampler logprobs are far below the learner's
    assert max(float(np.abs(g).max()) for g in leaves(grads_np(tc))) > 0
