"""Typed records and the append-only JSONL store every stage reads and writes.

Every LLM result, success or failure, becomes a :class:`Record` appended to
``runs/<name>/records.jsonl`` *before* anything uses it. Stages look results up by key
``(example_id, stage, teacher, reviewer)``, so a run can stop anywhere and resume, and
derived results (the acceptance gate, the summary) can be recomputed from disk alone.
When a key is written twice (a retried failure) the last line wins.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError

Stage = Literal["exam", "explain", "rationale", "review", "eval"]
FailureKind = Literal["lm_error", "parse_error", "invalid_output"]
RecordKey = tuple[str, str, str, str]


class Failure(BaseModel):
    """Why a call produced no usable output; ``raw`` keeps whatever text the model returned."""

    kind: FailureKind
    reason: str
    raw: str | None = None


class Record(BaseModel):
    """One LLM call's result.

    ``teacher`` is the author of the text (explain/rationale) or of the rationale under review;
    ``reviewer`` is set on review records only. ``output`` holds the signature's output fields.
    """

    example_id: str
    stage: Stage
    teacher: str = ""
    reviewer: str = ""
    status: Literal["ok", "failed"]
    model: str
    output: dict[str, Any] = Field(default_factory=dict)
    answer: str | None = Field(None, description="Normalised answer extracted from the output (exam, rationale).")
    correct: bool | None = Field(None, description="answer == gold (exam, rationale).")
    score: int | None = Field(None, description="Validated, clamped peer score (review).")
    failure: Failure | None = None
    usage: dict[str, int] = Field(default_factory=dict)
    seconds: float = 0.0
    created_at: float = Field(default_factory=time.time)

    @property
    def key(self) -> RecordKey:
        return (self.example_id, self.stage, self.teacher, self.reviewer)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


class RecordFileError(ValueError):
    """The records file is damaged in a way that cannot be a torn final write."""


class RecordStore:
    """Append-only, thread-safe record log with an in-memory index by key."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path is not None else None
        self._lock = threading.Lock()
        self._latest: dict[RecordKey, Record] = {}
        if self.path is not None and self.path.exists():
            for record in self.read_all(self.path):
                self._latest[record.key] = record

    @classmethod
    def in_memory(cls) -> "RecordStore":
        """A store that keeps records in memory only (notebooks, unit tests)."""
        return cls(None)

    # -- reading ---------------------------------------------------------------------------

    @staticmethod
    def read_all(path: Path) -> Iterator[Record]:
        """Every record line of ``path`` in order, superseded ones included (the store keeps the last per key)."""
        lines = path.read_text(encoding="utf-8").splitlines()
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                yield Record.model_validate_json(line)
            except ValidationError as exc:
                # A process killed mid-write leaves at most one torn line, and only at the end:
                # drop it (that call is simply made again). Damage anywhere else is an error.
                if number == len(lines):
                    continue
                raise RecordFileError(f"{path}:{number}: not a valid record: {exc.errors()[0]['msg']}") from None

    def get(self, key: RecordKey) -> Record | None:
        return self._latest.get(key)

    def records(self, stage: Stage | None = None) -> list[Record]:
        return [r for r in self._latest.values() if stage is None or r.stage == stage]

    def __len__(self) -> int:
        return len(self._latest)

    # -- writing ---------------------------------------------------------------------------

    def append(self, record: Record) -> Record:
        line = record.model_dump_json() + "\n"
        with self._lock:
            if self.path is None:
                self._latest[record.key] = record
                return record
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write(line)
                handle.flush()
                # The record is what was paid for: make it durable before anyone relies on it.
                os.fsync(handle.fileno())
            self._latest[record.key] = record
        return record


def write_jsonl(path: Path, rows: Iterable[BaseModel | dict]) -> None:
    """Write derived rows atomically (temp file + rename): readers never see half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        for row in rows:
            data = row.model_dump(mode="json") if isinstance(row, BaseModel) else row
            handle.write(json.dumps(data, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
