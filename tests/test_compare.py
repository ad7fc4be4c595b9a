"""The baseline comparison, from hand-written run files."""

import json

from mapd_dspy.compare import compare, main


def write_run(folder, baseline, accuracies, accepted):
    folder.mkdir()
    evals = [{"label": f"student-r{k}", "round": k, "baseline": baseline, "split": "test", "accuracy": a,
              "n": 100, "correct": int(a * 100)} for k, a in enumerate(accuracies)]
    (folder / "evals.json").write_text(json.dumps(evals))
    (folder / "summary.json").write_text(json.dumps({"gate": f"gate of {baseline}", "accepted": accepted}))


def test_compare_puts_runs_side_by_side(tmp_path):
    write_run(tmp_path / "none", "none", [0.02], None)
    write_run(tmp_path / "mapd", "mapd", [0.02, 0.05, 0.07], 12)
    rows = compare([tmp_path / "none", tmp_path / "mapd"], tmp_path / "out")
    assert rows[0]["accuracy_after"] is None and rows[1]["accuracy_after"] == 0.07
    assert rows[1]["accuracy_per_round"] == {"0": 0.02, "1": 0.05, "2": 0.07}
    markdown = (tmp_path / "out" / "compare.md").read_text()
    assert "| mapd | mapd | gate of mapd | 12 | 100 | 2.0% | 7.0% | +5.0 pts |" in markdown
    assert "| none | none | gate of none | - | 100 | 2.0% | - | - |" in markdown
    assert json.loads((tmp_path / "out" / "compare.json").read_text()) == rows


def test_missing_evals_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty"), "--out", str(tmp_path / "out")]) == 2
    assert "evals.json: missing" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
