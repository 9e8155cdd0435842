"""The ``jtinker`` command: quickstart end to end, tiny models, checkpoints, export/import, errors."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import jtinker as tinker
from jtinker import types
from jtinker.cli import main

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A private ``JTINKER_HOME`` (checkpoints, built-in models) for one test."""
    path = tmp_path / "jtinker_home"
    monkeypatch.setenv("JTINKER_HOME", str(path))
    monkeypatch.delenv("JTINKER_MODELS", raising=False)
    return path


def run_cli(*args: str, env_home: Path, stdin: str | None = None) -> subprocess.CompletedProcess:
    """``jtinker ARGS`` in a fresh interpreter (for exit codes and what reaches stderr)."""
    env = {**os.environ, "JTINKER_HOME": str(env_home), "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, "-m", "jtinker.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def load_peft_model(model_dir, adapter_dir):
    """PeftModel over the f32 base; fails on PEFT's missing/unexpected adapter key warnings."""
    base = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(base, str(adapter_dir))
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "missing adapter keys" in m or "unexpected" in m.lower()], messages
    return model.eval()


def trained_checkpoint(model_dir: Path, steps: int = 3) -> str:
    """A ``save_state`` checkpoint with non-zero LoRA B (a few SFT steps on a tiny model)."""
    service = tinker.ServiceClient()
    training = service.create_lora_training_client(base_model=str(model_dir), rank=4, seed=0)
    tokens = list(range(10, 30))
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
    )
    for _ in range(steps):
        training.forward_backward([datum], "cross_entropy")
        training.optim_step(types.AdamParams(learning_rate=1e-2))
    return training.save_state("cli-test").result().path


# --------------------------------------------------------------------------------------------------
# The quickstart (the long test)


def test_quickstart_end_to_end(home, tmp_path, capsys):
    out = tmp_path / "qs"
    assert main(["quickstart", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    for key in (
        "accuracy_before",
        "accuracy_after",
        "train_seconds",
        "total_seconds",
        "state_path",
        "peft_adapter_dir",
        "steps",
        "final_loss",
        "model_dir",
    ):
        assert key in summary, key
    assert summary["accuracy_before"] <= 0.2
    assert summary["accuracy_after"] >= 0.8
    assert summary["final_loss"] < 0.5
    assert summary["state_path"].startswith("tinker://")
    assert summary["state_path"] in printed and summary["peft_adapter_dir"] in printed
    # The model was made (and cached) under JTINKER_HOME, and the checkpoint is in its store.
    assert Path(summary["model_dir"]).is_relative_to(home)
    assert main(["checkpoints", "list"]) == 0
    assert summary["state_path"] in capsys.readouterr().out

    # The exported adapter loads in PEFT and is not the identity: it changes the base's logits.
    model_dir, adapter_dir = Path(summary["model_dir"]), Path(summary["peft_adapter_dir"])
    assert (adapter_dir / "adapter_config.json").is_file()
    model = load_peft_model(model_dir, adapter_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    ids = torch.tensor([tokenizer.encode("2001-02-03 -> ")])
    with torch.no_grad():
        tuned = model(ids).logits[0, -1]
        with model.disable_adapter():
            base = model(ids).logits[0, -1]
    assert not torch.allclose(tuned, base, atol=1e-3)
    # Greedy decoding in transformers + PEFT reproduces jtinker's held-out answers.
    samples = summary["samples"]
    prompts = torch.tensor([tokenizer.encode(s["prompt"]) for s in samples])  # all the same length
    with torch.no_grad():
        generated = model.generate(
            prompts,
            attention_mask=torch.ones_like(prompts),
            max_new_tokens=12,
            do_sample=False,
            eos_token_id=258,
            pad_token_id=259,
        )
    outputs = [tokenizer.decode(g[prompts.shape[1] :], skip_special_tokens=True).strip() for g in generated]
    assert outputs == [s["output"] for s in samples]
    assert sum(s["output"] == s["answer"] for s in samples) >= 4


# --------------------------------------------------------------------------------------------------
# make-tiny-model


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_make_tiny_model_loads_in_transformers(tmp_path, family, capsys):
    out = tmp_path / f"tiny-{family}"
    assert main(["make-tiny-model", str(out), "--family", family, "--seed", "3", "--shards", "2"]) == 0
    assert str(out) in capsys.readouterr().out
    assert (out / "model.safetensors.index.json").is_file()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
    assert model.config.model_type == family
    assert tokenizer.eos_token_id == 258
    with torch.no_grad():
        logits = model(torch.tensor([tokenizer.encode("hello")])).logits
    assert logits.shape == (1, 5, model.config.vocab_size)
    assert torch.isfinite(logits).all()


# --------------------------------------------------------------------------------------------------
# checkpoints, export, import-peft, sample


def test_checkpoints_list_show_delete(home, qwen3_dir, capsys):
    path = trained_checkpoint(qwen3_dir)
    assert main(["checkpoints", "list"]) == 0
    listing = capsys.readouterr().out
    assert path in listing and "training" in listing
    assert main(["checkpoints", "list", "--json"]) == 0
    [entry] = json.loads(capsys.readouterr().out)
    assert entry["tinker_path"] == path

    assert main(["checkpoints", "show", path]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["tinker_path"] == path and shown["step"] == 3 and shown["lora"]["rank"] == 4

    assert main(["checkpoints", "delete", path]) == 0
    capsys.readouterr()
    assert main(["checkpoints", "list"]) == 0
    assert path not in capsys.readouterr().out
    assert main(["checkpoints", "show", path]) == 1  # gone


def test_export_peft_and_merged_agree_with_peft(home, qwen3_dir, tmp_path):
    path = trained_checkpoint(qwen3_dir)
    adapter_dir, merged_dir = tmp_path / "adapter", tmp_path / "merged"
    assert main(["export", path, str(adapter_dir), "--format", "peft"]) == 0
    assert main(["export", path, str(merged_dir), "--format", "merged"]) == 0
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(qwen3_dir)
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    assert any(k.endswith("lora_B.weight") and np.abs(v).max() > 0 for k, v in tensors.items())

    peft_model = load_peft_model(qwen3_dir, adapter_dir)
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32).eval()
    base = transformers.AutoModelForCausalLM.from_pretrained(str(qwen3_dir), dtype=torch.float32).eval()
    ids = torch.tensor([list(range(10, 30))])
    with torch.no_grad():
        want, got, untuned = peft_model(ids).logits, merged(ids).logits, base(ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(untuned, want, atol=1e-4)  # the adapter really was applied


def test_import_peft_round_trip(home, qwen3_dir, tmp_path, capsys):
    path = trained_checkpoint(qwen3_dir)
    first, second = tmp_path / "first", tmp_path / "second"
    assert main(["export", path, str(first), "--format", "peft"]) == 0
    capsys.readouterr()
    assert main(["import-peft", str(first), "--base-model", str(qwen3_dir), "--name", "again"]) == 0
    imported = capsys.readouterr().out.strip().splitlines()[-1]
    assert imported.startswith("tinker://") and imported.endswith("/weights/again")
    # The imported state trains on: resume it with its optimizer through the API. (The export padded
    # rank 4 to vLLM's 8, rescaling alpha, so the import has rank 8 and the same update.)
    exported_rank = json.loads((first / "adapter_config.json").read_text())["r"]
    service = tinker.ServiceClient()
    resumed = service.create_training_client_from_state_with_optimizer(imported)
    assert resumed.get_info().lora_rank == exported_rank == 8
    assert main(["export", imported, str(second), "--format", "peft"]) == 0
    a, b = peft_deltas(first), peft_deltas(second)
    assert a.keys() == b.keys() and len(a) > 0
    for key in a:
        np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=1e-7, err_msg=key)


def peft_deltas(adapter_dir: Path) -> dict[str, np.ndarray]:
    """Each module's weight update ``B @ A * lora_alpha / r`` in a PEFT adapter."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    scale = config["lora_alpha"] / config["r"]
    return {
        key.removesuffix(".lora_A.weight"): tensors[key.replace("lora_A", "lora_B")] @ tensors[key] * scale
        for key in tensors
        if key.endswith(".lora_A.weight")
    }


def test_sample_prompt_and_stdin(home, qwen3_dir, monkeypatch, capsys):
    path = trained_checkpoint(qwen3_dir, steps=1)
    assert main(["sample", "--model-path", path, "--prompt", "hello", "--max-tokens", "5"]) == 0
    capsys.readouterr()
    # Without --prompt: one completion per stdin line until EOF; seeded sampling is reproducible.
    args = [
        "sample",
        "--base-model",
        str(qwen3_dir),
        "--max-tokens",
        "4",
        "--temperature",
        "1",
        "--seed",
        "1",
    ]
    outputs = []
    for _ in range(2):
        monkeypatch.setattr("sys.stdin", io.StringIO("abc\n\nxyz\n"))
        assert main(args) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and outputs[0]


def test_sample_chat_is_one_conversation(home, tiny_model_factory, monkeypatch, capsys):
    """``--chat``: each stdin line is the next user turn of one conversation, rendered with the chat
    template after the system message and the earlier turns; each reply, printed as it decodes, is
    the greedy sample of that prompt."""
    model_dir = tiny_model_factory("llama")  # varied greedy text: the tied tiny qwen3 repeats newlines
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n\nmore please\n"))
    args = ["sample", "--base-model", str(model_dir), "--chat", "--system", "Be brief.", "--max-tokens", "24"]
    assert main(args) == 0
    printed = capsys.readouterr().out

    client = tinker.ServiceClient().create_sampling_client(base_model=str(model_dir))
    stop = sorted({*client.model_config.eos_token_ids, tokenizer.eos_token_id})
    params = types.SamplingParams(max_tokens=24, temperature=0.0, stop=stop)
    messages, want = [{"role": "system", "content": "Be brief."}], ""
    for line in ("hi", "more please"):
        messages.append({"role": "user", "content": line})
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompt = types.ModelInput.from_ints(tokenizer.encode(text, add_special_tokens=False))
        tokens = client.sample(prompt, 1, params).result().sequences[0].tokens
        messages.append({"role": "assistant", "content": tokenizer.decode(tokens, skip_special_tokens=True)})
        want += messages[-1]["content"] + "\n"
    assert printed == want and messages[2]["content"] != messages[4]["content"]


# --------------------------------------------------------------------------------------------------
# Errors and exit codes


def test_runtime_error_is_one_line(home):
    result = run_cli(
        "export", "tinker://nope/weights/x", str(home / "out"), "--format", "peft", env_home=home
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jtinker: error:"), result.stderr
    assert "not found" in lines[0] and "Traceback" not in result.stderr


def test_usage_errors_exit_2(home, capsys):
    assert main(["export", "tinker://run/weights/x", "out"]) == 2  # --format missing
    assert main(["export", "not-a-path", "out", "--format", "peft"]) == 2
    assert main(["no-such-command"]) == 2
    assert main(["train"]) == 2
    assert main(["sample", "--base-model", "jtinker/tiny-qwen3", "--system", "x"]) == 2  # without --chat
    err = capsys.readouterr().err
    assert "required: CONFIG" in err
    assert all(line.startswith("jtinker: error:") for line in err.strip().splitlines()), err
    assert "Traceback" not in err


def test_debug_shows_the_traceback(home):
    with pytest.raises(FileNotFoundError):
        main(["--debug", "checkpoints", "show", "tinker://nope/weights/x"])
    result = run_cli("checkpoints", "show", "tinker://nope/weights/x", "--debug", env_home=home)
    assert result.returncode == 1 and "Traceback" in result.stderr


def test_help_for_every_command(capsys):
    commands = ["quickstart", "make-tiny-model", "export", "import-peft", "checkpoints", "sample", "train"]
    for command in commands:
        assert main([command, "--help"]) == 0
        assert f"usage: jtinker {command}" in capsys.readouterr().out
    assert main(["--help"]) == 0
    top = capsys.readouterr().out
    assert all(c in top for c in commands)
