"""Cost per payer and stage, the price fields, and ``engine.budget_usd`` stopping and resuming a real run."""

import json

import pytest

from mapd_dspy.config import ConfigError, load_config
from mapd_dspy.costs import Budget, BudgetExhausted, Price, cost_summary, payer, prices_from_config, record_usd
from mapd_dspy.records import Record, RecordStore
from mapd_dspy.report import build_report
from mapd_dspy.run import EXIT_BUDGET, main
from mapd_dspy.scripted_server import ScriptedServer
from tests.scripted_run import TEACHERS, expected_keys, keys_env, record_lines, records_of, run_args


def record(stage, teacher="", reviewer="", prompt=1000, completion=100, example_id="q1", **fields):
    return Record(example_id=example_id, stage=stage, teacher=teacher, reviewer=reviewer, status="ok", model="m",
                  usage={"prompt_tokens": prompt, "completion_tokens": completion}, **fields)


def test_the_caller_pays_and_dollars_follow_the_prices():
    records = [
        record("exam"),
        record("explain", "a"), record("rationale", "a"),
        record("review", teacher="a", reviewer="b", prompt=2000, completion=50),
        record("eval", teacher="student-r1"),
    ]
    assert [payer(r) for r in records] == ["student", "a", "a", "b", "student"]
    prices = {"a": Price(1.0, 10.0), "b": Price(2.0, 20.0)}
    assert record_usd(records[1], prices) == pytest.approx((1000 * 1.0 + 100 * 10.0) / 1e6)
    assert record_usd(records[0], prices) is None  # the student has no price
    cost = cost_summary(records, prices)
    assert cost["priced"] and list(cost["by_payer"]) == ["student", "a", "b"]
    assert cost["by_payer"]["a"]["total"] == {"calls": 2, "prompt_tokens": 2000, "completion_tokens": 200, "usd": 0.004}
    assert cost["by_payer"]["b"]["stages"] == {"review": {"calls": 1, "prompt_tokens": 2000, "completion_tokens": 50,
                                                          "usd": 0.005}}
    assert cost["by_payer"]["student"]["total"]["usd"] is None
    assert cost["total"] == {"calls": 5, "prompt_tokens": 6000, "completion_tokens": 450, "usd": 0.009}
    assert cost_summary(records, {})["total"]["usd"] is None


def test_price_fields_are_validated_and_read_from_config_json():
    config = load_config(None, ["teachers.0.price_in_per_mtok=0.15", "teachers.0.price_out_per_mtok=0.6",
                                "student.price_in_per_mtok=0", "student.price_out_per_mtok=0"])
    prices = prices_from_config(config)
    assert prices == {"student": Price(0.0, 0.0), "smol-a": Price(0.15, 0.6)}
    assert prices_from_config(json.loads(json.dumps(config.public_dump()))) == prices
    with pytest.raises(ConfigError, match="teachers.0: Value error, set both price_in_per_mtok and price_out_per_mtok"):
        load_config(None, ["teachers.0.price_in_per_mtok=1"])
    with pytest.raises(ConfigError, match="teachers.1.price_out_per_mtok"):
        load_config(None, ["teachers.1.price_out_per_mtok=-1", "teachers.1.price_in_per_mtok=1"])
    with pytest.raises(ConfigError, match="engine.budget_usd: no model has a price"):
        load_config(None, ["engine.budget_usd=5"])
    with pytest.raises(ConfigError, match="engine.budget_usd"):
        load_config(None, ["engine.budget_usd=0", "teachers.0.price_in_per_mtok=1", "teachers.0.price_out_per_mtok=1"])


def test_budget_counts_superseded_lines_and_stops_at_the_limit(tmp_path):
    store = RecordStore(tmp_path / "records.jsonl")
    failed = record("explain", "a").model_copy(update={"status": "failed"})
    store.append(failed)
    store.append(record("explain", "a"))  # the retry supersedes the failure; both were paid
    config = load_config(None, [f"runs_dir={tmp_path.parent}", f"name={tmp_path.name}", "teachers.0.name=a",
                                "teachers.0.price_in_per_mtok=1000", "teachers.0.price_out_per_mtok=0",
                                "engine.budget_usd=2.5"])
    budget = Budget.for_run(config)
    assert budget.spent_usd == pytest.approx(2.0) and not budget.exhausted
    budget.check()
    budget.charge(record("rationale", "a"))
    with pytest.raises(BudgetExhausted, match=r"spent \$3.00 of engine.budget_usd = \$2.50"):
        budget.check()


def test_report_has_the_cost_section(tmp_path):
    store = RecordStore(tmp_path / "records.jsonl")
    for r in (record("exam", correct=False), record("explain", "a"), record("review", "a", "b")):
        store.append(r)
    (tmp_path / "config.json").write_text(json.dumps(
        {"name": "toy", "teachers": [{"name": "a", "price_in_per_mtok": 1, "price_out_per_mtok": 10}, {"name": "b"}]}))
    report = build_report(tmp_path)
    assert report["cost"]["by_payer"]["a"]["total"]["usd"] == 0.002
    assert report["cost"]["by_payer"]["b"]["total"]["usd"] is None
    markdown = (tmp_path / "report.md").read_text()
    assert "## Cost" in markdown and "| a | explain | 1 | 1000 | 100 | $0.002000 |" in markdown


# -- the budget on a real run (scripted server, real HTTP) ---------------------------------------------


def teach_calls(server) -> int:
    by_kind = server.stats()["by_kind"]
    return by_kind.get("explain", 0) + by_kind.get("rationale", 0)


def test_budget_stops_the_run_cleanly_and_a_higher_budget_resumes(tmp_path, monkeypatch, capsys):
    keys_env(monkeypatch)
    concurrency, limit, budget = 2, 6, 2.0
    prices = [f"teachers.{i}.price_{d}_per_mtok=1000" for i in range(2) for d in ("in", "out")]
    prices = [item for p in prices for item in ("--set", p)]
    run_dir = tmp_path / "runs" / "budget"

    def args(server, budget_usd):
        extra = ["--set", "engine.cache=false", *prices, "--set", f"engine.budget_usd={budget_usd}"]
        return run_args(server.api_base, tmp_path / "runs", name="budget", limit=limit, concurrency=concurrency,
                        extra=extra)

    with ScriptedServer(latency_ms=20, models=TEACHERS) as server:
        assert main([*args(server, budget), "--stage", "exam"]) == 0  # the student is free
        assert main([*args(server, budget), "--stage", "teach"]) == EXIT_BUDGET
        err = " ".join(capsys.readouterr().err.split())
        assert "budget reached" in err and "engine.budget_usd = $2.00" in err and "run the same command" in err

        # Every call the server answered is a record; no call started after the limit but those in flight.
        lines = [row for row in record_lines(run_dir) if row["stage"] in ("explain", "rationale")]
        assert teach_calls(server) == len(lines) < 4 * limit
        prices_by_teacher = prices_from_config(load_config(None, ["teachers.0.name=teacher-a", "teachers.1.name=teacher-b",
                                                                  *[p for p in prices if p != "--set"]]))
        spent, limit_index = 0.0, None
        for n, row in enumerate(lines, start=1):  # in the order they were appended (and charged)
            spent += record_usd(Record.model_validate(row), prices_by_teacher) or 0.0
            if limit_index is None and spent >= budget:
                limit_index = n
        assert limit_index is not None and len(lines) <= limit_index + concurrency
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["cost"]["total"]["usd"] >= budget  # summary.json was rewritten on the way out
        with capsys.disabled():
            print(f"\n[budget] ${budget} reached after {limit_index} teach calls; stopped with {len(lines)} recorded "
                  f"(${summary['cost']['total']['usd']:.2f} spent, concurrency {concurrency})")

        # The same budget again: no call at all, same exit code.
        before = server.stats()["total"]
        assert main([*args(server, budget), "--stage", "teach"]) == EXIT_BUDGET
        assert server.stats()["total"] == before

        # A higher budget resumes and pays only for the missing keys.
        assert main([*args(server, 1000), "--stage", "teach"]) == 0
        store = records_of(run_dir)
        assert {k for k in expected_keys(store, review=False) if store.get(k) is None} == set()
        assert teach_calls(server) == 4 * limit == len(
            [row for row in record_lines(run_dir) if row["stage"] in ("explain", "rationale")])

        # A finished stage with a spent budget is simply done: exit 0, no call.
        before = server.stats()["total"]
        assert main([*args(server, budget), "--stage", "teach"]) == 0
        assert server.stats()["total"] == before
