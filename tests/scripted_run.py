"""Helpers for tests that run the real CLI against ``mapd_dspy.scripted_server`` (no vLLM, no network).

The scripted server plays the student (``student-r0``, attached through ``student.api_base``) and two
teachers (``openai/teacher-a``, ``openai/teacher-b`` with ``api_base``), so DSPy, LiteLLM and HTTP run
for real while the models cost nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

from mapd_dspy.programs.mapd import student_response_text
from mapd_dspy.records import RecordStore
from tests.conftest import REPO, SHARED_DATA

TEACHERS = ("teacher-a", "teacher-b")
KEY_ENV = "MAPD_TEST_TEACHER_KEY"
STUDENT_KEY_ENV = "MAPD_TEST_STUDENT_KEY"


def run_args(api_base: str, runs_dir: Path, *, name: str = "scripted", limit: int = 6, concurrency: int = 4,
             timeout_s: float = 5.0, num_retries: int = 0, teacher_bases: dict[str, str] | None = None,
             extra: list[str] = ()) -> list[str]:
    """CLI arguments for a run whose student and teachers are all served by the scripted server."""
    teacher_bases = teacher_bases or {}
    args = [
        "--limit", str(limit),
        "--set", f"runs_dir={runs_dir}", "--set", f"name={name}",
        "--set", f"task.data_dir={SHARED_DATA}",
        "--set", f"student.api_base={api_base}", "--set", f"student.api_key_env={STUDENT_KEY_ENV}",
        "--set", f"student.timeout_s={timeout_s}", "--set", f"student.num_retries={num_retries}",
        "--set", f"engine.concurrency={concurrency}",
    ]
    for index, teacher in enumerate(TEACHERS):
        args += [
            "--set", f"teachers.{index}.name={teacher}",
            "--set", f"teachers.{index}.model=openai/{teacher}",
            "--set", f"teachers.{index}.api_base={teacher_bases.get(teacher, api_base)}",
            "--set", f"teachers.{index}.api_key_env={KEY_ENV}",
            "--set", f"teachers.{index}.timeout_s={timeout_s}",
            "--set", f"teachers.{index}.num_retries={num_retries}",
        ]
    return args + list(extra)


def keys_env(monkeypatch=None, teacher_key: str = "sk-test-teacher", student_key: str = "sk-test-student") -> dict:
    """Set the API-key variables the run names (in this process via monkeypatch, and for children)."""
    values = {KEY_ENV: teacher_key, STUDENT_KEY_ENV: student_key}
    if monkeypatch is not None:
        for name, value in values.items():
            monkeypatch.setenv(name, value)
    return values


def cli(args: list[str], env: dict | None = None, **kwargs) -> subprocess.Popen:
    """Start ``python -m mapd_dspy.run ARGS`` as a child process (offline settings)."""
    child_env = os.environ | {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "HF_HUB_OFFLINE": "1"} | (env or {})
    return subprocess.Popen([sys.executable, "-m", "mapd_dspy.run", *args], cwd=REPO, env=child_env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kwargs)


def server_stats(api_base: str) -> dict:
    with urllib.request.urlopen(api_base.removesuffix("/v1") + "/stats", timeout=10) as response:
        return json.loads(response.read())


def records_of(run_dir: Path) -> RecordStore:
    return RecordStore(run_dir / "records.jsonl")


def record_lines(run_dir: Path) -> list[dict]:
    """Every line of records.jsonl (superseded ones too), parsed; a torn last line is skipped."""
    path = run_dir / "records.jsonl"
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def expected_keys(store: RecordStore, teachers=TEACHERS, review: bool = True) -> set[tuple]:
    """Every key a finished exam -> teach (-> review) run must hold, derived from the stored records."""
    keys = set()
    for exam in store.records("exam"):
        keys.add(exam.key)
        if exam.correct or student_response_text(exam) is None:
            continue  # nothing to teach (an exam lm_error is retried by the next exam run)
        for teacher in teachers:
            keys |= {(exam.example_id, "explain", teacher, ""), (exam.example_id, "rationale", teacher, "")}
            rationale = store.get((exam.example_id, "rationale", teacher, ""))
            if review and rationale is not None and rationale.ok:
                keys |= {(exam.example_id, "review", teacher, peer) for peer in teachers if peer != teacher}
    return keys
