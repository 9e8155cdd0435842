"""``jtinker serve`` driven by the real tinker SDK (0.38) over HTTP on 127.0.0.1.

One server subprocess serves the whole module (``--fwdbwd-max-chunk-len 4`` so batches arrive as
concurrent, out-of-order chunks; ``--max-body-mb 4`` so the size limit is cheap to hit). The restart test
kills it (SIGKILL) and starts a new process on the same home, port and database.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

tinker = pytest.importorskip("tinker")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
zstandard = pytest.importorskip("zstandard")

from tinker import types  # noqa: E402

KEY_A = "tml-jtinker-test-key-alpha"
KEY_B = "tml-jtinker-test-key-bravo"
BASE = "tiny"  # JTINKER_MODELS=tiny=<the tiny qwen3 directory>
RANK = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A ``python -m jtinker.server`` subprocess; ``restart`` keeps its home, port and database."""

    def __init__(self, home: Path, model_dir: Path, extra_args: tuple[str, ...] = ()):
        self.home = home
        self.extra_args = list(extra_args)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = home / "server.log"
        self.env = {
            **os.environ,
            "JTINKER_MODELS": f"{BASE}={model_dir}",
            "JTINKER_API_KEYS": f"{KEY_A},{KEY_B}",
            "JAX_PLATFORMS": "cpu",
            # Compiled programs survive the restart, so the restarted server starts warm.
            "JAX_COMPILATION_CACHE_DIR": str(home / "jax-cache"),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JTINKER_SWEEP_SECONDS": "0.5",  # expired checkpoints go within a test's patience
        }
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        cmd = [
            sys.executable, "-m", "jtinker.server", "--port", str(self.port), "--home", str(self.home),
            "--base-model", BASE, "--fwdbwd-max-chunk-len", "4", "--max-body-mb", "4",
            "--poll-timeout", "1", "--log-level", "warning", *self.extra_args,
        ]  # fmt: skip
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child writes to it for its whole life
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server did not come up:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self, kill: bool = False) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            self.proc.wait(timeout=30)

    def restart(self) -> None:
        self.stop(kill=True)
        self.start()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None and self.get("/healthz").status_code == 200

    def post(self, path: str, key: str | None = KEY_A, **kwargs) -> httpx.Response:
        headers = kwargs.pop("headers", {})
        if key is not None:
            headers["X-API-Key"] = key
        return httpx.post(self.url + path, headers=headers, timeout=30, **kwargs)

    def get(self, path: str, key: str | None = KEY_A) -> httpx.Response:
        return httpx.get(self.url + path, headers={"X-API-Key": key} if key else {}, timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory, qwen3_dir):
    os.environ.setdefault("TINKER_TELEMETRY", "0")  # the SDK's telemetry would go to our server
    proc = ServerProcess(tmp_path_factory.mktemp("server_home"), qwen3_dir)
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def service(server):
    return tinker.ServiceClient(base_url=server.url, api_key=KEY_A)


def rest(server, key=KEY_A):
    return tinker.RestClient(base_url=server.url, api_key=key)


def sft_batch(seed: int, n: int = 6, length: int = 9, ns=types) -> list:
    """``n`` random sequences as ``ns.Datum`` (the SDK's types, or ``jtinker.types``)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        seq = rng.integers(1, 250, size=length).tolist()
        out.append(
            ns.Datum(
                model_input=ns.ModelInput.from_ints(seq[:-1]),
                loss_fn_inputs={"target_tokens": seq[1:], "weights": [1.0] * (length - 1)},
            )
        )
    return out


def train_step(tc, data, lr=0.02) -> float:
    fwd = tc.forward_backward(data, "cross_entropy")
    opt = tc.optim_step(types.AdamParams(learning_rate=lr))
    loss = fwd.result().metrics["loss:sum"]
    opt.result()
    return loss


def forward_logprobs(tc, data) -> list[np.ndarray]:
    out = tc.forward(data, "cross_entropy").result()
    return [np.asarray(o["logprobs"].data, np.float32) for o in out.loss_fn_outputs]


# ----------------------------------------------------------------------------------------------------


def test_wire_encodings_round_trip_through_the_sdk():
    """Our protobuf encoders are exact inverses of the SDK's decoders (ragged and 2-D outputs too)."""
    from tinker.proto import request_conv, response_conv

    from jtinker import types as jt
    from jtinker.server import wire

    outputs = [
        {"logprobs": jt.TensorData.from_numpy(np.arange(3, dtype=np.float32))},
        {"logprobs": jt.TensorData.from_numpy(np.arange(5, dtype=np.float32) - 9)},
        {"logprobs": jt.TensorData.from_numpy(np.ones((2, 3), np.float32))},  # a (N, K) datum
    ]
    fbo = jt.ForwardBackwardOutput("ArrayRecord", outputs, {"loss:sum": 1.5})
    back = response_conv.deserialize_forward_backward_output(wire.encode_forward_backward_output(fbo))
    assert back.metrics == {"loss:sum": 1.5} and len(back.loss_fn_outputs) == 3
    for got, want in zip(back.loss_fn_outputs, outputs, strict=True):
        assert got["logprobs"].shape == list(want["logprobs"].to_numpy().shape)
        np.testing.assert_array_equal(got["logprobs"].to_numpy(), want["logprobs"].to_numpy())

    resp = jt.SampleResponse(
        sequences=[
            jt.SampledSequence("stop", "s0", tokens_np=np.array([4, 5]), logprobs_np=np.array([-1.0, -2.0]))
        ],
        _prompt_logprobs_list=[None, -0.5, -0.25],
        _topk_prompt_logprobs_list=[None, [(3, -0.125), (4, -2.0)], [(7, -0.375)]],
    )
    got = response_conv.deserialize_sample_response(wire.encode_sample_response(resp))
    assert got.sequences[0].tokens == [4, 5] and got.sequences[0].logprobs == [-1.0, -2.0]
    assert got.sequences[0].stop_reason == "stop"
    assert got.prompt_logprobs == [None, -0.5, -0.25]
    assert got.topk_prompt_logprobs == [None, [(3, -0.125), (4, -2.0)], [(7, -0.375)]]

    import torch

    dense_target = torch.zeros((3, 8), dtype=torch.int64)
    dense_target[0, 1], dense_target[1, 0] = 5, 6
    target = types.TensorData.from_torch_sparse(dense_target)
    assert target.sparse_crow_indices is not None  # the SDK sends it as CSR
    request = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(
            data=[
                types.Datum(
                    model_input=types.ModelInput.from_ints([1, 2, 3]),
                    loss_fn_inputs={"target_tokens": target, "weights": [1.0, 0.5, 0.0]},
                )
            ],
            loss_fn="ppo",
            loss_fn_config={"clip_low_threshold": 0.8, "mode": "x"},
        ),
        model_id="m",
        seq_id=3,
    )
    call = wire.parse_forward_backward_proto(
        request_conv.forward_backward_request_to_proto(request).SerializeToString()
    )
    assert (call.model_id, call.seq_id, call.loss_fn, call.error) == ("m", 3, "ppo", None)
    assert call.loss_fn_config == {"clip_low_threshold": pytest.approx(0.8), "mode": "x"}
    assert call.data[0].model_input.to_ints() == [1, 2, 3]
    np.testing.assert_array_equal(
        call.data[0].loss_fn_inputs["target_tokens"].to_numpy(), dense_target.numpy()
    )
    np.testing.assert_allclose(call.data[0].loss_fn_inputs["weights"].to_numpy(), [1.0, 0.5, 0.0])


def test_sft_loss_falls(server, service):
    tc = service.create_lora_training_client(BASE, rank=RANK, seed=0).result()
    info = tc.get_info()
    assert info.model_id == tc.model_id and info.lora_rank == RANK and info.model_data.model_name == BASE
    data = sft_batch(0)  # 6 datums = 2 chunks of at most 4, sent concurrently and out of order
    losses = [train_step(tc, data) for _ in range(6)]
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.7 * losses[0], losses
    out = tc.forward(data, "cross_entropy").result()
    assert len(out.loss_fn_outputs) == len(data)
    assert [o["logprobs"].shape for o in out.loss_fn_outputs] == [[8]] * len(data)
    caps = rest(server).get_server_capabilities().result()
    assert [m.model_name for m in caps.supported_models] == [BASE]
    assert server.get("/api/v1/healthz", key=None).json() == {"status": "ok"}
    status = server.get("/status").json()
    assert status["base_models"][0]["name"] == BASE and "queue_depth" in status["base_models"][0]
    assert "jtinker server" in server.get("/").text


def test_out_of_order_seq_ids_run_in_order(server, service):
    """Raw requests sent 3, 2, 1 run as 1, 2, 3: the optim step sees the gradient of seq 1."""
    from tinker.proto import request_conv

    model_id = service.create_lora_training_client(BASE, rank=RANK, seed=12).result().model_id
    fwd = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(data=sft_batch(12, n=2), loss_fn="cross_entropy"),
        model_id=model_id,
        seq_id=1,
    )
    body = zstandard.ZstdCompressor().compress(
        request_conv.forward_backward_request_to_proto(fwd).SerializeToString()
    )
    save = server.post("/api/v1/save_weights", json={"model_id": model_id, "seq_id": 3, "path": "ordered"})
    optim = server.post(
        "/api/v1/optim_step", json={"model_id": model_id, "seq_id": 2, "adam_params": {"learning_rate": 0.01}}
    )
    assert server.get("/status").json()["buffered_requests"] >= 2
    pending = server.post("/api/v1/retrieve_future", json={"request_id": optim.json()["request_id"]})
    # "not yet" is the SDK's quiet retry: HTTP 408 with the queue state in the body
    assert pending.status_code == 408
    assert pending.json()["type"] == "try_again" and pending.json()["queue_state"] == "active"
    headers = {"Content-Type": "application/x-protobuf", "Content-Encoding": "zstd"}
    first = server.post("/api/v1/forward_backward", content=body, headers=headers)
    again = server.post("/api/v1/forward_backward", content=body, headers=headers)  # a retried send
    assert first.json()["request_id"] == again.json()["request_id"]
    # Another kind of request at a used seq_id is refused (not answered with the optim step's result).
    clash = server.post("/api/v1/save_weights", json={"model_id": model_id, "seq_id": 2, "path": "clash"})
    assert clash.status_code == 400
    assert "seq_id 2" in clash.json()["detail"] and "OptimStep" in clash.json()["detail"]

    def result(response):
        while True:  # what the SDK does: poll again on try_again
            out = server.post("/api/v1/retrieve_future", json={"request_id": response.json()["request_id"]})
            if out.json().get("type") != "try_again":
                return out.json()

    assert result(optim)["metrics"]["grad_norm:mean"] > 0  # the gradient of seq 1 was there
    assert result(save)["path"] == f"tinker://{model_id}/weights/ordered"


def test_forward_backward_custom_matches_in_process(server, service, qwen3_dir, tmp_path):
    import jax.numpy as jnp
    import torch

    import jtinker

    data = sft_batch(1, n=3)
    lr = types.AdamParams(learning_rate=0.05, eps=1.0)  # eps=1: the step is smooth in the gradient

    def torch_loss(batch, logprobs_list):
        loss = sum(
            -(lp * d.loss_fn_inputs["weights"].to_torch()).sum() + 0.1 * (lp**2).sum()
            for d, lp in zip(batch, logprobs_list, strict=True)
        )
        return loss, {"custom/sq:sum": torch.stack([(lp**2).sum() for lp in logprobs_list]).sum()}

    tc = service.create_lora_training_client(BASE, rank=RANK, seed=7).result()
    remote = tc.forward_backward_custom(data, torch_loss).result()  # the SDK's two-pass path
    tc.optim_step(lr).result()
    remote_after = forward_logprobs(tc, data)

    def jax_loss(batch, logprobs_list):
        loss = sum(
            -(lp * jnp.asarray(d.loss_fn_inputs["weights"].to_numpy())).sum() + 0.1 * (lp**2).sum()
            for d, lp in zip(batch, logprobs_list, strict=True)
        )
        return loss, {}

    local_service = jtinker.ServiceClient(store_dir=str(tmp_path / "runs"))
    local = local_service.create_lora_training_client(str(qwen3_dir), rank=RANK, seed=7)
    local_data = sft_batch(1, n=3, ns=jtinker.types)
    expected = local.forward_backward_custom(local_data, jax_loss).result()
    local.optim_step(jtinker.types.AdamParams(learning_rate=0.05, eps=1.0)).result()
    local_after = [
        np.asarray(o["logprobs"].to_numpy())
        for o in local.forward(local_data, "cross_entropy").result().loss_fn_outputs
    ]

    assert remote.metrics["loss:sum"] == pytest.approx(expected.metrics["loss:sum"], rel=1e-5)
    assert "custom/sq:sum" in remote.metrics and "surrogate_loss:sum" in remote.metrics
    for r, e in zip(remote.loss_fn_outputs, expected.loss_fn_outputs, strict=True):
        np.testing.assert_allclose(r["logprobs"].data, e["logprobs"].to_numpy(), atol=1e-5)
    before = [np.asarray(o["logprobs"].data) for o in remote.loss_fn_outputs]
    assert max(np.abs(a - b).max() for a, b in zip(remote_after, before, strict=True)) > 1e-3  # it moved
    for r, e in zip(remote_after, local_after, strict=True):
        np.testing.assert_allclose(r, e, atol=2e-4)


def test_create_custom_loss_runs_on_the_server_in_one_pass(server, service):
    """SDK 0.38 uploads a ``create_custom_loss`` loss (the server announces custom_loss_server_side); it
    then runs in one forward_backward request, with the result and update of the SDK's client-side
    two-pass path. Unknown, foreign or hostile losses fail by name and the server stays up."""
    pytest.importorskip("torch")

    def nll_and_square(logprobs, weights):
        square = (logprobs**2).sum()
        return -(logprobs * weights).sum() + 0.1 * square, {"custom/sq:sum": square}

    handle = service.create_custom_loss(nll_and_square, {"logprobs": 1, "weights": 1}).result()
    assert handle.loss_id is not None  # uploaded, not run client-side

    def batch_loss(batch, logprobs_list):  # the same loss on the SDK's client-side two-pass path
        terms = [
            nll_and_square(lp, d.loss_fn_inputs["weights"].to_torch())
            for d, lp in zip(batch, logprobs_list, strict=True)
        ]
        return sum(loss for loss, _ in terms), {
            "custom/sq:sum": sum(m["custom/sq:sum"].item() for _, m in terms)
        }

    data = sft_batch(2, n=3)
    lr = types.AdamParams(learning_rate=0.05, eps=1.0)
    one_pass = service.create_lora_training_client(BASE, rank=RANK, seed=11).result()
    two_pass = service.create_lora_training_client(BASE, rank=RANK, seed=11).result()
    got = one_pass.forward_backward_custom(data, handle).result()
    want = two_pass.forward_backward_custom(data, batch_loss).result()
    assert "surrogate_loss:sum" in want.metrics and "surrogate_loss:sum" not in got.metrics
    for key in ("loss:sum", "custom/sq:sum"):
        assert got.metrics[key] == pytest.approx(want.metrics[key], rel=1e-5)
    for a, b in zip(got.loss_fn_outputs, want.loss_fn_outputs, strict=True):
        np.testing.assert_allclose(a["logprobs"].data, b["logprobs"].data, atol=1e-5)
    one_pass.optim_step(lr).result()
    two_pass.optim_step(lr).result()
    after_one, after_two = forward_logprobs(one_pass, data), forward_logprobs(two_pass, data)
    before = [np.asarray(o["logprobs"].data) for o in got.loss_fn_outputs]
    assert max(np.abs(a - b).max() for a, b in zip(after_one, before, strict=True)) > 1e-3  # it moved
    for a, b in zip(after_one, after_two, strict=True):
        np.testing.assert_allclose(a, b, atol=2e-4)

    with pytest.raises(tinker.RequestFailedError, match="loss_fn_config.loss_id: no custom loss 'nope'"):
        one_pass.forward_backward(data, "custom", {"loss_id": "nope"}).result()
    other_session = tinker.ServiceClient(base_url=server.url, api_key=KEY_A)
    foreign = other_session.create_custom_loss(nll_and_square, {"logprobs": 1, "weights": 1}).result()
    with pytest.raises(tinker.RequestFailedError, match="no custom loss .* in this model's session"):
        one_pass.forward_backward(data, "custom", {"loss_id": foreign.loss_id}).result()
    hostile = {
        "session_id": service.holder.get_session_id(),
        "custom_loss_seq_id": 1000,
        "name": "hostile",
        "inputs": [{"name": "logprobs", "rank": 1}],
        "graph": {
            "nodes": [
                {"op": "placeholder", "name": "logprobs", "target": "logprobs"},
                {"op": "call_function", "name": "shell", "target": "os.system", "args": ["true"]},
                {
                    "op": "output",
                    "name": "output",
                    "target": "output",
                    "args": [{"tuple": [{"ref": "shell"}, {"dict": {}}]}],
                },
            ]
        },
    }
    r = server.post("/api/v1/create_custom_loss", json=hostile)
    assert r.status_code == 400 and "os.system" in r.json()["detail"], r.text
    assert np.isfinite(train_step(one_pass, data))  # the failed requests did not stall the seq_id order
    assert server.alive()


def test_importance_sampling_rl_step(server, service):
    tc = service.create_lora_training_client(BASE, rank=RANK, seed=3).result()
    sampler = tc.save_weights_and_get_sampling_client().result()
    prompt = [5, 17, 42, 99, 7]
    result = sampler.sample(
        types.ModelInput.from_ints(prompt), 4, types.SamplingParams(max_tokens=6, temperature=1.0, seed=11)
    ).result()
    assert len(result.sequences) == 4
    data, advantages_total = [], 0.0
    for i, seq in enumerate(result.sequences):
        assert len(seq.tokens) == len(seq.logprobs) >= 1 and seq.sequence_id
        full = prompt + seq.tokens
        adv = 1.0 if i < 2 else -1.0
        n_prompt = len(prompt) - 1
        data.append(
            types.Datum(
                model_input=types.ModelInput.from_ints(full[:-1]),
                loss_fn_inputs={
                    "target_tokens": full[1:],
                    "logprobs": [0.0] * n_prompt + list(seq.logprobs),
                    "advantages": [0.0] * n_prompt + [adv] * len(seq.tokens),
                },
            )
        )
        advantages_total += adv * len(seq.tokens)
    out = tc.forward_backward(data, "importance_sampling").result()
    # The sampler's logprobs are the learner's (same weights): every ratio is ~1.
    assert out.metrics["loss:sum"] == pytest.approx(-advantages_total, abs=1e-2)
    for o, seq in zip(out.loss_fn_outputs, result.sequences, strict=True):
        np.testing.assert_allclose(o["logprobs"].data[-len(seq.tokens) :], seq.logprobs, atol=2e-3)
    scored = sampler.compute_logprobs(types.ModelInput.from_ints(prompt)).result()
    assert scored[0] is None and len(scored) == len(prompt)
    tail = sampler.compute_logprobs(types.ModelInput.from_ints(prompt), prompt_logprobs_last_n=2).result()
    assert tail[:-2] == [None] * (len(prompt) - 2) and tail[-2:] == pytest.approx(scored[-2:], abs=1e-5)
    np.testing.assert_allclose(
        scored[1:], out.loss_fn_outputs[0]["logprobs"].data[: len(prompt) - 1], atol=2e-3
    )
    # GSPO as tinker-cookbook 0.6.1's rl_loop sends it: a ratio mask over the sampled tokens, provenance.
    gspo_data = []
    for datum, seq in zip(data, result.sequences, strict=True):
        n_prompt, n_sampled = len(prompt) - 1, len(seq.tokens)
        inputs = dict(datum.loss_fn_inputs, sequence_ratio_mask=[0.0] * n_prompt + [1.0] * n_sampled)
        gspo_data.append(
            types.Datum(model_input=datum.model_input, loss_fn_inputs=inputs).with_provenance(
                model_input=[
                    types.PromptProvenanceSpan(sequence_id=seq.sequence_id, length=len(prompt)),
                    types.SampledProvenanceSpan(sequence_id=seq.sequence_id, length=n_sampled - 1),
                ],
                loss_fn_inputs=[
                    types.PromptProvenanceSpan(sequence_id=seq.sequence_id, offset=1, length=n_prompt),
                    types.SampledProvenanceSpan(sequence_id=seq.sequence_id, length=n_sampled),
                ],
            )
        )
    gspo = tc.forward(gspo_data, "gspo").result()  # every sequence ratio is ~1
    assert gspo.metrics["loss:sum"] == pytest.approx(-advantages_total, abs=1e-2)
    assert tc.optim_step(types.AdamParams(learning_rate=0.01)).result() is not None


def test_target_prompt_and_topk_sample_logprobs(server, service):
    """Row ``i`` of ``target_prompt_logprobs`` scores prompt position ``i + 1``: the prompt's own next
    tokens give its prompt logprobs, and any id gives what the top-k list says of it; a sparse CSR
    request comes back sparse with the same cells. ``topk_sample_logprobs`` comes back per sequence."""
    import torch

    sampler = service.create_sampling_client(base_model=BASE).result()
    prompt = types.ModelInput.from_ints([5, 17, 42, 99, 7, 3])
    params = types.SamplingParams(max_tokens=1, temperature=0.0)
    scored = sampler.sample(prompt, 1, params, include_prompt_logprobs=True, topk_prompt_logprobs=3).result()
    ids = np.full((5, 40), -1, np.int64)
    ids[:, 0] = prompt.to_ints()[1:]
    topk_ids = [[t for t, _ in row] for row in scored.topk_prompt_logprobs[1:]]
    ids[1, 7], ids[3, 39] = topk_ids[1][2], topk_ids[3][0]
    for request in (
        types.TensorData.from_numpy(ids),
        types.TensorData.from_torch_sparse(torch.tensor(ids), -1),
    ):
        got = (
            sampler.sample(prompt, 1, params, target_prompt_logprobs=request).result().target_prompt_logprobs
        )
        assert (got.sparse_crow_indices is None) == (request.sparse_crow_indices is None)
        values = got.to_numpy()
        assert values.shape == (5, 40) and values.dtype == np.float32
        np.testing.assert_allclose(values[:, 0], scored.prompt_logprobs[1:], atol=1e-5)
        assert values[1, 7] == pytest.approx(scored.topk_prompt_logprobs[2][2][1], abs=1e-5)
        assert values[3, 39] == pytest.approx(scored.topk_prompt_logprobs[4][0][1], abs=1e-5)
        assert not values[ids < 0].any()  # 0.0 wherever nothing was asked
    short = types.TensorData.from_numpy(ids[:2])
    with pytest.raises(tinker.RequestFailedError, match="target_prompt_logprobs: must have shape") as err:
        sampler.sample(prompt, 1, params, target_prompt_logprobs=short).result()
    assert err.value.category == types.RequestErrorCategory.User
    top = sampler.sample(
        prompt, 1, types.SamplingParams(max_tokens=4, temperature=0.0), topk_sample_logprobs=3
    )
    seq = top.result().sequences[0]
    assert len(seq.topk_logprobs) == len(seq.tokens) == 4 and all(len(row) == 3 for row in seq.topk_logprobs)
    assert [row[0][0] for row in seq.topk_logprobs] == seq.tokens  # greedy: the top token is the sampled one
    assert [row[0][1] for row in seq.topk_logprobs] == pytest.approx(seq.logprobs, abs=1e-6)
    assert all(a[1] >= b[1] for row in seq.topk_logprobs for a, b in zip(row, row[1:], strict=False))
    alt = sampler.sample(prompt, 1, params, prompt_alt_tokens_k=4).result().prompt_alt_tokens
    greedy_next = [row[0][0] for row in scored.topk_prompt_logprobs[1:]]
    assert alt.tokens.to_numpy().tolist() == [[t] * 4 for t in greedy_next]  # temperature 0: the argmax
    np.testing.assert_allclose(
        alt.logprobs.to_numpy()[:, 0], [row[0][1] for row in scored.topk_prompt_logprobs[1:]], atol=1e-5
    )


def test_sample_responses_in_json_carry_every_field(server, service):
    """A client that does not accept protobuf gets the same answer as JSON: sequences with their top-k,
    prompt logprobs, top-k prompt logprobs, target logprobs and alternative tokens."""
    sampler = service.create_sampling_client(base_model=BASE).result()
    prompt = types.ModelInput.from_ints([5, 17, 42, 99, 7, 3])
    targets = np.full((5, 3), -1, np.int64)
    targets[:, 0], targets[2, 2] = prompt.to_ints()[1:], 11
    options = dict(
        include_prompt_logprobs=True,
        topk_prompt_logprobs=2,
        target_prompt_logprobs=types.TensorData.from_numpy(targets),
        topk_sample_logprobs=3,
        prompt_alt_tokens_k=2,
    )
    params = types.SamplingParams(max_tokens=3, temperature=0.0)
    expected = sampler.sample(prompt, 1, params, **options).result()

    request = types.SampleRequest(
        sampling_session_id=sampler._sampling_session_id,
        prompt=prompt,
        num_samples=1,
        sampling_params=params,
        prompt_logprobs=True,
        topk_prompt_logprobs=2,
        topk_sample_logprobs=3,
        prompt_alt_tokens_k=2,
    )
    body = request.model_dump(mode="json", exclude_none=True)
    body["target_prompt_logprobs"] = {"data": targets.ravel().tolist(), "dtype": "int64", "shape": [5, 3]}
    sent = server.post("/api/v1/asample", json=body)
    assert sent.status_code == 200, sent.text
    while True:
        got = server.post("/api/v1/retrieve_future", json={"request_id": sent.json()["request_id"]})
        assert got.headers["content-type"].startswith("application/json")
        if got.json().get("type") != "try_again":
            break
    got = got.json()
    seq, want = got["sequences"][0], expected.sequences[0]
    assert seq["tokens"] == want.tokens and seq["stop_reason"] == want.stop_reason
    np.testing.assert_allclose(seq["logprobs"], want.logprobs, atol=1e-6)
    assert [[t for t, _ in row] for row in seq["topk_logprobs"]] == [
        [t for t, _ in r] for r in want.topk_logprobs
    ]
    assert got["prompt_logprobs"][0] is None
    np.testing.assert_allclose(got["prompt_logprobs"][1:], expected.prompt_logprobs[1:], atol=1e-6)
    assert got["topk_prompt_logprobs"][0] is None
    for row, want_row in zip(got["topk_prompt_logprobs"][1:], expected.topk_prompt_logprobs[1:], strict=True):
        assert [t for t, _ in row] == [t for t, _ in want_row]
        np.testing.assert_allclose([lp for _, lp in row], [lp for _, lp in want_row], atol=1e-6)
    target = got["target_prompt_logprobs"]
    assert target["shape"] == [5, 3] and target["dtype"] == "float32"
    np.testing.assert_allclose(
        np.reshape(target["data"], (5, 3)), expected.target_prompt_logprobs.to_numpy(), atol=1e-6
    )
    alt = got["prompt_alt_tokens"]
    assert (
        np.reshape(alt["tokens"]["data"], (5, 2)).tolist()
        == expected.prompt_alt_tokens.tokens.to_numpy().tolist()
    )
    np.testing.assert_allclose(
        np.reshape(alt["logprobs"]["data"], (5, 2)), expected.prompt_alt_tokens.logprobs.to_numpy(), atol=1e-6
    )
    assert got["prompt_cache_hit_tokens"] == expected.prompt_cache_hit_tokens == 0


def test_save_weights_and_sampling(server, service):
    tc = service.create_lora_training_client(BASE, rank=RANK, seed=4).result()
    data = sft_batch(4, n=2)
    train_step(tc, data, lr=0.05)
    saved = tc.save_weights_for_sampler("for-sampling").result()
    assert saved.path == f"tinker://{tc.model_id}/sampler_weights/for-sampling"
    from_path = service.create_sampling_client(model_path=saved.path).result()
    snapshot = tc.save_weights_and_get_sampling_client().result()
    greedy = types.SamplingParams(max_tokens=5, temperature=0.0)
    prompt = types.ModelInput.from_ints([3, 14, 15, 92])
    a = from_path.sample(prompt, 1, greedy).result().sequences[0].tokens
    b = snapshot.sample(prompt, 1, greedy).result().sequences[0].tokens
    assert a == b and len(a) >= 1
    assert from_path.get_base_model() == BASE

    state = tc.save_state("state-1").result().path
    saved_logprobs = forward_logprobs(tc, data)
    train_step(tc, data, lr=0.05)
    assert not np.allclose(forward_logprobs(tc, data)[0], saved_logprobs[0])
    with pytest.warns(FutureWarning, match="deprecated"):  # deprecated in the SDK, still served
        tc.load_state_with_optimizer(state).result()
    for x, y in zip(forward_logprobs(tc, data), saved_logprobs, strict=True):
        np.testing.assert_allclose(x, y, atol=1e-6)
    train_step(tc, data, lr=0.05)
    with pytest.warns(FutureWarning, match="deprecated"):
        tc.load_state(state).result()
    for x, y in zip(forward_logprobs(tc, data), saved_logprobs, strict=True):
        np.testing.assert_allclose(x, y, atol=1e-6)
    weights_only = service.create_training_client_from_state(state).result()
    for x, y in zip(forward_logprobs(weights_only, data), saved_logprobs, strict=True):
        np.testing.assert_allclose(x, y, atol=1e-6)


def test_openai_compatible_completions_and_chat(server, service, qwen3_dir):
    """``/oai/api/v1`` as Tinker serves it: an OpenAI client's completions and chat completions of a
    trained checkpoint equal the SDK's sampling of the same prompt (its adapter, EOS stops, logprobs)."""
    from transformers import AutoTokenizer

    oai = "/oai/api/v1"
    tc = service.create_lora_training_client(BASE, rank=RANK, seed=11).result()
    train_step(tc, sft_batch(11, n=2), lr=0.05)
    path = tc.save_weights_for_sampler("oai").result().path
    sdk_sampler = service.create_sampling_client(model_path=path).result()
    tokenizer = AutoTokenizer.from_pretrained(qwen3_dir)
    prompt = [3, 14, 15, 92, 65]

    def sdk(tokens, **params):
        params = types.SamplingParams(max_tokens=12, temperature=0.0, **params)
        return sdk_sampler.sample(types.ModelInput.from_ints(tokens), 1, params).result().sequences[0]

    def post(route, key=KEY_A, **body):
        return server.post(oai + route, key=None, headers={"Authorization": f"Bearer {key}"}, json=body)

    want = sdk(prompt)
    got = post("/completions", model=path, prompt=prompt, max_tokens=12, temperature=0, logprobs=2).json()
    (choice,) = got["choices"]
    assert choice["text"] == tokenizer.decode(want.tokens, skip_special_tokens=True)
    assert choice["finish_reason"] == ("stop" if want.stop_reason == "stop" else "length")
    np.testing.assert_allclose(choice["logprobs"]["token_logprobs"], want.logprobs, atol=1e-5)
    for row, logprob in zip(choice["logprobs"]["top_logprobs"], want.logprobs, strict=True):
        # keyed by text, as OpenAI's: two byte-level tokens may decode alike; greedy picked the best
        assert 1 <= len(row) <= 2 and max(row.values()) == pytest.approx(logprob, abs=1e-5)
    assert got["usage"] == {
        "prompt_tokens": 5,
        "completion_tokens": len(want.tokens),
        "total_tokens": 5 + len(want.tokens),
    }
    base = post("/completions", model=BASE, prompt=prompt, max_tokens=12, temperature=0).json()
    base_sdk = service.create_sampling_client(base_model=BASE).result()
    base_tokens = (
        base_sdk.sample(
            types.ModelInput.from_ints(prompt), 1, types.SamplingParams(max_tokens=12, temperature=0.0)
        )
        .result()
        .sequences[0]
        .tokens
    )
    assert base["choices"][0]["text"] == tokenizer.decode(base_tokens, skip_special_tokens=True)

    # A stop string is cut from the text; prompts as text, n per prompt, in order.
    text = choice["text"]
    if len(text) > 3:
        stopped = post(
            "/completions", model=path, prompt=prompt, max_tokens=12, temperature=0, stop=[text[2:4]]
        ).json()
        assert stopped["choices"][0]["text"] == text[: text.find(text[2:4])]
        assert stopped["choices"][0]["finish_reason"] == "stop"
    many = post("/completions", model=path, prompt=["a b", "c d e"], max_tokens=4, n=3, seed=5).json()
    assert [c["index"] for c in many["choices"]] == list(range(6))
    assert many["usage"]["prompt_tokens"] == len(tokenizer.encode("a b")) + len(tokenizer.encode("c d e"))

    # Penalties reach the sampler: strong ones change greedy text that repeats itself.
    plain = post("/completions", model=path, prompt=prompt, max_tokens=12, temperature=0).json()
    penalized = post(
        "/completions", model=path, prompt=prompt, max_tokens=12, temperature=0, frequency_penalty=2.0,
        presence_penalty=2.0, logprobs=0,
    ).json()  # fmt: skip
    assert len(set(want.tokens)) < len(want.tokens)  # plain greedy repeats a token here...
    assert penalized["choices"][0]["text"] != plain["choices"][0]["text"]  # ...which the penalties avoid
    repeated = post(
        "/completions", model=path, prompt=prompt, max_tokens=12, temperature=0, repetition_penalty=3.0
    ).json()
    assert repeated["choices"][0]["text"] != plain["choices"][0]["text"]
    # logit_bias: +100 on one token makes greedy text only that token (it is not EOS).
    forced = post(
        "/completions", model=path, prompt=prompt, max_tokens=3, temperature=0, logit_bias={"65": 100}
    ).json()
    assert forced["choices"][0]["text"] == tokenizer.decode([65] * 3)

    # echo with max_tokens=0 scores the prompt (lm-eval's loglikelihood): compute_logprobs's numbers.
    scored = post("/completions", model=path, prompt=prompt, max_tokens=0, echo=True, logprobs=1).json()
    (choice,) = scored["choices"]
    assert choice["text"] == tokenizer.decode(prompt) and scored["usage"]["completion_tokens"] == 0
    want_lp = sdk_sampler.compute_logprobs(types.ModelInput.from_ints(prompt)).result()
    assert choice["logprobs"]["token_logprobs"][0] is None and choice["logprobs"]["top_logprobs"][0] is None
    np.testing.assert_allclose(choice["logprobs"]["token_logprobs"][1:], want_lp[1:], atol=1e-5)
    for row, logprob in zip(choice["logprobs"]["top_logprobs"][1:], want_lp[1:], strict=True):
        assert len(row) == 1 and max(row.values()) >= logprob - 1e-5
    echoed = post("/completions", model=path, prompt=prompt, max_tokens=3, echo=True, logprobs=0).json()
    (choice,) = echoed["choices"]
    assert len(choice["logprobs"]["tokens"]) == len(prompt) + 3 and choice["logprobs"]["top_logprobs"] is None
    np.testing.assert_allclose(choice["logprobs"]["token_logprobs"][1:5], want_lp[1:], atol=1e-5)
    assert choice["text"].startswith(tokenizer.decode(prompt))

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Color?"}]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    chat_prompt = tokenizer.encode(rendered, add_special_tokens=False)
    want = sdk(chat_prompt)
    chat = post(
        "/chat/completions",
        model=path,
        messages=messages,
        max_tokens=12,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    ).json()
    (choice,) = chat["choices"]
    assert chat["object"] == "chat.completion" and choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == tokenizer.decode(want.tokens, skip_special_tokens=True)
    content = choice["logprobs"]["content"]
    np.testing.assert_allclose([c["logprob"] for c in content], want.logprobs, atol=1e-5)
    assert all(
        len(c["top_logprobs"]) == 3 and c["top_logprobs"][0]["logprob"] >= c["logprob"] - 1e-6
        for c in content
    )
    assert chat["usage"]["prompt_tokens"] == len(chat_prompt)

    models = [m["id"] for m in server.get(oai + "/models").json()["data"]]
    assert models[0] == BASE and path in models and all(m.startswith("tinker://") for m in models[1:])
    assert path not in [m["id"] for m in server.get(oai + "/models", key=KEY_B).json()["data"]]

    # Bad requests: OpenAI-shaped errors naming the field; the server stays up.
    bad = [
        ({"prompt": prompt}, 400, "model"),
        ({"model": path, "prompt": prompt, "stream": "yes"}, 400, "stream"),
        ({"model": path, "prompt": prompt, "max_tokens": 0}, 400, "max_tokens"),  # 0 only with echo
        ({"model": path, "prompt": prompt, "echo": "yes"}, 400, "echo"),
        ({"model": path, "prompt": prompt, "temperature": 9}, 400, "temperature"),
        ({"model": path, "prompt": prompt, "tools": []}, 400, "tools"),
        ({"model": path, "prompt": prompt, "presence_penalty": 3}, 400, "presence_penalty"),
        ({"model": path, "prompt": prompt, "logit_bias": {"x": 1}}, 400, "logit_bias"),
        ({"model": path, "prompt": prompt, "logit_bias": {"5": 101}}, 400, "logit_bias"),
        ({"model": path, "prompt": prompt, "logit_bias": {"99999999": 1}}, 400, "logit_bias"),
        ({"model": path, "prompt": prompt, "repetition_penalty": 0}, 400, "repetition_penalty"),
        ({"model": path, "prompt": []}, 400, "prompt"),
        ({"model": path, "prompt": prompt, "stop": [""]}, 400, "stop"),
        ({"model": path, "prompt": prompt, "max_tokens": 10**6}, 400, "max_tokens"),  # past the context
        ({"model": "tinker://nope/sampler_weights/x", "prompt": prompt}, 404, "model"),
        ({"model": "gpt-4o", "prompt": prompt}, 400, "model"),
    ]
    for body, status, param in bad:
        r = post("/completions", **body)
        assert r.status_code == status, (body, r.text)
        assert r.json()["error"]["param"] == param and r.json()["error"]["message"], r.text
    r = post("/completions", key=KEY_B, model=path, prompt=prompt)  # another key's checkpoint
    assert r.status_code == 404 and "not found" in r.json()["error"]["message"]
    r = post("/chat/completions", model=path, messages=[{"role": "robot", "content": "x"}])
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0]"
    r = post("/chat/completions", model=path, messages=messages, top_logprobs=2)
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"
    r = httpx.post(server.url + oai + "/completions", json={"model": path, "prompt": prompt}, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert server.alive()


def test_openai_streaming(server):
    """``stream: true`` as the ``openai`` client reads it: a completion's and a chat's chunks join to the
    text of the same request unstreamed, in pieces as decoding goes, with its finish reason; stop
    strings, ``n`` and usage too. A reader that leaves early disturbs nothing; refusals are named."""
    import openai

    client = openai.OpenAI(base_url=server.url + "/oai/api/v1", api_key=KEY_A, max_retries=0)
    ask = {"model": BASE, "prompt": "a b c", "max_tokens": 48, "temperature": 0, "logit_bias": {"258": -100}}
    whole = client.completions.create(**ask)
    ask_tokens = whole.usage.completion_tokens
    chunks = list(client.completions.create(**ask, stream=True, stream_options={"include_usage": True}))
    pieces = [c.choices[0].text for c in chunks if c.choices and c.choices[0].text]
    assert "".join(pieces) == whole.choices[0].text and len(pieces) >= 3  # 48 tokens, 16 a chunk
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage

    text = whole.choices[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    chunks = list(client.completions.create(**ask, stop=[stop], stream=True))
    assert "".join(c.choices[0].text for c in chunks) == text[: text.find(stop)]
    assert chunks[-1].choices[0].finish_reason == "stop"

    many = {**ask, "n": 2, "temperature": 1.0, "seed": 3, "max_tokens": 20}
    want = [c.text for c in client.completions.create(**many).choices]
    got = ["", ""]
    for chunk in client.completions.create(**many, stream=True):
        got[chunk.choices[0].index] += chunk.choices[0].text
    assert got == want

    messages = [{"role": "user", "content": "Color?"}]
    chat = {"model": BASE, "messages": messages, "max_tokens": 24, "temperature": 0}
    whole = client.chat.completions.create(**chat)
    chunks = list(client.chat.completions.create(**chat, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason

    def sampled_tokens() -> int:
        return sum(base["sampled_tokens"] for base in server.get("/status").json()["base_models"])

    before = sampled_tokens()
    with client.completions.create(**{**ask, "max_tokens": 400}, stream=True) as stream:
        next(iter(stream))  # the reader leaves after its first piece...
    assert client.completions.create(**ask).choices[0].text == text  # ...the server is still serving,
    assert sampled_tokens() - before - ask_tokens < 400  # and it ended that sample early

    refused = [
        ({"stream": True, "logprobs": 0}, "logprobs"),  # 0: the sampled tokens' logprobs, no top-k
        ({"stream": True, "echo": True}, "echo"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"stream": True, "max_tokens": 10**6}, "max_tokens"),  # the sampler's refusal, before any chunk
    ]
    for extra, param in refused:
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(**{**ask, **extra})
        assert e.value.body["param"] == param, e.value.body


def test_a_next_turn_reuses_the_last_turn_from_the_prefix_cache(server, service):
    """Each sampling client's adapter keeps its sequences' keys and values: a prompt extending one
    prefills only its new tokens, and the SDK's response says how many came from the cache."""
    tc = service.create_lora_training_client(BASE, rank=RANK, seed=5).result()
    train_step(tc, sft_batch(5, n=2), lr=0.05)
    path = tc.save_weights_for_sampler("prefix-turns").result().path
    clients = [
        service.create_sampling_client(model_path=path).result(),
        tc.save_weights_and_get_sampling_client().result(),
    ]
    greedy = types.SamplingParams(max_tokens=6, temperature=0.0)
    prompt = list(range(20, 60))
    before = server.get("/status").json()["base_models"][0]["prefix_cache"]["hit_tokens"]
    for sampler in clients:
        first = sampler.sample(types.ModelInput.from_ints(prompt), 1, greedy).result()
        turn = prompt + list(first.sequences[0].tokens) + [7, 8]
        second = sampler.sample(types.ModelInput.from_ints(turn), 1, greedy).result()
        assert (first.prompt_cache_hit_tokens, second.prompt_cache_hit_tokens) == (0, len(prompt) + 5)
    stats = server.get("/status").json()["base_models"][0]["prefix_cache"]
    assert stats["hit_tokens"] - before == 2 * (len(prompt) + 5) and stats["entries"] >= 2


def test_inflight_sampling_clients_follow_each_inflight_save(server, service):
    """``kind="inflight"``: every inflight client of a model samples with its latest inflight save;
    a snapshot client keeps its weights."""
    tc = service.create_lora_training_client(BASE, rank=RANK, seed=5).result()
    data = sft_batch(5, n=2)
    prompt = data[0].model_input
    first = tc.save_weights_and_get_sampling_client(kind="inflight").result()
    snapshot = tc.save_weights_and_get_sampling_client().result()
    before = first.compute_logprobs(prompt).result()
    assert snapshot.compute_logprobs(prompt).result() == pytest.approx(before, abs=1e-6)
    for _ in range(2):
        train_step(tc, data, lr=0.05)
    second = tc.save_weights_and_get_sampling_client(kind="inflight").result()
    after = second.compute_logprobs(prompt).result()
    assert not np.allclose(after[1:], before[1:], atol=1e-3)
    assert first.compute_logprobs(prompt).result() == pytest.approx(after, abs=1e-6)
    assert snapshot.compute_logprobs(prompt).result() == pytest.approx(before, abs=1e-6)


def test_full_finetune_through_the_sdk(server, service):
    """The extension: the SDK's own create call with user_metadata selects full fine-tuning."""
    tc = service.create_lora_training_client(
        BASE, rank=RANK, user_metadata={"jtinker_full_finetune": "true"}
    ).result()
    info = tc.get_info()
    assert info.is_lora is False and info.lora_rank is None
    data = sft_batch(7, n=2)
    losses = [train_step(tc, data, lr=0.01) for _ in range(5)]
    assert losses[-1] < 0.7 * losses[0], losses
    path = tc.save_weights_for_sampler("full").result().path
    sampler = service.create_sampling_client(model_path=path).result()
    snapshot = tc.save_weights_and_get_sampling_client().result()
    greedy = types.SamplingParams(max_tokens=4, temperature=0.0)
    prompt = types.ModelInput.from_ints(data[0].model_input.to_ints()[:4])
    a = sampler.sample(prompt, 1, greedy).result().sequences[0].tokens
    assert a == snapshot.sample(prompt, 1, greedy).result().sequences[0].tokens
    assert rest(server).get_weights_info_by_tinker_path(path).result().is_lora is False


def test_external_weights_download_with_the_tinker_cli(server, service, tmp_path):
    """``save_weights_external`` and signed URLs over the wire; ``tinker checkpoint download`` of a
    training checkpoint (its own route: load the state, export, download, delete) gets the same files."""
    tc = service.create_lora_training_client(BASE, rank=RANK, seed=5).result()
    train_step(tc, sft_batch(21))
    external = tc.save_weights_external("ext", ttl_seconds=3600).result().path
    assert external == f"tinker://{tc.model_id}/external_weights/ext"
    on_disk = {
        p.name: p.read_bytes()
        for p in (server.home / "runs" / tc.model_id / "external_weights" / "ext" / "files").iterdir()
    }
    listed = rest(server).get_external_weights_urls(external).result()
    assert sorted(listed.urls) == sorted(on_disk) == ["adapter_config.json", "adapter_model.safetensors"]
    for name, url in listed.urls.items():
        r = httpx.get(url, timeout=30)  # signed: no API key
        assert r.status_code == 200 and r.content == on_disk[name]
        tampered = url.replace("signature=", "signature=0")
        assert httpx.get(tampered, timeout=30).status_code == 403
    with pytest.raises(tinker.NotFoundError):  # another key cannot list them
        rest(server, KEY_B).get_external_weights_urls(external).result()
    with pytest.raises(tinker.TinkerError, match="already exists"):
        tc.save_weights_external("ext").result()
    tc.save_state("s").result()
    r = server.get(f"/api/v1/training_runs/{tc.model_id}/checkpoints/weights/s/external_weights_urls")
    assert r.status_code == 400 and "not an external weights checkpoint" in r.json()["detail"]

    state = tc.save_state("for-download").result().path
    env = {**os.environ, "TINKER_BASE_URL": server.url, "TINKER_API_KEY": KEY_A}
    cli = [sys.executable, "-m", "tinker.cli", "checkpoint", "download", state, "--output", str(tmp_path)]
    done = subprocess.run(cli, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    got = tmp_path / state.replace("tinker://", "").replace("/", "_")
    assert {p.name: p.read_bytes() for p in got.iterdir()} == on_disk  # the same adapter, the same bytes
    # The CLI deleted its temporary export.
    types_left = [
        c.checkpoint_type for c in rest(server).list_user_checkpoints(limit=1000).result().checkpoints
    ]
    assert types_left.count("external") == 1


def test_rest_listings(server, service):
    tc = service.create_lora_training_client(
        BASE, rank=RANK, seed=5, user_metadata={"purpose": "listing"}
    ).result()
    train_step(tc, sft_batch(5, n=2))
    state = tc.save_state("listed", user_metadata={"step": "1"}).result().path
    sampler_path = tc.save_weights_for_sampler("listed-sampler").result().path
    rc = rest(server)

    runs = rc.list_training_runs(limit=100).result()
    run = next(r for r in runs.training_runs if r.training_run_id == tc.model_id)
    assert run.base_model == BASE and run.is_lora and run.lora_rank == RANK
    assert run.user_metadata == {"purpose": "listing"}
    assert runs.cursor.total_count >= 1

    got = rc.get_training_run(tc.model_id).result()
    assert got.last_checkpoint.tinker_path == state
    assert got.last_sampler_checkpoint.tinker_path == sampler_path

    listed = rc.list_checkpoints(tc.model_id).result().checkpoints
    assert {c.tinker_path for c in listed} == {state, sampler_path}
    by_path = {c.tinker_path: c for c in listed}
    assert by_path[state].checkpoint_type == "training" and by_path[state].user_metadata == {"step": "1"}
    assert by_path[sampler_path].checkpoint_type == "sampler" and by_path[sampler_path].size_bytes > 0

    mine = rc.list_user_checkpoints().result().checkpoints
    assert {state, sampler_path} <= {c.tinker_path for c in mine}

    info = rc.get_weights_info_by_tinker_path(state).result()
    assert info.base_model == BASE and info.is_lora and info.lora_rank == RANK

    session_id = tc.model_id.split(":")[0]  # model ids are <session>:train:<n>, as on Tinker
    assert session_id in rc.list_sessions(limit=100).result().sessions
    assert tc.model_id in rc.get_session(session_id).result().training_run_ids

    rc.delete_checkpoint(tc.model_id, "sampler_weights/listed-sampler").result()
    assert {c.tinker_path for c in rc.list_checkpoints(tc.model_id).result().checkpoints} == {state}
    with pytest.raises(tinker.NotFoundError):
        rc.delete_checkpoint(tc.model_id, "sampler_weights/listed-sampler").result()


def test_checkpoints_expire_after_their_ttl(server, service):
    tc = service.create_lora_training_client(BASE, rank=RANK, seed=6).result()
    kept = tc.save_state("kept").result().path
    short = tc.save_state("short-lived", ttl_seconds=1).result().path
    rc = rest(server)
    listed = {c.tinker_path: c for c in rc.list_checkpoints(tc.model_id).result().checkpoints}
    assert listed[short].expires_at is not None and listed[kept].expires_at is None
    service.create_training_client_from_state(short).result()  # usable until it expires

    time.sleep(1.2)
    assert {c.tinker_path for c in rc.list_checkpoints(tc.model_id).result().checkpoints} == {kept}
    gone = r"expired|not found"  # "not found" once the sweeper has deleted it
    with pytest.raises(tinker.NotFoundError, match=gone):
        rc.get_weights_info_by_tinker_path(short).result()
    with pytest.raises((tinker.NotFoundError, tinker.RequestFailedError), match=gone):
        service.create_training_client_from_state(short).result()
    directory = server.home / "runs" / tc.model_id / "weights" / "short-lived"
    deadline = time.time() + 30
    while directory.exists() and time.time() < deadline:  # the sweeper deletes the files
        time.sleep(0.2)
    assert not directory.exists()
    service.create_training_client_from_state(kept).result()


def test_api_keys_cannot_see_each_other(server, service):
    tc = service.create_lora_training_client(BASE, rank=RANK, seed=6).result()
    path = tc.save_state("private").result().path
    other = rest(server, KEY_B)
    assert tc.model_id not in {
        r.training_run_id for r in other.list_training_runs(limit=100).result().training_runs
    }
    assert path not in {c.tinker_path for c in other.list_user_checkpoints().result().checkpoints}
    with pytest.raises(tinker.NotFoundError):
        other.get_training_run(tc.model_id).result()
    with pytest.raises(tinker.NotFoundError):
        other.list_checkpoints(tc.model_id).result()
    with pytest.raises(tinker.NotFoundError):
        other.get_weights_info_by_tinker_path(path).result()
    with pytest.raises(tinker.NotFoundError):
        other.delete_checkpoint(tc.model_id, "weights/private").result()
    service_b = tinker.ServiceClient(base_url=server.url, api_key=KEY_B)
    with pytest.raises(tinker.NotFoundError):
        service_b.create_training_client_from_state(path).result()
    with pytest.raises(tinker.NotFoundError):
        service_b.create_sampling_client(model_path=path).result()
    # B's own runs stay B's.
    tc_b = service_b.create_lora_training_client(BASE, rank=RANK, seed=6).result()
    assert tc_b.model_id in {
        r.training_run_id for r in other.list_training_runs(limit=100).result().training_runs
    }
    assert tc_b.model_id not in {
        r.training_run_id for r in rest(server).list_training_runs(limit=100).result().training_runs
    }
    assert rest(server).get_weights_info_by_tinker_path(path).result().lora_rank == RANK


def test_bad_inputs_get_clear_errors(server, service):
    # Authentication and protocol errors, on the wire.
    r = server.post("/api/v1/create_session", key=None, json={})
    assert r.status_code == 401 and "missing API key" in r.json()["detail"]
    r = server.post("/api/v1/create_session", key="tml-not-a-valid-key-x", json={})
    assert r.status_code == 401 and "invalid API key" in r.json()["detail"]
    r = server.post("/api/v1/create_session", headers={"X-Stainless-Package-Version": "0.1.0"}, json={})
    assert r.status_code == 400 and "not supported" in r.json()["detail"]
    r = server.post("/api/v1/create_session", content=b"{not json")
    assert r.status_code == 400 and "not valid JSON" in r.json()["detail"]
    r = server.post(
        "/api/v1/forward_backward",
        content=b"\xff\x00garbage",
        headers={"Content-Type": "application/x-protobuf"},
    )
    assert r.status_code == 400 and "protobuf" in r.json()["detail"]
    r = server.post(
        "/api/v1/forward_backward",
        content=b"\x28\xb5\x2f\xfdnot zstd",
        headers={"Content-Type": "application/x-protobuf", "Content-Encoding": "zstd"},
    )
    assert r.status_code == 400 and "zstd" in r.json()["detail"]
    r = server.post("/api/v1/asample", content=b"x" * (5 * 1024 * 1024))
    assert r.status_code == 413 and "limit" in r.json()["detail"]
    bomb = zstandard.ZstdCompressor().compress(b"\0" * (6 * 1024 * 1024))
    r = server.post(
        "/api/v1/forward_backward",
        content=bomb,
        headers={"Content-Type": "application/x-protobuf", "Content-Encoding": "zstd"},
    )
    assert r.status_code == 413
    r = server.post("/api/v1/optim_step", json={"model_id": "nope:train:0", "seq_id": 1, "adam_params": {}})
    assert r.status_code == 404 and "unknown model_id" in r.json()["detail"]
    r = server.post("/api/v1/retrieve_future", json={"request_id": "does-not-exist"})
    assert r.status_code == 404
    r = server.post("/api/v1/no_such_route", json={})
    assert r.status_code == 404 and "/api/v1/no_such_route" in r.json()["detail"]
    assert server.get("/api/v1/create_model").status_code == 405

    # Bad data through the SDK: a RequestFailedError (category user), never a hang or a retry loop.
    tc = service.create_lora_training_client(BASE, rank=RANK, seed=8).result()
    good = sft_batch(8, n=2)
    bad_tokens = [
        types.Datum(
            model_input=types.ModelInput.from_ints([1, 2, 100_000]),
            loss_fn_inputs={"target_tokens": [2, 3, 4], "weights": [1.0, 1.0, 1.0]},
        )
    ]
    with pytest.raises(tinker.RequestFailedError, match="token ids must be in") as err:
        tc.forward_backward(bad_tokens, "cross_entropy").result()
    assert err.value.category == types.RequestErrorCategory.User
    nan_weights = [
        types.Datum(
            model_input=types.ModelInput.from_ints([1, 2, 3]),
            loss_fn_inputs={"target_tokens": [2, 3, 4], "weights": [1.0, float("nan"), 1.0]},
        )
    ]
    with pytest.raises(tinker.RequestFailedError, match="NaN"):
        tc.forward_backward(nan_weights, "cross_entropy").result()
    with pytest.raises(tinker.RequestFailedError, match="learning_rate"):
        tc.optim_step(types.AdamParams(learning_rate=float("nan"))).result()
    with pytest.raises(tinker.RequestFailedError, match="no_such_loss"):
        tc.forward_backward(good, "no_such_loss").result()
    assert np.isfinite(train_step(tc, good))  # the failed requests did not stall the seq_id order

    sampler = tc.save_weights_and_get_sampling_client().result()
    with pytest.raises(tinker.RequestFailedError, match="outside"):
        sampler.sample(
            types.ModelInput.from_ints([1, 99_999]), 1, types.SamplingParams(max_tokens=2)
        ).result()
    stability = tc.save_weights_and_get_sampling_client(record_stability_info=True).result()
    with pytest.raises(tinker.BadRequestError, match="record_stability_info: not supported"):
        stability.sample(
            types.ModelInput.from_ints([1, 2, 3]), 1, types.SamplingParams(max_tokens=2)
        ).result()
    assert server.alive()


def test_concurrent_clients_do_not_cross(server):
    """Four clients train at once (their steps batched together), then sample at once (one batch,
    a stacked LoRA): each gets its own adapter's behaviour back."""
    targets = [11, 47, 83, 131]
    prompt = [2, 9, 4, 30, 7]
    results: dict[int, np.ndarray] = {}
    sampled: dict[int, list[int]] = {}
    errors: list[BaseException] = []
    together = threading.Barrier(4, timeout=120)
    before = server.get("/status").json()["base_models"][0]

    def worker(i: int) -> None:
        try:
            sc = tinker.ServiceClient(base_url=server.url, api_key=KEY_A)
            tc = sc.create_lora_training_client(BASE, rank=RANK, seed=20 + i).result()
            data = [
                types.Datum(
                    model_input=types.ModelInput.from_ints(prompt),
                    loss_fn_inputs={
                        "target_tokens": [targets[i]] * len(prompt),
                        "weights": [1.0] * len(prompt),
                    },
                )
            ]
            for _ in range(6):
                train_step(tc, data, lr=0.05)
            probes = [
                types.Datum(
                    model_input=types.ModelInput.from_ints(prompt),
                    loss_fn_inputs={"target_tokens": [t] * len(prompt), "weights": [1.0] * len(prompt)},
                )
                for t in targets
            ]
            results[i] = np.array([lp.mean() for lp in forward_logprobs(tc, probes)])
            sampler = tc.save_weights_and_get_sampling_client(f"cross-{i}").result()
            greedy = types.SamplingParams(max_tokens=3, temperature=0.0)
            together.wait()
            sample = sampler.sample(types.ModelInput.from_ints(prompt), 1, greedy).result()
            sampled[i] = list(sample.sequences[0].tokens)
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    for i in range(4):
        assert int(np.argmax(results[i])) == i, (i, results[i])
        assert sampled[i] == [targets[i]] * 3, (i, sampled[i])
    after = server.get("/status").json()["base_models"][0]
    assert after["sample_requests"] - before["sample_requests"] == 4
    # Batched over HTTP: fewer batches than requests. How they split depends on when the requests land
    # on a loaded machine; test_multi_adapter pins the grouping down.
    assert after["sample_batches"] - before["sample_batches"] < 4


def test_restart_resumes_from_saved_state(server, service):
    tc = service.create_lora_training_client(BASE, rank=RANK, seed=9).result()
    data = sft_batch(9, n=2)
    for _ in range(2):
        train_step(tc, data)
    path = tc.save_state("before-restart").result().path
    train_step(tc, data)
    expected = forward_logprobs(tc, data)

    # A request stuck behind a seq_id gap: its future belongs to the process about to die.
    r = server.post(
        "/api/v1/optim_step",
        json={"model_id": tc.model_id, "seq_id": 5000, "adam_params": {"learning_rate": 0.01}},
    )
    assert r.status_code == 200
    orphan = r.json()["request_id"]
    pending = server.post("/api/v1/retrieve_future", json={"request_id": orphan})
    assert pending.status_code == 408 and pending.json()["type"] == "try_again"

    server.restart()

    assert path in {c.tinker_path for c in rest(server).list_checkpoints(tc.model_id).result().checkpoints}
    lost = server.post("/api/v1/retrieve_future", json={"request_id": orphan}).json()
    assert lost["category"] == "server" and "lost" in lost["error"]
    with pytest.raises(tinker.NotFoundError, match="not loaded"):
        tc.forward(data, "cross_entropy").result()

    fresh = tinker.ServiceClient(base_url=server.url, api_key=KEY_A)
    resumed = fresh.create_training_client_from_state_with_optimizer(path).result()
    train_step(resumed, data)
    for x, y in zip(forward_logprobs(resumed, data), expected, strict=True):
        np.testing.assert_allclose(x, y, atol=1e-6)
    assert server.alive()


def test_concurrent_models_share_one_step(server, service):
    """forward_backward of four models waiting together runs as one jitted step, and each model gets
    its own outputs: the logprobs a later forward (same weights) returns."""
    clients = [service.create_lora_training_client(BASE, rank=RANK, seed=70 + i).result() for i in range(4)]
    datas = [sft_batch(70 + i, n=2, length=37) for i in range(4)]  # a new length bucket: a compile
    before = server.get("/status").json()["base_models"][0]
    futures = [tc.forward_backward(d, "cross_entropy") for tc, d in zip(clients, datas, strict=True)]
    results = [f.result() for f in futures]
    after = server.get("/status").json()["base_models"][0]
    assert after["loss_requests"] - before["loss_requests"] == 4
    # The first request may start alone; the rest queue behind its compile and run together.
    assert after["loss_steps"] - before["loss_steps"] <= 2
    for tc, data, result in zip(clients, datas, results, strict=True):
        got = [np.asarray(o["logprobs"].data, np.float32) for o in result.loss_fn_outputs]
        for x, y in zip(got, forward_logprobs(tc, data), strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# The metadata database: one set of queries on SQLite and PostgreSQL


def _pg_bin(name: str) -> str | None:
    import glob
    import shutil

    found = shutil.which(name)
    if found:
        return found
    versions = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return versions[-1] if versions else None


@pytest.fixture(scope="module")
def postgres():
    """A throwaway PostgreSQL cluster on 127.0.0.1; yields ``new_db() -> url``. Skipped only when
    the PostgreSQL server binaries are not installed."""
    import pwd
    import shutil
    import tempfile

    pytest.importorskip("psycopg")
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if initdb is None or pg_ctl is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
    user = None
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        for name in ("postgres", "nobody"):
            try:
                user = pwd.getpwnam(name)
                break
            except KeyError:
                continue
    root = Path(tempfile.mkdtemp(prefix="jtinker-pg-"))
    if user is not None:
        os.chown(root, user.pw_uid, user.pw_gid)
    port = _free_port()
    run = {"user": user.pw_uid, "group": user.pw_gid} if user is not None else {}
    data = root / "data"
    subprocess.run(
        [initdb, "-D", str(data), "-U", "postgres", "-A", "trust", "--no-sync"],
        check=True, capture_output=True, **run,
    )  # fmt: skip
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run(
        [pg_ctl, "-D", str(data), "-o", options, "-l", str(root / "log"), "-w", "start"],
        check=True, capture_output=True, **run,
    )  # fmt: skip
    import psycopg

    admin = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    counter = iter(range(1000))

    def new_db() -> str:
        name = f"jtinker_{next(counter)}"
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return f"postgresql://postgres@127.0.0.1:{port}/{name}"

    yield new_db
    subprocess.run([pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True, **run)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/meta.db"
    return request.getfixturevalue("postgres")()


def test_database_queries_on_both_backends(db_url, tmp_path):
    from jtinker.server.state.db import open_database

    db = open_database(db_url, tmp_path)
    assert db.dialect.name == db_url.split(":")[0]
    db.add_session("s1", "alice", "0.38.0", {"k": "v"}, "run one", "inst-0")
    db.add_session("s2", "bob", None, None, None, "inst-0")
    assert db.session("s1")["user_metadata"] == {"k": "v"} and db.session("nope") is None
    assert db.sessions_of("alice", 10, 0) == (["s1"], 1)
    assert set(db.stale_sessions(time.time() + 1)) == {"s1", "s2"}
    db.heartbeat("s1")
    db.finish_session("s2", "user")
    db.finish_session("s2", "again")  # only the first finish counts
    assert db.session("s2")["finish_reason"] == "user"
    assert db.stale_sessions(time.time() + 1) == ["s1"]

    lora = {"rank": 8, "train_mlp": True, "train_attn": False, "train_unembed": True}
    db.add_run("r1", "alice", "s1", "tiny", lora, {"x": "1"}, "inst-0")
    db.mark_run_corrupted("r1")
    db.add_run("r1", "alice", "s1", "tiny", {**lora, "rank": 16}, None, "inst-0")  # an upsert
    run = db.run("r1")
    assert run["lora_rank"] == 16 and run["train_attn"] == 0 and not run["corrupted"]
    assert run["user_metadata"] is None and isinstance(run["created_at"], float)
    assert abs(run["created_at"] - time.time()) < 60  # timestamps keep full precision
    db.add_run("r2", "alice", "s1", "tiny", lora, None, "inst-0")
    db.touch_run("r2")
    rows, total = db.runs_of("alice", limit=1)
    assert total == 2 and len(rows) == 1
    assert db.run_ids_of_session("s1") == ["r1", "r2"] and db.runs_of("bob") == ([], 0)

    path = "tinker://r1/weights/a"
    db.add_checkpoint(path, "r1", "alice", {"step": "1"}, None)
    db.add_checkpoint(path, "r1", "alice", {"step": "2"}, 60)  # upsert: new metadata and TTL
    row = db.checkpoint_rows("r1")[path]
    assert row["user_metadata"] == {"step": "2"} and row["expires_at"] > time.time()
    assert db.expired_checkpoints(time.time()) == [] and db.expired_checkpoints(time.time() + 61) == [path]
    db.delete_checkpoint(path)
    assert db.checkpoint_rows("r1") == {}

    db.add_sampler("sa", "alice", "s1", "tiny", None, "inst-0")
    db.add_sampler("sa", "alice", "s1", "tiny", "tinker://r1/sampler_weights/x", "inst-0")
    assert db.sampler("sa")["model_path"] == "tinker://r1/sampler_weights/x"
    assert db.sampler_ids_of_session("s1") == ["sa"]

    db.add_future("f1", "alice", "OptimStep", "r1", "inst-0")
    db.add_future("f2", "alice", "Sample", None, "inst-0")
    db.add_future("f3", "alice", "Sample", None, "inst-1")
    db.finish_future("f1", result={"metrics": {"loss:sum": 1.5}})
    db.finish_future("f2", error="bad input", category="user")
    assert db.future("f1")["result_json"] == {"metrics": {"loss:sum": 1.5}}
    assert db.future("f2")["status"] == "failed" and db.future("f2")["category"] == "user"
    assert db.fail_orphaned_futures("inst-1", "lost") == 0  # f3 belongs to the live instance
    assert db.fail_orphaned_futures("inst-2", "lost") == 1
    assert db.future("f3")["error"] == "lost"
    assert db.future_counts() == {"complete": 1, "failed": 2}
    db.prune_futures(older_than_s=-60)
    assert db.future_counts() == {}
    db.close()

    again = open_database(db_url, tmp_path)  # the schema exists: opening again changes nothing
    assert again.run("r2")["owner"] == "alice"
    again.close()


def test_database_dialect_layer():
    from jtinker.server.state import db as dbmod

    pg = dbmod.PostgresDialect("postgresql+psycopg://me:s3cret@db.internal:5433/meta")
    assert pg.url == "postgresql://me:s3cret@db.internal:5433/meta"
    assert "s3cret" not in pg.location and pg.location == "postgresql://me:***@db.internal:5433/meta"
    assert pg.sql("SELECT * FROM t WHERE a=? AND b='?' AND c=?") == (
        "SELECT * FROM t WHERE a=%s AND b='?' AND c=%s"
    )
    assert dbmod.SqliteDialect(Path("x.db")).sql("a=?") == "a=?"
    with pytest.raises(ValueError, match="unsupported URL"):
        dbmod.open_database("mysql://x", Path("."))


def test_postgres_url_without_psycopg_names_the_fix(monkeypatch, tmp_path):
    from jtinker.server.state.db import open_database

    monkeypatch.setitem(sys.modules, "psycopg", None)  # as if it were not installed
    with pytest.raises(ValueError, match=r"psycopg.*pip install 'jtinker\[postgres\]'"):
        open_database("postgresql://localhost/meta", tmp_path)


def test_server_on_postgres(postgres, tmp_path_factory, qwen3_dir):
    """``jtinker serve --db postgresql://...``: runs and checkpoints are recorded in PostgreSQL."""
    import psycopg

    url = postgres()
    proc = ServerProcess(tmp_path_factory.mktemp("pg_home"), qwen3_dir, ("--db", url))
    proc.start()
    try:
        service = tinker.ServiceClient(base_url=proc.url, api_key=KEY_A)
        tc = service.create_lora_training_client(BASE, rank=RANK, seed=9).result()
        train_step(tc, sft_batch(9, n=2))
        state = tc.save_state("on-pg").result().path
        runs = rest(proc).list_training_runs().result().training_runs
        assert [r.training_run_id for r in runs] == [tc.model_id]
        with psycopg.connect(url) as conn:
            owner, base = conn.execute("SELECT owner, base_model FROM runs").fetchone()
            paths = [r[0] for r in conn.execute("SELECT tinker_path FROM checkpoints").fetchall()]
        assert base == BASE and owner and paths == [state]
    finally:
        proc.stop()
