"""The end-of-run summary, computed from stored records and gate decisions only."""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

from rich.table import Table

from mapd_dspy.config import RunConfig
from mapd_dspy.costs import cost_summary, format_usd, paid_records, prices_from_config
from mapd_dspy.programs.gate import AcceptanceGate, GateDecision
from mapd_dspy.records import Record, RecordStore


def summarize(
    config: RunConfig,
    examples: list,
    store: RecordStore,
    decisions: list[GateDecision],
    gate: AcceptanceGate,
    teachers: list | None = None,
) -> dict[str, Any]:
    ids = {example.id for example in examples}
    records = [r for r in store.records() if r.example_id in ids]
    exam = [r for r in records if r.stage == "exam"]
    correct = sum(1 for r in exam if r.correct)
    mistakes = sum(1 for r in exam if not r.correct)
    return {
        "run": config.name,
        "task": config.task.name,
        "split": config.task.split,
        "questions": len(examples),
        "exam": {
            "examined": len(exam),
            "correct": correct,
            "accuracy": round(correct / len(exam), 4) if exam else None,
            "mistakes": mistakes,
        },
        "gate": gate.describe(),
        "teachers": _per_teacher(teachers or config.teachers, records, decisions),
        "rejections": dict(Counter(d.reason for d in decisions if not d.accepted)),
        "accepted": sum(1 for d in decisions if d.accepted),
        "failures": _failures(records),
        "tokens": _tokens(records),
        # Every call this round's records file holds (all questions, superseded retries too): what was paid.
        "cost": cost_summary(paid_records(store.path) if store.path else store.records(), prices_from_config(config)),
    }


def _per_teacher(teachers: list, records: list[Record], decisions: list[GateDecision]) -> dict[str, Any]:
    table = {}
    for teacher in (t.name for t in teachers):
        own = [r for r in records if r.teacher == teacher and r.ok]
        rationales = [r for r in own if r.stage == "rationale"]
        accepted = sum(1 for d in decisions if d.teacher == teacher and d.accepted)
        scores = [r.score for r in own if r.stage == "review" and r.score is not None]
        table[teacher] = {
            "explanations": sum(1 for r in own if r.stage == "explain"),
            "rationales": len(rationales),
            "rationales_correct": sum(1 for r in rationales if r.correct),
            "reviews_given": sum(1 for r in records if r.stage == "review" and r.reviewer == teacher and r.ok),
            "mean_peer_score": round(sum(scores) / len(scores), 3) if scores else None,
            "accepted": accepted,
            "acceptance_rate": round(accepted / len(rationales), 4) if rationales else None,
        }
    return table


def _failures(records: list[Record]) -> dict[str, dict[str, int]]:
    failures: dict[str, Counter] = defaultdict(Counter)
    for record in records:
        if record.failure is not None:
            failures[record.stage][record.failure.kind] += 1
    return {stage: dict(counts) for stage, counts in failures.items()}


def _tokens(records: list[Record]) -> dict[str, dict[str, int]]:
    tokens: dict[str, Counter] = defaultdict(Counter)
    for record in records:
        tokens[record.stage].update(record.usage)
    return {stage: dict(counts) for stage, counts in tokens.items()}


def summary_tables(summary: dict[str, Any]) -> list[Table]:
    exam = summary["exam"]
    overview = Table(title=f"MAPD run '{summary['run']}' ({summary['task']}/{summary['split']})", show_header=False)
    accuracy = f"{exam['accuracy']:.1%}" if exam["accuracy"] is not None else "-"
    overview.add_row("exam accuracy", f"{accuracy} ({exam['correct']}/{exam['examined']})")
    overview.add_row("mistakes", str(exam["mistakes"]))
    overview.add_row("gate", summary["gate"])
    overview.add_row("accepted rationales", str(summary["accepted"]))
    rejected = ", ".join(f"{k} {v}" for k, v in sorted(summary["rejections"].items())) or "-"
    overview.add_row("rejected", rejected)
    failures = ", ".join(
        f"{stage}/{kind} {n}" for stage, kinds in sorted(summary["failures"].items()) for kind, n in sorted(kinds.items())
    )
    overview.add_row("failures", failures or "none")
    cost = summary.get("cost")
    if cost:
        total = cost["total"]
        overview.add_row("tokens", f"{total['prompt_tokens']:,} prompt + {total['completion_tokens']:,} completion "
                                   f"({total['calls']} calls)")
        overview.add_row("cost", format_usd(total["usd"]) if cost["priced"] else "not priced (see price_in_per_mtok)")

    teachers = Table(title="Per teacher (reviewed: reviews it gave; score: mean peer score it got)")
    columns = ("teacher", "explained", "rationales", "right", "reviewed", "score", "accepted")
    for column in columns:
        teachers.add_column(column, justify="left" if column == "teacher" else "right", no_wrap=True)
    for name, row in summary["teachers"].items():
        rate = f" ({row['acceptance_rate']:.0%})" if row["acceptance_rate"] is not None else ""
        score = f"{row['mean_peer_score']:.2f}" if row["mean_peer_score"] is not None else "-"
        teachers.add_row(
            name, str(row["explanations"]), str(row["rationales"]), str(row["rationales_correct"]),
            str(row["reviews_given"]), score, f"{row['accepted']}{rate}",
        )
    return [overview, teachers] + ([cost_table(summary["cost"])] if summary.get("cost") else [])


def cost_table(cost: dict[str, Any]) -> Table:
    """Calls, tokens and dollars per model that made calls (a teacher pays for the reviews it gives)."""
    table = Table(title="Cost per caller (tokens in / out; $ needs price_in_per_mtok, price_out_per_mtok)")
    for column in ("caller", "stages", "calls", "prompt", "completion", "cost"):
        table.add_column(column, justify="left" if column in ("caller", "stages") else "right", no_wrap=True)
    for name, entry in cost["by_payer"].items():
        total = entry["total"]
        table.add_row(name, ",".join(entry["stages"]), str(total["calls"]), f"{total['prompt_tokens']:,}",
                      f"{total['completion_tokens']:,}", format_usd(total["usd"]))
    return table
