"""tinker-cookbook 0.6.1's own training loops against a ``jtinker serve`` process on 127.0.0.1.

* supervised: the cookbook's whole SFT loop (``supervised.train.main``) on a local JSONL chat file,
  rendered by its ``qwen3`` renderer with the tiny model's own tokenizer (ChatML specials);
* RL: its whole RL loop (``rl.train.main``), synchronous and asynchronous, on a self-contained
  environment;
* preference: its DPO loop (``preference.train_dpo.main``) on a local JSONL of comparisons;
* distillation: its on-policy distillation loop (``distillation.train_on_policy.main``);
* weights: ``weights.download`` of a training checkpoint.

The cookbook needs ``tml-renderers>=0.4.1``, which the package index lacks (only the ``tml``/Kimi
renderers import it), so it is installed without its dependencies
(``pip install --no-deps tinker-cookbook==0.6.1``; what its supervised and RL modules import is in
the ``test`` extra). These tests are skipped when it is not installed.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import httpx
import numpy as np
import pytest

pytest.importorskip("tinker_cookbook")
tinker = pytest.importorskip("tinker")

from test_server import BASE, KEY_A, ServerProcess  # noqa: E402
from tinker_cookbook import renderers  # noqa: E402
from tinker_cookbook.tokenizer_utils import get_tokenizer, register_tokenizer  # noqa: E402

COLORS = ["red", "blue", "green", "gold"]


def _jsonl(path: Path) -> list[dict]:
    """The records of a cookbook log file (``metrics.jsonl``, ``checkpoints.jsonl``)."""
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def server(tmp_path_factory, qwen3_dir):
    """Serves the tiny Qwen3 as ``tiny``; the cookbook loads that name's tokenizer from its directory
    (its registry of custom tokenizers), never from the hub."""
    from transformers import AutoTokenizer

    register_tokenizer(BASE, lambda: AutoTokenizer.from_pretrained(str(qwen3_dir)))
    os.environ.setdefault("TINKER_TELEMETRY", "0")
    proc = ServerProcess(tmp_path_factory.mktemp("cookbook_home"), qwen3_dir)
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture(autouse=True)
def _api_key(monkeypatch):
    monkeypatch.setenv("TINKER_API_KEY", KEY_A)


def test_supervised_loop_on_a_local_jsonl_file(server, tmp_path):
    """``tinker_cookbook.supervised.train.main``: renderer → datums → pipelined forward_backward +
    optim_step → final checkpoint; the mean NLL it logs falls."""
    from tinker_cookbook.supervised import train
    from tinker_cookbook.supervised.data import FromConversationFileBuilder
    from tinker_cookbook.supervised.types import ChatDatasetBuilderCommonConfig

    path = tmp_path / "chats.jsonl"
    with path.open("w") as f:
        for i in range(16):
            color = COLORS[i % len(COLORS)]
            messages = [
                {"role": "user", "content": f"item {i}: color?"},
                {"role": "assistant", "content": f"The color is {color}."},
            ]
            f.write(json.dumps({"messages": messages}) + "\n")
    model = BASE
    config = train.Config(
        log_path=str(tmp_path / "run"),
        model_name=model,
        recipe_name="jtinker_test_sft",
        renderer_name="qwen3",
        dataset_builder=FromConversationFileBuilder(
            file_path=str(path),
            common_config=ChatDatasetBuilderCommonConfig(
                model_name_for_tokenizer=model,
                renderer_name="qwen3",
                max_length=96,
                batch_size=4,
                train_on_what=renderers.TrainOnWhat.LAST_ASSISTANT_MESSAGE,
            ),
        ),
        learning_rate=2e-2,
        lr_schedule="constant",
        num_epochs=4,
        lora_rank=8,
        base_url=server.url,
        save_every=0,
        eval_every=0,
        infrequent_eval_every=0,
    )
    asyncio.run(train.main(config))

    rows = _jsonl(tmp_path / "run" / "metrics.jsonl")
    nll = [row["train_mean_nll"] for row in rows if "train_mean_nll" in row]
    assert len(nll) == 16  # 4 epochs of 4 batches
    # Medians: at this learning rate one batch of an epoch can spike (the LoRA seed is random).
    assert np.median(nll[-4:]) < 0.75 * np.median(nll[:4])
    # The final checkpoint was written through save_state / save_weights_for_sampler.
    saved = _jsonl(tmp_path / "run" / "checkpoints.jsonl")
    assert saved and saved[-1]["state_path"].startswith("tinker://")


class _VowelTask:
    """An environment whose reward is the fraction of sampled tokens that are vowels."""

    PROMPT = [{"role": "user", "content": "vowels please"}]
    FOLLOW_UP = "\nmore vowels:"

    @classmethod
    def uncached_tokens(cls, episodes: int, turns: int) -> int:
        """Prompt tokens to prefill with the prefix cache: each episode's first prompt, then each turn's
        follow-up and the last turn's final token (sampled, never fed)."""
        tokenizer = get_tokenizer(BASE)
        first = renderers.get_renderer("qwen3", tokenizer).build_generation_prompt(cls.PROMPT).length
        follow_up = len(tokenizer.encode(cls.FOLLOW_UP, add_special_tokens=False))
        return episodes * (first + (turns - 1) * (follow_up + 1))

    @staticmethod
    def dataset_builder(groups_per_batch: int, batches: int, turns: int = 1):
        """Each episode lasts ``turns`` turns: every observation extends the last one (observation,
        action, a follow-up), so the cookbook trains each episode as one datum."""
        import chz
        from tinker_cookbook.rl.types import Env, EnvGroupBuilder, RLDataset, RLDatasetBuilder, StepResult

        tokenizer = get_tokenizer(BASE)
        renderer = renderers.get_renderer("qwen3", tokenizer)
        vowel_ids = set(tokenizer.encode("aeiou", add_special_tokens=False))

        follow_up = tokenizer.encode(_VowelTask.FOLLOW_UP, add_special_tokens=False)

        class VowelEnv(Env):
            async def initial_observation(self):
                self.turn = 1
                self.context = renderer.build_generation_prompt(_VowelTask.PROMPT)
                return self.context, renderer.get_stop_sequences()

            async def step(self, action, *, extra=None):
                reward = float(np.mean([t in vowel_ids for t in action])) if action else 0.0
                done = self.turn == turns
                self.turn += 1
                self.context = tinker.ModelInput.from_ints(self.context.to_ints() + list(action) + follow_up)
                return StepResult(
                    reward=reward,
                    episode_done=done,
                    next_observation=tinker.ModelInput.empty() if done else self.context,
                    next_stop_condition=renderer.get_stop_sequences(),
                    metrics={"vowel_fraction": reward},
                )

        class VowelGroup(EnvGroupBuilder):
            async def make_envs(self):
                return [VowelEnv() for _ in range(4)]

            def logging_tags(self):
                return ["vowels"]

        class VowelDataset(RLDataset):
            def get_batch(self, index):
                return [VowelGroup() for _ in range(groups_per_batch)]

            def __len__(self):
                return batches

        @chz.chz
        class VowelDatasetBuilder(RLDatasetBuilder):
            async def __call__(self):
                return VowelDataset(), None

        return VowelDatasetBuilder()


@pytest.mark.parametrize("mode", ["sync", "async", "multiturn"])
def test_rl_training_loop_on_a_self_contained_env(server, tmp_path, monkeypatch, mode):
    """``tinker_cookbook.rl.train.main``, synchronous, off-policy (``AsyncConfig``) and with three-turn
    episodes: rollouts sampled through the server, ``ppo`` steps, a checkpoint every step
    (``save_state`` and ``save_weights_for_sampler`` with the cookbook's TTLs and metadata) and the
    final one. Synchronously the sampler's logprobs equal the learner's, at every turn's depth."""
    from tinker_cookbook.rl import train

    monkeypatch.setattr(train, "fetch_model_pricing", lambda *a, **k: None)  # a URL fetch: stay offline
    async_config = None
    if mode == "async":
        async_config = train.AsyncConfig(max_steps_off_policy=1, groups_per_batch=2, loss_fn="ppo")
    config = train.Config(
        learning_rate=5e-2,
        dataset_builder=_VowelTask.dataset_builder(
            groups_per_batch=2, batches=2, turns=3 if mode == "multiturn" else 1
        ),
        model_name=BASE,
        recipe_name="jtinker_test_rl",
        max_tokens=8,
        log_path=str(tmp_path / "run"),
        renderer_name="qwen3",
        lora_rank=8,
        loss_fn="ppo",
        async_config=async_config,
        base_url=server.url,
        eval_every=0,
        save_every=1,
        num_groups_to_log=0,
    )
    asyncio.run(train.main(config))

    rows = _jsonl(tmp_path / "run" / "metrics.jsonl")
    steps = [row for row in rows if "env/all/reward/total" in row]
    assert len(steps) == 2
    for row in steps:
        assert np.isfinite(row["env/all/reward/total"]) and 0.0 <= row["env/all/vowel_fraction"] <= 1.0
        assert np.isfinite(row["grad_norm:mean"]) and "optim/entropy" in row
        assert row["env/all/turns_per_episode"] == (3 if mode == "multiturn" else 1)
        if mode == "multiturn":  # later turns prefill only the follow-up after the last turn's sequence
            assert row["tokens/prefill_uncached"] <= _VowelTask.uncached_tokens(episodes=8, turns=3)
        if mode != "async":  # sampler and learner share weights: their logprobs agree, token by token
            assert abs(row["optim/kl_sample_train_v1"]) < 1e-4 and row["optim/kl_sample_train_v2"] < 1e-8
        else:
            assert "async/staleness_max" in row
    saved = _jsonl(tmp_path / "run" / "checkpoints.jsonl")
    assert len(saved) >= 2 and all(row["state_path"].startswith("tinker://") for row in saved)
    assert saved[-1]["sampler_path"].startswith("tinker://")


def test_weights_download_of_a_training_checkpoint(server, tmp_path):
    """``tinker_cookbook.weights.download``: it loads the checkpoint into a new run, exports it
    age-encrypted to a key it generates, downloads and decrypts the files and deletes the export."""
    from tinker_cookbook.weights import download

    service = tinker.ServiceClient(base_url=server.url)
    training = service.create_lora_training_client(BASE, rank=8, seed=4).result()
    datum = tinker.Datum(
        model_input=tinker.ModelInput.from_ints([5, 6, 7, 8]),
        loss_fn_inputs={"target_tokens": [6, 7, 8, 9], "weights": [1.0] * 4},
    )
    training.forward_backward([datum], "cross_entropy").result()
    training.optim_step(tinker.AdamParams(learning_rate=1e-2)).result()
    state = training.save_state("to-download").result().path
    plain = training.save_weights_external("plain").result().path
    rest = tinker.RestClient(base_url=server.url)
    before = {c.tinker_path for c in rest.list_user_checkpoints(limit=1000).result().checkpoints}

    out = download(tinker_path=state, output_dir=str(tmp_path / "adapter"), base_url=server.url)
    got = {p.name: p.read_bytes() for p in Path(out).iterdir() if not p.name.startswith(".")}
    urls = rest.get_external_weights_urls(plain).result().urls
    assert sorted(got) == sorted(urls) == ["adapter_config.json", "adapter_model.safetensors"]
    for name, url in urls.items():  # the decrypted files are the plaintext export, byte for byte
        assert got[name] == httpx.get(url, timeout=30).content
    after = {c.tinker_path for c in rest.list_user_checkpoints(limit=1000).result().checkpoints}
    assert [p for p in after - before if "external_weights" in p] == []  # its encrypted export is gone


def test_dpo_loop_on_local_comparisons(server, tmp_path):
    """``tinker_cookbook.preference.train_dpo.main``: its reference is a sampling client of the initial
    weights (``save_weights_and_get_sampling_client``), its loss a torch function run through
    ``forward_backward_custom`` over the wire. The reference's logprobs equal the learner's at the
    start, so the first loss is exactly DPO's ln 2; preferring the chosen answer drives it down."""
    from tinker_cookbook.preference import train_dpo
    from tinker_cookbook.preference.dpo_datasets import DPODatasetBuilderFromComparisons
    from tinker_cookbook.preference.preference_datasets import ComparisonBuilderFromJsonl
    from tinker_cookbook.supervised.types import ChatDatasetBuilderCommonConfig

    path = tmp_path / "comparisons.jsonl"
    with path.open("w") as f:
        for i in range(16):
            comparison = {
                "prompt_conversation": [{"role": "user", "content": f"item {i}: pick a color"}],
                "completion_A": [{"role": "assistant", "content": "red red red"}],
                "completion_B": [{"role": "assistant", "content": COLORS[1 + i % 3]}],
            }
            f.write(json.dumps({"comparison": comparison, "label": "A"}) + "\n")
    config = train_dpo.Config(
        log_path=str(tmp_path / "run"),
        model_name=BASE,
        recipe_name="jtinker_test_dpo",
        renderer_name="qwen3",
        dataset_builder=DPODatasetBuilderFromComparisons(
            common_config=ChatDatasetBuilderCommonConfig(
                model_name_for_tokenizer=BASE, renderer_name="qwen3", max_length=64, batch_size=4
            ),
            comparison_builder=ComparisonBuilderFromJsonl(train_path=str(path)),
        ),
        learning_rate=1e-2,
        lr_schedule="constant",
        num_epochs=2,
        lora_rank=8,
        base_url=server.url,
        save_every=0,
        eval_every=0,
        infrequent_eval_every=0,
    )
    train_dpo.main(config)

    rows = _jsonl(tmp_path / "run" / "metrics.jsonl")
    steps = [row for row in rows if "dpo_loss" in row]
    assert len(steps) == 8  # 2 epochs of 4 pairs-batches
    assert steps[0]["dpo_loss"] == pytest.approx(np.log(2), abs=1e-4)
    assert steps[0]["margin"] == pytest.approx(0.0, abs=1e-3)
    assert steps[-1]["dpo_loss"] < 0.2 and steps[-1]["accuracy"] == 1.0 and steps[-1]["margin"] > 1.5


def test_on_policy_distillation_loop(server, tmp_path):
    """``tinker_cookbook.distillation.train_on_policy.main``: the student starts from a state
    checkpoint fine-tuned to answer "red" (``create_training_client_from_state``); the teacher is
    the base model's sampling client, whose ``compute_logprobs`` gives the reverse-KL advantages
    of ``importance_sampling`` steps. The student's sampled answers move back to the teacher's."""
    import chz
    from tinker_cookbook.distillation import train_on_policy
    from tinker_cookbook.distillation.datasets import (
        DistillationDatasetConfig,
        PromptOnlyDataset,
        TeacherConfig,
    )
    from tinker_cookbook.rl.types import RLDatasetBuilder
    from tinker_cookbook.supervised.data import conversation_to_datum

    prompts = [f"item {i}: color?" for i in range(24)]  # 6 steps of 4 groups
    tokenizer = get_tokenizer(BASE)
    renderer = renderers.get_renderer("qwen3", tokenizer)

    @chz.chz
    class Prompts(RLDatasetBuilder):
        async def __call__(self):
            dataset = PromptOnlyDataset(
                prompts=prompts, batch_size=4, group_size=8, renderer=renderer, tokenizer=tokenizer
            )
            return dataset, None

    service = tinker.ServiceClient(base_url=server.url)
    training = service.create_lora_training_client(BASE, rank=8, seed=3).result()
    red = [
        conversation_to_datum(
            [{"role": "user", "content": p}, {"role": "assistant", "content": "red"}],
            renderer, 64, renderers.TrainOnWhat.LAST_ASSISTANT_MESSAGE,
        )
        for p in prompts[:8]
    ]  # fmt: skip
    # A few steps only: a student still a little unsure of "red" gets a reverse-KL gradient from its
    # first step, where a certain one waits on rare other samples and its drop comes late and at random.
    for _ in range(4):
        training.forward_backward(red, "cross_entropy").result()
        training.optim_step(tinker.AdamParams(learning_rate=3e-2)).result()
    student = training.save_state("red-student").result().path

    config = train_on_policy.Config(
        learning_rate=1e-2,
        dataset_configs=[
            DistillationDatasetConfig(
                dataset_builder=Prompts(), teacher_config=TeacherConfig(base_model=BASE), groups_per_batch=4
            )
        ],
        model_name=BASE,
        recipe_name="jtinker_test_distillation",
        renderer_name="qwen3",
        max_tokens=1,
        lora_rank=8,
        load_checkpoint_path=student,
        log_path=str(tmp_path / "run"),
        base_url=server.url,
        eval_every=0,
        save_every=0,
    )
    asyncio.run(train_on_policy.main(config))

    rows = _jsonl(tmp_path / "run" / "metrics.jsonl")
    kl = [row["teacher_kl"] for row in rows if "teacher_kl" in row]
    assert len(kl) == 6
    assert kl[0] > 1.0  # the fine-tuned student is far from the base teacher
    assert max(kl[-4:]) < 0.25 * kl[0]  # near the teacher by mid-run (measured: ~0.1 of it), and it stays
    sample_train_kl = [row["optim/kl_sample_train_v1"] for row in rows if "optim/kl_sample_train_v1" in row]
    assert len(sample_train_kl) == 6 and max(map(abs, sample_train_kl)) < 1e-4  # sampler == learner
