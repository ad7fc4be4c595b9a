"""Prompt optimization for the teachers' modules with DSPy's optimizers (the ``optimize`` stage).

In: a :class:`~mapd_dspy.programs.mapd.MAPDProgram` (its roles, writers and reviewers), the task's
questions, the ``optimize`` settings. Out: one DSPy state file per optimized module,
``<out_dir>/<teacher>.<kind>.json`` (``kind``: ``writer`` = RationaleWriter, ``reviewer`` = Reviewer),
and the before/after metric on the dev split per module.

* **Data.** The task split (all of it: ``task.limit`` is for the exam) is shuffled (``seed``) into
  ``train_size`` train and ``dev_size`` dev questions.
  The dev split is never shown to an optimizer, so before/after is a held-out comparison; optimizers
  that choose among candidates (random search, MIPROv2, GEPA) score them on the train split.
* **Writers** are scored by :class:`~mapd_dspy.programs.metrics.WriterMetric`: right answer, then the
  other teachers' reviewers (as the program holds them: loaded from ``programs.path`` or zero-shot).
* **Reviewers** need rationales whose correctness is known. They come from the ``rationale`` records of
  a previous run (``records``) when it has any; else every teacher first writes a rationale for each
  train and dev question with its current writer, and the gold answer grades it. A reviewer never sees
  its own teacher's rationales (as in MAPD). Those examples are split by question (seeded), so the
  rationales of one question all land on the same side.
* **Optimizers**, one function each: ``bootstrap`` (BootstrapFewShot), ``random_search``
  (BootstrapFewShotWithRandomSearch), ``mipro`` (MIPROv2, ``auto=None`` with explicit sizes) and ``gepa``
  (GEPA, with a metric call budget). A demo is kept only if the metric says the gate would be right
  (reviewer) or would accept it (writer). Labeled demos are off: a training example holds no critique
  or rationale to show.
* **Saved state** holds demos and instructions only (``module.save``'s JSON format with every
  predictor's ``lm`` removed): which model answers is the config's business, and no key, endpoint or
  model setting reaches the file. :func:`load_program` checks the file against the module (predictor
  names, signature fields) before loading; :func:`apply_saved_programs` is how a run uses them.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dspy

from mapd_dspy.programs.ledger import InvalidOutput
from mapd_dspy.programs.mapd import read_answer
from mapd_dspy.programs.metrics import PeerReview, ReviewerMetric, WriterMetric, review_outcome
from mapd_dspy.programs.roles import Role, bind, call_module
from mapd_dspy.records import RecordStore

if TYPE_CHECKING:
    from mapd_dspy.programs.mapd import MAPDProgram

KINDS = ("explainer", "writer", "reviewer")  # file name part -> MAPDProgram.<kind>s
OPTIMIZABLE = ("writer", "reviewer")
OPTIMIZE_REPORT = "optimize.json"


class ProgramStateError(ValueError):
    """A saved program does not fit the module it is loaded into; the message names the file."""


# --------------------------------------------------------------------------------------------
# Saving and loading compiled modules


def program_path(folder: str | Path, teacher: str, kind: str) -> Path:
    return Path(folder) / f"{teacher}.{kind}.json"


def module_structure(module: dspy.Module) -> dict[str, dict[str, list[str]]]:
    """Predictor names and their signature's input and output field names."""
    return {
        name: {"inputs": list(p.signature.input_fields), "outputs": list(p.signature.output_fields)}
        for name, p in module.named_predictors()
    }


def save_program(module: dspy.Module, path: str | Path, kind: str) -> Path:
    """Write ``module``'s state as DSPy's JSON (what ``module.save(path)`` writes) without any LM state."""
    from dspy.utils.saving import get_dependency_versions

    state = module.dump_state()
    for name, _ in module.named_predictors():
        state[name]["lm"] = None  # the model (and its key, endpoint) comes from the config, never the file
    state["metadata"] = {
        "dependency_versions": get_dependency_versions(),
        "mapd": {"kind": kind, "structure": module_structure(module)},
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(state, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def load_program(module: dspy.Module, path: str | Path) -> dspy.Module:
    """Load a saved state into ``module`` after checking it was saved from the same structure.

    Loading clears the predictors' LMs (the file holds none): bind the module to its role after.
    """
    path = Path(path)
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ProgramStateError(f"{path}: not a readable DSPy program state ({exc})") from None
    expected = module_structure(module)
    saved_names = sorted(name for name in state if name != "metadata")
    if saved_names != sorted(expected):
        raise ProgramStateError(
            f"{path}: saved predictors {saved_names} do not match the {type(module).__name__} predictors "
            f"{sorted(expected)}: was it saved from another module?"
        )
    saved_structure = (state.get("metadata") or {}).get("mapd", {}).get("structure") or {}
    for name, fields in expected.items():
        saved_fields = state[name].get("signature", {}).get("fields", [])
        field_count = len(fields["inputs"]) + len(fields["outputs"])
        if len(saved_fields) != field_count or saved_structure.get(name, fields) != fields:
            raise ProgramStateError(
                f"{path}: predictor {name!r} was saved with signature fields "
                f"{saved_structure.get(name, f'({len(saved_fields)} fields)')} but {type(module).__name__} has {fields}"
            )
        state[name]["lm"] = None
    module.load_state(state)
    return module


def apply_saved_programs(program: "MAPDProgram", folder: str | Path) -> list[Path]:
    """Load ``<folder>/<teacher>.<kind>.json`` into the program's modules and re-bind them to their roles."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ProgramStateError(f"programs.path {folder}: no such folder (run `--stage optimize` to create one)")
    loaded = []
    for teacher, role in program.roles.items():
        for kind in KINDS:
            path = program_path(folder, teacher, kind)
            if path.exists():
                module = getattr(program, f"{kind}s")[teacher]
                load_program(module, path)
                bind(module, role, _schema_overrides(module))
                loaded.append(path)
    if not loaded:
        raise ProgramStateError(
            f"programs.path {folder}: no saved program for teachers {sorted(program.roles)} "
            "(expected files named <teacher>.<writer|reviewer|explainer>.json)"
        )
    return loaded


def _schema_overrides(module: dspy.Module) -> dict | None:
    schema = getattr(module, "score_schema", None)
    return {"score": schema} if schema is not None else None


# --------------------------------------------------------------------------------------------
# Data


def split_train_dev(items: list, train_size: int, dev_size: int, seed: int) -> tuple[list, list]:
    shuffled = list(items)
    random.Random(seed).shuffle(shuffled)
    return shuffled[:train_size], shuffled[train_size : train_size + dev_size]


def writer_example(task: Any, example: Any) -> dspy.Example:
    return dspy.Example(
        example_id=example.id, question=example.question, answer_format=task.answer_format, gold=example.gold
    ).with_inputs("question", "answer_format")


def reviewer_example(example: Any, rationale: str, answer: str, correct: bool, author: str) -> dspy.Example:
    return dspy.Example(
        example_id=example.id, question=example.question, rationale=rationale, proposed_answer=answer,
        correct=bool(correct), gold=example.gold, author=author,
    ).with_inputs("question", "rationale", "proposed_answer")


def rationales_from_records(records_path: Path | None, examples_by_id: dict[str, Any]) -> list[dspy.Example]:
    """Reviewer examples from a run's stored rationale records (ok, with a known ``correct``)."""
    if records_path is None or not records_path.exists():
        return []
    found = []
    for record in RecordStore(records_path).records("rationale"):
        example = examples_by_id.get(record.example_id)
        if record.ok and record.correct is not None and example is not None:
            output = record.output
            found.append(reviewer_example(example, output["rationale"], output["answer"], record.correct, record.teacher))
    return found


def write_rationales(program: "MAPDProgram", questions: list, threads: int) -> list[dspy.Example]:
    """Reviewer examples written now: every teacher's current writer on every question, graded by gold."""
    task = program.task

    def write(job) -> dspy.Example | None:
        teacher, example = job
        result = call_module(program.roles[teacher], program.writers[teacher],
                             question=example.question, answer_format=task.answer_format)
        rationale = str(result.prediction.get("rationale") or "").strip() if result.prediction else ""
        if not rationale:
            return None
        answer = read_answer(task, example, result.prediction.get("answer"), rationale)
        correct = task.is_correct(answer, example)
        return reviewer_example(example, rationale, str(result.prediction.get("answer")), correct, teacher)

    jobs = [(teacher, example) for example in questions for teacher in program.roles]
    with ThreadPoolExecutor(max(1, threads)) as pool:
        return [found for found in pool.map(write, jobs) if found is not None]


def split_by_question(examples: list[dspy.Example], train_size: int, dev_size: int, seed: int):
    """Train/dev reviewer examples; all rationales of one question land on the same side."""
    by_question: dict[str, list[dspy.Example]] = {}
    for example in examples:
        by_question.setdefault(example.example_id, []).append(example)
    ids = sorted(by_question)
    random.Random(seed).shuffle(ids)
    train, dev = [], []
    for question_id in ids:
        side = train if len(train) < train_size else dev
        if side is dev and len(dev) >= dev_size:
            break
        side.extend(by_question[question_id])
    return train[:train_size], dev[:dev_size]


# --------------------------------------------------------------------------------------------
# One function per optimizer. Each gets the module (bound to its role; DSPy's optimizers reset
# copies, so the caller also sets the role's LM as the context LM), the train split, the metric,
# the settings, the metric value a demo must reach, and the reflection/prompt LM.


def compile_bootstrap(module, trainset, metric, settings, demo_threshold, reflection_lm=None):
    optimizer = dspy.BootstrapFewShot(
        metric=metric, metric_threshold=demo_threshold, max_bootstrapped_demos=settings.max_bootstrapped_demos,
        max_labeled_demos=0, max_rounds=settings.max_rounds, max_errors=_max_errors(trainset),
    )
    return optimizer.compile(module, trainset=trainset)


def compile_random_search(module, trainset, metric, settings, demo_threshold, reflection_lm=None):
    optimizer = dspy.BootstrapFewShotWithRandomSearch(
        metric=metric, metric_threshold=demo_threshold, max_bootstrapped_demos=settings.max_bootstrapped_demos,
        max_labeled_demos=0, max_rounds=settings.max_rounds, num_candidate_programs=settings.num_candidate_programs,
        num_threads=settings.threads, max_errors=_max_errors(trainset),
    )
    return optimizer.compile(module, trainset=trainset)  # candidates are scored on the train split


def compile_mipro(module, trainset, metric, settings, demo_threshold, reflection_lm):
    optimizer = dspy.MIPROv2(
        metric=metric, prompt_model=reflection_lm, auto=None, num_candidates=settings.num_candidates,
        max_bootstrapped_demos=settings.max_bootstrapped_demos, max_labeled_demos=0, num_threads=settings.threads,
        max_errors=_max_errors(trainset), seed=settings.seed, metric_threshold=demo_threshold, verbose=False,
    )
    minibatch = len(trainset) > settings.minibatch_size
    return optimizer.compile(module, trainset=trainset, valset=trainset, num_trials=settings.num_trials,
                             minibatch=minibatch, minibatch_size=min(settings.minibatch_size, len(trainset)))


def compile_gepa(module, trainset, metric, settings, demo_threshold, reflection_lm):
    optimizer = dspy.GEPA(
        metric=metric, reflection_lm=reflection_lm, max_metric_calls=settings.max_metric_calls,
        reflection_minibatch_size=min(3, len(trainset)), num_threads=settings.threads, seed=settings.seed,
    )
    return optimizer.compile(module, trainset=trainset)  # GEPA tracks its Pareto front on the train split


OPTIMIZERS: dict[str, Callable] = {
    "bootstrap": compile_bootstrap,
    "random_search": compile_random_search,
    "mipro": compile_mipro,
    "gepa": compile_gepa,
}


def _max_errors(trainset: list) -> int:
    # Small models fail to parse often; an optimizer should skip those examples, not abort.
    return len(trainset) * 4 + 10


# --------------------------------------------------------------------------------------------
# Evaluation and the stage


def evaluate(module: dspy.Module, role: Role, devset: list, metric: Callable, threads: int) -> tuple[float, list]:
    """Mean metric over ``devset`` (a failed call scores 0) and the (example, prediction) pairs."""
    if not devset:
        return float("nan"), []
    evaluator = dspy.Evaluate(devset=devset, metric=lambda e, p: float(metric(e, p)), num_threads=threads,
                              display_progress=False, max_errors=len(devset) + 1, failure_score=0.0)
    with _role_context(role):
        result = evaluator(module)
    return result.score / 100.0, [(example, prediction) for example, prediction, _ in result.results]


def _role_context(role: Role):
    return dspy.context(lm=role.lm, adapter=role.adapter)


def peer_reviews_for(program: "MAPDProgram", author: str) -> Callable | None:
    """The other teachers' reviews of a rationale, for the writer metric (None: nobody to review)."""
    peers = program.peers_of(author)
    if not peers:
        return None

    def reviews(task_example: Any, prediction: dspy.Prediction) -> list[PeerReview]:
        inputs = {"question": task_example.question, "rationale": str(prediction.get("rationale") or ""),
                  "proposed_answer": str(prediction.get("answer"))}
        found = []
        for peer in peers:
            with dspy.context(trace=None):  # keep the peers' calls out of the author's trace
                result = call_module(program.roles[peer], program.reviewers[peer], **inputs)
            score, critique = None, ""
            if result.prediction is not None:
                critique = str(result.prediction.get("critique") or "")
                with contextlib.suppress(InvalidOutput):
                    score = program.reviewers[peer].validated_score(result.prediction.get("score"))
            found.append(PeerReview(peer, score, critique))
        return found

    return reviews


def writer_acceptance_score(program: "MAPDProgram") -> float:
    """The writer metric's value for a right rationale at exactly the gate's threshold (demo bar)."""
    gate, reviewer = program.gate, next(iter(program.reviewers.values()))
    low, high = reviewer.scale_min, reviewer.scale_max
    return 0.5 + 0.5 * (gate.threshold - low) / (high - low) + (1e-9 if gate.rule == "gt" else 0.0)


def optimize_module(program, teacher: str, kind: str, trainset, devset, metric, demo_threshold, settings,
                    reflection_lm, out_dir: Path) -> dict[str, Any]:
    """Before/after on dev, compile with the configured optimizer, save: one row of the report."""
    role = program.roles[teacher]
    module = getattr(program, f"{kind}s")[teacher]
    started = time.monotonic()
    before, before_pairs = evaluate(module, role, devset, metric, settings.threads)
    with _role_context(role):
        compiled = OPTIMIZERS[settings.optimizer](module, trainset, metric, settings, demo_threshold,
                                                  reflection_lm or role.lm)
    bind(compiled, role, _schema_overrides(compiled))  # optimizers return reset copies without an LM
    after, after_pairs = evaluate(compiled, role, devset, metric, settings.threads)
    path = save_program(compiled, program_path(out_dir, teacher, kind), kind)
    row = {"teacher": teacher, "module": kind, "optimizer": settings.optimizer, "train": len(trainset),
           "dev": len(devset), "before": _rounded(before), "after": _rounded(after), "path": str(path),
           "demos": sum(len(p.demos) for _, p in compiled.named_predictors()),
           "instructions_changed": _instructions(compiled) != _instructions(module),
           "seconds": round(time.monotonic() - started, 1)}
    if isinstance(metric, ReviewerMetric):
        row["outcomes_before"] = _outcome_counts(metric, before_pairs)
        row["outcomes_after"] = _outcome_counts(metric, after_pairs)
    return row


def _instructions(module: dspy.Module) -> list[str]:
    return [p.signature.instructions for _, p in module.named_predictors()]


def _outcome_counts(metric: ReviewerMetric, pairs: list) -> dict[str, int]:
    counts: dict[str, int] = {}
    for example, prediction in pairs:
        outcome = metric.outcome(example, prediction) if prediction is not None else "invalid"
        counts[outcome] = counts.get(outcome, 0) + 1
    return counts


def _rounded(value: float) -> float | None:
    return None if value != value else round(value, 4)  # NaN (empty dev split) -> None


def optimize_teachers(program: "MAPDProgram", questions: list, settings, out_dir: str | Path,
                      records_path: Path | None = None, reflection_lm: dspy.BaseLM | None = None) -> dict[str, Any]:
    """The optimize stage: every selected teacher's writer and/or reviewer, compiled, saved, measured.

    ``questions`` is the pool the train/dev questions are drawn from; returns the report (one row per
    module: before/after on dev, demos, whether the instructions changed, reviewer outcome counts).
    """
    out_dir = Path(out_dir)
    task = program.task
    teachers = list(settings.teachers) or list(program.roles)
    train_q, dev_q = split_train_dev(questions, settings.train_size, settings.dev_size, settings.seed)
    rows = []
    if "writer" in settings.modules:
        metric_examples = {example.id: example for example in train_q + dev_q}
        trainset, devset = [writer_example(task, e) for e in train_q], [writer_example(task, e) for e in dev_q]
        for teacher in teachers:
            metric = WriterMetric(task, metric_examples, peer_reviews_for(program, teacher), _scale(program))
            rows.append(optimize_module(program, teacher, "writer", trainset, devset, metric,
                                        writer_acceptance_score(program), settings, reflection_lm, out_dir))
    source = None
    if "reviewer" in settings.modules:
        pool = rationales_from_records(records_path, {example.id: example for example in questions})
        source = f"records: {records_path}" if pool else "rationales written by the teachers' current writers"
        if not pool:
            pool = write_rationales(program, train_q + dev_q, settings.threads)
        metric = ReviewerMetric(program.gate, _scale(program), settings.false_accept_cost)
        for teacher in teachers:
            others = [e for e in pool if e.author != teacher] or pool
            trainset, devset = split_by_question(others, settings.train_size, settings.dev_size, settings.seed)
            if not trainset:
                raise ValueError(f"no rationales with known correctness to train {teacher}'s reviewer on")
            row = optimize_module(program, teacher, "reviewer", trainset, devset, metric, 1.0, settings,
                                  reflection_lm, out_dir)
            row["dev_correct_rationales"] = sum(1 for e in devset if e.correct)
            rows.append(row)
    return {"optimizer": settings.optimizer, "seed": settings.seed, "programs": str(out_dir),
            "reviewer_examples": source, "modules": rows}


def _scale(program: "MAPDProgram") -> tuple[int, int]:
    reviewer = next(iter(program.reviewers.values()))
    return reviewer.scale_min, reviewer.scale_max


def report_table(report: dict[str, Any]):
    """The before/after table for the console."""
    from rich.table import Table

    def fmt(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    table = Table(title=f"prompt optimization ({report['optimizer']}): metric on the held-out dev split")
    for column in ("teacher", "module", "train", "dev", "before", "after", "false accepts", "demos", "new instructions"):
        table.add_column(column, justify="left" if column in ("teacher", "module") else "right")
    for row in report["modules"]:
        false_accepts = "-"
        if "outcomes_after" in row:
            false_accepts = f"{row['outcomes_before'].get('false_accept', 0)} -> {row['outcomes_after'].get('false_accept', 0)}"
        table.add_row(row["teacher"], row["module"], str(row["train"]), str(row["dev"]), fmt(row["before"]),
                      fmt(row["after"]), false_accepts, str(row["demos"]), "yes" if row["instructions_changed"] else "no")
    return table


__all__ = [
    "OPTIMIZERS",
    "ProgramStateError",
    "apply_saved_programs",
    "load_program",
    "optimize_teachers",
    "review_outcome",
    "save_program",
]
