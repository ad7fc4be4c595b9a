"""Measure the main job: wall time per stage and peak memory of the whole process tree.

    .venv/bin/python bench/main_job.py [-- extra run.py arguments]

Runs ``python -m mapd_dspy.run`` as a child process, samples the resident memory of it and
all its descendants (the vLLM server included) every 0.25 s, and prints one JSON line.
Peak RSS summed over processes overcounts shared pages a little; it is an upper bound.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

from mapd_dspy.serving import process_tree_rss_bytes


def main(extra_args: list[str]) -> dict:
    command = [sys.executable, "-m", "mapd_dspy.run", *extra_args]
    started = time.monotonic()
    process = subprocess.Popen(command)
    peak = 0
    while process.poll() is None:
        try:
            peak = max(peak, process_tree_rss_bytes(process.pid))
        except OSError:
            pass
        time.sleep(0.25)
    return {
        "command": " ".join(command[1:]),
        "exit_code": process.returncode,
        "wall_seconds": round(time.monotonic() - started, 1),
        "peak_rss_gib": round(peak / 2**30, 2),
    }


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--"]:
        args = args[1:]
    print(json.dumps(main(args)))
