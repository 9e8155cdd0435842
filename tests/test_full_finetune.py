"""Full fine-tuning: every weight (embeddings included) trains behind the same verbs as LoRA."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM

import jtinker as tinker
from jtinker import types
from jtinker.export import export_merged
from jtinker.models import ModelConfig

TOKENS = [5, 17, 42, 99, 7, 3, 250, 11, 64, 8, 120, 33]


def datum(tokens: list[int], weights: list[float] | None = None) -> types.Datum:
    weights = weights if weights is not None else [1.0] * (len(tokens) - 1)
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": weights},
    )


@pytest.fixture(scope="module", params=["qwen3", "llama"])
def model_dir(request, tiny_model_factory):
    # llama's tiny model ties its embeddings: the shared matrix gets both gradients.
    return tiny_model_factory(request.param)


def torch_grads(model_dir, tokens: list[int]) -> dict[str, np.ndarray]:
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    ids = torch.tensor([tokens])
    logits = model(input_ids=ids[:, :-1]).logits
    loss = torch.nn.functional.cross_entropy(logits[0], ids[0, 1:], reduction="sum")
    loss.backward()
    return {name: p.grad.numpy() for name, p in model.named_parameters()}, float(loss)


def test_gradients_equal_torch(service, model_dir, tmp_path):
    training = service.create_full_training_client(base_model=str(model_dir))
    out = training.forward_backward([datum(TOKENS)], "cross_entropy").result()
    expected, torch_loss = torch_grads(model_dir, TOKENS)
    assert out.metrics["loss:sum"] == pytest.approx(torch_loss, rel=1e-5)
    # The accumulated gradient has the params' layout: write it out with HF names to compare by name.
    grads = training._adapter.grad_acc.weights
    config = ModelConfig.from_pretrained(model_dir)
    exported = export_merged(model_dir, config, grads, None, tmp_path / "grads")
    ours = load_file(str(exported / "model.safetensors"))
    assert set(expected) <= set(ours) | {"lm_head.weight"}
    for name, g in expected.items():
        mine = ours.get(name, ours.get("model.embed_tokens.weight"))
        scale = max(1.0, float(np.abs(g).max()))
        assert np.abs(mine - g).max() <= 1e-4 * scale, name
    assert np.abs(ours["model.embed_tokens.weight"]).max() > 0  # embeddings do train


def test_memorises_a_sequence_and_samples_it(service, tiny_model_factory):
    training = service.create_full_training_client(base_model=str(tiny_model_factory("qwen3")))
    adam = types.AdamParams(learning_rate=1e-2)
    losses = []
    for _ in range(25):
        fb = training.forward_backward([datum(TOKENS)], "cross_entropy")
        training.optim_step(adam)
        losses.append(fb.result().metrics["loss:sum"])
    assert losses[-1] < 0.02 * losses[0]
    sampler = training.save_weights_and_get_sampling_client()
    params = types.SamplingParams(max_tokens=len(TOKENS) - 4, temperature=0.0)
    result = sampler.sample(types.ModelInput.from_ints(TOKENS[:4]), 1, params).result()
    assert list(result.sequences[0].tokens) == TOKENS[4:]


def test_base_model_stays_frozen_for_other_clients(service, tiny_model_factory):
    base = str(tiny_model_factory("qwen3"))
    lora_client = service.create_lora_training_client(base_model=base, rank=4, seed=0)
    before = lora_client.forward([datum(TOKENS)], "cross_entropy").result().metrics["loss:sum"]
    full = service.create_full_training_client(base_model=base)
    for _ in range(3):
        full.forward_backward([datum(TOKENS)], "cross_entropy")
        full.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    after = lora_client.forward([datum(TOKENS)], "cross_entropy").result().metrics["loss:sum"]
    assert after == before


def test_save_resume_export_merged(service, tiny_model_factory, tmp_path):
    base = tiny_model_factory("qwen3")
    adam = types.AdamParams(learning_rate=3e-3)
    data = [datum(TOKENS), datum(TOKENS[3:] + TOKENS[:3])]
    training = service.create_full_training_client(base_model=str(base))
    for _ in range(2):
        training.forward_backward(data, "cross_entropy")
        training.optim_step(adam)
    path = training.save_state("two").result().path
    assert training.get_info().is_lora is False

    resumed = service.create_training_client_from_state_with_optimizer(path)
    for client in (training, resumed):
        client.forward_backward(data, "cross_entropy")
        client.optim_step(adam)
    a = training.forward(data, "cross_entropy").result().metrics["loss:sum"]
    b = resumed.forward(data, "cross_entropy").result().metrics["loss:sum"]
    assert a == b  # Adam state and step restored bit for bit

    # A LoRA client cannot load a full checkpoint, and the message says why.
    lora_client = service.create_lora_training_client(base_model=str(base), rank=4)
    with pytest.raises(ValueError, match="full"):
        lora_client.load_state(path).result()

    # Merged export loads in transformers and gives the trained model's logprobs.
    sampler_path = training.save_weights_for_sampler("final").result().path
    from jtinker.cli import main

    out = tmp_path / "merged"
    assert main(["export", sampler_path, str(out), "--format", "merged"]) == 0
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    ids = torch.tensor([TOKENS])
    hf = torch.log_softmax(model(input_ids=ids[:, :-1]).logits[0], -1)
    hf = hf[torch.arange(len(TOKENS) - 1), ids[0, 1:]].detach().numpy()
    ours = training.forward([datum(TOKENS)], "cross_entropy").result().loss_fn_outputs[0]["logprobs"]
    np.testing.assert_allclose(ours.to_numpy(), hf, atol=1e-4)
    assert main(["export", sampler_path, str(tmp_path / "peft"), "--format", "peft"]) == 1

    # save_weights_external writes the same merged model (a full fine-tune has no adapter to export).
    external = training.save_weights_external("final").result().path
    files = service.create_rest_client().get_external_weights_urls(external).result().urls
    assert "config.json" in files and "model.safetensors" in files
    for name in files:
        assert (tmp_path / "merged" / name).read_bytes() == service.store.files(external)[name].read_bytes()


def test_fsdp_sharded_matches_one_device(tiny_model_factory, tmp_path, monkeypatch):
    monkeypatch.setenv("JTINKER_HOME", str(tmp_path / "home"))
    base = str(tiny_model_factory("qwen3"))
    adam = types.AdamParams(learning_rate=3e-3)
    losses = {}
    for mesh in (None, "dp=2,fsdp=4"):
        service = tinker.ServiceClient(store_dir=str(tmp_path / "runs"), mesh=mesh)
        training = service.create_full_training_client(base_model=base)
        for _ in range(2):
            training.forward_backward([datum(TOKENS)] * 8, "cross_entropy")
            training.optim_step(adam)
        losses[mesh] = training.forward([datum(TOKENS)] * 8, "cross_entropy").result().metrics["loss:sum"]
        if mesh is not None:  # weights and both Adam moments are sharded over fsdp, like the base
            adapter = training._adapter
            q = adapter.lora.weights["layers"]["q_proj"]
            assert "fsdp" in str(q.sharding.spec)
            mu = adapter.opt_state.inner_state[0].mu.weights["layers"]["q_proj"]
            assert mu.sharding.spec == q.sharding.spec
    assert losses["dp=2,fsdp=4"] == pytest.approx(losses[None], rel=1e-5)


def test_bf16_base_trains_f32_master_weights(tmp_path, monkeypatch, tiny_model_factory):
    """On a bf16 base the trainable copy and Adam's moments are f32 (a 1e-5 step is below bf16's
    resolution: bf16 weights would not move), while the model computes in bf16 as the base does."""
    import jax
    import jax.numpy as jnp

    monkeypatch.setenv("JTINKER_HOME", str(tmp_path / "home"))
    service = tinker.ServiceClient(dtype=jnp.bfloat16)
    base = str(tiny_model_factory("qwen3"))
    full = service.create_full_training_client(base_model=base)
    reference = service.create_lora_training_client(base_model=base, rank=4)  # b = 0: the base itself
    data = [datum(TOKENS)]

    def logprobs(client):
        return client.forward(data, "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()

    np.testing.assert_array_equal(logprobs(full), logprobs(reference))
    adapter = full._adapter
    assert {x.dtype for x in jax.tree.leaves(adapter.lora.weights)} == {jnp.dtype(jnp.float32)}
    assert {x.dtype for x in jax.tree.leaves(adapter.opt_state) if x.ndim} == {jnp.dtype(jnp.float32)}

    before = np.asarray(adapter.base.params["layers"]["up_proj"])  # bf16
    full.forward_backward(data, "cross_entropy")
    full.optim_step(types.AdamParams(learning_rate=1e-5)).result()
    master = np.asarray(adapter.lora.weights["layers"]["up_proj"])
    assert np.abs(master - before.astype(np.float32)).max() > 5e-6  # the masters moved ...
    assert (master.astype(before.dtype) == before).mean() > 0.5  # ... mostly below bf16's resolution

    state = full.save_state("bf16-state").result().path
    resumed = service.create_training_client_from_state_with_optimizer(state)
    for a, b in zip(jax.tree.leaves(resumed._adapter.lora), jax.tree.leaves(adapter.lora), strict=True):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))  # masters restored exactly

    from jtinker.cli import main

    path = full.save_weights_for_sampler("bf16").result().path
    assert main(["export", path, str(tmp_path / "merged"), "--format", "merged"]) == 0
    hf_config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert hf_config.get("torch_dtype", hf_config.get("dtype")) == "bfloat16"  # the base's dtype
