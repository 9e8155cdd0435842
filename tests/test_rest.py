"""The in-process ``RestClient``: runs and checkpoints of the local store as the SDK reports them, user
metadata kept with each checkpoint, TTLs, deletion, and the tinker-cookbook helpers that use them."""

from __future__ import annotations

import time

import pytest

import jtinker as tinker
from jtinker import types
from jtinker.checkpoints import CheckpointPath

RANK = 4


def test_runs_and_checkpoints_as_the_sdk_reports_them(service, qwen3_dir):
    tc = service.create_lora_training_client(
        str(qwen3_dir), rank=RANK, user_metadata={"renderer_name": "qwen3"}
    ).result()
    rest = service.create_rest_client()
    run = rest.get_training_run(tc.model_id).result()  # listed before its first checkpoint
    assert (run.base_model, run.lora_rank, run.is_lora) == (str(qwen3_dir), RANK, True)
    assert run.user_metadata == {"renderer_name": "qwen3"} and run.last_checkpoint is None

    state = tc.save_state("s1", user_metadata={"step": "1"}).result().path
    sampler = tc.save_weights_for_sampler("w1").result().path
    run = rest.get_training_run_by_tinker_path(sampler).result()
    assert run.last_checkpoint.tinker_path == state
    assert run.last_sampler_checkpoint.tinker_path == sampler
    assert run.last_checkpoint.user_metadata == {"step": "1"}
    assert run.last_checkpoint.size_bytes > 0 and run.last_checkpoint.expires_at is None

    listed = rest.list_checkpoints(tc.model_id).result().checkpoints
    assert sorted(c.checkpoint_id for c in listed) == ["sampler_weights/w1", "weights/s1"]
    info = rest.get_weights_info_by_tinker_path(state).result()
    assert (info.base_model, info.is_lora, info.lora_rank, info.train_mlp) == (
        str(qwen3_dir),
        True,
        RANK,
        True,
    )

    # A new process (a RestClient on the same store) finds the run through its checkpoints.
    fresh = tinker.RestClient()  # the default store, $JTINKER_HOME/runs
    again = fresh.get_training_run(tc.model_id).result()
    assert again.user_metadata == {"renderer_name": "qwen3"} and again.lora_rank == RANK
    page = fresh.list_training_runs(limit=5).result()
    assert [r.training_run_id for r in page.training_runs] == [tc.model_id]
    assert page.cursor.total_count == 1
    assert fresh.list_user_checkpoints(limit=1, offset=1).result().cursor.total_count == 2


def test_a_run_without_checkpoints_is_listed_while_its_client_lives(service, qwen3_dir):
    import gc

    rest = service.create_rest_client()
    tc = service.create_lora_training_client(str(qwen3_dir), rank=RANK)
    run_id = tc.model_id
    assert [r.training_run_id for r in rest.list_training_runs().result().training_runs] == [run_id]
    del tc
    gc.collect()
    with pytest.raises(tinker.NotFoundError, match="training_run_id"):
        rest.get_training_run(run_id).result()
    assert rest.list_training_runs().result().training_runs == []


def test_full_fine_tune_runs_report_no_rank(service, qwen3_dir):
    tc = service.create_full_training_client(str(qwen3_dir))
    path = tc.save_weights_for_sampler("ft").result().path
    rest = service.create_rest_client()
    assert rest.get_weights_info_by_tinker_path(path).result().is_lora is False
    run = rest.get_training_run(tc.model_id).result()
    assert run.is_lora is False and run.lora_rank is None


def test_delete_and_ttl(service, qwen3_dir):
    tc = service.create_lora_training_client(str(qwen3_dir), rank=RANK)
    rest = service.create_rest_client()
    kept = tc.save_state("kept", ttl_seconds=3600).result().path
    doomed = tc.save_state("doomed").result().path
    by_path = {c.tinker_path: c for c in rest.list_checkpoints(tc.model_id).result().checkpoints}
    assert by_path[kept].expires_at.timestamp() == pytest.approx(time.time() + 3600, abs=60)
    assert by_path[doomed].expires_at is None

    rest.delete_checkpoint(tc.model_id, "weights/doomed").result()
    with pytest.raises(tinker.NotFoundError, match="tinker_path: checkpoint .*doomed not found"):
        rest.delete_checkpoint_from_tinker_path(doomed).result()
    with pytest.raises(tinker.NotFoundError):
        service.create_training_client_from_state(doomed)

    rest.set_checkpoint_ttl_from_tinker_path(kept, None).result()  # never expires
    assert rest.list_checkpoints(tc.model_id).result().checkpoints[0].expires_at is None
    rest.set_checkpoint_ttl_from_tinker_path(kept, 1).result()
    time.sleep(1.2)
    assert rest.list_user_checkpoints().result().checkpoints == []  # expired: gone from listings ...
    with pytest.raises(tinker.NotFoundError):  # ... and from loads
        tc.load_state(kept).result()
    assert not service.store.directory(CheckpointPath.parse(kept)).exists()


def test_bad_requests_name_the_field(service, qwen3_dir):
    tc = service.create_lora_training_client(str(qwen3_dir), rank=RANK)
    rest = service.create_rest_client()
    path = tc.save_weights_for_sampler("w").result().path
    cases = [
        (lambda: rest.get_training_run("no-such-run").result(), tinker.NotFoundError, "training_run_id"),
        (lambda: rest.get_training_run_by_tinker_path("s3://x").result(), ValueError, "tinker_path"),
        (lambda: rest.list_training_runs(limit=0).result(), ValueError, "limit"),
        (lambda: rest.list_user_checkpoints(offset=-1).result(), ValueError, "offset"),
        (lambda: rest.set_checkpoint_ttl_from_tinker_path(path, 0).result(), ValueError, "ttl_seconds"),
        (lambda: tc.save_state("t", ttl_seconds=-5), ValueError, "ttl_seconds"),
        (lambda: tc.save_state("t", user_metadata={"a": 1}), ValueError, "user_metadata"),
        (
            lambda: service.create_lora_training_client(str(qwen3_dir), user_metadata=["x"]),
            ValueError,
            "user_metadata",
        ),
    ]
    for call, error, field in cases:
        with pytest.raises(error, match=field):
            call()
    assert [c.tinker_path for c in rest.list_user_checkpoints().result().checkpoints] == [path]


def test_async_forms(service, qwen3_dir):
    import asyncio

    tc = service.create_lora_training_client(str(qwen3_dir), rank=RANK)
    path = tc.save_weights_for_sampler("a").result().path
    rest = service.create_rest_client()

    async def main():
        run = await rest.get_training_run_by_tinker_path(path)  # APIFutures are awaitable
        listed = await rest.list_checkpoints_async(run.training_run_id)
        await rest.delete_checkpoint_from_tinker_path_async(path)
        return run, listed, await rest.list_user_checkpoints()

    run, listed, after = asyncio.run(main())
    assert run.training_run_id == tc.model_id
    assert [c.tinker_path for c in listed.checkpoints] == [path] and after.checkpoints == []


def test_cookbook_checkpoint_helpers_run_in_process(service, qwen3_dir):
    """tinker-cookbook reads a checkpoint's renderer from its run's metadata and deletes rolling
    checkpoints through ``service_client.create_rest_client()``."""
    checkpoint_utils = pytest.importorskip("tinker_cookbook.checkpoint_utils")
    tc = service.create_lora_training_client(
        str(qwen3_dir), rank=RANK, user_metadata={"renderer_name": "qwen3"}
    )
    path = tc.save_state("000010").result().path
    assert checkpoint_utils.get_renderer_name_from_checkpoint(service, path) == "qwen3"
    rest = service.create_rest_client()
    assert isinstance(rest.get_server_capabilities().result(), types.GetServerCapabilitiesResponse)
