"""The training-set compiler: a finished MAPD run's records -> a Hugging Face dataset for TRL SFT.

Input (``runs/<name>/``):

* ``records.jsonl``: typed :class:`~mapd_dspy.records.Record` s; this step reads the ``exam``
  (student response), ``explain`` (teacher's mistake explanation) and ``rationale`` records.
* ``decisions.jsonl``: the acceptance gate's verdict per rationale
  (``example_id, teacher, accepted, reason, mean_score, scores, answer_correct``).

Output rows, in TRL's conversational prompt-completion format (completion-only loss):

* ``prompt``:     ``[{"role": "system", ...}, {"role": "user", ...}]``, rendered by DSPy's ``JSONAdapter``
  exactly as the student sees it at inference;
* ``completion``: ``[{"role": "assistant", "content": <JSON object of the signature's outputs>}]``;
* ``kind``:       ``"rationale"`` (an accepted teacher rationale for ``SolveQuestion``) or ``"mistake"``
  (a teacher's explanation of the student's own wrong answer, for ``LearnFromMistake``);
* ``example_id``, ``teacher``: where the row came from.

Written to ``runs/<name>/train_set/`` (``Dataset.save_to_disk`` plus a dataset card ``README.md``) and
``runs/<name>/train_set.jsonl`` (the same rows, one JSON object per line).
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import datasets
import dspy
from pydantic import Field

from mapd_dspy.programs.mapd import student_response_text
from mapd_dspy.records import Record, RecordFileError, RecordStore, write_jsonl
from mapd_dspy.signatures import ExplainMistake, LearnFromMistake, ReviewRationale, SolveQuestion, WriteRationale
from mapd_dspy.tasks import Example
from mapd_dspy.validation import StrictSection

TRAIN_SET_DIR = "train_set"
TRAIN_SET_JSONL = "train_set.jsonl"
KINDS = ("rationale", "mistake")
TEACHER_SIGNATURES = (ExplainMistake, WriteRationale, ReviewRationale)


class CompileError(ValueError):
    """No training set can be compiled from this run; the message says why and what to do."""


class CompileSettings(StrictSection):
    """How rows are chosen when a question has several usable teacher texts."""

    choice: Literal["random", "best_score", "all"] = Field(
        "random",
        description="Which accepted rationale to keep per question when several teachers pass the gate: "
        "random (seeded; the reference code takes a random accepted one), best_score (highest mean peer "
        "score, ties broken by teacher order) or all of them.",
    )
    explanations: Literal["random", "all"] = Field(
        "random",
        description="Which teacher's mistake explanation to keep per mistake: random (seeded) or all. "
        "Explanations are not peer-reviewed (they are conditioned on the gold answer); only ok records count.",
    )
    seed: int = Field(0, description="Seed of the per-question random choices.")
    push_to_hub: str | None = Field(
        None, description="Hugging Face hub repo id to push the dataset to (off by default; needs network and a token)."
    )


@dataclass
class CompiledSet:
    dataset: datasets.Dataset
    path: Path
    counts: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Prompts: exactly what the student sees, rendered by DSPy's JSONAdapter


def student_solve_signature() -> type[dspy.Signature]:
    """The signature the student's exam predictor runs (ChainOfThought adds ``reasoning`` first)."""
    return dspy.ChainOfThought(SolveQuestion).predict.signature


def chat_row(signature: type[dspy.Signature], inputs: dict[str, str], outputs: dict[str, str]) -> dict[str, list]:
    """Prompt messages and assistant completion for one call of ``signature``, as JSONAdapter formats them."""
    adapter = dspy.JSONAdapter()
    prompt = adapter.format(signature, demos=[], inputs=inputs)
    content = adapter.format_assistant_message_content(signature, outputs)
    return {"prompt": prompt, "completion": [{"role": "assistant", "content": content}]}


def rationale_row(task: Any, example: Example, rationale: Record) -> dict[str, Any]:
    """In: an accepted ``rationale`` record (output ``rationale``, ``answer``). Out: a ``kind="rationale"`` row."""
    inputs = {"question": example.question, "answer_format": task.answer_format}
    outputs = {"reasoning": rationale.output["rationale"], "answer": rationale.output["answer"]}
    row = chat_row(student_solve_signature(), inputs, outputs)
    return {**row, "kind": "rationale", "example_id": example.id, "teacher": rationale.teacher}


def mistake_row(example: Example, student_response: str, explanation: Record) -> dict[str, Any]:
    """In: the student's response text and an ok ``explain`` record (output ``explanation``).
    Out: a ``kind="mistake"`` row for ``LearnFromMistake``."""
    inputs = {"question": example.question, "your_answer": student_response, "correct_answer": example.gold}
    row = chat_row(LearnFromMistake, inputs, {"explanation": explanation.output["explanation"]})
    return {**row, "kind": "mistake", "example_id": example.id, "teacher": explanation.teacher}


# --------------------------------------------------------------------------------------------
# Choosing which teacher texts become rows


def question_rng(seed: int, example_id: str, purpose: str = "") -> random.Random:
    # Seeded per question (string seeds hash with sha512, stable across processes), so adding or
    # removing other questions never changes this question's pick.
    return random.Random(f"{seed}:{example_id}{':' + purpose if purpose else ''}")


def teacher_order(decisions: list[dict]) -> dict[str, int]:
    """Teacher rank by first appearance in ``decisions.jsonl`` (the config's teacher order)."""
    order: dict[str, int] = {}
    for decision in decisions:
        order.setdefault(decision["teacher"], len(order))
    return order


def by_teacher_order(records: list[Record], order: dict[str, int]) -> list[Record]:
    # A fixed candidate order is what makes the seeded choice reproducible; the store's own
    # order follows call completion, which concurrency makes arbitrary.
    return sorted(records, key=lambda r: (order.get(r.teacher, len(order)), r.teacher))


def accepted_rationales(example_id: str, store: RecordStore, decisions: list[dict]) -> list[tuple[Record, float]]:
    """(rationale record, mean peer score) for each rationale of ``example_id`` accepted by the gate and ok.

    ``decisions`` may be all of the run's decisions or only this question's.
    """
    accepted = []
    for decision in decisions:
        if decision["example_id"] != example_id or not decision.get("accepted"):
            continue
        record = store.get((example_id, "rationale", decision["teacher"], ""))
        if record is not None and record.ok and record.output.get("rationale"):
            accepted.append((record, float(decision.get("mean_score") or 0.0)))
    return accepted


def group_by_example(items: list, example_id_of) -> dict[str, list]:
    grouped: dict[str, list] = {}
    for item in items:
        grouped.setdefault(example_id_of(item), []).append(item)
    return grouped


def choose_rationales(
    candidates: list[tuple[Record, float]], settings: CompileSettings, order: dict[str, int], rng: random.Random
) -> list[Record]:
    """In: accepted (record, mean score) pairs of one question. Out: the records that become rows."""
    records = by_teacher_order([record for record, _ in candidates], order)
    if not records or settings.choice == "all":
        return records
    if settings.choice == "random":
        return [rng.choice(records)]
    mean_of = {record.teacher: mean for record, mean in candidates}
    # max() keeps the first of equal scores, and records are in teacher order: ties -> teacher order.
    return [max(records, key=lambda record: mean_of[record.teacher])]


def usable_explanations(explain_records: list[Record], order: dict[str, int]) -> list[Record]:
    """In: one question's ``explain`` records. Out: the ok ones with non-empty text, in teacher order."""
    usable = [record for record in explain_records if record.ok and record.output.get("explanation")]
    return by_teacher_order(usable, order)


def choose_explanations(records: list[Record], settings: CompileSettings, rng: random.Random) -> list[Record]:
    if not records or settings.explanations == "all":
        return records
    return [rng.choice(records)]


def student_mistake(example: Example, store: RecordStore) -> str | None:
    """The student's response text if the exam record is a mistake (wrong, or unparsed with raw text)."""
    exam = store.get((example.id, "exam", "", ""))
    if exam is None or exam.correct:
        return None
    return student_response_text(exam)


# --------------------------------------------------------------------------------------------
# Rows and counts


def training_rows(
    task: Any, examples: list[Example], store: RecordStore, decisions: list[dict], settings: CompileSettings
) -> list[dict]:
    """In: the run's questions, records and gate decisions. Out: rows with columns ``prompt``,
    ``completion``, ``kind``, ``example_id``, ``teacher``, in question order (rationale rows first).

    Returns an empty list when nothing is usable; :func:`compile_training_set` turns that into a
    :class:`CompileError` with a diagnosis.
    """
    order = teacher_order(decisions)
    decisions_of = group_by_example(decisions, lambda decision: decision["example_id"])
    explanations_of = group_by_example(store.records("explain"), lambda record: record.example_id)
    rows = []
    for example in examples:
        accepted = accepted_rationales(example.id, store, decisions_of.get(example.id, []))
        rng = question_rng(settings.seed, example.id)
        for record in choose_rationales(accepted, settings, order, rng):
            rows.append(rationale_row(task, example, record))
        response = student_mistake(example, store)
        if response is None:
            continue
        explanations = usable_explanations(explanations_of.get(example.id, []), order)
        # A separate stream, so switching the rationale choice does not move the explanation picks.
        explanation_rng = question_rng(settings.seed, example.id, "explain")
        for record in choose_explanations(explanations, settings, explanation_rng):
            rows.append(mistake_row(example, response, record))
    return rows


def source_counts(examples: list[Example], store: RecordStore, decisions: list[dict]) -> dict[str, int]:
    """What the run offered for these questions (the denominators behind the rows)."""
    ids = {example.id for example in examples}
    decisions_of = group_by_example(decisions, lambda decision: decision["example_id"])
    explanations_of = group_by_example(store.records("explain"), lambda record: record.example_id)
    mistake_ids = [example.id for example in examples if student_mistake(example, store) is not None]
    return {
        "questions": len(examples),
        "exam_records": sum(store.get((i, "exam", "", "")) is not None for i in ids),
        "mistakes": len(mistake_ids),
        "decisions": len(decisions),
        "decisions_for_questions": sum(len(decisions_of.get(i, [])) for i in ids),
        "accepted_rationales": sum(len(accepted_rationales(i, store, decisions_of.get(i, []))) for i in ids),
        "usable_explanations": sum(len(usable_explanations(explanations_of.get(i, []), {})) for i in mistake_ids),
    }


def row_counts(rows: list[dict]) -> dict[str, Any]:
    """Rows in total, per kind, and per teacher and kind."""
    per_teacher: dict[str, Counter] = {}
    for row in rows:
        per_teacher.setdefault(row["teacher"], Counter())[row["kind"]] += 1
    return {
        "rows": len(rows),
        "by_kind": {kind: sum(row["kind"] == kind for row in rows) for kind in KINDS},
        "by_teacher": {t: {kind: counts[kind] for kind in KINDS} for t, counts in sorted(per_teacher.items())},
    }


def why_empty(counts: dict[str, int], run_dir: Path) -> str:
    """A diagnosis of an empty training set that says what to change."""
    if counts["exam_records"] == 0:
        return (f"none of the {counts['questions']} given questions has an exam record in {run_dir} "
                "(wrong task or split, or run `--stage exam` first)")
    if counts["mistakes"] == 0:
        return (f"the student made no usable mistake on the {counts['exam_records']} examined questions "
                f"in {run_dir}: nothing to teach")
    stale = counts["decisions"] - counts["decisions_for_questions"]
    note = f" ({stale} decisions refer to other questions: wrong task or split?)" if stale else ""
    return (f"0 accepted rationales and 0 usable explanations for {counts['mistakes']} mistakes in {run_dir}{note}; "
            "lower review.threshold or use stronger teachers")


# --------------------------------------------------------------------------------------------
# Reading the run


def read_decisions(path: Path) -> list[dict]:
    """The gate's decisions, one JSON object per line; damage names the file and line."""
    decisions = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            decision = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CompileError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
        if not isinstance(decision, dict) or not {"example_id", "teacher", "accepted"} <= decision.keys():
            raise CompileError(f"{path}:{number}: a decision needs example_id, teacher and accepted")
        decisions.append(decision)
    return decisions


def read_run(run_dir: Path) -> tuple[RecordStore, list[dict]]:
    records_path, decisions_path = run_dir / "records.jsonl", run_dir / "decisions.jsonl"
    if not records_path.is_file():
        raise CompileError(f"{records_path} is missing: run the exam, teach and review stages first (`--stage all`)")
    if not decisions_path.is_file():
        raise CompileError(f"{decisions_path} is missing: run `--stage review`, which applies the gate and writes it")
    try:
        store = RecordStore(records_path)
    except RecordFileError as exc:
        raise CompileError(str(exc)) from None
    return store, read_decisions(decisions_path)


# --------------------------------------------------------------------------------------------
# Dataset card


def card_front_matter(provenance: dict) -> str:
    return "\n".join([
        "---",
        "license: other",
        "license_name: unknown",
        "task_categories:",
        "- text-generation",
        "tags:",
        "- mapd",
        "- distillation",
        "- dspy",
        f"pretty_name: MAPD training set ({provenance.get('task', 'unknown task')})",
        "---",
    ])


def teacher_table(provenance: dict, counts: dict[str, Any]) -> list[str]:
    lines = ["| teacher | model | rationale rows | mistake rows |", "|---|---|---|---|"]
    teachers = list(provenance.get("teachers") or [])
    named = {teacher.get("name") for teacher in teachers}
    teachers += [{"name": name, "model": "?"} for name in counts["by_teacher"] if name not in named]
    for teacher in teachers:
        rows = counts["by_teacher"].get(teacher.get("name"), {})
        lines.append(f"| {teacher.get('name')} | `{teacher.get('model')}` | {rows.get('rationale', 0)} | "
                     f"{rows.get('mistake', 0)} |")
    return lines


def dataset_card(provenance: dict, settings: CompileSettings, counts: dict[str, Any], run_dir: Path) -> str:
    """The dataset card (README.md): where the rows came from and how they were chosen.

    Only named provenance fields are rendered, never the whole dict, so nothing unexpected
    (say, a credential a caller slipped in) reaches a file that may be pushed to the hub.
    """
    kinds = counts["by_kind"]
    lines = [
        card_front_matter(provenance),
        "",
        "# MAPD training set",
        "",
        "Compiled by `mapd_dspy.finetune.compile` from a Mistake-Aware Peer-Review Distillation run "
        "([arXiv 2410.03663](https://arxiv.org/abs/2410.03663)).",
        "",
        f"- source run: `{run_dir}`",
        f"- task: `{provenance.get('task')}`, split `{provenance.get('split')}`",
    ]
    if provenance.get("student"):
        lines.append(f"- student: `{provenance['student']}`")
    lines += [
        f"- acceptance gate: {provenance.get('gate')} (threshold {provenance.get('threshold')})",
        f"- rationale choice: `{settings.choice}`; explanation choice: `{settings.explanations}`; seed {settings.seed}",
        "",
        "## Rows",
        "",
        f"{counts['rows']} rows: {kinds['rationale']} `rationale`, {kinds['mistake']} `mistake` "
        f"(from {counts['questions']} questions, {counts['mistakes']} student mistakes, "
        f"{counts['accepted_rationales']} accepted rationales, {counts['usable_explanations']} usable explanations).",
        "",
        *teacher_table(provenance, counts),
        "",
        "## Format",
        "",
        "TRL conversational prompt-completion: `prompt` (system + user messages), `completion` (one assistant "
        "message holding a JSON object), `kind`, `example_id`, `teacher`. Prompts are rendered by DSPy's "
        f"`JSONAdapter` (dspy {dspy.__version__}) exactly as the student is prompted:",
        "",
        "- `rationale` rows: student signature `SolveQuestion` (with ChainOfThought's `reasoning`); the completion "
        "is an accepted teacher rationale (`WriteRationale`) that passed peer review (`ReviewRationale`).",
        "- `mistake` rows: student signature `LearnFromMistake` (question, the student's own wrong answer, the "
        "correct answer); the completion is a teacher's explanation (`ExplainMistake`), written with the gold "
        "answer as a hint and not peer-reviewed.",
        "",
        "Teacher-side signatures: " + ", ".join(f"`{sig.__name__}`" for sig in TEACHER_SIGNATURES),
        "",
        "License: unknown. The rows are model outputs on the task's questions: check the task dataset's license "
        "and the teacher models' terms of use before redistributing.",
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Writing


def replace_dir(new_dir: Path, target: Path) -> None:
    """Move a finished ``new_dir`` to ``target``, replacing an older one; a reader sees old or new, whole."""
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
        # A crash between these two renames leaves no train_set/ (the old one as .train_set.old),
        # never a half-written one.
        new_dir.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        new_dir.rename(target)


def write_train_set(dataset: datasets.Dataset, card: str, run_dir: Path) -> Path:
    """Write ``train_set/`` (save_to_disk + README.md) via a temp dir in ``run_dir``, then rename."""
    target = run_dir / TRAIN_SET_DIR
    # The temp dir sits inside run_dir so the final rename stays on one filesystem (atomic).
    with tempfile.TemporaryDirectory(prefix=".train_set.", dir=run_dir) as scratch:
        staged = Path(scratch) / TRAIN_SET_DIR
        dataset.save_to_disk(str(staged))
        (staged / "README.md").write_text(card, encoding="utf-8")
        replace_dir(staged, target)
    return target


def compile_training_set(
    run_dir: str | Path, task: Any, examples: list[Example], settings: CompileSettings, provenance: dict
) -> CompiledSet:
    """In: a finished run directory (records.jsonl, decisions.jsonl), its task and questions.
    Out: ``run_dir/train_set/`` (dataset + card), ``run_dir/train_set.jsonl``, and the :class:`CompiledSet`.

    Raises :class:`CompileError` when an input file is missing or damaged, or no row can be made.
    """
    run_dir = Path(run_dir)
    store, decisions = read_run(run_dir)
    rows = training_rows(task, examples, store, decisions, settings)
    counts = {**source_counts(examples, store, decisions), **row_counts(rows)}
    if not rows:
        raise CompileError(why_empty(counts, run_dir))
    dataset = datasets.Dataset.from_list(rows)
    path = write_train_set(dataset, dataset_card(provenance, settings, counts, run_dir), run_dir)
    write_jsonl(run_dir / TRAIN_SET_JSONL, rows)
    if settings.push_to_hub:
        dataset.push_to_hub(settings.push_to_hub)
    return CompiledSet(dataset=dataset, path=path, counts=counts)
