"""A hand-made run folder with known peer scores, for the analysis tests and the notebook tests.

Three teachers (a, b, c), five questions: q1 right, q2..q4 mistakes (q5 is not examined here).
Every ok rationale is reviewed by the two other teachers; one review (b on c's q4) fails and c's q3
rationale fails to parse. Scores, as author: {reviewer: score} (mean), answer right or wrong:

    q2  a: {b: 4, c: 5} (4.5) right   b: {a: 2, c: 4} (3.0) wrong   c: {a: 3, b: 3} (3.0) right
    q3  a: {b: 3, c: 4} (3.5) right   b: {a: 5, c: 5} (5.0) right   c: failed
    q4  a: {b: 4, c: 4} (4.0) wrong   b: {a: 1, c: 2} (1.5) right   c: {a: 4} (4.0) right
"""

from __future__ import annotations

from pathlib import Path

from mapd_dspy.programs.gate import AcceptanceGate
from mapd_dspy.records import Failure, Record, RecordStore, write_json, write_jsonl

TEACHERS = ("a", "b", "c")
RATIONALES = {  # (example, author): answer right?
    ("q2", "a"): True, ("q2", "b"): False, ("q2", "c"): True,
    ("q3", "a"): True, ("q3", "b"): True,
    ("q4", "a"): False, ("q4", "b"): True, ("q4", "c"): True,
}
SCORES = {  # (example, author, reviewer): score
    ("q2", "a", "b"): 4, ("q2", "a", "c"): 5, ("q2", "b", "a"): 2, ("q2", "b", "c"): 4,
    ("q2", "c", "a"): 3, ("q2", "c", "b"): 3, ("q3", "a", "b"): 3, ("q3", "a", "c"): 4,
    ("q3", "b", "a"): 5, ("q3", "b", "c"): 5, ("q4", "a", "b"): 4, ("q4", "a", "c"): 4,
    ("q4", "b", "a"): 1, ("q4", "b", "c"): 2, ("q4", "c", "a"): 4,
}


def _record(example_id, stage, teacher="", reviewer="", status="ok", **fields) -> Record:
    return Record(example_id=example_id, stage=stage, teacher=teacher, reviewer=reviewer, status=status,
                  model="m", usage={"prompt_tokens": 10, "completion_tokens": 5}, **fields)


def _failure(kind: str) -> Failure:
    return Failure(kind=kind, reason="r", raw="x")


def fixture_records() -> list[Record]:
    records = [_record("q1", "exam", answer="7", correct=True)]
    records += [_record(q, "exam", answer="0", correct=False) for q in ("q2", "q3", "q4")]
    for q in ("q2", "q3", "q4"):
        records += [_record(q, "explain", teacher=t, output={"explanation": f"{t} explains {q}"}) for t in TEACHERS]
    for (q, author), right in RATIONALES.items():
        output = {"rationale": f"{author} solves {q}", "answer": "5" if right else "6"}
        records.append(_record(q, "rationale", teacher=author, output=output, answer=output["answer"], correct=right))
    records.append(_record("q3", "rationale", teacher="c", status="failed", failure=_failure("parse_error")))
    for (q, author, reviewer), score in SCORES.items():
        records.append(_record(q, "review", teacher=author, reviewer=reviewer, score=score, output={"critique": "ok"}))
    records.append(_record("q4", "review", teacher="c", reviewer="b", status="failed", failure=_failure("invalid_output")))
    records += [
        _record("t1", "eval", teacher="student-r0", answer="1", correct=False),
        _record("t2", "eval", teacher="student-r0", answer="2", correct=True),
        _record("t1", "eval", teacher="student-r1", answer="3", correct=True),
        _record("t2", "eval", teacher="student-r1", answer="2", correct=True),
    ]
    return records


def write_fixture_run(run_dir: Path, with_report: bool = True) -> Path:
    """Write records, decisions (the default gate), config, summary, evals and (optionally) the report."""
    run_dir.mkdir(parents=True, exist_ok=True)
    store = RecordStore(run_dir / "records.jsonl")
    records = fixture_records()
    for record in records:
        store.append(record)
    gate = AcceptanceGate()
    reviews = [r for r in records if r.stage == "review"]
    decisions = [
        gate.decide(r, [v for v in reviews if (v.example_id, v.teacher) == (r.example_id, r.teacher)])
        for r in records if r.stage == "rationale"
    ]
    write_jsonl(run_dir / "decisions.jsonl", [d.__dict__ for d in decisions])
    write_json(run_dir / "config.json", {
        "name": run_dir.name, "task": {"name": "svamp", "split": "train"}, "baseline": "mapd",
        "teachers": [{"name": t} for t in TEACHERS],
        "review": {"scale_min": 1, "scale_max": 5, "threshold": 3.0, "threshold_rule": "gt",
                   "require_correct_answer": True},
    })
    write_json(run_dir / "summary.json", {
        "run": run_dir.name, "gate": gate.describe(), "accepted": sum(d.accepted for d in decisions),
        "exam": {"examined": 4, "correct": 1, "accuracy": 0.25, "mistakes": 3},
    })
    write_json(run_dir / "evals.json", [
        {"label": "student-r0", "round": 0, "baseline": "mapd", "split": "test", "accuracy": 0.5, "n": 2, "correct": 1},
        {"label": "student-r1", "round": 1, "baseline": "mapd", "split": "test", "accuracy": 1.0, "n": 2, "correct": 2},
    ])
    if with_report:
        from mapd_dspy.report import build_report

        build_report(run_dir)
    return run_dir
