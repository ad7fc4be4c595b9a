"""Measure the main job: wall time per stage and peak memory of the whole process tree.

    .venv/bin/python bench/main_job.py [-- extra run.py arguments]

Runs ``python -m mapd_dspy.run`` as a child process, samples the memory of it and all its
descendants (the vLLM server and the training process included) every 0.5 s, and prints one
JSON line. Peak RSS summed over processes counts shared pages once per process (an upper
bound); peak PSS shares them out, so it is the tree's real footprint.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

from mapd_dspy.serving import process_tree_pss_bytes, process_tree_rss_bytes


def main(extra_args: list[str]) -> dict:
    command = [sys.executable, "-m", "mapd_dspy.run", *extra_args]
    started = time.monotonic()
    process = subprocess.Popen(command)
    peak_rss = peak_pss = 0
    while process.poll() is None:
        try:
            peak_rss = max(peak_rss, process_tree_rss_bytes(process.pid))
            peak_pss = max(peak_pss, process_tree_pss_bytes(process.pid))
        except OSError:
            pass
        time.sleep(0.5)
    return {
        "command": " ".join(command[1:]),
        "exit_code": process.returncode,
        "wall_seconds": round(time.monotonic() - started, 1),
        "peak_rss_gib": round(peak_rss / 2**30, 2),
        "peak_pss_gib": round(peak_pss / 2**30, 2),
    }


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--"]:
        args = args[1:]
    print(json.dumps(main(args)))
