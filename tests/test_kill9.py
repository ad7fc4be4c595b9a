"""Never pay twice: SIGKILL a real run mid-stage, run the same command again, count the server's calls.

The scripted server (a separate process, like a real provider) plays the student and both teachers,
so the run goes through DSPy, LiteLLM and HTTP for real; no vLLM is needed. DSPy's response cache is
off, so only the run's records stand between a re-run and paying again.
"""

import signal
import subprocess
import sys
import time

import pytest

from mapd_dspy.run import main
from tests.conftest import REPO
from tests.scripted_run import cli, expected_keys, keys_env, record_lines, records_of, run_args, server_stats

CONCURRENCY = 4
LIMIT = 16
TEACH_KINDS = ("explain", "rationale")


@pytest.fixture
def scripted_server_process():
    """``python -m mapd_dspy.scripted_server`` with 150 ms per call; yields its api_base."""
    command = [sys.executable, "-m", "mapd_dspy.scripted_server", "--port", "0", "--latency-ms", "150", "--seed", "0"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        assert line.startswith("READY "), f"scripted server did not start: {line!r} {process.stderr.read()[-2000:]}"
        yield line.split()[1]
    finally:
        process.terminate()
        process.wait(timeout=10)


def teach_requests(api_base: str) -> int:
    by_kind = server_stats(api_base)["by_kind"]
    return sum(by_kind.get(kind, 0) for kind in TEACH_KINDS)


def finish(process: subprocess.Popen, timeout: float = 120) -> str:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output.decode()[-3000:]
    return output.decode()


def test_sigkill_mid_teach_then_rerun_loses_nothing_and_repeats_at_most_concurrency(
    scripted_server_process, tmp_path, capsys, monkeypatch
):
    api_base = scripted_server_process
    env = keys_env() | {"DSPY_CACHEDIR": str(tmp_path / "dspy_cache")}
    base = run_args(api_base, tmp_path / "runs", name="kill9", limit=LIMIT, concurrency=CONCURRENCY,
                    extra=["--set", "engine.cache=false"])
    run_dir = tmp_path / "runs" / "kill9"
    monkeypatch.setenv("DSPY_CACHEDIR", env["DSPY_CACHEDIR"])
    for name, value in keys_env(monkeypatch).items():
        assert env[name] == value
    assert main([*base, "--stage", "exam"]) == 0  # in process: only the killed run needs to be a child
    assert len(records_of(run_dir).records("exam")) == LIMIT

    # Kill -9 once some teach records are on disk (and calls are in flight).
    teach = [*base, "--stage", "teach"]
    process = cli(teach, env)
    deadline = time.monotonic() + 120
    while sum(1 for row in record_lines(run_dir) if row["stage"] in TEACH_KINDS) < 8:
        assert process.poll() is None, "the run ended before it could be killed: " + process.stdout.read().decode()[-2000:]
        assert time.monotonic() < deadline, "no teach records within 120 s"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    killed_records = sum(1 for row in record_lines(run_dir) if row["stage"] in TEACH_KINDS)
    killed_calls = teach_requests(api_base)
    assert killed_records < 4 * LIMIT, "the run finished before the kill: make it slower"

    # The same command again finishes the stage.
    finish(cli(teach, env))
    store = records_of(run_dir)
    wanted = expected_keys(store, review=False)
    assert len(wanted) == LIMIT + 4 * LIMIT  # every exam a mistake; 2 teachers x (explain + rationale)
    assert {key for key in wanted if store.get(key) is None} == set(), "a record was lost"
    assert all(store.get(key).ok for key in wanted)
    lines = [row for row in record_lines(run_dir) if row["stage"] in TEACH_KINDS]
    assert len(lines) == len({(r["example_id"], r["stage"], r["teacher"], r["reviewer"]) for r in lines}) == 4 * LIMIT
    calls = teach_requests(api_base)
    repeated = calls - len(lines)
    with capsys.disabled():
        print(f"\n[kill -9] killed after {killed_records} teach records / {killed_calls} teach calls; "
              f"finished with {calls} teach calls for {len(lines)} records: {repeated} repeated "
              f"(concurrency {CONCURRENCY})")
    assert 0 <= repeated <= CONCURRENCY

    # A third run pays nothing: the server sees no request at all.
    total_before = server_stats(api_base)["total"]
    capsys.readouterr()
    assert main(teach) == 0
    assert server_stats(api_base)["total"] == total_before
    assert "nothing to do" in capsys.readouterr().err
