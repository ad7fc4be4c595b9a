"""Evaluate a vLLM-served student on a task's test split, one record per answer.

Input: task examples (usually the ``test`` split) and a student :class:`~mapd_dspy.programs.Role`
whose LM is ``hosted_vllm/<served name>`` (``student-r0`` before distillation, ``student-r1``
after round one, ...).
Output: one ``eval`` record per example in the run's ``records.jsonl``, keyed
``(example_id, "eval", label, "")``, and an :class:`EvalResult` computed from those records.

Each answer goes through the :class:`~mapd_dspy.programs.Ledger`, so it is on disk before it is
counted, a re-run makes zero calls, and evaluations of different rounds or baselines never collide
because ``label`` (the served name) is part of the key. Unparseable answers count as wrong and
stay as failure records with their raw text.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any

from pydantic import BaseModel, Field

from mapd_dspy.programs import Ledger, Role, StudentExam, bind
from mapd_dspy.programs.mapd import answer_fields
from mapd_dspy.records import Record, RecordKey, RecordStore
from mapd_dspy.validation import StrictSection

EVAL_STAGE = "eval"


class EvalSettings(StrictSection):
    """How a student is evaluated (greedy decoding on a held-out split)."""

    split: str = Field("test", description="Task split to evaluate on (held out from the exam/teach split).")
    limit: int | None = Field(50, ge=1, description="Evaluate only the first N questions (None: the whole split).")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="Sampling temperature (0: greedy, comparable runs).")
    max_tokens: int = Field(384, ge=1, description="Completion token limit per answer.")
    concurrency: int = Field(16, ge=1, le=256, description="Questions sent to the server at once.")


class EvalResult(BaseModel):
    """Accuracy of one served student (``label``) over ``n`` questions, from the stored records."""

    label: str
    n: int
    correct: int
    accuracy: float | None
    failures: dict[str, int] = Field(default_factory=dict, description="Failed eval records by failure kind.")


def eval_key(example_id: str, label: str) -> RecordKey:
    return (example_id, EVAL_STAGE, label, "")


def pending_examples(examples: Sequence[Any], store: RecordStore, label: str, retry_failed: bool = False) -> list:
    """Examples that still need a call: lets a caller skip starting a server when none are left."""
    ledger = Ledger(store, retry_failed=retry_failed)
    return [example for example in examples if ledger.done(eval_key(example.id, label)) is None]


def evaluate_student(
    task: Any,
    examples: Sequence[Any],
    role: Role,
    store: RecordStore,
    label: str,
    concurrency: int = 16,
    progress: Callable[[Record], None] | None = None,
) -> EvalResult:
    """Answer every example with ``role`` (unless already recorded) and score the stored records.

    ``progress`` is called with each new record as it is written (e.g. to advance a progress bar).
    """
    ledger = Ledger(store)
    module = bind(StudentExam(), role)
    todo = pending_examples(examples, store, label)
    if todo:
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            futures = [pool.submit(answer_one, task, example, role, ledger, module, label) for example in todo]
            try:
                for future in as_completed(futures):
                    record = future.result()
                    if progress is not None:
                        progress(record)
            except BaseException:
                # Ctrl-C or a bug: drop queued questions; the records already written stay valid.
                for future in futures:
                    future.cancel()
                raise
    return result_from_records(examples, store, label)


def answer_one(task: Any, example: Any, role: Role, ledger: Ledger, module: StudentExam, label: str) -> Record:
    """One eval answer: like the exam stage's ``examine``, but under the ``eval`` stage and ``label``."""
    inputs = {"question": example.question, "answer_format": task.answer_format}
    finish = answer_fields(task, example, "reasoning")
    return ledger.call(eval_key(example.id, label), role, module, inputs, finish)


def result_from_records(examples: Sequence[Any], store: RecordStore, label: str) -> EvalResult:
    """Score ``label`` from its stored eval records alone; missing or failed answers count as wrong."""
    records = [store.get(eval_key(example.id, label)) for example in examples]
    correct = sum(1 for record in records if record is not None and record.correct)
    failures = Counter(r.failure.kind for r in records if r is not None and r.failure is not None)
    n = len(examples)
    accuracy = round(correct / n, 4) if n else None
    return EvalResult(label=label, n=n, correct=correct, accuracy=accuracy, failures=dict(failures))


def student_role(served_name: str, api_base: str, settings: EvalSettings | None = None, cache: bool = True) -> Role:
    """The role for a student served by vLLM as ``served_name`` (JSON adapter + structured outputs).

    Keep ``served_name`` versioned per round: DSPy's cache key ignores ``api_base``.
    """
    # Imported here: the engine may import this module, and it pulls in the whole run machinery.
    from mapd_dspy.config import StudentConfig
    from mapd_dspy.engine import make_role

    settings = settings or EvalSettings()
    cfg = StudentConfig(served_name=served_name, temperature=settings.temperature, max_tokens=settings.max_tokens)
    return make_role("student", cfg, f"hosted_vllm/{served_name}", api_base, cache)
