"""Writes the tiny configs' JSONL files from the quickstart's date-format task (``python make_data.py``).

- ``date_sft_{train,eval}.jsonl``: prompt/completion rows, ``"2024-03-15 -> "`` → ``"15/03/2024"``;
- ``date_dpo_{train,eval}.jsonl``: preference rows, the right answer against day and month swapped;
- ``date_chat_train.jsonl``: the same task as chat ``messages`` (rendered with the chat template).

Held-out dates never appear in a training file.
"""

import json
from pathlib import Path

from jtinker.quickstart import make_example, make_splits

OUT = Path(__file__).resolve().parent


def write(name: str, rows: list[dict]) -> None:
    (OUT / name).write_text("".join(json.dumps(row) + "\n" for row in rows))


def main() -> None:
    train, held_out = make_splits(seed=0, eval_size=64)
    train = train[:2048]
    examples = {"train": [make_example(d) for d in train], "eval": [make_example(d) for d in held_out]}
    for split, rows in examples.items():
        write(f"date_sft_{split}.jsonl", [{"prompt": e.prompt, "completion": e.answer} for e in rows])
        dates = train if split == "train" else held_out
        write(
            f"date_dpo_{split}.jsonl",
            [
                {"prompt": e.prompt, "chosen": e.answer, "rejected": d.strftime("%m/%d/%Y")}
                for e, d in zip(rows, dates, strict=True)
                if d.day != d.month
            ],
        )
    write(
        "date_chat_train.jsonl",
        [
            {
                "messages": [
                    {"role": "user", "content": f"Rewrite {e.prompt.split()[0]} as DD/MM/YYYY."},
                    {"role": "assistant", "content": e.answer},
                ]
            }
            for e in examples["train"][:512]
        ],
    )


if __name__ == "__main__":
    main()
