"""Throughput benchmarks of the run engine against the scripted server (no real model).

``python -m mapd_dspy.bench committee [--mistakes N --teachers T --latency-ms L --concurrency C]``
runs the real committee stage (the engine's teach+review pass: the real DSPy program, ``dspy.LM``
over HTTP, records appended to a real ``records.jsonl``) against
:mod:`mapd_dspy.scripted_server`, started as a subprocess so it does not share our GIL, with a
fixed latency per request. The student (always wrong) is examined first, untimed, to give N
mistakes. Then the same committee stage runs again into a fresh run folder with
``engine.concurrency = 1``: the sequential baseline, one call at a time as the reference code
makes them. It prints one JSON line::

    {"bench": "committee", "mistakes", "teachers", "latency_ms", "concurrency", "calls",
     "http_requests", "wall_s", "sequential_s", "limit_s", "speedup_vs_sequential",
     "fraction_of_limit", "max_in_flight"}

``limit_s`` is the critical-path bound ``max(2 * L, calls * L / C)`` (a rationale, then its
review; or the calls spread over C slots) and ``fraction_of_limit`` is ``limit_s / wall_s``.
DSPy's disk cache is off (``engine.cache = false``), so every call goes over HTTP.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from rich.console import Console  # noqa: E402 - after the offline switch above

from mapd_dspy.config import RunConfig  # noqa: E402


@contextmanager
def scripted_server(latency_ms: float, seed: int = 0) -> Iterator[str]:
    """Run the scripted server in a subprocess; yield its api_base once it is READY."""
    command = [sys.executable, "-m", "mapd_dspy.scripted_server", "--port", "0",
               "--latency-ms", str(latency_ms), "--seed", str(seed)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline().strip()
        if not line.startswith("READY "):
            raise RuntimeError(f"scripted server did not start (said {line!r})")
        yield line.removeprefix("READY ")
    finally:
        process.terminate()
        process.wait(timeout=10)


def server_stats(api_base: str) -> dict:
    import httpx

    return httpx.get(api_base.removesuffix("/v1") + "/stats", timeout=30).json()


def reset_server(api_base: str) -> None:
    import httpx

    httpx.post(api_base.removesuffix("/v1") + "/reset", timeout=30)


def bench_config(runs_dir: Path, name: str, api_base: str, mistakes: int, teachers: int, concurrency: int) -> RunConfig:
    """SVAMP's first N questions, the scripted student and T scripted teachers, no DSPy cache."""
    return RunConfig.model_validate({
        "name": name,
        "runs_dir": str(runs_dir),
        "task": {"name": "svamp", "limit": mistakes},
        "student": {"api_base": api_base, "served_name": "student-r0"},
        "teachers": [
            {"name": f"teacher-{i}", "model": f"hosted_vllm/teacher-{i}", "api_base": api_base}
            for i in range(1, teachers + 1)
        ],
        "engine": {"concurrency": concurrency, "cache": False},
    })


def run_stages(config: RunConfig, stages: list[str], timings: dict[str, float] | None = None):
    """Run the engine's stages quietly; ``timings`` receives each LLM stage's wall seconds, unrounded."""
    from mapd_dspy.engine import Run

    class TimedRun(Run):
        def _run_stage(self, stage, *args):
            started = time.perf_counter()
            result = super()._run_stage(stage, *args)
            if timings is not None:
                timings[stage] = time.perf_counter() - started
            return result

    return TimedRun(config, console=Console(quiet=True)).execute(stages)


def timed_committee(config: RunConfig) -> tuple[float, int]:
    """Wall seconds and LLM calls of the engine's teach+review stage."""
    timings: dict[str, float] = {}
    result = run_stages(config, ["teach", "review"], timings)
    committee = [stage for stage in result.stages if stage.name == "teach+review"]
    if not committee or not committee[0].calls:
        raise RuntimeError(f"the committee stage made no calls: {result.stages}")
    return timings["teach+review"], committee[0].calls


def bench_committee(mistakes: int, teachers: int, latency_ms: float, concurrency: int,
                    sequential: bool = True, workdir: Path | None = None) -> dict:
    runs_dir = Path(workdir or tempfile.mkdtemp(prefix="mapd-bench-"))
    try:
        with scripted_server(latency_ms) as api_base:
            config = bench_config(runs_dir, "concurrent", api_base, mistakes, teachers, concurrency)
            run_stages(config, ["exam"])  # untimed: gives the N mistakes to teach
            reset_server(api_base)
            wall_s, calls = timed_committee(config)
            stats = server_stats(api_base)
            sequential_s = None
            if sequential:
                baseline = bench_config(runs_dir, "sequential", api_base, mistakes, teachers, 1)
                baseline.run_dir.mkdir(parents=True)
                shutil.copy(config.run_dir / "records.jsonl", baseline.run_dir / "records.jsonl")
                # Only the exam records are kept: the baseline makes every committee call again.
                _keep_only_exam_records(baseline.run_dir / "records.jsonl")
                sequential_s, _ = timed_committee(baseline)
    finally:
        if workdir is None:
            shutil.rmtree(runs_dir, ignore_errors=True)
    return summarize(mistakes, teachers, latency_ms, concurrency, calls, stats, wall_s, sequential_s)


def _keep_only_exam_records(path: Path) -> None:
    lines = [line for line in path.read_text().splitlines() if json.loads(line)["stage"] == "exam"]
    path.write_text("\n".join(lines) + "\n")


def summarize(mistakes, teachers, latency_ms, concurrency, calls, stats, wall_s, sequential_s) -> dict:
    latency_s = latency_ms / 1000
    limit_s = max(2 * latency_s, calls * latency_s / concurrency)
    return {
        "bench": "committee",
        "mistakes": mistakes,
        "teachers": teachers,
        "latency_ms": latency_ms,
        "concurrency": concurrency,
        "calls": calls,
        "http_requests": stats["total"],
        "wall_s": round(wall_s, 3),
        "sequential_s": None if sequential_s is None else round(sequential_s, 3),
        "limit_s": round(limit_s, 2),
        "speedup_vs_sequential": None if sequential_s is None else round(sequential_s / wall_s, 2),
        "fraction_of_limit": round(limit_s / wall_s, 3),
        "max_in_flight": stats["max_in_flight"],
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m mapd_dspy.bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="bench", required=True)
    committee = sub.add_parser("committee", help="teach+review throughput against the scripted server")
    committee.add_argument("--mistakes", type=int, default=100, help="N student mistakes to teach")
    committee.add_argument("--teachers", type=int, default=3, help="T teachers (each reviewed by the T-1 others)")
    committee.add_argument("--latency-ms", type=float, default=200.0, help="L: the server's latency per request")
    committee.add_argument("--concurrency", type=int, default=32, help="C: engine.concurrency (calls in flight)")
    committee.add_argument("--no-sequential", action="store_true", help="skip the sequential baseline run")
    committee.add_argument("--workdir", type=Path, help="keep the run folders here (default: a temp dir, removed)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = bench_committee(args.mistakes, args.teachers, args.latency_ms, args.concurrency,
                             sequential=not args.no_sequential, workdir=args.workdir)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
