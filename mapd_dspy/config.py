"""One typed config object for a MAPD run.

Every field has a default, so an empty TOML file (or none at all) gives the documented offline
default: the embedded SmolLM2-135M student taught by a smoke-scale committee of two embedded
teachers on SVAMP. Unknown keys and bad values are errors that name the key.

Load order: defaults <- TOML file <- ``--set key=value`` overrides <- ``--limit``.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from mapd_dspy.finetune.compile import CompileSettings
from mapd_dspy.validation import StrictSection
from mapd_dspy.finetune.evaluate import EvalSettings
from mapd_dspy.finetune.train import TrainSettings

EMBEDDED_DEFAULT = "embedded:smollm2-135m-instruct"


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the file and key."""


class _Section(StrictSection):
    pass


class TaskConfig(_Section):
    name: str = Field("svamp", description="Registered task name: gsm8k, svamp, strategyqa, logiqa.")
    split: str = Field("train", description="Split the student is examined on (its mistakes are taught).")
    source: str = Field(
        "auto",
        description="Local file/folder or Hugging Face hub id. 'auto': <data_dir>/<task> if it exists, else the hub.",
    )
    data_dir: str | None = Field(
        None, description="Folder holding one sub-folder per task; default $MAPD_DATA_DIR or ../shared/data."
    )
    limit: int | None = Field(40, ge=1, description="Examine only the first N questions (None: the whole split).")

    @field_validator("name")
    @classmethod
    def _task_is_registered(cls, value: str) -> str:
        from mapd_dspy.tasks import available_tasks

        if value.lower() not in available_tasks():
            raise ValueError(f"unknown task {value!r}; available: {', '.join(available_tasks())}")
        return value.lower()


class ModelConfig(_Section):
    """A model reachable through ``dspy.LM``.

    ``model`` is any LiteLLM/DSPy model string (``openai/gpt-4o-mini``, ``anthropic/...``,
    ``gemini/...``, ``hosted_vllm/NAME``) or ``embedded:NAME``, which is served by the run's own
    vLLM server. API keys are never stored here: name the environment variable that holds one.
    """

    model: str = Field(EMBEDDED_DEFAULT, description="dspy.LM model string, or embedded:NAME.")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="Sampling temperature.")
    max_tokens: int = Field(384, ge=1, description="Completion token limit per call.")
    api_base: str | None = Field(None, description="OpenAI-compatible base URL (e.g. a vLLM server you run).")
    api_key_env: str | None = Field(
        None, description="Name of the environment variable holding the API key (never the key itself)."
    )
    adapter: Literal["auto", "chat", "json"] = Field(
        "auto", description="DSPy adapter. auto: json for vLLM-served models, chat otherwise."
    )
    structured_outputs: bool | None = Field(
        None,
        description="Send the signature's JSON schema as response_format (vLLM constrains decoding to it). "
        "Default: on for vLLM-served models.",
    )
    timeout_s: float = Field(120.0, gt=0, description="Per-request timeout in seconds.")
    num_retries: int = Field(2, ge=0, description="Retries with backoff on transient errors (429, 5xx, timeouts).")
    max_concurrency: int | None = Field(
        None, ge=1, description="At most this many calls to this model in flight at once (unset: only engine.concurrency)."
    )
    rpm: float | None = Field(None, gt=0, description="At most this many requests per minute to this model (unset: no limit).")
    tpm: float | None = Field(
        None, gt=0, description="At most this many tokens (prompt + completion) per minute to this model (unset: no limit)."
    )
    price_in_per_mtok: float | None = Field(
        None, ge=0, description="US dollars per million prompt tokens, for the cost report and engine.budget_usd "
        "(unset: not priced, e.g. a local model)."
    )
    price_out_per_mtok: float | None = Field(
        None, ge=0, description="US dollars per million completion tokens; set together with price_in_per_mtok."
    )

    @field_validator("model")
    @classmethod
    def _model_not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must be a non-empty model string")
        return value.strip()

    @field_validator("api_key_env")
    @classmethod
    def _looks_like_env_name(cls, value: str | None) -> str | None:
        # Catch the classic slip of pasting the key itself here: it would then be written to disk.
        if value is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
            raise ValueError("must be the NAME of an environment variable (like OPENAI_API_KEY), not a key")
        return value

    @model_validator(mode="after")
    def _prices_come_in_pairs(self) -> "ModelConfig":
        if (self.price_in_per_mtok is None) != (self.price_out_per_mtok is None):
            raise ValueError("set both price_in_per_mtok and price_out_per_mtok, or neither")
        return self

    @property
    def is_embedded(self) -> bool:
        return self.model.startswith("embedded:")


class StudentConfig(ModelConfig):
    """The student is always vLLM-served: by the run's own server (``model`` = ``embedded:NAME``, a
    local Hugging Face folder or a hub id) or by a running server given as ``api_base``."""

    model: str = Field(
        EMBEDDED_DEFAULT,
        description="embedded:NAME, a local HF model folder or a hub id, served by the run's vLLM server.",
    )
    api_base: str | None = Field(
        None, description="Attach to a running vLLM server at this URL instead (it must serve served_name)."
    )
    served_name: str = Field(
        "student-r0",
        description="Name the student is served under. Version it per round: DSPy's cache ignores api_base.",
    )


class TeacherConfig(ModelConfig):
    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="Unique teacher name (records key).")
    temperature: float = Field(0.8, ge=0.0, le=2.0, description="Sampling temperature (reference code: 0.8).")


class ServerConfig(_Section):
    port: int = Field(0, ge=0, le=65535, description="Port for the managed vLLM server (0: a free port).")
    startup_timeout_s: float = Field(420.0, gt=0, description="Seconds to wait for the server to become healthy.")
    kv_cache_gib: float = Field(1.0, gt=0, description="KV-cache size in GiB for the vLLM CPU build (server RSS is ~2.5 GiB plus this).")
    max_model_len: int = Field(2048, ge=256, description="Context length the server allocates for.")
    enforce_eager: bool = Field(True, description="Skip torch.compile: starts in ~40 s instead of ~2 min on CPU.")
    extra_args: list[str] = Field(default_factory=list, description="Extra command-line arguments for the vLLM OpenAI server.")


class ReviewConfig(_Section):
    scale_min: int = Field(1, description="Lowest peer score.")
    scale_max: int = Field(5, description="Highest peer score.")
    threshold: float = Field(3.0, description="Acceptance threshold on the mean peer score.")
    threshold_rule: Literal["gt", "ge"] = Field(
        "gt", description="gt: accept if mean > threshold (reference code); ge: mean >= threshold."
    )
    require_correct_answer: bool = Field(
        True, description="Also require the rationale's extracted answer to match the gold answer."
    )
    retry: Literal["none", "best_of_n", "refine"] = Field(
        "none", description="Re-sample a rationale whose peer score misses the threshold (dspy.BestOfN / dspy.Refine)."
    )
    retry_attempts: int = Field(3, ge=1, le=10, description="Attempts per rationale when retry is on.")

    @model_validator(mode="after")
    def _threshold_inside_scale(self) -> "ReviewConfig":
        if self.scale_min >= self.scale_max:
            raise ValueError(f"scale_min ({self.scale_min}) must be below scale_max ({self.scale_max})")
        if not self.scale_min <= self.threshold <= self.scale_max:
            raise ValueError(
                f"threshold {self.threshold} is outside the score scale [{self.scale_min}, {self.scale_max}]"
            )
        return self


class EngineConfig(_Section):
    concurrency: int = Field(
        16, ge=1, le=256,
        description="LLM calls in flight at once, across questions (1: one call at a time, as the reference code).",
    )
    retry_failed: bool = Field(
        False, description="Call again for keys whose stored record is a parse/validation failure."
    )
    cache: bool = Field(True, description="Use DSPy's response cache (disk) in addition to the run's records.")
    budget_usd: float | None = Field(
        None, gt=0, description="Stop the run (exit 3) once its spending reaches this many US dollars: no new call "
        "starts, calls in flight are recorded; a re-run with a higher budget resumes. Needs model prices."
    )


class ReflectionConfig(ModelConfig):
    """The model that writes new instructions: MIPROv2's prompt model and GEPA's reflection model."""

    temperature: float = Field(1.0, ge=0.0, le=2.0, description="Sampling temperature (proposals want variety).")
    max_tokens: int = Field(4000, ge=1, description="Completion token limit per call (proposed instructions are long).")


class OptimizeConfig(_Section):
    """The extra ``optimize`` stage (``--stage optimize``; not part of ``all``, it costs calls)."""

    optimizer: Literal["bootstrap", "random_search", "mipro", "gepa"] = Field(
        "bootstrap", description="DSPy optimizer: bootstrap (BootstrapFewShot), random_search "
        "(BootstrapFewShotWithRandomSearch), mipro (MIPROv2) or gepa (GEPA).",
    )
    modules: list[Literal["writer", "reviewer"]] = Field(
        default_factory=lambda: ["writer", "reviewer"],
        description="Teacher modules to compile: writer (RationaleWriter), reviewer (Reviewer).",
    )
    teachers: list[str] = Field(default_factory=list, description="Teachers whose modules to compile (empty: all).")
    train_size: int = Field(12, ge=1, description="Questions (reviewer: rationales) in the train split.")
    dev_size: int = Field(12, ge=1, description="Questions (reviewer: rationales) in the held-out dev split for before/after.")
    seed: int = Field(0, description="Seed of the train/dev split and of the optimizers.")
    records: str | None = Field(
        None, description="records.jsonl (or run folder) whose rationale records train the reviewers; default: this "
        "run's. Without any, the teachers first write rationales for the train/dev questions.",
    )
    false_accept_cost: float = Field(
        3.0, ge=1.0, description="Reviewer metric: cost of accepting a wrong rationale relative to rejecting a right one.",
    )
    max_bootstrapped_demos: int = Field(2, ge=0, description="Demos per predictor (all optimizers but gepa).")
    max_rounds: int = Field(1, ge=1, description="Bootstrap attempts per training example.")
    num_candidate_programs: int = Field(4, ge=1, description="random_search: candidate demo sets tried.")
    num_candidates: int = Field(3, ge=1, description="mipro: instruction and demo-set candidates proposed.")
    num_trials: int = Field(6, ge=1, description="mipro: Bayesian-search trials.")
    minibatch_size: int = Field(25, ge=1, description="mipro: examples per minibatch evaluation.")
    max_metric_calls: int = Field(60, ge=1, description="gepa: budget of metric calls (program runs).")
    reflection: ReflectionConfig | None = Field(
        None, description="Model that proposes instructions (mipro, gepa); default: each optimized teacher's own model.",
    )
    threads: int = Field(4, ge=1, le=64, description="Parallel calls while evaluating and optimizing.")


class ProgramsConfig(_Section):
    path: str | None = Field(
        None, description="Folder of compiled teacher programs (<teacher>.<writer|reviewer|explainer>.json, written by "
        "--stage optimize to runs/<name>/programs) that the run's teachers use; unset: zero-shot signatures.",
    )


def _default_teachers() -> list[TeacherConfig]:
    # Smoke-scale offline committee: the embedded model at two seeds' worth of sampling. Real
    # distillation replaces these with strong models, e.g. model = "openai/gpt-4o-mini".
    return [TeacherConfig(name="smol-a"), TeacherConfig(name="smol-b")]


Baseline = Literal["mapd", "none", "single_teacher", "all_teachers"]


class RunConfig(_Section):
    name: str = Field("default", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="Run name: runs/<name>/.")
    runs_dir: str = Field("runs", description="Folder holding one sub-folder per run.")
    task: TaskConfig = Field(default_factory=TaskConfig)
    student: StudentConfig = Field(default_factory=StudentConfig)
    teachers: list[TeacherConfig] = Field(default_factory=_default_teachers, description="The committee (N >= 2).")
    server: ServerConfig = Field(default_factory=ServerConfig)
    review: ReviewConfig = Field(default_factory=ReviewConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    optimize: OptimizeConfig = Field(default_factory=OptimizeConfig)
    programs: ProgramsConfig = Field(default_factory=ProgramsConfig)
    compile: CompileSettings = Field(default_factory=CompileSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    eval: EvalSettings = Field(default_factory=EvalSettings)
    baseline: Baseline = Field(
        "mapd",
        description="mapd: peer-reviewed committee; none: no distillation (evaluate the base student); "
        "single_teacher: the first teacher, no review (the paper's baseline); all_teachers: all, no review.",
    )
    rounds: int = Field(1, ge=1, le=20, description="Exam -> teach -> train rounds; round k examines student r(k-1).")

    @model_validator(mode="after")
    def _committee_is_valid(self) -> "RunConfig":
        if len(self.teachers) < 2:
            raise ValueError(f"teachers: peer review needs at least 2 teachers, got {len(self.teachers)}")
        names = [teacher.name for teacher in self.teachers]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"teachers: duplicate teacher names {duplicates}")
        priced = [m for m in (self.student, *self.teachers) if m.price_in_per_mtok is not None]
        if self.engine.budget_usd is not None and not priced:
            raise ValueError(
                "engine.budget_usd: no model has a price, so nothing would count against the budget; "
                "set price_in_per_mtok and price_out_per_mtok on the student or teachers"
            )
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name

    def public_dump(self) -> dict[str, Any]:
        """The config as JSON-safe data. Holds env-var names only, never key values."""
        return self.model_dump(mode="json")


# --------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | Path | None = None, overrides: list[str] = (), limit: int | None = None) -> RunConfig:
    """Build the run config from an optional TOML file, ``key=value`` overrides and ``--limit``."""
    data: dict[str, Any] = {}
    origin = "config"
    if path is not None:
        data = _read_toml(Path(path))
        origin = str(path)
    for override in overrides:
        _apply_override(data, override)
    if limit is not None:
        data.setdefault("task", {})["limit"] = limit
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe_validation_error(exc, origin)) from None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: cannot read config file: not UTF-8 text (byte {exc.start})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None


def _apply_override(data: dict[str, Any], override: str) -> None:
    """Apply ``a.b.c=value``; the value is parsed as TOML (numbers, booleans, lists), else a string.

    List items are addressed by index: ``teachers.0.model=openai/gpt-4o-mini``.
    """
    key, sep, raw_value = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {override!r}: expected key=value")
    value = _parse_value(raw_value.strip())
    parts = key.split(".")
    node: Any = data
    for depth, part in enumerate(parts[:-1]):
        node = _descend(node, part, parts[depth + 1], key)
    last = parts[-1]
    if isinstance(node, list):
        index = _list_index(last, node, key, allow_append=True)
        if index == len(node):
            node.append(value)
        else:
            node[index] = value
    else:
        node[last] = value


def _descend(node: Any, part: str, next_part: str, key: str) -> Any:
    if isinstance(node, list):
        index = _list_index(part, node, key, allow_append=True)
        if index == len(node):
            node.append({})
        return node[index]
    if part == "teachers" and part not in node:
        # Overriding one teacher starts from the default committee, not an empty list.
        node[part] = [teacher.model_dump(exclude_defaults=True) | {"name": teacher.name} for teacher in _default_teachers()]
    if part not in node:
        node[part] = [] if next_part.isdigit() else {}
    if not isinstance(node[part], (dict, list)):
        raise ConfigError(f"--set {key}: '{part}' is a value, not a section")
    return node[part]


def _list_index(part: str, node: list, key: str, allow_append: bool) -> int:
    if not part.isdigit():
        raise ConfigError(f"--set {key}: '{part}' must be a list index (0, 1, ...)")
    index = int(part)
    if index > len(node) or (index == len(node) and not allow_append):
        raise ConfigError(f"--set {key}: index {index} is past the end of a list of {len(node)}")
    return index


def _parse_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _describe_validation_error(exc: ValidationError, origin: str) -> str:
    lines = [f"{origin}: invalid config"]
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"]) or "(top level)"
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = "unknown key"
        elif "input" in error and not isinstance(error["input"], (dict, list)):
            message += f" (got {json.dumps(error['input'], default=str)[:80]})"
        lines.append(f"  {key}: {message}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Documentation: the README's config reference is generated from the field descriptions.


def config_reference_markdown() -> str:
    """A markdown table of every config key, its default and its help text."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    sections = {
        "": RunConfig,
        "task.": TaskConfig,
        "student.": StudentConfig,
        "teachers[i].": TeacherConfig,
        "server.": ServerConfig,
        "review.": ReviewConfig,
        "engine.": EngineConfig,
        "compile.": CompileSettings,
        "train.": TrainSettings,
        "eval.": EvalSettings,
        "optimize.": OptimizeConfig,
        "optimize.reflection.": ReflectionConfig,
        "programs.": ProgramsConfig,
    }
    for prefix, model in sections.items():
        for name, field in model.model_fields.items():
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                continue
            if name == "teachers" and not prefix:
                default = "two embedded teachers, smol-a and smol-b"
            elif field.is_required():
                default = "(required)"
            else:
                default = json.dumps(field.get_default(call_default_factory=True), default=str)
            rows.append(f"| `{prefix}{name}` | `{default}` | {field.description or ''} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(config_reference_markdown())
