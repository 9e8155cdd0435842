"""The in-process Tinker API: ``import jtinker as tinker`` runs scripts written for the SDK.

Clients are thin: they validate arguments, turn Tinker types into engine calls, submit them to the
base model's worker and hand back futures. Calls on one training client run in submission order,
so ``forward_backward`` may be submitted before the previous ``optim_step`` finishes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import math
import os
import time
import uuid
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jtinker import loss_handles, registry, sharding, train, types
from jtinker.checkpoints import EXTERNAL, CheckpointPath, CheckpointStore, new_run_id, validate_name
from jtinker.engine import (
    Adapter,
    BaseModel,
    FullSpec,
    LoraSpec,
    differentiate,
    get_base_model,
    lora_from_checkpoint,
)
from jtinker.loss_handles import LossHandle, PerDatumLossFn
from jtinker.models.config import ModelConfig
from jtinker.sampling import SampleRequest, SampleResult

if TYPE_CHECKING:
    from jtinker.rest import RestClient

log = logging.getLogger("jtinker")
T = TypeVar("T")


class APIFuture(Generic[T]):
    """Tinker's future: ``.result(timeout)``, ``await fut`` or ``await fut.result_async()``."""

    def __init__(self, future: concurrent.futures.Future):
        self._future = future

    def result(self, timeout: float | None = None) -> T:
        try:
            return self._future.result(timeout)
        except concurrent.futures.TimeoutError as e:
            raise TimeoutError(f"request did not finish within {timeout} s") from e

    async def result_async(self, timeout: float | None = None) -> T:
        return await asyncio.wait_for(asyncio.wrap_future(self._future), timeout)

    def __await__(self):
        return self.result_async().__await__()

    def done(self) -> bool:
        return self._future.done()

    def future(self) -> concurrent.futures.Future:
        return self._future


def _resolved(value: T) -> APIFuture[T]:
    """An ``APIFuture`` that is already done (work that ran at once, in the caller)."""
    done: concurrent.futures.Future = concurrent.futures.Future()
    done.set_result(value)
    return APIFuture(done)


class _ResolvedClient:
    """SDK 0.38's client-creating calls return a future of the client that also acts as the client.
    Here the client is ready at once, so it is its own future: ``.result()`` and ``await`` give it."""

    def result(self, timeout: float | None = None):
        return self

    async def result_async(self, timeout: float | None = None):
        return self

    def __await__(self):
        return self.result_async().__await__()

    def done(self) -> bool:
        return True


def _check_user_metadata(value: Any, field: str = "user_metadata") -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ValueError(f"{field}: must be a dict of str to str, got {value!r}")
    return dict(value)


def _expires_at(ttl_seconds: Any) -> float | None:
    """The Unix time a checkpoint saved now with ``ttl_seconds`` expires (None: never)."""
    if ttl_seconds is None:
        return None
    if not isinstance(ttl_seconds, int) or isinstance(ttl_seconds, bool) or ttl_seconds <= 0:
        raise ValueError(f"ttl_seconds: must be a positive int or None, got {ttl_seconds!r}")
    return time.time() + ttl_seconds


def _check_optimizer(optimizer: Any) -> None:
    if optimizer is not None and getattr(optimizer, "type", None) != "adamw":
        raise ValueError(f"optimizer: only AdamW (types.AdamOptimizerConfig) is supported, got {optimizer!r}")


STABILITY_INFO_UNSUPPORTED = (
    "record_stability_info: not supported by jtinker (it serves loss_fn='stable_reinforce', which Tinker "
    "does not define publicly; for off-policy data train with 'ppo' or 'gspo')"
)


def _reject_stability_info(record_stability_info: bool) -> None:
    """A clear error naming the field, never a silent no-op."""
    if record_stability_info:
        raise ValueError(STABILITY_INFO_UNSUPPORTED)


def _adam_hyperparams(adam_params: types.AdamParams) -> train.AdamHyperparams:
    fields = {
        "learning_rate": adam_params.learning_rate,
        "beta1": adam_params.beta1,
        "beta2": adam_params.beta2,
        "eps": adam_params.eps,
        "weight_decay": adam_params.weight_decay,
        "grad_clip_norm": adam_params.grad_clip_norm,
    }
    for name, value in fields.items():
        if not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"adam_params.{name}: must be a finite number, got {value!r}")
    if fields["learning_rate"] < 0:
        raise ValueError("adam_params.learning_rate: must be >= 0")
    for name in ("beta1", "beta2"):
        if not 0 <= fields[name] < 1:
            raise ValueError(f"adam_params.{name}: must be in [0, 1)")
    for name in ("eps", "weight_decay", "grad_clip_norm"):
        if fields[name] < 0:
            raise ValueError(f"adam_params.{name}: must be >= 0")
    return train.AdamHyperparams.create(**fields)


def _forward_backward_output(
    outputs: list[dict[str, np.ndarray]], metrics: dict
) -> types.ForwardBackwardOutput:
    return types.ForwardBackwardOutput(
        loss_fn_output_type="TensorData",
        loss_fn_outputs=[{k: types.TensorData.from_numpy(v) for k, v in out.items()} for out in outputs],
        metrics=metrics,
    )


def _chain(future: concurrent.futures.Future, then: Callable[[Any], Any]) -> concurrent.futures.Future:
    """A future for ``then(future.result())`` that never blocks a thread while waiting."""
    out: concurrent.futures.Future = concurrent.futures.Future()

    def done(f: concurrent.futures.Future) -> None:
        try:
            value = then(f.result())
        except BaseException as e:
            out.set_exception(e)
            return
        if isinstance(value, concurrent.futures.Future):
            value.add_done_callback(lambda g: _settle(out, g))
        else:
            out.set_result(value)

    future.add_done_callback(done)
    return out


def _settle(out: concurrent.futures.Future, inner: concurrent.futures.Future) -> None:
    if inner.exception() is not None:
        out.set_exception(inner.exception())
    else:
        out.set_result(inner.result())


def _copy_tree(tree):
    """A device copy, so later donation of the training buffers cannot invalidate it."""
    return jax.tree.map(jnp.copy, tree)


class TrainingClient(_ResolvedClient):
    """One LoRA being trained on a shared base model (Tinker's ``TrainingClient``)."""

    def __init__(
        self, service: ServiceClient, adapter: Adapter, model_id: str, user_metadata: dict | None = None
    ):
        self._service = service
        self._adapter = adapter
        self.model_id = model_id
        self.user_metadata = user_metadata  # the run's, kept in each of its checkpoints
        self.created = time.time()
        self._inflight: InflightWeights | None = None

    @property
    def _base(self) -> BaseModel:
        return self._adapter.base

    def _submit(self, fn: Callable[[], Any]) -> APIFuture:
        # Tagged with this adapter: other clients' loss requests may run alongside, never this one's.
        return APIFuture(self._base.worker.submit(fn, adapter=self._adapter))

    # -- forward / backward -------------------------------------------------------------------
    def forward(
        self,
        data: list[types.Datum],
        loss_fn: types.LossFnType,
        loss_fn_config: dict[str, float] | None = None,
    ) -> APIFuture[types.ForwardBackwardOutput]:
        """The loss and per-token logprobs, without gradients."""
        return self._run_loss(data, loss_fn, loss_fn_config, backward=False)

    def _run_loss(self, data, loss_fn, loss_fn_config, *, backward: bool) -> APIFuture:
        # The worker batches loss requests of several adapters that arrive together into one step.
        future = self._base.worker.submit_loss(
            self._adapter, data, loss_fn, loss_fn_config, backward=backward
        )
        return APIFuture(_chain(future, lambda result: _forward_backward_output(*result)))

    def forward_backward(
        self,
        data: list[types.Datum],
        loss_fn: types.LossFnType,
        loss_fn_config: dict[str, float] | None = None,
    ) -> APIFuture[types.ForwardBackwardOutput]:
        """Computes the loss and adds its gradient to the accumulator (applied by ``optim_step``)."""
        return self._run_loss(data, loss_fn, loss_fn_config, backward=True)

    def forward_backward_custom(
        self, data: list[types.Datum], loss_fn: Callable | LossHandle, *, loss_type_input: str = "logprobs"
    ) -> APIFuture[types.ForwardBackwardOutput]:
        """``loss_fn(data, values_list) -> (loss, metrics)``, a JAX function, in one forward pass.

        ``values_list[i]`` is datum i's target logprobs ``[N]`` (Tinker's contract), or with
        ``loss_type_input="logits"`` its full f32 logits ``[N, V]`` (beyond Tinker: top-k,
        entropy or fixed-token-set losses). Unlike Tinker there is no second forward pass.
        ``loss_fn`` may also be a :class:`LossHandle` from ``ServiceClient.create_custom_loss``
        (a per-datum torch loss, run as JAX).
        """
        if loss_type_input not in ("logprobs", "logits"):
            raise ValueError(f"loss_type_input: must be 'logprobs' or 'logits', got {loss_type_input!r}")
        if isinstance(loss_fn, LossHandle):
            if loss_type_input != "logprobs":
                raise ValueError("loss_type_input: a LossHandle takes logprobs")
            loss_fn.check_data(data)  # before anything is queued: a rejected call accumulates nothing
            value_and_grad = loss_fn.value_and_grad
        else:
            value_and_grad = differentiate(loss_fn)
        return self._submit(
            lambda: _forward_backward_output(
                *self._adapter.forward_backward_custom(data, value_and_grad, loss_type_input)
            )
        )

    def optim_step(
        self, optim_params: types.AdamParams | None = None, *, adam_params: types.AdamParams | None = None
    ) -> APIFuture[types.OptimStepResponse]:
        """AdamW with this call's hyperparameters (``optim_step(types.AdamParams(...))``)."""
        params = optim_params if optim_params is not None else adam_params
        if not isinstance(params, types.AdamParams):
            raise ValueError(f"adam_params: expected types.AdamParams, got {type(params).__name__}")
        hparams = _adam_hyperparams(params)
        return self._submit(lambda: types.OptimStepResponse(metrics=self._adapter.optim_step(hparams)))

    # -- info ---------------------------------------------------------------------------------
    def get_info(self) -> types.GetInfoResponse:
        spec = self._adapter.spec
        return types.GetInfoResponse(
            type="get_info",
            model_data=types.ModelData(
                arch=self._base.config.model_type, model_name=self._base.name, tokenizer_id=self._base.name
            ),
            model_id=self.model_id,
            is_lora=not self._adapter.is_full,
            lora_rank=None if self._adapter.is_full else spec.rank,
            model_name=self._base.name,
        )

    def get_tokenizer(self):
        return self._base.tokenizer

    # -- checkpoints --------------------------------------------------------------------------
    def _save(
        self, name: str, kind: str, write: Callable[..., Any], *, ttl_seconds, user_metadata
    ) -> APIFuture:
        """``write(adapter, store, path, metadata=...)`` (an :class:`Adapter` save) runs on the worker in
        request order; the future resolves to the path once the checkpoint is durable."""
        path = CheckpointPath(self.model_id, kind, validate_name(name))
        metadata = {
            "expires_at": _expires_at(ttl_seconds),
            "user_metadata": _check_user_metadata(user_metadata),
            "run_user_metadata": self.user_metadata,
        }
        store = self._service.store
        saving = self._base.worker.submit(
            lambda: write(self._adapter, store, path, metadata=metadata), adapter=self._adapter
        )
        return APIFuture(_chain(saving, lambda written: written))  # resolves once durable

    def save_state(
        self,
        name: str,
        ttl_seconds: int | None = None,
        overwrite: bool = False,
        user_metadata: dict[str, str] | None = None,
    ) -> APIFuture[types.SaveWeightsResponse]:
        """LoRA weights, Adam state and step, at ``tinker://<model_id>/weights/<name>``; after
        ``ttl_seconds`` the checkpoint is gone (reads and listings delete it)."""
        write = functools.partial(Adapter.save, with_optimizer=True, overwrite=overwrite)
        fut = self._save(name, "weights", write, ttl_seconds=ttl_seconds, user_metadata=user_metadata)
        return APIFuture(_chain(fut.future(), lambda path: types.SaveWeightsResponse(path=path)))

    def save_weights_for_sampler(
        self,
        name: str,
        ttl_seconds: int | None = None,
        user_metadata: dict[str, str] | None = None,
        *,
        overwrite: bool = False,
    ) -> APIFuture[types.SaveWeightsForSamplerResponse]:
        """LoRA weights only (cheaper), at ``tinker://<model_id>/sampler_weights/<name>``."""
        write = functools.partial(Adapter.save, with_optimizer=False, overwrite=overwrite)
        fut = self._save(name, "sampler_weights", write, ttl_seconds=ttl_seconds, user_metadata=user_metadata)
        return APIFuture(_chain(fut.future(), lambda path: types.SaveWeightsForSamplerResponse(path=path)))

    def save_weights_external(
        self, name: str, ttl_seconds: int | None = None, age_encryption_recipients: list[str] | None = None
    ) -> APIFuture[types.SaveWeightsExternalResponse]:
        """The weights as Hugging Face files at ``tinker://<model_id>/external_weights/<name>``: a PEFT
        adapter, or a merged model for a full fine-tune. With ``age_encryption_recipients`` (``age1...``
        keys or SSH public keys, at most 10) every file is age-encrypted to them as ``<file>.age``.
        ``RestClient.get_external_weights_urls`` lists them; ``tinker checkpoint download`` fetches them."""
        from jtinker.export import age_recipients

        recipients = age_recipients(age_encryption_recipients) if age_encryption_recipients else None
        write = functools.partial(Adapter.save_external, overwrite=False, age_recipients=recipients)
        fut = self._save(name, EXTERNAL, write, ttl_seconds=ttl_seconds, user_metadata=None)
        return APIFuture(_chain(fut.future(), lambda path: types.SaveWeightsExternalResponse(path=path)))

    def load_state(
        self, path: str, weights_access_token: str | None = None
    ) -> APIFuture[types.LoadWeightsResponse]:
        """Loads weights only; the Adam state starts fresh."""
        del weights_access_token
        return self._load(path, with_optimizer=False)

    def load_state_with_optimizer(
        self, path: str, weights_access_token: str | None = None
    ) -> APIFuture[types.LoadWeightsResponse]:
        """Loads weights and Adam state: training resumes bit-identically."""
        del weights_access_token
        return self._load(path, with_optimizer=True)

    def _load(self, path: str, *, with_optimizer: bool) -> APIFuture[types.LoadWeightsResponse]:
        def load() -> types.LoadWeightsResponse:
            self._adapter.load(self._service.store, path, with_optimizer=with_optimizer)
            return types.LoadWeightsResponse(path=path, model_id=self.model_id)

        return self._submit(load)

    def create_sampling_client(
        self, model_path: str, retry_config: Any = None, record_stability_info: bool = False
    ) -> SamplingClient:
        return self._service.create_sampling_client(
            model_path=model_path, retry_config=retry_config, record_stability_info=record_stability_info
        )

    # -- sampling -----------------------------------------------------------------------------
    def save_weights_and_get_sampling_client(
        self,
        name: str | None = None,
        retry_config: Any = None,
        record_stability_info: bool = False,
        kind: str = "snapshot",
    ) -> SamplingClient:
        """A sampling client over a snapshot of the current adapter (taken in request order)."""
        del name, retry_config  # Tinker ignores the name: the snapshot is ephemeral
        _reject_stability_info(record_stability_info)
        return self.snapshot_sampling_client(kind).result()

    def snapshot_sampling_client(self, kind: str = "snapshot") -> APIFuture[SamplingClient]:
        """Non-blocking form of ``save_weights_and_get_sampling_client``: the snapshot is taken in
        request order, after everything submitted before it (the HTTP server needs this form).

        ``kind="inflight"`` publishes the snapshot to this client's inflight weights, which every
        inflight sampling client of it (earlier ones too) samples with from then on.
        """
        if kind not in ("snapshot", "inflight"):
            raise ValueError(f"kind: must be 'snapshot' or 'inflight', got {kind!r}")
        snapshot = self._submit(lambda: _copy_tree(self._adapter.lora))

        def client(lora) -> SamplingClient:
            if kind == "snapshot":
                return SamplingClient(self._base, lora)
            if self._inflight is None:
                self._inflight = InflightWeights(lora)
            self._inflight.lora = lora
            return SamplingClient(self._base, self._inflight)

        return APIFuture(_chain(snapshot.future(), client))

    async def save_weights_and_get_sampling_client_async(
        self, name=None, retry_config=None, record_stability_info=False, kind="snapshot"
    ) -> SamplingClient:
        return self.save_weights_and_get_sampling_client(name, retry_config, record_stability_info, kind)

    # -- async forms (Tinker's two-await contract: the first await submits) ---------------------
    async def forward_async(self, data, loss_fn, loss_fn_config=None) -> APIFuture:
        return self.forward(data, loss_fn, loss_fn_config)

    async def forward_backward_async(self, data, loss_fn, loss_fn_config=None) -> APIFuture:
        return self.forward_backward(data, loss_fn, loss_fn_config)

    async def forward_backward_custom_async(self, data, loss_fn, *, loss_type_input="logprobs") -> APIFuture:
        return self.forward_backward_custom(data, loss_fn, loss_type_input=loss_type_input)

    async def optim_step_async(self, optim_params=None, *, adam_params=None) -> APIFuture:
        return self.optim_step(optim_params, adam_params=adam_params)

    async def get_info_async(self) -> types.GetInfoResponse:
        return self.get_info()

    async def save_state_async(
        self, name, ttl_seconds=None, overwrite=False, user_metadata=None
    ) -> APIFuture:
        return self.save_state(name, ttl_seconds, overwrite, user_metadata)

    async def save_weights_for_sampler_async(
        self, name, ttl_seconds=None, user_metadata=None, *, overwrite=False
    ) -> APIFuture:
        return self.save_weights_for_sampler(name, ttl_seconds, user_metadata, overwrite=overwrite)

    async def save_weights_external_async(
        self, name, ttl_seconds=None, age_encryption_recipients=None
    ) -> APIFuture:
        return self.save_weights_external(name, ttl_seconds, age_encryption_recipients)

    async def load_state_async(self, path, weights_access_token=None) -> APIFuture:
        return self.load_state(path, weights_access_token)

    async def load_state_with_optimizer_async(self, path, weights_access_token=None) -> APIFuture:
        return self.load_state_with_optimizer(path, weights_access_token)

    async def create_sampling_client_async(
        self, model_path, retry_config=None, record_stability_info=False
    ) -> SamplingClient:
        return self.create_sampling_client(model_path, retry_config, record_stability_info)


def _sample_request(
    prompt: types.ModelInput,
    num_samples: int,
    sampling_params: types.SamplingParams,
    include_prompt_logprobs: bool,
    topk_prompt_logprobs: int,
    target_prompt_logprobs: types.TensorData | None = None,
    topk_sample_logprobs: int = 0,
    prompt_alt_tokens_k: int = 0,
    eos_token_ids: tuple[int, ...] = (),
) -> SampleRequest:
    """``stop=None`` stops at the model's EOS tokens, as Tinker does; a stop list replaces them (``[]``:
    no stop at all)."""
    stop = sampling_params.stop
    stop_strings: tuple[str, ...] = ()
    stop_tokens: tuple[int, ...] = eos_token_ids if stop is None else ()
    if isinstance(stop, str):
        stop_strings = (stop,)
    elif stop:
        items = list(stop)
        if all(isinstance(s, str) for s in items):
            stop_strings = tuple(items)
        elif all(isinstance(s, int | np.integer) for s in items):
            stop_tokens = tuple(int(s) for s in items)
        else:
            raise ValueError(
                "sampling_params.stop: must be a string, a list of strings or a list of token ids"
            )
    if sampling_params.max_tokens is None:
        raise ValueError("sampling_params.max_tokens: required")
    target_ids = None
    if target_prompt_logprobs is not None:
        if not isinstance(target_prompt_logprobs, types.TensorData):
            raise ValueError("target_prompt_logprobs: must be a types.TensorData of token ids")
        target_ids = target_prompt_logprobs.to_numpy(pad_value=-1)
    return SampleRequest(
        prompt=list(prompt.to_ints()),
        num_samples=num_samples,
        max_tokens=sampling_params.max_tokens,
        temperature=sampling_params.temperature,
        top_k=sampling_params.top_k,
        top_p=sampling_params.top_p,
        stop_token_ids=stop_tokens,
        stop_strings=stop_strings,
        seed=sampling_params.seed,
        include_prompt_logprobs=include_prompt_logprobs,
        topk_prompt_logprobs=topk_prompt_logprobs,
        target_prompt_ids=target_ids,
        topk_sample_logprobs=topk_sample_logprobs,
        prompt_alt_tokens_k=prompt_alt_tokens_k,
    )


def _in_layout_of(values: np.ndarray, request: types.TensorData) -> types.TensorData:
    """``values`` (dense, the request's shape) as a float32 tensor laid out like ``request``: a
    sparse CSR request gets back only its listed cells."""
    values = np.asarray(values, np.float32)
    if request.sparse_crow_indices is None:
        return types.TensorData.from_numpy(values)
    crow = np.asarray(request.sparse_crow_indices, np.int64)
    rows = np.repeat(np.arange(len(crow) - 1), np.diff(crow))
    return types.TensorData(
        data=values[rows, np.asarray(request.sparse_col_indices, np.int64)],
        dtype="float32",
        shape=list(values.shape),
        sparse_crow_indices=list(request.sparse_crow_indices),
        sparse_col_indices=list(request.sparse_col_indices),
    )


def _check_last_n(last_n: Any, request: SampleRequest) -> None:
    if last_n is None:
        return
    n = len(request.prompt)
    if not isinstance(last_n, int) or isinstance(last_n, bool) or not 1 <= last_n <= n - 1:
        raise ValueError(f"prompt_logprobs_last_n: must be an int between 1 and len(prompt) - 1 = {n - 1}")
    if not (request.include_prompt_logprobs or request.topk_prompt_logprobs):
        raise ValueError("prompt_logprobs_last_n: needs include_prompt_logprobs or topk_prompt_logprobs")


def _keep_last(values: list | None, last_n: int | None) -> list | None:
    """``prompt_logprobs_last_n``: the last ``last_n`` prompt positions scored, None before them."""
    if values is None or last_n is None:
        return values
    cut = max(len(values) - last_n, 0)
    return [None] * cut + list(values[cut:])


def _sample_response(
    result: SampleResult,
    request_id: str,
    last_n: int | None = None,
    target_request: types.TensorData | None = None,
) -> types.SampleResponse:
    topk = result.sequence_topk or [None] * len(result.sequences)
    sequences = [
        types.SampledSequence(
            stop_reason=reason,
            sequence_id=f"{request_id}:{i}",
            tokens_np=np.asarray(tokens, np.int32),
            logprobs_np=np.asarray(logprobs, np.float32),
            topk_logprobs_np=None if top is None else types.TopkLogprobs(token_ids=top[0], logprobs=top[1]),
        )
        for i, ((tokens, logprobs, reason), top) in enumerate(zip(result.sequences, topk, strict=True))
    ]
    extra = {}
    if result.prompt_logprobs is not None:
        extra["_prompt_logprobs_list"] = _keep_last(result.prompt_logprobs, last_n)
    if result.topk_prompt_logprobs is not None:
        extra["_topk_prompt_logprobs_list"] = _keep_last(result.topk_prompt_logprobs, last_n)
    if result.target_prompt_logprobs is not None:
        extra["target_prompt_logprobs"] = _in_layout_of(result.target_prompt_logprobs, target_request)
    if result.prompt_alt_tokens is not None:
        tokens, logprobs = map(types.TensorData.from_numpy, result.prompt_alt_tokens)
        extra["prompt_alt_tokens"] = types.PromptAltTokens(tokens=tokens, logprobs=logprobs)
    return types.SampleResponse(
        sequences=sequences, prompt_cache_hit_tokens=result.prompt_cache_hit_tokens, **extra
    )


class InflightWeights:
    """The weights every inflight sampling client of one training client samples with; each inflight
    save replaces them (for existing clients too)."""

    def __init__(self, lora):
        self.lora = lora


class SamplingClient(_ResolvedClient):
    """Samples from the shared base weights plus an adapter: an immutable snapshot, or the mutable
    :class:`InflightWeights` of its training client (``kind="inflight"``)."""

    def __init__(self, base: BaseModel, lora=None, model_path: str | None = None):
        self._base = base
        self._lora = lora
        self.model_path = model_path

    @property
    def model_config(self) -> ModelConfig:
        return self._base.config

    def submit_request(self, request: SampleRequest) -> concurrent.futures.Future:
        """An engine-level :class:`~jtinker.sampling.SampleRequest` (stop ids and stop strings at once)
        with this client's weights; the future's :class:`~jtinker.sampling.SampleResult` holds each
        sequence as ``(tokens, logprobs, finish_reason)``. The request is validated when it runs."""
        lora = self._lora.lora if isinstance(self._lora, InflightWeights) else self._lora
        return self._base.worker.submit_sample(request, lora)

    def sample(
        self,
        prompt: types.ModelInput,
        num_samples: int,
        sampling_params: types.SamplingParams,
        include_prompt_logprobs: bool = False,
        topk_prompt_logprobs: int = 0,
        topk_sample_logprobs: int = 0,
        target_prompt_logprobs: types.TensorData | None = None,
        prompt_alt_tokens_k: int = 0,
        prompt_logprobs_last_n: int | None = None,
    ) -> APIFuture[types.SampleResponse]:
        """``prompt_logprobs_last_n`` scores only the last N prompt positions (earlier ones are None);
        ``target_prompt_logprobs`` ``[len(prompt) - 1, K]`` asks for the logprob of id ``[i, j]`` at
        prompt position ``i + 1`` (-1: none), returned in the same layout (dense or sparse CSR);
        ``topk_sample_logprobs`` gives each sequence the top-k (token, logprob) at every sampled position;
        ``prompt_alt_tokens_k`` draws that many tokens at every prompt position after the first, at the
        request's temperature (with its seed), with their raw logprobs."""
        request = _sample_request(
            prompt,
            num_samples,
            sampling_params,
            include_prompt_logprobs,
            topk_prompt_logprobs,
            target_prompt_logprobs,
            topk_sample_logprobs,
            prompt_alt_tokens_k,
            eos_token_ids=self._base.config.eos_token_ids,
        )
        _check_last_n(prompt_logprobs_last_n, request)
        request_id = uuid.uuid4().hex
        return APIFuture(
            _chain(
                self.submit_request(request),
                lambda result: _sample_response(
                    result, request_id, prompt_logprobs_last_n, target_prompt_logprobs
                ),
            )
        )

    async def sample_async(
        self,
        prompt,
        num_samples,
        sampling_params,
        include_prompt_logprobs=False,
        topk_prompt_logprobs=0,
        topk_sample_logprobs=0,
        target_prompt_logprobs=None,
        prompt_alt_tokens_k=0,
        prompt_logprobs_last_n=None,
    ) -> types.SampleResponse:
        return await self.sample(
            prompt,
            num_samples,
            sampling_params,
            include_prompt_logprobs,
            topk_prompt_logprobs,
            topk_sample_logprobs,
            target_prompt_logprobs,
            prompt_alt_tokens_k,
            prompt_logprobs_last_n,
        )

    def compute_logprobs(
        self, prompt: types.ModelInput, prompt_logprobs_last_n: int | None = None
    ) -> APIFuture[list[float | None]]:
        """Per-token logprobs of ``prompt``; the first entry is None, as in Tinker (and every entry
        before the last ``prompt_logprobs_last_n``)."""
        params = types.SamplingParams(max_tokens=1, temperature=1.0)
        response = self.sample(
            prompt, 1, params, include_prompt_logprobs=True, prompt_logprobs_last_n=prompt_logprobs_last_n
        )
        return APIFuture(_chain(response.future(), lambda r: r.prompt_logprobs))

    async def compute_logprobs_async(
        self, prompt: types.ModelInput, prompt_logprobs_last_n: int | None = None
    ) -> list[float | None]:
        return await self.compute_logprobs(prompt, prompt_logprobs_last_n)

    def get_tokenizer(self):
        return self._base.tokenizer

    def get_base_model(self) -> str:
        return self._base.name

    async def get_base_model_async(self) -> str:
        return self._base.name


def server_capabilities() -> types.GetServerCapabilitiesResponse:
    """The base models this process can load: registered names, then the built-in tiny models."""
    names = sorted(registry.registered_models()) + registry.builtin_names()
    return types.GetServerCapabilitiesResponse(
        supported_models=[types.SupportedModel(model_name=name) for name in names]
    )


COMPILE_CACHE_BYTES = 4 << 30


def enable_compile_cache() -> None:
    """Keeps compiled programs under ``$JTINKER_HOME/xla_cache`` on GPU and TPU, where a second run
    of the same job then skips minutes of compiling.

    Off on CPU unless ``JTINKER_COMPILE_CACHE=1``: there a warm cache saves about 3 s a start, and
    XLA:CPU's executable (de)serialization has crashed processes (SIGSEGV; jax-ml/jax#28908, and
    twice in this project's test workers). ``JTINKER_COMPILE_CACHE=0`` turns it off everywhere; a
    ``jax_compilation_cache_dir`` the user set (or ``JAX_COMPILATION_CACHE_DIR``) is left alone.
    The cache is bounded (least recently used entries go past ``COMPILE_CACHE_BYTES``), which also
    makes JAX lock it across processes: no process reads an entry another is still writing.
    """
    setting = os.environ.get("JTINKER_COMPILE_CACHE", "")
    if setting not in ("", "0", "1"):
        raise ValueError(f"JTINKER_COMPILE_CACHE: must be 0 or 1, got {setting!r}")
    if setting == "0" or jax.config.jax_compilation_cache_dir:
        return
    if setting != "1" and jax.default_backend() == "cpu":
        return
    if jax.config.jax_compilation_cache_max_size == -1:
        jax.config.update("jax_compilation_cache_max_size", COMPILE_CACHE_BYTES)
    jax.config.update("jax_compilation_cache_dir", str(registry.home() / "xla_cache"))


def _mesh_from(mesh: Any) -> Mesh | None:
    if mesh is None or isinstance(mesh, Mesh):
        return mesh
    if isinstance(mesh, str | sharding.MeshConfig):
        return sharding.make_mesh(mesh)
    raise ValueError(
        f"mesh: expected a Mesh, MeshConfig or 'axis=size,...' string, got {type(mesh).__name__}"
    )


class ServiceClient:
    """Entry point. Accepts (and ignores) the SDK's connection arguments: everything runs in process.

    ``dtype`` sets the base weights' dtype (default f32); ``store_dir`` the checkpoint root
    (default ``$JTINKER_HOME/runs``); ``mesh`` is a ``jax.sharding.Mesh``, a
    ``jtinker.sharding.MeshConfig`` or a string like ``"fsdp=4,tp=2"`` (default: ``$JTINKER_MESH``,
    else one device).
    """

    def __init__(
        self,
        user_metadata: dict[str, str] | None = None,
        project_id: str | None = None,
        *,
        dtype: Any = jnp.float32,
        store_dir: str | None = None,
        mesh: Any = None,
        **connection_kwargs: Any,
    ):
        enable_compile_cache()
        self.user_metadata = dict(user_metadata or {})
        self.project_id = project_id
        self.dtype = dtype
        self.mesh = _mesh_from(mesh if mesh is not None else os.environ.get("JTINKER_MESH"))
        self.store = CheckpointStore(store_dir)
        self._connection_kwargs = connection_kwargs
        self.session_id = str(uuid.uuid4())  # names this client's custom losses, as the SDK's session does
        # The training clients alive in this process, by model id (the REST client lists their runs).
        self.runs: weakref.WeakValueDictionary[str, TrainingClient] = weakref.WeakValueDictionary()

    def _base(self, base_model: str) -> BaseModel:
        return get_base_model(base_model, registry.resolve_base_model(base_model), self.dtype, self.mesh)

    def load_base_model(self, base_model: str) -> BaseModel:
        """Loads (once per process) and returns the shared base model; blocks while it loads."""
        return self._base(base_model)

    def get_server_capabilities(self) -> types.GetServerCapabilitiesResponse:
        return server_capabilities()

    def create_custom_loss(self, fn: PerDatumLossFn, input_ranks: dict[str, int]) -> APIFuture[LossHandle]:
        """SDK 0.38's custom loss: ``fn(logprobs, *inputs) -> (loss, metrics)`` in torch, run once per
        datum and summed; ``input_ranks`` gives each parameter's rank (``logprobs`` first: 1 or 2).
        It is traced with ``torch.fx`` under the SDK's rules and runs as JAX in one forward/backward
        pass: pass the handle to ``TrainingClient.forward_backward_custom``. Needs torch to trace."""
        return _resolved(loss_handles.create(fn, input_ranks, self.session_id))

    async def get_server_capabilities_async(self) -> types.GetServerCapabilitiesResponse:
        return self.get_server_capabilities()

    def create_lora_training_client(
        self,
        base_model: str,
        rank: int = 32,
        seed: int | None = None,
        train_mlp: bool = True,
        train_attn: bool = True,
        train_unembed: bool = True,
        user_metadata: dict[str, str] | None = None,
        optimizer: types.OptimizerConfig | None = None,
        *,
        model_id: str | None = None,
    ) -> TrainingClient:
        """``model_id`` (jtinker only) fixes the run id, e.g. the SDK's ``<session>:train:<n>`` used by
        the HTTP server; by default a fresh ``<uuid>:train:0``. ``optimizer``: AdamW only."""
        if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
            raise ValueError(f"rank: must be a positive int, got {rank!r}")
        if not (train_mlp or train_attn or train_unembed):
            raise ValueError("train_mlp, train_attn, train_unembed: at least one must be True")
        _check_optimizer(optimizer)
        spec = LoraSpec(
            rank=rank, seed=seed, train_attn=train_attn, train_mlp=train_mlp, train_unembed=train_unembed
        )
        return self._new_training_client(base_model, spec, model_id, user_metadata)

    def create_full_training_client(
        self, base_model: str, user_metadata: dict[str, str] | None = None, *, model_id: str | None = None
    ) -> TrainingClient:
        """Full fine-tuning (beyond Tinker): every weight trains, embeddings included, behind the same
        verbs as a LoRA client (``forward_backward``, ``optim_step``, ``sample``, ``save_state``).

        The client trains its own copy of the weights, sharded like the base (with its Adam state)
        over the service's mesh; other clients keep sharing the frozen base. Memory is about four
        times the weights (weights, gradients, two Adam moments). Export with
        ``jtinker export PATH OUT --format merged``. Over HTTP, the SDK reaches it through
        ``create_lora_training_client(base_model, user_metadata={"jtinker_full_finetune": "true"})``.
        """
        return self._new_training_client(base_model, FullSpec(), model_id, user_metadata)

    def _new_training_client(
        self, base_model: str, spec: LoraSpec | FullSpec, model_id: str | None = None, user_metadata=None
    ) -> TrainingClient:
        user_metadata = _check_user_metadata(user_metadata)
        base = self._base(base_model)
        make = base.new_full_adapter if isinstance(spec, FullSpec) else lambda: base.new_adapter(spec)
        adapter = base.worker.submit(make).result()
        client = TrainingClient(self, adapter, model_id=model_id or new_run_id(), user_metadata=user_metadata)
        self.runs[client.model_id] = client
        return client

    def _client_from_state(
        self,
        path: str,
        base_model: str | None,
        with_optimizer: bool,
        model_id: str | None = None,
        user_metadata: dict[str, str] | None = None,
    ) -> TrainingClient:
        meta = self.store.read_meta(path)
        lora = meta["lora"]
        spec = (
            FullSpec()
            if lora.get("full_finetune")
            else LoraSpec(
                rank=lora["rank"],
                seed=0,
                train_attn=lora["train_attn"],
                train_mlp=lora["train_mlp"],
                train_unembed=lora["train_unembed"],
                alpha=lora["alpha"],
            )
        )
        client = self._new_training_client(base_model or meta["base_model"], spec, model_id, user_metadata)
        client._load(path, with_optimizer=with_optimizer).result()
        return client

    def create_training_client_from_state(
        self,
        path: str,
        base_model: str | None = None,
        user_metadata: dict[str, str] | None = None,
        weights_access_token: Any = None,
        optimizer: types.OptimizerConfig | None = None,
        *,
        model_id: str | None = None,
    ) -> TrainingClient:
        """A new training client with the checkpoint's weights and a fresh optimizer."""
        _check_optimizer(optimizer)
        return self._client_from_state(path, base_model, False, model_id, user_metadata)

    def create_training_client_from_state_with_optimizer(
        self,
        path: str,
        base_model: str | None = None,
        user_metadata: dict[str, str] | None = None,
        weights_access_token: Any = None,
        *,
        model_id: str | None = None,
    ) -> TrainingClient:
        """A new training client that resumes the checkpoint exactly, Adam state included."""
        return self._client_from_state(path, base_model, True, model_id, user_metadata)

    async def create_training_client_from_state_async(
        self, path, base_model=None, user_metadata=None, weights_access_token=None, optimizer=None
    ) -> TrainingClient:
        return self.create_training_client_from_state(
            path, base_model, user_metadata, weights_access_token, optimizer
        )

    async def create_training_client_from_state_with_optimizer_async(
        self, path, base_model=None, user_metadata=None, weights_access_token=None
    ) -> TrainingClient:
        return self.create_training_client_from_state_with_optimizer(path, base_model, user_metadata)

    async def create_lora_training_client_async(
        self,
        base_model: str,
        rank: int = 32,
        seed: int | None = None,
        train_mlp: bool = True,
        train_attn: bool = True,
        train_unembed: bool = True,
        user_metadata=None,
        optimizer=None,
    ) -> TrainingClient:
        return self.create_lora_training_client(
            base_model, rank, seed, train_mlp, train_attn, train_unembed, user_metadata, optimizer
        )

    def create_sampling_client(
        self,
        model_path: str | None = None,
        base_model: str | None = None,
        retry_config: Any = None,
        record_stability_info: bool = False,
    ) -> SamplingClient:
        del retry_config
        _reject_stability_info(record_stability_info)
        if model_path is None and base_model is None:
            raise ValueError("model_path or base_model: one is required")
        if model_path is None:
            return SamplingClient(self._base(base_model))
        meta = self.store.read_meta(model_path, "model_path")
        base = self._base(base_model or meta["base_model"])
        lora, _ = lora_from_checkpoint(
            self.store, model_path, base.config, base.name, "model_path", params=base.params
        )
        return SamplingClient(base, lora, model_path=model_path)

    async def create_sampling_client_async(
        self, model_path=None, base_model=None, retry_config=None, record_stability_info=False
    ) -> SamplingClient:
        return self.create_sampling_client(model_path, base_model, retry_config, record_stability_info)

    def create_rest_client(self) -> RestClient:
        """Runs and checkpoints of this client's store (and of the runs this process created)."""
        from jtinker.rest import RestClient

        return RestClient(service=self)

    def close(self, status: str = "success", detail: str | None = None) -> APIFuture[None]:
        """Ends the session. In process there is no session to end: base models stay loaded for
        other clients of this process, so this only checks ``status``."""
        if status not in ("success", "errored", "interrupted"):
            raise ValueError(f"status: must be 'success', 'errored' or 'interrupted', got {status!r}")
        return _resolved(None)


__all__ = ["APIFuture", "SamplingClient", "ServiceClient", "TrainingClient"]
