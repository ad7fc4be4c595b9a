"""The MAPD program: teach one student mistake with a committee, peer-review, and gate.

Input: a task example and the student's (wrong) response.
Output (``dspy.Prediction``): ``explanations`` {teacher: Record}, ``rationales`` {teacher: Record},
``reviews`` {(author, reviewer): Record} and ``decisions`` [GateDecision].

Every LLM call goes through the :class:`~mapd_dspy.programs.ledger.Ledger`, so each result is a
record on disk before it is used and nothing already paid for is asked again.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import dspy

from mapd_dspy.programs.gate import AcceptanceGate, GateDecision
from mapd_dspy.programs.ledger import InvalidOutput, Ledger, record_key
from mapd_dspy.programs.modules import MistakeExplainer, RationaleWriter, Reviewer, StudentExam
from mapd_dspy.programs.roles import Role, bind, call_module
from mapd_dspy.records import Record

Retry = Literal["none", "best_of_n", "refine"]


def read_answer(task: Any, example: Any, answer_text: object, reasoning: str = "") -> str | None:
    """The normalised final answer: the ``answer`` field first, then free-text extraction."""
    answer = task.normalize(answer_text) if answer_text is not None else None
    if answer is None:
        answer = task.extract_answer(str(answer_text or ""), example)
    if answer is None and reasoning:
        answer = task.extract_answer(reasoning, example)
    return answer


def checked_text(prediction: dspy.Prediction, field: str) -> str:
    """The stripped text of an output field; empty text or the echoed template (``{field}``) is invalid."""
    text = str(prediction.get(field) or "").strip()
    if not text:
        raise InvalidOutput(f"empty {field}")
    if text.strip("{} ") == field:
        raise InvalidOutput(f"the model echoed the output template {text!r} instead of writing a {field}")
    return text


def answer_fields(task: Any, example: Any, text_field: str):
    """A ``finish`` function for solve-style predictions (exam, rationale): answer + correctness."""

    def finish(prediction: dspy.Prediction) -> dict[str, Any]:
        text = checked_text(prediction, text_field)
        answer = read_answer(task, example, prediction.get("answer"), text)
        if answer is None:
            raise InvalidOutput(f"no {task.name} answer found in {str(prediction.get('answer'))[:80]!r}")
        output = {text_field: text, "answer": str(prediction.get("answer"))}
        return {"output": output, "answer": answer, "correct": task.is_correct(answer, example)}

    return finish


def student_response_text(record: Record) -> str | None:
    """What the student said, for the teacher to explain; a parse failure still has its raw text."""
    if record.ok:
        return f"{record.output.get('reasoning', '').strip()}\nFinal answer: {record.output.get('answer', '')}".strip()
    if record.failure is not None and record.failure.kind != "lm_error" and record.failure.raw:
        return record.failure.raw
    return None


def examine(task: Any, example: Any, student: Role, ledger: Ledger, module: StudentExam | None = None) -> Record:
    """Exam stage for one question: the student's answer, extracted and scored, as a record."""
    module = module or bind(StudentExam(), student)
    return ledger.call(
        record_key(example.id, "exam"),
        student,
        module,
        {"question": example.question, "answer_format": task.answer_format},
        answer_fields(task, example, "reasoning"),
    )


class MAPDProgram(dspy.Module):
    def __init__(
        self,
        task: Any,
        teachers: dict[str, Role],
        gate: AcceptanceGate | None = None,
        scale: tuple[int, int] = (1, 5),
        ledger: Ledger | None = None,
        retry: Retry = "none",
        retry_attempts: int = 3,
    ):
        super().__init__()
        self.gate = gate or AcceptanceGate()
        if len(teachers) < 2 and self.gate.peer_review:
            raise ValueError("MAPD needs at least two teachers: each rationale is reviewed by the others")
        self.task = task
        self.roles = dict(teachers)
        self.ledger = ledger or Ledger()
        self.retry, self.retry_attempts = retry, retry_attempts
        self.explainers = {name: bind(MistakeExplainer(), role) for name, role in self.roles.items()}
        self.writers = {name: bind(RationaleWriter(), role) for name, role in self.roles.items()}
        self.reviewers = {}
        for name, role in self.roles.items():
            reviewer = Reviewer(*scale)
            self.reviewers[name] = bind(reviewer, role, {"score": reviewer.score_schema})

    def peers_of(self, author: str) -> list[str]:
        """Every *other* teacher: nobody reviews its own rationale."""
        return [name for name in self.roles if name != author]

    def forward(self, example: Any, student_response: str, stages: Iterable[str] = ("teach", "review")):
        stages = set(stages)
        teach, review = "teach" in stages, "review" in stages
        explanations = {t: self._explain(t, example, student_response, teach) for t in self.roles}
        rationales = {t: self._write(t, example, teach) for t in self.roles}
        reviews: dict[tuple[str, str], Record] = {}
        for author, rationale in rationales.items():
            if rationale is None or not rationale.ok or not self.gate.peer_review:
                continue
            for reviewer in self.peers_of(author):
                record = self._review(reviewer, example, rationale, review)
                if record is not None:
                    reviews[(author, reviewer)] = record
        decisions = self.decide(rationales, reviews)
        return dspy.Prediction(explanations=explanations, rationales=rationales, reviews=reviews, decisions=decisions)

    def decide(self, rationales: dict[str, Record | None], reviews: dict[tuple[str, str], Record]) -> list[GateDecision]:
        decisions = []
        for author, rationale in rationales.items():
            if rationale is None:
                continue
            own_reviews = [record for (a, _), record in reviews.items() if a == author]
            decisions.append(self.gate.decide(rationale, own_reviews))
        return decisions

    # -- one call each -------------------------------------------------------------------

    def _explain(self, teacher: str, example: Any, student_response: str, allowed: bool) -> Record | None:
        def finish(prediction: dspy.Prediction) -> dict[str, Any]:
            return {"output": {"explanation": checked_text(prediction, "explanation")}}

        inputs = {"question": example.question, "student_answer": student_response, "correct_answer": example.gold}
        key = record_key(example.id, "explain", teacher)
        return self.ledger.call(key, self.roles[teacher], self.explainers[teacher], inputs, finish, allowed)

    def _write(self, teacher: str, example: Any, allowed: bool) -> Record | None:
        inputs = {"question": example.question, "answer_format": self.task.answer_format}
        key = record_key(example.id, "rationale", teacher)
        module = self._rationale_module(teacher, example)
        finish = answer_fields(self.task, example, "rationale")
        return self.ledger.call(key, self.roles[teacher], module, inputs, finish, allowed)

    def _review(self, reviewer: str, example: Any, rationale: Record, allowed: bool) -> Record | None:
        module = self.reviewers[reviewer]

        def finish(prediction: dspy.Prediction) -> dict[str, Any]:
            score = module.validated_score(prediction.get("score"))
            output = {"critique": checked_text(prediction, "critique"), "raw_score": prediction.get("score")}
            return {"output": output, "score": score}

        key = record_key(example.id, "review", rationale.teacher, reviewer)
        inputs = self._review_inputs(example, rationale.output["rationale"], rationale.output["answer"])
        return self.ledger.call(key, self.roles[reviewer], module, inputs, finish, allowed)

    @staticmethod
    def _review_inputs(example: Any, rationale: str, answer: str) -> dict[str, str]:
        return {"question": example.question, "rationale": rationale, "proposed_answer": answer}

    # -- optional retry: BestOfN / Refine with the peer score as reward --------------------------

    def _rationale_module(self, author: str, example: Any) -> dspy.Module:
        writer = self.writers[author]
        if self.retry == "none":
            return writer
        wrapper = dspy.BestOfN if self.retry == "best_of_n" else dspy.Refine
        # BestOfN/Refine stop at reward >= threshold; the strict rule needs a hair more.
        threshold = self.gate.threshold + (1e-9 if self.gate.rule == "gt" else 0.0)

        def peer_reward(_inputs: dict, prediction: dspy.Prediction) -> float:
            return self.peer_reward(author, example, prediction)

        return wrapper(module=writer, N=self.retry_attempts, reward_fn=peer_reward, threshold=threshold)

    def peer_reward(self, author: str, example: Any, prediction: dspy.Prediction) -> float:
        """The gate as a number: mean peer score, or below the scale if the gate would reject anyway.

        The reward calls are not recorded: with DSPy's cache on, the recorded review of the chosen
        attempt is then served from the cache rather than paid twice.
        """
        below_scale = float(self.reviewers[author].scale_min - 1)
        answer = read_answer(self.task, example, prediction.get("answer"), str(prediction.get("rationale") or ""))
        if self.gate.require_correct_answer and not self.task.is_correct(answer, example):
            return below_scale
        inputs = self._review_inputs(example, str(prediction.get("rationale") or ""), str(prediction.get("answer")))
        scores = []
        for peer in self.peers_of(author):
            result = call_module(self.roles[peer], self.reviewers[peer], **inputs)
            try:
                if result.prediction is not None:
                    scores.append(self.reviewers[peer].validated_score(result.prediction.get("score")))
            except InvalidOutput:
                continue
        return sum(scores) / len(scores) if scores else below_scale
