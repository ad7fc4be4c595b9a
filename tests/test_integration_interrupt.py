"""Ctrl-C / SIGTERM in the middle of a real run: the vLLM server is stopped, records stay valid."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mapd_dspy.records import RecordStore

pytestmark = pytest.mark.integration


def vllm_server_pids() -> set[int]:
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"vllm.entrypoints.openai.api_server" in cmdline:
                pids.add(int(entry.name))
    return pids


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_run_stops_its_server_and_keeps_records(tmp_path, shared_data, embedded_student_dir, signum):
    before = vllm_server_pids()
    command = [
        sys.executable, "-m", "mapd_dspy.run", "--limit", "40",
        "--set", f"runs_dir={tmp_path}", "--set", f"task.data_dir={shared_data}",
        "--set", "engine.cache=false", "--set", "server.kv_cache_gib=1",
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    records = tmp_path / "default" / "records.jsonl"
    deadline = time.monotonic() + 300
    while not (records.exists() and records.stat().st_size > 0):
        assert process.poll() is None, process.stdout.read().decode()[-2000:]
        assert time.monotonic() < deadline, "no record written within 300 s"
        time.sleep(0.5)
    assert vllm_server_pids() - before, "the run's vLLM server should be up while it writes records"
    process.send_signal(signum)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 130, output.decode()[-2000:]
    assert b"run the same command to resume" in output
    time.sleep(1)
    assert vllm_server_pids() - before == set()
    store = RecordStore(records)  # whatever was written is complete, loadable records
    assert 0 < len(store) < 40 and all(r.stage == "exam" for r in store.records())
