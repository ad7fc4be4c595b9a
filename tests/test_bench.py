"""The committee benchmark at a tiny size: one JSON line with consistent fields (no speed assertions)."""

from __future__ import annotations

import json

import pytest

from mapd_dspy import bench


@pytest.fixture(autouse=True)
def data_dir(shared_data, monkeypatch):
    monkeypatch.setenv("MAPD_DATA_DIR", str(shared_data))


def test_committee_bench_prints_one_json_line_with_sane_fields(capsys, tmp_path):
    argv = ["committee", "--mistakes", "2", "--teachers", "2", "--latency-ms", "30", "--concurrency", "4",
            "--workdir", str(tmp_path)]
    assert bench.main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    calls = 2 * (2 + 2 + 2)  # per mistake: T explanations, T rationales, T*(T-1) reviews
    assert result["calls"] == result["http_requests"] == calls
    assert result["limit_s"] == round(max(2 * 0.03, calls * 0.03 / 4), 2)
    assert result["wall_s"] > 0 and result["sequential_s"] > 0
    assert result["sequential_s"] >= calls * 0.03  # one call at a time cannot beat calls x latency
    assert result["speedup_vs_sequential"] == pytest.approx(result["sequential_s"] / result["wall_s"], rel=0.02)
    assert result["fraction_of_limit"] == pytest.approx(result["limit_s"] / result["wall_s"], rel=0.02)
    assert 1 <= result["max_in_flight"] <= 4
    assert {"bench", "mistakes", "teachers", "latency_ms", "concurrency"} <= result.keys()
    # Both run folders hold every committee record: the baseline really made the calls again.
    for name in ("concurrent", "sequential"):
        records = (tmp_path / name / "records.jsonl").read_text().splitlines()
        assert sum(json.loads(line)["stage"] != "exam" for line in records) == calls


def test_limit_and_fractions_follow_the_formula():
    stats = {"total": 1200, "max_in_flight": 32}
    result = bench.summarize(100, 3, 200.0, 32, 1200, stats, wall_s=10.0, sequential_s=250.0)
    assert result["limit_s"] == 7.5
    assert result["fraction_of_limit"] == 0.75 and result["speedup_vs_sequential"] == 25.0
    tiny = bench.summarize(1, 2, 200.0, 32, 6, stats, wall_s=0.5, sequential_s=None)
    assert tiny["limit_s"] == 0.4 and tiny["speedup_vs_sequential"] is None


def test_memoised_model_metadata_answers_like_dspy():
    from dspy.clients import capabilities, costs, model_metadata

    from mapd_dspy.dspy_speedups import memoize_model_metadata

    assert memoize_model_metadata() and memoize_model_metadata()  # idempotent
    lookup = model_metadata.model_info
    assert capabilities.model_info is lookup and costs.model_info is lookup
    for provider, model, namespaces in [("openai", "gpt-4o-mini", None), ("vllm", "teacher-a", None),
                                        ("openai", "gpt-4o-mini", ("openai",)), ("vllm", "x", ())]:
        expected = lookup.uncached(provider, model, namespaces=namespaces)
        first = lookup(provider, model, namespaces=namespaces)
        assert first == expected
        first["mutated"] = True  # each caller gets its own copy
        assert lookup(provider, model, namespaces=namespaces) == expected
    assert lookup("openai", "gpt-4o-mini").get("input_cost_per_token")  # a known model still has its prices


def test_io_bound_stage_tunes_the_interpreter_and_restores_it():
    import gc
    import sys

    from mapd_dspy.dspy_speedups import io_bound_stage

    before = sys.getswitchinterval()
    with io_bound_stage(0.0005):
        assert sys.getswitchinterval() == pytest.approx(0.0005)
        assert gc.get_freeze_count() > 0
    assert sys.getswitchinterval() == before and gc.get_freeze_count() == 0
