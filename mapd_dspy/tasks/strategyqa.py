"""StrategyQA: yes/no questions that need implicit multi-step reasoning.

Local file: ``strategyqa/dev.json``, a JSON list of ``{qid, question, answer (bool), facts,
decomposition, ...}``; only ``qid``, ``question`` and ``answer`` are used. The file has no split,
so we define one that does not depend on item order: an item is "test" when the first 8 hex
digits of SHA-256(qid), read as an integer, are 0..19 modulo 100, else "train" (about 80/20;
for the 229 items of dev.json, see ``test_tasks.py`` for the exact counts). An explicit file path
gets the same split.
Hub: ``ChilleD/StrategyQA``, same columns, native train/test splits.
Gold: "yes" / "no". Ids: ``strategyqa/<qid>``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mapd_dspy.tasks.answers import YesNoAnswers
from mapd_dspy.tasks.base import (
    Example,
    Task,
    check_examples,
    file_in,
    read_json_list,
    require_field,
)
from mapd_dspy.tasks.registry import register_task

TEST_PERCENT = 20


def example_from_row(row: Mapping[str, Any], where: str) -> Example:
    """Map one StrategyQA item (local or hub) to an Example."""
    qid = require_field(row, "qid", str, where)
    question = require_field(row, "question", str, where)
    answer = require_field(row, "answer", bool, where)
    return Example(
        id=f"strategyqa/{qid.strip()}",
        question=question.strip(),
        gold="yes" if answer else "no",
    )


def split_of(qid: str) -> str:
    """"train" or "test" for a qid, from a hash so the split survives reordering and additions."""
    digest = hashlib.sha256(qid.encode("utf-8")).hexdigest()
    return "test" if int(digest[:8], 16) % 100 < TEST_PERCENT else "train"


def _qid(example: Example) -> str:
    return example.id.removeprefix("strategyqa/")


@register_task
class StrategyQA(YesNoAnswers, Task):
    name = "strategyqa"
    hub_id = "ChilleD/StrategyQA"
    answer_format = YesNoAnswers.answer_format

    def load_local(self, path: Path, split: str) -> list[Example]:
        file_path = file_in(path, "dev.json")
        examples = [
            example_from_row(row, f"{file_path} item {index}")
            for index, row in enumerate(read_json_list(file_path))
        ]
        # Checked before splitting so that duplicates landing in different splits are caught.
        check_examples(examples, str(file_path), "train+test")
        return [example for example in examples if split_of(_qid(example)) == split]

    def example_from_hub_row(
        self, row: Mapping[str, Any], split: str, index: int, where: str
    ) -> Example:
        return example_from_row(row, where)
