"""The acceptance gate: the hard rule that decides which teacher rationales are kept.

``dspy.BestOfN`` / ``dspy.Refine`` return their best attempt even when it misses the threshold,
so they cannot enforce it; this gate does. A rationale is accepted iff

* the rationale call succeeded,
* at least one peer review produced a valid score,
* the mean of the valid peer scores passes the threshold (``> t`` or ``>= t``), and
* (by default) the rationale's extracted answer matches the gold answer: the reference code's gate
  kept 162 of 826 rationales whose answer was wrong (ARCHITECTURE.md section 5).

Decisions are pure functions of stored records, so a new threshold re-applies without any LLM call.

With ``peer_review=False`` the gate is the paper's no-review baselines: a rationale is accepted
iff its call succeeded and (by default) its answer is right.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from mapd_dspy.records import Record

Reason = Literal["accepted", "rationale_failed", "no_valid_reviews", "score_below_threshold", "wrong_answer"]


@dataclass(frozen=True)
class GateDecision:
    example_id: str
    teacher: str
    accepted: bool
    reason: Reason
    mean_score: float | None
    scores: dict[str, int] = field(default_factory=dict)
    answer_correct: bool | None = None


@dataclass(frozen=True)
class AcceptanceGate:
    threshold: float = 3.0
    rule: Literal["gt", "ge"] = "gt"
    require_correct_answer: bool = True
    peer_review: bool = True

    def passes(self, mean_score: float) -> bool:
        return mean_score > self.threshold if self.rule == "gt" else mean_score >= self.threshold

    def decide(self, rationale: Record, reviews: list[Record]) -> GateDecision:
        scores = {r.reviewer: r.score for r in reviews if r.ok and r.score is not None and r.reviewer != rationale.teacher}
        mean_score = sum(scores.values()) / len(scores) if scores else None

        def decision(accepted: bool, reason: Reason) -> GateDecision:
            return GateDecision(
                rationale.example_id, rationale.teacher, accepted, reason, mean_score, scores, rationale.correct
            )

        if not rationale.ok:
            return decision(False, "rationale_failed")
        if not self.peer_review:
            if self.require_correct_answer and not rationale.correct:
                return decision(False, "wrong_answer")
            return decision(True, "accepted")
        if mean_score is None:
            return decision(False, "no_valid_reviews")
        if not self.passes(mean_score):
            return decision(False, "score_below_threshold")
        if self.require_correct_answer and not rationale.correct:
            return decision(False, "wrong_answer")
        return decision(True, "accepted")

    def describe(self) -> str:
        if not self.peer_review:
            return "no peer review; answer == gold" if self.require_correct_answer else "no peer review; all rationales"
        op = ">" if self.rule == "gt" else ">="
        answer = " and answer == gold" if self.require_correct_answer else ""
        return f"mean peer score {op} {self.threshold:g}{answer}"
