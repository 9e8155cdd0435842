"""jtinker.types: construction as the SDK docs show, round trips, and compatibility with tinker 0.38."""

from __future__ import annotations

import dataclasses
import inspect
import json
import subprocess
import sys
import typing
from datetime import UTC, datetime

import numpy as np
import pytest

from jtinker import types as jt

# --------------------------------------------------------------------------------------------------------
# Representative instances, shared by the round-trip and SDK-conversion tests
# --------------------------------------------------------------------------------------------------------

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def _checkpoint() -> jt.Checkpoint:
    return jt.Checkpoint(
        checkpoint_id="weights/000010",
        checkpoint_type="training",
        time=NOW,
        tinker_path="tinker://run-1/weights/000010",
        size_bytes=123,
        user_metadata={"renderer": "qwen3"},
    )


def _sampled_sequence() -> jt.SampledSequence:
    return jt.SampledSequence(
        stop_reason="stop",
        sequence_id="sess:sample:0:0",
        tokens_np=np.array([5, 6, 7], dtype=np.int32),
        logprobs_np=np.array([-0.5, -1.0, -0.25], dtype=np.float32),
    )


def _instances() -> dict[str, jt._Model]:
    """One instance per mirrored class, built the way SDK users build them."""
    text = jt.ModelInput.from_ints([1, 2, 3, 4])
    tensor = jt.TensorData.from_numpy(np.arange(6, dtype=np.float32).reshape(2, 3))
    return {
        "TensorData": tensor,
        "EncodedTextChunk": jt.EncodedTextChunk(tokens=[9, 8]),
        "ImageChunk": jt.ImageChunk(data=b"\x89PNG", format="png", expected_tokens=4),
        "ImageAssetPointerChunk": jt.ImageAssetPointerChunk(format="jpeg", location="s3://x.jpg"),
        "ModelInput": text.append(jt.EncodedTextChunk(tokens=[5])),
        "PromptProvenanceSpan": jt.PromptProvenanceSpan(sequence_id="s", length=2),
        "SampledProvenanceSpan": jt.SampledProvenanceSpan(sequence_id="s", offset=1, length=2),
        "Datum": jt.Datum(
            model_input=text,
            loss_fn_inputs={"target_tokens": [2, 3, 4, 5], "weights": [0.0, 1.0, 1.0, 1.0]},
        ),
        "AdamParams": jt.AdamParams(learning_rate=2e-4, weight_decay=0.01, grad_clip_norm=1.0),
        "AdamOptimizerConfig": jt.AdamOptimizerConfig(),
        "DimuonOptimizerConfig": jt.DimuonOptimizerConfig(),
        "DimuonParams": jt.DimuonParams(learning_rate=0.02),
        "SamplingParams": jt.SamplingParams(max_tokens=16, temperature=0.7, stop=["\n\n"], seed=3),
        "TopkLogprobs": jt.TopkLogprobs(
            token_ids=np.array([[5, 0]], dtype=np.int32),
            logprobs=np.array([[-0.1, -99999.0]], dtype=np.float32),
        ),
        "PromptAltTokens": jt.PromptAltTokens(
            tokens=jt.TensorData.from_numpy(np.array([[1, 2]])),
            logprobs=jt.TensorData.from_numpy(np.array([[-0.1, -0.2]], dtype=np.float32)),
        ),
        "SampledSequence": _sampled_sequence(),
        "SampleResponse": jt.SampleResponse(
            sequences=[_sampled_sequence()],
            prompt_logprobs_np=np.array([np.nan, -1.5, -0.5], dtype=np.float32),
            prompt_cache_hit_tokens=2,
        ),
        "ForwardBackwardOutput": jt.ForwardBackwardOutput(
            loss_fn_output_type="ArrayRecord",
            loss_fn_outputs=[{"logprobs": jt.TensorData.from_numpy(np.array([-0.5, -1.5], np.float32))}],
            metrics={"loss:sum": 2.0},
        ),
        "OptimStepResponse": jt.OptimStepResponse(metrics={"grad_norm:mean": 0.5}),
        "SaveWeightsResponse": jt.SaveWeightsResponse(path="tinker://run-1/weights/final"),
        "SaveWeightsForSamplerResponse": jt.SaveWeightsForSamplerResponse(
            path="tinker://run-1/sampler_weights/final"
        ),
        "SaveWeightsForSamplerResponseInternal": jt.SaveWeightsForSamplerResponseInternal(
            sampling_session_id="sess:sample:1"
        ),
        "SaveWeightsExternalResponse": jt.SaveWeightsExternalResponse(
            path="tinker://run-1/external_weights/final"
        ),
        "LoadWeightsResponse": jt.LoadWeightsResponse(path="tinker://run-1/weights/final", model_id="run-1"),
        "ModelData": jt.ModelData(arch="qwen3", model_name="Qwen/Qwen3-0.6B"),
        "GetInfoResponse": jt.GetInfoResponse(
            model_data=jt.ModelData(tokenizer_id="Qwen/Qwen3-0.6B"),
            model_id="run-1",
            is_lora=True,
            lora_rank=8,
        ),
        "LoraConfig": jt.LoraConfig(rank=16, seed=0, train_unembed=False),
        "SupportedModel": jt.SupportedModel(model_name="Qwen/Qwen3-0.6B", max_context_length=4096),
        "GetServerCapabilitiesResponse": jt.GetServerCapabilitiesResponse(
            supported_models=[jt.SupportedModel(model_name="m", trainable=True)]
        ),
        "GetSamplerResponse": jt.GetSamplerResponse(sampler_id="sess:sample:0", base_model="m"),
        "WeightsInfoResponse": jt.WeightsInfoResponse(base_model="m", is_lora=True, lora_rank=8),
        "ExternalWeightsUrlsResponse": jt.ExternalWeightsUrlsResponse(
            urls={"adapter_config.json": "https://host/a?signature=0"}, expires=NOW
        ),
        "Checkpoint": _checkpoint(),
        "ParsedCheckpointTinkerPath": jt.ParsedCheckpointTinkerPath.from_tinker_path(
            "tinker://run-1/sampler_weights/000020"
        ),
        "Cursor": jt.Cursor(offset=0, limit=20, total_count=1),
        "CheckpointsListResponse": jt.CheckpointsListResponse(checkpoints=[_checkpoint()]),
        "TrainingRun": jt.TrainingRun(
            training_run_id="run-1",
            base_model="m",
            model_owner="me",
            is_lora=True,
            lora_rank=8,
            last_request_time=NOW,
            last_checkpoint=_checkpoint(),
        ),
        "TrainingRunsResponse": jt.TrainingRunsResponse(
            training_runs=[], cursor=jt.Cursor(offset=0, limit=20, total_count=0)
        ),
    }


MODEL_CLASSES = [
    getattr(jt, n)
    for n in jt.__all__
    if isinstance(getattr(jt, n), type) and issubclass(getattr(jt, n), jt._Model)
]


def test_every_class_has_an_instance():
    assert sorted(_instances()) == sorted(c.__name__ for c in MODEL_CLASSES)


def test_library_imports_neither_sdk_nor_pydantic_nor_torch():
    code = (
        "import sys, jtinker.types\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('tinker', 'pydantic', 'torch'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_all_names_exist():
    assert len(set(jt.__all__)) == len(jt.__all__)
    for name in jt.__all__:
        assert hasattr(jt, name), name


# --------------------------------------------------------------------------------------------------------
# TensorData
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("array", "dtype", "np_dtype"),
    [
        (np.arange(6, dtype=np.int32).reshape(2, 3), "int64", np.int64),
        (np.arange(4, dtype=np.int64), "int64", np.int64),
        (np.linspace(0, 1, 6).reshape(3, 2), "float32", np.float32),
        (np.ones(3, dtype=np.float16), "float32", np.float32),
    ],
)
def test_tensor_data_numpy_round_trip(array, dtype, np_dtype):
    td = jt.TensorData.from_numpy(array)
    assert td.dtype == dtype
    assert td.shape == list(array.shape)
    out = td.to_numpy()
    assert out.dtype == np_dtype and out.shape == array.shape
    np.testing.assert_allclose(out, array.astype(np_dtype))
    assert td.data == array.astype(np_dtype).reshape(-1).tolist()
    assert td.tolist() == array.astype(np_dtype).tolist()


def test_tensor_data_from_lists_and_errors():
    td = jt.TensorData(data=[1, 2, 3, 4], dtype="int64", shape=[2, 2])
    assert td.to_numpy().tolist() == [[1, 2], [3, 4]]
    assert jt.TensorData(data=[1.5], dtype="float32").shape is None
    with pytest.raises(TypeError, match="dtype"):
        jt.TensorData(data=[1])
    with pytest.raises(ValueError, match="Unsupported"):
        jt.TensorData.from_numpy(np.array([1, 2], dtype=np.uint8))
    with pytest.raises(ValueError, match="Unsupported"):
        jt.TensorData(data=[1], dtype="bfloat16")  # type: ignore[arg-type]


def test_tensor_data_sparse_csr_densifies():
    # [[7, -1, -1], [-1, -1, 8]] with pad -1
    td = jt.TensorData(
        data=[7, 8], dtype="int64", shape=[2, 3], sparse_crow_indices=[0, 1, 2], sparse_col_indices=[0, 2]
    )
    assert td.to_numpy(pad_value=-1).tolist() == [[7, -1, -1], [-1, -1, 8]]
    assert td.tolist() == [[7, 0, 0], [0, 0, 8]]
    with pytest.raises(TypeError, match="integer"):
        td.to_numpy(pad_value=0.5)  # type: ignore[arg-type]


def test_tensor_data_torch_round_trip_and_sparse():
    torch = pytest.importorskip("torch")
    t = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.bfloat16, requires_grad=True)
    td = jt.TensorData.from_torch(t)
    assert td.dtype == "float32" and td.to_torch().dtype == torch.float32
    assert td.to_torch().tolist() == [[1.0, 2.0], [3.0, 4.0]]

    ids = torch.full((4, 8), -1, dtype=torch.int64)
    ids[0, 1], ids[3, 7] = 5, 9
    sparse = jt.TensorData.from_torch_sparse(ids, pad_value=-1)
    assert sparse.sparse_crow_indices is not None and len(sparse.data) == 2
    assert torch.equal(sparse.to_torch(pad_value=-1), ids)
    dense = jt.TensorData.from_torch_sparse(torch.ones(2, 2, dtype=torch.int64))  # CSR would not save space
    assert dense.sparse_crow_indices is None


def test_sparse_matches_sdk_encoding():
    torch = pytest.importorskip("torch")
    sdk_types = pytest.importorskip("tinker.types")
    ids = torch.zeros((5, 6), dtype=torch.int64)
    ids[1, 2], ids[4, 0] = 3, 4
    ours, theirs = jt.TensorData.from_torch_sparse(ids), sdk_types.TensorData.from_torch_sparse(ids)
    assert ours.data == theirs.data
    assert ours.sparse_crow_indices == theirs.sparse_crow_indices
    assert ours.sparse_col_indices == theirs.sparse_col_indices


# --------------------------------------------------------------------------------------------------------
# Model input
# --------------------------------------------------------------------------------------------------------


def test_model_input_ints_round_trip_and_lengths():
    mi = jt.ModelInput.from_ints([1, 2, 3])
    assert mi.to_ints() == [1, 2, 3] and mi.length == 3
    assert mi.chunks[0].length == 3 and mi.chunks[0].type == "encoded_text"

    longer = mi.append_int(4).append(jt.EncodedTextChunk(tokens=np.array([5, 6])))
    assert longer.to_ints() == [1, 2, 3, 4, 5, 6] and longer.length == 6
    assert mi.to_ints() == [1, 2, 3]  # append returns a new object
    assert jt.ModelInput.empty().length == 0 and jt.ModelInput.empty().to_ints() == []

    tokens = [7, 8]
    chunk = jt.EncodedTextChunk(tokens=tokens)
    tokens.append(9)  # the chunk owns its own list, as a validated pydantic model would
    assert chunk.tokens == [7, 8]
    with pytest.raises(dataclasses.FrozenInstanceError):
        mi.chunks = []  # type: ignore[misc]


def test_image_chunks_are_typed_but_not_tokens():
    img = jt.ImageChunk(data="iVBORw==", format="png")  # base64 text is decoded like the SDK does
    assert img.data == b"\x89PNG"
    with pytest.raises(ValueError, match="expected_tokens"):
        _ = img.length
    mi = jt.ModelInput(
        chunks=[jt.EncodedTextChunk(tokens=[1]), jt.ImageChunk(data=b"x", format="png", expected_tokens=3)]
    )
    assert mi.length == 4
    with pytest.raises(ValueError, match="EncodedTextChunks"):
        mi.to_ints()


# --------------------------------------------------------------------------------------------------------
# Datum
# --------------------------------------------------------------------------------------------------------


def test_datum_list_dtype_inference_per_key():
    d = jt.Datum(
        model_input=jt.ModelInput.from_ints([1, 2, 3]),
        loss_fn_inputs={
            "target_tokens": [2, 3, 4],
            "weights": [0, 1, 1],
            "advantages": [1, 1, 1],
            "logprobs": [-1, -2, -3],
            "clip_low_threshold": [0.8] * 3,
            "clip_high_threshold": [1.2] * 3,
            "sequence_ratio_mask": [1, 1, 0],
        },
    )
    dtypes = {k: v.dtype for k, v in d.loss_fn_inputs.items()}
    assert dtypes.pop("target_tokens") == "int64"
    assert set(dtypes.values()) == {"float32"}
    assert d.loss_fn_inputs["weights"].to_numpy().dtype == np.float32
    assert d.loss_fn_inputs["target_tokens"].data == [2, 3, 4]


def test_datum_matches_sdk_key_table():
    sdk_datum = pytest.importorskip("tinker.types.datum")
    assert sdk_datum._KEY_TO_TYPE == jt._KEY_TO_TYPE


def test_datum_numpy_torch_and_errors():
    torch = pytest.importorskip("torch")
    mi = jt.ModelInput.from_ints([1, 2, 3])
    d = jt.Datum(
        mi,
        {
            "target_tokens": np.array([2, 3, 4], dtype=np.int32),
            "weights": torch.tensor([0.0, 1.0, 1.0]),
            "logprobs": jt.TensorData(data=[0.0] * 3, dtype="float32", shape=[3]),
        },
    )
    assert d.loss_fn_inputs["target_tokens"].dtype == "int64"
    assert d.loss_fn_inputs["weights"].to_numpy().tolist() == [0.0, 1.0, 1.0]

    multi = torch.zeros((3, 16), dtype=torch.int64)
    multi[:, 0] = torch.tensor([2, 3, 4])
    sparse = jt.Datum(mi, {"target_tokens": multi}).loss_fn_inputs["target_tokens"]
    assert sparse.sparse_crow_indices is not None and np.array_equal(sparse.to_numpy(), multi.numpy())

    with pytest.raises(KeyError, match="custom"):
        jt.Datum(mi, {"custom": [1.0, 2.0, 3.0]})
    jt.Datum(mi, {"custom": np.array([1.0, 2.0, 3.0])})  # arrays carry their dtype, any key is fine
    with pytest.raises(ValueError, match="ragged"):
        jt.Datum(mi, {"weights": [[1.0], [1.0, 2.0]]})
    with pytest.raises(TypeError, match="Unsupported"):
        jt.Datum(mi, {"weights": "nope"})


def test_datum_with_provenance():
    d = jt.Datum(jt.ModelInput.from_ints([1, 2, 3]), {"target_tokens": [2, 3, 4], "weights": [0, 1, 1]})
    spans_in = [
        jt.PromptProvenanceSpan(sequence_id="a", length=1),
        jt.SampledProvenanceSpan(sequence_id="a", length=2),
    ]
    with_p = d.with_provenance(model_input=spans_in, loss_fn_inputs=spans_in)
    assert with_p.model_input_spans == spans_in and d.model_input_spans is None
    with pytest.raises(ValueError, match="tile"):
        d.with_provenance(model_input=spans_in[:1], loss_fn_inputs=spans_in)
    with pytest.raises(ValueError, match="pair"):
        jt.Datum(d.model_input, model_input_spans=spans_in)
    with pytest.raises(ValueError, match="length"):
        jt.PromptProvenanceSpan(sequence_id="a", length=-1)


# --------------------------------------------------------------------------------------------------------
# Parameters and responses
# --------------------------------------------------------------------------------------------------------


def test_param_defaults():
    adam = jt.AdamParams()
    assert (adam.learning_rate, adam.beta1, adam.beta2, adam.eps) == (1e-4, 0.9, 0.95, 1e-12)
    assert (adam.weight_decay, adam.grad_clip_norm) == (0.0, 0.0)
    sp = jt.SamplingParams()
    assert (sp.max_tokens, sp.seed, sp.stop, sp.temperature, sp.top_k, sp.top_p) == (
        None,
        None,
        None,
        1,
        -1,
        1,
    )
    assert jt.SamplingParams(max_tokens=5).model_copy(update={"temperature": 0.0}).temperature == 0.0
    with pytest.raises(TypeError):
        jt.AdamParams(0.1)  # type: ignore[misc]  # keyword-only, like pydantic
    with pytest.raises(ValueError):
        jt.DimuonParams(learning_rate=0.1, beta1=1.0)


def test_sampled_sequence_views():
    seq = _sampled_sequence()
    assert seq.tokens == [5, 6, 7] and seq.logprobs == [-0.5, -1.0, -0.25] and seq.topk_logprobs is None
    from_lists = jt.SampledSequence(
        "length", "s", _tokens_list=[1, 2], _topk_logprobs_list=[[(1, -0.1), (3, -2.0)], None]
    )
    assert from_lists.tokens == [1, 2] and from_lists.logprobs is None
    assert from_lists.tokens_np.dtype == np.int32  # lists also land in the numpy fields
    assert from_lists.topk_logprobs == [[(1, -0.1), (3, -2.0)], None]
    assert jt.SampledSequence.model_validate(from_lists.model_dump()).topk_logprobs == [
        [(1, pytest.approx(-0.1)), (3, -2.0)],
        None,
    ]


def test_sample_response_prompt_logprobs():
    resp = _instances()["SampleResponse"]
    assert resp.prompt_logprobs == [None, -1.5, -0.5]
    assert resp.topk_prompt_logprobs is None and resp.prompt_cache_hit_tokens == 2
    # The pre-numpy JSON shape (public list names) is accepted too.
    old = {
        "sequences": [
            {"tokens": [1, 2], "logprobs": [-1.0, -2.0], "stop_reason": "length", "sequence_id": "x"}
        ],
        "prompt_logprobs": [None, -0.5],
        "topk_prompt_logprobs": [None, [[3, -0.5], [4, -1.0]]],
    }
    r = jt.SampleResponse.model_validate(old)
    assert r.sequences[0].tokens == [1, 2] and r.sequences[0].logprobs_np.tolist() == [-1.0, -2.0]
    assert r.prompt_logprobs == [None, -0.5] and np.isnan(r.prompt_logprobs_np[0])
    assert r.topk_prompt_logprobs == [None, [(3, -0.5), (4, -1.0)]]


def test_parsed_checkpoint_path():
    p = jt.ParsedCheckpointTinkerPath.from_tinker_path("tinker://abc:train:0/weights/000100")
    assert (p.training_run_id, p.checkpoint_type, p.checkpoint_id) == (
        "abc:train:0",
        "training",
        "weights/000100",
    )
    for bad in ("s3://x/weights/a", "tinker://x/weights", "tinker://x/other/a"):
        with pytest.raises(ValueError):
            jt.ParsedCheckpointTinkerPath.from_tinker_path(bad)


# --------------------------------------------------------------------------------------------------------
# Generic dump / validate
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(_instances()))
def test_model_dump_is_json_and_round_trips(name):
    obj = _instances()[name]
    dumped = obj.model_dump()
    text = json.dumps(dumped, sort_keys=True)  # plain JSON types only
    again = type(obj).model_validate(json.loads(text))
    assert type(again) is type(obj)
    assert json.dumps(again.model_dump(), sort_keys=True) == text
    assert type(obj).model_validate(obj) is obj


def test_exclude_none_and_unknown_keys():
    d = jt.SamplingParams(max_tokens=3).model_dump(exclude_none=True)
    assert d == {"max_tokens": 3, "temperature": 1, "top_k": -1, "top_p": 1}
    assert jt.SamplingParams.model_validate({**d, "future_field": 1}).max_tokens == 3
    info = jt.GetInfoResponse.model_validate(
        {"model_data": {}, "model_id": "m", "optimizer_config": {"type": "dimuon"}}
    )
    assert isinstance(info.optimizer_config, jt.DimuonOptimizerConfig)


# --------------------------------------------------------------------------------------------------------
# Compatibility with the official SDK (test extra only)
# --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sdk():
    return pytest.importorskip("tinker.types")


def _sdk_namespaces(sdk) -> tuple:
    # TopkLogprobs is not re-exported from tinker.types; it lives in its own module.
    from tinker.types import topk_logprobs

    return sdk, topk_logprobs


def _sdk_class(sdk, name: str) -> type:
    return next(getattr(ns, name) for ns in _sdk_namespaces(sdk) if hasattr(ns, name))


def _is_pydantic(cls: type) -> bool:
    return hasattr(cls, "model_fields")


@pytest.mark.parametrize("cls", MODEL_CLASSES, ids=lambda c: c.__name__)
def test_signature_matches_sdk(sdk, cls):
    """Every SDK constructor parameter exists on ours with the same simple default and kind."""
    ours = inspect.signature(cls).parameters
    theirs = inspect.signature(_sdk_class(sdk, cls.__name__)).parameters
    assert list(ours) == list(theirs)
    for name, p in theirs.items():
        q = ours[name]
        assert q.kind == p.kind, name
        if p.default is inspect.Parameter.empty:
            continue
        assert q.default is not inspect.Parameter.empty, name
        if isinstance(p.default, (type(None), bool, int, float, str)):
            assert q.default == p.default and type(q.default) is type(p.default), name


@pytest.mark.parametrize("alias", ["LossFnType", "StopReason", "TensorDtype", "CheckpointType"])
def test_literal_aliases_match_sdk(sdk, alias):
    assert set(typing.get_args(getattr(jt, alias))) == set(typing.get_args(getattr(sdk, alias)))


@pytest.mark.parametrize("name", sorted(_instances()))
def test_sdk_conversions(sdk, name):
    """ours -> SDK -> ours keeps the dump; pydantic SDK classes also take our model_dump directly."""
    obj = _instances()[name]
    sdk_cls = _sdk_class(sdk, name)
    theirs = jt.rebuild_as(obj, *_sdk_namespaces(sdk))
    assert type(theirs) is sdk_cls
    if _is_pydantic(sdk_cls):
        assert sdk_cls.model_validate(obj.model_dump()) == theirs
        # pydantic stores int defaults such as top_p=1 as 1.0: compare values, not JSON text
        np.testing.assert_equal(type(obj).model_validate(theirs.model_dump()).model_dump(), obj.model_dump())
    back = type(obj).model_validate(theirs)  # attribute access on the SDK instance
    np.testing.assert_equal(back.model_dump(), obj.model_dump())


def test_sdk_wire_models_accept_our_dumps(sdk):
    """TensorData and Datum are dataclasses in SDK 0.38; their pydantic wire twins take our dumps."""
    from tinker.types._pydantic_types.datum import Datum as WireDatum
    from tinker.types._pydantic_types.tensor_data import TensorData as WireTensorData

    datum = _instances()["Datum"]
    wire = WireDatum.model_validate(datum.model_dump(exclude_none=True))
    assert wire.loss_fn_inputs["weights"].to_numpy().tolist() == [0.0, 1.0, 1.0, 1.0]
    back = jt.Datum.model_validate(wire.model_dump())
    assert back.loss_fn_inputs["target_tokens"].data == [2, 3, 4, 5] and back.model_input.to_ints() == [
        1,
        2,
        3,
        4,
    ]
    td = WireTensorData.model_validate(_instances()["TensorData"].model_dump(exclude_none=True))
    assert td.to_numpy().tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]


def test_sdk_objects_behave_the_same(sdk):
    """The SDK's own helpers agree with ours on the same data."""
    resp = _instances()["SampleResponse"]
    theirs = jt.rebuild_as(resp, *_sdk_namespaces(sdk))
    assert theirs.prompt_logprobs == resp.prompt_logprobs
    assert theirs.sequences[0].tokens == resp.sequences[0].tokens
    sdk_datum = sdk.Datum(
        model_input=sdk.ModelInput.from_ints([1, 2]),
        loss_fn_inputs={"target_tokens": [2, 3], "weights": [1, 1]},
    )
    ours = jt.Datum.model_validate(sdk_datum)
    assert {k: v.dtype for k, v in ours.loss_fn_inputs.items()} == {
        "target_tokens": "int64",
        "weights": "float32",
    }
    assert ours.model_input.length == sdk_datum.model_input.length == 2
