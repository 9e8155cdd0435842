"""JSONL data pipeline: exact loss masks, row errors, seeded order, resume, packing, sharding."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from transformers import AutoTokenizer

from jtinker import data
from jtinker.models import forward, load_pretrained

CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say hi"},
    {"role": "assistant", "content": "hi!"},
    {"role": "user", "content": "Now bye"},
    {"role": "assistant", "content": "bye, friend"},
]


@pytest.fixture(scope="module")
def tok(qwen3_dir):
    return AutoTokenizer.from_pretrained(qwen3_dir)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def sft_rows(n: int) -> list[dict]:
    # Varying lengths so packing puts several examples in one row.
    return [{"prompt": f"question {i} " * (1 + i % 3), "completion": f"answer {i}"} for i in range(n)]


def weighted_text(tok, tokens, weights) -> str:
    return tok.decode([t for t, w in zip(tokens, weights, strict=True) if w > 0])


def batch_key(batch) -> list:
    """Comparable form of a batch: token lists of Datums, or raw packed arrays."""
    if isinstance(batch, dict):
        return [(k, batch[k].tolist()) for k in sorted(batch)]
    return [
        (
            d.model_input.to_ints(),
            d.loss_fn_inputs["weights"].to_numpy().tolist(),
            d.loss_fn_inputs["target_tokens"].to_numpy().tolist(),
        )
        for d in batch
    ]


def test_chat_mask_covers_assistant_replies_only(tok):
    tokens, weights = data.render_chat(tok, CHAT)
    assert tok.decode(tokens) == tok.apply_chat_template(CHAT, tokenize=False)
    eos = tok.eos_token
    assert weighted_text(tok, tokens, weights) == f"hi!{eos}bye, friend{eos}"
    # Each weighted run decodes to one assistant reply (no header, no newline leaks in).
    runs, cur = [], []
    for t, w in zip(tokens, weights, strict=True):
        if w:
            cur.append(t)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    assert runs == [f"{m['content']}{eos}" for m in CHAT if m["role"] == "assistant"]


def test_plain_renderer_without_template(tok):
    plain = AutoTokenizer.from_pretrained(tok.name_or_path)
    plain.chat_template = None
    tokens, weights = data.render_chat(plain, CHAT)
    assert plain.decode(tokens).startswith("system: You are terse.\nuser: Say hi\nassistant: hi!")
    assert weighted_text(plain, tokens, weights) == f"hi!{plain.eos_token}bye, friend{plain.eos_token}"


def test_prompt_completion_mask_and_datum_shift(tok):
    tokens, weights = data.render_prompt_completion(tok, "2+2=", " 4")
    assert tokens[-1] == tok.eos_token_id
    assert weighted_text(tok, tokens, weights) == f" 4{tok.eos_token}"
    assert tok.decode([t for t, w in zip(tokens, weights, strict=True) if not w]) == "2+2="
    d = data.to_datum(tokens, weights)
    assert d.model_input.to_ints() == tokens[:-1]
    np.testing.assert_array_equal(d.loss_fn_inputs["target_tokens"].to_numpy(), tokens[1:])
    np.testing.assert_array_equal(d.loss_fn_inputs["weights"].to_numpy(), weights[1:])


def test_preference_rows_string_and_chat_form(tok, tmp_path):
    rows = [
        {"prompt": "Capital of France?", "chosen": " Paris", "rejected": " Rome"},
        {
            "prompt": [{"role": "user", "content": "Pick"}],
            "chosen": "A",
            "rejected": [{"role": "assistant", "content": "B"}],
        },
    ]
    ds = data.jsonl_dataset(write_jsonl(tmp_path / "pref.jsonl", rows), tok)
    ex = ds[0]
    eos = tok.eos_token
    assert weighted_text(tok, ex["chosen_tokens"], ex["chosen_weights"]) == f" Paris{eos}"
    assert weighted_text(tok, ex["rejected_tokens"], ex["rejected_weights"]) == f" Rome{eos}"
    ex = ds[1]
    assert weighted_text(tok, ex["chosen_tokens"], ex["chosen_weights"]) == f"A{eos}"
    assert weighted_text(tok, ex["rejected_tokens"], ex["rejected_weights"]) == f"B{eos}"
    assert tok.decode(ex["chosen_tokens"]).startswith("<|im_start|>user\nPick")
    # Pipeline output keeps each pair adjacent: chosen, rejected.
    batch = next(iter(data.make_pipeline(ds, batch_size=2, shuffle=False)))
    assert len(batch) == 4
    assert tok.decode(batch[0].loss_fn_inputs["target_tokens"].to_numpy()).endswith(f" Paris{eos}")
    assert tok.decode(batch[1].loss_fn_inputs["target_tokens"].to_numpy()).endswith(f" Rome{eos}")


@pytest.mark.parametrize(
    "bad, message",
    [
        ('{"prompt": "a", "completion": ', "invalid JSON"),
        ({"prompt": "a"}, "missing 'completion'"),
        ({"prompt": "a", "completion": 3}, "'completion' must be a string"),
        ({"prompt": "a", "completion": "  "}, "'completion' is empty"),
        ({"messages": [{"role": "user"}]}, "messages[0] is missing 'content'"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant message"),
        ({"prompt": "a", "chosen": "b"}, "missing 'rejected'"),
        ({"text": "a"}, "unrecognised row"),
        ([1, 2], "must be a JSON object"),
        ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}, "one kind"),
    ],
)
def test_bad_rows_name_file_and_line(tok, tmp_path, bad, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [*sft_rows(2), "", bad])  # blank line 3 still counts
    with pytest.raises(data.DataError) as err:
        data.jsonl_dataset(path, tok)
    assert str(err.value).startswith(f"{path}:4: ")
    assert message in str(err.value)


def test_seeded_shuffle_is_reproducible(tok, tmp_path):
    ds = data.jsonl_dataset(write_jsonl(tmp_path / "d.jsonl", sft_rows(24)), tok)

    def order(seed: int) -> list:
        return [batch_key(b) for b in data.make_pipeline(ds, batch_size=4, seed=seed)]

    a = order(1)
    assert len(a) == 6
    assert a == order(1)
    assert a != order(2)
    unshuffled = [batch_key(b) for b in data.make_pipeline(ds, batch_size=4, shuffle=False)]
    flat = lambda bs: sorted(x for b in bs for x in b)  # noqa: E731
    assert flat(a) == flat(unshuffled)  # a permutation of the same examples


@pytest.mark.parametrize("pack_length", [None, 48])
def test_resume_gives_identical_batches(tok, tmp_path, pack_length):
    ds = data.jsonl_dataset(write_jsonl(tmp_path / "d.jsonl", sft_rows(30)), tok)

    def pipeline():
        return data.make_pipeline(ds, batch_size=3, seed=7, num_epochs=None, pack_length=pack_length)

    it = iter(pipeline())
    for _ in range(4):
        next(it)
    state = it.get_state()
    expected = [batch_key(next(it)) for _ in range(12)]  # crosses an epoch boundary

    fresh = iter(pipeline())
    fresh.set_state(json.loads(json.dumps(state)))  # state must survive a JSON round trip
    assert [batch_key(next(fresh)) for _ in range(12)] == expected


def test_packed_row_matches_each_example_alone(tok, tmp_path, qwen3_dir):
    config, params = load_pretrained(qwen3_dir)
    ds = data.jsonl_dataset(write_jsonl(tmp_path / "d.jsonl", sft_rows(6)), tok)
    length = 64
    batch = next(iter(data.make_pipeline(ds, batch_size=2, pack_length=length, shuffle=False)))
    seg = batch["segment_ids"]
    assert seg.max() >= 2  # really packed several examples into a row
    for r in range(seg.shape[0]):  # positions restart at 0 at each example
        for s in range(1, seg[r].max() + 1):
            np.testing.assert_array_equal(batch["positions"][r][seg[r] == s], np.arange((seg[r] == s).sum()))

    def logprobs(tokens, targets, **kw):
        logits = forward(config, params, jnp.asarray(tokens), **kw)
        lp = jax.nn.log_softmax(logits, axis=-1)
        return np.asarray(jnp.take_along_axis(lp, jnp.asarray(targets)[..., None], axis=-1)[..., 0])

    packed = logprobs(
        batch["input_tokens"],
        batch["target_tokens"],
        positions=jnp.asarray(batch["positions"]),
        segment_ids=jnp.asarray(seg),
    )
    # Sanity: without segment_ids the later examples do see earlier ones, so the check can fail.
    crossed = logprobs(
        batch["input_tokens"], batch["target_tokens"], positions=jnp.asarray(batch["positions"])
    )
    assert np.abs(crossed - packed)[seg >= 2].max() > 1e-4

    checked = 0
    for r in range(seg.shape[0]):
        for s in range(1, seg[r].max() + 1):
            sel = seg[r] == s
            alone = logprobs(batch["input_tokens"][r][sel][None], batch["target_tokens"][r][sel][None])[0]
            np.testing.assert_allclose(packed[r][sel], alone, atol=1e-5, rtol=0)
            checked += 1
    assert checked >= 3


def test_process_sharding_is_disjoint_and_complete(tok, tmp_path):
    ds = data.jsonl_dataset(write_jsonl(tmp_path / "d.jsonl", sft_rows(12)), tok)
    shards = [
        {
            tuple(d.model_input.to_ints())
            for b in data.make_pipeline(ds, batch_size=1, seed=3, shard_index=i, shard_count=3)
            for d in b
        }
        for i in range(3)
    ]
    assert all(len(s) == 4 for s in shards)
    assert not (shards[0] & shards[1]) and not (shards[0] & shards[2]) and not (shards[1] & shards[2])
    every = {tuple(data.to_datum(ds[i]["tokens"], ds[i]["weights"]).model_input.to_ints()) for i in range(12)}
    assert set().union(*shards) == every
    # Default shard is this JAX process: one process sees everything.
    default = [d for b in data.make_pipeline(ds, batch_size=1, shuffle=False) for d in b]
    assert len(default) == 12 and jax.process_count() == 1
