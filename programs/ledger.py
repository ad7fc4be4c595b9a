"""Memoised LLM calls: every call goes through the record store, keyed like the record.

A key whose record exists is not called again: a finished run re-run makes zero calls and an
interrupted one resumes where it stopped. Transient failures (``lm_error``) are retried on the
next run; parse and validation failures are final unless ``retry_failed`` is set, because the
same prompt usually fails the same way and each attempt costs money.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

import dspy

from mapd_dspy.records import Failure, Record, RecordKey, RecordStore, Stage
from mapd_dspy.programs.roles import Role, call_module


class InvalidOutput(ValueError):
    """The model answered in the right shape but with an unusable value (e.g. a score of 'high')."""


class Ledger:
    def __init__(self, store: RecordStore | None = None, retry_failed: bool = False, budget: Any = None):
        self.store = store if store is not None else RecordStore.in_memory()
        self.retry_failed = retry_failed
        # Optional spending limit (mapd_dspy.costs.Budget): checked before each call, charged after.
        self.budget = budget
        self.calls_made = 0
        self._count_lock = threading.Lock()  # calls run on many threads at once

    def done(self, key: RecordKey) -> Record | None:
        """The stored record for ``key`` if it counts as finished, else None."""
        record = self.store.get(key)
        if record is None or record.ok:
            return record
        if record.failure is not None and record.failure.kind == "lm_error":
            return None
        return None if self.retry_failed else record

    def call(
        self,
        key: RecordKey,
        role: Role,
        module: dspy.Module,
        inputs: dict[str, Any],
        finish: Callable[[dspy.Prediction], dict[str, Any]],
        allowed: bool = True,
    ) -> Record | None:
        """Return the finished record for ``key``, calling ``module`` only if there is none.

        ``finish`` turns a prediction into record fields (``output``, ``answer``, ``score`` ...)
        and raises :class:`InvalidOutput` for unusable values. With ``allowed=False`` this is a
        pure lookup (used when a later stage runs alone).
        """
        existing = self.done(key)
        if existing is not None or not allowed:
            return existing
        if self.budget is not None:
            self.budget.check()  # raises BudgetExhausted: no new call once the budget is spent
        result = call_module(role, module, **inputs)
        with self._count_lock:
            self.calls_made += 1
        fields: dict[str, Any] = {}
        failure = result.failure
        if failure is None:
            try:
                fields = finish(result.prediction)
            except InvalidOutput as exc:
                raw = json.dumps(dict(result.prediction.items()), default=str, ensure_ascii=False)
                failure = Failure(kind="invalid_output", reason=str(exc), raw=raw)
                fields = {}
        example_id, stage, teacher, reviewer = key
        record = Record(
            example_id=example_id,
            stage=stage,
            teacher=teacher,
            reviewer=reviewer,
            status="failed" if failure else "ok",
            model=role.model,
            failure=failure,
            usage=result.usage,
            seconds=result.seconds,
            **fields,
        )
        self.store.append(record)
        if self.budget is not None:
            self.budget.charge(record)
        return record


def record_key(example_id: str, stage: Stage, teacher: str = "", reviewer: str = "") -> RecordKey:
    return (example_id, stage, teacher, reviewer)
