"""The run engine: turns a :class:`RunConfig` into stages over a task's questions.

Stages (each reads and writes ``runs/<name>/records.jsonl``):

* ``exam``   in: task questions                out: one ``exam`` record per question
* ``teach``  in: exam records that are wrong   out: ``explain`` + ``rationale`` records per teacher
* ``review`` in: rationale records             out: one ``review`` record per (author, other teacher)

Asked for together (``--stage all``), teach and review run as one pass, ``teach+review``: the calls of
all questions share one pool of ``engine.concurrency`` threads, and a rationale's reviews start as
soon as its record is stored. Per-model limits (``max_concurrency``, ``rpm``, ``tpm``) come on top.

After the stages, the acceptance gate is applied to the stored records (no LLM call) and
``decisions.jsonl`` and ``summary.json`` are rewritten. A stage only calls for keys it has no
record of, and the vLLM server is only started when some call is actually pending.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dspy
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from mapd_dspy.config import ConfigError, ModelConfig, RunConfig, StudentConfig, TeacherConfig
from mapd_dspy.costs import Budget, BudgetExhausted, run_records_files
from mapd_dspy.dspy_speedups import memoize_model_metadata, io_bound_stage
from mapd_dspy.limits import ProviderLimiter
from mapd_dspy.programs import AcceptanceGate, Ledger, MAPDProgram, Role, StudentExam, bind, examine
from mapd_dspy.programs.mapd import student_response_text
from mapd_dspy.records import RecordStore, write_json, write_jsonl
from mapd_dspy.tasks import Example, Task, get_task

STAGES = ("exam", "teach", "review", "compile", "train", "eval", "report")
EMBEDDED_TEACHER_PREFIX = "embedded-"


class RunError(RuntimeError):
    """The run cannot go on (e.g. a stage's input is missing); the message says what to do."""


# --------------------------------------------------------------------------------------------
# Models


def _is_vllm_served(cfg: ModelConfig) -> bool:
    return cfg.model.startswith(("embedded:", "hosted_vllm/")) or isinstance(cfg, StudentConfig)


def make_lm(cfg: ModelConfig, model: str, api_base: str | None, cache: bool, rollout_id: int | None = None) -> dspy.LM:
    """A ``dspy.LM`` for ``cfg``; the API key is read from the named env var, never stored."""
    memoize_model_metadata()  # DSPy's per-call metadata scan is most of its CPU cost for served models
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
    limiter = ProviderLimiter.from_config(cfg)
    return Role(name=name, lm=lm, adapter=adapter, structured_outputs=structured, limiter=limiter)


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
    """Builds the roles, starting (or attaching to) the student's vLLM server on first need.

    Fine-tuned students are LoRA adapters served by the same server under versioned names
    (``student-r1``, ...): a managed server is restarted with them, an attached one loads them at
    run time (it needs ``--enable-lora`` and ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=true``).
    """

    def __init__(self, config: RunConfig, console: Console, stack: contextlib.ExitStack):
        self.config = config
        self.console = console
        self.stack = stack
        self.adapters: dict[str, str] = {}
        self._server = None
        self._api_base: str | None = None
        self._roles: dict[str, Role] = {}

    @property
    def embedded_teacher_name(self) -> str:
        return EMBEDDED_TEACHER_PREFIX + self.config.student.model.removeprefix("embedded:").replace("/", "-")

    def api_base(self) -> str:
        if self._api_base is None:
            self._api_base = self._start_or_attach()
        return self._api_base

    def serve_adapters(self, adapters: dict[str, str]) -> None:
        """Make these LoRA adapters (served name -> folder) available to ``student(name)``."""
        new = {name: path for name, path in adapters.items() if self.adapters.get(name) != path}
        if not new:
            return
        self.adapters.update(new)
        if self._api_base is None:
            return  # the server starts with them when first needed
        if self.config.student.api_base:
            from mapd_dspy.serving import load_lora_adapter

            for name, path in new.items():
                load_lora_adapter(self._api_base, name, path)
        else:
            self.pause()  # restarted with the adapters on next use

    def pause(self) -> None:
        """Stop a managed server (e.g. to give training the CPU and memory); it restarts on next use."""
        if self._server is not None:
            self._server.stop()
            self._server, self._api_base = None, None
            self._roles.clear()  # roles point at the old port

    def _start_or_attach(self) -> str:
        from mapd_dspy.serving import VLLMServer, attach, load_lora_adapter

        student = self.config.student
        if student.api_base:
            api_base = attach(student.api_base, student.served_name)
            for name, path in self.adapters.items():
                load_lora_adapter(api_base, name, path)
            return api_base
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
            lora_modules=self.adapters or None,
            max_lora_rank=max(16, self.config.train.lora_rank),
            extra_args=server_cfg.extra_args,
            startup_timeout_s=server_cfg.startup_timeout_s,
            log_path=log_path,
        )
        with self.console.status(f"Starting vLLM for {student.model} (log: {log_path}) ..."):
            self._server = self.stack.enter_context(server)
        names = ", ".join([student.served_name, *self.adapters])
        self.console.print(f"vLLM serving [bold]{names}[/] at {server.api_base} (ready in {server.startup_seconds:.0f} s)")
        return server.api_base

    def student(self, served_name: str | None = None) -> Role:
        """The student (or a fine-tuned student, by served name), always vLLM-served."""
        cfg = self.config.student
        served_name = served_name or cfg.served_name
        key = f"student:{served_name}"
        if key not in self._roles:
            if served_name != cfg.served_name and served_name not in self.adapters:
                raise RunError(f"no fine-tuned student {served_name!r}: run `--stage train` first")
            api_base = self.api_base()
            self._roles[key] = make_role(served_name, cfg, f"hosted_vllm/{served_name}", api_base, self.config.engine.cache)
        return self._roles[key]

    def teachers(self, configs: list[TeacherConfig]) -> dict[str, Role]:
        roles = {}
        for index, cfg in enumerate(configs, start=1):
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
    """One MAPD run: ``rounds`` x (exam -> teach -> review -> compile -> train), then eval and report.

    Round 1 lives in ``runs/<name>/``, round k in ``runs/<name>/round-k/``; the adapter trained
    in round k is ``runs/<name>/adapter-rk`` and is served as ``student-rk``. Evaluation records
    (stage ``eval``, keyed by served name) go to the round-1 records file.
    """

    def __init__(self, config: RunConfig, console: Console | None = None):
        self.config = config
        self.console = console or Console(stderr=True)
        self.task: Task = get_task(config.task.name)
        baseline = config.baseline
        self.teacher_configs = config.teachers[:1] if baseline == "single_teacher" else list(config.teachers)
        self.gate = AcceptanceGate(
            threshold=config.review.threshold,
            rule=config.review.threshold_rule,
            require_correct_answer=config.review.require_correct_answer,
            peer_review=baseline == "mapd",
        )
        self.timings: dict[str, float] = {}
        self.budget: Budget | None = None

    # -- layout -----------------------------------------------------------------------------

    def served_name(self, round_index: int) -> str:
        """``student-r0`` is the base student; ``student-rk`` the one fine-tuned in round k."""
        base = self.config.student.served_name
        return base if round_index == 0 else f"{base.removesuffix('-r0')}-r{round_index}"

    def round_dir(self, round_index: int) -> Path:
        run_dir = self.config.run_dir
        return run_dir if round_index == 1 else run_dir / f"round-{round_index}"

    def adapter_dir(self, round_index: int) -> Path:
        return self.config.run_dir / f"adapter-r{round_index}"

    def trained_rounds(self) -> list[int]:
        return [k for k in range(1, self.config.rounds + 1) if (self.adapter_dir(k) / "training_config.json").exists()]

    def load_examples(self, split: str | None = None, limit: int | None = -1) -> list[Example]:
        cfg = self.config.task
        examples = self.task.load(split or cfg.split, source=cfg.source, data_dir=cfg.data_dir)
        limit = cfg.limit if limit == -1 else limit
        return examples[:limit] if limit else examples

    # -- the run ----------------------------------------------------------------------------

    def execute(self, stages: Iterable[str] = STAGES) -> RunResult:
        stages = [s for s in STAGES if s in set(stages)]
        check_environment(self.config)
        self._check_programs()
        # Bad data fails here, before the run folder is touched.
        examples = self.load_examples()
        eval_examples = self.load_examples(self.config.eval.split, self.config.eval.limit) if "eval" in stages else []
        run_dir = self.config.run_dir
        self.budget = Budget.for_run(self.config)  # reads past spending; writes nothing
        for records_file in run_records_files(run_dir):
            if records_file.exists():
                RecordStore(records_file)  # a damaged records file fails here, before anything is written
        needs_exam = {"teach", "review", "compile"} & set(stages) and self.config.baseline != "none"
        if needs_exam and "exam" not in stages and not (run_dir / "records.jsonl").exists():
            raise RunError(f"no exam records in {run_dir}: run `--stage exam` first")
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / "config.json", self.config.public_dump())
        results: list[StageResult] = []
        summary: dict[str, Any] = {}
        with contextlib.ExitStack() as stack:
            pool = ModelPool(self.config, self.console, stack)
            pool.serve_adapters({self.served_name(k): str(self.adapter_dir(k)) for k in self.trained_rounds()})
            if self.config.baseline != "none":
                for round_index in range(1, self.config.rounds + 1):
                    round_summary = self._round(round_index, stages, examples, pool, results)
                    summary = summary or round_summary
            if "eval" in stages:
                results.extend(self._evaluate(eval_examples, pool))
        self._record_timings(results)
        if "report" in stages:
            from mapd_dspy.report import build_report

            build_report(run_dir)
        return RunResult(self.config, summary, results)

    def _round(self, k: int, stages: list[str], examples: list[Example], pool: ModelPool, results: list) -> dict:
        round_dir = self.round_dir(k)
        round_dir.mkdir(parents=True, exist_ok=True)
        ledger = Ledger(RecordStore(round_dir / "records.jsonl"), retry_failed=self.config.engine.retry_failed,
                        budget=self.budget)
        try:
            for stage in self._llm_stages(stages):
                results.append(self._run_stage(stage, examples, ledger, pool, k))
        except BudgetExhausted:
            if ledger.store.records("exam"):
                self.finish(examples, ledger, round_dir)  # summary.json shows what was done and spent
            raise
        if not ledger.store.records("exam"):
            return {}
        summary = self.finish(examples, ledger, round_dir)
        if "compile" in stages:
            results.append(self._compile(k, examples, ledger))
        if "train" in stages:
            results.append(self._train(k, pool))
        return summary

    # -- LLM stages -------------------------------------------------------------------------

    def _llm_stages(self, stages: list[str]) -> list[str]:
        """exam, teach, review; teach and review asked for together run as one pass, ``teach+review``,
        so each rationale's reviews start as soon as it exists rather than after all teaching."""
        wanted = [s for s in ("exam", "teach", "review") if s in stages and (s != "review" or self.gate.peer_review)]
        if "teach" in wanted and "review" in wanted:
            wanted = [s for s in wanted if s not in ("teach", "review")] + ["teach+review"]
        return wanted

    def _run_stage(self, stage: str, examples: list[Example], ledger: Ledger, pool: ModelPool, k: int) -> StageResult:
        label = stage if k == 1 else f"{stage} r{k}"
        if stage == "exam":
            return self._run_exam(label, examples, ledger, pool, k)
        # "teach+review": both in one pass per question
        return self._run_committee(label, tuple(stage.split("+")), examples, ledger, pool)

    def _run_exam(self, label: str, examples: list[Example], ledger: Ledger, pool: ModelPool, k: int) -> StageResult:
        pending = [ex for ex in examples if ledger.done((ex.id, "exam", "", "")) is None]
        self._check_budget(pending)
        role = pool.student(self.served_name(k - 1)) if pending else None
        module = bind(StudentExam(), role) if role else None

        def work(example):
            return examine(self.task, example, role, ledger, module)

        return self._map(label, pending, work, ledger)

    def _run_committee(self, label: str, stages: tuple[str, ...], examples: list[Example], ledger: Ledger,
                       pool: ModelPool) -> StageResult:
        mistakes = self.mistakes(examples, ledger, require_exam=True)
        pending = [pair for pair in mistakes if any(self._has_pending_calls(s, pair[0], ledger) for s in stages)]
        self._check_budget(pending)
        # Questions run engine.concurrency at a time; their calls share one pool of that size, which
        # caps the calls in flight (per-model limits come on top, in each role's limiter).
        with ThreadPoolExecutor(self.config.engine.concurrency, thread_name_prefix="mapd-call") as calls:
            program = self._program(ledger, pool, executor=calls) if pending else None

            def work(pair):
                return program(example=pair[0], student_response=pair[1], stages=stages)

            try:
                return self._map(label, pending, work, ledger)
            except BaseException:
                calls.shutdown(wait=False, cancel_futures=True)  # drop queued calls; running ones finish
                raise

    def _check_budget(self, pending: list) -> None:
        """Stop before starting a server or a stage when calls are pending but the budget is spent."""
        if pending and self.budget is not None:
            self.budget.check()

    def _program(self, ledger: Ledger, pool: ModelPool | None, executor: ThreadPoolExecutor | None = None) -> MAPDProgram:
        review = self.config.review
        roles = pool.teachers(self.teacher_configs) if pool is not None else self._offline_roles()
        return MAPDProgram(
            self.task,
            roles,
            gate=self.gate,
            scale=(review.scale_min, review.scale_max),
            ledger=ledger,
            retry=review.retry if self.gate.peer_review else "none",
            retry_attempts=review.retry_attempts,
            executor=executor,
            programs_dir=self.config.programs.path,
        )

    def _offline_roles(self) -> dict[str, Role]:
        # Gate-only passes read records and never call: a placeholder LM that refuses to run.
        return {t.name: Role(t.name, _NoCallsLM(t.model)) for t in self.teacher_configs}

    # -- the extra optimize stage: not part of `all`, it costs calls --------------------------

    def _check_programs(self) -> None:
        """A bad ``programs.path`` fails before anything runs; the message names the file."""
        from mapd_dspy.programs.optimize import ProgramStateError

        if self.config.programs.path:
            try:
                self._program(Ledger(), pool=None)
            except ProgramStateError as exc:
                raise RunError(str(exc)) from None

    def optimize(self) -> dict[str, Any]:
        """``--stage optimize``: compile the teachers' writer/reviewer prompts with a DSPy optimizer into
        ``runs/<name>/programs/`` (use them with ``programs.path``) and write before/after on a held-out
        dev split to ``optimize.json``. See programs/optimize.py for the data and metrics."""
        from mapd_dspy.programs.optimize import OPTIMIZE_REPORT, optimize_teachers

        settings, run_dir = self.config.optimize, self.config.run_dir
        check_environment(self.config)
        names = [t.name for t in self.teacher_configs]
        if unknown := sorted(set(settings.teachers) - set(names)):
            raise ConfigError(f"optimize.teachers: unknown teacher(s) {unknown}; the teachers are {names}")
        reflection = settings.reflection
        if reflection is not None and reflection.api_key_env and not os.environ.get(reflection.api_key_env):
            raise ConfigError(f"optimize.reflection.api_key_env: environment variable {reflection.api_key_env} is not set")
        self._check_programs()
        questions = self.load_examples(limit=None)
        records = Path(settings.records or run_dir)
        records = records if records.suffix == ".jsonl" else records / "records.jsonl"
        run_dir.mkdir(parents=True, exist_ok=True)
        with contextlib.ExitStack() as stack:
            pool = ModelPool(self.config, self.console, stack)
            program = self._program(Ledger(), pool)
            reflection_lm = None
            if reflection is not None:
                cfg = TeacherConfig(name="optimize-reflection", **reflection.model_dump())
                reflection_lm = pool.teachers([cfg])[cfg.name].lm
            report = optimize_teachers(program, questions, settings, run_dir / "programs", records, reflection_lm)
        write_json(run_dir / OPTIMIZE_REPORT, report)
        return report

    def mistakes(self, examples: list[Example], ledger: Ledger, require_exam: bool = False):
        """(example, student response text) for every question the student got wrong."""
        exam_records = [ledger.store.get((ex.id, "exam", "", "")) for ex in examples]
        if require_exam and not any(exam_records):
            raise RunError(f"no exam records in {ledger.store.path.parent}: run `--stage exam` first")
        pairs = []
        for example, record in zip(examples, exam_records):
            if record is None or record.correct:
                continue
            response = student_response_text(record)
            if response is not None:
                pairs.append((example, response))
        return pairs

    def _has_pending_calls(self, stage: str, example: Example, ledger: Ledger) -> bool:
        names = [t.name for t in self.teacher_configs]
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

    def _map(self, stage: str, items: list, work: Callable, ledger: Ledger | None) -> StageResult:
        """Run ``work`` over ``items`` with the configured concurrency and a progress bar."""
        started = time.monotonic()
        calls_before = ledger.calls_made if ledger else 0
        if items:
            with (_progress(self.console) as progress, ThreadPoolExecutor(self.config.engine.concurrency) as pool,
                  io_bound_stage()):
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
        calls = (ledger.calls_made - calls_before) if ledger else 0
        return StageResult(stage, len(items), calls, round(time.monotonic() - started, 1))

    # -- gate and summary --------------------------------------------------------------------

    def finish(self, examples: list[Example], ledger: Ledger, round_dir: Path | None = None) -> dict[str, Any]:
        """Apply the gate to stored records and rewrite the derived files (no LLM call)."""
        from mapd_dspy.summary import summarize

        round_dir = round_dir or self.config.run_dir
        program = self._program(ledger, pool=None)
        decisions = []
        for example, response in self.mistakes(examples, ledger):
            decisions.extend(program(example=example, student_response=response, stages=()).decisions)
        write_jsonl(round_dir / "decisions.jsonl", [d.__dict__ for d in decisions])
        summary = summarize(self.config, examples, ledger.store, decisions, self.gate, self.teacher_configs)
        write_json(round_dir / "summary.json", summary)
        return summary

    # -- distillation stages -----------------------------------------------------------------

    def _compile(self, k: int, examples: list[Example], ledger: Ledger) -> StageResult:
        from mapd_dspy.finetune.compile import compile_training_set

        started = time.monotonic()
        provenance = {
            "task": self.config.task.name,
            "split": self.config.task.split,
            "student": self.config.student.model,
            "teachers": [{"name": t.name, "model": t.model} for t in self.teacher_configs],
            "gate": self.gate.describe(),
            "threshold": self.config.review.threshold,
            "baseline": self.config.baseline,
            "round": k,
        }
        compiled = compile_training_set(self.round_dir(k), self.task, examples, self.config.compile, provenance)
        by_kind = compiled.counts.get("by_kind", {})
        self.console.print(f"compile r{k}: {len(compiled.dataset)} rows ({by_kind}) -> {compiled.path}")
        return StageResult(f"compile r{k}" if k > 1 else "compile", len(compiled.dataset), 0,
                           round(time.monotonic() - started, 1))

    def _training_set_dir(self, k: int) -> Path:
        """Round k trains on the union of rounds 1..k's training sets (a fresh adapter on the base)."""
        from datasets import concatenate_datasets, load_from_disk

        from mapd_dspy.finetune.compile import TRAIN_SET_DIR

        folders = [self.round_dir(j) / TRAIN_SET_DIR for j in range(1, k + 1)]
        for folder in folders:
            if not folder.exists():
                raise RunError(f"no training set in {folder}: run `--stage compile` first")
        if k == 1:
            return folders[0]
        union = self.config.run_dir / f"train_set-r1-{k}"
        concatenate_datasets([load_from_disk(str(f)) for f in folders]).save_to_disk(str(union))
        return union

    def _train(self, k: int, pool: ModelPool) -> StageResult:
        from datasets import load_from_disk

        from mapd_dspy.models import resolve_model

        started = time.monotonic()
        dataset_dir = self._training_set_dir(k)
        dataset = load_from_disk(str(dataset_dir))
        fingerprint = _dataset_fingerprint(dataset, self.config.train)
        out_dir = self.adapter_dir(k)
        marker = out_dir / "mapd_source.json"
        label = f"train r{k}" if k > 1 else "train"
        if marker.exists() and json.loads(marker.read_text()).get("fingerprint") == fingerprint:
            self.console.print(f"[dim]{label}: adapter {out_dir} is up to date[/]")
        else:
            pool.pause()  # training wants both cores and the memory the server holds
            self.console.print(f"{label}: {len(dataset)} rows, {self.config.train.method} on {self.config.student.model}")
            self._train_in_subprocess(dataset_dir, resolve_model(self.config.student.model), out_dir)
            metrics = json.loads((out_dir / "training_config.json").read_text()).get("metrics", {})
            write_json(marker, {"fingerprint": fingerprint, "metrics": metrics})
            self.console.print(f"{label}: loss {metrics.get('train_loss', float('nan')):.3f}, "
                               f"padding {metrics.get('padding_fraction', 0):.0%} -> {out_dir}")
        pool.serve_adapters({self.served_name(k): str(out_dir)})
        return StageResult(label, len(dataset), 0, round(time.monotonic() - started, 1))

    def _train_in_subprocess(self, dataset_dir: Path, base_model: str, out_dir: Path) -> None:
        """Train in a child process: its memory (model, optimizer, allocator caches) is returned to
        the OS when it ends, instead of staying in the run's process beside the restarted server."""
        command = [sys.executable, "-m", "mapd_dspy.finetune.train", "--dataset", str(dataset_dir),
                   "--base-model", base_model, "--output-dir", str(out_dir)]
        for key, value in self.config.train.model_dump(mode="json").items():
            command += ["--set", f"{key}={json.dumps(value)}"]
        completed = subprocess.run(command, stdout=subprocess.DEVNULL)  # progress and loss go to stderr
        if completed.returncode != 0:
            raise RunError(f"training failed (exit {completed.returncode}); its log is above")

    def _evaluate(self, examples: list[Example], pool: ModelPool) -> list[StageResult]:
        from mapd_dspy.finetune.evaluate import evaluate_student, pending_examples

        store = RecordStore(self.config.run_dir / "records.jsonl")
        rounds = [0, *self.trained_rounds()] if self.config.baseline != "none" else [0]
        results, evals = [], []
        for k in rounds:
            label = self.served_name(k)
            started = time.monotonic()
            pending = pending_examples(examples, store, label)
            self._check_budget(pending)
            role = pool.student(label) if pending else None
            with _progress(self.console) as progress:
                bar = progress.add_task(f"eval {label}", total=len(pending))
                result = evaluate_student(
                    self.task, examples, role, store, label, self.config.eval.concurrency,
                    progress=lambda _record: progress.advance(bar),
                ) if pending else _stored_eval(examples, store, label)
            evals.append({"label": label, "round": k, "baseline": self.config.baseline,
                          "split": self.config.eval.split, "accuracy": result.accuracy,
                          "n": result.n, "correct": result.correct})
            results.append(StageResult(f"eval {label}", len(pending), len(pending), round(time.monotonic() - started, 1)))
        write_json(self.config.run_dir / "evals.json", evals)
        return results

    def _record_timings(self, results: list[StageResult]) -> None:
        path = self.config.run_dir / "stages.json"
        timings = json.loads(path.read_text()) if path.exists() else {}
        for result in results:
            if result.items:  # a stage with nothing to do keeps the time it took when it ran
                timings[result.name] = result.seconds
        write_json(path, timings)


def _stored_eval(examples, store, label):
    from mapd_dspy.finetune.evaluate import result_from_records

    return result_from_records(examples, store, label)


def _dataset_fingerprint(dataset, settings) -> str:
    digest = hashlib.sha256(settings.model_dump_json().encode())
    for row in dataset:
        digest.update(json.dumps(row, sort_keys=True).encode())
    return digest.hexdigest()


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
