"""The recipes in ``examples/`` run in-process, offline, on the quickstart's tiny model."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    # One home for the module: the tiny model is made once and every recipe reuses it.
    return tmp_path_factory.mktemp("jtinker_home")


@pytest.fixture
def recipe(home, monkeypatch):
    monkeypatch.setenv("JTINKER_HOME", str(home))
    monkeypatch.syspath_prepend(str(EXAMPLES))

    def load(name: str):
        sys.modules.pop(name, None)
        return importlib.import_module(name)

    return load


def mean(xs) -> float:
    return sum(xs) / len(xs)


def test_sl_basic(recipe):
    out = recipe("sl_basic").main(["--steps", "25"])
    assert out["last_loss"] < 0.6 * out["first_loss"]


def test_rl_basic(recipe):
    rewards = recipe("rl_basic").main([])["mean_rewards"]
    assert mean(rewards[-4:]) > mean(rewards[:4]) + 0.08, rewards


def test_dpo(recipe):
    history = recipe("dpo").main(["--steps", "12"])["history"]
    # Per-step accuracy over 16 pairs is too noisy to compare; the loss and the margin are not.
    assert mean([h["dpo_loss"] for h in history[-3:]]) < mean([h["dpo_loss"] for h in history[:3]]) - 0.08
    assert history[-1]["margin"] > history[0]["margin"] + 0.3
    assert mean([h["accuracy"] for h in history[-3:]]) >= 0.7


def test_custom_loss(recipe):
    out = recipe("custom_loss").main(["--steps", "20"])
    assert out["last_loss"] < 0.7 * out["first_loss"]


def test_torch_custom_loss(recipe):
    """A torch loss through create_custom_loss trains: its metrics combine by suffix (:mean averaged,
    :sum summed over the batch) and the mean answer NLL falls."""
    history = recipe("torch_custom_loss").main(["--steps", "15"])["history"]
    nll = [h["custom/nll:mean"] for h in history]
    assert mean(nll[-3:]) < 0.6 * mean(nll[:3]), nll
    assert history[0]["loss:sum"] == pytest.approx(16 * nll[0], rel=1e-5)  # 16 data, each its mean NLL
    assert history[0]["custom/answer_tokens:sum"] > 16


def test_export_to_peft(recipe, tmp_path):
    out = recipe("export_to_peft").main([str(tmp_path / "peft"), "--steps", "2"])
    assert out["state_path"].startswith("tinker://")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(out["files"])
