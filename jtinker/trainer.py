"""``jtinker train CONFIG``: SFT, RL and DPO loops over the in-process Tinker API, resumable exactly.

Each job is a loop a user could have written against ``import jtinker as tinker``; this module adds the
bookkeeping a long run needs:

- ``OUT/metrics.jsonl``: one line per step (step, loss, lr, tokens, seconds, ``data_crc`` of the batch,
  and ``eval/...`` metrics on evaluation steps); ``OUT/checkpoints.jsonl``: the checkpoint index, each
  entry with its ``tinker://`` path and the data iterator's position; ``OUT/config.json``;
  ``OUT/summary.json`` at the end; TensorBoard events under ``OUT/tensorboard`` when asked for.
- Resume: rerunning the same config continues from the last checkpoint (weights, Adam state, step and
  data position), so an interrupted run and an uninterrupted one log the same losses on the same data.

Sampling seeds are derived from ``(seed, step, prompt)``, so RL resumes deterministically too.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import json
import math
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jtinker import data as data_lib
from jtinker import types
from jtinker.checkpoints import CheckpointPath
from jtinker.configs import ConfigError, OptimSection, TrainConfig, config_to_dict

__all__ = [
    "learning_rate_at",
    "rl_datum",
    "group_advantages",
    "full_sequence",
    "sequence_logprob",
    "run",
]

# Changing these between a run and its resume would change what the run computes.
_RESUMABLE_CHANGES = {"steps", "save_every", "eval_every", "progress", "tensorboard", "resume"}


# --------------------------------------------------------------------------------------------------
# Building blocks (also used by examples/)


def learning_rate_at(optim: OptimSection, step: int, total_steps: int) -> float:
    """Linear warmup over ``warmup_steps``, then constant, linear or cosine decay to ``min_lr_ratio``."""
    peak = optim.learning_rate
    if step < optim.warmup_steps:
        return peak * (step + 1) / optim.warmup_steps
    if optim.schedule == "constant":
        return peak
    progress = min(1.0, (step - optim.warmup_steps) / max(1, total_steps - optim.warmup_steps))
    shape = 1 - progress if optim.schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
    return peak * (optim.min_lr_ratio + (1 - optim.min_lr_ratio) * shape)


def rl_datum(
    prompt: Sequence[int],
    completion: Sequence[int],
    logprobs: Sequence[float],
    advantage: float,
    *,
    sequence_ratio_mask: bool = False,
) -> types.Datum:
    """A policy-gradient datum: prompt positions get advantage 0; completion tokens get ``advantage``.

    ``sequence_ratio_mask=True`` adds the input ``gspo`` takes: 1 on the completion tokens.
    """
    tokens = list(prompt) + list(completion)
    n_prompt = len(prompt) - 1  # targets are tokens[1:], so the first completion token is target n_prompt
    inputs = {
        "target_tokens": tokens[1:],
        "logprobs": [0.0] * n_prompt + list(logprobs),
        "advantages": [0.0] * n_prompt + [advantage] * len(completion),
    }
    if sequence_ratio_mask:
        inputs["sequence_ratio_mask"] = [0.0] * n_prompt + [1.0] * len(completion)
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]), loss_fn_inputs=inputs)


def group_advantages(rewards: Sequence[float]) -> list[float]:
    """Group-relative advantages: each reward minus the group's mean (GRPO without the std division)."""
    mean = sum(rewards) / len(rewards)
    return [r - mean for r in rewards]


def full_sequence(datum: types.Datum) -> types.ModelInput:
    """A next-token datum's whole token sequence: its inputs plus the final target."""
    tokens = datum.model_input.to_ints() + [int(datum.loss_fn_inputs["target_tokens"].tolist()[-1])]
    return types.ModelInput.from_ints(tokens)


def sequence_logprob(logprobs: Sequence[float | None], weights: Sequence[float]) -> float:
    """Weighted sum of ``compute_logprobs`` output (whose first entry is None) over a datum's targets."""
    return float(sum(lp * w for lp, w in zip(logprobs[1:], weights, strict=True)))


def _weights(datum: types.Datum) -> np.ndarray:
    return np.asarray(datum.loss_fn_inputs["weights"].to_numpy(), np.float32)


def _batch_tokens(batch: Sequence[types.Datum] | Sequence[PromptAnswer]) -> list[list[int]]:
    return [d.model_input.to_ints() if isinstance(d, types.Datum) else d.tokens for d in batch]


def _data_crc(batch: Sequence[types.Datum] | Sequence[PromptAnswer]) -> int:
    """A fingerprint of a batch's tokens, logged so two runs can be checked to see the same data."""
    crc = 0
    for tokens in _batch_tokens(batch):
        crc = zlib.crc32(np.asarray(tokens, np.int64).tobytes(), crc)
    return crc


def exact_match(prompt: str, completion: str, answer: str) -> float:
    return float(completion.strip() == answer.strip())


def match_fraction(prompt: str, completion: str, answer: str) -> float:
    """The share of answer characters the completion gets right in place: partial credit for RL."""
    completion, answer = completion.strip(), answer.strip()
    hits = sum(a == b for a, b in zip(completion, answer, strict=False))
    return hits / max(len(completion), len(answer), 1)


REWARDS = {"exact_match": exact_match, "match_fraction": match_fraction}


def _load_reward(spec: str) -> Callable[[str, str, str], float]:
    """A built-in reward (:data:`REWARDS`), ``package.module:function`` or ``path/to/file.py:function``."""
    if spec in REWARDS:
        return REWARDS[spec]
    module_name, _, fn_name = spec.rpartition(":")
    try:
        if module_name.endswith(".py"):
            file_spec = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
            if file_spec is None or file_spec.loader is None:
                raise ImportError(f"cannot load {module_name}")
            module = importlib.util.module_from_spec(file_spec)
            file_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
        return getattr(module, fn_name)
    except (ImportError, AttributeError, OSError) as exc:
        raise ConfigError(f"rl.reward: cannot load {spec!r}: {exc}") from None


# --------------------------------------------------------------------------------------------------
# Prompts with reference answers (RL and exact-match evaluation)


@dataclasses.dataclass(frozen=True)
class PromptAnswer:
    text: str
    tokens: list[int]
    answer: str


def prompt_answers(tokenizer: Any, path: str) -> list[PromptAnswer]:
    """Prompt/completion rows, or chat rows whose last message is the assistant's reference answer."""
    kind, rows = data_lib.load_jsonl(path)
    out = []
    for row in rows:
        if kind == "prompt_completion":
            text, answer = row["prompt"], row["completion"]
            tokens = list(tokenizer.encode(text, add_special_tokens=False))
        elif kind == "chat" and row["messages"][-1]["role"] == "assistant":
            messages = row["messages"][:-1]
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            tokens = list(tokenizer.encode(text, add_special_tokens=False))
            answer = row["messages"][-1]["content"]
        else:
            raise data_lib.DataError(
                f"{row['_where']}: needs a reference answer: a prompt/completion row, or chat messages "
                "ending with the assistant's answer"
            )
        out.append(PromptAnswer(text, tokens, answer))
    return out


def _generate(sampler: Any, prompts: Sequence[PromptAnswer], params: types.SamplingParams, n: int):
    # Submit every request before waiting on any, so the engine decodes them as one batch.
    return [sampler.sample(types.ModelInput.from_ints(p.tokens), n, params) for p in prompts]


def _decode(tokenizer: Any, tokens: Sequence[int]) -> str:
    return tokenizer.decode(list(tokens), skip_special_tokens=True)


# --------------------------------------------------------------------------------------------------
# Run bookkeeping


class RunLog:
    """``metrics.jsonl``, ``checkpoints.jsonl`` and ``config.json`` in a run's output directory."""

    def __init__(self, out_dir: Path, config: TrainConfig):
        self.out_dir = out_dir
        self.metrics_path = out_dir / "metrics.jsonl"
        self.index_path = out_dir / "checkpoints.jsonl"
        self.config_path = out_dir / "config.json"
        out_dir.mkdir(parents=True, exist_ok=True)
        self.resume_from: dict | None = None
        saved = self._read_lines(self.index_path)
        if config.resume and saved:
            self._check_same_run(config)
            self.resume_from = saved[-1]
            kept = [m for m in self._read_lines(self.metrics_path) if m["step"] <= saved[-1]["step"]]
            self._write_lines(self.metrics_path, kept)  # steps after the checkpoint will be redone
        else:
            self._write_lines(self.metrics_path, [])
            self._write_lines(self.index_path, [])
        self.config_path.write_text(json.dumps(config_to_dict(config), indent=2) + "\n")
        self._tensorboard = self._open_tensorboard() if config.tensorboard else None

    def _check_same_run(self, config: TrainConfig) -> None:
        if not self.config_path.is_file():
            return
        before = json.loads(self.config_path.read_text())
        now = json.loads(json.dumps(config_to_dict(config)))
        changed = sorted(_diff(before, now) - _RESUMABLE_CHANGES)
        if changed:
            raise ConfigError(
                f"out_dir: {self.out_dir} holds a run with a different {', '.join(changed)}; "
                "resume it with the same config, pass resume=false to start over, or choose another out_dir"
            )

    def _open_tensorboard(self):
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            raise ConfigError(
                "tensorboard: needs the tensorboardX package (pip install tensorboardX)"
            ) from None
        return SummaryWriter(str(self.out_dir / "tensorboard"))

    @staticmethod
    def _read_lines(path: Path) -> list[dict]:
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    @staticmethod
    def _write_lines(path: Path, lines: list[dict]) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(line) + "\n" for line in lines))
        tmp.replace(path)

    def log(self, metrics: dict[str, Any]) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(metrics) + "\n")
        if self._tensorboard is not None:
            for key, value in metrics.items():
                if key != "step" and isinstance(value, int | float):
                    self._tensorboard.add_scalar(key, value, metrics["step"])
            self._tensorboard.flush()

    def checkpoint(self, entry: dict[str, Any]) -> None:
        # Appended only once the checkpoint is durable, so every entry can be resumed from.
        with self.index_path.open("a") as f:
            f.write(json.dumps(entry) + "\n")

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()


def _diff(a: Any, b: Any, prefix: str = "") -> set[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return set().union(*(_diff(a.get(k), b.get(k), f"{prefix}{k}.") for k in a.keys() | b.keys()))
    return set() if a == b else {prefix.rstrip(".")}


# --------------------------------------------------------------------------------------------------
# Jobs: each turns one batch into one optimizer step


class _Job:
    """Shared state of a run: clients, tokenizer, the data iterator and the evaluation set."""

    row_kinds: tuple[data_lib.RowKind, ...] = ("chat", "prompt_completion")

    def __init__(self, config: TrainConfig, service: Any, training: Any):
        self.config = config
        self.service = service
        self.training = training
        self.tokenizer = training.get_tokenizer()
        self.eos = self.tokenizer.eos_token_id
        self.iterator = self._iterator()

    def _iterator(self) -> Iterator:
        ds = self._dataset(self.config.data.train)
        # Every process feeds the whole batch (the engine shards rows over devices), so no data sharding.
        pipeline = data_lib.make_pipeline(
            ds,
            batch_size=self.config.data.batch_size,
            seed=self.config.seed,
            shuffle=self.config.data.shuffle,
            num_epochs=None,
            shard_index=0,
            shard_count=1,
        )
        return iter(pipeline)

    def _dataset(self, path: str):
        return data_lib.jsonl_dataset(path, self.tokenizer, expect=self.row_kinds)

    def _eval_datums(self) -> list[types.Datum]:
        if not self.config.data.eval:
            return []
        ds = self._dataset(self.config.data.eval)
        return [d for i in range(min(len(ds), self.config.data.eval_size)) for d in data_lib.to_datums(ds[i])]

    def next_batch(self) -> tuple[Any, dict]:
        batch = next(self.iterator)
        return batch, self.iterator.get_state()

    def set_data_state(self, state: dict) -> None:
        self.iterator.set_state(state)

    def adam(self, lr: float) -> types.AdamParams:
        o = self.config.optim
        return types.AdamParams(
            learning_rate=lr,
            beta1=o.beta1,
            beta2=o.beta2,
            eps=o.eps,
            weight_decay=o.weight_decay,
            grad_clip_norm=o.grad_clip_norm,
        )

    def submit(self, step: int, batch: Any, lr: float) -> Callable[[], dict]:
        """Submits the step's device work and returns a function that waits for its metrics."""
        raise NotImplementedError

    def evaluate(self) -> dict[str, float]:
        return {}


class SFTJob(_Job):
    def __init__(self, config: TrainConfig, service: Any, training: Any):
        super().__init__(config, service, training)
        self.eval_data = self._eval_datums()
        self.eval_prompts: list[PromptAnswer] = []
        if config.data.eval:
            try:
                self.eval_prompts = prompt_answers(self.tokenizer, config.data.eval)[: len(self.eval_data)]
            except data_lib.DataError:
                self.eval_prompts = []  # chat rows not ending in an answer: loss only, no exact match

    def submit(self, step: int, batch: list[types.Datum], lr: float) -> Callable[[], dict]:
        fb = self.training.forward_backward(batch, self.config.loss)
        opt = self.training.optim_step(self.adam(lr))
        weight = float(sum(_weights(d).sum() for d in batch))

        def wait() -> dict:
            metrics = fb.result().metrics
            opt.result()
            return {"loss": metrics["loss:sum"] / max(weight, 1.0)}

        return wait

    def evaluate(self) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.eval_data:
            metrics = self.training.forward(self.eval_data, self.config.loss).result().metrics
            weight = sum(_weights(d).sum() for d in self.eval_data)
            out["eval/loss"] = metrics["loss:sum"] / max(float(weight), 1.0)
        if self.eval_prompts:
            out["eval/accuracy"] = exact_match_accuracy(
                self.training.save_weights_and_get_sampling_client(),
                self.tokenizer,
                self.eval_prompts,
                max_tokens=self.config.data.eval_max_tokens,
            )
        return out


def exact_match_accuracy(
    sampler: Any, tokenizer: Any, prompts: Sequence[PromptAnswer], max_tokens: int
) -> float:
    """Greedy exact-match accuracy of completions against the reference answers."""
    stop = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else None
    params = types.SamplingParams(max_tokens=max_tokens, temperature=0.0, stop=stop)
    futures = _generate(sampler, prompts, params, 1)
    hits = [
        _decode(tokenizer, f.result().sequences[0].tokens).strip() == p.answer.strip()
        for f, p in zip(futures, prompts, strict=True)
    ]
    return sum(hits) / len(hits)


class RLJob(_Job):
    """Group-relative policy gradient on prompts with reference answers, sampling from the current policy."""

    def __init__(self, config: TrainConfig, service: Any, training: Any):
        self.reward = _load_reward(config.rl.reward)
        super().__init__(config, service, training)
        self.eval_prompts = (
            prompt_answers(self.tokenizer, config.data.eval)[: config.data.eval_size]
            if config.data.eval
            else []
        )

    def _iterator(self) -> Iterator:
        import grain

        prompts = prompt_answers(self.tokenizer, self.config.data.train)
        ds = grain.MapDataset.source(prompts)
        if self.config.data.shuffle:
            ds = ds.shuffle(seed=self.config.seed)
        ds = ds.repeat(None).batch(self.config.data.batch_size, batch_fn=list)
        return iter(ds.to_iter_dataset())

    def submit(self, step: int, batch: list[PromptAnswer], lr: float) -> Callable[[], dict]:
        rl = self.config.rl
        sampler = self.training.save_weights_and_get_sampling_client()
        stop = [self.eos] if self.eos is not None else None
        futures = [
            sampler.sample(
                types.ModelInput.from_ints(p.tokens),
                rl.group_size,
                types.SamplingParams(
                    max_tokens=rl.max_tokens,
                    temperature=rl.temperature,
                    stop=stop,
                    seed=_seed(self.config.seed, step, i),
                ),
            )
            for i, p in enumerate(batch)
        ]
        datums, rewards = [], []
        # GSPO takes the completion tokens as a sequence_ratio_mask.
        make_datum = functools.partial(rl_datum, sequence_ratio_mask=rl.loss == "gspo")
        for prompt, future in zip(batch, futures, strict=True):
            sequences = future.result().sequences
            group = [
                float(self.reward(prompt.text, _decode(self.tokenizer, s.tokens), prompt.answer))
                for s in sequences
            ]
            rewards += group
            for seq, advantage in zip(sequences, group_advantages(group), strict=True):
                if advantage != 0 and len(seq.tokens):  # all-equal groups carry no signal
                    datums.append(make_datum(prompt.tokens, seq.tokens, seq.logprobs, advantage))
        metrics: dict[str, Any] = {"reward": sum(rewards) / len(rewards), "datums": len(datums)}
        if not datums:
            return lambda: {**metrics, "loss": 0.0}
        fb = self.training.forward_backward(datums, rl.loss)
        opt = self.training.optim_step(self.adam(lr))
        n_tokens = sum(len(d.model_input.to_ints()) for d in datums)

        def wait() -> dict:
            loss = fb.result().metrics["loss:sum"]
            opt.result()
            return {**metrics, "loss": loss / n_tokens, "rl_tokens": n_tokens}

        return wait

    def evaluate(self) -> dict[str, float]:
        if not self.eval_prompts:
            return {}
        sampler = self.training.save_weights_and_get_sampling_client()
        stop = [self.eos] if self.eos is not None else None
        params = types.SamplingParams(max_tokens=self.config.rl.max_tokens, temperature=0.0, stop=stop)
        futures = _generate(sampler, self.eval_prompts, params, 1)
        rewards = [
            float(self.reward(p.text, _decode(self.tokenizer, f.result().sequences[0].tokens), p.answer))
            for f, p in zip(futures, self.eval_prompts, strict=True)
        ]
        return {"eval/reward": sum(rewards) / len(rewards)}


def _seed(seed: int, step: int, index: int) -> int:
    return zlib.crc32(f"{seed}:{step}:{index}".encode()) & 0x7FFFFFFF


class DPOJob(_Job):
    """DPO through ``forward_backward_custom``; reference logprobs come from the base model."""

    row_kinds = ("preference",)

    def __init__(self, config: TrainConfig, service: Any, training: Any):
        super().__init__(config, service, training)
        self.reference = service.create_sampling_client(base_model=config.base_model)
        self.eval_data = self._eval_datums()

    def _reference(self, batch: list[types.Datum]) -> tuple[np.ndarray, np.ndarray]:
        futures = [self.reference.compute_logprobs(full_sequence(d)) for d in batch]
        ref = np.array(
            [sequence_logprob(f.result(), _weights(d)) for f, d in zip(futures, batch, strict=True)]
        )
        return ref[0::2], ref[1::2]

    def submit(self, step: int, batch: list[types.Datum], lr: float) -> Callable[[], dict]:
        import jax.numpy as jnp

        from jtinker.losses import dpo_loss

        ref_chosen, ref_rejected = self._reference(batch)
        weights = [jnp.asarray(_weights(d)) for d in batch]
        beta = self.config.dpo.beta

        def loss_fn(data, logprobs_list):
            seq = jnp.stack([jnp.sum(lp * w) for lp, w in zip(logprobs_list, weights, strict=True)])
            return dpo_loss(seq[0::2], seq[1::2], ref_chosen, ref_rejected, beta=beta)

        fb = self.training.forward_backward_custom(batch, loss_fn)
        opt = self.training.optim_step(self.adam(lr))

        def wait() -> dict:
            metrics = fb.result().metrics
            opt.result()
            return {
                "loss": metrics["dpo_loss"],
                **{k: metrics[k] for k in ("accuracy", "margin", "chosen_reward", "rejected_reward")},
            }

        return wait

    def evaluate(self) -> dict[str, float]:
        if not self.eval_data:
            return {}
        from jtinker.losses import dpo_loss

        outputs = self.training.forward(self.eval_data, "cross_entropy").result().loss_fn_outputs
        policy = np.array(
            [
                float(np.sum(out["logprobs"].to_numpy() * _weights(d)))
                for out, d in zip(outputs, self.eval_data, strict=True)
            ]
        )
        ref_chosen, ref_rejected = self._reference(self.eval_data)
        _, metrics = dpo_loss(policy[0::2], policy[1::2], ref_chosen, ref_rejected, beta=self.config.dpo.beta)
        return {"eval/dpo_loss": float(metrics["dpo_loss"]), "eval/accuracy": float(metrics["accuracy"])}


JOBS: dict[str, type[_Job]] = {"sft": SFTJob, "rl": RLJob, "dpo": DPOJob}


# --------------------------------------------------------------------------------------------------
# The loop


def run(config: TrainConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Runs (or resumes) the job in ``config`` and returns the summary written to ``OUT/summary.json``."""
    import jax.numpy as jnp
    from tqdm.auto import tqdm

    import jtinker as tinker
    from jtinker.cli import export_checkpoint_peft

    start = time.perf_counter()
    out_dir = Path(config.out_dir).expanduser().resolve()
    runlog = RunLog(out_dir, config)
    service = tinker.ServiceClient(dtype=jnp.dtype(config.dtype), mesh=config.mesh)
    resume = runlog.resume_from
    load_start = time.perf_counter()
    if resume is not None:
        training = service.create_training_client_from_state_with_optimizer(
            resume["path"],
            base_model=config.base_model,
            model_id=CheckpointPath.parse(resume["path"]).run_id,  # one run id across resumes
        )
        log(f"resuming   {resume['path']} (step {resume['step']})")
    else:
        lora = config.lora
        training = service.create_lora_training_client(
            base_model=config.base_model,
            rank=lora.rank,
            seed=config.seed if lora.seed is None else lora.seed,
            train_attn=lora.train_attn,
            train_mlp=lora.train_mlp,
            train_unembed=lora.train_unembed,
        )
        if config.init_from:
            path = _initial_checkpoint(config.init_from)
            training.load_state(path).result()
            log(f"init from  {path}")
    log(f"base model {config.base_model} (loaded in {time.perf_counter() - load_start:.1f} s)")
    job = JOBS[config.kind](config, service, training)
    first_step = 0
    if resume is not None:
        job.set_data_state(resume["data_state"])
        first_step = resume["step"]

    last_checkpoint = resume
    metrics: dict[str, Any] = {}
    bar = tqdm(
        total=config.steps,
        initial=first_step,
        desc=config.kind.upper(),
        unit="step",
        disable=not config.progress,
        mininterval=0.25,
    )
    try:
        batch, data_state = job.next_batch() if first_step < config.steps else (None, None)
        for step in range(first_step, config.steps):
            step_start = time.perf_counter()
            lr = learning_rate_at(config.optim, step, config.steps)
            wait = job.submit(step, batch, lr)
            # Prepare the next batch on the host while the device runs this step.
            following = job.next_batch() if step + 1 < config.steps else (None, None)
            metrics = {
                "step": step + 1,
                **wait(),
                "lr": lr,
                "tokens": sum(map(len, _batch_tokens(batch))),
                "data_crc": _data_crc(batch),
            }
            number = step + 1
            if (config.eval_every and number % config.eval_every == 0) or number == config.steps:
                metrics.update(job.evaluate())
            metrics["seconds"] = round(time.perf_counter() - step_start, 4)
            runlog.log(metrics)
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}")
            if (config.save_every and number % config.save_every == 0) or number == config.steps:
                path = training.save_state(f"step_{number:06d}", overwrite=True).result().path
                last_checkpoint = {
                    "step": number,
                    "path": path,
                    "data_state": data_state,
                    "time": time.time(),
                }
                runlog.checkpoint(last_checkpoint)
            batch, data_state = following
    finally:
        bar.close()
        runlog.close()

    summary = {
        "kind": config.kind,
        "base_model": config.base_model,
        "steps": config.steps,
        "final_metrics": metrics,
        "state_path": last_checkpoint["path"] if last_checkpoint else None,
        "metrics": str(runlog.metrics_path),
        "checkpoints": str(runlog.index_path),
        "seconds": round(time.perf_counter() - start, 2),
    }
    if last_checkpoint is not None:
        summary["peft_adapter_dir"] = str(
            export_checkpoint_peft(service.store, last_checkpoint["path"], out_dir / "peft_adapter")
        )
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    for key in ("state_path", "peft_adapter_dir", "metrics", "checkpoints"):
        if summary.get(key):
            log(f"{key:<16} {summary[key]}")
    return summary


def _initial_checkpoint(init_from: str) -> str:
    """A ``tinker://`` path as is, or the last checkpoint of a ``jtinker train`` output directory."""
    if init_from.startswith("tinker://"):
        return init_from
    index = Path(init_from).expanduser() / "checkpoints.jsonl"
    entries = RunLog._read_lines(index)
    if not entries:
        raise ConfigError(
            f"init_from: {init_from!r} is neither a tinker:// path nor a run directory with checkpoints "
            f"(no entries in {index}); run its config first"
        )
    return entries[-1]["path"]
