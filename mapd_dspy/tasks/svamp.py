"""SVAMP: one-step arithmetic word problems with small, deliberate variations.

Local file: ``svamp/SVAMP.json``, a JSON list of ``{ID, Body, Question, Equation, Answer, Type}``
with ``Answer`` a float such as ``8.0``. The file has no split, so we define one: items are
sorted by ID (prefix, then the number after the last "-", so "chal-2" < "chal-10"); the first
70% (rounded) are "train" and the rest "test", i.e. 700 / 300 for the 1000 items, the sizes of
the usual hub split (the items themselves need not be the same ones). An explicit file path gets
the same split.
Hub: ``ChilleD/SVAMP``, same columns, native train/test splits.
Question: ``Body + " " + Question``. Ids: ``svamp/<ID>``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mapd_dspy.tasks.answers import NumericAnswers, normalize_number
from mapd_dspy.tasks.base import (
    Example,
    Task,
    TaskDataError,
    check_examples,
    file_in,
    read_json_list,
    require_field,
)
from mapd_dspy.tasks.registry import register_task

TRAIN_FRACTION = 0.7
_ID_NUMBER = re.compile(r"^(?P<prefix>.*?)(?P<number>\d+)$")


def example_from_row(row: Mapping[str, Any], where: str) -> Example:
    """Map one SVAMP item (local or hub) to an Example."""
    item_id = require_field(row, "ID", str, where)
    body = require_field(row, "Body", str, where)
    question = require_field(row, "Question", str, where)
    # Some hub copies store Answer as text, so both are accepted.
    raw_answer = require_field(row, "Answer", (int, float, str), where)
    gold = normalize_number(raw_answer)
    if gold is None:
        raise TaskDataError(f"{where}: field 'Answer' is not a number: {raw_answer!r}")
    return Example(
        id=f"svamp/{item_id.strip()}",
        question=f"{body.strip()} {question.strip()}",
        gold=gold,
    )


def id_sort_key(example: Example) -> tuple[str, int, str]:
    """Order "svamp/chal-2" before "svamp/chal-10"; ids without a trailing number sort by text."""
    match = _ID_NUMBER.match(example.id)
    if match is None:
        return (example.id, -1, example.id)
    return (match["prefix"], int(match["number"]), example.id)


def split_examples(examples: list[Example], split: str) -> list[Example]:
    """The documented train/test split of the single SVAMP file (see module docstring)."""
    ordered = sorted(examples, key=id_sort_key)
    train_size = round(len(ordered) * TRAIN_FRACTION)
    return ordered[:train_size] if split == "train" else ordered[train_size:]


@register_task
class SVAMP(NumericAnswers, Task):
    name = "svamp"
    hub_id = "ChilleD/SVAMP"
    answer_format = NumericAnswers.answer_format

    def load_local(self, path: Path, split: str) -> list[Example]:
        file_path = file_in(path, "SVAMP.json")
        examples = [
            example_from_row(row, f"{file_path} item {index}")
            for index, row in enumerate(read_json_list(file_path))
        ]
        # Checked before splitting so that duplicates landing in different splits are caught.
        check_examples(examples, str(file_path), "train+test")
        return split_examples(examples, split)

    def example_from_hub_row(
        self, row: Mapping[str, Any], split: str, index: int, where: str
    ) -> Example:
        return example_from_row(row, where)
