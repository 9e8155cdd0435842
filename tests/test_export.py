"""PEFT adapter export/import and merged-checkpoint export, checked against PEFT and transformers."""

from __future__ import annotations

import json
import math
import re
import shutil
import urllib.request
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pyrage
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from jtinker.export import export_merged, export_peft, import_peft
from jtinker.models import forward, load_pretrained
from jtinker.models import lora as lora_lib

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

ATOL = 1e-4
_forward = jax.jit(forward, static_argnums=0)


def random_lora(config, rank, targets=lora_lib.ALL_TARGETS, *, alpha=16.0, use_rslora=False, seed=0):
    """A LoRA with non-zero a AND b (b = 0 would make every comparison vacuous)."""
    lora = lora_lib.init(
        config, rank, jax.random.key(seed), alpha=alpha, targets=targets, use_rslora=use_rslora
    )
    leaves, treedef = jax.tree.flatten(lora)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    # a ~ N(0, 1/in) like an init; b large enough that the update visibly moves the logits.
    new = [
        jax.random.normal(k, x.shape) * (x.shape[-2] ** -0.5 if i % 2 == 0 else 0.3)
        for i, (k, x) in enumerate(zip(keys, leaves, strict=True))
    ]
    return jax.tree.unflatten(treedef, new)


def tokens(config, seed=0):
    return np.random.default_rng(seed).integers(0, config.vocab_size, (2, 11))


def jax_logprobs(config, params, toks, lora=None):
    return np.asarray(jax.nn.log_softmax(_forward(config, params, jnp.asarray(toks), lora=lora), axis=-1))


def torch_logprobs(model, toks):
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor(toks)).logits.float(), dim=-1).numpy()


def load_peft(model_dir, adapter_dir):
    """PeftModel over an f32 base; fails on PEFT's missing-adapter-keys warning."""
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(base, str(adapter_dir))
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "missing adapter keys" in m], messages
    return model.eval()


# (family, config overrides, adapt lm_head); Llama is untied by default, Qwen tied.
PEFT_CASES = [
    ("llama", {}, False),
    ("llama", {}, True),
    ("qwen2", {}, False),
    ("qwen2", {}, True),
    ("qwen3", {}, False),
    ("qwen3", {}, True),
    ("qwen3", {"tie_word_embeddings": False}, True),
    ("llama", {"tie_word_embeddings": True}, True),
]


@pytest.mark.parametrize("family,overrides,head", PEFT_CASES)
def test_export_peft_matches_peft(tiny_model_factory, tmp_path, family, overrides, head):
    model_dir = tiny_model_factory(family, **overrides)
    config, params = load_pretrained(model_dir)
    targets = lora_lib.ALL_TARGETS if head else lora_lib.ATTN_TARGETS + lora_lib.MLP_TARGETS
    lora = random_lora(config, 8, targets, alpha=16.0)
    out = export_peft(config, lora, tmp_path / "adapter", base_model_name_or_path=str(model_dir))

    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16 and cfg["target_modules"] == sorted(targets)
    assert cfg["use_dora"] is False and cfg["modules_to_save"] is None and cfg["rank_pattern"] == {}
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert len(tensors) == 2 * (7 * config.num_layers + head)
    assert all(t.dtype == np.float32 for t in tensors.values())
    q_a = tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"]
    np.testing.assert_array_equal(q_a, np.asarray(lora.weights["layers"]["q_proj"]["a"][1]).T)
    assert tensors["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"].shape == (
        config.hidden_size,
        8,
    )
    if head:
        assert tensors["base_model.model.lm_head.lora_B.weight"].shape == (config.vocab_size, 8)
    with safe_open(str(out / "adapter_model.safetensors"), "np") as f:
        assert f.metadata() == {"format": "pt"}

    toks = tokens(config)
    ours = jax_logprobs(config, params, toks, lora)
    assert np.abs(ours - jax_logprobs(config, params, toks)).max() > 0.05  # the adapter matters
    np.testing.assert_allclose(torch_logprobs(load_peft(model_dir, out), toks), ours, atol=ATOL)

    back = import_peft(out, config)
    assert back.targets == lora.targets and back.alpha == 16.0 and back.use_rslora is False
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(lora), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("use_rslora", [False, True])
def test_rank_padding_is_exact(qwen3_dir, tmp_path, use_rslora):
    config, params = load_pretrained(qwen3_dir)
    lora = random_lora(config, 4, alpha=12.0, use_rslora=use_rslora, seed=3)
    out = export_peft(config, lora, tmp_path / "padded", base_model_name_or_path=str(qwen3_dir))

    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 8
    assert cfg["lora_alpha"] == pytest.approx(12.0 * (math.sqrt(2) if use_rslora else 2))
    tensors = load_file(str(out / "adapter_model.safetensors"))
    a = tensors["base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"]
    b = tensors["base_model.model.lm_head.lora_B.weight"]
    assert a.shape[0] == 8 and not a[4:].any() and a[:4].any()
    assert b.shape[1] == 8 and not b[:, 4:].any()

    toks = tokens(config, seed=1)
    ours = jax_logprobs(config, params, toks, lora)
    np.testing.assert_allclose(torch_logprobs(load_peft(qwen3_dir, out), toks), ours, atol=ATOL)
    back = import_peft(out, config)
    assert back.rank == 8 and back.scale == pytest.approx(lora.scale)
    np.testing.assert_allclose(jax_logprobs(config, params, toks, back), ours, atol=1e-5)

    raw = export_peft(config, lora, tmp_path / "raw", base_model_name_or_path="x", vllm_compatible=False)
    assert json.loads((raw / "adapter_config.json").read_text())["r"] == 4


def test_rank_beyond_vllm_limit(qwen3_dir, tmp_path):
    config, _ = load_pretrained(qwen3_dir)
    lora = random_lora(config, 513, ("lm_head",))
    with pytest.raises(ValueError, match="vllm_compatible=False"):
        export_peft(config, lora, tmp_path / "a", base_model_name_or_path="x")
    out = export_peft(config, lora, tmp_path / "b", base_model_name_or_path="x", vllm_compatible=False)
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 513


# (family, overrides, adapt lm_head, max_shard_bytes)
MERGED_CASES = [
    ("llama", {}, True, 2 * 1024**3),
    ("qwen3", {}, True, 2 * 1024**3),  # tied + lm_head LoRA: the merge unties
    ("qwen2", {}, False, 2 * 1024**3),  # tied, head untouched: stays tied
    ("qwen2", {}, True, 60_000),  # several shards + index
]


@pytest.mark.parametrize("family,overrides,head,max_shard_bytes", MERGED_CASES)
def test_export_merged_loads_in_transformers(
    tiny_model_factory, tmp_path, family, overrides, head, max_shard_bytes
):
    model_dir = tiny_model_factory(family, **overrides)
    config, params = load_pretrained(model_dir)
    targets = lora_lib.ALL_TARGETS if head else lora_lib.ATTN_TARGETS + lora_lib.MLP_TARGETS
    lora = random_lora(config, 8, targets, alpha=8.0, seed=5)
    out = export_merged(model_dir, config, params, lora, tmp_path / "merged", max_shard_bytes=max_shard_bytes)

    hf_cfg = json.loads((out / "config.json").read_text())
    untied = config.tie_word_embeddings and head
    assert hf_cfg["tie_word_embeddings"] == (config.tie_word_embeddings and not head)
    assert hf_cfg["torch_dtype"] == "float32"
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (model_dir / name).read_bytes()
    shards = sorted(out.glob("*.safetensors"))
    index = out / "model.safetensors.index.json"
    if max_shard_bytes < 1_000_000:
        assert len(shards) > 2 and index.is_file()
        weight_map = json.loads(index.read_text())["weight_map"]
        assert set(weight_map.values()) == {p.name for p in shards}
    else:
        assert [p.name for p in shards] == ["model.safetensors"] and not index.exists()
    names = set()
    for p in shards:
        with safe_open(str(p), "np") as f:
            names |= set(f.keys())
    assert ("lm_head.weight" in names) == (not config.tie_word_embeddings or untied)

    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    toks = tokens(config, seed=2)
    ours = jax_logprobs(config, params, toks, lora)
    assert np.abs(ours - jax_logprobs(config, params, toks)).max() > 0.05
    np.testing.assert_allclose(torch_logprobs(model.eval(), toks), ours, atol=ATOL)
    # The embedding itself is never touched, even when the merged head stops sharing it.
    np.testing.assert_array_equal(
        model.get_input_embeddings().weight.detach().numpy(), np.asarray(params["embed"])
    )


def test_export_merged_bf16_is_exact(qwen3_dir, tmp_path):
    config, params = load_pretrained(qwen3_dir, dtype=jnp.bfloat16)
    lora = random_lora(config, 8, seed=7)
    out = export_merged(qwen3_dir, config, params, lora, tmp_path / "bf16", max_shard_bytes=40_000)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    # Reading back with our own loader must give exactly lora.merge's result.
    config2, params2 = load_pretrained(out, dtype=jnp.bfloat16)
    assert not config2.tie_word_embeddings
    want = lora_lib.merge(config, params, lora)
    assert jax.tree.structure(params2) == jax.tree.structure(want)
    for got, exp in zip(jax.tree.leaves(params2), jax.tree.leaves(want), strict=True):
        assert got.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(got), np.asarray(exp))
    with safe_open(str(next(out.glob("model-*.safetensors"))), "pt") as f:
        assert all(f.get_slice(k).get_dtype() == "BF16" for k in f.keys())  # noqa: SIM118
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16

    # A dtype override converts f32 params on the way out.
    config32, params32 = load_pretrained(qwen3_dir)
    out32 = export_merged(qwen3_dir, config32, params32, None, tmp_path / "cast", dtype=ml_dtypes.bfloat16)
    assert json.loads((out32 / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert json.loads((out32 / "config.json").read_text())["tie_word_embeddings"] is True
    _, cast = load_pretrained(out32, dtype=jnp.bfloat16)
    np.testing.assert_array_equal(
        np.asarray(cast["layers"]["up_proj"]), np.asarray(params32["layers"]["up_proj"].astype(jnp.bfloat16))
    )


# (family, target_modules, use_rslora, safe_serialization)
PEFT_SAVED_CASES = [
    (
        "qwen3",
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"],
        False,
        True,
    ),
    ("llama", "all-linear", True, True),
    ("qwen2", r".*\.(q_proj|v_proj|down_proj)", False, False),
]


@pytest.mark.parametrize("family,target_modules,use_rslora,safe", PEFT_SAVED_CASES)
def test_import_adapter_saved_by_peft(tiny_model_factory, tmp_path, family, target_modules, use_rslora, safe):
    model_dir = tiny_model_factory(family)
    config, params = load_pretrained(model_dir)
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    lora_config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=target_modules,
        use_rslora=use_rslora,
        init_lora_weights=False,  # random A and B, so the adapter is not a no-op
        task_type="CAUSAL_LM",
    )
    model = peft.get_peft_model(base, lora_config).eval()
    adapter_dir = tmp_path / "peft"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(adapter_dir, safe_serialization=safe)
    assert (adapter_dir / ("adapter_model.safetensors" if safe else "adapter_model.bin")).is_file()

    lora = import_peft(adapter_dir, config)
    assert lora.rank == 4 and lora.alpha == 8.0 and lora.use_rslora == use_rslora
    if target_modules == "all-linear":  # PEFT's shorthand leaves out the output layer
        expected = lora_lib.ATTN_TARGETS + lora_lib.MLP_TARGETS
    elif isinstance(target_modules, str):
        expected = ("q_proj", "v_proj", "down_proj")
    else:
        expected = lora_lib.ALL_TARGETS
    assert lora.targets == expected
    toks = tokens(config, seed=4)
    ours = jax_logprobs(config, params, toks, lora)
    assert np.abs(ours - jax_logprobs(config, params, toks)).max() > 0.05
    np.testing.assert_allclose(torch_logprobs(model, toks), ours, atol=ATOL)


@pytest.fixture(scope="module")
def good_adapter(tiny_model_factory, tmp_path_factory):
    model_dir = tiny_model_factory("qwen3")
    config, _ = load_pretrained(model_dir)
    out = tmp_path_factory.mktemp("good") / "adapter"
    export_peft(config, random_lora(config, 8), out, base_model_name_or_path=str(model_dir))
    return config, out


def _edit_config(**changes):
    def edit(cfg, tensors):
        cfg.update(changes)

    return edit


def _drop_key(key):
    def edit(cfg, tensors):
        del tensors[key]

    return edit


def _reshape_key(key):
    def edit(cfg, tensors):
        tensors[key] = np.zeros((tensors[key].shape[0] + 1, tensors[key].shape[1]), np.float32)

    return edit


def _add_embed_tokens(as_list):
    def edit(cfg, tensors):
        cfg["target_modules"] = cfg["target_modules"] + ["embed_tokens"] if as_list else "all-linear"
        tensors["base_model.model.model.embed_tokens.lora_embedding_A"] = np.ones((8, 320), np.float32)
        tensors["base_model.model.model.embed_tokens.lora_embedding_B"] = np.ones((64, 8), np.float32)

    return edit


Q_B = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"
BAD_ADAPTERS = [
    ("dora", _edit_config(use_dora=True), "DoRA"),
    ("modules_to_save", _edit_config(modules_to_save=["lm_head"]), "modules_to_save"),
    ("rank_pattern", _edit_config(rank_pattern={"q_proj": 16}), "rank_pattern"),
    ("alpha_pattern", _edit_config(alpha_pattern={"q_proj": 4}), "alpha_pattern"),
    ("peft_type", _edit_config(peft_type="IA3"), "peft_type"),
    ("fan_in_fan_out", _edit_config(fan_in_fan_out=True), "fan_in_fan_out"),
    ("missing_key", _drop_key(Q_B), re.escape(Q_B)),
    ("bad_shape", _reshape_key(Q_B), re.escape(Q_B)),
    ("embed_tokens_target", _add_embed_tokens(True), "embed_tokens"),
    ("embed_tokens_weights", _add_embed_tokens(False), "embed_tokens"),
]


@pytest.mark.parametrize("name,edit,match", BAD_ADAPTERS, ids=[c[0] for c in BAD_ADAPTERS])
def test_import_rejects_bad_adapters(good_adapter, tmp_path, name, edit, match):
    config, src = good_adapter
    bad = tmp_path / name
    shutil.copytree(src, bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    tensors = load_file(str(bad / "adapter_model.safetensors"))
    edit(cfg, tensors)
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    save_file(tensors, str(bad / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=match):
        import_peft(bad, config)


def test_import_requires_adapter_files(tmp_path, good_adapter):
    config, src = good_adapter
    with pytest.raises(FileNotFoundError):
        import_peft(tmp_path, config)
    (tmp_path / "adapter_config.json").write_bytes((src / "adapter_config.json").read_bytes())
    with pytest.raises(FileNotFoundError, match="adapter_model"):
        import_peft(tmp_path, config)


def test_export_merged_refuses_model_dir(qwen3_dir):
    config, params = load_pretrained(qwen3_dir)
    with pytest.raises(ValueError, match="model_dir"):
        export_merged(qwen3_dir, config, params, None, Path(qwen3_dir))


def test_trained_adapter_exports_match_compute_logprobs(tmp_path, tiny_model_factory):
    """Train through the Tinker API, then PEFT and merged exports reproduce compute_logprobs (1e-4)."""
    import jtinker as tinker
    from jtinker.cli import load_checkpoint_lora

    model_dir = tiny_model_factory("qwen3")
    service = tinker.ServiceClient(store_dir=str(tmp_path / "runs"))
    training = service.create_lora_training_client(str(model_dir), rank=8, seed=0)
    rng = np.random.default_rng(0)
    data = []
    for _ in range(4):
        seq = rng.integers(0, 256, size=24).tolist()
        data.append(tinker.Datum(
            model_input=tinker.ModelInput.from_ints(seq[:-1]),
            loss_fn_inputs={"target_tokens": seq[1:], "weights": [1.0] * 23},
        ))  # fmt: skip
    for _ in range(5):
        training.forward_backward(data, "cross_entropy")
        training.optim_step(tinker.AdamParams(learning_rate=1e-2))
    state = training.save_state("trained").result().path
    sampler_path = training.save_weights_for_sampler("trained").result().path

    held_out = rng.integers(0, 256, size=32).tolist()
    ours = (
        service.create_sampling_client(model_path=sampler_path)
        .compute_logprobs(tinker.ModelInput.from_ints(held_out))
        .result()
    )
    assert ours[0] is None
    ours = np.asarray(ours[1:])

    lora, config, _, _ = load_checkpoint_lora(service.store, state, base_model=str(model_dir))
    assert float(np.abs(np.asarray(lora.weights["layers"]["q_proj"]["b"])).max()) > 0  # really trained
    ids = torch.tensor([held_out])

    def reference(model) -> np.ndarray:
        with torch.no_grad():
            lsm = torch.log_softmax(model(ids).logits.float(), -1)[0, :-1]
        return lsm.gather(-1, ids[0, 1:, None])[:, 0].numpy()

    adapter_dir = export_peft(config, lora, tmp_path / "peft", base_model_name_or_path=str(model_dir))
    base = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    peft_model = peft.PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    np.testing.assert_allclose(reference(peft_model), ours, atol=1e-4)

    _, params = load_pretrained(model_dir)
    merged_dir = export_merged(model_dir, config, params, lora, tmp_path / "merged")
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32).eval()
    np.testing.assert_allclose(reference(merged), ours, atol=1e-4)

    # The SDK's way out: save_weights_external, then the files behind get_external_weights_urls.
    external = training.save_weights_external("trained").result().path
    assert external == f"tinker://{training.model_id}/external_weights/trained"
    listed = service.create_rest_client().get_external_weights_urls(external).result()
    assert sorted(listed.urls) == ["adapter_config.json", "adapter_model.safetensors"]
    downloaded = tmp_path / "downloaded"
    downloaded.mkdir()
    for name, url in listed.urls.items():
        with urllib.request.urlopen(url) as response:
            (downloaded / name).write_bytes(response.read())
        assert (downloaded / name).read_bytes() == (adapter_dir / name).read_bytes()
    base = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    np.testing.assert_allclose(
        reference(peft.PeftModel.from_pretrained(base, str(downloaded))), ours, atol=1e-4
    )
    # Encrypted to an age key: every file becomes <file>.age, which decrypts to the same bytes.
    identity = pyrage.x25519.Identity.generate()
    encrypted = training.save_weights_external(
        "sealed", age_encryption_recipients=[str(identity.to_public())]
    )
    sealed = service.create_rest_client().get_external_weights_urls(encrypted.result().path).result().urls
    assert sorted(sealed) == ["adapter_config.json.age", "adapter_model.safetensors.age"]
    for name, url in sealed.items():
        with urllib.request.urlopen(url) as response:
            ciphertext = response.read()
        assert (
            pyrage.decrypt(ciphertext, [identity]) == (adapter_dir / name.removesuffix(".age")).read_bytes()
        )
    with pytest.raises(ValueError, match=r"age_encryption_recipients\[1\]: not an age1"):
        training.save_weights_external(
            "bad", age_encryption_recipients=[str(identity.to_public()), "age1nope"]
        )

    listing = service.create_rest_client().list_checkpoints(training.model_id).result().checkpoints
    assert [c.checkpoint_type for c in listing if c.tinker_path == external] == ["external"]
    with pytest.raises(ValueError, match="external_weights.*weights/ or sampler_weights/"):
        service.create_sampling_client(model_path=external)
