"""Meshes and rules: sharded training equals one device; params are really sharded; multi-process."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from jtinker import sharding, train, types
from jtinker.engine import BaseModel, LoraSpec

REPO = Path(__file__).resolve().parents[1]


def _data(seed: int = 0, count: int = 8):
    rng = np.random.default_rng(seed)
    data = []
    for _ in range(count):
        seq = rng.integers(0, 256, size=int(rng.integers(6, 40))).tolist()
        weights = rng.uniform(0, 1, size=len(seq) - 1).astype(np.float32)
        data.append(types.Datum(
            model_input=types.ModelInput.from_ints(seq[:-1]),
            loss_fn_inputs={"target_tokens": seq[1:], "weights": weights},
        ))  # fmt: skip
    return data


def _train(model_dir: Path, mesh_config: str | None, steps: int = 3):
    mesh = sharding.make_mesh(mesh_config) if mesh_config else None
    base = BaseModel("tiny", model_dir, mesh=mesh)
    adapter = base.new_adapter(LoraSpec(rank=8, seed=0))
    hparams = train.AdamHyperparams.create(learning_rate=1e-2, weight_decay=0.01)
    losses = []
    for step in range(steps):
        _, metrics = adapter.forward_backward(_data(step), "cross_entropy", None, backward=True)
        adapter.optim_step(hparams)
        losses.append(metrics["loss:sum"])
    return base, adapter, np.array(losses)


@pytest.fixture(scope="module")
def single_device_run(qwen3_dir):
    _, adapter, losses = _train(qwen3_dir, None)
    return losses, jax.tree.map(np.asarray, adapter.lora)


@pytest.mark.parametrize("mesh_config", ["fsdp=4,tp=2", "dp=2,fsdp=4"])
def test_sharded_training_matches_one_device(qwen3_dir, single_device_run, mesh_config):
    ref_losses, ref_lora = single_device_run
    base, adapter, losses = _train(qwen3_dir, mesh_config)
    assert len(base.mesh.devices.flat) == 8
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-6)
    diffs = jax.tree.leaves(
        jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), adapter.lora, ref_lora)
    )
    assert max(diffs) < 1e-5


def test_sequence_level_loss_on_a_mesh_matches_one_device(qwen3_dir):
    """``gspo`` reduces over each datum of a packed row (a segment sum): the same over ``dp x fsdp``."""
    rng = np.random.default_rng(3)
    data = []
    for _ in range(8):
        seq = rng.integers(0, 256, size=int(rng.integers(6, 30))).tolist()
        n, prompt = len(seq) - 1, 3
        tail = (np.arange(n) >= prompt).astype(np.float32)
        inputs = {
            "target_tokens": seq[1:],
            "logprobs": tail * rng.uniform(-7, -5, n).astype(np.float32),
            "advantages": tail * rng.choice([-1.0, 1.0]),
            "sequence_ratio_mask": tail,
        }
        data.append(types.Datum(model_input=types.ModelInput.from_ints(seq[:-1]), loss_fn_inputs=inputs))
    config = {
        "clip_low_threshold": 0.0,
        "clip_high_threshold": 1e9,
    }  # no clipping: every datum has a gradient
    results = []
    for mesh_config in (None, "dp=2,fsdp=4"):
        base = BaseModel("tiny", qwen3_dir, mesh=sharding.make_mesh(mesh_config) if mesh_config else None)
        adapter = base.new_adapter(LoraSpec(rank=8, seed=0))
        _, metrics = adapter.forward_backward(data, "gspo", config, backward=True)
        results.append((metrics["loss:sum"], jax.tree.map(np.asarray, adapter.grad_acc)))
    (loss_one, grads_one), (loss_mesh, grads_mesh) = results
    np.testing.assert_allclose(loss_mesh, loss_one, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads_mesh), jax.tree.leaves(grads_one), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * float(np.abs(b).max()))
    assert max(float(np.abs(g).max()) for g in jax.tree.leaves(grads_one)) > 0


def test_params_lora_and_adam_state_are_sharded(qwen3_dir):
    base = BaseModel("tiny", qwen3_dir, mesh=sharding.make_mesh("fsdp=4,tp=2"))
    config = base.config
    q = base.params["layers"]["q_proj"]  # [L, H, nH*D]: embed over fsdp, heads over tp
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tp")
    assert {s.data.shape for s in q.addressable_shards} == {
        (config.num_layers, config.hidden_size // 4, config.q_size // 2)
    }
    embed = base.params["embed"]  # [V, H]: vocab over tp, embed over fsdp
    assert {s.data.shape for s in embed.addressable_shards} == {
        (config.vocab_size // 2, config.hidden_size // 4)
    }
    adapter = base.new_adapter(LoraSpec(rank=8, seed=0))
    b = adapter.lora.weights["layers"]["down_proj"]["b"]  # [L, r, H]: out dim follows down_proj's embed
    assert b.sharding.spec == jax.sharding.PartitionSpec(None, None, "fsdp")
    mu = adapter.opt_state.inner_state[0].mu.weights["layers"]["down_proj"]["b"]
    assert mu.sharding == b.sharding


def test_functional_api_loads_sharded_params(qwen3_dir):
    from jtinker.models import forward, load_pretrained

    mesh = sharding.make_mesh("fsdp=4,tp=2")
    config, params = load_pretrained(qwen3_dir, mesh=mesh)
    assert params["layers"]["gate_proj"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tp")
    _, local = load_pretrained(qwen3_dir)
    tokens = jax.numpy.arange(16, dtype=jax.numpy.int32).reshape(2, 8)
    np.testing.assert_allclose(forward(config, params, tokens), forward(config, local, tokens), atol=1e-5)
    with pytest.raises(ValueError, match="mesh: "):
        load_pretrained(qwen3_dir, mesh=sharding.make_mesh("tp=3"))


def test_rules_are_data_not_code(qwen3_dir):
    rules = sharding.ShardingRules().replace(embed=None, mlp=("fsdp", "tp"))
    spec = rules.spec(("layers", "embed", "mlp"))
    assert spec == jax.sharding.PartitionSpec(None, None, ("fsdp", "tp"))
    base = BaseModel("tiny", qwen3_dir, mesh=sharding.make_mesh("fsdp=4,tp=2"), rules=rules)
    assert base.params["layers"]["up_proj"].sharding.spec == spec


def test_mesh_that_does_not_divide_the_model_fails_before_compiling(qwen3_dir):
    with pytest.raises(ValueError, match=r"mesh: .*embed.* dimension 0 has size 320"):
        BaseModel("tiny", qwen3_dir, mesh=sharding.make_mesh("tp=3"))
    with pytest.raises(ValueError, match="mesh: 'tp=x'"):
        sharding.MeshConfig.parse("tp=x")
    with pytest.raises(ValueError, match="needs 16 devices"):
        sharding.make_mesh("fsdp=16")


def test_mesh_from_a_dict_and_bad_sizes_named():
    assert sharding.make_mesh({"fsdp": 4, "tp": 2}).shape == sharding.make_mesh("fsdp=4,tp=2").shape
    with pytest.raises(ValueError, match=r"mesh: unknown axes \['data'\]"):
        sharding.make_mesh({"data": 2})
    for bad in (0, -1, 2.0, "2", True):
        with pytest.raises(ValueError, match=f"mesh: tp={bad!r} must be an int >= 1"):
            sharding.MeshConfig(tp=bad)
    with pytest.raises(TypeError, match="mesh: expected a MeshConfig, a dict or 'axis=size,...', got list"):
        sharding.make_mesh([4, 2])


def test_two_process_launch_script(tmp_path):
    """Two processes via the launch script: identical losses, one checkpoint a single process loads."""
    env = {**os.environ, "JTINKER_HOME": str(tmp_path / "home"), "JTINKER_LOCAL_DEVICES": "2"}
    env.pop("XLA_FLAGS", None)
    out = tmp_path / "out"
    launcher, script = REPO / "examples/multihost/launch_local.sh", REPO / "examples/multihost/train_lora.py"
    command = [str(launcher), "2", str(script), "--steps", "2", "--out", str(out)]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads((out / f"losses.{i}.json").read_text()) for i in range(2)]
    assert records[0]["losses"] == records[1]["losses"]
    assert records[0]["checkpoint"] == records[1]["checkpoint"]
    assert records[0]["samples"] == records[1]["samples"]  # unseeded: one seed for both processes
    assert len(records[0]["samples"]) == 2 and records[0]["samples"][0] != records[0]["samples"][1]
    assert records[0]["mesh"] == "fsdp=4"
    loader = (
        "import sys, jtinker as tinker;"
        "sc = tinker.ServiceClient(store_dir=sys.argv[1]);"
        "tc = sc.create_training_client_from_state_with_optimizer(sys.argv[2]);"
        "print('STEP', tc._adapter.step)"
    )
    single = subprocess.run(
        [sys.executable, "-c", loader, str(out / "runs"), records[0]["checkpoint"]],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert single.returncode == 0, single.stderr[-3000:]
    assert "STEP 2" in single.stdout


def test_greedy_sampling_on_a_mesh_matches_one_device(tiny_model_factory):
    from jtinker.models import lora as lora_lib
    from jtinker.sampling import SampleRequest

    model_dir = tiny_model_factory("llama")
    requests = [
        SampleRequest(prompt=list(range(40, 40 + n)), num_samples=2, max_tokens=16, temperature=0.0)
        for n in (3, 9, 17)
    ]
    tokens = {}
    for mesh_config in (None, "fsdp=4,tp=2", "dp=2,fsdp=4"):
        base = BaseModel("tiny", model_dir, mesh=sharding.make_mesh(mesh_config) if mesh_config else None)
        adapter = lora_lib.init(base.config, 8, jax.random.key(1))
        for i, ab in enumerate(adapter.targets_tree().values()):  # non-zero b: the adapter matters
            ab["b"] = 0.3 * jax.random.normal(jax.random.key(i), ab["b"].shape)
        adapter = base.place_lora_tree(adapter)
        results = base.sampler.sample(requests, adapter)
        # A second turn extends each first sample: its prefix comes from the (sharded) prefix cache.
        turn = [
            dataclasses.replace(q, prompt=q.prompt + r.sequences[0][0])
            for q, r in zip(requests, results, strict=True)
        ]
        again = base.sampler.sample(turn, adapter)
        assert [r.prompt_cache_hit_tokens for r in again] == [len(q.prompt) - 1 for q in turn]
        tokens[mesh_config] = [seq[0] for r in results + again for seq in r.sequences]
    assert len({t for seq in tokens[None] for t in seq}) > 3  # the output is not degenerate
    assert tokens["fsdp=4,tp=2"] == tokens[None]
    assert tokens["dp=2,fsdp=4"] == tokens[None]
