"""The training-set compiler on hand-written run directories (no LLM, no network)."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import dspy
import pytest
from pydantic import ValidationError

from mapd_dspy.finetune.compile import CompileError, CompileSettings, compile_training_set, training_rows
from mapd_dspy.programs import student_response_text
from mapd_dspy.records import Failure, Record, RecordStore
from mapd_dspy.signatures import LearnFromMistake, SolveQuestion
from mapd_dspy.tasks import Example, get_task

TEACHERS = ("alpha", "beta", "gamma")
PROVENANCE = {
    "task": "svamp",
    "split": "train",
    "teachers": [{"name": "alpha", "model": "openai/gpt-4o-mini"}, {"name": "beta", "model": "anthropic/claude-x"},
                 {"name": "gamma", "model": "gemini/gemini-y"}],
    "gate": "mean peer score > 3 and answer == gold",
    "threshold": 3.0,
}


class FakeRun:
    """Writes records.jsonl and decisions.jsonl into a run directory, the way a finished run would."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.store = RecordStore(run_dir / "records.jsonl")
        self.decisions: list[dict] = []

    def add(self, example_id: str, stage: str, teacher: str = "", status: str = "ok", **fields) -> Record:
        record = Record(example_id=example_id, stage=stage, teacher=teacher, status=status, model="fake", **fields)
        return self.store.append(record)

    def wrong_exam(self, example: Example, answer: str = "1") -> Record:
        output = {"reasoning": f"I guess {answer}.", "answer": answer}
        return self.add(example.id, "exam", output=output, answer=answer, correct=False)

    def explanation(self, example: Example, teacher: str, ok: bool = True) -> Record:
        if not ok:
            return self.add(example.id, "explain", teacher, "failed", failure=Failure(kind="parse_error", reason="x"))
        return self.add(example.id, "explain", teacher, output={"explanation": f"{teacher} explains {example.id}"})

    def rationale(self, example: Example, teacher: str, accepted: bool = True, mean: float = 4.0, ok: bool = True):
        if ok:
            output = {"rationale": f"{teacher} solves {example.id} step by step.", "answer": example.gold}
            self.add(example.id, "rationale", teacher, output=output, answer=example.gold, correct=True)
        else:
            self.add(example.id, "rationale", teacher, "failed", failure=Failure(kind="lm_error", reason="timeout"))
        self.decisions.append({
            "example_id": example.id, "teacher": teacher, "accepted": accepted,
            "reason": "accepted" if accepted else "score_below_threshold",
            "mean_score": mean, "scores": {}, "answer_correct": True,
        })

    def write_decisions(self) -> None:
        lines = [json.dumps(d) for d in self.decisions]
        (self.run_dir / "decisions.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")

    def rows(self, examples, **settings) -> list[dict]:
        return training_rows(get_task("svamp"), examples, self.store, self.decisions, CompileSettings(**settings))

    def compile(self, examples, provenance=PROVENANCE, **settings):
        self.write_decisions()
        return compile_training_set(self.run_dir, get_task("svamp"), examples, CompileSettings(**settings), provenance)


def questions(count: int) -> list[Example]:
    return [Example(id=f"q/{i}", question=f"Tom has {i} apples and buys 2 more. How many now?", gold=str(i + 2))
            for i in range(count)]


@pytest.fixture
def run(tmp_path) -> FakeRun:
    return FakeRun(tmp_path / "runs" / "x")


def taught(run: FakeRun, examples: list[Example]) -> None:
    """Every question wrong; alpha and beta explain and write accepted rationales."""
    for example in examples:
        run.wrong_exam(example)
        for teacher in ("alpha", "beta"):
            run.explanation(example, teacher)
            run.rationale(example, teacher)


# -- rows ------------------------------------------------------------------------------------


def test_real_svamp_questions_give_both_kinds(run, shared_data):
    examples = get_task("svamp").load("train", source="auto", data_dir=shared_data)[:3]
    taught(run, examples)
    compiled = run.compile(examples)
    assert compiled.counts["by_kind"] == {"rationale": 3, "mistake": 3}
    assert {row["example_id"] for row in compiled.dataset} == {e.id for e in examples}
    first = compiled.dataset[0]
    assert examples[0].question in first["prompt"][1]["content"]


def test_rationale_rows_only_for_accepted_and_ok(run):
    [example] = questions(1)
    run.wrong_exam(example)
    run.rationale(example, "alpha", accepted=True)
    run.rationale(example, "beta", accepted=True, ok=False)  # a stale "accepted" over a failed record
    run.rationale(example, "gamma", accepted=False)
    rows = run.rows([example], choice="all")
    assert [(r["kind"], r["teacher"]) for r in rows] == [("rationale", "alpha")]


def test_rationale_prompt_is_what_the_student_sees(run):
    [example] = questions(1)
    run.wrong_exam(example)
    run.rationale(example, "alpha")
    [row] = run.rows([example])
    signature = dspy.ChainOfThought(SolveQuestion).predict.signature
    inputs = {"question": example.question, "answer_format": get_task("svamp").answer_format}
    assert row["prompt"] == dspy.JSONAdapter().format(signature, demos=[], inputs=inputs)
    system, user = row["prompt"]
    assert system["role"] == "system" and SolveQuestion.instructions in system["content"]
    assert user["role"] == "user" and example.question in user["content"]
    [completion] = row["completion"]
    assert completion["role"] == "assistant"
    assert json.loads(completion["content"]) == {"reasoning": "alpha solves q/0 step by step.", "answer": "2"}


def test_mistake_row_uses_learn_from_mistake(run):
    [example] = questions(1)
    exam = run.wrong_exam(example, answer="7")
    run.explanation(example, "beta")
    [row] = run.rows([example])
    inputs = {"question": example.question, "your_answer": student_response_text(exam), "correct_answer": "2"}
    assert row["kind"] == "mistake" and row["teacher"] == "beta"
    assert row["prompt"] == dspy.JSONAdapter().format(LearnFromMistake, demos=[], inputs=inputs)
    assert "Final answer: 7" in row["prompt"][1]["content"]
    assert json.loads(row["completion"][0]["content"]) == {"explanation": "beta explains q/0"}


def test_unparsed_exam_with_raw_text_still_teaches(run):
    parsed_badly, lost, right = questions(3)
    failure = Failure(kind="parse_error", reason="cut off", raw="RAW student rambling 41")
    run.add(parsed_badly.id, "exam", status="failed", failure=failure)
    run.add(lost.id, "exam", status="failed", failure=Failure(kind="lm_error", reason="timeout"))
    run.add(right.id, "exam", output={"reasoning": "r", "answer": "4"}, answer="4", correct=True)
    for example in (parsed_badly, lost, right):
        run.explanation(example, "alpha")
    [row] = run.rows([parsed_badly, lost, right])
    assert row["example_id"] == parsed_badly.id
    assert "RAW student rambling 41" in row["prompt"][1]["content"]


def test_explanations_only_from_ok_records(run):
    examples = questions(20)
    for example in examples:
        run.wrong_exam(example)
        run.explanation(example, "alpha", ok=False)
        run.explanation(example, "beta")
    rows = run.rows(examples, explanations="random")
    assert len(rows) == 20 and {r["teacher"] for r in rows} == {"beta"}
    assert len(run.rows(examples, explanations="all")) == 20


def test_all_explanations(run):
    examples = questions(2)
    taught(run, examples)
    mistakes = [r for r in run.rows(examples, explanations="all") if r["kind"] == "mistake"]
    assert sorted((r["example_id"], r["teacher"]) for r in mistakes) == [
        ("q/0", "alpha"), ("q/0", "beta"), ("q/1", "alpha"), ("q/1", "beta")]


# -- choosing among accepted rationales ----------------------------------------------------------


def picks(rows: list[dict]) -> dict[str, str]:
    return {r["example_id"]: r["teacher"] for r in rows if r["kind"] == "rationale"}


def test_random_choice_is_seeded_and_per_question(run):
    examples = questions(40)
    for example in examples:
        run.wrong_exam(example)
        for teacher in TEACHERS:
            run.rationale(example, teacher)
    first = picks(run.rows(examples, seed=1))
    assert first == picks(run.rows(examples, seed=1))
    assert first != picks(run.rows(examples, seed=2))
    assert len(set(first.values())) == 3  # all teachers get picked somewhere
    # Dropping questions does not reshuffle the others' picks.
    dropped = {example.id for example in examples[:5]}
    assert picks(run.rows(examples[5:], seed=1)) == {k: v for k, v in first.items() if k not in dropped}


def test_best_score_picks_highest_mean_and_ties_go_by_teacher_order(run):
    clear, tied = questions(2)
    for example in (clear, tied):
        run.wrong_exam(example)
    run.rationale(clear, "alpha", mean=3.5)
    run.rationale(clear, "beta", mean=4.5)
    run.rationale(clear, "gamma", mean=4.0)
    run.rationale(tied, "alpha", mean=3.5)
    run.rationale(tied, "beta", mean=4.5)
    run.rationale(tied, "gamma", mean=4.5)
    assert picks(run.rows([clear, tied], choice="best_score")) == {clear.id: "beta", tied.id: "beta"}


def test_all_keeps_every_accepted_rationale(run):
    [example] = questions(1)
    run.wrong_exam(example)
    for teacher in TEACHERS:
        run.rationale(example, teacher, accepted=teacher != "beta")
    rows = run.rows([example], choice="all")
    assert [r["teacher"] for r in rows] == ["alpha", "gamma"]


# -- files ---------------------------------------------------------------------------------


def test_save_to_disk_round_trips_and_jsonl_has_the_same_rows(run):
    examples = questions(3)
    taught(run, examples)
    compiled = run.compile(examples)
    assert compiled.path == run.run_dir / "train_set"
    reloaded = datasets.load_from_disk(str(compiled.path))
    assert reloaded.to_list() == compiled.dataset.to_list()
    lines = (run.run_dir / "train_set.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == reloaded.to_list()
    assert set(reloaded.column_names) == {"prompt", "completion", "kind", "example_id", "teacher"}


def test_recompiling_replaces_the_old_output_and_leaves_no_temp_files(run):
    examples = questions(4)
    taught(run, examples)
    assert len(run.compile(examples[:1]).dataset) == 2
    compiled = run.compile(examples)
    assert len(datasets.load_from_disk(str(compiled.path))) == 8
    assert len((run.run_dir / "train_set.jsonl").read_text().splitlines()) == 8
    assert sorted(p.name for p in run.run_dir.iterdir()) == [
        "decisions.jsonl", "records.jsonl", "train_set", "train_set.jsonl"]


def test_dataset_card_names_counts_teachers_gate_and_signatures(run):
    examples = questions(2)
    taught(run, examples)
    run.explanation(examples[0], "gamma", ok=False)
    compiled = run.compile(examples, seed=7, choice="best_score")
    card = (compiled.path / "README.md").read_text(encoding="utf-8")
    assert card.startswith("---\nlicense: other\n") and "- text-generation" in card
    assert "4 rows: 2 `rationale`, 2 `mistake`" in card
    assert "| alpha | `openai/gpt-4o-mini` |" in card and "anthropic/claude-x" in card
    assert "mean peer score > 3 and answer == gold (threshold 3.0)" in card
    assert "`best_score`" in card and "seed 7" in card and str(run.run_dir) in card
    for name in ("SolveQuestion", "LearnFromMistake", "ExplainMistake", "WriteRationale", "ReviewRationale"):
        assert name in card
    per_teacher = compiled.counts["by_teacher"]
    assert sum(c["rationale"] + c["mistake"] for c in per_teacher.values()) == 4


def test_no_api_key_reaches_any_file(run, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-canary-0123456789")
    examples = questions(2)
    taught(run, examples)
    run.compile(examples)
    for path in (run.run_dir / "train_set.jsonl", run.run_dir / "train_set" / "README.md"):
        assert "sk-" not in path.read_text(encoding="utf-8")


def test_push_to_hub_only_when_asked(run, monkeypatch):
    pushed = []
    monkeypatch.setattr(datasets.Dataset, "push_to_hub", lambda self, repo, **kw: pushed.append(repo))
    examples = questions(1)
    taught(run, examples)
    run.compile(examples)
    assert pushed == []
    run.compile(examples, push_to_hub="me/mapd-svamp")
    assert pushed == ["me/mapd-svamp"]


# -- errors ----------------------------------------------------------------------------------


def test_missing_files_name_the_file_and_the_stage(tmp_path):
    settings, task = CompileSettings(), get_task("svamp")
    with pytest.raises(CompileError, match=r"records\.jsonl is missing.*--stage"):
        compile_training_set(tmp_path, task, questions(1), settings, PROVENANCE)
    RecordStore(tmp_path / "records.jsonl").append(
        Record(example_id="q/0", stage="exam", status="ok", model="m", correct=False))
    with pytest.raises(CompileError, match=r"decisions\.jsonl is missing.*--stage review"):
        compile_training_set(tmp_path, task, questions(1), settings, PROVENANCE)


def test_nothing_usable_says_why(run):
    examples = questions(2)
    for example in examples:
        run.wrong_exam(example)
        run.explanation(example, "alpha", ok=False)
        run.rationale(example, "alpha", accepted=False)
    with pytest.raises(CompileError, match=r"0 accepted rationales and 0 usable explanations .*review\.threshold"):
        run.compile(examples)
    assert not (run.run_dir / "train_set").exists() and not (run.run_dir / "train_set.jsonl").exists()


def test_wrong_questions_say_so(run):
    taught(run, questions(2))
    other_split = [Example(id="other/0", question="?", gold="1")]
    with pytest.raises(CompileError, match=r"none of the 1 given questions has an exam record .*wrong task or split"):
        run.compile(other_split)


def test_damaged_decisions_name_the_line(run):
    examples = questions(1)
    taught(run, examples)
    run.write_decisions()
    with (run.run_dir / "decisions.jsonl").open("a") as handle:
        handle.write("{oops\n")
    with pytest.raises(CompileError, match=r"decisions\.jsonl:3: not valid JSON"):
        compile_training_set(run.run_dir, get_task("svamp"), examples, CompileSettings(), PROVENANCE)


def test_settings_reject_unknown_keys_and_values():
    with pytest.raises(ValidationError):
        CompileSettings(choise="all")
    with pytest.raises(ValidationError):
        CompileSettings(choice="first")
