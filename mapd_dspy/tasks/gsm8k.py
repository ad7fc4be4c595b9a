"""GSM8K: grade-school maths word problems with a single numeric answer.

Local files: ``gsm8k/train.jsonl`` and ``gsm8k/test.jsonl``, one ``{"question", "answer"}`` object
per line, where ``answer`` is a worked solution ending in ``#### N`` (N may carry thousands
commas). Splits are the two files; an explicit file path is read as the requested split.
Hub: ``openai/gsm8k`` (config ``main``), same columns, splits train/test.
Ids: ``gsm8k/<split>/<0-based line index among non-blank lines>``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mapd_dspy.tasks.answers import NumericAnswers, normalize_number
from mapd_dspy.tasks.base import (
    Example,
    Task,
    TaskDataError,
    file_in,
    read_jsonl,
    require_field,
)
from mapd_dspy.tasks.registry import register_task

_FINAL_ANSWER_SEPARATOR = "####"


def gold_from_solution(solution: str, where: str) -> str:
    """Normalised number after the last ``####`` of a GSM8K solution."""
    if _FINAL_ANSWER_SEPARATOR not in solution:
        raise TaskDataError(f"{where}: field 'answer' has no '#### <number>' final answer")
    final = solution.rsplit(_FINAL_ANSWER_SEPARATOR, 1)[1].strip()
    gold = normalize_number(final)
    if gold is None:
        raise TaskDataError(f"{where}: field 'answer' ends in '#### {final}', not a number")
    return gold


def example_from_row(row: Mapping[str, Any], split: str, index: int, where: str) -> Example:
    """Map one ``{"question", "answer"}`` row (local or hub) to an Example."""
    question = require_field(row, "question", str, where)
    solution = require_field(row, "answer", str, where)
    return Example(
        id=f"gsm8k/{split}/{index}",
        question=question.strip(),
        gold=gold_from_solution(solution, where),
    )


@register_task
class GSM8K(NumericAnswers, Task):
    name = "gsm8k"
    hub_id = "openai/gsm8k"
    hub_config = "main"
    answer_format = NumericAnswers.answer_format

    def load_local(self, path: Path, split: str) -> list[Example]:
        file_path = file_in(path, f"{split}.jsonl")
        return [
            example_from_row(row, split, index, f"{file_path} line {line_number}")
            for index, (line_number, row) in enumerate(read_jsonl(file_path))
        ]

    def example_from_hub_row(
        self, row: Mapping[str, Any], split: str, index: int, where: str
    ) -> Example:
        return example_from_row(row, split, index, where)
