"""The run report: numbers, tables and plots rebuilt from the files in a run folder only.

Input (all in ``runs/<name>/``): ``records.jsonl`` (required), ``decisions.jsonl``, ``config.json``,
``summary.json`` (only its gate description is used), and, when present, ``evals.json`` (a list of
``{label, round, baseline, split, accuracy, n, correct}`` written by the engine) and ``stages.json``
(``{stage: wall seconds}``).
Output (same folder): ``report.json``, ``report.md``, ``accuracy.png``, ``peer_scores.png``,
``acceptance.png``.

Everything is derived from those files, never from a live run, so deleting the report and building
it again gives the same ``report.json``.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from mapd_dspy.costs import cost_summary, format_usd, prices_from_config, run_paid_records
from mapd_dspy.records import Record, RecordStore, write_json

PLOTS = {"accuracy": "accuracy.png", "peer_scores": "peer_scores.png", "acceptance": "acceptance.png"}
TOKEN_FIELDS = ("prompt_tokens", "completion_tokens")


def build_report(run_dir: str | Path) -> dict[str, Any]:
    """Compute the report for ``run_dir``, write report.json, report.md and the plots; return the dict."""
    run_dir = Path(run_dir)
    records_path = run_dir / "records.jsonl"
    if not records_path.exists():
        raise FileNotFoundError(f"no records in {run_dir}: {records_path.name} is missing")
    records = RecordStore(records_path).records()
    decisions = _read_jsonl(run_dir / "decisions.jsonl")
    config = _read_json(run_dir / "config.json", {})
    report = {
        "run": config.get("name", run_dir.name),
        "task": config.get("task", {}).get("name"),
        "gate": _read_json(run_dir / "summary.json", {}).get("gate"),
        "score_scale": score_scale(config),
        "accuracy": accuracy_section(records, config, _read_json(run_dir / "evals.json", None)),
        "counts": counts(records, decisions),
        "teachers": per_teacher(records, decisions, teacher_names(config, records, decisions)),
        "failures": failures_by_stage(records),
        "tokens": tokens_by_stage(records),
        # Every paid call of every round, per payer (student, teacher) and stage; dollars need prices.
        "cost": cost_summary(run_paid_records(run_dir), prices_from_config(config)),
        "wall_seconds": _read_json(run_dir / "stages.json", None),
        "plots": dict(PLOTS),
    }
    write_json(run_dir / "report.json", report)
    (run_dir / "report.md").write_text(render_markdown(report), encoding="utf-8")
    write_plots(report, run_dir)
    return report


# -- reading ------------------------------------------------------------------------------------


def _read_json(path: Path, default: Any) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else default


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def teacher_names(config: dict, records: list[Record], decisions: list[dict]) -> list[str]:
    """Configured teachers first (their order), then any other author found on disk."""
    names = [t["name"] for t in config.get("teachers", []) if "name" in t]
    found = {r.teacher for r in records if r.stage in ("explain", "rationale", "review")}
    found |= {d["teacher"] for d in decisions}
    return names + sorted(found - set(names) - {""})


def score_scale(config: dict) -> list[int]:
    review = config.get("review", {})
    return [review.get("scale_min", 1), review.get("scale_max", 5)]


# -- numbers ------------------------------------------------------------------------------------


def accuracy_section(records: list[Record], config: dict, evals: list[dict] | None) -> dict[str, Any]:
    """The exam split's accuracy, and one row per evaluated student (from evals.json or eval records)."""
    exam = [r for r in records if r.stage == "exam"]
    correct = sum(1 for r in exam if r.correct)
    exam_row = {
        "split": config.get("task", {}).get("split"),
        "n": len(exam),
        "correct": correct,
        "accuracy": _ratio(correct, len(exam)),
    }
    return {"exam": exam_row, "evals": evals if evals is not None else evals_from_records(records)}


def evals_from_records(records: list[Record]) -> list[dict[str, Any]]:
    """Without evals.json the eval records still give accuracy per label (round/baseline unknown)."""
    by_label: dict[str, list[Record]] = defaultdict(list)
    for record in records:
        if record.stage == "eval":
            by_label[record.teacher].append(record)
    rows = []
    for label, own in sorted(by_label.items()):
        correct = sum(1 for r in own if r.correct)
        row = {"label": label, "round": None, "baseline": None, "split": None}
        rows.append(row | {"accuracy": _ratio(correct, len(own)), "n": len(own), "correct": correct})
    return rows


def counts(records: list[Record], decisions: list[dict]) -> dict[str, int]:
    exam = [r for r in records if r.stage == "exam"]

    def ok_in(stage: str) -> int:
        return sum(1 for r in records if r.stage == stage and r.ok)

    return {
        "questions": len(exam),
        "mistakes": sum(1 for r in exam if not r.correct),
        "explanations": ok_in("explain"),
        "rationales": ok_in("rationale"),
        "reviews": ok_in("review"),
        "accepted": sum(1 for d in decisions if d.get("accepted")),
    }


def per_teacher(records: list[Record], decisions: list[dict], names: list[str]) -> dict[str, dict[str, Any]]:
    """Per author: rationales, gate verdicts, and the peer scores its rationales received."""
    table = {}
    for name in names:
        scores = [r.score for r in records if r.stage == "review" and r.teacher == name and r.score is not None]
        verdicts = [d for d in decisions if d["teacher"] == name]
        accepted = sum(1 for d in verdicts if d.get("accepted"))
        table[name] = {
            "rationales": sum(1 for r in records if r.stage == "rationale" and r.teacher == name and r.ok),
            "decisions": len(verdicts),
            "accepted": accepted,
            # Share of its gated rationales (failed ones included: they were paid for) that passed.
            "acceptance_rate": _ratio(accepted, len(verdicts)),
            "peer_scores": {str(score): n for score, n in sorted(Counter(scores).items())},
            "mean_peer_score": round(sum(scores) / len(scores), 3) if scores else None,
        }
    return table


def failures_by_stage(records: list[Record]) -> dict[str, dict[str, int]]:
    failures: dict[str, Counter] = defaultdict(Counter)
    for record in records:
        if record.failure is not None:
            failures[record.stage][record.failure.kind] += 1
    return {stage: dict(sorted(kinds.items())) for stage, kinds in sorted(failures.items())}


def tokens_by_stage(records: list[Record]) -> dict[str, dict[str, int]]:
    """Tokens of the stored (latest) record per key; a superseded lm_error retry is not counted."""
    tokens: dict[str, Counter] = defaultdict(Counter)
    for record in records:
        tokens[record.stage]["calls"] += 1
        for field in TOKEN_FIELDS:
            tokens[record.stage][field] += record.usage.get(field, 0)
    return {stage: {k: totals[k] for k in ("calls", *TOKEN_FIELDS)} for stage, totals in sorted(tokens.items())}


def _ratio(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


# -- markdown ------------------------------------------------------------------------------------


def render_markdown(report: dict[str, Any]) -> str:
    parts = [f"# MAPD run report: {report['run']} ({report['task']})", ""]
    if report["gate"]:
        parts += [f"Gate: {report['gate']}", ""]
    parts += _accuracy_md(report["accuracy"])
    parts += _section("Counts", ("what", "count"), report["counts"].items())
    teacher_rows = [
        (name, t["rationales"], t["decisions"], t["accepted"], _percent(t["acceptance_rate"]), _number(t["mean_peer_score"]))
        for name, t in report["teachers"].items()
    ]
    parts += _section("Teachers", ("teacher", "rationales", "gated", "accepted", "acceptance", "mean peer score"), teacher_rows)
    failure_rows = [(s, k, n) for s, kinds in report["failures"].items() for k, n in kinds.items()]
    parts += _section("Failures", ("stage", "kind", "count"), failure_rows)
    token_rows = [(s, t["calls"], t["prompt_tokens"], t["completion_tokens"]) for s, t in report["tokens"].items()]
    parts += _section("Tokens", ("stage", "calls", "prompt", "completion"), token_rows)
    parts += _cost_md(report.get("cost"))
    if report["wall_seconds"]:
        wall_rows = [(stage, f"{seconds:.1f}") for stage, seconds in report["wall_seconds"].items()]
        parts += _section("Wall time", ("stage", "seconds"), wall_rows)
    parts += ["## Plots", ""] + [f"![{name}]({file})" for name, file in report["plots"].items()] + [""]
    return "\n".join(parts)


def _cost_md(cost: dict[str, Any] | None) -> list[str]:
    if not cost:
        return []
    rows = [
        (name, stage, row["calls"], row["prompt_tokens"], row["completion_tokens"], format_usd(row["usd"]))
        for name, entry in cost["by_payer"].items() for stage, row in entry["stages"].items()
    ]
    total = cost["total"]
    if rows:
        rows.append(("**total**", "", total["calls"], total["prompt_tokens"], total["completion_tokens"],
                     format_usd(total["usd"])))
    lines = _section("Cost (every paid call; the caller pays, so reviews count for the reviewer)",
                     ("model", "stage", "calls", "prompt", "completion", "usd"), rows)
    if not cost["priced"]:
        lines.insert(-1, "No prices configured (price_in_per_mtok / price_out_per_mtok): dollars are not shown.")
        lines.insert(-1, "")
    return lines


def _accuracy_md(accuracy: dict[str, Any]) -> list[str]:
    exam = accuracy["exam"]
    rows = [("exam", "", "", exam["split"] or "", exam["n"], exam["correct"], _percent(exam["accuracy"]))]
    for row in accuracy["evals"]:
        rows.append((
            row["label"], _blank(row.get("round")), _blank(row.get("baseline")), _blank(row.get("split")),
            row["n"], row["correct"], _percent(row["accuracy"]),
        ))
    return _section("Accuracy", ("label", "round", "baseline", "split", "n", "correct", "accuracy"), rows)


def _section(title: str, header: tuple[str, ...], rows) -> list[str]:
    rows = list(rows)
    lines = [f"## {title}", ""]
    if not rows:
        return lines + ["none", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines + [""]


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _blank(value: Any) -> str:
    return "" if value is None else str(value)


# -- plots ---------------------------------------------------------------------------------------


def write_plots(report: dict[str, Any], run_dir: Path) -> None:
    plot_accuracy(report["accuracy"]["evals"], run_dir / PLOTS["accuracy"])
    plot_peer_scores(report["teachers"], report["score_scale"], run_dir / PLOTS["peer_scores"])
    plot_acceptance(report["teachers"], run_dir / PLOTS["acceptance"])


def _figure(width: float = 6.0, height: float = 3.5):
    # A bare Figure on the Agg canvas: no pyplot global state, no display needed, thread-safe.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path: Path) -> None:
    figure.savefig(path, format="png", dpi=100, metadata={"Software": None})


def plot_accuracy(evals: list[dict], path: Path) -> None:
    """Grouped bars: one group per baseline, one bar per round (round 0 = before distillation)."""
    figure = _figure()
    axes = figure.add_subplot()
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in evals:
        groups[str(row.get("baseline") or "-")].append(row)
    for group_index, (baseline, rows) in enumerate(groups.items()):
        rows = sorted(rows, key=lambda r: (r.get("round") is None, r.get("round") or 0))
        width = 0.8 / len(rows)
        for bar_index, row in enumerate(rows):
            x = group_index - 0.4 + width * (bar_index + 0.5)
            axes.bar(x, 100 * (row["accuracy"] or 0.0), width=width * 0.9, color=f"C{bar_index}")
            axes.text(x, 100 * (row["accuracy"] or 0.0), row["label"], ha="center", va="bottom", fontsize=7)
    axes.set_xticks(range(len(groups)), list(groups))
    axes.set_ylabel("accuracy (%)")
    axes.set_title("Student accuracy before/after distillation" if evals else "No evaluations yet")
    _save(figure, path)


def plot_peer_scores(teachers: dict[str, dict], scale: list[int], path: Path) -> None:
    """One histogram per author of the scores its rationales received from the other teachers."""
    from matplotlib.ticker import MaxNLocator

    names = list(teachers) or ["(no teachers)"]
    scores = list(range(scale[0], scale[1] + 1))  # the whole scale, so empty scores show as gaps
    figure = _figure(width=max(3.0 * len(names), 4.0), height=3.0)
    axes_list = figure.subplots(1, len(names), sharey=True, squeeze=False)[0]
    for axes, name in zip(axes_list, names):
        histogram = teachers.get(name, {}).get("peer_scores", {})
        axes.bar(scores, [histogram.get(str(score), 0) for score in scores], color="C0")
        axes.set_xticks(scores)
        axes.set_title(name)
        axes.set_xlabel("peer score")
    axes_list[0].set_ylabel("reviews")
    axes_list[0].yaxis.set_major_locator(MaxNLocator(integer=True))
    _save(figure, path)


def plot_acceptance(teachers: dict[str, dict], path: Path) -> None:
    figure = _figure()
    axes = figure.add_subplot()
    names = list(teachers)
    rates = [100 * (teachers[name]["acceptance_rate"] or 0.0) for name in names]
    bars = axes.bar(range(len(names)), rates, color="C2")
    axes.bar_label(bars, [f"{teachers[n]['accepted']}/{teachers[n]['decisions']}" for n in names])
    axes.set_xticks(range(len(names)), names)
    axes.set_ylim(0, 100)
    axes.set_ylabel("accepted rationales (%)")
    axes.set_title("Acceptance rate per teacher")
    _save(figure, path)
