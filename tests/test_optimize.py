"""Prompt optimization: metrics on hand-made cases, every optimizer path on a scripted committee,
saved programs (no keys, structure checked) loaded by the program, the engine and the CLI.

The teachers here are a rule-based fake LM (any call order, any thread): a *lenient* reviewer gives 5 to
everything and a *lenient* writer gets odd sums wrong; both turn *strict* (right) when their prompt holds
demos or an instruction containing ``STRICT``, which is what the scripted proposer/reflection model writes.
So an optimizer that works turns a dev metric of about 0.5 into 1.0.
"""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

import dspy
import pytest
from dspy.clients.engines.dummy_engine import AsyncDummyEngine, DummyEngine
from dspy.lm15 import Message, Response, TextPart, Usage
from dspy.utils.dummies import DummyLM

from mapd_dspy.config import OptimizeConfig, load_config
from mapd_dspy.programs import AcceptanceGate, MAPDProgram, RationaleWriter, Reviewer, Role, bind
from mapd_dspy.programs.metrics import PeerReview, ReviewerMetric, WriterMetric, outcome_value
from mapd_dspy.programs.optimize import (
    ProgramStateError,
    apply_saved_programs,
    load_program,
    optimize_teachers,
    program_path,
    reviewer_example,
    save_program,
)
from tests.conftest import SHARED_DATA
from tests.fakes import Q, svamp

STRICT = "Be STRICT and recompute every number before you answer."


# --------------------------------------------------------------------------------------------
# A rule-based fake LM: answers from the prompt, not from a script position.


class _RuleEngine(DummyEngine):
    def _complete_messages(self, messages):
        system = messages[0]["content"] if messages[0]["role"] == "system" else ""
        fields = re.findall(r"^\d+\. `(\w+)`", system.split("Your output fields are:")[-1].split("All interactions")[0],
                            flags=re.M)
        values = self.owner.respond(system, messages, fields)
        with self.owner.lock:
            self.owner.prompts.append(messages[-1]["content"])
        # ChatAdapter prompts show [[ ## field ## ]] markers; JSONAdapter prompts (GEPA's proposer) want JSON.
        text = self.owner._format_answer_fields(values) if "[[ ## completed ## ]]" in system else json.dumps(values)
        return Response(id=None, model="rule", message=Message.assistant([TextPart(text)]), finish_reason="stop",
                        usage=Usage(input_tokens=0, output_tokens=0, total_tokens=0))


class RuleLM(DummyLM):
    def __init__(self, respond):
        super().__init__([])
        self.respond, self.prompts, self.lock = respond, [], threading.Lock()
        self._engine_spec = _RuleEngine(self)
        self._async_engine_spec = AsyncDummyEngine(self._engine_spec)

    def copy(self, **kwargs):
        return self  # optimizers copy LMs per rollout; the rules hold no state worth copying


def toy_teacher(gold_of):
    """Teacher rules; ``gold_of(text)`` finds the gold answer of the question in a prompt text."""

    def respond(system, messages, fields):
        last = messages[-1]["content"]
        strict = STRICT in system or len(messages) > 2  # an optimized instruction, or demos before the question
        if set(fields) == {"critique", "score"}:
            claimed = re.search(r"proposed_answer ## \]\]\s*(\S+)", last).group(1)
            right = claimed == gold_of(last)
            return {"critique": "every step checks out" if right else "the sum is wrong",
                    "score": 5 if right or not strict else 1}
        if set(fields) == {"rationale", "answer"}:
            gold = gold_of(last)
            answer = gold if strict or float(gold) % 2 != 1 else str(int(gold) + 1)
            return {"rationale": f"Adding the numbers gives {answer}.", "answer": answer}
        if fields == ["explanation"]:
            return {"explanation": "you added wrong"}
        # The optimizers' own calls: MIPROv2's proposer and GEPA's reflection model.
        return {f: STRICT if "instruction" in f else "COMPLETE" if f == "observations" else "noted" for f in fields}

    return respond


def toy_gold(text):
    a, b = re.search(r"What is (\d+) plus (\d+)", text).groups()
    return str(int(a) + int(b))


QUESTIONS = [Q(f"toy/{i}", f"What is {i} plus {i + 3}?", str(2 * i + 3)) for i in range(1, 9)]
QUESTIONS += [Q(f"toy/{i}", f"What is {i} plus {i + 4}?", str(2 * i + 4)) for i in range(9, 17)]


def committee(names=("a", "b"), gold_of=toy_gold):
    return {name: Role(name, RuleLM(toy_teacher(gold_of))) for name in names}


def settings(optimizer, **overrides):
    small = dict(optimizer=optimizer, train_size=4, dev_size=4, seed=1, max_bootstrapped_demos=2,
                 num_candidate_programs=2, num_candidates=2, num_trials=4, max_metric_calls=24, threads=2)
    return OptimizeConfig(**(small | overrides))


# --------------------------------------------------------------------------------------------
# Metrics on hand-made cases


def review_case(correct):
    return reviewer_example(QUESTIONS[0], "1 + 4 = 5", "5" if correct else "6", correct, "a")


def test_reviewer_metric_punishes_false_accepts_more_than_false_rejects():
    metric = ReviewerMetric(AcceptanceGate(threshold=3), (1, 5), false_accept_cost=3)
    true_accept = metric(review_case(True), dspy.Prediction(critique="ok", score=5))
    true_reject = metric(review_case(False), dspy.Prediction(critique="bad", score=1))
    false_reject = metric(review_case(True), dspy.Prediction(critique="bad", score=2))
    false_accept = metric(review_case(False), dspy.Prediction(critique="ok", score=4))
    at_threshold = metric(review_case(False), dspy.Prediction(critique="meh", score=3))  # gate: mean > 3
    assert true_accept.score == true_reject.score == at_threshold.score == 1.0
    assert false_accept.score == 0.0 < false_reject.score < 1.0
    assert false_reject.score == pytest.approx(2 / 3)
    assert "ACCEPT a flawed rationale" in false_accept.feedback and "WRONG" in false_accept.feedback
    assert "too harsh" in false_reject.feedback
    # An unusable score is as bad as a false accept; with cost 1 both errors weigh the same.
    assert metric(review_case(True), dspy.Prediction(critique="?", score="high")).score == 0.0
    assert outcome_value("false_reject", 1.0) == outcome_value("false_accept", 1.0) == 0.0
    with pytest.raises(ValueError, match="false_accept_cost"):
        ReviewerMetric(AcceptanceGate(), false_accept_cost=0.5)


def test_reviewer_metric_mean_is_a_weighted_error_rate():
    metric = ReviewerMetric(AcceptanceGate(threshold=3), (1, 5), false_accept_cost=3)
    cases = [(True, 5), (True, 1), (False, 5), (False, 1)]  # TA, FR, FA, TR
    scores = [float(metric(review_case(c), dspy.Prediction(critique="x", score=s))) for c, s in cases]
    assert sum(scores) / 4 == pytest.approx(1 - (1 + 3 * 1) / (3 * 4))


def test_writer_metric_scores_answer_first_then_peer_reviews():
    task, question = svamp(), QUESTIONS[0]
    example = dspy.Example(example_id=question.id, question=question.question, answer_format="n", gold="5")

    def peers(score):
        return lambda _example, _prediction: [PeerReview("b", score, "step 2 is unclear")]

    wrong = WriterMetric(task, {question.id: question}, peers(5))(example, dspy.Prediction(rationale="1+4=6", answer="6"))
    assert wrong.score == 0.0 and "correct answer is 5" in wrong.feedback
    right = dspy.Prediction(rationale="1 + 4 = 5", answer="5")
    top = WriterMetric(task, {question.id: question}, peers(5))(example, right)
    low = WriterMetric(task, {question.id: question}, peers(2))(example, right)
    assert top.score == 1.0 and low.score == pytest.approx(0.5 + 0.5 * 1 / 4)
    assert "b gave 2: step 2 is unclear" in low.feedback  # GEPA sees the peers' critiques
    assert WriterMetric(task, {question.id: question}, peers(None))(example, right).score == 0.5
    assert WriterMetric(task, {question.id: question}, None)(example, right).score == 1.0


# --------------------------------------------------------------------------------------------
# Every optimizer path: compile, save, load into a fresh program


@pytest.mark.parametrize("optimizer", ["bootstrap", "random_search", "mipro", "gepa"])
def test_optimizer_compiles_saves_and_the_program_loads_it(optimizer, tmp_path):
    program = MAPDProgram(svamp(), committee())
    reflection = RuleLM(toy_teacher(toy_gold))
    report = optimize_teachers(program, QUESTIONS, settings(optimizer), tmp_path, reflection_lm=reflection)
    rows = {(row["teacher"], row["module"]): row for row in report["modules"]}
    assert set(rows) == {("a", "writer"), ("b", "writer"), ("a", "reviewer"), ("b", "reviewer")}
    assert report["reviewer_examples"].startswith("rationales written")
    for row in rows.values():
        assert row["train"] == 4 and row["dev"] == 4
        assert row["after"] == 1.0 and row["before"] < 1.0, row  # the strict prompt was found
        assert row["demos"] > 0 or row["instructions_changed"], row
    reviewer_row = rows[("a", "reviewer")]
    assert reviewer_row["outcomes_after"].get("false_accept", 0) == 0 < reviewer_row["outcomes_before"]["false_accept"]
    if optimizer in ("mipro", "gepa"):
        assert reflection.prompts  # the proposer/reflection model was used
    if optimizer == "gepa":  # the metrics' feedback reached the reflection model
        seen = "\n".join(reflection.prompts)
        assert "ACCEPT a flawed rationale" in seen and "the correct answer is" in seen
        assert "gave 5: every step checks out" in seen  # a peer reviewer's critique of a rationale

    loaded = MAPDProgram(svamp(), committee(), programs_dir=str(tmp_path))
    for (teacher, kind), row in rows.items():
        saved = json.loads(program_path(tmp_path, teacher, kind).read_text())
        module = getattr(loaded, f"{kind}s")[teacher]
        (name, predictor), = module.named_predictors()
        assert len(predictor.demos) == row["demos"] == len(saved[name]["demos"])
        assert predictor.signature.instructions == saved[name]["signature"]["instructions"]
        assert (STRICT in predictor.signature.instructions) == row["instructions_changed"]
        assert predictor.lm is loaded.roles[teacher].lm  # re-bound to the teacher's model after loading
    # And the loaded prompts are what the program's calls use: the loaded reviewer is now strict.
    out = loaded(example=QUESTIONS[0], student_response="1 + 4 = 6")
    assert all(decision.accepted for decision in out.decisions)


# --------------------------------------------------------------------------------------------
# Saved state: no keys, structure checked


def test_saved_program_holds_no_api_key_or_endpoint(tmp_path, monkeypatch):
    canary = "sk-canary-0123456789abcdef"
    monkeypatch.setenv("MAPD_TEST_CANARY_KEY", canary)
    import os

    lm = dspy.LM("openai/gpt-4o-mini", api_key=os.environ["MAPD_TEST_CANARY_KEY"], api_base="http://secret-host:9/v1")
    writer = bind(RationaleWriter(), Role("a", lm, structured_outputs=True))
    writer.write.demos = [dspy.Example(question="What is 1 plus 4?", answer_format="n", rationale="1+4=5", answer="5")]
    path = save_program(writer, tmp_path / "a.writer.json", "writer")
    text = path.read_text()
    assert canary not in text and "secret-host" not in text and "gpt-4o-mini" not in text
    fresh = load_program(RationaleWriter(), path)
    assert fresh.write.demos[0]["answer"] == "5" and fresh.write.lm is None


def test_state_structure_mismatch_is_a_clear_error_naming_the_file(tmp_path):
    writer = RationaleWriter()
    path = save_program(writer, tmp_path / "a.writer.json", "writer")
    with pytest.raises(ProgramStateError, match=r"a\.writer\.json.*predictors \['write'\].*Reviewer"):
        load_program(Reviewer(), path)
    state = json.loads(path.read_text())
    state["write"]["signature"]["fields"].pop()
    state["metadata"]["mapd"]["structure"]["write"]["outputs"] = ["rationale"]
    path.write_text(json.dumps(state))
    with pytest.raises(ProgramStateError, match=r"a\.writer\.json: predictor 'write' was saved with signature fields"):
        load_program(RationaleWriter(), path)
    # Through the program: a writer state saved as b's reviewer names that file.
    save_program(RationaleWriter(), tmp_path / "programs" / "b.reviewer.json", "writer")
    with pytest.raises(ProgramStateError, match=r"b\.reviewer\.json"):
        MAPDProgram(svamp(), committee(), programs_dir=str(tmp_path / "programs"))
    with pytest.raises(ProgramStateError, match="no such folder"):
        apply_saved_programs(MAPDProgram(svamp(), committee()), tmp_path / "missing")


def test_run_with_bad_programs_path_fails_before_writing(tmp_path):
    from mapd_dspy.engine import Run, RunError

    (tmp_path / "progs").mkdir()
    save_program(Reviewer(), tmp_path / "progs" / "smol-a.writer.json", "reviewer")
    config = load_config(None, [f"runs_dir={tmp_path / 'runs'}", f"task.data_dir={SHARED_DATA}",
                                f"programs.path={tmp_path / 'progs'}"], limit=2)
    with pytest.raises(RunError, match=r"smol-a\.writer\.json"):
        Run(config).execute(("exam",))
    assert not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------------------------
# The CLI stage, on real SVAMP questions, with the committee swapped for the rule LM


def test_cli_optimize_stage_writes_programs_and_report_then_a_run_loads_them(tmp_path, monkeypatch, capsys):
    from mapd_dspy import engine, run
    from mapd_dspy.tasks import get_task

    assert "optimize" in run.STAGE_CHOICES and "optimize" not in engine.STAGES  # not part of `--stage all`
    questions = get_task("svamp").load("train", data_dir=str(SHARED_DATA))
    gold_by_question = {q.question: q.gold for q in questions}

    def svamp_gold(text):
        return next(gold for question, gold in gold_by_question.items() if question in text)

    roles = committee(("smol-a", "smol-b"), svamp_gold)
    monkeypatch.setattr(engine.ModelPool, "teachers", lambda self, configs: {c.name: roles[c.name] for c in configs})
    common = [f"runs_dir={tmp_path}", "name=opt", f"task.data_dir={SHARED_DATA}"]
    overrides = common + ["optimize.train_size=3", "optimize.dev_size=3", "optimize.modules=['reviewer']",
                          "optimize.teachers=['smol-a']"]
    argv = ["--stage", "optimize"] + [arg for o in overrides for arg in ("--set", o)]
    assert run.main(argv) == 0
    report = json.loads((tmp_path / "opt" / "optimize.json").read_text())
    (row,) = report["modules"]
    assert (row["teacher"], row["module"], row["optimizer"]) == ("smol-a", "reviewer", "bootstrap")
    assert "prompt optimization" in capsys.readouterr().err
    assert (tmp_path / "opt" / "programs" / "smol-a.reviewer.json").exists()

    config = load_config(None, common + [f"programs.path={tmp_path / 'opt' / 'programs'}"])
    program = engine.Run(config)._program(engine.Ledger(), pool=None)
    assert len(program.reviewers["smol-a"].review.demos) == row["demos"] > 0
    assert program.reviewers["smol-b"].review.demos == []


def test_cli_optimize_uses_the_configured_reflection_model(tmp_path, monkeypatch):
    from mapd_dspy import engine, run

    questions = QUESTIONS
    roles = committee(("smol-a", "smol-b"))
    roles["optimize-reflection"] = Role("optimize-reflection", RuleLM(toy_teacher(toy_gold)))
    requested = []

    def teachers(self, configs):
        requested.extend((c.name, c.model, c.temperature) for c in configs)
        return {c.name: roles[c.name] for c in configs}

    monkeypatch.setattr(engine.ModelPool, "teachers", teachers)
    monkeypatch.setattr(engine.Run, "load_examples", lambda self, split=None, limit=-1: questions)
    overrides = [f"runs_dir={tmp_path}", "optimize.optimizer=gepa", "optimize.reflection.model=openai/reflector",
                 "optimize.train_size=4", "optimize.dev_size=4", "optimize.seed=1", "optimize.max_metric_calls=20",
                 "optimize.modules=['writer']", "optimize.teachers=['smol-b']"]
    assert run.main(["--stage", "optimize"] + [arg for o in overrides for arg in ("--set", o)]) == 0
    assert ("optimize-reflection", "openai/reflector", 1.0) in requested
    assert roles["optimize-reflection"].lm.prompts  # GEPA reflected with it
    (row,) = json.loads((tmp_path / "default" / "optimize.json").read_text())["modules"]
    assert row["instructions_changed"] and row["after"] > row["before"]


@pytest.mark.parametrize("override, message", [
    ("optimize.teachers=['nobody']", "optimize.teachers: unknown teacher(s) ['nobody']"),
    ("optimize.reflection.api_key_env=MAPD_TEST_NOT_SET", "environment variable MAPD_TEST_NOT_SET is not set"),
    ("optimize.optimizer=simba", "optimize.optimizer"),
])
def test_cli_optimize_config_errors_exit_2(tmp_path, capsys, override, message):
    from mapd_dspy import run

    argv = ["--stage", "optimize", "--set", f"runs_dir={tmp_path}", "--set", f"task.data_dir={SHARED_DATA}",
            "--set", override]
    assert run.main(argv) == 2
    assert message in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "default").exists()
