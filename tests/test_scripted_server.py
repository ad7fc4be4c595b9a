"""The scripted server: real HTTP, parsed by the real DSPy adapters, with faults at the configured rates."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import dspy
import httpx
import pytest

from mapd_dspy.programs import Role, bind, call_module
from mapd_dspy.programs.modules import MistakeExplainer, RationaleWriter, Reviewer, StudentExam
from mapd_dspy.scripted_server import ScriptedServer, parse_fault_rules

CALLS = {
    "solve": (StudentExam, {"question": "What is 2 + 3?", "answer_format": "a number"}),
    "explain": (MistakeExplainer, {"question": "What is 2 + 3?", "student_answer": "6", "correct_answer": "5"}),
    "rationale": (RationaleWriter, {"question": "What is 2 + 3?", "answer_format": "a number"}),
    "review": (Reviewer, {"question": "What is 2 + 3?", "rationale": "2 + 3 = 5.", "proposed_answer": "5"}),
}
EXPECTED_FIELDS = {
    "solve": {"reasoning", "answer"},
    "explain": {"explanation"},
    "rationale": {"rationale", "answer"},
    "review": {"critique", "score"},
}


def scripted_role(server: ScriptedServer, model: str, adapter: str = "chat", structured: bool = False,
                  num_retries: int = 0, timeout: float = 30) -> Role:
    lm = dspy.LM(model, api_base=server.api_base, api_key="scripted", cache=False, num_retries=num_retries,
                 timeout=timeout)
    return Role(model, lm, dspy.JSONAdapter() if adapter == "json" else None, structured)


def call(role: Role, kind: str):
    module_class, inputs = CALLS[kind]
    return call_module(role, bind(module_class(), role), **inputs)


_CLIENT = httpx.Client(timeout=30)  # one client: a new one per request costs ~50 ms (SSL context)


def chat(server: ScriptedServer, model: str, text: str) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": text}]}
    return _CLIENT.post(f"{server.api_base}/chat/completions", json=body)


@pytest.mark.parametrize(
    "model, adapter, structured",
    [("openai/teacher-a", "chat", False), ("hosted_vllm/teacher-b", "json", True), ("openai/teacher-c", "json", False)],
)
def test_every_signature_parses_through_dspy_lm(model, adapter, structured):
    with ScriptedServer() as server:
        role = scripted_role(server, model, adapter, structured)
        results = {kind: call(role, kind) for kind in CALLS}
        stats = server.stats()
    for kind, result in results.items():
        assert result.failure is None, (kind, result.failure)
        assert set(result.prediction.keys()) >= EXPECTED_FIELDS[kind]
        assert result.usage["prompt_tokens"] > 0 and result.usage["completion_tokens"] > 0
    assert results["solve"].prediction.answer == "-1"  # the scripted student is always wrong
    assert results["rationale"].prediction.answer == "42"
    assert results["review"].prediction.score == 4
    assert stats["by_kind"] == {"solve": 1, "explain": 1, "rationale": 1, "review": 1}
    assert stats["by_model"] == {model.split("/", 1)[1]: 4}


def test_models_endpoint_lists_configured_names_and_accepts_any():
    with ScriptedServer(models=["teacher-x"], faults=["teacher-y:500=0.5"]) as server:
        listed = httpx.get(f"{server.api_base}/models").json()
        one = httpx.get(f"{server.api_base}/models/anything-at-all")
    assert [m["id"] for m in listed["data"]] == ["student-r0", "teacher-x", "teacher-y"]
    assert one.status_code == 200 and one.json()["id"] == "anything-at-all"


def test_a_policy_callable_scripts_the_answers():
    def harsh_reviews(request):
        return {"score": 1, "critique": f"no ({request.model})"} if request.kind == "review" else {}

    with ScriptedServer(policy=harsh_reviews) as server:
        result = call(scripted_role(server, "openai/judge"), "review")
    assert result.prediction.score == 1 and result.prediction.critique == "no (judge)"


def test_faults_hit_the_configured_model_at_the_configured_rate():
    with ScriptedServer(faults=["flaky:500=0.3", "429=0.1"], seed=7) as server:
        flaky = [chat(server, "flaky", f"question {i}").status_code for i in range(200)]
        steady = [chat(server, "steady", f"question {i}").status_code for i in range(200)]
        stats = server.stats()
    assert 0.2 <= flaky.count(500) / 200 <= 0.4
    assert steady.count(500) == 0
    assert 0.03 <= steady.count(429) / 200 <= 0.17
    assert stats["faults_by_model"]["flaky"]["500"] == flaky.count(500)
    assert stats["faults_by_model"].get("steady", {}).get("429", 0) == steady.count(429)


def test_fault_draws_are_deterministic_by_seed_and_redrawn_on_retry():
    def statuses(seed):
        with ScriptedServer(faults={"500": 0.5}, seed=seed) as server:
            return [chat(server, "m", f"q{i}").status_code for i in range(40)]

    assert statuses(1) == statuses(1)
    assert statuses(1) != statuses(2)
    with ScriptedServer(faults={"500": 0.5}, seed=1) as server:
        repeats = [chat(server, "m", "the same prompt").status_code for _ in range(40)]
    assert {200, 500} <= set(repeats)  # a retry of the same request draws again


def test_rejects_unknown_fault_kinds_and_rates():
    with pytest.raises(ValueError, match="unknown fault kind"):
        parse_fault_rules(["503=0.1"])
    with pytest.raises(ValueError, match="not in"):
        parse_fault_rules({"m:429": 1.5})
    assert parse_fault_rules(["a:b:timeout=0.25"]) == {("a:b", "timeout"): 0.25}


@pytest.mark.parametrize("fault, kind", [("empty", "parse_error"), ("malformed", "parse_error")])
def test_broken_replies_become_parse_failures(fault, kind):
    with ScriptedServer(faults={fault: 1.0}) as server:
        result = call(scripted_role(server, "openai/teacher-a"), "rationale")
        stats = server.stats()
    assert result.failure is not None and result.failure.kind == kind
    assert stats["faults"][fault] == stats["total"] >= 1


def test_out_of_scale_scores_only_hit_reviews_and_are_clamped():
    with ScriptedServer(faults={"out_of_scale": 1.0}) as server:
        role = scripted_role(server, "openai/teacher-a")
        review, rationale = call(role, "review"), call(role, "rationale")
        stats = server.stats()
    assert review.prediction.score == 9
    assert Reviewer(1, 5).validated_score(review.prediction.score) == 5
    assert rationale.failure is None
    assert stats["faults"] == {"out_of_scale": 1}


def test_errors_and_timeouts_are_retried_by_dspy_lm():
    with ScriptedServer(faults=["rate-limited:429=1", "broken:500=1", "hung:timeout=1"], hang_s=2) as server:
        limited = call(scripted_role(server, "openai/rate-limited", num_retries=1), "solve")
        broken = call(scripted_role(server, "openai/broken", num_retries=1), "solve")
        hung = call(scripted_role(server, "openai/hung", num_retries=0, timeout=0.5), "solve")
        stats = server.stats()
    assert limited.failure.kind == broken.failure.kind == hung.failure.kind == "lm_error"
    assert stats["by_model"] == {"rate-limited": 2, "broken": 2, "hung": 1}  # 1 try + 1 retry each


def test_reset_clears_the_stats():
    with ScriptedServer() as server:
        chat(server, "m", "hello")
        assert server.stats()["total"] == 1
        httpx.post(server.api_base.removesuffix("/v1") + "/reset")
        assert server.stats()["total"] == 0


def test_cli_prints_ready_and_serves_until_sigterm():
    command = [sys.executable, "-m", "mapd_dspy.scripted_server", "--port", "0", "--latency-ms", "1",
               "--fault", "m:500=1", "--seed", "3"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env={**os.environ})
    try:
        ready = process.stdout.readline().split()
        assert ready[0] == "READY" and ready[1].startswith("http://127.0.0.1:") and ready[1].endswith("/v1")
        api_base = ready[1]
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        assert httpx.post(f"{api_base}/chat/completions", json=body).status_code == 500
        stats = httpx.get(api_base.removesuffix("/v1") + "/stats").json()
        assert stats["total"] == 1 and stats["faults"] == {"500": 1}
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
