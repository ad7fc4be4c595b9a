"""Faults over real HTTP: 429, 500, timeouts, empty and malformed answers, out-of-scale scores, dead servers.

Each test runs the real CLI (in process) against the scripted server, which plays the student and two
``openai/...`` teachers. A run must finish, every failure must be a record (kind, reason, raw text when
there was any), the summary must count them, and nothing may be lost: a re-run without faults fills in
what is missing.
"""

import json
import socket
import time
from collections import Counter

import pytest

from mapd_dspy.run import main
from mapd_dspy.scripted_server import OUT_OF_SCALE_SCORE, ScriptedServer
from tests.scripted_run import TEACHERS, expected_keys, keys_env, record_lines, records_of, run_args

STAGES = ("exam", "teach", "review")


@pytest.fixture(autouse=True)
def api_keys(monkeypatch):
    keys_env(monkeypatch)


def run_stages(args, stages=STAGES):
    return [main([*args, "--stage", stage]) for stage in stages]


def failures_in_records(store) -> dict[str, dict[str, int]]:
    counts: dict[str, Counter] = {}
    for record in store.records():
        if record.failure is not None:
            counts.setdefault(record.stage, Counter())[record.failure.kind] += 1
    return {stage: dict(kinds) for stage, kinds in counts.items()}


def summary_of(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_mixed_faults_finish_as_records_and_a_clean_rerun_fills_the_gaps(tmp_path):
    faults = ["429=0.08", "500=0.08", "timeout=0.05", "empty=0.1", "malformed=0.1", "out_of_scale=0.3"]
    run_dir = tmp_path / "runs" / "faults"
    with ScriptedServer(faults=faults, seed=1, hang_s=3, models=TEACHERS) as server:
        args = run_args(server.api_base, tmp_path / "runs", name="faults", limit=12, timeout_s=1,
                        extra=["--set", "engine.cache=false"])
        started = time.monotonic()
        assert run_stages(args) == [0, 0, 0]
        elapsed = time.monotonic() - started
        injected = server.stats()["faults"]
    assert set(injected) >= {"429", "500", "timeout", "empty", "malformed", "out_of_scale"}, injected
    assert elapsed < 90, f"faults made the run crawl ({elapsed:.0f} s): a timeout is not reaching LiteLLM?"

    store = records_of(run_dir)
    failures = [r for r in store.records() if not r.ok]
    assert failures, "injected faults should leave failure records"
    for record in failures:
        assert record.failure.kind in ("lm_error", "parse_error", "invalid_output") and record.failure.reason
        if record.failure.kind == "parse_error":
            assert record.failure.raw is not None  # what the model said is kept
    kinds = Counter(r.failure.kind for r in failures)
    assert kinds["lm_error"] and kinds["parse_error"], kinds
    assert summary_of(run_dir)["failures"] == failures_in_records(store)

    # Out-of-scale scores are clamped into the scale, the raw value kept.
    clamped = [r for r in store.records("review") if r.ok and r.output.get("raw_score") == OUT_OF_SCALE_SCORE]
    assert clamped and all(r.score == 5 for r in clamped)

    # Nothing lost: without faults, the same commands complete every key; kept failures are not re-paid.
    kept = {r.key: r for r in failures if r.failure.kind != "lm_error"}
    with ScriptedServer(models=TEACHERS) as clean:
        args = run_args(clean.api_base, tmp_path / "runs", name="faults", limit=12, timeout_s=1,
                        extra=["--set", "engine.cache=false"])
        assert run_stages(args) == [0, 0, 0]
        clean_calls = clean.stats()["total"]
    store = records_of(run_dir)
    assert {key for key in expected_keys(store) if store.get(key) is None} == set()
    assert all(not r.ok for r in store.records() if r.key in kept)  # parse failures are final by default
    assert not [r for r in store.records() if r.failure is not None and r.failure.kind == "lm_error"]
    assert 0 < clean_calls <= sum(1 for r in failures if r.failure.kind == "lm_error") + len(expected_keys(store))


def test_teacher_whose_answers_never_parse_is_recorded_failures(tmp_path):
    run_dir = tmp_path / "runs" / "garbled"
    with ScriptedServer(faults=["teacher-b:malformed=1.0"], models=TEACHERS) as server:
        args = run_args(server.api_base, tmp_path / "runs", name="garbled", limit=4, extra=["--set", "engine.cache=false"])
        assert run_stages(args) == [0, 0, 0]
    store = records_of(run_dir)
    by_b = [r for r in store.records() if (r.reviewer or r.teacher) == "teacher-b" and r.stage != "exam"]
    assert len(by_b) == 4 * 3  # explain + rationale for 4 mistakes, plus a review of each of teacher-a's rationales
    assert all(r.status == "failed" and r.failure.kind == "parse_error" for r in by_b)
    assert all("scripted malformed reply" in r.failure.raw for r in by_b)
    teacher_a = [r for r in store.records() if r.teacher == "teacher-a" and r.stage in ("explain", "rationale")]
    assert len(teacher_a) == 8 and all(r.ok for r in teacher_a)
    summary = summary_of(run_dir)
    assert summary["failures"] == {"explain": {"parse_error": 4}, "rationale": {"parse_error": 4},
                                   "review": {"parse_error": 4}}
    # teacher-a's rationales had only teacher-b as reviewer: no valid review, never accepted.
    assert summary["rejections"] == {"no_valid_reviews": 4, "rationale_failed": 4} and summary["accepted"] == 0
    # The garbled calls were paid for: their tokens are counted (ChatAdapter retries once in JSON mode).
    assert summary["cost"]["by_payer"]["teacher-b"]["total"]["completion_tokens"] > 0


def test_out_of_scale_scores_are_clamped_through_the_server(tmp_path):
    with ScriptedServer(faults=["out_of_scale=1.0"], models=TEACHERS) as server:
        args = run_args(server.api_base, tmp_path / "runs", name="scale", limit=3, extra=["--set", "engine.cache=false"])
        assert run_stages(args) == [0, 0, 0]
    store = records_of(tmp_path / "runs" / "scale")
    # DSPy's usage tracking fills every record's tokens over real HTTP (what costs are computed from).
    assert all(r.usage.get("prompt_tokens", 0) > 0 and r.usage.get("completion_tokens", 0) > 0 for r in store.records())
    reviews = store.records("review")
    assert len(reviews) == 6 and all(r.ok and r.score == 5 and r.output["raw_score"] == OUT_OF_SCALE_SCORE for r in reviews)


def test_timeout_s_reaches_litellm(tmp_path):
    # Every teacher-a call hangs 20 s; with timeout_s = 1 and no retry each must fail in about a second.
    with ScriptedServer(faults=["teacher-a:timeout=1.0"], hang_s=20, models=TEACHERS) as server:
        args = run_args(server.api_base, tmp_path / "runs", name="hang", limit=2, timeout_s=1,
                        extra=["--set", "engine.cache=false"])
        assert main([*args, "--stage", "exam"]) == 0
        started = time.monotonic()
        assert main([*args, "--stage", "teach"]) == 0
        elapsed = time.monotonic() - started
    assert elapsed < 15, f"teach took {elapsed:.0f} s: the 1 s timeout did not reach the HTTP call"
    records = [r for r in records_of(tmp_path / "runs" / "hang").records() if r.teacher == "teacher-a"]
    assert len(records) == 4 and all(r.failure.kind == "lm_error" and "imeout" in r.failure.reason for r in records)


def test_dead_student_server_is_a_clear_error_not_a_hang(tmp_path, capsys):
    dead = f"http://127.0.0.1:{free_port()}/v1"
    started = time.monotonic()
    assert main([*run_args(dead, tmp_path / "runs", name="dead"), "--stage", "exam"]) == 1
    assert time.monotonic() - started < 30
    err = " ".join(capsys.readouterr().err.split())
    assert "no OpenAI-compatible server answered" in err and dead in err
    assert not (tmp_path / "runs" / "dead" / "records.jsonl").exists()


def test_dead_teacher_server_gives_lm_error_records_and_a_rerun_retries_them(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}/v1"
    run_dir = tmp_path / "runs" / "deadteacher"
    with ScriptedServer(models=TEACHERS) as server:
        args = run_args(server.api_base, tmp_path / "runs", name="deadteacher", limit=3, num_retries=1,
                        teacher_bases={"teacher-b": dead}, extra=["--set", "engine.cache=false"])
        started = time.monotonic()
        assert run_stages(args) == [0, 0, 0]
        assert time.monotonic() - started < 60
        store = records_of(run_dir)
        by_b = [r for r in store.records() if (r.reviewer or r.teacher) == "teacher-b" and r.stage != "exam"]
        assert by_b and all(r.failure.kind == "lm_error" and r.failure.reason for r in by_b)
        assert summary_of(run_dir)["failures"]["explain"] == {"lm_error": 3}
        # Once teacher-b's server is back, the same command retries exactly its transient failures.
        server.reset()
        revived = run_args(server.api_base, tmp_path / "runs", name="deadteacher", limit=3,
                           extra=["--set", "engine.cache=false"])
        assert run_stages(revived) == [0, 0, 0]
        assert server.stats()["by_model"].get("teacher-a", 0) == 3  # only its reviews of b's new rationales
    store = records_of(run_dir)
    assert all(r.ok for r in store.records())
    assert {key for key in expected_keys(store) if store.get(key) is None} == set()
    assert len(record_lines(run_dir)) == len(store) + len(by_b)  # the lm_error lines stay in the log
