"""The in-process Tinker API: ``import jtinker as tinker`` runs scripts written for the SDK.

Clients are thin: they validate arguments, turn Tinker types into engine calls, submit them to the
base model's worker and hand back futures. Calls on one training client run in submission order,
so ``forward_backward`` may be submitted before the previous ``optim_step`` finishes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import os
import uuid
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jtinker import registry, sharding, train, types
from jtinker.checkpoints import CheckpointPath, CheckpointStore, new_run_id, validate_name
from jtinker.engine import (
    Adapter,
    BaseModel,
    FullSpec,
    LoraSpec,
    get_base_model,
    lora_from_checkpoint,
)
from jtinker.sampling import SampleRequest, SampleResult

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


class TrainingClient:
    """One LoRA being trained on a shared base model (Tinker's ``TrainingClient``)."""

    def __init__(self, service: ServiceClient, adapter: Adapter, model_id: str):
        self._service = service
        self._adapter = adapter
        self.model_id = model_id

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
        self, data: list[types.Datum], loss_fn: Callable, *, loss_type_input: str = "logprobs"
    ) -> APIFuture[types.ForwardBackwardOutput]:
        """``loss_fn(data, values_list) -> (loss, metrics)``, a JAX function, in one forward pass.

        ``values_list[i]`` is datum i's target logprobs ``[N]`` (Tinker's contract), or with
        ``loss_type_input="logits"`` its full f32 logits ``[N, V]`` (beyond Tinker: top-k,
        entropy or fixed-token-set losses). Unlike Tinker there is no second forward pass.
        """
        if loss_type_input not in ("logprobs", "logits"):
            raise ValueError(f"loss_type_input: must be 'logprobs' or 'logits', got {loss_type_input!r}")
        return self._submit(
            lambda: _forward_backward_output(
                *self._adapter.forward_backward_custom(data, loss_fn, loss_type_input)
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
    def _save(self, name: str, kind: str, *, with_optimizer: bool, overwrite: bool) -> APIFuture:
        path = CheckpointPath(self.model_id, kind, validate_name(name))
        store = self._service.store
        saving = self._base.worker.submit(
            lambda: self._adapter.save(store, path, with_optimizer=with_optimizer, overwrite=overwrite),
            adapter=self._adapter,
        )
        return APIFuture(_chain(saving, lambda written: written))  # resolves once durable

    def save_state(
        self, name: str, ttl_seconds: int | None = None, overwrite: bool = False, user_metadata: Any = None
    ) -> APIFuture[types.SaveWeightsResponse]:
        """LoRA weights, Adam state and step, at ``tinker://<model_id>/weights/<name>``."""
        del ttl_seconds, user_metadata
        fut = self._save(name, "weights", with_optimizer=True, overwrite=overwrite)
        return APIFuture(_chain(fut.future(), lambda path: types.SaveWeightsResponse(path=path)))

    def save_weights_for_sampler(
        self, name: str, ttl_seconds: int | None = None, overwrite: bool = False
    ) -> APIFuture[types.SaveWeightsForSamplerResponse]:
        """LoRA weights only (cheaper), at ``tinker://<model_id>/sampler_weights/<name>``."""
        del ttl_seconds
        fut = self._save(name, "sampler_weights", with_optimizer=False, overwrite=overwrite)
        return APIFuture(_chain(fut.future(), lambda path: types.SaveWeightsForSamplerResponse(path=path)))

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

    def create_sampling_client(self, model_path: str, retry_config: Any = None) -> SamplingClient:
        return self._service.create_sampling_client(model_path=model_path, retry_config=retry_config)

    # -- sampling -----------------------------------------------------------------------------
    def save_weights_and_get_sampling_client(
        self, name: str | None = None, retry_config: Any = None
    ) -> SamplingClient:
        """A sampling client over a snapshot of the current adapter (taken in request order)."""
        del name, retry_config  # Tinker ignores the name: the snapshot is ephemeral
        return self.snapshot_sampling_client().result()

    def snapshot_sampling_client(self) -> APIFuture[SamplingClient]:
        """Non-blocking form of ``save_weights_and_get_sampling_client``: the snapshot is taken in
        request order, after everything submitted before it (the HTTP server needs this form)."""
        snapshot = self._submit(lambda: _copy_tree(self._adapter.lora))
        return APIFuture(_chain(snapshot.future(), lambda lora: SamplingClient(self._base, lora)))

    async def save_weights_and_get_sampling_client_async(
        self, name: str | None = None, retry_config: Any = None
    ):
        return self.save_weights_and_get_sampling_client(name, retry_config)

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

    async def save_weights_for_sampler_async(self, name, ttl_seconds=None, overwrite=False) -> APIFuture:
        return self.save_weights_for_sampler(name, ttl_seconds, overwrite)

    async def load_state_async(self, path, weights_access_token=None) -> APIFuture:
        return self.load_state(path, weights_access_token)

    async def load_state_with_optimizer_async(self, path, weights_access_token=None) -> APIFuture:
        return self.load_state_with_optimizer(path, weights_access_token)

    async def create_sampling_client_async(self, model_path, retry_config=None) -> SamplingClient:
        return self.create_sampling_client(model_path, retry_config)


def _sample_request(
    prompt: types.ModelInput,
    num_samples: int,
    sampling_params: types.SamplingParams,
    include_prompt_logprobs: bool,
    topk_prompt_logprobs: int,
) -> SampleRequest:
    stop = sampling_params.stop
    stop_strings: tuple[str, ...] = ()
    stop_tokens: tuple[int, ...] = ()
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
    )


def _sample_response(result: SampleResult, request_id: str) -> types.SampleResponse:
    sequences = [
        types.SampledSequence(
            stop_reason=reason,
            sequence_id=f"{request_id}:{i}",
            tokens_np=np.asarray(tokens, np.int32),
            logprobs_np=np.asarray(logprobs, np.float32),
        )
        for i, (tokens, logprobs, reason) in enumerate(result.sequences)
    ]
    extra = {}
    if result.prompt_logprobs is not None:
        extra["_prompt_logprobs_list"] = list(result.prompt_logprobs)
    if result.topk_prompt_logprobs is not None:
        extra["_topk_prompt_logprobs_list"] = list(result.topk_prompt_logprobs)
    return types.SampleResponse(sequences=sequences, **extra)


class SamplingClient:
    """Samples from the shared base weights plus an (immutable) adapter snapshot."""

    def __init__(self, base: BaseModel, lora=None, model_path: str | None = None):
        self._base = base
        self._lora = lora
        self.model_path = model_path

    def _submit_sample(self, request: SampleRequest) -> concurrent.futures.Future:
        return self._base.worker.submit_sample(request, self._lora)

    def sample(
        self,
        prompt: types.ModelInput,
        num_samples: int,
        sampling_params: types.SamplingParams,
        include_prompt_logprobs: bool = False,
        topk_prompt_logprobs: int = 0,
    ) -> concurrent.futures.Future[types.SampleResponse]:
        request = _sample_request(
            prompt, num_samples, sampling_params, include_prompt_logprobs, topk_prompt_logprobs
        )
        request_id = uuid.uuid4().hex
        return _chain(self._submit_sample(request), lambda result: _sample_response(result, request_id))

    async def sample_async(
        self, prompt, num_samples, sampling_params, include_prompt_logprobs=False, topk_prompt_logprobs=0
    ) -> types.SampleResponse:
        future = self.sample(
            prompt, num_samples, sampling_params, include_prompt_logprobs, topk_prompt_logprobs
        )
        return await asyncio.wrap_future(future)

    def compute_logprobs(self, prompt: types.ModelInput) -> concurrent.futures.Future[list[float | None]]:
        """Per-token logprobs of ``prompt``; the first entry is None, as in Tinker."""
        params = types.SamplingParams(max_tokens=1, temperature=1.0)
        return _chain(
            self.sample(prompt, 1, params, include_prompt_logprobs=True), lambda r: r.prompt_logprobs
        )

    async def compute_logprobs_async(self, prompt: types.ModelInput) -> list[float | None]:
        return await asyncio.wrap_future(self.compute_logprobs(prompt))

    def get_tokenizer(self):
        return self._base.tokenizer

    def get_base_model(self) -> str:
        return self._base.name

    async def get_base_model_async(self) -> str:
        return self._base.name


def enable_compile_cache() -> None:
    """Keeps compiled programs under ``$JTINKER_HOME/xla_cache``, so a second run of the same job starts
    in about a second instead of recompiling (~8 s for the small model's train step).

    Left alone if the user set ``jax_compilation_cache_dir`` (or ``JAX_COMPILATION_CACHE_DIR``) or
    ``JTINKER_COMPILE_CACHE=0``.
    """
    if os.environ.get("JTINKER_COMPILE_CACHE", "1") == "0" or jax.config.jax_compilation_cache_dir:
        return
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

    def _base(self, base_model: str) -> BaseModel:
        return get_base_model(base_model, registry.resolve_base_model(base_model), self.dtype, self.mesh)

    def load_base_model(self, base_model: str) -> BaseModel:
        """Loads (once per process) and returns the shared base model; blocks while it loads."""
        return self._base(base_model)

    def get_server_capabilities(self) -> types.GetServerCapabilitiesResponse:
        names = sorted(registry.registered_models()) + registry.builtin_names()
        return types.GetServerCapabilitiesResponse(
            supported_models=[types.SupportedModel(model_name=name) for name in names]
        )

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
        *,
        model_id: str | None = None,
    ) -> TrainingClient:
        """``model_id`` (jtinker only) fixes the run id, e.g. the SDK's ``<session>:train:<n>`` used by
        the HTTP server; by default a fresh ``<uuid>:train:0``."""
        if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
            raise ValueError(f"rank: must be a positive int, got {rank!r}")
        if not (train_mlp or train_attn or train_unembed):
            raise ValueError("train_mlp, train_attn, train_unembed: at least one must be True")
        del user_metadata
        spec = LoraSpec(
            rank=rank, seed=seed, train_attn=train_attn, train_mlp=train_mlp, train_unembed=train_unembed
        )
        return self._new_training_client(base_model, spec, model_id)

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
        del user_metadata
        return self._new_training_client(base_model, FullSpec(), model_id)

    def _new_training_client(
        self, base_model: str, spec: LoraSpec | FullSpec, model_id: str | None = None
    ) -> TrainingClient:
        base = self._base(base_model)
        make = base.new_full_adapter if isinstance(spec, FullSpec) else lambda: base.new_adapter(spec)
        adapter = base.worker.submit(make).result()
        return TrainingClient(self, adapter, model_id=model_id or new_run_id())

    def _client_from_state(
        self, path: str, base_model: str | None, with_optimizer: bool, model_id: str | None = None
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
        client = self._new_training_client(base_model or meta["base_model"], spec, model_id)
        client._load(path, with_optimizer=with_optimizer).result()
        return client

    def create_training_client_from_state(
        self,
        path: str,
        base_model: str | None = None,
        user_metadata: Any = None,
        weights_access_token: Any = None,
        *,
        model_id: str | None = None,
    ) -> TrainingClient:
        """A new training client with the checkpoint's weights and a fresh optimizer."""
        return self._client_from_state(path, base_model, with_optimizer=False, model_id=model_id)

    def create_training_client_from_state_with_optimizer(
        self,
        path: str,
        base_model: str | None = None,
        user_metadata: Any = None,
        weights_access_token: Any = None,
        *,
        model_id: str | None = None,
    ) -> TrainingClient:
        """A new training client that resumes the checkpoint exactly, Adam state included."""
        return self._client_from_state(path, base_model, with_optimizer=True, model_id=model_id)

    async def create_training_client_from_state_async(
        self, path, base_model=None, user_metadata=None, weights_access_token=None
    ) -> TrainingClient:
        return self.create_training_client_from_state(path, base_model)

    async def create_training_client_from_state_with_optimizer_async(
        self, path, base_model=None, user_metadata=None, weights_access_token=None
    ) -> TrainingClient:
        return self.create_training_client_from_state_with_optimizer(path, base_model)

    async def create_lora_training_client_async(
        self,
        base_model: str,
        rank: int = 32,
        seed: int | None = None,
        train_mlp: bool = True,
        train_attn: bool = True,
        train_unembed: bool = True,
        user_metadata=None,
    ) -> TrainingClient:
        return self.create_lora_training_client(base_model, rank, seed, train_mlp, train_attn, train_unembed)

    def create_sampling_client(
        self, model_path: str | None = None, base_model: str | None = None, retry_config: Any = None
    ) -> SamplingClient:
        del retry_config
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

    async def create_sampling_client_async(self, model_path=None, base_model=None, retry_config=None):
        return self.create_sampling_client(model_path, base_model, retry_config)


__all__ = ["APIFuture", "SamplingClient", "ServiceClient", "TrainingClient"]
