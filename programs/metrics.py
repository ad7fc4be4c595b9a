"""What "better" means for MAPD's teacher prompts: metrics for DSPy's optimizers.

Every metric takes the full signature DSPy's optimizers call with,
``(example, prediction, trace=None, pred_name=None, pred_trace=None)`` (GEPA's feedback-metric
protocol; BootstrapFewShot, MIPROv2 and ``dspy.Evaluate`` pass the first two or three), and returns
``dspy.Prediction(score=<float in [0, 1]>, feedback=<text>)``. A Prediction with a ``score`` adds and
compares as that score, so the same object serves the optimizers that want a number, while GEPA
also reads the feedback and hands it to its reflection model.

**Reviewer** (:class:`ReviewerMetric`). A review is right when "its score passes the gate's
threshold" agrees with "the rationale's answer is correct". The two ways of being wrong do not cost
the same: a *false accept* puts a flawed rationale into the student's training data, the very failure
MAPD's peer review exists to stop (ARCHITECTURE.md section 5: the reference gate kept 162 wrong
rationales out of 826), while a *false reject* only loses one of several teachers' rationales for a
question. So a false accept costs ``false_accept_cost`` (default 3) and a false reject costs 1, and the
per-example score is ``1 - cost / false_accept_cost``: agreement 1, false reject ``1 - 1/c``, false
accept 0. Over a set, the mean is ``1 - (FR + c * FA) / (c * N)``, a weighted error rate that rewards
precision of acceptance first. A score that is not an integer is as bad as a false accept (the gate
cannot use it). The feedback tells the reflection model whether the rationale was right and what the
gate made of the score.

**Rationale writer** (:class:`WriterMetric`). A rationale with a wrong (or no) answer scores 0: the gate
rejects it whatever its peers say. A right one scores ``0.5 + 0.5 * m``, where ``m`` is the mean score of
the *other* teachers' reviewers scaled to [0, 1] (0.5 when no peer gave a valid score; 1.0 when no peers
are configured). The feedback is the gold answer when the answer is wrong, else the peers' critiques.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import dspy

from mapd_dspy.programs.gate import AcceptanceGate
from mapd_dspy.programs.ledger import InvalidOutput
from mapd_dspy.programs.mapd import read_answer
from mapd_dspy.programs.modules import Reviewer

Outcome = Literal["true_accept", "true_reject", "false_accept", "false_reject", "invalid"]


def review_outcome(accepts: bool, correct: bool) -> Outcome:
    if accepts:
        return "true_accept" if correct else "false_accept"
    return "false_reject" if correct else "true_reject"


def outcome_value(outcome: Outcome, false_accept_cost: float) -> float:
    """1 for agreement, 0 for a false accept (or an unusable score), ``1 - 1/c`` for a false reject."""
    cost = {"false_accept": false_accept_cost, "invalid": false_accept_cost, "false_reject": 1.0}.get(outcome, 0.0)
    return 1.0 - cost / false_accept_cost


class ReviewerMetric:
    """Scores one review of a rationale whose correctness is known (``example.correct``)."""

    def __init__(self, gate: AcceptanceGate, scale: tuple[int, int] = (1, 5), false_accept_cost: float = 3.0):
        if false_accept_cost < 1:
            raise ValueError(f"false_accept_cost must be >= 1 (a false accept is the worse error), got {false_accept_cost}")
        self.gate, self.false_accept_cost = gate, false_accept_cost
        self._validator = Reviewer(*scale)

    def outcome(self, example: Any, prediction: dspy.Prediction) -> Outcome:
        try:
            score = self._validator.validated_score(prediction.get("score"))
        except InvalidOutput:
            return "invalid"
        return review_outcome(self.gate.passes(score), bool(example.correct))

    def __call__(self, example, prediction, trace=None, pred_name=None, pred_trace=None) -> dspy.Prediction:
        outcome = self.outcome(example, prediction)
        value = outcome_value(outcome, self.false_accept_cost)
        return dspy.Prediction(score=value, feedback=self._feedback(example, prediction, outcome))

    def _feedback(self, example: Any, prediction: dspy.Prediction, outcome: Outcome) -> str:
        answer, gold = example.proposed_answer, example.get("gold", "unknown")
        truth = f"The rationale's answer {answer!r} is {'correct' if example.correct else 'WRONG'} (gold answer: {gold})."
        if outcome == "invalid":
            return f"{truth} The score {prediction.get('score')!r} is not an integer on the scale, so it is unusable."
        score = prediction.get("score")
        verdicts = {
            "true_accept": f"Your score {score} lets the gate accept it: right.",
            "true_reject": f"Your score {score} makes the gate reject it: right.",
            "false_accept": f"Your score {score} lets the gate ({self.gate.describe()}) ACCEPT a flawed rationale: the "
            "worst error, it would teach the student a wrong solution. Check every step and the final answer.",
            "false_reject": f"Your score {score} makes the gate reject a correct rationale: too harsh (a lesser error).",
        }
        return f"{truth} {verdicts[outcome]}"


@dataclass(frozen=True)
class PeerReview:
    reviewer: str
    score: int | None
    critique: str


PeerReviewFn = Callable[[Any, dspy.Prediction], list[PeerReview]]


class WriterMetric:
    """Scores a rationale: right answer first, then how the other teachers' reviewers grade it.

    ``examples`` maps ``example.example_id`` to the task example (gold answer, options);
    ``peer_reviews(task_example, prediction)`` asks the other teachers' reviewers (None: no peers).
    """

    def __init__(self, task: Any, examples: dict[str, Any], peer_reviews: PeerReviewFn | None = None,
                 scale: tuple[int, int] = (1, 5)):
        self.task, self.examples, self.peer_reviews, self.scale = task, examples, peer_reviews, scale

    def __call__(self, example, prediction, trace=None, pred_name=None, pred_trace=None) -> dspy.Prediction:
        task_example = self.examples[example.example_id]
        rationale = str(prediction.get("rationale") or "").strip()
        answer = read_answer(self.task, task_example, prediction.get("answer"), rationale)
        if not rationale or not self.task.is_correct(answer, task_example):
            return dspy.Prediction(score=0.0, feedback=(
                f"The final answer {answer!r} is wrong: the correct answer is {task_example.gold}. A rationale with a "
                "wrong answer is rejected whatever its reviewers say; find the step that goes wrong."))
        if self.peer_reviews is None:
            return dspy.Prediction(score=1.0, feedback="The final answer is correct.")
        reviews = self.peer_reviews(task_example, prediction)
        scores = [review.score for review in reviews if review.score is not None]
        if not scores:
            return dspy.Prediction(score=0.5, feedback="The answer is correct, but no peer reviewer gave a valid score.")
        low, high = self.scale
        mean = sum(scores) / len(scores)
        critiques = "\n".join(f"- {r.reviewer} gave {r.score}: {r.critique}" for r in reviews)
        feedback = f"The answer is correct. Peer reviews (mean {mean:.2f} on {low}-{high}):\n{critiques}"
        return dspy.Prediction(score=0.5 + 0.5 * (mean - low) / (high - low), feedback=feedback)
