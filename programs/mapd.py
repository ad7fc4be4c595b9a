"""The MAPD program: teach one student mistake with a committee, peer-review, and gate.

Input: a task example and the student's (wrong) response.
Output (``dspy.Prediction``): ``explanations`` {teacher: Record}, ``rationales`` {teacher: Record},
``reviews`` {(author, reviewer): Record} and ``decisions`` [GateDecision].

Every LLM call goes through the :class:`~mapd_dspy.programs.ledger.Ledger`, so each result is a
record on disk before it is used and nothing already paid for is asked again.
"""

from __future__ import annotations

import contextvars
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Executor, Future
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


class _Calls:
    """The calls of one question.

    On a pool they run at once, as far as their dependencies allow. Without one they run one
    after another, in the order submitted, when :meth:`run_queued` is called: the reference
    code's order (explanations, rationales, then reviews), deterministic for scripted test LMs.
    """

    def __init__(self, pool: Executor | None):
        self.pool = pool
        self.futures: list[Future] = []
        self._queued: deque[tuple[Future, Callable[..., Any], tuple]] = deque()

    def submit(self, function: Callable[..., Any], *args: Any) -> Future:
        if self.pool is None:
            future: Future = Future()
            self._queued.append((future, function, args))
        else:
            # Each call runs in a copy of its submitter's context, so DSPy settings carry over.
            future = self.pool.submit(contextvars.copy_context().run, function, *args)
        self.futures.append(future)
        return future

    def run_queued(self) -> None:
        while self._queued:
            future, function, args = self._queued.popleft()
            if future.set_running_or_notify_cancel():
                future.set_result(function(*args))  # an exception propagates: forward cancels the rest

    def cancel_pending(self) -> None:
        for future in list(self.futures):
            future.cancel()


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
        executor: Executor | None = None,
        programs_dir: str | None = None,
    ):
        super().__init__()
        self.gate = gate or AcceptanceGate()
        if len(teachers) < 2 and self.gate.peer_review:
            raise ValueError("MAPD needs at least two teachers: each rationale is reviewed by the others")
        self.task = task
        self.roles = dict(teachers)
        self.ledger = ledger or Ledger()
        self.retry, self.retry_attempts = retry, retry_attempts
        # Where the calls of a question run: a pool shared across questions (the engine's, sized
        # engine.concurrency), or None: one after another. forward() waits on the pool, so it must
        # not itself run on one of that pool's threads.
        self.executor = executor
        self.explainers = {name: bind(MistakeExplainer(), role) for name, role in self.roles.items()}
        self.writers = {name: bind(RationaleWriter(), role) for name, role in self.roles.items()}
        self.reviewers = {}
        for name, role in self.roles.items():
            reviewer = Reviewer(*scale)
            self.reviewers[name] = bind(reviewer, role, {"score": reviewer.score_schema})
        if programs_dir is not None:
            # Compiled prompts (demos, instructions) from `--stage optimize`, checked and re-bound.
            from mapd_dspy.programs.optimize import apply_saved_programs

            apply_saved_programs(self, programs_dir)

    def peers_of(self, author: str) -> list[str]:
        """Every *other* teacher: nobody reviews its own rationale."""
        return [name for name in self.roles if name != author]

    def forward(self, example: Any, student_response: str, stages: Iterable[str] = ("teach", "review")):
        """Teach and review one mistake, each call as soon as what it needs exists.

        With an ``executor``, all explanations and rationales start at once and the reviews of a
        rationale start as soon as its record is stored, without waiting for the other teachers.
        Without one, the calls run one after another: explanations, rationales, then reviews.
        """
        stages = set(stages)
        teach, review = "teach" in stages, "review" in stages
        calls = _Calls(self.executor if teach or review else None)
        try:
            explaining = {t: calls.submit(self._explain, t, example, student_response, teach) for t in self.roles}
            writing = {t: calls.submit(self._write_then_review, t, example, calls, teach, review) for t in self.roles}
            calls.run_queued()
            rationales, reviewing = {}, {}
            for author, future in writing.items():
                rationales[author], reviewing_author = future.result()
                reviewing.update(reviewing_author)
            explanations = {t: future.result() for t, future in explaining.items()}
            reviews = {pair: record for pair, future in reviewing.items() if (record := future.result()) is not None}
        except BaseException:
            calls.cancel_pending()  # e.g. the budget ran out: start nothing more for this question
            raise
        decisions = self.decide(rationales, reviews)
        return dspy.Prediction(explanations=explanations, rationales=rationales, reviews=reviews, decisions=decisions)

    def _write_then_review(
        self, author: str, example: Any, calls: "_Calls", teach: bool, review: bool
    ) -> tuple[Record | None, dict[tuple[str, str], Future]]:
        """The rationale, then its peer reviews *submitted* (not awaited: no pool thread waits on another)."""
        rationale = self._write(author, example, teach)
        if rationale is None or not rationale.ok or not self.gate.peer_review:
            return rationale, {}
        reviewing = {
            (author, reviewer): calls.submit(self._review, reviewer, example, rationale, review)
            for reviewer in self.peers_of(author)
        }
        return rationale, reviewing

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
