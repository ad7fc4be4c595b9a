"""Peer-review analysis of a finished run, from its files alone (no model, no LLM call).

    python -m mapd_dspy.analysis sweep runs/NAME [--rule gt|ge] [--json]
    python -m mapd_dspy.analysis agreement runs/NAME [--json]

Input (in ``runs/<name>/`` or a ``round-k/`` folder): ``records.jsonl`` (required), and when present
``decisions.jsonl``, ``summary.json``, ``report.json`` and ``config.json`` (a round folder falls back to
its parent's ``config.json``). Output: plain data (lists and dicts, ready for ``pandas.DataFrame``),
``rich`` tables, and matplotlib figures on the Agg canvas. This is the API the notebooks in
``notebooks/`` use.

What it measures:

* **peer scores** per author (the teacher whose rationale was reviewed) and per reviewer;
* **inter-reviewer agreement**, on rationales that two or more reviewers scored (three or more
  teachers): for each pair of reviewers, exact agreement, agreement within one point, mean absolute
  difference, and Cohen's kappa on the pass/fail verdict each score gives on its own (score passes
  the threshold rule). The pooled row uses Fleiss' kappa over all pair observations (shared marginals:
  which reviewer of a pair comes first is arbitrary). Kappa is ``None`` when it is undefined (both
  reviewers gave one verdict only);
* **acceptance vs answer correctness**: the gate's verdicts crossed with whether the rationale's
  extracted answer equals the gold answer;
* a **threshold sweep**: the :class:`~mapd_dspy.programs.gate.AcceptanceGate` re-applied to the
  stored rationale and review records for every integer threshold of the score scale, with and
  without the answer check. ``precision`` is the share of accepted rationales whose answer is right;
  ``recall`` the share of right-answer rationales that are accepted.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any, Literal

from mapd_dspy.programs.gate import AcceptanceGate, GateDecision
from mapd_dspy.records import Record, RecordStore

Rule = Literal["gt", "ge"]


class RunDataError(FileNotFoundError):
    """A run folder or one of its required files is missing; the message names the path."""


# -- loading ---------------------------------------------------------------------------------------


@dataclass
class RunData:
    """Everything a run folder holds that the analysis reads."""

    run_dir: Path
    records: list[Record]
    decisions: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] | None = None
    report: dict[str, Any] | None = None
    config: dict[str, Any] = field(default_factory=dict)

    def stage(self, name: str) -> list[Record]:
        return [r for r in self.records if r.stage == name]

    @property
    def scale(self) -> tuple[int, int]:
        review = self.config.get("review", {})
        return review.get("scale_min", 1), review.get("scale_max", 5)

    @property
    def gate(self) -> AcceptanceGate:
        """The gate the run was configured with (the defaults when config.json is absent)."""
        review = self.config.get("review", {})
        return AcceptanceGate(
            threshold=review.get("threshold", 3.0),
            rule=review.get("threshold_rule", "gt"),
            require_correct_answer=review.get("require_correct_answer", True),
            peer_review=self.config.get("baseline", "mapd") == "mapd",
        )

    @property
    def teachers(self) -> list[str]:
        """Configured teachers first (their order), then any other author or reviewer on disk."""
        names = [t["name"] for t in self.config.get("teachers", []) if "name" in t]
        found = {r.teacher for r in self.records if r.stage in ("explain", "rationale", "review")}
        found |= {r.reviewer for r in self.records if r.stage == "review"}
        return names + sorted(found - set(names) - {""})


def load_run(run_dir: str | Path) -> RunData:
    """Read a run folder; raises :class:`RunDataError` naming the missing folder or records file."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDataError(f"{run_dir}: no such run folder")
    records_path = run_dir / "records.jsonl"
    if not records_path.exists():
        raise RunDataError(f"{records_path}: missing (run `python -m mapd_dspy.run` first)")
    config_path = run_dir / "config.json"
    if not config_path.exists() and run_dir.name.startswith("round-"):
        config_path = run_dir.parent / "config.json"
    return RunData(
        run_dir=run_dir,
        records=RecordStore(records_path).records(),
        decisions=_read_jsonl(run_dir / "decisions.jsonl"),
        summary=_read_json(run_dir / "summary.json"),
        report=_read_json(run_dir / "report.json"),
        config=_read_json(config_path) or {},
    )


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# -- peer scores -----------------------------------------------------------------------------------


def peer_scores(run: RunData) -> list[dict[str, Any]]:
    """One row per valid peer score: ``example_id``, ``author``, ``reviewer``, ``score``."""
    return [
        {"example_id": r.example_id, "author": r.teacher, "reviewer": r.reviewer, "score": r.score}
        for r in run.stage("review")
        if r.ok and r.score is not None
    ]


def score_distribution(run: RunData, by: Literal["author", "reviewer"] = "author") -> dict[str, dict[str, Any]]:
    """Per author (scores received) or per reviewer (scores given): ``n``, ``mean`` and ``counts``.

    ``counts`` covers the whole scale, so a score nobody gave shows as 0.
    """
    if by not in ("author", "reviewer"):
        raise ValueError(f"by must be 'author' or 'reviewer', not {by!r}")
    low, high = run.scale
    scores_of: dict[str, list[int]] = defaultdict(list)
    for row in peer_scores(run):
        scores_of[row[by]].append(row["score"])
    table = {}
    for name in run.teachers:
        scores = scores_of.get(name, [])
        counts = Counter(scores)
        table[name] = {
            "n": len(scores),
            "mean": round(sum(scores) / len(scores), 4) if scores else None,
            "counts": {score: counts.get(score, 0) for score in range(low, high + 1)},
        }
    return table


# -- inter-reviewer agreement --------------------------------------------------------------------


def scores_by_rationale(run: RunData) -> dict[tuple[str, str], dict[str, int]]:
    """(example_id, author) -> {reviewer: score}, valid scores only."""
    table: dict[tuple[str, str], dict[str, int]] = defaultdict(dict)
    for row in peer_scores(run):
        table[(row["example_id"], row["author"])][row["reviewer"]] = row["score"]
    return dict(table)


def reviewer_agreement(run: RunData, threshold: float | None = None, rule: Rule | None = None) -> dict[str, Any]:
    """Agreement between reviewers who scored the same rationale.

    Returns ``{"rationales": n rationales with 2+ valid scores, "threshold", "rule", "pairs": [row per
    reviewer pair], "overall": row pooled over all pairs}``; a row holds ``n`` (rationales both scored),
    ``exact``, ``within_one``, ``mean_abs_diff`` and ``kappa`` (pass/fail). With two teachers every
    rationale has one reviewer, so ``pairs`` is empty and the rates are ``None``.
    """
    gate = run.gate
    verdict_gate = AcceptanceGate(threshold if threshold is not None else gate.threshold, rule or gate.rule)
    order = {name: index for index, name in enumerate(run.teachers)}
    observations: dict[tuple[str, str], list[tuple[int, int]]] = defaultdict(list)
    multi_reviewed = 0
    for scores in scores_by_rationale(run).values():
        if len(scores) < 2:
            continue
        multi_reviewed += 1
        for first, second in combinations(sorted(scores, key=lambda name: order.get(name, len(order))), 2):
            observations[(first, second)].append((scores[first], scores[second]))
    pairs = [
        {"reviewers": list(pair)} | _agreement_row(pairs_seen, verdict_gate, pooled=False)
        for pair, pairs_seen in sorted(observations.items(), key=lambda item: [order.get(n, len(order)) for n in item[0]])
    ]
    pooled = [observation for seen in observations.values() for observation in seen]
    return {
        "rationales": multi_reviewed,
        "threshold": verdict_gate.threshold,
        "rule": verdict_gate.rule,
        "pairs": pairs,
        "overall": {"reviewers": ["all pairs"]} | _agreement_row(pooled, verdict_gate, pooled=True),
    }


def _agreement_row(observations: list[tuple[int, int]], gate: AcceptanceGate, pooled: bool) -> dict[str, Any]:
    n = len(observations)
    if not n:
        return {"n": 0, "exact": None, "within_one": None, "mean_abs_diff": None, "kappa": None}
    differences = [abs(a - b) for a, b in observations]
    verdicts = [(gate.passes(a), gate.passes(b)) for a, b in observations]
    return {
        "n": n,
        "exact": round(sum(d == 0 for d in differences) / n, 4),
        "within_one": round(sum(d <= 1 for d in differences) / n, 4),
        "mean_abs_diff": round(sum(differences) / n, 4),
        "kappa": _kappa(verdicts, shared_marginals=pooled),
    }


def _kappa(verdicts: list[tuple[bool, bool]], shared_marginals: bool) -> float | None:
    """Cohen's kappa on two binary raters; with shared marginals it is Fleiss' kappa for two ratings."""
    n = len(verdicts)
    observed = sum(a == b for a, b in verdicts) / n
    first = sum(a for a, _ in verdicts) / n
    second = sum(b for _, b in verdicts) / n
    if shared_marginals:
        first = second = (first + second) / 2
    expected = first * second + (1 - first) * (1 - second)
    if expected >= 1.0:
        return None  # one verdict only: chance agreement is total, kappa is undefined
    return round((observed - expected) / (1 - expected), 4)


# -- the gate, re-applied ----------------------------------------------------------------------------


def apply_gate(run: RunData, gate: AcceptanceGate) -> list[GateDecision]:
    """The gate's verdict on every stored rationale, from the stored reviews (no LLM call)."""
    reviews: dict[tuple[str, str], list[Record]] = defaultdict(list)
    for review in run.stage("review"):
        reviews[(review.example_id, review.teacher)].append(review)
    return [gate.decide(r, reviews.get((r.example_id, r.teacher), [])) for r in run.stage("rationale")]


def acceptance_vs_correctness(run: RunData, gate: AcceptanceGate | None = None) -> dict[str, int]:
    """Confusion counts of the gate's verdict against the rationale's answer correctness.

    With ``gate=None`` the stored ``decisions.jsonl`` is used (or, when absent, the run's configured
    gate re-applied). Failed rationales have no answer: they are counted as ``no_answer``.
    """
    if gate is None and run.decisions:
        verdicts = [(d["accepted"], d.get("answer_correct")) for d in run.decisions if d.get("reason") != "rationale_failed"]
        failed = sum(1 for d in run.decisions if d.get("reason") == "rationale_failed")
    else:
        decisions = apply_gate(run, gate or run.gate)
        verdicts = [(d.accepted, d.answer_correct) for d in decisions if d.reason != "rationale_failed"]
        failed = sum(1 for d in decisions if d.reason == "rationale_failed")
    counts = Counter(verdicts)
    return {
        "accepted_correct": counts[(True, True)],
        "accepted_wrong": counts[(True, False)] + counts[(True, None)],
        "rejected_correct": counts[(False, True)],
        "rejected_wrong": counts[(False, False)] + counts[(False, None)],
        "no_answer": failed,
    }


def threshold_sweep(
    run: RunData,
    rule: Rule | None = None,
    thresholds: list[float] | None = None,
    answer_checks: tuple[bool, ...] = (True, False),
) -> list[dict[str, Any]]:
    """Re-apply the gate at every threshold (default: each integer of the scale), rule ``rule``
    (default: the run's), with and without the answer check. One row per (answer check, threshold)."""
    rule = rule or run.gate.rule
    low, high = run.scale
    thresholds = thresholds if thresholds is not None else list(range(low, high + 1))
    configured = run.gate
    right_answers = sum(1 for r in run.stage("rationale") if r.ok and r.correct)
    rows = []
    for answer_check in answer_checks:
        for threshold in thresholds:
            gate = AcceptanceGate(threshold=float(threshold), rule=rule, require_correct_answer=answer_check)
            accepted = [d for d in apply_gate(run, gate) if d.accepted]
            accepted_correct = sum(1 for d in accepted if d.answer_correct)
            rows.append({
                "threshold": threshold,
                "rule": rule,
                "answer_check": answer_check,
                "accepted": len(accepted),
                "accepted_wrong": len(accepted) - accepted_correct,
                "precision": round(accepted_correct / len(accepted), 4) if accepted else None,
                "recall": round(accepted_correct / right_answers, 4) if right_answers else None,
                "configured": configured.peer_review and (configured.threshold, configured.rule,
                                                          configured.require_correct_answer) == (threshold, rule, answer_check),
            })
    return rows


# -- results (report.json, round folders) -------------------------------------------------------------


def accuracy_rows(run: RunData) -> list[dict[str, Any]]:
    """Accuracy of the exam split and of every evaluated student, from report.json.

    Raises :class:`RunDataError` when report.json is missing (build it with
    ``mapd_dspy.report.build_report(run_dir)`` or ``python -m mapd_dspy.run --stage report``).
    """
    if run.report is None:
        raise RunDataError(f"{run.run_dir / 'report.json'}: missing (run `python -m mapd_dspy.run --stage report`)")
    accuracy = run.report["accuracy"]
    exam = accuracy["exam"]
    rows = [{"label": "exam", "round": None, "baseline": None} | {k: exam[k] for k in ("split", "n", "correct", "accuracy")}]
    for row in accuracy["evals"]:
        rows.append({k: row.get(k) for k in ("label", "round", "baseline", "split", "n", "correct", "accuracy")})
    return rows


def round_rows(run: RunData) -> list[dict[str, Any]]:
    """One row per round folder (``run_dir``, ``round-2/``, ...) from its summary.json."""
    folders = [(1, run.run_dir)] + sorted(
        (int(path.name.removeprefix("round-")), path)
        for path in run.run_dir.glob("round-*")
        if path.is_dir() and path.name.removeprefix("round-").isdigit()
    )
    rows = []
    for index, folder in folders:
        summary = _read_json(folder / "summary.json") or {}
        exam = summary.get("exam", {})
        rows.append({
            "round": index,
            "examined": exam.get("examined"),
            "exam_accuracy": exam.get("accuracy"),
            "mistakes": exam.get("mistakes"),
            "accepted": summary.get("accepted"),
        })
    return rows


# -- rich tables ---------------------------------------------------------------------------------------


def _fmt(value: Any, percent: bool = False) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1%}" if percent else f"{value:.3g}"
    return str(value)


def sweep_table(rows: list[dict[str, Any]], title: str = "Threshold sweep"):
    """The sweep as a rich table; ``*`` marks the run's configured gate."""
    from rich.table import Table

    table = Table(title=title, caption="* the run's configured gate; precision: accepted with the right answer")
    for column in ("answer check", "mean", "accepted", "wrong answer", "precision", "recall", ""):
        table.add_column(column, justify="left" if column in ("answer check", "mean") else "right", no_wrap=True)
    for row in rows:
        op = ">" if row["rule"] == "gt" else ">="
        table.add_row(
            "yes" if row["answer_check"] else "no", f"{op} {row['threshold']:g}", str(row["accepted"]),
            str(row["accepted_wrong"]), _fmt(row["precision"], True), _fmt(row["recall"], True),
            "*" if row["configured"] else "",
        )
    return table


def agreement_table(agreement: dict[str, Any]):
    from rich.table import Table

    op = ">" if agreement["rule"] == "gt" else ">="
    title = (f"Inter-reviewer agreement ({agreement['rationales']} rationales with 2+ reviews; "
             f"kappa on pass = score {op} {agreement['threshold']:g})")
    table = Table(title=title)
    for column in ("reviewers", "n", "exact", "within 1", "mean |diff|", "kappa"):
        table.add_column(column, justify="left" if column == "reviewers" else "right", no_wrap=True)
    for row in agreement["pairs"] + [agreement["overall"]]:
        table.add_row(
            " / ".join(row["reviewers"]), str(row["n"]), _fmt(row["exact"], True), _fmt(row["within_one"], True),
            _fmt(row["mean_abs_diff"]), _fmt(row["kappa"]),
        )
    return table


def distribution_table(distribution: dict[str, dict[str, Any]], by: str = "author"):
    from rich.table import Table

    scale = next(iter(distribution.values()))["counts"] if distribution else {}
    table = Table(title=f"Peer scores per {by} ({'received' if by == 'author' else 'given'})")
    for column in (by, "n", "mean", *map(str, scale)):
        table.add_column(column, justify="left" if column == by else "right", no_wrap=True)
    for name, row in distribution.items():
        table.add_row(name, str(row["n"]), _fmt(row["mean"]), *(str(count) for count in row["counts"].values()))
    return table


# -- plots (bare Agg figures: no pyplot state, no display needed) -----------------------------------------


def _figure(width: float = 6.0, height: float = 3.5):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def plot_score_distributions(run: RunData, by: Literal["author", "reviewer"] = "author"):
    """One bar chart per author (scores received) or reviewer (scores given)."""
    distribution = score_distribution(run, by)
    names = list(distribution) or ["(no teachers)"]
    figure = _figure(width=max(3.0 * len(names), 4.0), height=3.0)
    axes_list = figure.subplots(1, len(names), sharey=True, squeeze=False)[0]
    for axes, name in zip(axes_list, names):
        counts = distribution.get(name, {}).get("counts", {})
        axes.bar(list(counts), list(counts.values()), color="C0" if by == "author" else "C1")
        axes.set_xticks(list(counts))
        axes.set_title(f"{by} {name}")
        axes.set_xlabel("peer score")
    axes_list[0].set_ylabel("reviews")
    return figure


def plot_threshold_sweep(rows: list[dict[str, Any]]):
    """Accepted and accepted-with-wrong-answer counts against the threshold, per answer check."""
    figure = _figure()
    axes = figure.add_subplot()
    for index, answer_check in enumerate(sorted({row["answer_check"] for row in rows}, reverse=True)):
        own = [row for row in rows if row["answer_check"] == answer_check]
        label = "with answer check" if answer_check else "without answer check"
        thresholds = [row["threshold"] for row in own]
        axes.plot(thresholds, [row["accepted"] for row in own], marker="o", color=f"C{index}", label=f"accepted, {label}")
        axes.plot(thresholds, [row["accepted_wrong"] for row in own], marker="x", linestyle="--", color=f"C{index}",
                  label=f"wrong answer, {label}")
    rule = rows[0]["rule"] if rows else "gt"
    axes.set_xlabel(f"threshold (accept if mean peer score {'>' if rule == 'gt' else '>='} threshold)")
    axes.set_ylabel("rationales")
    axes.legend(fontsize=7)
    return figure


def plot_confusion(confusion: dict[str, int]):
    """2x2 grid: gate verdict (rows) against answer correctness (columns)."""
    figure = _figure(width=4.0, height=3.2)
    axes = figure.add_subplot()
    grid = [[confusion["accepted_correct"], confusion["accepted_wrong"]],
            [confusion["rejected_correct"], confusion["rejected_wrong"]]]
    axes.imshow(grid, cmap="Blues")
    for row in range(2):
        for column in range(2):
            axes.text(column, row, str(grid[row][column]), ha="center", va="center")
    axes.set_xticks([0, 1], ["answer right", "answer wrong"])
    axes.set_yticks([0, 1], ["accepted", "rejected"])
    axes.set_title(f"Gate vs answer ({confusion['no_answer']} failed rationales not shown)", fontsize=9)
    return figure


def plot_agreement(agreement: dict[str, Any]):
    """Exact agreement and mean absolute difference per reviewer pair."""
    figure = _figure()
    axes = figure.add_subplot()
    rows = agreement["pairs"]
    labels = [" / ".join(row["reviewers"]) for row in rows]
    axes.bar([i - 0.2 for i in range(len(rows))], [row["exact"] or 0.0 for row in rows], width=0.4, label="exact agreement")
    axes.bar([i + 0.2 for i in range(len(rows))], [row["mean_abs_diff"] or 0.0 for row in rows], width=0.4,
             label="mean |score difference|")
    axes.set_xticks(range(len(rows)), labels)
    axes.set_title("Inter-reviewer agreement" if rows else "No rationale has two reviewers (2 teachers?)")
    axes.legend(fontsize=7)
    return figure


def plot_accuracy(rows: list[dict[str, Any]]):
    """Accuracy per evaluated student (``accuracy_rows``), exam row excluded."""
    figure = _figure()
    axes = figure.add_subplot()
    evals = [row for row in rows if row["label"] != "exam"]
    bars = axes.bar(range(len(evals)), [100 * (row["accuracy"] or 0.0) for row in evals], color="C2")
    axes.bar_label(bars, [f"{row['correct']}/{row['n']}" for row in evals])
    axes.set_xticks(range(len(evals)), [row["label"] for row in evals])
    axes.set_ylabel("accuracy (%)")
    axes.set_title("Student accuracy before/after distillation" if evals else "No evaluations yet")
    return figure


# -- CLI -----------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mapd_dspy.analysis", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    sweep = commands.add_parser("sweep", help="re-apply the gate at every threshold of the scale (no LLM call)")
    sweep.add_argument("run_dir", type=Path, help="run folder (runs/<name>)")
    sweep.add_argument("--rule", choices=("gt", "ge"), help="threshold rule (default: the run's)")
    sweep.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    agreement = commands.add_parser("agreement", help="peer scores per teacher and inter-reviewer agreement")
    agreement.add_argument("run_dir", type=Path, help="run folder (runs/<name>)")
    agreement.add_argument("--json", action="store_true", help="print JSON instead of tables")
    args = parser.parse_args(argv)
    try:
        run = load_run(args.run_dir)
    except RunDataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from rich.console import Console

    console = Console()
    if args.command == "sweep":
        rows = threshold_sweep(run, rule=args.rule)
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            console.print(sweep_table(rows, title=f"Threshold sweep of {run.run_dir}\n(gate now: {run.gate.describe()})"))
        return 0
    result = {
        "agreement": reviewer_agreement(run),
        "by_author": score_distribution(run, "author"),
        "by_reviewer": score_distribution(run, "reviewer"),
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        console.print(distribution_table(result["by_author"], "author"))
        console.print(distribution_table(result["by_reviewer"], "reviewer"))
        console.print(agreement_table(result["agreement"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
