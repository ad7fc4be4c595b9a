"""Dependency-aware concurrency: the calls of a mistake run at once, reviews follow their rationale,
and the engine teaches and reviews in one pass per question. Timing comes from the scripted
server's request log and the records, never from wall-clock speed."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from mapd_dspy.bench import bench_config, run_stages
from mapd_dspy.config import TeacherConfig
from mapd_dspy.engine import make_role
from mapd_dspy.programs import Ledger, MAPDProgram
from mapd_dspy.records import RecordStore
from mapd_dspy.scripted_server import ScriptedServer
from tests.fakes import Q, svamp

TEACHERS = ("teacher-a", "teacher-b", "teacher-c")
QUESTION = Q("q1", "Tom has 3 apples and buys 2 more. How many apples does he have?", "5")


def committee(server: ScriptedServer, executor=None, ledger=None) -> MAPDProgram:
    roles = {}
    for name in TEACHERS:
        cfg = TeacherConfig(name=name, model=f"hosted_vllm/{name}", api_base=server.api_base)
        roles[name] = make_role(name, cfg, cfg.model, server.api_base, cache=False)
    return MAPDProgram(svamp(), roles, ledger=ledger or Ledger(), executor=executor)


def events(server: ScriptedServer, kind: str, model: str | None = None) -> list[dict]:
    return [e for e in server.stats()["events"] if e["kind"] == kind and model in (None, e["model"])]


def test_explanations_and_rationales_of_a_mistake_run_at_once():
    with ScriptedServer(latency_ms=150) as server, ThreadPoolExecutor(16) as calls:
        result = committee(server, calls)(example=QUESTION, student_response="-1")
        teaching = events(server, "explain") + events(server, "rationale")
        reviews = events(server, "review")
    assert len(teaching) == 6 and len(reviews) == 6 and len(result.decisions) == 3
    first_end = min(e["end"] for e in teaching)
    assert all(e["start"] < first_end for e in teaching)  # all six were in flight together
    assert max(e["start"] for e in teaching) < min(e["start"] for e in reviews)


def test_reviews_start_as_soon_as_their_rationale_exists():
    slow = {"teacher-c": 800}
    ledger = Ledger()
    with ScriptedServer(latency_ms=50, model_latency_ms=slow) as server, ThreadPoolExecutor(16) as calls:
        committee(server, calls, ledger)(example=QUESTION, student_response="-1")
        slow_rationale = events(server, "rationale", "teacher-c")[0]
        reviews_by_a = events(server, "review", "teacher-a")
    # teacher-a reviews teacher-b's rationale while teacher-c is still writing its own.
    assert min(e["start"] for e in reviews_by_a) < slow_rationale["end"]
    stored = {r.key: r for r in ledger.store.records()}
    review_of_b = stored[("q1", "review", "teacher-b", "teacher-a")]
    assert review_of_b.created_at < stored[("q1", "rationale", "teacher-c", "")].created_at


def test_without_an_executor_calls_run_one_at_a_time_in_reference_order():
    with ScriptedServer(latency_ms=20) as server:
        committee(server)(example=QUESTION, student_response="-1")
        log = server.stats()
    assert log["max_in_flight"] == 1
    kinds = [e["kind"] for e in log["events"]]
    assert kinds == ["explain"] * 3 + ["rationale"] * 3 + ["review"] * 6


def test_an_exception_in_a_call_propagates_and_stops_the_question():
    class StopAfterTwoCalls:
        def __init__(self):
            self.calls = 0

        def check(self):
            if self.calls >= 2:
                raise RuntimeError("budget spent")

        def charge(self, record):
            self.calls += 1

    ledger = Ledger(budget=StopAfterTwoCalls())
    with ScriptedServer(latency_ms=30) as server, ThreadPoolExecutor(2) as calls:
        with pytest.raises(RuntimeError, match="budget spent"):
            committee(server, calls, ledger)(example=QUESTION, student_response="-1")
        calls.shutdown(wait=True)
        made = server.stats()["total"]
    assert 2 <= made < 12 and len(ledger.store) == made


@pytest.fixture
def run_against(tmp_path, shared_data, monkeypatch):
    monkeypatch.setenv("MAPD_DATA_DIR", str(shared_data))

    def run(server: ScriptedServer, stages: list[str], concurrency: int, questions: int = 8):
        config = bench_config(tmp_path, "run", server.api_base, questions, 3, concurrency)
        return config, run_stages(config, stages)

    return run


def test_engine_teaches_and_reviews_in_one_pass_per_question(run_against):
    with ScriptedServer(latency_ms=40) as server:
        config, result = run_against(server, ["exam", "teach", "review"], concurrency=6)
        rationales, reviews = events(server, "rationale"), events(server, "review")
        stats = server.stats()
    assert [stage.name for stage in result.stages] == ["exam", "teach+review"]
    assert result.stages[1].calls == 8 * 12 == stats["total"] - 8
    # Not teach-for-all then review-for-all: reviews began while rationales were still being written.
    assert min(e["start"] for e in reviews) < max(e["end"] for e in rationales)
    assert stats["max_in_flight"] <= 6
    lines = (config.run_dir / "records.jsonl").read_text().splitlines()
    assert len(lines) == len({tuple(json.loads(line)[k] for k in ("example_id", "stage", "teacher", "reviewer"))
                              for line in lines}) == 8 + 96


def test_concurrency_one_makes_one_call_at_a_time(run_against):
    with ScriptedServer(latency_ms=5) as server:
        run_against(server, ["exam", "teach", "review"], concurrency=1, questions=3)
        stats = server.stats()
    assert stats["max_in_flight"] == 1 and stats["total"] == 3 + 3 * 12


def test_teach_and_review_stages_alone_still_split_the_work(run_against):
    with ScriptedServer(latency_ms=5) as server:
        config, _ = run_against(server, ["exam", "teach"], concurrency=4, questions=3)
        after_teach = server.stats()["by_kind"]
        _, result = run_against(server, ["review"], concurrency=4, questions=3)
        after_review = server.stats()["by_kind"]
    assert after_teach == {"solve": 3, "explain": 9, "rationale": 9}
    assert after_review == {**after_teach, "review": 18}
    assert [stage.name for stage in result.stages] == ["review"]
    assert len(RecordStore(config.run_dir / "records.jsonl").records("review")) == 18
