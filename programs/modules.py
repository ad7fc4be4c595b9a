"""One small DSPy module per MAPD role.

Modules hold predictors only; which model answers is decided by binding a
:class:`~mapd_dspy.programs.roles.Role` to them, so the same program runs on a vLLM-served
SmolLM2, on OpenAI/Anthropic/Gemini teachers, or on DSPy's ``DummyLM`` in tests.
"""

from __future__ import annotations

import dspy

from mapd_dspy.programs.ledger import InvalidOutput
from mapd_dspy.signatures import ExplainMistake, ReviewRationale, SolveQuestion, WriteRationale


class StudentExam(dspy.Module):
    """The student answers a question with chain-of-thought: outputs ``reasoning``, ``answer``."""

    def __init__(self):
        super().__init__()
        self.solve = dspy.ChainOfThought(SolveQuestion)

    def forward(self, question: str, answer_format: str) -> dspy.Prediction:
        return self.solve(question=question, answer_format=answer_format)


class MistakeExplainer(dspy.Module):
    """A teacher explains the student's mistake, with the gold answer as a hint: outputs ``explanation``."""

    def __init__(self):
        super().__init__()
        self.explain = dspy.Predict(ExplainMistake)

    def forward(self, question: str, student_answer: str, correct_answer: str) -> dspy.Prediction:
        return self.explain(question=question, student_answer=student_answer, correct_answer=correct_answer)


class RationaleWriter(dspy.Module):
    """A teacher writes its own rationale without the gold answer: outputs ``rationale``, ``answer``."""

    def __init__(self):
        super().__init__()
        self.write = dspy.Predict(WriteRationale)

    def forward(self, question: str, answer_format: str) -> dspy.Prediction:
        return self.write(question=question, answer_format=answer_format)


class Reviewer(dspy.Module):
    """A teacher grades another teacher's rationale: outputs ``critique`` and an integer ``score``.

    DSPy does not enforce value ranges on output fields, so :meth:`validated_score` checks the
    score in code: a non-integer is an :class:`InvalidOutput`, an out-of-scale integer is clamped.
    """

    def __init__(self, scale_min: int = 1, scale_max: int = 5):
        super().__init__()
        self.scale_min, self.scale_max = scale_min, scale_max
        self.review = dspy.Predict(ReviewRationale)

    @property
    def scoring_scale(self) -> str:
        return (
            f"An integer from {self.scale_min} to {self.scale_max}: {self.scale_min} means the reasoning is wrong "
            f"or the answer does not follow; {self.scale_max} means every step is correct and clearly explained."
        )

    @property
    def score_schema(self) -> dict:
        """JSON-schema fragment restricting ``score`` to the scale (sent to vLLM's structured outputs)."""
        return {"type": "integer", "enum": list(range(self.scale_min, self.scale_max + 1))}

    def forward(self, question: str, rationale: str, proposed_answer: str) -> dspy.Prediction:
        return self.review(
            question=question, rationale=rationale, proposed_answer=proposed_answer, scoring_scale=self.scoring_scale
        )

    def validated_score(self, raw_score: object) -> int:
        if isinstance(raw_score, bool):
            raise InvalidOutput(f"score {raw_score!r} is not an integer")
        try:
            number = float(str(raw_score).strip())
        except ValueError:
            raise InvalidOutput(f"score {raw_score!r} is not an integer") from None
        if number != int(number):
            raise InvalidOutput(f"score {raw_score!r} is not an integer")
        return min(self.scale_max, max(self.scale_min, int(number)))
