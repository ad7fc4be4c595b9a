"""The run report, built from a hand-written run folder: numbers, markdown rows, plots, rebuilds."""

from __future__ import annotations

import json

import pytest

from mapd_dspy.records import Failure, Record, RecordStore, write_json, write_jsonl
from mapd_dspy.report import build_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REPORT_FILES = ("report.json", "report.md", "accuracy.png", "peer_scores.png", "acceptance.png")


def record(example_id, stage, status="ok", teacher="", reviewer="", usage=(10, 5), **fields) -> Record:
    prompt, completion = usage
    return Record(
        example_id=example_id, stage=stage, teacher=teacher, reviewer=reviewer, status=status, model="m",
        usage={"prompt_tokens": prompt, "completion_tokens": completion}, **fields,
    )


def failed(example_id, stage, kind, teacher="", reviewer="") -> Record:
    failure = Failure(kind=kind, reason="r", raw="x")
    return record(example_id, stage, "failed", teacher, reviewer, usage=(10, 0), failure=failure)


def decision(example_id, teacher, accepted, reason, scores):
    mean = sum(scores.values()) / len(scores) if scores else None
    return {"example_id": example_id, "teacher": teacher, "accepted": accepted, "reason": reason,
            "mean_score": mean, "scores": scores, "answer_correct": True}


@pytest.fixture
def run_dir(tmp_path):
    """3 questions, 2 mistakes (q2, q3), teachers a and b, and a before/after evaluation."""
    store = RecordStore(tmp_path / "records.jsonl")
    for rec in [
        record("q1", "exam", answer="7", correct=True),
        record("q2", "exam", answer="8", correct=False),
        failed("q3", "exam", "parse_error"),
        # q2: both teachers explain and write; a's rationale is reviewed 4 by b, b's 2 by a.
        record("q2", "explain", teacher="a"), record("q2", "explain", teacher="b"),
        record("q2", "rationale", teacher="a", answer="7", correct=True),
        record("q2", "rationale", teacher="b", answer="7", correct=True),
        record("q2", "review", teacher="a", reviewer="b", score=4),
        record("q2", "review", teacher="b", reviewer="a", score=2),
        # q3: a writes again and gets a 5; b's rationale fails to parse.
        record("q3", "explain", teacher="a"), failed("q3", "explain", "lm_error", teacher="b"),
        record("q3", "rationale", teacher="a", answer="3", correct=True),
        failed("q3", "rationale", "parse_error", teacher="b"),
        record("q3", "review", teacher="a", reviewer="b", score=5),
        # Eval answers of the student before (r0) and after (r1).
        record("t1", "eval", teacher="student-r0", answer="1", correct=False, usage=(20, 30)),
        record("t1", "eval", teacher="student-r1", answer="2", correct=True, usage=(20, 40)),
    ]:
        store.append(rec)
    write_jsonl(tmp_path / "decisions.jsonl", [
        decision("q2", "a", True, "accepted", {"b": 4}),
        decision("q2", "b", False, "score_below_threshold", {"a": 2}),
        decision("q3", "a", True, "accepted", {"b": 5}),
        decision("q3", "b", False, "rationale_failed", {}),
    ])
    write_json(tmp_path / "config.json", {
        "name": "toy", "task": {"name": "svamp", "split": "train"}, "teachers": [{"name": "a"}, {"name": "b"}],
    })
    write_json(tmp_path / "summary.json", {"gate": "mean peer score > 3 and answer == gold"})
    write_json(tmp_path / "evals.json", [
        {"label": "student-r0", "round": 0, "baseline": "mapd", "split": "test", "accuracy": 0.25, "n": 4, "correct": 1},
        {"label": "student-r1", "round": 1, "baseline": "mapd", "split": "test", "accuracy": 0.75, "n": 4, "correct": 3},
    ])
    write_json(tmp_path / "stages.json", {"exam": 12.5, "teach": 40.0})
    return tmp_path


def test_report_numbers(run_dir):
    report = build_report(run_dir)
    assert report["run"] == "toy" and report["gate"].startswith("mean peer score")
    assert report["accuracy"]["exam"] == {"split": "train", "n": 3, "correct": 1, "accuracy": 0.3333}
    assert [(e["label"], e["round"], e["accuracy"]) for e in report["accuracy"]["evals"]] == [
        ("student-r0", 0, 0.25), ("student-r1", 1, 0.75)
    ]
    assert report["counts"] == {
        "questions": 3, "mistakes": 2, "explanations": 3, "rationales": 3, "reviews": 3, "accepted": 2
    }
    a, b = report["teachers"]["a"], report["teachers"]["b"]
    assert (a["accepted"], a["decisions"], a["acceptance_rate"]) == (2, 2, 1.0)
    assert (b["accepted"], b["decisions"], b["acceptance_rate"]) == (0, 2, 0.0)
    # Scores are grouped by the author being reviewed, not the reviewer.
    assert a["peer_scores"] == {"4": 1, "5": 1} and a["mean_peer_score"] == 4.5
    assert b["peer_scores"] == {"2": 1}
    assert report["failures"] == {"exam": {"parse_error": 1}, "explain": {"lm_error": 1}, "rationale": {"parse_error": 1}}
    assert report["tokens"]["eval"] == {"calls": 2, "prompt_tokens": 40, "completion_tokens": 70}
    assert report["tokens"]["exam"] == {"calls": 3, "prompt_tokens": 30, "completion_tokens": 10}
    assert report["wall_seconds"] == {"exam": 12.5, "teach": 40.0}
    assert json.loads((run_dir / "report.json").read_text()) == report


def test_markdown_has_table_rows(run_dir):
    build_report(run_dir)
    markdown = (run_dir / "report.md").read_text()
    assert "| student-r0 | 0 | mapd | test | 4 | 1 | 25.0% |" in markdown
    assert "| student-r1 | 1 | mapd | test | 4 | 3 | 75.0% |" in markdown
    assert "| exam |  |  | train | 3 | 1 | 33.3% |" in markdown
    assert "| a | 2 | 2 | 2 | 100.0% | 4.50 |" in markdown
    assert "| b | 1 | 2 | 0 | 0.0% | 2.00 |" in markdown
    assert "| mistakes | 2 |" in markdown and "| accepted | 2 |" in markdown
    assert "| explain | lm_error | 1 |" in markdown
    assert "| eval | 2 | 40 | 70 |" in markdown
    assert "| teach | 40.0 |" in markdown
    assert "![accuracy](accuracy.png)" in markdown


def test_plots_are_valid_pngs(run_dir):
    build_report(run_dir)
    for name in ("accuracy.png", "peer_scores.png", "acceptance.png"):
        data = (run_dir / name).read_bytes()
        assert len(data) > 1000 and data.startswith(PNG_MAGIC), name


def test_rebuild_from_records_alone_is_identical(run_dir):
    first = (build_report(run_dir), (run_dir / "report.json").read_text(), (run_dir / "report.md").read_text())
    for name in REPORT_FILES:
        (run_dir / name).unlink()
    second = (build_report(run_dir), (run_dir / "report.json").read_text(), (run_dir / "report.md").read_text())
    assert first == second
    assert all((run_dir / name).exists() for name in REPORT_FILES)


def test_without_evals_json_accuracy_comes_from_eval_records(run_dir):
    for optional in ("evals.json", "stages.json", "decisions.jsonl", "summary.json", "config.json"):
        (run_dir / optional).unlink()
    report = build_report(run_dir)
    assert [(e["label"], e["n"], e["correct"]) for e in report["accuracy"]["evals"]] == [
        ("student-r0", 1, 0), ("student-r1", 1, 1)
    ]
    assert report["wall_seconds"] is None and report["counts"]["accepted"] == 0
    assert set(report["teachers"]) == {"a", "b"}  # authors found in the records
    assert (run_dir / "accuracy.png").read_bytes().startswith(PNG_MAGIC)


def test_missing_records_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="records.jsonl"):
        build_report(tmp_path)
