"""The run engine: turns a :class:`RunConfig` into stages over a task's questions.

Stages (each reads and writes ``runs/<name>/records.jsonl``):

* ``exam``   in: task questions                out: one ``exam`` record per question
* ``teach``  in: exam records that are wrong   out: ``explain`` + ``rationale`` records per teacher
* ``review`` in: rationale records             out: one ``review`` record per (author, other teacher)

After the stages, the acceptance gate is applied to the stored records (no LLM call) and
``decisions.jsonl`` and ``summary.json`` are rewritten. A stage only calls for keys it has no
record of, and the vLLM server is only started when some call is actually pending.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dspy
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from mapd_dspy.config import ConfigError, ModelConfig, RunConfig, StudentConfig
from mapd_dspy.programs import AcceptanceGate, Ledger, MAPDProgram, Role, StudentExam, bind, examine
from mapd_dspy.programs.mapd import student_response_text
from mapd_dspy.records import RecordStore, write_json, write_jsonl
from mapd_dspy.tasks import Example, Task, get_task

STAGES = ("exam", "teach", "review")
EMBEDDED_TEACHER_PREFIX = "embedded-"


class RunError(RuntimeError):
    """The run cannot go on (e.g. a stage's input is missing); the message says what to do."""


# --------------------------------------------------------------------------------------------
# Models


def _is_vllm_served(cfg: ModelConfig) -> bool:
    return cfg.model.startswith(("embedded:", "hosted_vllm/")) or isinstance(cfg, StudentConfig)


def make_lm(cfg: ModelConfig, model: str, api_base: str | None, cache: bool, rollout_id: int | None = None) -> dspy.LM:
    """A ``dspy.LM`` for ``cfg``; the API key is read from the named env var, never stored."""
    kwargs: dict[str, Any] = {}
    if cfg.api_key_env:
        kwargs["api_key"] = os.environ[cfg.api_key_env]
    elif model.startswith("hosted_vllm/"):
        kwargs["api_key"] = "EMPTY"  # vLLM needs no key, but the OpenAI client insists on one
    if api_base:
        kwargs["api_base"] = api_base
    if rollout_id is not None and cfg.temperature > 0:
        # Distinct cache entries for teachers that share a model: otherwise two embedded
        # teachers would get the very same cached rationale.
        kwargs["rollout_id"] = rollout_id
    return dspy.LM(
        model,
        temperature=cfg.temperature,
        max_tokens=cfg.max_tokens,
        cache=cache,
        num_retries=cfg.num_retries,
        timeout=cfg.timeout_s,
        **kwargs,
    )


def make_role(name: str, cfg: ModelConfig, model: str, api_base: str | None, cache: bool, rollout_id=None) -> Role:
    served_locally = _is_vllm_served(cfg)
    adapter_name = cfg.adapter if cfg.adapter != "auto" else ("json" if served_locally else "chat")
    adapter = dspy.JSONAdapter() if adapter_name == "json" else None
    structured = cfg.structured_outputs if cfg.structured_outputs is not None else served_locally
    lm = make_lm(cfg, model, api_base, cache, rollout_id)
    return Role(name=name, lm=lm, adapter=adapter, structured_outputs=structured)


def check_environment(config: RunConfig) -> None:
    """Fail before writing anything if a named API-key variable is missing or a teacher is unservable."""
    models = [("student", config.student)] + [(f"teachers.{i}", t) for i, t in enumerate(config.teachers)]
    for where, cfg in models:
        if cfg.api_key_env and not os.environ.get(cfg.api_key_env):
            raise ConfigError(f"{where}.api_key_env: environment variable {cfg.api_key_env} is not set")
        if where != "student" and cfg.is_embedded and cfg.model != config.student.model:
            raise ConfigError(
                f"{where}.model: embedded teachers are served by the student's vLLM server, so they must use the "
                f"student's model ({config.student.model}); serve other local models yourself and use hosted_vllm/NAME"
            )
        if where != "student" and cfg.is_embedded and config.student.api_base:
            raise ConfigError(
                f"{where}.model: embedded teachers need the run's own vLLM server, but student.api_base attaches to "
                "an external one; give the teacher as hosted_vllm/NAME with api_base instead"
            )


class ModelPool:
    """Builds the roles, starting (or attaching to) the student's vLLM server on first need."""

    def __init__(self, config: RunConfig, console: Console, stack: contextlib.ExitStack):
        self.config = config
        self.console = console
        self.stack = stack
        self._api_base: str | None = None
        self._roles: dict[str, Role] = {}

    @property
    def embedded_teacher_name(self) -> str:
        return EMBEDDED_TEACHER_PREFIX + self.config.student.model.removeprefix("embedded:").replace("/", "-")

    def api_base(self) -> str:
        if self._api_base is None:
            self._api_base = self._start_or_attach()
        return self._api_base

    def _start_or_attach(self) -> str:
        from mapd_dspy.serving import VLLMServer, attach  # vLLM is only imported in the server process

        student = self.config.student
        if student.api_base:
            return attach(student.api_base, student.served_name)
        from mapd_dspy.models import resolve_model

        server_cfg = self.config.server
        with self.console.status("Preparing the student model ..."):
            model_path = resolve_model(student.model)
        log_path = self.config.run_dir / "vllm.log"
        server = VLLMServer(
            model_path,
            [student.served_name, self.embedded_teacher_name],
            port=server_cfg.port or None,
            max_model_len=server_cfg.max_model_len,
            enforce_eager=server_cfg.enforce_eager,
            kv_cache_gib=server_cfg.kv_cache_gib,
            extra_args=server_cfg.extra_args,
            startup_timeout_s=server_cfg.startup_timeout_s,
            log_path=log_path,
        )
        with self.console.status(f"Starting vLLM for {student.model} (log: {log_path}) ..."):
            self.stack.enter_context(server)
        self.console.print(f"vLLM serving [bold]{student.served_name}[/] at {server.api_base} "
                           f"(ready in {server.startup_seconds:.0f} s)")
        return server.api_base

    def student(self) -> Role:
        """The student is always vLLM-served: by the run's own server, or the one at ``api_base``."""
        if "student" not in self._roles:
            cfg = self.config.student
            model = f"hosted_vllm/{cfg.served_name}"
            self._roles["student"] = make_role("student", cfg, model, self.api_base(), self.config.engine.cache)
        return self._roles["student"]

    def teachers(self) -> dict[str, Role]:
        roles = {}
        for index, cfg in enumerate(self.config.teachers, start=1):
            if cfg.name not in self._roles:
                if cfg.is_embedded:
                    model, api_base = f"hosted_vllm/{self.embedded_teacher_name}", self.api_base()
                else:
                    model, api_base = cfg.model, cfg.api_base
                cache = self.config.engine.cache
                self._roles[cfg.name] = make_role(cfg.name, cfg, model, api_base, cache, rollout_id=index)
            roles[cfg.name] = self._roles[cfg.name]
        return roles


# --------------------------------------------------------------------------------------------
# The run


@dataclass
class StageResult:
    name: str
    items: int = 0
    calls: int = 0
    seconds: float = 0.0


@dataclass
class RunResult:
    config: RunConfig
    summary: dict[str, Any]
    stages: list[StageResult] = field(default_factory=list)


class Run:
    def __init__(self, config: RunConfig, console: Console | None = None):
        self.config = config
        self.console = console or Console(stderr=True)
        self.task: Task = get_task(config.task.name)
        self.gate = AcceptanceGate(
            threshold=config.review.threshold,
            rule=config.review.threshold_rule,
            require_correct_answer=config.review.require_correct_answer,
        )

    def load_examples(self) -> list[Example]:
        cfg = self.config.task
        examples = self.task.load(cfg.split, source=cfg.source, data_dir=cfg.data_dir)
        return examples[: cfg.limit] if cfg.limit else examples

    def execute(self, stages: Iterable[str] = STAGES) -> RunResult:
        stages = [s for s in STAGES if s in set(stages)]
        check_environment(self.config)
        examples = self.load_examples()  # bad data fails here, before the run folder is touched
        run_dir = self.config.run_dir
        if "exam" not in stages and not (run_dir / "records.jsonl").exists():
            raise RunError(f"no exam records in {run_dir}: run `--stage exam` first")
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / "config.json", self.config.public_dump())
        store = RecordStore(run_dir / "records.jsonl")
        ledger = Ledger(store, retry_failed=self.config.engine.retry_failed)
        results = []
        with contextlib.ExitStack() as stack:
            pool = ModelPool(self.config, self.console, stack)
            for stage in stages:
                results.append(self._run_stage(stage, examples, ledger, pool))
        summary = self.finish(examples, ledger)
        return RunResult(self.config, summary, results)

    # -- stages ----------------------------------------------------------------------------

    def _run_stage(self, stage: str, examples: list[Example], ledger: Ledger, pool: ModelPool) -> StageResult:
        if stage == "exam":
            pending = [ex for ex in examples if ledger.done((ex.id, "exam", "", "")) is None]
            work = lambda ex: examine(self.task, ex, role, ledger, module)  # noqa: E731
            role = pool.student() if pending else None
            module = bind(StudentExam(), role) if role else None
        else:
            mistakes = self.mistakes(examples, ledger, require_exam=True)
            pending = [pair for pair in mistakes if self._has_pending_calls(stage, pair[0], ledger)]
            program = self._program(ledger, pool) if pending else None
            work = lambda pair: program(example=pair[0], student_response=pair[1], stages=(stage,))  # noqa: E731
        return self._map(stage, pending, work, ledger)

    def _program(self, ledger: Ledger, pool: ModelPool | None) -> MAPDProgram:
        review = self.config.review
        roles = pool.teachers() if pool is not None else self._offline_roles()
        return MAPDProgram(
            self.task,
            roles,
            gate=self.gate,
            scale=(review.scale_min, review.scale_max),
            ledger=ledger,
            retry=review.retry,
            retry_attempts=review.retry_attempts,
        )

    def _offline_roles(self) -> dict[str, Role]:
        # Gate-only passes read records and never call: a placeholder LM that refuses to run.
        return {t.name: Role(t.name, _NoCallsLM(t.model)) for t in self.config.teachers}

    def mistakes(self, examples: list[Example], ledger: Ledger, require_exam: bool = False):
        """(example, student response text) for every question the student got wrong."""
        exam_records = [ledger.store.get((ex.id, "exam", "", "")) for ex in examples]
        if require_exam and not any(exam_records):
            raise RunError(f"no exam records in {self.config.run_dir}: run `--stage exam` first")
        pairs = []
        for example, record in zip(examples, exam_records):
            if record is None or record.correct:
                continue
            response = student_response_text(record)
            if response is not None:
                pairs.append((example, response))
        return pairs

    def _has_pending_calls(self, stage: str, example: Example, ledger: Ledger) -> bool:
        names = [t.name for t in self.config.teachers]
        if stage == "teach":
            keys = [(example.id, kind, t, "") for t in names for kind in ("explain", "rationale")]
            return any(ledger.done(key) is None for key in keys)
        for author in names:
            rationale = ledger.store.get((example.id, "rationale", author, ""))
            if rationale is None or not rationale.ok:
                continue
            if any(ledger.done((example.id, "review", author, peer)) is None for peer in names if peer != author):
                return True
        return False

    def _map(self, stage: str, items: list, work: Callable, ledger: Ledger) -> StageResult:
        """Run ``work`` over ``items`` with the configured concurrency and a progress bar."""
        started, calls_before = time.monotonic(), ledger.calls_made
        if items:
            with _progress(self.console) as progress, ThreadPoolExecutor(self.config.engine.concurrency) as pool:
                bar = progress.add_task(stage, total=len(items))
                futures = [pool.submit(work, item) for item in items]
                try:
                    for future in as_completed(futures):
                        future.result()
                        progress.advance(bar)
                except BaseException:
                    # Ctrl-C or a bug: drop queued work; records already written stay valid.
                    for future in futures:
                        future.cancel()
                    raise
        else:
            self.console.print(f"[dim]{stage}: nothing to do (all records present)[/]")
        return StageResult(stage, len(items), ledger.calls_made - calls_before, round(time.monotonic() - started, 1))

    # -- gate and summary --------------------------------------------------------------------

    def finish(self, examples: list[Example], ledger: Ledger) -> dict[str, Any]:
        """Apply the gate to stored records and rewrite the derived files (no LLM call)."""
        from mapd_dspy.summary import summarize

        program = self._program(ledger, pool=None)
        decisions = []
        for example, response in self.mistakes(examples, ledger):
            decisions.extend(program(example=example, student_response=response, stages=()).decisions)
        run_dir = self.config.run_dir
        write_jsonl(run_dir / "decisions.jsonl", [d.__dict__ for d in decisions])
        summary = summarize(self.config, examples, ledger.store, decisions, self.gate)
        write_json(run_dir / "summary.json", summary)
        return summary


class _NoCallsLM(dspy.BaseLM):
    """Stands in for a teacher's LM when only stored records may be read; any call is a bug."""

    def __init__(self, model: str):
        super().__init__(model=model)

    def forward(self, *args, **kwargs):
        raise RuntimeError("no LLM call is allowed in a records-only pass")


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description:<7}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )
