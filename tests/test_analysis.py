"""Peer-review analysis on a hand-made run with known scores (see tests/analysis_fixture.py)."""

from __future__ import annotations

import json

import pytest

from mapd_dspy import analysis
from mapd_dspy.programs import AcceptanceGate
from tests.analysis_fixture import write_fixture_run


@pytest.fixture
def run_dir(tmp_path):
    return write_fixture_run(tmp_path / "toy", with_report=False)


@pytest.fixture
def run(run_dir):
    return analysis.load_run(run_dir)


def test_load_run_reads_every_file(run_dir):
    from mapd_dspy.report import build_report

    build_report(run_dir)
    run = analysis.load_run(run_dir)
    assert len(run.records) == 42 and len(run.decisions) == 9
    assert run.teachers == ["a", "b", "c"] and run.scale == (1, 5)
    assert run.summary["accepted"] == 4 and run.report["counts"]["accepted"] == 4
    assert run.gate == AcceptanceGate(3.0, "gt", True, True)


def test_missing_folder_and_records_are_named(tmp_path):
    with pytest.raises(analysis.RunDataError, match="no such run folder"):
        analysis.load_run(tmp_path / "nope")
    with pytest.raises(analysis.RunDataError, match="records.jsonl: missing"):
        analysis.load_run(tmp_path)


def test_round_folder_uses_the_parent_config(run_dir):
    round_dir = run_dir / "round-2"
    round_dir.mkdir()
    (round_dir / "records.jsonl").write_text("")
    assert analysis.load_run(round_dir).teachers == ["a", "b", "c"]


def test_score_distributions_per_author_and_reviewer(run):
    by_author = analysis.score_distribution(run, "author")
    assert by_author["a"] == {"n": 6, "mean": 4.0, "counts": {1: 0, 2: 0, 3: 1, 4: 4, 5: 1}}
    assert by_author["b"] == {"n": 6, "mean": 3.1667, "counts": {1: 1, 2: 2, 3: 0, 4: 1, 5: 2}}
    assert by_author["c"] == {"n": 3, "mean": 3.3333, "counts": {1: 0, 2: 0, 3: 2, 4: 1, 5: 0}}
    by_reviewer = analysis.score_distribution(run, "reviewer")
    assert {name: (row["n"], row["mean"]) for name, row in by_reviewer.items()} == {
        "a": (5, 3.0), "b": (4, 3.5), "c": (6, 4.0)  # b's failed review of c is not a score
    }
    assert len(analysis.peer_scores(run)) == 15


def test_reviewer_agreement_pairs_and_pooled(run):
    agreement = analysis.reviewer_agreement(run)
    assert agreement["rationales"] == 7 and (agreement["threshold"], agreement["rule"]) == (3.0, "gt")
    pairs = {tuple(row["reviewers"]): row for row in agreement["pairs"]}
    assert list(pairs) == [("a", "b"), ("a", "c"), ("b", "c")]
    # a/b only share c's q2 rationale (3 and 3): agree, but kappa is undefined (one verdict).
    assert pairs[("a", "b")] == {"reviewers": ["a", "b"], "n": 1, "exact": 1.0, "within_one": 1.0,
                                 "mean_abs_diff": 0.0, "kappa": None}
    # a/c on b's rationales: (2,4) (5,5) (1,2); verdicts (F,P) (P,P) (F,F): po 2/3, pe 4/9.
    assert pairs[("a", "c")] == {"reviewers": ["a", "c"], "n": 3, "exact": 0.3333, "within_one": 0.6667,
                                 "mean_abs_diff": 1.0, "kappa": 0.4}
    # b/c on a's rationales: (4,5) (3,4) (4,4); c always passes: po 2/3 = pe.
    assert pairs[("b", "c")]["mean_abs_diff"] == 0.6667 and pairs[("b", "c")]["kappa"] == 0.0
    overall = agreement["overall"]
    # Pooled: 3/7 exact, 6/7 within one, |diff| 5/7; Fleiss: pass share 8/14, pe 25/49, po 5/7.
    assert (overall["n"], overall["exact"], overall["within_one"], overall["mean_abs_diff"]) == (7, 0.4286, 0.8571, 0.7143)
    assert overall["kappa"] == round(10 / 24, 4)


def test_agreement_kappa_follows_the_threshold(run):
    agreement = analysis.reviewer_agreement(run, threshold=4, rule="ge")
    pairs = {tuple(row["reviewers"]): row for row in agreement["pairs"]}
    # a/c with pass = score >= 4: (F,P) (P,P) (F,F) as before.
    assert pairs[("a", "c")]["kappa"] == 0.4
    assert pairs[("a", "c")]["exact"] == 0.3333  # score agreement does not depend on the threshold


def test_two_teachers_have_no_agreement_pairs(tmp_path):
    store_dir = tmp_path / "two"
    store_dir.mkdir()
    from mapd_dspy.records import Record, RecordStore

    store = RecordStore(store_dir / "records.jsonl")
    store.append(Record(example_id="q", stage="rationale", teacher="a", status="ok", model="m", correct=True))
    store.append(Record(example_id="q", stage="review", teacher="a", reviewer="b", status="ok", model="m", score=4))
    agreement = analysis.reviewer_agreement(analysis.load_run(store_dir))
    assert agreement["pairs"] == [] and agreement["rationales"] == 0
    assert agreement["overall"]["n"] == 0 and agreement["overall"]["kappa"] is None


def test_acceptance_vs_correctness_stored_and_reapplied(run):
    stored = analysis.acceptance_vs_correctness(run)
    assert stored == {"accepted_correct": 4, "accepted_wrong": 0, "rejected_correct": 2, "rejected_wrong": 2,
                      "no_answer": 1}
    no_check = analysis.acceptance_vs_correctness(run, AcceptanceGate(3.0, "gt", require_correct_answer=False))
    # q4/a (wrong answer, mean 4.0) now passes.
    assert no_check == {"accepted_correct": 4, "accepted_wrong": 1, "rejected_correct": 2, "rejected_wrong": 1,
                        "no_answer": 1}


def test_apply_gate_matches_the_stored_decisions(run):
    decisions = analysis.apply_gate(run, run.gate)
    assert [d.__dict__ for d in decisions] == run.decisions


def sweep_counts(rows, answer_check):
    return [(row["threshold"], row["accepted"], row["accepted_wrong"], row["precision"])
            for row in rows if row["answer_check"] is answer_check]


def test_threshold_sweep_gt(run):
    rows = analysis.threshold_sweep(run)
    assert sweep_counts(rows, True) == [(1, 6, 0, 1.0), (2, 5, 0, 1.0), (3, 4, 0, 1.0), (4, 2, 0, 1.0), (5, 0, 0, None)]
    assert sweep_counts(rows, False) == [
        (1, 8, 2, 0.75), (2, 7, 2, 0.7143), (3, 5, 1, 0.8), (4, 2, 0, 1.0), (5, 0, 0, None)
    ]
    assert [(r["threshold"], r["answer_check"]) for r in rows if r["configured"]] == [(3, True)]
    assert [r["recall"] for r in rows if r["answer_check"]] == [1.0, 0.8333, 0.6667, 0.3333, 0.0]


def test_threshold_sweep_ge(run):
    rows = analysis.threshold_sweep(run, rule="ge")
    assert sweep_counts(rows, True) == [(1, 6, 0, 1.0), (2, 5, 0, 1.0), (3, 5, 0, 1.0), (4, 3, 0, 1.0), (5, 1, 0, 1.0)]
    assert sweep_counts(rows, False) == [
        (1, 8, 2, 0.75), (2, 7, 2, 0.7143), (3, 7, 2, 0.7143), (4, 4, 1, 0.75), (5, 1, 0, 1.0)
    ]
    assert not any(r["configured"] for r in rows)


def test_results_rows(run_dir):
    from mapd_dspy.report import build_report

    with pytest.raises(analysis.RunDataError, match="report.json"):
        analysis.accuracy_rows(analysis.load_run(run_dir))
    build_report(run_dir)
    rows = analysis.accuracy_rows(analysis.load_run(run_dir))
    assert [(r["label"], r["round"], r["accuracy"]) for r in rows] == [
        ("exam", None, 0.25), ("student-r0", 0, 0.5), ("student-r1", 1, 1.0)
    ]
    (run_dir / "round-2").mkdir()
    (run_dir / "round-2" / "summary.json").write_text(json.dumps(
        {"accepted": 1, "exam": {"examined": 4, "accuracy": 0.5, "mistakes": 2}}))
    assert analysis.round_rows(analysis.load_run(run_dir)) == [
        {"round": 1, "examined": 4, "exam_accuracy": 0.25, "mistakes": 3, "accepted": 4},
        {"round": 2, "examined": 4, "exam_accuracy": 0.5, "mistakes": 2, "accepted": 1},
    ]


def test_plots_return_figures(run):
    from matplotlib.figure import Figure

    sweep = analysis.threshold_sweep(run)
    figures = [
        analysis.plot_score_distributions(run, "author"), analysis.plot_score_distributions(run, "reviewer"),
        analysis.plot_threshold_sweep(sweep), analysis.plot_confusion(analysis.acceptance_vs_correctness(run)),
        analysis.plot_agreement(analysis.reviewer_agreement(run)),
        analysis.plot_accuracy([{"label": "student-r0", "accuracy": 0.5, "n": 2, "correct": 1}]),
    ]
    for figure in figures:
        assert isinstance(figure, Figure)
        figure.canvas.draw()  # renders on Agg without a display


# -- CLI --------------------------------------------------------------------------------------------------


def test_cli_sweep_prints_the_table(run_dir, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    assert analysis.main(["sweep", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "Threshold sweep" in out and "mean peer score > 3 and answer == gold" in out
    lines = [line for line in out.splitlines() if "│" in line]
    assert len(lines) == 10
    cells = [[cell.strip() for cell in line.split("│")[1:-1]] for line in lines]
    assert ["yes", "> 3", "4", "0", "100.0%", "66.7%", "*"] in cells
    assert ["no", "> 3", "5", "1", "80.0%", "66.7%", ""] in cells


def test_cli_sweep_json_and_rule(run_dir, capsys):
    assert analysis.main(["sweep", str(run_dir), "--rule", "ge", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 10 and {row["rule"] for row in rows} == {"ge"}
    assert rows[2] == {"threshold": 3, "rule": "ge", "answer_check": True, "accepted": 5, "accepted_wrong": 0,
                       "precision": 1.0, "recall": 0.8333, "configured": False}


def test_cli_agreement(run_dir, capsys):
    assert analysis.main(["agreement", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "Inter-reviewer agreement" in out and "all pairs" in out and "42.9%" in out
    assert "Peer scores per author" in out and "Peer scores per reviewer" in out
    assert analysis.main(["agreement", str(run_dir), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["agreement"]["overall"]["n"] == 7 and data["by_author"]["a"]["counts"]["4"] == 4


@pytest.mark.parametrize("command", ["sweep", "agreement"])
def test_cli_missing_run_is_a_clear_error(tmp_path, capsys, command):
    assert analysis.main([command, str(tmp_path / "nope")]) == 2
    assert f"error: {tmp_path / 'nope'}: no such run folder" in capsys.readouterr().err
    assert analysis.main([command, str(tmp_path)]) == 2
    assert "records.jsonl: missing" in capsys.readouterr().err


def test_cli_runs_as_a_module(run_dir, tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "mapd_dspy.analysis", "sweep", str(run_dir)],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Threshold sweep" in result.stdout and "> 3" in result.stdout
    missing = subprocess.run([sys.executable, "-m", "mapd_dspy.analysis", "agreement", str(tmp_path / "nope")],
                             capture_output=True, text=True, cwd=tmp_path)
    assert missing.returncode == 2 and "no such run folder" in missing.stderr
