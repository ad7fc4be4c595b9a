"""LogiQA: four-option logical reasoning questions from the Chinese civil service exam (English).

Local files: ``logiqa/Eval.txt`` and ``logiqa/Test.txt`` (``Train.txt`` when present), 8 lines per
item: a blank line, the answer letter (a-d, case ignored), the context, the question, then the
four options, normally written "A.text" .. "D.text". Splits: "test" -> Test.txt, "validation" ->
Eval.txt, "train" -> Train.txt, or Eval.txt when Train.txt is absent (the validation file stands
in for train, so do not evaluate on "validation" after training on such a "train"). An explicit
file path is read as the requested split.

Option labels: the published files carry a few mangled labels ("A No dangshen", "C." on the
second option line, no label at all). The answer letter refers to the option's *position*, as in
the usual loaders; a leading label is removed when it is a letter followed by ".", "?", ":" or
")", or the position's own capital letter followed by a space, and otherwise kept as text.

Hub: ``lucasmccabe/logiqa`` (columns context, query, options, correct_option); copies that use
question / choices / answer_index are read too. Splits train/validation/test.
Question text: context, question and the lettered options ("A. ..."), one per line.
Gold: the option letter "A".."D". Ids: ``logiqa/<split>/<0-based item index>``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mapd_dspy.tasks.answers import OPTION_LETTERS, OptionAnswers
from mapd_dspy.tasks.base import Example, Task, TaskDataError, read_text, require_field
from mapd_dspy.tasks.registry import register_task

LINES_PER_ITEM = 8
# Candidate files per split, first existing wins.
SPLIT_FILES = {
    "test": ("Test.txt",),
    "validation": ("Eval.txt",),
    "train": ("Train.txt", "Eval.txt"),
}
# Offset within an item -> the field that line holds, for error messages.
_FIELD_OF_LINE = {2: "context", 3: "question", 4: "option A", 5: "option B", 6: "option C",
                  7: "option D"}
_PUNCTUATED_LABEL = re.compile(r"^[A-Da-d]\s*[.?:)．]\s*")


def strip_option_label(line: str, position: int) -> str:
    """Option text without its "A." style label (see the module docstring for the rule)."""
    text = line.strip()
    punctuated = _PUNCTUATED_LABEL.match(text)
    if punctuated:
        return text[punctuated.end():].strip()
    own_letter = OPTION_LETTERS[position]
    if re.match(rf"^{own_letter}\s+\S", text):
        return text[1:].strip()
    return text


def parse_item(lines: list[str], first_line_number: int, where_file: str) -> dict[str, Any]:
    """One 8-line item as a row in the hub schema; errors name the file and line."""

    def line_error(offset: int, problem: str) -> TaskDataError:
        return TaskDataError(f"{where_file} line {first_line_number + offset}: {problem}")

    if lines[0].strip():
        raise line_error(0, "expected the blank line that starts an item")
    answer = lines[1].strip().upper()
    if answer not in OPTION_LETTERS:
        raise line_error(1, f"field 'answer' should be a letter a-d, got {lines[1].strip()!r}")
    for offset, field in _FIELD_OF_LINE.items():
        if not lines[offset].strip():
            raise line_error(offset, f"field {field!r} is empty")
    options = [strip_option_label(line, position) for position, line in enumerate(lines[4:8])]
    return {
        "context": lines[2].strip(),
        "query": lines[3].strip(),
        "options": options,
        "correct_option": answer,
    }


def parse_items(text: str, file_path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(first line number, row) for every item of a LogiQA text file."""
    lines = [line.rstrip("\r") for line in text.split("\n")]
    while lines and not lines[-1].strip():
        lines.pop()  # a trailing newline (or several) is not the start of another item
    if len(lines) % LINES_PER_ITEM:
        start = len(lines) - len(lines) % LINES_PER_ITEM + 1
        raise TaskDataError(
            f"{file_path} line {start}: incomplete item ({len(lines) % LINES_PER_ITEM} of "
            f"{LINES_PER_ITEM} lines); each item is a blank line, the answer, context, question "
            "and 4 options"
        )
    items = []
    for start in range(0, len(lines), LINES_PER_ITEM):
        chunk = lines[start:start + LINES_PER_ITEM]
        items.append((start + 1, parse_item(chunk, start + 1, str(file_path))))
    return items


def _first_field(row: Mapping[str, Any], names: tuple[str, ...], where: str) -> str:
    """The first of ``names`` present in ``row`` (hub copies name the columns differently)."""
    if not isinstance(row, Mapping):
        raise TaskDataError(f"{where}: expected a mapping, got {type(row).__name__}")
    for name in names:
        if name in row:
            return name
    raise TaskDataError(f"{where}: missing field {' / '.join(repr(name) for name in names)}")


def gold_letter(value: object, where: str, field: str) -> str:
    """Option letter from an answer stored as a letter ("b", "B") or a 0-based index (1, "1")."""
    text = str(value).strip()
    if isinstance(value, bool):
        text = ""
    if text.isdigit() and int(text) < len(OPTION_LETTERS):
        return OPTION_LETTERS[int(text)]
    if text.upper() in OPTION_LETTERS:
        return text.upper()
    raise TaskDataError(
        f"{where}: field {field!r} should be a letter A-D or an index 0-3, got {value!r}"
    )


def example_from_row(row: Mapping[str, Any], split: str, index: int, where: str) -> Example:
    """Map one row in the hub schema (also built from the local files) to an Example."""
    context = require_field(row, "context", str, where)
    query = require_field(row, _first_field(row, ("query", "question"), where), str, where)
    options_field = _first_field(row, ("options", "choices"), where)
    options = require_field(row, options_field, (list, tuple), where)
    if len(options) != len(OPTION_LETTERS) or not all(isinstance(o, str) for o in options):
        raise TaskDataError(f"{where}: field {options_field!r} should hold 4 option texts")
    answer_field = _first_field(row, ("correct_option", "answer_index", "answer", "label"), where)
    lettered = "\n".join(
        f"{letter}. {text.strip()}" for letter, text in zip(OPTION_LETTERS, options)
    )
    return Example(
        id=f"logiqa/{split}/{index}",
        question=f"{context.strip()}\n{query.strip()}\n{lettered}",
        gold=gold_letter(row[answer_field], where, answer_field),
        options=tuple(text.strip() for text in options),
    )


@register_task
class LogiQA(OptionAnswers, Task):
    name = "logiqa"
    hub_id = "lucasmccabe/logiqa"
    answer_format = OptionAnswers.answer_format
    splits = ("train", "validation", "test")

    def load_local(self, path: Path, split: str) -> list[Example]:
        file_path = path if path.is_file() else self._split_file(path, split)
        items = parse_items(read_text(file_path), file_path)
        return [
            example_from_row(row, split, index, f"{file_path} line {line_number}")
            for index, (line_number, row) in enumerate(items)
        ]

    def _split_file(self, folder: Path, split: str) -> Path:
        candidates = [folder / file_name for file_name in SPLIT_FILES[split]]
        for candidate in candidates:
            if candidate.is_file():
                return candidate
        tried = " or ".join(map(str, candidates))
        raise TaskDataError(f"{tried}: file not found for split {split!r}")

    def example_from_hub_row(
        self, row: Mapping[str, Any], split: str, index: int, where: str
    ) -> Example:
        return example_from_row(row, split, index, where)
