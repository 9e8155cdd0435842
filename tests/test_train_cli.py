"""``jtinker train CONFIG``: the shipped configs run, resume exactly, and bad configs fail clearly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jtinker import cli
from jtinker.configs import ConfigError, OptimSection, load_config
from jtinker.trainer import learning_rate_at, match_fraction

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
# Small and quick: a couple of steps, small batches and evaluation sets.
FAST = ["data.batch_size=4", "data.eval_size=4", "--no-progress"]


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("jtinker_home")  # the quickstart model is made once per module


@pytest.fixture(autouse=True)
def _home(home, monkeypatch):
    monkeypatch.setenv("JTINKER_HOME", str(home))


def train(config: str, out: Path, *overrides: str) -> int:
    return cli.main(["train", str(CONFIGS / config), "--out", str(out), *FAST, *overrides])


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def sft_run(home, tmp_path_factory) -> Path:
    """sft_tiny for 4 steps, checkpointing every 2: shared by the resume and RL tests."""
    out = tmp_path_factory.mktemp("sft")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JTINKER_HOME", str(home))
        assert train("sft_tiny.yaml", out, "steps=4", "save_every=2", "eval_every=2") == 0
    return out


def test_sft_tiny_writes_metrics_checkpoints_and_adapter(sft_run):
    metrics = lines(sft_run / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    for m in metrics:
        assert m["loss"] > 0 and m["tokens"] > 0 and m["lr"] > 0 and m["seconds"] >= 0
    assert "eval/loss" in metrics[1] and "eval/accuracy" in metrics[3] and "eval/loss" not in metrics[0]
    assert metrics[-1]["loss"] < metrics[0]["loss"]  # warmup lr is small, but the loss already moves
    index = lines(sft_run / "checkpoints.jsonl")
    assert [e["step"] for e in index] == [2, 4]
    assert all(e["path"].startswith("tinker://") and "data_state" in e for e in index)
    summary = json.loads((sft_run / "summary.json").read_text())
    assert summary["state_path"] == index[-1]["path"]
    assert (Path(summary["peft_adapter_dir"]) / "adapter_config.json").is_file()
    assert json.loads((sft_run / "config.json").read_text())["kind"] == "sft"


def test_resume_replays_the_same_data_and_losses(sft_run, tmp_path):
    out = tmp_path / "resumed"
    assert train("sft_tiny.yaml", out, "steps=2", "save_every=2", "eval_every=2") == 0
    assert [m["step"] for m in lines(out / "metrics.jsonl")] == [1, 2]
    # Same config, more steps: continues from step 2 with the same Adam state and data position.
    assert train("sft_tiny.yaml", out, "steps=4", "save_every=2", "eval_every=2") == 0
    resumed, straight = lines(out / "metrics.jsonl"), lines(sft_run / "metrics.jsonl")
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]
    for a, b in zip(resumed, straight, strict=True):
        assert a["data_crc"] == b["data_crc"]
        assert a["loss"] == b["loss"]
        assert a.get("eval/loss") == b.get("eval/loss")
    runs = {e["path"].split("/")[2] for e in lines(out / "checkpoints.jsonl")}
    assert len(runs) == 1  # a resumed run keeps its run id


def test_resume_refuses_a_changed_config(sft_run, capsys):
    assert train("sft_tiny.yaml", sft_run, "steps=4", "data.batch_size=8") == 2
    assert "data.batch_size" in capsys.readouterr().err


def test_rl_tiny_runs_from_an_sft_run_and_resumes(sft_run, tmp_path):
    # GSPO here (the examples and the cookbook test train with the other policy-gradient losses).
    args = ("init_from=" + str(sft_run), "rl.group_size=4", "rl.loss=gspo", "save_every=1", "eval_every=2")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train("rl_tiny.toml", straight, "steps=2", *args) == 0
    assert train("rl_tiny.toml", resumed, "steps=1", *args) == 0
    assert train("rl_tiny.toml", resumed, "steps=2", *args) == 0
    a, b = lines(straight / "metrics.jsonl"), lines(resumed / "metrics.jsonl")
    assert [m["step"] for m in a] == [1, 2] and "eval/reward" in a[1]
    for x, y in zip(a, b, strict=True):  # sampling seeds come from (seed, step): same rollouts
        assert (x["data_crc"], x["reward"], x["datums"], x["loss"]) == (
            y["data_crc"],
            y["reward"],
            y["datums"],
            y["loss"],
        )
    assert 0.0 <= a[0]["reward"] <= 1.0


def test_dpo_tiny_runs(tmp_path):
    out = tmp_path / "dpo"
    assert train("dpo_tiny.yaml", out, "steps=2", "eval_every=2") == 0
    metrics = lines(out / "metrics.jsonl")
    assert metrics[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # a fresh adapter is the reference
    assert {"accuracy", "margin", "eval/dpo_loss", "eval/accuracy"} <= set(metrics[1])


def test_tensorboard_events(tmp_path):
    pytest.importorskip("tensorboardX", reason="tensorboardX is in the test extra")
    out = tmp_path / "tb"
    assert train("sft_tiny.yaml", out, "steps=1", "tensorboard=true", "data.eval=") == 0
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


# -- configs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.*ml")))
def test_shipped_configs_validate(name):
    config = load_config(CONFIGS / name)
    assert config.kind in name
    assert Path(config.data.train).is_absolute()


def test_realistic_configs_are_sharded_bf16():
    for name in ("sft_llama3_8b.yaml", "rl_qwen3_8b.yaml"):
        config = load_config(CONFIGS / name)
        assert config.dtype == "bfloat16" and config.mesh == "fsdp=8"


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


BASE = "base_model: m\nout_dir: o\ndata: {train: t.jsonl}\n"


@pytest.mark.parametrize(
    ("text", "overrides", "message"),
    [
        (
            BASE + "optim: {lerning_rate: 1}\n",
            [],
            "optim.lerning_rate: unknown key (did you mean 'optim.learning_rate'?)",
        ),
        (BASE + "stepz: 3\n", [], "stepz: unknown key (did you mean 'steps'?)"),
        (BASE, ["data.batch_size=many"], "data.batch_size: expected int, got 'many'"),
        (BASE, ["kind=ppo"], "kind: must be one of 'sft', 'rl', 'dpo', got 'ppo'"),
        (BASE, ["steps=0"], "steps: must be >= 1, got 0"),
        (BASE, ["optim.learning_rate=-1"], "optim.learning_rate: must be > 0"),
        (BASE, ["optim=3"], "optim: expected a mapping"),
        (BASE, ["noequals"], "expected key=value"),
        ("out_dir: o\ndata: {train: t.jsonl}\n", [], "base_model: required"),
        (BASE + "rl: {reward: nonsense}\n", [], "rl.reward: expected"),
        ("- a list\n", [], "the top level must be a mapping"),
        ("steps: [1,\n", [], "cannot parse"),
    ],
)
def test_bad_configs_name_the_key(tmp_path, text, overrides, message):
    path = write(tmp_path, "bad.yaml", text)
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    assert message in str(info.value)
    assert str(path) in str(info.value) or "override" in str(info.value) or message.startswith("base_model")


def test_config_formats_and_overrides(tmp_path):
    toml = write(tmp_path, "c.toml", 'base_model = "m"\nout_dir = "o"\n[data]\ntrain = "d/t.jsonl"\n')
    yaml = write(tmp_path, "c.yaml", "base_model: m\nout_dir: o\ndata: {train: d/t.jsonl}\n")
    for path in (toml, yaml):
        config = load_config(
            path, ["optim.learning_rate=3e-4", "lora.rank=8", "mesh=fsdp=2", "data.eval=null"]
        )
        assert config.optim.learning_rate == 3e-4 and config.lora.rank == 8 and config.mesh == "fsdp=2"
        assert config.data.train == str(tmp_path / "d" / "t.jsonl")  # relative to the config file
        assert config.data.eval is None


def test_cli_usage_errors_are_one_line(tmp_path, capsys):
    assert cli.main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "no such config file" in capsys.readouterr().err
    assert cli.main(["train", str(CONFIGS / "sft_tiny.yaml"), "optim.lerning_rate=1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "optim.lerning_rate: unknown key" in err


def test_bad_dataset_row_names_the_line(tmp_path, capsys):
    data = write(tmp_path, "d.jsonl", '{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n')
    config = write(
        tmp_path,
        "c.yaml",
        f"base_model: jtinker/quickstart\nout_dir: {tmp_path / 'o'}\ndata: {{train: {data}}}\n",
    )
    assert cli.main(["train", str(config), "--no-progress"]) == 1
    assert f"{data}:2: prompt/completion row is missing 'completion'" in capsys.readouterr().err


def test_dpo_needs_preference_rows(tmp_path, capsys):
    assert (
        train("dpo_tiny.yaml", tmp_path / "o", f"data.train={CONFIGS / 'data' / 'date_sft_train.jsonl'}") == 1
    )
    assert "has prompt_completion rows; this needs preference rows" in capsys.readouterr().err


def test_init_from_must_hold_checkpoints(tmp_path, capsys):
    assert train("rl_tiny.toml", tmp_path / "o", f"init_from={tmp_path / 'nothing'}") == 2
    assert "init_from:" in capsys.readouterr().err


# -- building blocks -------------------------------------------------------------------------------


def test_learning_rate_schedules():
    warm = OptimSection(learning_rate=1.0, warmup_steps=4)
    assert [learning_rate_at(warm, s, 10) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert learning_rate_at(warm, 9, 10) == 1.0
    cosine = OptimSection(learning_rate=1.0, schedule="cosine", min_lr_ratio=0.1)
    assert learning_rate_at(cosine, 0, 10) == 1.0
    assert learning_rate_at(cosine, 5, 10) == pytest.approx(0.55)
    assert learning_rate_at(cosine, 10, 10) == pytest.approx(0.1)
    linear = OptimSection(learning_rate=2.0, schedule="linear")
    assert learning_rate_at(linear, 5, 10) == pytest.approx(1.0)


def test_match_fraction():
    assert match_fraction("", "15/03/2024", "15/03/2024") == 1.0
    assert match_fraction("", " 15/03/2025 ", "15/03/2024") == 0.9
    assert match_fraction("", "", "ab") == 0.0
