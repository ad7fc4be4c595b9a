"""Command line: ``python -m mapd_dspy.run [CONFIG.toml] [--set key=value ...] [--stage ...] [--limit N]``.

Exit codes: 0 success, 2 bad config or data (nothing written), 1 a run-time failure
(e.g. the vLLM server did not start), 3 the spending reached ``engine.budget_usd`` (no new call was
started, calls in flight were recorded, summary.json is up to date; raise the budget and run the same
command to resume), 130 interrupted. Records written before a failure stay valid: run the same
command again to resume.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time

from rich.console import Console

EXIT_BUDGET = 3  # engine.budget_usd reached
# "optimize" (compile the teachers' prompts with DSPy optimizers) is extra: not part of "all", it costs calls.
STAGE_CHOICES = ("exam", "teach", "review", "compile", "train", "eval", "report", "all", "optimize")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m mapd_dspy.run",
        description="Mistake-Aware Peer-Review Distillation: exam the student, teach its mistakes, peer-review, "
        "compile a training set, fine-tune, evaluate, report.",
    )
    parser.add_argument("config", nargs="?", help="TOML config file (default: built-in defaults, see configs/default.toml)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key, e.g. --set review.threshold=3.5 --set teachers.0.model=openai/gpt-4o-mini",
    )
    parser.add_argument(
        "--stage", choices=STAGE_CHOICES, default="all",
        help="run one stage, or all (default); optimize (compile the teachers' prompts) is never part of all",
    )
    parser.add_argument("--limit", type=int, help="examine only the first N questions (task.limit)")
    parser.add_argument("-v", "--verbose", action="store_true", help="show DSPy/LiteLLM warnings per call")
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be at least 1")
    return args


def _exit_on_sigterm(signum, frame):  # noqa: ARG001
    # Turn `kill`/a CI timeout into a normal unwind, so the vLLM server we started is stopped.
    raise KeyboardInterrupt


def _restrict_dspy_cache() -> None:
    """DSPy's disk cache ($DSPY_CACHEDIR, default ~/.dspy_cache) is a pickle store (diskcache) that DSPy
    unpickles without restriction by default. The run's cache entries are plain data, so unpickle only
    that (and LiteLLM/OpenAI response types): an object someone planted there is a cache miss, not code."""
    import dspy
    from dspy.utils.caching import default_cache_dir

    dspy.configure_cache(disk_cache_dir=default_cache_dir(), restrict_pickle=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    console = Console(stderr=True)
    # Offline-safe defaults: LiteLLM would otherwise fetch its model price map at import.
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

    from mapd_dspy.config import ConfigError, load_config
    from mapd_dspy.costs import BudgetExhausted
    from mapd_dspy.records import RecordFileError
    from mapd_dspy.engine import STAGES, Run, RunError
    from mapd_dspy.summary import summary_tables
    from mapd_dspy.tasks import TaskDataError

    if not args.verbose:
        # Per-call warnings (e.g. truncated responses) would flood the progress bars; every such
        # call is a failure record with its reason, counted in the summary. (After the imports:
        # importing dspy configures its loggers.)
        logging.getLogger("dspy").setLevel(logging.ERROR)
        logging.getLogger("LiteLLM").setLevel(logging.ERROR)
    _restrict_dspy_cache()

    started = time.monotonic()
    try:
        config = load_config(args.config, args.overrides, args.limit)
        if args.stage == "optimize":
            return _optimize(config, console, started)
        stages = STAGES if args.stage == "all" else (args.stage,)
        result = Run(config, console).execute(stages)
    except (ConfigError, TaskDataError, RunError, RecordFileError) as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        return 2
    except BudgetExhausted as exc:
        console.print(f"[bold yellow]stopped:[/] {exc}", highlight=False, soft_wrap=True)
        return EXIT_BUDGET
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: records written so far are kept; run the same command to resume")
        return 130
    except Exception as exc:  # noqa: BLE001 - a clear one-line failure beats a traceback for users
        from mapd_dspy.serving import ServerError
        from mapd_dspy.models import ModelError

        if not isinstance(exc, (ServerError, ModelError)):
            raise
        console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        return 1
    for table in summary_tables(result.summary) if result.summary else ():
        console.print(table)
    evals_path = config.run_dir / "evals.json"
    if "eval" in stages and evals_path.exists():
        for row in json.loads(evals_path.read_text()):
            accuracy = f"{row['accuracy']:.1%}" if row["accuracy"] is not None else "-"
            console.print(f"eval {row['label']} on {row['split']}: {accuracy} ({row['correct']}/{row['n']})")
    for stage in result.stages:
        console.print(f"[dim]{stage.name}: {stage.items} items, {stage.calls} LLM calls, {stage.seconds:.0f} s[/]")
    console.print(f"records and summary in {config.run_dir} (wall time {time.monotonic() - started:.0f} s)")
    return 0


def _optimize(config, console: Console, started: float) -> int:
    from mapd_dspy.engine import Run
    from mapd_dspy.programs.optimize import OPTIMIZE_REPORT, report_table

    report = Run(config, console).optimize()
    console.print(report_table(report))
    console.print(f"programs in {report['programs']}, report in {config.run_dir / OPTIMIZE_REPORT}; use them with "
                  f"--set programs.path={report['programs']} (wall time {time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
