"""tinker-cookbook 0.5.8's own building blocks against a ``jtinker serve`` process on 127.0.0.1.

* supervised: the cookbook's whole SFT loop (``supervised.train.main``) on a local JSONL chat file,
  rendered by its ``qwen3`` renderer with the tiny model's own tokenizer (ChatML specials);
* RL: its env / group-builder / rollout / advantage / ``importance_sampling`` datum construction and
  ``rl.train.train_step`` on a self-contained environment.

The cookbook pins ``transformers<=5.5.4``, so it is installed without its dependencies
(``pip install --no-deps tinker-cookbook==0.5.8``; what its supervised and RL modules import is in
the ``test`` extra). These tests are skipped when it is not installed.
"""

from __future__ import annotations

import asyncio
import json
import os

import numpy as np
import pytest

pytest.importorskip("tinker_cookbook")
tinker = pytest.importorskip("tinker")

from test_server import BASE, KEY_A, ServerProcess  # noqa: E402
from tinker_cookbook import renderers  # noqa: E402
from tinker_cookbook.tokenizer_utils import get_tokenizer, register_tokenizer  # noqa: E402

COLORS = ["red", "blue", "green", "gold"]


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

    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    nll = [row["train_mean_nll"] for row in map(json.loads, lines) if "train_mean_nll" in row]
    assert len(nll) == 16  # 4 epochs of 4 batches
    # Medians: at this learning rate one batch of an epoch can spike (the LoRA seed is random).
    assert np.median(nll[-4:]) < 0.75 * np.median(nll[:4])
    # The final checkpoint was written through save_state / save_weights_for_sampler.
    saved = [json.loads(line) for line in (tmp_path / "run" / "checkpoints.jsonl").read_text().splitlines()]
    assert saved and saved[-1]["state_path"].startswith("tinker://")


def test_rl_building_blocks_on_a_self_contained_env(server):
    """Env + group builder → ``do_group_rollout`` (sampling through the server) → advantages and
    ``importance_sampling`` datums (``prepare_minibatch``) → ``rl.train.train_step``."""
    from tinker_cookbook.completers import TinkerTokenCompleter
    from tinker_cookbook.rl.rollouts import do_group_rollout
    from tinker_cookbook.rl.train import prepare_minibatch, train_step
    from tinker_cookbook.rl.types import Env, EnvGroupBuilder, StepResult

    tokenizer = get_tokenizer(BASE)
    renderer = renderers.get_renderer("qwen3", tokenizer)
    vowel_ids = set(tokenizer.encode("aeiou", add_special_tokens=False))

    class VowelEnv(Env):
        """One turn: the reward is the fraction of sampled tokens that are vowels."""

        async def initial_observation(self):
            prompt = renderer.build_generation_prompt([{"role": "user", "content": "vowels please"}])
            return prompt, renderer.get_stop_sequences()

        async def step(self, action, *, extra=None):
            reward = float(np.mean([t in vowel_ids for t in action])) if action else 0.0
            return StepResult(
                reward=reward,
                episode_done=True,
                next_observation=tinker.ModelInput.empty(),
                next_stop_condition=renderer.get_stop_sequences(),
                metrics={"vowel_fraction": reward},
            )

    class VowelGroup(EnvGroupBuilder):
        async def make_envs(self):
            return [VowelEnv() for _ in range(4)]

        def logging_tags(self):
            return ["vowels"]

    async def run() -> list[dict]:
        service = tinker.ServiceClient(base_url=server.url)
        training = await service.create_lora_training_client(BASE, rank=8, seed=3)
        history = []
        for _ in range(2):
            sampler = await training.save_weights_and_get_sampling_client()
            policy = TinkerTokenCompleter(sampler, max_tokens=8, temperature=1.0)
            builders = [VowelGroup(), VowelGroup()]
            groups = await asyncio.gather(*(do_group_rollout(b, policy) for b in builders))
            data, metrics = await prepare_minibatch(builders, list(groups), tokenizer, None, 0.0, 1.0)
            assert data and set(data[0].loss_fn_inputs) == {"target_tokens", "logprobs", "advantages", "mask"}
            learner_logprobs = await train_step(
                data, training, learning_rate=5e-2, num_substeps=1, loss_fn="importance_sampling",
                metrics=metrics,
            )  # fmt: skip
            # Same weights sampled and scored: the learner's logprobs are the sampler's (ratio ~1).
            for datum, lp in zip(data, learner_logprobs, strict=True):
                mask = datum.loss_fn_inputs["mask"].to_numpy() > 0
                sampled = datum.loss_fn_inputs["logprobs"].to_numpy()
                np.testing.assert_allclose(lp.numpy()[mask], sampled[mask], atol=5e-3)
            history.append(metrics)
        return history

    history = asyncio.run(run())
    assert len(history) == 2
    for metrics in history:
        assert {"env/all/reward/total", "env/all/vowel_fraction", "grad_norm:mean"} <= set(metrics)
        # (a group whose rewards are all equal has zero advantages, so the gradient may be zero)
        assert np.isfinite(metrics["env/all/reward/total"]) and np.isfinite(metrics["grad_norm:mean"])
