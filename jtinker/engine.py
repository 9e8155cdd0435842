"""The one engine behind every face of jtinker (functional, in-process Tinker API, HTTP server).

* :class:`BaseModel` holds one copy of a base model's weights; every adapter on it shares them.
* :class:`Adapter` holds one training client's state: LoRA pytree, Adam state, accumulated grads.
* :class:`Worker` runs device work for one base model on one thread, in submission order, and
  batches concurrent sampling requests together.
"""

from __future__ import annotations

import atexit
import collections
import dataclasses
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jtinker import hostmem, sharding, train
from jtinker import losses as losses_lib
from jtinker.batching import HostBatch, batch_bucket, build_batches
from jtinker.checkpoints import CheckpointPath, CheckpointStore, abstract
from jtinker.distributed import from_process_zero
from jtinker.models import ModelConfig, load_pretrained, param_shapes
from jtinker.models import lora as lora_lib
from jtinker.registry import env_int

log = logging.getLogger("jtinker")
# Requests sent at once (client threads, HTTP handlers) land a few ms apart: a burst of sampling
# requests has gathered once none has arrived for a quiet period, 5% of the last call within these
# bounds (a lone request never waits longer than the bound or that share of its own run).
SAMPLE_QUIET_SECONDS = (0.002, 0.005)
GATHER_MAX_SECONDS = 0.1  # longest wait for other clients' requests that are due to arrive
ACTIVE_SECONDS = 60.0  # forget the rhythm of a client idle this long
# A client's rhythm predicts its next request only while its last two gaps agree to this fraction: a
# client whose loop alternates between other work and this model has no rhythm to wait for.
STEADY_TOLERANCE = 0.25
DEFAULT_MICRO_BATCH_TOKENS = 16384  # padded tokens per training program call; JTINKER_MICRO_BATCH_TOKENS


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """What Tinker calls ``LoraConfig``, plus alpha."""

    rank: int = 32
    seed: int | None = None
    train_attn: bool = True
    train_mlp: bool = True
    train_unembed: bool = True
    alpha: float = 32.0

    @property
    def targets(self) -> tuple[str, ...]:
        return lora_lib.targets_for(self.train_attn, self.train_mlp, self.train_unembed)


@dataclasses.dataclass(frozen=True)
class FullSpec:
    """Full fine-tuning: every weight trains (embeddings included); nothing to configure."""

    def identity(self) -> dict:
        return {"full_finetune": True}


class BaseModel:
    """One loaded base model: config, params (shared, sharded over ``mesh``), tokenizer, sampler, worker.

    Without a mesh the model runs on a one-device mesh: the code path is the same everywhere.
    """

    def __init__(
        self,
        name: str,
        model_dir: Path,
        dtype=jnp.float32,
        *,
        mesh: Mesh | None = None,
        rules: sharding.ShardingRules | None = None,
        max_tokens_per_batch: int | None = None,
        remat: bool | None = None,
        share_prefixes: bool | None = None,
    ):
        if max_tokens_per_batch is None:  # micro-batches: fewer tokens hold fewer activations
            max_tokens_per_batch = env_int("JTINKER_MICRO_BATCH_TOKENS", DEFAULT_MICRO_BATCH_TOKENS)
        if max_tokens_per_batch < 1:
            raise ValueError(
                f"max_tokens_per_batch (JTINKER_MICRO_BATCH_TOKENS): must be >= 1, got {max_tokens_per_batch}"
            )
        self.name = name
        # Read when a model loads, not at import: a script may set them after `import jtinker`.
        if remat is None:
            remat = os.environ.get("JTINKER_REMAT", "0") == "1"
        if share_prefixes is None:
            share_prefixes = os.environ.get("JTINKER_SHARE_PREFIXES", "1") != "0"
        self.remat = remat  # recompute layer activations in backward: less memory, more FLOPs
        self.model_dir = Path(model_dir)
        self.dtype = dtype
        self.mesh = mesh if mesh is not None else sharding.make_mesh(devices=jax.devices()[:1])
        self.rules = rules or sharding.ShardingRules()
        self.config: ModelConfig = ModelConfig.from_pretrained(model_dir)
        _, self.params = load_pretrained(model_dir, dtype, mesh=self.mesh, rules=self.rules)
        self.max_tokens_per_batch = max_tokens_per_batch
        self.share_prefixes = share_prefixes  # compute prefixes that datums share once (build_batches)
        self._steps: dict[Any, train.CompiledSteps] = {}
        self._zero_pool: dict[tuple, list] = {}  # layout -> zero grad trees for dummy adapter slots
        self._tokenizer = None
        self._sampler = None
        self.worker = Worker(self, name=f"jtinker-{self.config.model_type}")

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir))
        return self._tokenizer

    @property
    def sampler(self):
        if self._sampler is None:
            from jtinker.sampling import Sampler

            try:
                tokenizer = self.tokenizer
            except Exception:  # a model dir without tokenizer files can still sample token ids
                tokenizer = None
            self._sampler = Sampler(self.config, self.params, tokenizer, mesh=self.mesh, rules=self.rules)
        return self._sampler

    def prefix_cache_stats(self) -> dict[str, int]:
        """The sampler's prefix cache: entries, bytes and prompt tokens served from it."""
        if self._sampler is None:
            return {"entries": 0, "bytes": 0, "hit_tokens": 0}
        return self._sampler.prefix_cache.stats()

    # -- placement ----------------------------------------------------------------------------
    def place_lora_tree(self, tree):
        """Puts a LoRA-shaped tree (weights, grads, Adam state) on the mesh by the rules."""
        return sharding.place_lora(self.mesh, self.rules, tree)

    def place_batch(self, batch, *, stacked_adapters: bool = False):
        """Every process holds the whole host batch; each reads only the rows its devices own.

        ``stacked_adapters``: arrays are ``[K, B, ...]`` (one sub-batch per adapter); rows still split
        over the batch axes, the adapter axis stays whole.
        """

        def place(x: np.ndarray) -> jax.Array:
            target = sharding.batch_sharding(self.mesh, self.rules, x.ndim, stacked=stacked_adapters)
            return jax.make_array_from_callback(x.shape, target, lambda index: x[index])

        return jax.tree.map(place, batch)

    @property
    def row_multiple(self) -> int:
        return sharding.batch_multiple(self.mesh, self.rules)

    @staticmethod
    def layout_key(lora: lora_lib.Lora, opt_state) -> tuple:
        """Adapters with equal keys share compiled programs and can be stacked into one step."""
        return lora_lib.layout(lora), jax.tree.structure(opt_state)

    def zero_grads(self, adapter: Adapter, n: int) -> list:
        """``n`` distinct zero gradient trees for the dummy slots of a multi-adapter step.

        They are donated like real accumulators and come back unchanged, so the pool is reused.
        """
        pool = self._zero_pool.setdefault(self.layout_key(adapter.lora, adapter.opt_state), [])
        taken = [pool.pop() for _ in range(min(n, len(pool)))]
        fresh = [
            self.place_lora_tree(jax.tree.map(jnp.zeros_like, adapter.lora)) for _ in range(n - len(taken))
        ]
        return taken + fresh

    def return_zero_grads(self, adapter: Adapter, trees: list) -> None:
        self._zero_pool.setdefault(self.layout_key(adapter.lora, adapter.opt_state), []).extend(trees)

    def steps(self, lora: lora_lib.Lora, opt_state) -> train.CompiledSteps:
        """Compiled steps for this adapter layout (shared by every adapter with the same layout)."""
        key = (jax.tree.structure(lora), jax.tree.structure(opt_state))
        if key not in self._steps:
            replicated = NamedSharding(self.mesh, PartitionSpec())
            self._steps[key] = train.CompiledSteps(
                lora=sharding.lora_shardings(self.mesh, self.rules, lora),
                opt=sharding.lora_shardings(self.mesh, self.rules, opt_state),
                params=sharding.params_shardings(self.mesh, self.rules, self.params),
                batch=sharding.batch_sharding(self.mesh, self.rules, 1),
                batch_many=sharding.batch_sharding(self.mesh, self.rules, 2, stacked=True),
                replicated=replicated,
            )
        return self._steps[key]

    def new_adapter(self, spec: LoraSpec) -> Adapter:
        # A fresh seed is process 0's on every process: the adapter is one global array.
        fresh = lambda: int(from_process_zero(np.frombuffer(np.random.bytes(4), np.uint32))[0])
        seed = spec.seed if spec.seed is not None else fresh()
        lora = lora_lib.init(
            self.config, spec.rank, jax.random.key(seed), alpha=spec.alpha, targets=spec.targets
        )
        return Adapter(self, spec, lora)

    def new_full_adapter(self) -> Adapter:
        """A client that trains its own copy of every weight; the shared base stays frozen. The copy
        is f32 whatever the base dtype (master weights: Adam's small steps survive; the model still
        computes in the base dtype, see :func:`train.model_weights`), so are its Adam moments."""
        return Adapter(self, FullSpec(), train.FullWeights(jax.tree.map(train.master_copy, self.params)))


class Adapter:
    """A LoRA being trained: its weights, Adam state, gradient accumulator and step count.

    Methods run on the base model's worker thread (see :class:`Worker`); none is thread-safe.
    """

    def __init__(self, base: BaseModel, spec: LoraSpec | FullSpec, lora: lora_lib.Lora | train.FullWeights):
        self.base = base
        self.spec = spec
        self.lora = base.place_lora_tree(lora)
        self.opt_state = base.place_lora_tree(train.optimizer().init(lora))
        self.grad_acc = base.place_lora_tree(jax.tree.map(jnp.zeros_like, lora))
        self.step = 0

    @property
    def steps(self) -> train.CompiledSteps:
        return self.base.steps(self.lora, self.opt_state)

    # -- training -----------------------------------------------------------------------------
    def _host_batches(self, data, loss_name: str | None) -> list[tuple[list[int], HostBatch]]:
        """Validates ``data`` and packs it into host micro-batches (no device work)."""
        return build_batches(
            data,
            loss_name,
            self.base.config,
            max_tokens_per_batch=self.base.max_tokens_per_batch,
            row_multiple=self.base.row_multiple,
            share_prefixes=self.base.share_prefixes,
        )

    def _placed(self, host: HostBatch) -> HostBatch:
        return dataclasses.replace(host, batch=self.base.place_batch(host.batch))

    def prepare_loss(self, data: Sequence, loss_name: str, loss_fn_config: dict | None) -> PreparedLoss:
        """Validates a ``forward``/``forward_backward`` request into host micro-batches (no device work)."""
        loss_fn, loss_config = losses_lib.resolve(loss_name, loss_fn_config)
        return PreparedLoss(loss_name, loss_fn, loss_config, self._host_batches(data, loss_name), len(data))

    def forward_backward(
        self, data: Sequence, loss_name: str, loss_fn_config: dict | None, *, backward: bool
    ):
        """Tinker's ``forward``/``forward_backward``: per-datum logprobs, summed loss metrics."""
        return self.run_loss(self.prepare_loss(data, loss_name, loss_fn_config), backward=backward)

    def run_loss(self, prepared: PreparedLoss, *, backward: bool):
        """Runs a validated request on this adapter alone, one program call per micro-batch."""
        loss_fn = prepared.loss_fn
        config_arrays = {k: jnp.float32(v) for k, v in prepared.loss_config.items()}
        outputs: list[np.ndarray | None] = [None] * prepared.num_data
        metric_parts = []
        grad_acc = self.grad_acc
        pending = []
        for members, host in prepared.batches:
            host = self._placed(host)
            if backward:
                grad_acc, loss, metrics, logprobs = self.steps.accumulate(
                    grad_acc,
                    self.lora,
                    self.base.params,
                    host.batch,
                    config_arrays,
                    config=self.base.config,
                    loss_fn=loss_fn,
                    remat=self.base.remat,
                )
            else:
                loss, metrics, logprobs = self.steps.evaluate(
                    self.lora,
                    self.base.params,
                    host.batch,
                    config_arrays,
                    config=self.base.config,
                    loss_fn=loss_fn,
                )
            metric_parts.append((len(members), metrics))
            pending.append((members, host, logprobs))
        for members, host, logprobs in pending:  # fetched once every micro-batch is dispatched
            _scatter_outputs(outputs, members, host, np.asarray(logprobs))
        self.grad_acc = grad_acc
        return loss_outputs(outputs), combine_metrics(metric_parts)

    def forward_backward_custom(
        self, data: Sequence, value_and_grad: Callable, loss_type_input: str = "logprobs"
    ) -> tuple[list, dict]:
        """A user loss over per-datum logprobs (or full logits), differentiated in one forward pass.

        The jitted forward keeps its VJP residuals; ``value_and_grad(data, values_list)`` gives
        ``((loss, metrics), grads)`` for the per-datum arrays (``[N]`` target logprobs, or ``[N, V]`` f32
        logits with ``loss_type_input="logits"``), see :func:`differentiate`; the gradients are pulled
        back through the stored VJP.
        """
        if loss_type_input not in ("logprobs", "logits"):
            raise ValueError(f"loss_type_input: must be 'logprobs' or 'logits', got {loss_type_input!r}")
        forward = (
            self.steps.logprobs_with_pullback
            if loss_type_input == "logprobs"
            else self.steps.logits_with_pullback
        )
        batches = [(members, self._placed(host)) for members, host in self._host_batches(data, None)]
        forwards = []
        values_list: list[np.ndarray | jax.Array | None] = [None] * len(data)
        for members, host in batches:
            values, pullback = forward(
                self.lora, self.base.params, host.batch, config=self.base.config, remat=self.base.remat
            )
            forwards.append((members, host, values, pullback))
        for members, host, values, _ in forwards:
            # Logprobs are sliced on the host (no device program per datum length); full logits stay
            # on the device, where they are.
            rows = np.asarray(values) if loss_type_input == "logprobs" else values
            for i, p in zip(members, host.placements, strict=True):
                values_list[i] = rows[p.row, p.start : p.start + p.length]

        (loss, metrics), grads = value_and_grad(list(data), values_list)
        grad_acc = self.grad_acc
        for members, host, values, pullback in forwards:
            cotangent = np.zeros(values.shape, np.float32)
            for i, p in zip(members, host.placements, strict=True):
                cotangent[p.row, p.start : p.start + p.length] = np.asarray(grads[i])
            grad_acc = self.steps.accumulate_pullback(grad_acc, pullback, jnp.asarray(cotangent))
        self.grad_acc = grad_acc
        if loss_type_input == "logits":  # report target logprobs, as every forward_backward does
            outputs = []
            for i, logits in enumerate(values_list):
                targets = np.asarray(data[i].loss_fn_inputs["target_tokens"].to_numpy(), np.int64)
                lsm = np.asarray(jax.nn.log_softmax(logits, axis=-1))
                picked = np.take_along_axis(lsm, targets.reshape(len(lsm), -1), axis=-1)
                outputs.append(picked[:, 0] if targets.ndim == 1 else picked)
        else:
            outputs = [np.asarray(lp) for lp in values_list]
        metrics = {k: float(v) for k, v in (metrics or {}).items()}
        return loss_outputs(outputs), {"loss:sum": float(loss), **metrics}

    # -- checkpoints --------------------------------------------------------------------------
    def identity(self) -> dict:
        """What a checkpoint must match to be loaded onto this adapter."""
        return {
            "base_model": self.base.name,
            "model_config": dataclasses.asdict(self.base.config),
            "lora": self.spec.identity()
            if self.is_full
            else {**dataclasses.asdict(self.spec), "use_rslora": self.lora.use_rslora},
        }

    @property
    def is_full(self) -> bool:
        return isinstance(self.spec, FullSpec)

    def save(
        self,
        store: CheckpointStore,
        path: CheckpointPath,
        *,
        with_optimizer: bool,
        overwrite: bool,
        metadata: dict | None = None,
    ):
        """``metadata``: more JSON fields for the checkpoint's metadata (user metadata, expiry)."""
        items = {"lora": self.lora.weights}
        if with_optimizer:
            items["optimizer"] = self.opt_state
        meta = {
            **(metadata or {}),
            **self.identity(),
            "step": self.step,
            "with_optimizer": with_optimizer,
            "dtype": jnp.dtype(self.base.dtype).name,
        }
        return store.save(path, items, meta, overwrite=overwrite)

    def save_external(
        self,
        store: CheckpointStore,
        path: CheckpointPath,
        *,
        overwrite: bool,
        metadata: dict | None = None,
        age_recipients: list | None = None,
    ) -> Future:
        """The weights as Hugging Face files other frameworks load: a PEFT adapter, or for a full
        fine-tune a merged model in the base dtype; each file age-encrypted to ``age_recipients``
        (parsed by :func:`jtinker.export.age_recipients`) when given. Training goes on while the files
        are written; the future resolves to ``str(path)`` once they are."""
        from jax.experimental import multihost_utils

        from jtinker.export import encrypt_files, export_merged, export_peft, peft_base_name

        weights = multihost_utils.process_allgather(self.lora.weights, tiled=True)  # this step's, in order
        base = self.base
        if self.is_full:

            def write(out: Path) -> None:
                export_merged(base.model_dir, base.config, weights, None, out, dtype=jnp.dtype(base.dtype))
        else:
            lora = self.lora.replace(weights=weights)
            base_name = peft_base_name(base.name, base.model_dir)

            def write(out: Path) -> None:
                export_peft(base.config, lora, out, base_model_name_or_path=base_name)

        def write_and_encrypt(out: Path) -> None:
            write(out)
            if age_recipients:
                encrypt_files(out, age_recipients)

        meta = {**(metadata or {}), **self.identity(), "step": self.step, "dtype": jnp.dtype(base.dtype).name}
        return store.save_files(path, write_and_encrypt, meta, overwrite=overwrite)  # off the worker

    def load(self, store: CheckpointStore, path: str, *, with_optimizer: bool) -> None:
        """Loads weights (and Adam state) after checking the checkpoint fits this base and LoRA."""
        meta = store.read_meta(path)
        check_compatible(meta, self.identity(), path)
        if with_optimizer and not meta.get("with_optimizer"):
            raise ValueError(f"path: {path} holds weights only (save it with save_state to resume Adam)")
        items = {"lora": abstract(self.lora.weights)}
        if with_optimizer:
            items["optimizer"] = abstract(self.opt_state)
        restored, meta = store.restore(path, items)
        self.lora = self.lora.replace(weights=restored["lora"])
        if with_optimizer:
            self.opt_state = restored["optimizer"]
            self.step = int(meta.get("step", 0))
        else:
            self.opt_state = self.base.place_lora_tree(train.optimizer().init(self.lora))
            self.step = 0
        self.grad_acc = self.base.place_lora_tree(jax.tree.map(jnp.zeros_like, self.lora))

    def optim_step(self, hparams: train.AdamHyperparams) -> dict:
        self.lora, self.opt_state, self.grad_acc, metrics = self.steps.optim_update(
            self.lora, self.opt_state, self.grad_acc, hparams
        )
        self.step += 1
        return {k: float(v) for k, v in metrics.items()}


@dataclasses.dataclass
class PreparedLoss:
    """A validated ``forward``/``forward_backward`` request: resolved loss and host micro-batches."""

    loss_name: str
    loss_fn: Callable
    loss_config: dict[str, float]
    batches: list[tuple[list[int], HostBatch]]
    num_data: int

    def group_key(self, adapter: Adapter, backward: bool) -> tuple | None:
        """Requests with equal keys can run as one multi-adapter step; None: runs alone."""
        if len(self.batches) != 1:
            return None  # already split to the token budget: nothing to gain from grouping
        if adapter.is_full:
            return None  # its weights replace the base: no shared read to save, K model copies to stack
        batch = self.batches[0][1].batch
        return (
            adapter.base.layout_key(adapter.lora, adapter.opt_state),
            self.loss_name,
            backward,
            batch.targets.shape[2:],  # Tinker's (N, K) multi-target form, or ()
            tuple(sorted(batch.loss_inputs)),
            batch.shared is None,
        )


def _pad_to(x: np.ndarray, rows: int, length: int) -> np.ndarray:
    return np.pad(x, [(0, rows - x.shape[0]), (0, length - x.shape[1])] + [(0, 0)] * (x.ndim - 2))


def _padded(batch: train.TrainBatch, shape: tuple[int, int], shared_shape: tuple[int, int, int] | None):
    """``batch`` padded to ``shape`` rows and columns (its shared rows to ``shared_shape``: rows,
    columns and extra scores)."""
    shared = batch.shared
    if shared is not None:
        (rows, columns), extras = shared.tokens.shape, shared.extra_source.shape[0]
        new_rows, new_columns, new_extras = shared_shape
        widened = lambda flat: flat // columns * new_columns + flat % columns  # positions in wider rows
        # The batch reads flat scores at their new positions, extra scores after the new flat ones.
        in_rows = shared.source < rows * columns
        source = np.where(
            in_rows, widened(shared.source), shared.source - rows * columns + new_rows * new_columns
        )
        names = ("tokens", "targets", "positions", "segment_ids", "prefix_ids")
        model = {name: _pad_to(getattr(shared, name), new_rows, new_columns) for name in names}
        more = lambda x: np.pad(x, [(0, new_extras - extras)] + [(0, 0)] * (x.ndim - 1))
        shared = shared.replace(
            **model,
            source=_pad_to(source, *shape),
            extra_source=more(widened(shared.extra_source)),
            extra_targets=more(shared.extra_targets),
        )
    padded = jax.tree.map(lambda x: _pad_to(x, *shape), batch.replace(shared=None))
    return padded.replace(shared=shared)


def run_loss_group(
    base: BaseModel, items: list[tuple[Adapter, PreparedLoss]], *, backward: bool
) -> list[tuple[list, dict]]:
    """One jitted step for several adapters' single-micro-batch requests (equal ``group_key``).

    Each adapter's batch is padded to the group's ``[B, T]`` (rows and lengths are already
    bucketed) and the adapter count to its :func:`batch_bucket` with fully masked dummy slots, so a
    varying number of clients reuses one program per bucket. Returns ``(outputs, metrics)`` per item.
    """
    k = len(items)
    slots = batch_bucket(k)
    hosts = [prepared.batches[0][1] for _, prepared in items]
    shape = tuple(max(h.batch.tokens.shape[i] for h in hosts) for i in (0, 1))
    shared_shape = None
    if hosts[0].batch.shared is not None:  # all or none of them (group_key)
        sizes = [(*h.batch.shared.tokens.shape, h.batch.shared.extra_source.shape[0]) for h in hosts]
        shared_shape = tuple(max(size[i] for size in sizes) for i in range(3))
    dummy = jax.tree.map(np.zeros_like, hosts[0].batch)
    stacked = jax.tree.map(
        lambda *xs: np.stack(xs),
        *[_padded(h.batch, shape, shared_shape) for h in hosts],
        *[_padded(dummy, shape, shared_shape)] * (slots - k),
    )
    configs = [prepared.loss_config for _, prepared in items]
    configs += [configs[0]] * (slots - k)
    loss_config = {name: jnp.asarray([c[name] for c in configs], jnp.float32) for name in configs[0]}
    first, prepared0 = items[0]
    loras = [adapter.lora for adapter, _ in items] + [first.lora] * (slots - k)
    steps = first.steps
    static = {"config": base.config, "loss_fn": prepared0.loss_fn, "remat": base.remat}
    batch = base.place_batch(stacked, stacked_adapters=True)
    if backward:
        dummies = base.zero_grads(first, slots - k)
        active = jnp.asarray(np.arange(slots) < k)
        grad_accs = [adapter.grad_acc for adapter, _ in items] + dummies
        new_accs, loss, metrics, logprobs = steps.accumulate_many(
            grad_accs, loras, base.params, batch, loss_config, active, **static
        )
        for (adapter, _), acc in zip(items, new_accs, strict=False):
            adapter.grad_acc = acc
        base.return_zero_grads(first, list(new_accs[k:]))  # inactive slots come back unchanged
    else:
        loss, metrics, logprobs = steps.evaluate_many(loras, base.params, batch, loss_config, **static)
    logprobs, metrics = np.asarray(logprobs), jax.device_get(metrics)
    results = []
    for i, (_, prepared) in enumerate(items):
        outputs: list[np.ndarray | None] = [None] * prepared.num_data
        members, host = prepared.batches[0]
        _scatter_outputs(outputs, members, host, logprobs[i])
        results.append((loss_outputs(outputs), {key: float(v[i]) for key, v in metrics.items()}))
    return results


def check_compatible(meta: dict, identity: dict, path: str) -> None:
    """Refuses a checkpoint made on another base model or with another LoRA shape."""
    identity = json.loads(json.dumps(identity))  # compare as stored (tuples become lists)
    if meta.get("model_config") != identity["model_config"]:
        raise ValueError(
            f"path: {path} was trained on base model {meta.get('base_model')!r}, which differs from "
            f"{identity['base_model']!r} (architecture or sizes do not match)"
        )
    saved, ours = meta.get("lora", {}), identity["lora"]
    if bool(saved.get("full_finetune")) != bool(ours.get("full_finetune")):
        what = "a full fine-tune" if saved.get("full_finetune") else "a LoRA"
        other = "a full fine-tuning" if ours.get("full_finetune") else "a LoRA"
        raise ValueError(f"path: {path} holds {what} checkpoint, and this is {other} client")
    for key in ("rank", "train_attn", "train_mlp", "train_unembed", "alpha", "use_rslora"):
        if saved.get(key) != ours.get(key):
            raise ValueError(
                f"path: {path} has LoRA {key}={saved.get(key)!r}, this client has {ours.get(key)!r}"
            )


def lora_from_checkpoint(
    store: CheckpointStore,
    path: str,
    config: ModelConfig,
    base_name: str,
    field: str = "path",
    *,
    params: dict | None = None,
) -> tuple[lora_lib.Lora | train.FullWeights, dict]:
    """The adapter (or a full fine-tune's weights) of a checkpoint and its metadata, after checking
    it fits ``config``.

    The LoRA layout is rebuilt from the metadata, so only the small adapter is read from disk. Full
    weights are restored into ``params``' layout (shardings included) when given, else onto the host.
    """
    meta = store.read_meta(path, field)
    spec = meta["lora"]
    identity = {"base_model": base_name, "model_config": dataclasses.asdict(config), "lora": spec}
    check_compatible(meta, identity, path)
    if spec.get("full_finetune"):  # f32 master weights (older checkpoints are cast on restore)
        if params is not None:

            def master(p):
                return jax.ShapeDtypeStruct(p.shape, train.master_dtype(p.dtype), sharding=p.sharding)

            skeleton = jax.tree.map(master, params)
        else:
            flat = {k: jax.ShapeDtypeStruct(v, jnp.float32) for k, v in param_shapes(config).items()}
            skeleton = traverse_util.unflatten_dict(flat)
        restored, meta = store.restore(path, {"lora": skeleton}, field)
        return train.FullWeights(restored["lora"]), meta
    template = lora_lib.init(
        config,
        spec["rank"],
        jax.random.key(0),
        alpha=spec["alpha"],
        targets=lora_lib.targets_for(spec["train_attn"], spec["train_mlp"], spec["train_unembed"]),
        use_rslora=spec.get("use_rslora", False),
    )
    restored, meta = store.restore(path, {"lora": abstract(template.weights)}, field)
    return template.replace(weights=restored["lora"]), meta


def _scatter_outputs(outputs: list, members: list[int], host: HostBatch, logprobs: np.ndarray) -> None:
    for i, p in zip(members, host.placements, strict=True):
        outputs[i] = logprobs[p.row, p.start : p.start + p.length]


def differentiate(loss_fn: Callable) -> Callable:
    """``value_and_grad`` for :meth:`Adapter.forward_backward_custom` from a JAX
    ``loss_fn(data, values_list) -> (loss, metrics)`` over the whole batch."""

    def total_loss(data: list, values_list: list) -> tuple[jax.Array, dict]:
        loss, metrics = loss_fn(data, values_list)
        return jnp.asarray(loss, jnp.float32).reshape(()), metrics

    return jax.value_and_grad(total_loss, argnums=1, has_aux=True)


def loss_outputs(per_datum: list) -> list[dict[str, np.ndarray]]:
    return [{"logprobs": np.asarray(lp, np.float32)} for lp in per_datum]


def combine_metrics(parts: list[tuple[int, dict]]) -> dict[str, float]:
    """Merges micro-batch metrics by their Tinker reduction suffix (``:sum``, ``:max``, ``:min``, mean)."""
    total = sum(n for n, _ in parts)
    merged: dict[str, float] = {}
    for key in parts[0][1]:
        values = [float(m[key]) for _, m in parts]
        if key.endswith(":sum"):
            merged[key] = sum(values)
        elif key.endswith(":max"):
            merged[key] = max(values)
        elif key.endswith(":min"):
            merged[key] = min(values)
        else:
            merged[key] = sum(n * v for (n, _), v in zip(parts, values, strict=True)) / total
    return merged


@dataclasses.dataclass
class _LossCall:
    """A ``forward``/``forward_backward`` task, which may run together with other adapters'."""

    data: Sequence
    loss_name: str
    loss_fn_config: dict | None
    backward: bool


@dataclasses.dataclass
class _Task:
    fn: Callable[[], Any]
    future: Future
    adapter: Adapter | None = None  # the only state it touches; None: any state (a barrier)
    sample: Any = None  # (request, lora) for sampling tasks, batched together
    loss: _LossCall | None = None


class _Rhythm:
    """When each client last submitted one kind of work (loss steps, or sampling), the gaps before
    that, and whom it last ran with: the worker waits briefly for the clients that are due, so
    clients in lock step share one program call. ``clock`` and ``missed`` are written by submitting
    threads too, so they are read and written under the worker's lock; the rest belongs to the
    worker thread."""

    def __init__(self):
        # key -> (last submit, the gap before it, the gap before that)
        self.clock: dict[Any, tuple[float, float | None, float | None]] = {}
        self.group: dict[Any, int] = {}  # key -> the call it last shared with other clients
        self.missed: set = set()  # waited for in vain: not predicted again before its next request
        self.seconds = 0.0  # duration of the last call, bounds the wait
        self.calls = 0
        self.ticks = 0  # requests ever submitted: a burst has landed once this stops moving

    def tick(self, key: Any, now: float) -> None:
        self.ticks += 1
        last, gap, _ = self.clock.get(key, (None, None, None))
        # The latest gaps, not an average: one slow call (a compile) must not skew the next rounds.
        self.clock[key] = (now, None if last is None else now - last, gap)
        self.missed.discard(key)

    def ran(self, keys: list) -> None:
        """Records one call that ran the requests of ``keys`` together."""
        self.calls += 1
        keys = list(dict.fromkeys(keys))  # a client may send several requests at once
        for key in keys:
            if len(keys) > 1:
                self.group[key] = self.calls
            else:
                self.group.pop(key, None)

    def due(self, me: Any, now: float, deadline: float) -> set:
        """Clients other than ``me`` whose next request is due by ``deadline``: they keep a steady
        gap (the last two agree to :data:`STEADY_TOLERANCE`), the time since their last request
        (nearly) equals it, and they are not overdue by a whole gap (then they have gone quiet); or
        they shared ``me``'s last call (lock-step clients that pause together come back together,
        whatever the length of the pause). A client waited for in vain is not due again until it
        sends its next request."""
        for key in [k for k, (last, _, _) in self.clock.items() if now - last > ACTIVE_SECONDS]:
            del self.clock[key]
            self.group.pop(key, None)
            self.missed.discard(key)
        due = {
            key
            for key, (last, gap, before) in self.clock.items()
            if key != me
            and gap is not None
            and before is not None
            and abs(gap - before) <= STEADY_TOLERANCE * max(gap, before)
            and last + gap <= deadline
            and now <= last + 2 * gap + GATHER_MAX_SECONDS
        }
        group = self.group.get(me)
        if group is not None:
            due |= {key for key, g in self.group.items() if g == group and key != me}
        return due - self.missed


class Worker:
    """Runs one base model's device work on a single thread, in submission order per adapter.

    * Sampling tasks waiting in the queue are drained and run as one batch, whatever their adapters
      (a stacked LoRA: each row multiplies only its own adapter). A sampling client reads a fixed
      snapshot of weights, so it need not wait behind training work.
    * Before either kind of call, the worker waits briefly for the requests of other clients that
      are due to arrive (:class:`_Rhythm`), so clients in lock step share one call.
    * ``forward``/``forward_backward`` tasks of *different* adapters waiting together run as one
      jitted step (:func:`run_loss_group`). A task is only taken ahead of tasks of other adapters,
      never ahead of an earlier task of its own adapter nor of an untagged task (which may touch
      any adapter), so every adapter sees its requests in submission order.
    """

    def __init__(self, base: BaseModel, name: str):
        self.base = base
        self._tasks: collections.deque[_Task] = collections.deque()
        self._cond = threading.Condition()
        self._loss_rhythm = _Rhythm()  # keyed by id(adapter)
        self._sample_rhythm = _Rhythm()  # keyed by _sample_source
        self.loss_steps = 0  # loss steps run (one jitted step per group): for tests and the status page
        self.loss_requests = 0  # loss requests run; loss_requests / loss_steps is the mean group size
        self.sample_requests = 0  # sampling requests run, in
        self.sample_batches = 0  # Sampler.sample calls (one per batch of requests, any adapters)
        self.sampled_tokens = 0  # tokens the samples of those requests returned
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def close(self, timeout: float | None = 10.0) -> None:
        """Finishes queued work and stops the thread (at exit, so no device work races teardown)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _put(self, task: _Task) -> Future:
        with self._cond:
            self._tasks.append(task)
            self._cond.notify_all()
        return task.future

    def submit(self, fn: Callable[[], Any], *, adapter: Adapter | None = None) -> Future:
        """Runs ``fn()`` on the worker. ``adapter``: the only adapter ``fn`` reads or writes, so
        other adapters' loss tasks may run before it; None orders it after everything before it."""
        return self._put(_Task(fn, Future(), adapter=adapter))

    def submit_loss(
        self,
        adapter: Adapter,
        data: Sequence,
        loss_name: str,
        loss_fn_config: dict | None = None,
        *,
        backward: bool,
    ) -> Future:
        """``adapter.forward_backward(...)`` as a task: resolves to ``(outputs, metrics)``."""
        call = _LossCall(data, loss_name, loss_fn_config, backward)
        with self._cond:
            self._loss_rhythm.tick(id(adapter), time.monotonic())
        return self._put(_Task(lambda: None, Future(), adapter=adapter, loss=call))

    def submit_sample(self, request, lora) -> Future:
        with self._cond:
            self._sample_rhythm.tick(_sample_source(lora), time.monotonic())
        return self._put(_Task(lambda: None, Future(), sample=(request, lora)))

    @property
    def queue_depth(self) -> int:
        return len(self._tasks)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._tasks and not self._closed:
                    self._cond.wait()
                if not self._tasks:
                    return
                task = self._tasks.popleft()
            if task.sample is not None:
                self._run_samples(task)
            elif task.loss is not None:
                self._run_losses(task)
            elif task.future.set_running_or_notify_cancel():
                try:
                    task.future.set_result(task.fn())
                except BaseException as e:  # the worker must survive any request
                    log.debug("request failed", exc_info=True)
                    task.future.set_exception(e)
            if hostmem.release_programs_near_map_limit():
                log.warning(
                    "dropped all compiled programs: near the limit of %d memory maps", hostmem.map_limit()
                )

    # -- forward / forward_backward across adapters ----------------------------------------------
    def _take_losses(self, first: _Task) -> list[_Task]:
        """Removes (under the lock) the loss tasks that may run together with ``first``."""
        taken, seen = [first], {id(first.adapter)}
        kept: list[_Task] = []
        while self._tasks:
            task = self._tasks.popleft()
            if task.adapter is None and task.sample is None:
                kept.append(task)  # a barrier: nothing after it may move ahead of it
                break
            owner = id(task.adapter) if task.adapter is not None else None
            if task.loss is not None and owner not in seen:
                taken.append(task)
            else:
                kept.append(task)  # samples stay put; so does any later task of a seen adapter
            if owner is not None:
                seen.add(owner)
        self._tasks.extendleft(reversed(kept))
        return taken

    def _gather_window(
        self, rhythm: _Rhythm, me: Any, queued: Callable[[], set], barrier: Callable[[], bool]
    ):
        """Waits briefly for the requests of other clients that are due (see :meth:`_Rhythm.due`:
        clients in lock step submit their next requests a few ms apart), at most half the last call
        and :data:`GATHER_MAX_SECONDS`: a straggler that misses the group costs a call of its own. A
        peer that does not come costs one window, then runs apart and is no longer a peer.
        ``queued()``: the clients with a request waiting; ``barrier()``: stop waiting now."""
        now = time.monotonic()
        deadline = now + min(GATHER_MAX_SECONDS, 0.5 * rhythm.seconds)
        with self._cond:
            due = rhythm.due(me, now, deadline)
            while due and not barrier():
                missing = due - queued()
                if not missing:
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    rhythm.missed |= missing
                    return
                self._cond.wait(left)

    def _run_losses(self, first: _Task) -> None:
        self._gather_window(
            self._loss_rhythm,
            id(first.adapter),
            lambda: {id(t.adapter) for t in self._tasks if t.loss is not None},
            # an untagged task may touch any adapter: nothing after it may move ahead of it
            lambda: any(t.adapter is None and t.sample is None for t in self._tasks),
        )
        with self._cond:
            tasks = self._take_losses(first)
        started = time.monotonic()
        # Validate every request before any device work: bad input fails that request alone.
        groups: dict[Any, list[tuple[_Task, PreparedLoss]]] = {}
        alone: list[tuple[_Task, PreparedLoss]] = []
        for task in tasks:
            if not task.future.set_running_or_notify_cancel():
                continue
            call = task.loss
            try:
                prepared = task.adapter.prepare_loss(call.data, call.loss_name, call.loss_fn_config)
            except BaseException as e:
                task.future.set_exception(e)
                continue
            key = prepared.group_key(task.adapter, call.backward)
            (alone if key is None else groups.setdefault(key, [])).append((task, prepared))
        runs = [[item] for item in alone]
        for items in groups.values():
            runs.extend(self._split_to_budget(items))
        for items in runs:
            self.loss_steps += 1
            self.loss_requests += len(items)
            self._loss_rhythm.ran([id(task.adapter) for task, _ in items])
            backward = items[0][0].loss.backward
            try:
                if len(items) == 1:
                    task, prepared = items[0]
                    results = [task.adapter.run_loss(prepared, backward=backward)]
                else:
                    pairs = [(task.adapter, prepared) for task, prepared in items]
                    results = run_loss_group(self.base, pairs, backward=backward)
            except BaseException as e:
                log.debug("loss step failed", exc_info=True)
                for task, _ in items:
                    task.future.set_exception(e)
                continue
            for (task, _), result in zip(items, results, strict=True):
                task.future.set_result(result)
        self._loss_rhythm.seconds = time.monotonic() - started

    def _split_to_budget(self, items: list) -> list[list]:
        """Groups whose stacked ``[K_bucket, B, T]`` batch fits the base's token budget."""
        runs: list[list] = []
        for item in items:
            batch = item[1].batches[0][1].batch
            if runs:
                group = runs[-1] + [item]
                rows = max(i[1].batches[0][1].batch.tokens.shape[0] for i in group)
                length = max(i[1].batches[0][1].batch.tokens.shape[1] for i in group)
                slots = batch_bucket(len(group))
                if slots * rows * length <= max(self.base.max_tokens_per_batch, batch.tokens.size):
                    runs[-1] = group
                    continue
            runs.append([item])
        return runs

    # -- sampling ----------------------------------------------------------------------------------
    def _wait_for_burst(self, rhythm: _Rhythm, quiet: float, longest: float) -> None:
        """Returns once no request of ``rhythm``'s kind has arrived for ``quiet`` seconds (a burst of
        requests sent at once has landed), or after ``longest`` seconds if they keep coming."""
        deadline = time.monotonic() + longest
        with self._cond:
            seen, quiet_until = rhythm.ticks, time.monotonic() + quiet
            while not self._closed:
                now = time.monotonic()
                if rhythm.ticks != seen:
                    seen, quiet_until = rhythm.ticks, now + quiet
                end = min(quiet_until, deadline)
                if now >= end:
                    return
                self._cond.wait(end - now)  # woken early by any new task

    def _run_samples(self, first: _Task) -> None:
        # Concurrent requests run as one batch: a lone one waits one quiet period, a burst up to half
        # the last call (bounded, so a steady stream of requests cannot hold the batch back).
        last = self._sample_rhythm.seconds
        quiet = min(max(0.05 * last, SAMPLE_QUIET_SECONDS[0]), SAMPLE_QUIET_SECONDS[1])
        self._wait_for_burst(self._sample_rhythm, quiet, min(GATHER_MAX_SECONDS, max(4 * quiet, 0.5 * last)))
        self._gather_window(
            self._sample_rhythm,
            _sample_source(first.sample[1]),
            lambda: {_sample_source(t.sample[1]) for t in self._tasks if t.sample is not None},
            lambda: False,  # sampling reads fixed snapshots: it never waits behind other work
        )
        started = time.monotonic()
        with self._cond:  # take every queued sampling request; everything else keeps its order
            tasks = [first] + [t for t in self._tasks if t.sample is not None]
            rest = [t for t in self._tasks if t.sample is None]
            self._tasks.clear()
            self._tasks.extend(rest)
        groups: dict[Any, list[_Task]] = {}
        for task in tasks:
            if not task.future.set_running_or_notify_cancel():
                continue
            try:
                self.base.sampler.validate(task.sample[0])
            except BaseException as e:
                task.future.set_exception(e)
                continue
            groups.setdefault(_sample_group_key(task.sample[1]), []).append(task)
        if None in groups and len(groups) > 1:  # base-model requests ride along with any LoRA group
            base_tasks = groups.pop(None)
            next(iter(groups.values())).extend(base_tasks)
        for group in groups.values():
            self.sample_batches += 1
            self.sample_requests += len(group)
            self._sample_rhythm.ran([_sample_source(t.sample[1]) for t in group])
            try:
                results = self.base.sampler.sample([t.sample[0] for t in group], [t.sample[1] for t in group])
            except BaseException as e:
                log.debug("sampling failed", exc_info=True)
                for task in group:
                    task.future.set_exception(e)
                continue
            for task, result in zip(group, results, strict=True):
                self.sampled_tokens += sum(len(tokens) for tokens, _, _ in result.sequences)
                task.future.set_result(result)
        self._sample_rhythm.seconds = time.monotonic() - started


def _sample_source(lora) -> int | None:
    """Which client a sampling request comes from, for the gather window: its weights' identity."""
    return None if lora is None else id(lora)


def _sample_group_key(lora) -> Any:
    """Sampling requests with equal keys share one batch: every LoRA of a layout (stacked), the base
    model (None) with them; anything else (a full fine-tune's weights) runs with its own requests."""
    if lora is None:
        return None
    if isinstance(lora, lora_lib.Lora):
        return lora_lib.layout(lora)
    return id(lora)


def _close_workers() -> None:
    for base in list(_BASE_MODELS.values()):
        base.worker.close()


atexit.register(_close_workers)

_BASE_MODELS: dict[tuple[str, str], BaseModel] = {}
_BASE_LOCK = threading.Lock()


def get_base_model(
    name: str, model_dir: Path, dtype=jnp.float32, mesh: Mesh | None = None, rules=None
) -> BaseModel:
    """Process-wide cache: every client of one base model shares one copy of its weights."""
    mesh_key = None if mesh is None else (mesh.shape_tuple, tuple(d.id for d in mesh.devices.flat))
    key = (str(Path(model_dir).resolve()), jnp.dtype(dtype).name, mesh_key, rules)
    with _BASE_LOCK:
        if key not in _BASE_MODELS:
            _BASE_MODELS[key] = BaseModel(name, Path(model_dir), dtype, mesh=mesh, rules=rules)
        return _BASE_MODELS[key]
