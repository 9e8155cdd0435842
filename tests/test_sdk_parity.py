"""``import jtinker as tinker`` against the installed SDK (0.38): every public method of its four
clients exists in process with the SDK's parameters in the SDK's order, except the hosted service's
account features listed below; and the 0.38 calling conventions (client futures, awaitable results)
work."""

from __future__ import annotations

import asyncio
import inspect

import numpy as np
import pytest

import jtinker

sdk = pytest.importorskip("tinker")

# What has no meaning without the hosted service, by client. Anything else the SDK adds must be
# provided in process (or added here with a reason).
NOT_IN_PROCESS = {
    "ServiceClient": {
        "holder",  # the SDK's HTTP connection holder
        "get_telemetry", "get_console_url",  # hosted telemetry and web console
        "copy_weights",  # copies between hosted projects
    },
    "TrainingClient": {"get_telemetry", "get_console_url"},
    "SamplingClient": {
        "get_telemetry",
        "create", "from_sampler_handle", "get_sampler_handle",  # hosted sampler sessions by handle
        "on_queue_state_change",  # the hosted request queue
    },
    "RestClient": {
        "get_telemetry", "whoami", "get_sampler", "get_sampler_async",
        "get_session", "get_session_async", "list_sessions", "list_sessions_async", "search_sessions",
        "assign_session_project", "assign_session_project_async",
        "export_session_trace", "export_session_trace_async",
        "get_audit_log", "get_audit_log_async", "get_billing_usage", "get_billing_usage_async",
        "get_current_checkpoint_storage_usage", "get_current_checkpoint_storage_usage_async",
        "copy_weights", "copy_weights_async",
        "publish_checkpoint_from_tinker_path", "publish_checkpoint_from_tinker_path_async",
        "unpublish_checkpoint_from_tinker_path", "unpublish_checkpoint_from_tinker_path_async",
    },
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(NOT_IN_PROCESS))
def test_every_sdk_method_and_parameter_exists_in_process(name):
    theirs, ours = getattr(sdk, name), getattr(jtinker, name)
    problems = []
    for method in sorted(m for m in dir(theirs) if not m.startswith("_")):
        if method in NOT_IN_PROCESS[name]:
            assert not hasattr(ours, method), f"{name}.{method} is provided now: drop it from the list"
            continue
        if not hasattr(ours, method):
            problems.append(f"{method}: missing")
            continue
        their_fn, our_fn = getattr(theirs, method), getattr(ours, method)
        if not callable(their_fn):
            continue
        expected, got = inspect.signature(their_fn).parameters, inspect.signature(our_fn).parameters
        positional = [p for p, v in got.items() if v.kind is v.POSITIONAL_OR_KEYWORD]
        for i, (param, spec) in enumerate(expected.items()):
            if spec.kind is spec.POSITIONAL_OR_KEYWORD and (i >= len(positional) or positional[i] != param):
                problems.append(
                    f"{method}: parameter {i} is {param!r} in the SDK, {positional[i : i + 1]} here"
                )
            elif param not in got and not any(v.kind is v.VAR_KEYWORD for v in got.values()):
                problems.append(f"{method}: no parameter {param!r}")
    assert not problems, f"{name}: " + "; ".join(problems)


# Top-level SDK names with no meaning in process, each with its reason.
NOT_AT_TOP_LEVEL = {
    "auth", "lib", "proto", "resources",  # the SDK's own modules
    "APIResponse", "AsyncAPIResponse", "RequestOptions", "Timeout",  # raw HTTP responses and settings
    "SampleRequest", "OptimStepRequest",  # HTTP request bodies (clients take their arguments)
    "AdminClient",  # hosted account administration
    "DmelChunk",  # audio tokens for the hosted audio models
}  # fmt: skip


def test_every_top_level_sdk_name_exists_in_process():
    """``import jtinker as tinker``: the SDK's types, exceptions and warning classes are there by the
    same names, so ``tinker.StopReason`` or ``except tinker.RateLimitError`` work in process."""
    theirs = {name for name in dir(sdk) if not name.startswith("_")}
    missing = sorted(theirs - NOT_AT_TOP_LEVEL - set(dir(jtinker)))
    assert not missing, f"jtinker lacks the SDK's top-level {missing}"
    stale = sorted(name for name in NOT_AT_TOP_LEVEL if hasattr(jtinker, name))
    assert not stale, f"{stale} are provided now: drop them from NOT_AT_TOP_LEVEL"
    assert set(jtinker.__all__) <= set(dir(jtinker))


def test_exceptions_have_the_sdk_hierarchy_and_status_codes():
    """Each SDK exception's bases (by name) and HTTP status are ours too; NotFoundError is still a
    FileNotFoundError for code that catches the built-in."""
    for name in dir(sdk):
        theirs = getattr(sdk, name)
        if not (isinstance(theirs, type) and issubclass(theirs, (sdk.TinkerError, Warning))):
            continue
        ours = getattr(jtinker, name)
        their_bases = {c.__name__ for c in theirs.__mro__ if c.__module__.startswith("tinker")}
        our_bases = {c.__name__ for c in ours.__mro__}
        assert their_bases <= our_bases, f"{name}: lacks {sorted(their_bases - our_bases)}"
        assert getattr(ours, "status_code", None) == getattr(theirs, "status_code", None), name
    assert issubclass(jtinker.ExperimentalWarning, FutureWarning)
    error = jtinker.NotFoundError("training_run_id: no training run 'x'")
    assert isinstance(error, FileNotFoundError) and error.status_code == 404 and "'x'" in error.message
    failed = jtinker.RequestFailedError("bad datum", "req-1", "user")
    assert (failed.message, failed.request_id, failed.category) == ("bad datum", "req-1", "user")


def test_sdk_0_38_calling_conventions(qwen3_dir, tmp_path, monkeypatch):
    """0.38 returns futures of clients (``.result()`` or ``await`` gives the client) and awaitable
    ``APIFuture`` results; unsupported options fail with the field's name."""
    monkeypatch.setenv("JTINKER_HOME", str(tmp_path / "home"))
    from jtinker import types

    service = jtinker.ServiceClient(store_dir=str(tmp_path / "store"))
    training = service.create_lora_training_client(
        str(qwen3_dir), rank=4, optimizer=types.AdamOptimizerConfig()
    ).result()
    sampling = training.save_weights_and_get_sampling_client().result()
    prompt = types.ModelInput.from_ints([5, 9, 11, 3, 7, 2])
    params = types.SamplingParams(max_tokens=2, temperature=0.0)

    async def main():
        same = await training  # the client is its own finished future
        sampled = await sampling.sample(prompt, 1, params, include_prompt_logprobs=True)
        last_two = await sampling.compute_logprobs(prompt, prompt_logprobs_last_n=2)
        return same, sampled, last_two

    same, sampled, last_two = asyncio.run(main())
    assert same is training and len(sampled.sequences[0].tokens) == 2
    full = sampled.prompt_logprobs
    assert full[0] is None and all(v is not None for v in full[1:])
    assert last_two[:-2] == [None] * 4 and np.allclose(last_two[-2:], full[-2:], atol=1e-5)

    refused = [
        (lambda: sampling.sample(prompt, 1, params, prompt_alt_tokens_k=-2).result(), "prompt_alt_tokens_k"),
        (lambda: sampling.sample(prompt, 1, params, prompt_logprobs_last_n=2), "prompt_logprobs_last_n"),
        (lambda: sampling.compute_logprobs(prompt, prompt_logprobs_last_n=6), "prompt_logprobs_last_n"),
        (lambda: training.save_weights_and_get_sampling_client(kind="live"), "kind"),
        (lambda: service.create_sampling_client(base_model=str(qwen3_dir), record_stability_info=True),
         "record_stability_info"),
        (lambda: service.create_lora_training_client(str(qwen3_dir), optimizer=types.DimuonOptimizerConfig()),
         "optimizer"),
        (lambda: service.close("done"), "status"),
    ]  # fmt: skip
    for call, field in refused:
        with pytest.raises(ValueError, match=field):
            call()
    assert service.close("success", detail="finished").result() is None
