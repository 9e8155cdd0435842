"""JSONL datasets as grain pipelines that yield Tinker ``Datum`` batches or packed arrays.

Three row kinds are recognised (one kind per file):

- chat: ``{"messages": [{"role": ..., "content": ...}, ...]}`` - loss on assistant tokens only;
- prompt/completion: ``{"prompt": str, "completion": str}`` - loss on the completion (and its eos);
- preference: ``{"prompt": str | messages, "chosen": str | messages, "rejected": str | messages}`` for DPO.

Rows are validated eagerly when the file is read, so a bad row fails before training starts, with a
``path:LINE: ...`` message. Tokenisation happens lazily inside the grain pipeline.

Typical use::

    ds = jsonl_dataset("train.jsonl", tokenizer)
    it = iter(make_pipeline(ds, batch_size=8, seed=0))           # batches of list[Datum]
    it = iter(make_pipeline(ds, batch_size=8, pack_length=512))  # dicts of [8, 512] arrays
    state = it.get_state(); ...; it.set_state(state)             # exact resume
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import grain
import jax
import numpy as np

from jtinker.types import Datum, ModelInput

__all__ = [
    "DataError",
    "RowKind",
    "load_jsonl",
    "render_chat",
    "render_prompt_completion",
    "render_preference",
    "render_row",
    "to_datum",
    "to_datums",
    "jsonl_dataset",
    "make_pipeline",
]

RowKind = Literal["chat", "prompt_completion", "preference"]
Example = dict[str, Any]


class DataError(ValueError):
    """A malformed dataset row; the message starts with ``path:LINE:``."""


# --------------------------------------------------------------------------------------------------------
# Reading and validation
# --------------------------------------------------------------------------------------------------------


def _fail(where: str, msg: str) -> DataError:
    return DataError(f"{where}: {msg}")


def _check_text(where: str, field: str, value: Any) -> None:
    if not isinstance(value, str):
        raise _fail(where, f"{field!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise _fail(where, f"{field!r} is empty")


def _check_messages(where: str, field: str, value: Any) -> None:
    if not isinstance(value, list):
        raise _fail(where, f"{field!r} must be a list of messages, got {type(value).__name__}")
    if not value:
        raise _fail(where, f"{field!r} is empty")
    for i, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise _fail(where, f"{field}[{i}] must be an object, got {type(msg).__name__}")
        for key in ("role", "content"):
            if key not in msg:
                raise _fail(where, f"{field}[{i}] is missing {key!r}")
        _check_text(where, f"{field}[{i}].role", msg["role"])
        _check_text(where, f"{field}[{i}].content", msg["content"])


def _check_text_or_messages(where: str, field: str, value: Any) -> None:
    if isinstance(value, list):
        _check_messages(where, field, value)
    else:
        _check_text(where, field, value)


def _row_kind(where: str, row: Any) -> RowKind:
    """Detect and validate one row's kind."""
    if not isinstance(row, dict):
        raise _fail(where, f"row must be a JSON object, got {type(row).__name__}")
    if "messages" in row:
        _check_messages(where, "messages", row["messages"])
        if not any(m["role"] == "assistant" for m in row["messages"]):
            raise _fail(where, "'messages' has no assistant message, so nothing would be trained")
        return "chat"
    if "chosen" in row or "rejected" in row:
        for key in ("chosen", "rejected"):
            if key not in row:
                raise _fail(where, f"preference row is missing {key!r}")
            _check_text_or_messages(where, key, row[key])
        if "prompt" in row:
            _check_text_or_messages(where, "prompt", row["prompt"])
        elif not (isinstance(row["chosen"], list) and isinstance(row["rejected"], list)):
            raise _fail(where, "preference row without 'prompt' needs chat-form 'chosen' and 'rejected'")
        return "preference"
    if "prompt" in row or "completion" in row:
        for key in ("prompt", "completion"):
            if key not in row:
                raise _fail(where, f"prompt/completion row is missing {key!r}")
            _check_text(where, key, row[key])
        return "prompt_completion"
    raise _fail(
        where,
        f"unrecognised row with keys {sorted(row)}; expected 'messages', "
        "'prompt'+'completion', or 'prompt'+'chosen'+'rejected'",
    )


def load_jsonl(path: str | Path, kind: RowKind | None = None) -> tuple[RowKind, list[Example]]:
    """Read and validate every row of a JSONL file; returns the file's row kind and the rows.

    Each returned row carries ``_where`` (``"path:LINE"``) so later rendering errors name it too.
    Blank lines are skipped. All rows must share one kind (``kind`` forces it).
    """
    path = Path(path)
    rows: list[Example] = []
    seen: RowKind | None = kind
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise _fail(where, f"invalid JSON ({exc.msg} at column {exc.colno})") from None
            row_kind = _row_kind(where, row)
            if seen is None:
                seen = row_kind
            elif row_kind != seen:
                raise _fail(where, f"{row_kind} row in a {seen} dataset; one kind per file")
            rows.append({**row, "_where": where})
    if not rows:
        raise DataError(f"{path}: no rows")
    assert seen is not None
    return seen, rows


# --------------------------------------------------------------------------------------------------------
# Rendering: tokens plus per-token loss weights
# --------------------------------------------------------------------------------------------------------


def _encode(tokenizer: Any, text: str) -> list[int]:
    # Special tokens come from the template text itself; never let the tokenizer add a second BOS.
    return list(tokenizer.encode(text, add_special_tokens=False))


def template_tokens(tokenizer: Any, messages: Sequence[Mapping[str, str]], gen_prompt: bool) -> list[int]:
    """``messages`` through the tokenizer's chat template (``gen_prompt``: then the assistant's turn
    opens), as token ids; the template's own special tokens only."""
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=gen_prompt)
    return _encode(tokenizer, text)


def _plain_chat(tokenizer: Any, messages: Sequence[Mapping[str, str]]) -> tuple[list[int], list[float]]:
    """``role: content`` lines, built piece by piece so the masks are exact by construction."""
    eos = tokenizer.eos_token_id
    tokens: list[int] = []
    weights: list[float] = []
    for msg in messages:
        head = _encode(tokenizer, f"{msg['role']}: ")
        body = _encode(tokenizer, msg["content"])
        is_assistant = msg["role"] == "assistant"
        if is_assistant and eos is not None:
            body = body + [eos]  # the model must learn to stop after each reply
        tail = _encode(tokenizer, "\n")
        tokens += head + body + tail
        weights += [0.0] * len(head) + [float(is_assistant)] * len(body) + [0.0] * len(tail)
    return tokens, weights


def render_chat(tokenizer: Any, messages: Sequence[Mapping[str, str]]) -> tuple[list[int], list[float]]:
    """Tokens of a conversation and weights that are 1 exactly on assistant replies (and their end token).

    With a chat template, message ``i``'s tokens are found by rendering the prefixes ``messages[:i]``
    (with the generation prompt, so the ``<|im_start|>assistant`` header stays unweighted) and
    ``messages[:i+1]``; the template must render prefixes as token prefixes, which is checked.
    Tokens after the reply's last eos (e.g. the template's trailing newline) are left unweighted.
    Without a chat template a plain ``role: content`` format is used.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        return _plain_chat(tokenizer, messages)
    full = template_tokens(tokenizer, messages, gen_prompt=False)
    weights = [0.0] * len(full)
    eos = tokenizer.eos_token_id
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        start_toks = template_tokens(tokenizer, messages[:i], gen_prompt=True) if i else []
        if full[: len(start_toks)] != start_toks:  # template without a prefix-stable generation prompt
            start_toks = template_tokens(tokenizer, messages[:i], gen_prompt=False) if i else []
        end_toks = template_tokens(tokenizer, messages[: i + 1], gen_prompt=False)
        if full[: len(start_toks)] != start_toks or full[: len(end_toks)] != end_toks:
            raise ValueError("chat template does not render conversation prefixes as token prefixes")
        start, end = len(start_toks), len(end_toks)
        span = full[start:end]
        if eos is not None and eos in span:  # stop at the reply's own end token
            end = start + len(span) - span[::-1].index(eos)
        weights[start:end] = [1.0] * (end - start)
    return full, weights


def render_prompt_completion(tokenizer: Any, prompt: str, completion: str) -> tuple[list[int], list[float]]:
    """``prompt + completion + eos``, weighted on the completion and eos only.

    Prompt and completion are encoded separately so the boundary (and thus the mask) is exact.
    """
    p = _encode(tokenizer, prompt)
    c = _encode(tokenizer, completion)
    eos = tokenizer.eos_token_id
    if eos is not None and (not c or c[-1] != eos):
        c.append(eos)
    return p + c, [0.0] * len(p) + [1.0] * len(c)


def _as_messages(value: str | list[dict[str, str]], role: str) -> list[dict[str, str]]:
    return value if isinstance(value, list) else [{"role": role, "content": value}]


def render_preference(tokenizer: Any, row: Mapping[str, Any]) -> Example:
    """``chosen_tokens/chosen_weights/rejected_tokens/rejected_weights`` (numpy) for one DPO row.

    All-string rows use the prompt/completion format; if any part is chat-form, the prompt becomes
    a user message (when a string) and chosen/rejected become assistant replies appended to it.
    """
    prompt, chosen, rejected = row.get("prompt"), row["chosen"], row["rejected"]
    out: Example = {}
    for name, reply in (("chosen", chosen), ("rejected", rejected)):
        if all(isinstance(v, str) for v in (prompt, reply)):
            tokens, weights = render_prompt_completion(tokenizer, prompt, reply)
        else:
            messages = (_as_messages(prompt, "user") if prompt is not None else []) + _as_messages(
                reply, "assistant"
            )
            tokens, weights = render_chat(tokenizer, messages)
        out[f"{name}_tokens"] = np.asarray(tokens, np.int32)
        out[f"{name}_weights"] = np.asarray(weights, np.float32)
    return out


def render_row(tokenizer: Any, kind: RowKind, row: Mapping[str, Any]) -> Example:
    """Render one validated row; chat and prompt/completion rows give ``{"tokens", "weights"}``."""
    where = row.get("_where", "<row>")
    try:
        if kind == "preference":
            out = render_preference(tokenizer, row)
            lengths = [len(out["chosen_tokens"]), len(out["rejected_tokens"])]
        else:
            if kind == "chat":
                tokens, weights = render_chat(tokenizer, row["messages"])
            else:
                tokens, weights = render_prompt_completion(tokenizer, row["prompt"], row["completion"])
            out = {"tokens": np.asarray(tokens, np.int32), "weights": np.asarray(weights, np.float32)}
            lengths = [len(tokens)]
    except DataError:
        raise
    except Exception as exc:  # tokenizer/template failures: say which row
        raise _fail(where, f"cannot render row: {exc}") from exc
    if min(lengths) < 2:
        raise _fail(where, "row renders to fewer than 2 tokens; nothing to predict")
    return out


# --------------------------------------------------------------------------------------------------------
# Datums and pipelines
# --------------------------------------------------------------------------------------------------------


def to_datum(tokens: Sequence[int] | np.ndarray, weights: Sequence[float] | np.ndarray) -> Datum:
    """Next-token ``Datum``: input ``tokens[:-1]``, ``target_tokens = tokens[1:]``, ``weights[1:]``.

    ``weights[i]`` is the weight of predicting ``tokens[i]``, so it moves with the target.
    """
    tokens = np.asarray(tokens, np.int64)
    weights = np.asarray(weights, np.float32)
    if tokens.ndim != 1 or tokens.shape != weights.shape:
        raise ValueError(f"tokens {tokens.shape} and weights {weights.shape} must be equal-length 1-D")
    if len(tokens) < 2:
        raise ValueError("need at least 2 tokens to make a next-token Datum")
    return Datum(
        model_input=ModelInput.from_ints(tokens[:-1].tolist()),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": weights[1:]},
    )


def jsonl_dataset(
    path: str | Path,
    tokenizer: Any,
    kind: RowKind | None = None,
    *,
    expect: Sequence[RowKind] | None = None,
) -> grain.MapDataset:
    """A ``grain.MapDataset`` of rendered examples (numpy dicts) from a validated JSONL file.

    Rows are validated now; tokenisation runs lazily per element. ``make_pipeline`` tells the row
    kinds apart by the example keys (``tokens`` vs ``chosen_tokens``). ``expect`` lists the row
    kinds the caller can train on (e.g. only ``preference`` for DPO).
    """
    row_kind, rows = load_jsonl(path, kind)
    if expect is not None and row_kind not in expect:
        raise DataError(f"{path}: has {row_kind} rows; this needs {' or '.join(expect)} rows")
    return grain.MapDataset.source(rows).map(lambda row: render_row(tokenizer, row_kind, row))


def _shift(example: Example, length: int) -> Example:
    """Shifted next-token arrays for packing, truncated to ``length`` (longer rows would never fit)."""
    tokens, weights = example["tokens"], example["weights"]
    return {
        "input_tokens": tokens[:-1][:length],
        "target_tokens": tokens[1:][:length],
        "weights": weights[1:][:length],
    }


def _unpack_names(row: Example) -> Example:
    # grain emits segment ids / positions per packed feature; all three features share them.
    return {
        "input_tokens": row["input_tokens"],
        "target_tokens": row["target_tokens"],
        "weights": row["weights"].astype(np.float32),
        "segment_ids": row["input_tokens_segment_ids"],
        "positions": row["input_tokens_positions"],
    }


def to_datums(example: Example) -> list[Datum]:
    """The ``Datum`` list of one rendered example (a preference pair gives chosen, then rejected)."""
    if "chosen_tokens" in example:  # DPO: a (chosen, rejected) pair, kept adjacent
        return [
            to_datum(example["chosen_tokens"], example["chosen_weights"]),
            to_datum(example["rejected_tokens"], example["rejected_weights"]),
        ]
    return [to_datum(example["tokens"], example["weights"])]


def make_pipeline(
    ds: grain.MapDataset,
    *,
    batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = 1,
    shard_index: int | None = None,
    shard_count: int | None = None,
    pack_length: int | None = None,
    drop_remainder: bool = True,
) -> grain.IterDataset:
    """Shard, shuffle, repeat, then batch (or pack and batch) rendered examples.

    - Sharding defaults to this JAX process (``ds[process_index::process_count]``) and happens before
      shuffling, so processes read disjoint examples whatever the seed.
    - ``shuffle`` is a seeded global shuffle, reshuffled each epoch; ``num_epochs=None`` repeats forever.
    - Without ``pack_length`` each element is a ``list[Datum]`` of ``batch_size`` examples (preference
      rows give ``2 * batch_size`` datums: chosen, rejected, chosen, ...).
    - With ``pack_length``, examples are first-fit packed into rows of that length; each element is a
      dict of ``[batch_size, pack_length]`` arrays ``input_tokens``, ``target_tokens``, ``weights``,
      ``segment_ids`` (1-based per example, 0 = padding) and ``positions`` (restarting per example).

    Iterate with ``iter(...)``; the iterator's ``get_state()`` / ``set_state()`` resume exactly.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    index = jax.process_index() if shard_index is None else shard_index
    count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= index < count:
        raise ValueError(f"shard_index {index} is not in [0, {count})")
    ds = ds[index::count]
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)
    if pack_length is None:
        batched = ds.batch(
            batch_size,
            drop_remainder=drop_remainder,
            batch_fn=lambda xs: [d for x in xs for d in to_datums(x)],
        )
        return batched.to_iter_dataset()
    if pack_length < 1:
        raise ValueError(f"pack_length must be >= 1, got {pack_length}")

    def shift(example: Example) -> Example:
        if "chosen_tokens" in example:
            raise ValueError("packing preference rows is not supported; use pack_length=None for DPO")
        return _shift(example, pack_length)

    features = ("input_tokens", "target_tokens", "weights")
    packed = grain.experimental.FirstFitPackIterDataset(
        ds.map(shift).to_iter_dataset(),
        length_struct={k: pack_length for k in features},
        num_packing_bins=batch_size,
        seed=seed,
    )
    return packed.map(_unpack_names).batch(batch_size, drop_remainder=drop_remainder)
