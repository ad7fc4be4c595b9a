"""The Task interface, the Example record, and the loading logic every task shares.

A task turns one dataset into a list of :class:`Example` (question text plus *normalised* gold
answer) and owns the metric for it. Subclasses supply only what differs between datasets:

* ``load_local(path, split)``: read the local files (a file or the task's folder);
* ``example_from_hub_row(row, split, index, where)``: map one hub row to an Example;
* ``extract_answer`` / ``normalize`` / ``is_correct``: usually from a mixin in ``answers.py``.

Source resolution (``Task.load``):

1. ``source`` is an existing file or directory: read it with ``load_local``.
2. ``source`` is None or ``"auto"``: read ``<data_dir>/<task folder>`` when that folder exists,
   else fall back to the task's default hub id. ``data_dir`` defaults to ``$MAPD_DATA_DIR``, else
   ``../shared/data`` relative to the current working directory.
3. ``source`` looks like a path (it is a PathLike, starts with ``.``, ``/`` or ``~``, or ends in
   ``.json``/``.jsonl``/``.txt``) but does not exist: :class:`TaskDataError`, rather than a
   confusing hub error.
4. Any other string is a hub id, loaded through ``datasets.load_dataset``.

Every problem with the data raises :class:`TaskDataError` whose message names the file (or hub
id), the line/item/row, and the field at fault.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

DATA_DIR_ENV_VAR = "MAPD_DATA_DIR"
DEFAULT_DATA_DIR = Path("..") / "shared" / "data"
_PATH_SUFFIXES = (".json", ".jsonl", ".txt")


@dataclass(frozen=True)
class Example:
    """One question of a task, ready to show to a model and to score.

    Attributes:
        id: stable id, unique within one load, e.g. ``"gsm8k/train/0"`` or ``"svamp/chal-1"``.
        question: the full text shown to a model (LogiQA: context, question and lettered options).
        gold: the normalised gold answer ("18", "12.5", "yes", "B").
        options: LogiQA option texts without their letters; empty for other tasks.
    """

    id: str
    question: str
    gold: str
    options: tuple[str, ...] = ()


class TaskDataError(ValueError):
    """Data that cannot be loaded; the message names the file or hub id, the row and the field."""


class Task(ABC):
    """One dataset: how to load it, and how to read and score an answer for it.

    Class attributes:
        name: registry name ("gsm8k").
        hub_id: the Hugging Face hub id users know, used when no local data is found.
        hub_config: configuration name passed with ``hub_id`` (e.g. "main" for openai/gsm8k).
        answer_format: short phrase for prompts ("a single number").
        splits: the split names ``load`` accepts.
        folder: the task's folder under the data dir (defaults to ``name``).
    """

    name: ClassVar[str]
    hub_id: ClassVar[str]
    hub_config: ClassVar[str | None] = None
    answer_format: ClassVar[str]
    splits: ClassVar[tuple[str, ...]] = ("train", "test")
    folder: ClassVar[str | None] = None

    # -- loading ---------------------------------------------------------------------------

    def load(
        self,
        split: str = "train",
        source: str | os.PathLike | None = None,
        data_dir: str | os.PathLike | None = None,
    ) -> list[Example]:
        """Load one split as Examples; see the module docstring for how ``source`` is resolved."""
        self._check_split(split)
        local_path, hub_id = self.resolve_source(source, data_dir)
        if local_path is not None:
            examples, origin = self.load_local(local_path, split), str(local_path)
        else:
            examples, origin = self.load_hub(hub_id, split), f"hub dataset {hub_id!r}"
        check_examples(examples, origin, split)
        return examples

    def resolve_source(
        self, source: str | os.PathLike | None, data_dir: str | os.PathLike | None
    ) -> tuple[Path | None, str]:
        """(local path or None, hub id) for a ``source`` argument; the path wins when set."""
        if source is None or source == "auto":
            folder = resolve_data_dir(data_dir) / (self.folder or self.name)
            return (folder, self.hub_id) if folder.exists() else (None, self.hub_id)
        path = Path(source).expanduser()
        if path.exists():
            return path, self.hub_id
        if _looks_like_path(source):
            raise TaskDataError(f"{self.name}: data file or folder {str(source)!r} does not exist")
        return None, str(source)

    @abstractmethod
    def load_local(self, path: Path, split: str) -> list[Example]:
        """Read ``split`` from a local file or from the task's data folder ``path``."""

    def load_hub(self, hub_id: str, split: str) -> list[Example]:
        """Load ``split`` of a hub dataset and map each row with ``example_from_hub_row``."""
        config = self.hub_config if hub_id == self.hub_id else None
        rows = load_hub_rows(hub_id, config, self.hub_split_name(split))
        return [
            self.example_from_hub_row(row, split, index, f"hub dataset {hub_id!r} row {index}")
            for index, row in enumerate(rows)
        ]

    def hub_split_name(self, split: str) -> str:
        """Name of ``split`` on the hub; tasks whose hub names differ override this."""
        return split

    @abstractmethod
    def example_from_hub_row(
        self, row: Mapping[str, Any], split: str, index: int, where: str
    ) -> Example:
        """Map one row in the hub schema to an Example; ``where`` names the row in errors."""

    def _check_split(self, split: str) -> None:
        if split not in self.splits:
            available = ", ".join(self.splits)
            raise TaskDataError(f"{self.name}: unknown split {split!r}; available: {available}")

    # -- answers ---------------------------------------------------------------------------

    @abstractmethod
    def extract_answer(self, text: str, example: Example | None = None) -> str | None:
        """The normalised answer found in free text, None if there is none."""

    @abstractmethod
    def normalize(self, answer: object) -> str | None:
        """Normalise a raw answer value (e.g. a model's ``answer`` field) like the gold."""

    @abstractmethod
    def is_correct(self, prediction: str | None, example: Example) -> bool:
        """The metric: whether ``prediction`` matches ``example.gold``; None is wrong."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, hub_id={self.hub_id!r})"


# -- source resolution ---------------------------------------------------------------------


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path:
    """``data_dir`` if given, else ``$MAPD_DATA_DIR``, else ``../shared/data`` from the cwd."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    from_env = os.environ.get(DATA_DIR_ENV_VAR)
    return Path(from_env).expanduser() if from_env else Path.cwd() / DEFAULT_DATA_DIR


def _looks_like_path(source: str | os.PathLike) -> bool:
    if isinstance(source, os.PathLike):
        return True
    return source.startswith((".", "/", "~")) or source.endswith(_PATH_SUFFIXES)


def load_hub_rows(hub_id: str, config: str | None, split: str) -> Iterable[Mapping[str, Any]]:
    """Rows of one split of a hub dataset; any failure becomes a TaskDataError naming it."""
    try:
        import datasets
    except ImportError as error:  # pragma: no cover - datasets is a hard dependency
        raise TaskDataError(f"loading hub dataset {hub_id!r} needs `datasets`") from error
    try:
        return datasets.load_dataset(hub_id, config, split=split)
    except Exception as error:  # network, auth, missing split: all reported the same way
        raise TaskDataError(
            f"could not load hub dataset {hub_id!r} (config {config!r}, split {split!r}): {error}"
        ) from error


# -- checks and readers shared by the tasks ------------------------------------------------


def check_examples(examples: list[Example], origin: str, split: str) -> None:
    """Reject an empty load and duplicate ids, naming where the data came from."""
    if not examples:
        raise TaskDataError(f"{origin}: no examples for split {split!r}")
    first_index_of: dict[str, int] = {}
    for index, example in enumerate(examples):
        if example.id in first_index_of:
            raise TaskDataError(
                f"{origin}: duplicate id {example.id!r} "
                f"(examples {first_index_of[example.id]} and {index} of split {split!r})"
            )
        first_index_of[example.id] = index


def require_field(row: object, field: str, expected: type | tuple[type, ...], where: str) -> Any:
    """``row[field]`` checked for presence, type and (for text) non-emptiness."""
    if not isinstance(row, Mapping):
        raise TaskDataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if field not in row:
        raise TaskDataError(f"{where}: missing field {field!r}")
    value = row[field]
    # bool is an int subclass, but a boolean where a number is expected is a data error.
    is_bool_for_number = isinstance(value, bool) and bool not in _as_tuple(expected)
    if not isinstance(value, expected) or is_bool_for_number:
        expected_names = "/".join(kind.__name__ for kind in _as_tuple(expected))
        raise TaskDataError(
            f"{where}: field {field!r} should be {expected_names}, got {type(value).__name__}"
        )
    if isinstance(value, str) and not value.strip():
        raise TaskDataError(f"{where}: field {field!r} is empty")
    return value


def _as_tuple(expected: type | tuple[type, ...]) -> tuple[type, ...]:
    return expected if isinstance(expected, tuple) else (expected,)


def read_text(path: Path) -> str:
    """Whole text of a UTF-8 file; unreadable or missing files become TaskDataError."""
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise TaskDataError(f"{path}: cannot read file: {error}") from error


def read_jsonl(path: Path) -> list[tuple[int, Any]]:
    """(1-based line number, parsed object) for each non-blank line of a JSON-lines file."""
    rows = []
    for line_number, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((line_number, json.loads(line)))
        except json.JSONDecodeError as error:
            message = f"{path} line {line_number}: malformed JSON: {error.msg}"
            raise TaskDataError(message) from error
    return rows


def read_json_list(path: Path) -> list[Any]:
    """The top-level list of a JSON file."""
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as error:
        raise TaskDataError(
            f"{path} line {error.lineno} column {error.colno}: malformed JSON: {error.msg}"
        ) from error
    if not isinstance(data, list):
        raise TaskDataError(f"{path}: expected a JSON list of items, got {type(data).__name__}")
    return data


def file_in(path: Path, file_name: str) -> Path:
    """``path`` itself when it is a file, else ``path / file_name`` (which must exist)."""
    if path.is_file():
        return path
    candidate = path / file_name
    if not candidate.is_file():
        raise TaskDataError(f"{candidate}: file not found")
    return candidate
