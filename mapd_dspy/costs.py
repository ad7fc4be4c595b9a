"""What a run spent: tokens per payer and stage, dollars when prices are configured, and the budget.

Input: records (``records.jsonl`` lines; each carries the ``usage`` DSPy's usage tracker reported for
that call, ``{}`` for a DSPy cache hit, which costs nothing) and the run's config (``RunConfig`` or the
``config.json`` dict), whose models may carry ``price_in_per_mtok`` / ``price_out_per_mtok``.
Output: :func:`cost_summary` ``{"priced", "total", "by_payer": {payer: {"total", "stages"}}}`` for
``summary.json``, the report and the end-of-run table; :class:`Budget`, which stops new calls once
the run's spending reaches ``engine.budget_usd``.

Who pays for a record is who made the call: the student for ``exam``/``eval``, the author for
``explain``/``rationale``, and for ``review`` the *reviewer* (a review record's ``teacher`` is the
author of the rationale under review). Spending counts every line of the records files, not only
the latest record per key: a call whose record was later superseded (a retried failure) was paid
for too.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mapd_dspy.records import Record, RecordStore

STUDENT = "student"
TOKEN_FIELDS = ("prompt_tokens", "completion_tokens")
MTOK = 1_000_000


class BudgetExhausted(RuntimeError):
    """The run's spending reached ``engine.budget_usd``: no new call may start."""


@dataclass(frozen=True)
class Price:
    """US dollars per million prompt (input) and completion (output) tokens."""

    in_per_mtok: float
    out_per_mtok: float

    def usd(self, usage: dict[str, Any]) -> float:
        prompt = usage.get("prompt_tokens") or 0
        completion = usage.get("completion_tokens") or 0
        return (prompt * self.in_per_mtok + completion * self.out_per_mtok) / MTOK


def payer(record: Record) -> str:
    """The name of the model that made the call (and is billed for it)."""
    if record.stage in ("exam", "eval"):
        return STUDENT
    if record.stage == "review":
        return record.reviewer
    return record.teacher


def prices_from_config(config: Any) -> dict[str, Price]:
    """Prices per payer from a ``RunConfig`` or its JSON dump (``config.json``); unpriced models are absent."""
    if hasattr(config, "public_dump"):
        config = config.public_dump()
    models = [(STUDENT, config.get("student") or {})]
    models += [(teacher.get("name", ""), teacher) for teacher in config.get("teachers") or []]
    prices = {}
    for name, model in models:
        price_in, price_out = model.get("price_in_per_mtok"), model.get("price_out_per_mtok")
        if price_in is not None and price_out is not None:
            prices[name] = Price(float(price_in), float(price_out))
    return prices


def record_usd(record: Record, prices: dict[str, Price]) -> float | None:
    """Dollars one call cost, None when its payer has no price."""
    price = prices.get(payer(record))
    return price.usd(record.usage) if price is not None else None


# -- reading what was paid ------------------------------------------------------------------------


def paid_records(path: str | Path) -> list[Record]:
    """Every record line of one records file, superseded ones included (they were paid for too).

    Read like the record store reads it: a torn last line (a killed process) is dropped, damage
    anywhere else is a :class:`~mapd_dspy.records.RecordFileError` naming the file and line.
    """
    path = Path(path)
    return list(RecordStore.read_all(path)) if path.exists() else []


def run_records_files(run_dir: str | Path) -> list[Path]:
    """The records files of a run: round 1 (plus eval) in the run folder, round k in ``round-k/``."""
    run_dir = Path(run_dir)
    rounds = sorted(run_dir.glob("round-*/records.jsonl"), key=lambda p: p.parent.name)
    return [run_dir / "records.jsonl", *rounds]


def run_paid_records(run_dir: str | Path) -> list[Record]:
    return [record for path in run_records_files(run_dir) for record in paid_records(path)]


# -- aggregation ------------------------------------------------------------------------------------


def _empty_row(priced: bool) -> dict[str, Any]:
    return {"calls": 0, "prompt_tokens": 0, "completion_tokens": 0, "usd": 0.0 if priced else None}


def _add(row: dict[str, Any], record: Record, usd: float | None) -> None:
    row["calls"] += 1
    for field in TOKEN_FIELDS:
        value = record.usage.get(field)
        row[field] += value if isinstance(value, int) else 0
    if row["usd"] is not None and usd is not None:
        row["usd"] += usd


def _rounded(row: dict[str, Any]) -> dict[str, Any]:
    return row | {"usd": round(row["usd"], 6) if row["usd"] is not None else None}


def cost_summary(records: Iterable[Record], prices: dict[str, Price]) -> dict[str, Any]:
    """Calls, tokens and dollars in total and per payer and stage.

    ``usd`` is None for a payer without a price; the total's ``usd`` sums the priced payers
    (None when no model is priced) and ``priced`` says whether any price was configured.
    """
    any_price = bool(prices)
    total = _empty_row(any_price)
    by_payer: dict[str, dict[str, Any]] = {}
    for record in records:
        name = payer(record)
        priced = name in prices
        usd = record_usd(record, prices)
        entry = by_payer.setdefault(name, {"total": _empty_row(priced), "stages": {}})
        stage_row = entry["stages"].setdefault(record.stage, _empty_row(priced))
        for row in (total, entry["total"], stage_row):
            _add(row, record, usd)
    return {
        "priced": any_price,
        "total": _rounded(total),
        "by_payer": {
            name: {"total": _rounded(entry["total"]),
                   "stages": {stage: _rounded(row) for stage, row in sorted(entry["stages"].items())}}
            for name, entry in sorted(by_payer.items(), key=lambda item: (item[0] != STUDENT, item[0]))
        },
    }


def format_usd(value: float | None) -> str:
    if value is None:
        return "-"
    if value == 0 or value >= 1:
        return f"${value:,.2f}"
    return f"${value:.4f}" if value >= 0.01 else f"${value:.6f}"


# -- the budget ---------------------------------------------------------------------------------------


class Budget:
    """Stops new calls once the spending of the whole run reaches ``limit_usd``.

    The ledger calls :meth:`check` before each LLM call and :meth:`charge` with each record it
    writes. Calls already in flight when the limit is reached finish and are recorded (and charged),
    so the run can overshoot by at most ``engine.concurrency`` calls. Spending starts from what the
    run's records files already hold, so a re-run with the same budget makes no call and one with a
    higher budget resumes where the last one stopped.
    """

    def __init__(self, limit_usd: float, prices: dict[str, Price], spent_usd: float = 0.0):
        self.limit_usd = limit_usd
        self.prices = prices
        self.spent_usd = spent_usd
        self.stopped_calls = 0
        self._lock = threading.Lock()

    @classmethod
    def for_run(cls, config: Any) -> "Budget | None":
        """The budget of ``config`` (None when ``engine.budget_usd`` is unset), charged with past spending."""
        limit = config.engine.budget_usd
        if limit is None:
            return None
        prices = prices_from_config(config)
        spent = sum(record_usd(r, prices) or 0.0 for r in run_paid_records(config.run_dir))
        return cls(limit, prices, spent)

    @property
    def exhausted(self) -> bool:
        return self.spent_usd >= self.limit_usd

    def check(self) -> None:
        """Raise :class:`BudgetExhausted` if no new call may start."""
        with self._lock:
            if self.exhausted:
                self.stopped_calls += 1
                raise BudgetExhausted(self.message())

    def charge(self, record: Record) -> None:
        usd = record_usd(record, self.prices)
        if usd:
            with self._lock:
                self.spent_usd += usd

    def message(self) -> str:
        return (
            f"budget reached: the run has spent {format_usd(self.spent_usd)} of engine.budget_usd = "
            f"{format_usd(self.limit_usd)}; no new LLM call was started and every finished call is recorded. "
            "Raise engine.budget_usd (e.g. --set engine.budget_usd=...) and run the same command to resume."
        )
