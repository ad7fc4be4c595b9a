"""Per-provider limits: calls in flight, requests and tokens per minute (with a shrunken window)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import dspy
import pytest

from mapd_dspy.config import TeacherConfig
from mapd_dspy.engine import make_role
from mapd_dspy.limits import ProviderLimiter
from mapd_dspy.programs import Ledger, MAPDProgram, Role
from mapd_dspy.scripted_server import ScriptedServer
from tests.fakes import Q, svamp


def run_in_threads(limiter: ProviderLimiter, calls: int, hold_s: float, tokens: int = 0) -> list[tuple[float, float]]:
    """Make ``calls`` calls through the limiter from as many threads; return (start, end) of each."""
    spans, lock = [], threading.Lock()

    def one_call(_):
        with limiter.slot() as slot:
            start = time.monotonic()
            time.sleep(hold_s)
            slot.tokens = tokens
            with lock:
                spans.append((start, time.monotonic()))

    with ThreadPoolExecutor(calls) as pool:
        list(pool.map(one_call, range(calls)))
    return spans


def max_overlap(spans: list[tuple[float, float]]) -> int:
    edges = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans], key=lambda e: (e[0], e[1]))
    current = peak = 0
    for _, step in edges:
        current += step
        peak = max(peak, current)
    return peak


def test_max_concurrency_caps_calls_in_flight():
    spans = run_in_threads(ProviderLimiter(max_concurrency=3), calls=12, hold_s=0.05)
    assert max_overlap(spans) == 3


def test_without_limits_calls_overlap_freely():
    spans = run_in_threads(ProviderLimiter(), calls=8, hold_s=0.1)
    assert max_overlap(spans) == 8


def test_rpm_spreads_requests_over_the_window():
    started = time.monotonic()
    spans = run_in_threads(ProviderLimiter(rpm=3, window_s=0.4), calls=7, hold_s=0.0)
    starts = sorted(start for start, _ in spans)
    # 7 requests at 3 per 0.4 s window: the 4th waits one window, the 7th two.
    assert starts[3] - started >= 0.35 and starts[6] - started >= 0.75
    for i in range(len(starts) - 3):
        assert starts[i + 3] - starts[i] >= 0.35  # never more than 3 starts in one window


def test_tpm_waits_until_spent_tokens_leave_the_window():
    limiter = ProviderLimiter(tpm=100, window_s=0.4)
    started = time.monotonic()
    with limiter.slot() as slot:
        slot.tokens = 150  # over the budget at once
    with limiter.slot():
        waited = time.monotonic() - started
    assert waited >= 0.35


def test_limits_must_be_positive_and_unset_means_no_limiter():
    with pytest.raises(ValueError, match="max_concurrency"):
        ProviderLimiter(max_concurrency=0)
    assert ProviderLimiter.from_config(TeacherConfig(name="a")) is None
    limiter = ProviderLimiter.from_config(TeacherConfig(name="a", max_concurrency=2, rpm=600))
    assert (limiter.max_concurrency, limiter.rpm, limiter.tpm) == (2, 600, None)


def test_the_limiter_caps_each_provider_as_the_server_sees_it():
    """Two teachers through the real program and HTTP: each stays within its own cap."""
    caps = {"teacher-a": 2, "teacher-b": 3, "teacher-c": 1}
    with ScriptedServer(latency_ms=60) as server, ThreadPoolExecutor(32) as calls:
        roles = {}
        for name, cap in caps.items():
            cfg = TeacherConfig(name=name, model=f"hosted_vllm/{name}", api_base=server.api_base, max_concurrency=cap)
            roles[name] = make_role(name, cfg, cfg.model, server.api_base, cache=False)
        program = MAPDProgram(svamp(), roles, ledger=Ledger(), executor=calls)
        questions = [Q(f"q{i}", f"Tom has {i} apples and buys 2 more. How many now?", str(i + 2)) for i in range(6)]
        with ThreadPoolExecutor(6) as questions_pool:
            list(questions_pool.map(lambda q: program(example=q, student_response="-1"), questions))
        stats = server.stats()
    assert stats["max_in_flight_by_model"] == caps
    assert stats["total"] == 6 * (3 + 3 + 6)


def test_roles_get_a_limiter_only_when_a_limit_is_set():
    plain = make_role("a", TeacherConfig(name="a", model="openai/x"), "openai/x", None, cache=False)
    limited = make_role("b", TeacherConfig(name="b", model="openai/x", tpm=1000), "openai/x", None, cache=False)
    assert plain.limiter is None
    assert isinstance(limited.limiter, ProviderLimiter) and limited.limiter.tpm == 1000
    assert isinstance(Role("c", dspy.LM("openai/x")).limiter, type(None))
