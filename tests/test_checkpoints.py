"""The checkpoint store: Tinker paths, listing, bit-identical resume, name validation, refusing
another base model, and atomicity when the saving process is SIGKILLed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import jtinker as tinker
from jtinker.checkpoints import CheckpointPath

VOCAB = 320
RANK = 4


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("JTINKER_HOME", str(tmp_path / "home"))


def make_data(seed=0, lengths=(12, 9, 14, 7)) -> list[tinker.Datum]:
    rng = np.random.default_rng(seed)
    data = []
    for n in lengths:
        seq = rng.integers(0, VOCAB, n + 1)
        data.append(
            tinker.Datum(
                model_input=tinker.ModelInput.from_ints(seq[:-1].tolist()),
                loss_fn_inputs={"target_tokens": seq[1:], "weights": np.ones(n, np.float32)},
            )
        )
    return data


DATA = make_data()
ADAM = tinker.AdamParams(learning_rate=1e-2, weight_decay=0.01)


def train(tc, steps: int, data=DATA) -> list[float]:
    losses = []
    for _ in range(steps):
        fb = tc.forward_backward(data, "cross_entropy")
        step = tc.optim_step(ADAM)
        losses.append(fb.result().metrics["loss:sum"])
        step.result()
    return losses


def state(tc, what="lora") -> list[np.ndarray]:
    """Copies of the adapter's ``lora`` or ``opt_state`` leaves, read in request order."""
    return tc._submit(lambda: [np.array(x) for x in jax.tree.leaves(getattr(tc._adapter, what))]).result()


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


def differs(a, b) -> bool:
    return any(not np.array_equal(x, y) for x, y in zip(a, b, strict=True))


# --------------------------------------------------------------------------------------------------
# paths and listing
# --------------------------------------------------------------------------------------------------


def test_paths_and_listing(service, qwen3_dir):
    tc = service.create_lora_training_client(str(qwen3_dir), rank=RANK, seed=0)
    train(tc, 1)
    state_path = tc.save_state("first").result().path
    sampler_path = tc.save_weights_for_sampler("first").result().path
    assert state_path == f"tinker://{tc.model_id}/weights/first"
    assert sampler_path == f"tinker://{tc.model_id}/sampler_weights/first"

    listed = {c["tinker_path"]: c for c in service.store.list_checkpoints(tc.model_id)}
    assert set(listed) == {state_path, sampler_path}
    assert listed[state_path]["checkpoint_type"] == "training"
    assert listed[sampler_path]["checkpoint_type"] == "sampler"
    assert listed[state_path]["checkpoint_id"] == "weights/first"
    assert listed[sampler_path]["checkpoint_id"] == "sampler_weights/first"
    assert all(c["size_bytes"] > 0 and c["meta"]["step"] == 1 for c in listed.values())
    assert {c["tinker_path"] for c in service.store.list_checkpoints()} >= {state_path, sampler_path}
    assert tc.model_id in service.store.list_runs()

    # sampler weights load as weights, but hold no optimizer state to resume
    other = service.create_lora_training_client(str(qwen3_dir), rank=RANK, seed=1)
    other.load_state(sampler_path).result()
    assert_same(state(other), state(tc))
    with pytest.raises(ValueError, match="path"):
        other.load_state_with_optimizer(sampler_path).result()

    for bad in ("not-a-path", f"tinker://{tc.model_id}/bogus/first", "tinker://x/weights/../../etc"):
        with pytest.raises(ValueError, match="path"):
            other.load_state(bad).result()
    with pytest.raises((ValueError, FileNotFoundError), match="missing"):
        other.load_state(f"tinker://{tc.model_id}/weights/missing").result()


# --------------------------------------------------------------------------------------------------
# resume
# --------------------------------------------------------------------------------------------------


def test_resume_is_bit_identical(service, qwen3_dir):
    original = service.create_lora_training_client(str(qwen3_dir), rank=RANK, seed=3)
    train(original, 3)
    path = original.save_state("after-3").result().path

    restored = service.create_training_client_from_state_with_optimizer(path)
    fresh = service.create_lora_training_client(str(qwen3_dir), rank=RANK, seed=99)
    assert differs(state(fresh), state(original))
    fresh.load_state_with_optimizer(path).result()
    for tc in (restored, fresh):
        assert tc.model_id != original.model_id
        assert tc._adapter.step == 3
        assert_same(state(tc), state(original))
        assert_same(state(tc, "opt_state"), state(original, "opt_state"))

    want = train(original, 3)
    for tc in (restored, fresh):
        assert train(tc, 3) == want
        assert_same(state(tc), state(original))
        assert_same(state(tc, "opt_state"), state(original, "opt_state"))
        assert tc._adapter.step == 6


def test_load_state_resets_the_optimizer(service, qwen3_dir):
    original = service.create_lora_training_client(str(qwen3_dir), rank=RANK, seed=4)
    train(original, 2)
    path = original.save_state("after-2").result().path
    weights = state(original)

    with_optimizer = service.create_training_client_from_state_with_optimizer(path)
    weights_only = [
        service.create_training_client_from_state(path),
        service.create_lora_training_client(str(qwen3_dir), rank=RANK, seed=5),
    ]
    weights_only[1].load_state(path).result()
    for tc in weights_only:
        assert tc._adapter.step == 0
        assert_same(state(tc), weights)
        adam = tc._adapter.opt_state.inner_state[0]
        assert int(adam.count) == 0
        assert not any(np.any(np.asarray(x)) for x in jax.tree.leaves((adam.mu, adam.nu)))

    train(with_optimizer, 1)
    for tc in weights_only:
        train(tc, 1)
        assert tc._adapter.step == 1
        assert differs(state(tc), state(with_optimizer))  # fresh Adam moments give another update
    assert_same(state(weights_only[0]), state(weights_only[1]))


# --------------------------------------------------------------------------------------------------
# names, overwrite, compatibility
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../x", "", "a/b", ".hidden", "x" * 200, "a\\b", "x..y", None])
def test_bad_names_are_refused(service, qwen3_dir, name):
    tc = service.create_lora_training_client(str(qwen3_dir), rank=RANK, seed=0)
    for save in (tc.save_state, tc.save_weights_for_sampler):
        with pytest.raises(ValueError, match="name"):
            save(name).result()
    assert service.store.list_checkpoints() == []
    assert tc.save_state("ok-name_1.0").result().path.endswith("/weights/ok-name_1.0")


def test_saving_twice_needs_overwrite(service, qwen3_dir):
    tc = service.create_lora_training_client(str(qwen3_dir), rank=RANK, seed=6)
    train(tc, 1)
    path = tc.save_state("dup").result().path
    sampler = tc.save_weights_for_sampler("dup").result().path
    train(tc, 1)
    for save in (tc.save_state, tc.save_weights_for_sampler):
        with pytest.raises(ValueError, match="name.*exists"):
            save("dup").result()
    assert service.store.read_meta(path)["step"] == 1  # untouched by the refused save

    assert tc.save_state("dup", overwrite=True).result().path == path
    assert tc.save_weights_for_sampler("dup", overwrite=True).result().path == sampler
    assert [c["checkpoint_id"] for c in service.store.list_checkpoints(tc.model_id)].count("weights/dup") == 1
    for p in (path, sampler):
        assert service.store.read_meta(p)["step"] == 2
        loaded = service.create_training_client_from_state(p)
        assert_same(state(loaded), state(tc))


def test_back_to_back_saves_of_one_name(service, qwen3_dir):
    """Saves are asynchronous: a second save of a name must see the first, not race it."""
    tc = service.create_lora_training_client(str(qwen3_dir), rank=RANK, seed=7)
    first, second = tc.save_state("race"), tc.save_state("race")
    assert first.result().path.endswith("/weights/race")
    with pytest.raises(ValueError, match="name.*exists"):
        second.result()

    train(tc, 1)
    futures = [tc.save_state("race", overwrite=True)]
    train(tc, 1)
    futures.append(tc.save_state("race", overwrite=True))
    for f in futures:
        f.result()
    assert service.store.read_meta(first.result().path)["step"] == 2  # the last save wins
    assert [c["checkpoint_id"] for c in service.store.list_checkpoints()] == ["weights/race"]
    # a load submitted right after a save (without waiting on it) sees the saved state
    saved = tc.save_state("race-2")
    other = service.create_lora_training_client(str(qwen3_dir), rank=RANK, seed=8)
    other.load_state_with_optimizer(f"tinker://{tc.model_id}/weights/race-2").result()
    assert other._adapter.step == 2 and saved.result().path.endswith("/race-2")
    assert_same(state(other), state(tc))


def test_another_base_model_or_rank_is_refused(service, qwen3_dir, tiny_model_factory):
    tc = service.create_lora_training_client(str(qwen3_dir), rank=RANK, seed=9)
    train(tc, 1)
    path = tc.save_state("qwen3").result().path

    qwen2 = service.create_lora_training_client(str(tiny_model_factory("qwen2")), rank=RANK, seed=9)
    before = state(qwen2)
    for load in (qwen2.load_state, qwen2.load_state_with_optimizer):
        with pytest.raises(ValueError, match="base model"):
            load(path).result()
    assert_same(state(qwen2), before)  # a refused load changes nothing
    with pytest.raises(ValueError, match="base model"):
        service.create_training_client_from_state(path, base_model=str(tiny_model_factory("qwen2")))

    wider = service.create_lora_training_client(str(qwen3_dir), rank=2 * RANK, seed=9)
    with pytest.raises(ValueError, match="rank"):
        wider.load_state(path).result()
    no_mlp = service.create_lora_training_client(str(qwen3_dir), rank=RANK, seed=9, train_mlp=False)
    with pytest.raises(ValueError, match="train_mlp"):
        no_mlp.load_state(path).result()


# --------------------------------------------------------------------------------------------------
# atomicity: a process SIGKILLed while saving
# --------------------------------------------------------------------------------------------------

# The child trains, saves "a" (step 1) and waits for it, prints READY, then loops: train a step,
# overwrite "a", save "b". Every filesystem rename and rmtree is an "event". In "snapshot" mode the
# child copies the whole store before and after each event (each copy is a state a crash at that
# instant would leave); in "kill" mode it prints each event and stops at event number ``target``, so
# the parent can SIGKILL it at exactly that point. Before saving step s it writes its LoRA leaves to
# w<s>.npz, so the parent can check that a checkpoint holds exactly the weights of its step.
CHILD = textwrap.dedent(
    """
    import os, shutil, sys, threading, time
    os.environ["JAX_PLATFORMS"] = "cpu"
    model_dir, store, out, mode, target, cycles = sys.argv[1:7]
    target, cycles = int(target), int(cycles)
    import numpy as np

    lock = threading.RLock()
    armed = []
    count = [0]
    real_rename, real_rmtree, real_copytree = os.rename, shutil.rmtree, shutil.copytree

    def event(kind, name):
        if not armed:
            return
        count[0] += 1
        if mode == "snapshot":
            for _ in range(5):  # a file may vanish under the copy; retry
                copy = os.path.join(out, "snapshots", f"{count[0]:03d}-{kind}-{name}")
                try:
                    real_copytree(store, copy)
                    break
                except Exception:
                    real_rmtree(copy, ignore_errors=True)
        else:
            print("EVENT", count[0], kind, name, flush=True)
            if count[0] == target:
                time.sleep(120)  # the parent kills the process here

    def rename(src, dst, *args, **kwargs):
        with lock:
            event("rename", os.path.basename(src) + ">" + os.path.basename(dst))
            real_rename(src, dst, *args, **kwargs)
            event("renamed", os.path.basename(dst))

    def rmtree(path, *args, **kwargs):
        with lock:
            event("rmtree", os.path.basename(path))
            real_rmtree(path, *args, **kwargs)
            event("removed", os.path.basename(path))

    os.rename, shutil.rmtree = rename, rmtree

    import jax
    import jtinker as tinker

    service = tinker.ServiceClient(store_dir=store)
    tc = service.create_lora_training_client(model_dir, rank=2, seed=0)
    rng = np.random.default_rng(0)
    data = []
    for n in (11, 7):
        seq = rng.integers(0, 256, n + 1)
        inputs = {"target_tokens": seq[1:], "weights": np.ones(n, np.float32)}
        model_input = tinker.ModelInput.from_ints(seq[:-1].tolist())
        data.append(tinker.Datum(model_input=model_input, loss_fn_inputs=inputs))

    def step():
        tc.forward_backward(data, "cross_entropy").result()
        tc.optim_step(tinker.AdamParams(learning_rate=1e-2)).result()
        leaves = [np.asarray(x) for x in jax.tree.leaves(tc._adapter.lora)]
        np.savez(os.path.join(out, f"w{tc._adapter.step}.npz"), *leaves)

    step()
    tc.save_state("a").result()
    print("READY", tc.model_id, flush=True)
    armed.append(True)
    for cycle in range(cycles):
        step()
        tc.save_state("a", overwrite=True).result()
        tc.save_state("b", overwrite=True).result()
        print("SAVED", tc._adapter.step, flush=True)
    print("DONE", count[0], flush=True)
    """
)


def run_child(script: Path, model_dir, store: Path, out: Path, mode: str, target=-1, cycles=2):
    out.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "JAX_COMPILATION_CACHE_DIR": str(script.parent / "jax-cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }
    args = [sys.executable, str(script), str(model_dir), str(store), str(out), mode, str(target), str(cycles)]
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, text=True)


def check_crash_state(store: Path, out: Path, run_id: str, label: str) -> int:
    """The invariants after a crash; returns the step checkpoint "a" holds."""
    service = tinker.ServiceClient(store_dir=str(store))
    listed = {c["checkpoint_id"]: c for c in service.store.list_checkpoints()}
    assert set(listed) <= {"weights/a", "weights/b"}, (label, sorted(listed))
    assert "weights/a" in listed, (label, sorted(p.name for p in (store / run_id / "weights").iterdir()))
    for checkpoint in listed.values():
        tc = service.create_training_client_from_state_with_optimizer(checkpoint["tinker_path"])
        step = tc._adapter.step
        assert step == checkpoint["meta"]["step"] >= 1, label
        with np.load(out / f"w{step}.npz") as saved:
            want = [saved[f"arr_{i}"] for i in range(len(saved.files))]
        assert_same(state(tc), want)  # the weights of exactly that step, not a mixture
    # whatever else lies on disk (staging, temporary, half-deleted copies) is not a loadable name
    for entry in (store / run_id / "weights").iterdir():
        if f"weights/{entry.name}" not in listed:
            with pytest.raises((ValueError, FileNotFoundError)):
                service.store.read_meta(f"tinker://{run_id}/weights/{entry.name}")
    return listed["weights/a"]["meta"]["step"]


def resave(store: Path, run_id: str) -> int:
    """Loads "a" and saves it again as "a" and "b" (overwriting); returns its step."""
    service = tinker.ServiceClient(store_dir=str(store))
    tc = service.create_training_client_from_state_with_optimizer(f"tinker://{run_id}/weights/a")
    for name in ("a", "b"):
        path = CheckpointPath(run_id, "weights", name)
        saving = tc._submit(
            lambda p=path: tc._adapter.save(service.store, p, with_optimizer=True, overwrite=True)
        )
        saving.result().result()
    return tc._adapter.step


@pytest.fixture(scope="module")
def child_script(tmp_path_factory):
    script = tmp_path_factory.mktemp("child") / "child.py"
    script.write_text(CHILD)
    return script


def test_every_crash_point_of_an_overwrite_leaves_a_loadable_checkpoint(child_script, qwen3_dir, tmp_path):
    """A crash at any rename or rmtree of overwriting "a" and saving "b" (copied as it lies on disk)."""
    store, out = tmp_path / "store", tmp_path / "out"
    child = run_child(child_script, qwen3_dir, store, out, "snapshot", cycles=2)
    try:
        stdout, _ = child.communicate(timeout=180)
    finally:
        child.kill()  # (a no-op once it has exited)
    assert child.returncode == 0, stdout
    run_id = stdout.split("READY ")[1].split()[0]
    snapshots = sorted((out / "snapshots").iterdir())
    assert len(snapshots) >= 16, stdout  # both saves of both cycles went through several renames
    seen, steps = set(), set()
    for snap in snapshots:
        layout = frozenset((str(f.relative_to(snap)), f.stat().st_size) for f in snap.rglob("*"))
        if layout not in seen:  # the state after one event is often the state before the next
            seen.add(layout)
            steps.add(check_crash_state(snap, out, run_id, snap.name))
    assert steps == {1, 2, 3}  # the crash states cover the old, the new and the next checkpoint


def test_sigkill_during_saves_leaves_a_loadable_checkpoint(child_script, qwen3_dir, tmp_path):
    """Real SIGKILLs from the parent: at chosen save events, and after a few delays."""
    # events 10 and 22 are, for this store, "a" renamed away and "b"'s first staging complete
    kills = [("event", 10), ("event", 22), ("delay", 0.05), ("delay", 0.3)]
    children = []
    for i, (how, when) in enumerate(kills):
        store, out = tmp_path / f"store{i}", tmp_path / f"out{i}"
        target = when if how == "event" else -1
        children.append(
            (how, when, store, out, run_child(child_script, qwen3_dir, store, out, "kill", target, 50))
        )

    def kill_at(how, when, child, found):
        for line in child.stdout:
            if line.startswith("READY"):
                found["run_id"] = line.split()[1]
                if how == "delay":
                    time.sleep(when)
                    break
            elif how == "event" and line.startswith(f"EVENT {when} "):
                found["event"] = line.strip()
                break
        os.kill(child.pid, signal.SIGKILL)

    found = [{} for _ in children]
    threads = [
        threading.Thread(target=kill_at, args=(how, when, child, f))
        for (how, when, _, _, child), f in zip(children, found, strict=True)
    ]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=180)
    finally:
        for *_, child in children:
            child.kill()  # only the children of this test, whatever happened above
            child.wait(timeout=30)
            child.stdout.close()
    for (how, when, store, out, child), f in zip(children, found, strict=True):
        assert child.returncode == -signal.SIGKILL, (how, when)
        assert "run_id" in f and (how == "delay" or "event" in f), (how, when, f)
        check_crash_state(store, out, f["run_id"], f"{how}={when} {f.get('event')}")

        # the store stays usable: the same names can be saved again over whatever was left
        step = resave(store, f["run_id"])
        assert check_crash_state(store, out, f["run_id"], "resaved") == step
