"""Side-by-side comparison of runs (e.g. the baselines and MAPD on the same task).

    python -m mapd_dspy.compare runs/none runs/single runs/all runs/mapd [--out runs/compare]

Input: each run folder's ``evals.json`` (accuracy per served student) and ``summary.json`` (exam
and gate counts). Output: ``compare.json`` and ``compare.md`` in ``--out`` (default: the current
folder). Reads files only: no model is loaded and no LLM is called.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from mapd_dspy.records import write_json


class CompareError(ValueError):
    """A run folder lacks what a comparison needs; the message names the file."""


def run_row(run_dir: Path) -> dict[str, Any]:
    """One run's line: baseline, gate, accepted rows, accuracy before (r0) and after (last round)."""
    evals_path = run_dir / "evals.json"
    if not evals_path.exists():
        raise CompareError(f"{evals_path}: missing; run `python -m mapd_dspy.run ... --stage eval` first")
    evals = sorted(json.loads(evals_path.read_text()), key=lambda row: row["round"])
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    before, after = evals[0], evals[-1]
    return {
        "run": run_dir.name,
        "baseline": before.get("baseline"),
        "split": before.get("split"),
        "n": before.get("n"),
        "gate": summary.get("gate", "-"),
        "accepted": summary.get("accepted"),
        "accuracy_before": before.get("accuracy"),
        "accuracy_after": after.get("accuracy") if after is not before else None,
        "accuracy_per_round": {str(row["round"]): row.get("accuracy") for row in evals},
    }


def compare(run_dirs: list[Path], out_dir: Path) -> list[dict[str, Any]]:
    rows = [run_row(Path(run_dir)) for run_dir in run_dirs]
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "compare.json", rows)
    (out_dir / "compare.md").write_text(render(rows), encoding="utf-8")
    return rows


def render(rows: list[dict[str, Any]]) -> str:
    lines = [
        "# Comparison",
        "",
        "| run | baseline | gate | accepted rationales | eval n | accuracy before | accuracy after | change |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        before, after = row["accuracy_before"], row["accuracy_after"]
        change = f"{(after - before) * 100:+.1f} pts" if before is not None and after is not None else "-"
        lines.append(
            f"| {row['run']} | {row['baseline']} | {row['gate']} | {_blank(row['accepted'])} | {row['n']} "
            f"| {_percent(before)} | {_percent(after)} | {change} |"
        )
    return "\n".join(lines) + "\n"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _blank(value: Any) -> str:
    return "-" if value is None else str(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mapd_dspy.compare", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (runs/<name>)")
    parser.add_argument("--out", type=Path, default=Path("."), help="folder for compare.json and compare.md")
    args = parser.parse_args(argv)
    try:
        rows = compare(args.runs, args.out)
    except CompareError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(render(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
