"""Two rounds on the real stack: round 2 examines the round-1 adapter and trains on both rounds' data."""

import json

import pytest

from mapd_dspy.records import RecordStore
from mapd_dspy.run import main

pytestmark = pytest.mark.integration


def test_second_round_examines_student_r1_and_trains_on_the_union(tmp_path, shared_data, embedded_student_dir):
    tokens = 128
    args = [
        "--limit", "3",
        "--set", f"runs_dir={tmp_path}", "--set", "name=rounds", "--set", "rounds=2",
        "--set", f"task.data_dir={shared_data}",
        "--set", f"student.max_tokens={tokens}", "--set", f"eval.max_tokens={tokens}",
        "--set", f"teachers.0.max_tokens={tokens}", "--set", f"teachers.1.max_tokens={tokens}",
        "--set", "train.max_steps=1", "--set", "eval.limit=2",
    ]
    assert main(args) == 0
    run_dir = tmp_path / "rounds"

    round_two = RecordStore(run_dir / "round-2" / "records.jsonl").records("exam")
    assert len(round_two) == 3 and {r.model for r in round_two} == {"hosted_vllm/student-r1"}

    def rows(path):
        return len((path / "train_set.jsonl").read_text().splitlines())

    trained = json.loads((run_dir / "adapter-r2" / "training_config.json").read_text())
    assert sum(trained["rows_per_kind"].values()) == rows(run_dir) + rows(run_dir / "round-2")

    report = json.loads((run_dir / "report.json").read_text())
    by_round = {row["round"]: row["label"] for row in report["accuracy"]["evals"]}
    assert by_round == {0: "student-r0", 1: "student-r1", 2: "student-r2"}
    evals = RecordStore(run_dir / "records.jsonl").records("eval")
    assert {r.model for r in evals} == {f"hosted_vllm/student-r{k}" for k in range(3)}
    assert len(evals) == 3 * 2
