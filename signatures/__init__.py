"""DSPy signatures for the MAPD roles: student, teacher (mistake explanation, rationale), reviewer,
and the student-side prompt of the learn-from-mistake training task."""

from mapd_dspy.signatures.mapd import (
    ExplainMistake,
    LearnFromMistake,
    ReviewRationale,
    SolveQuestion,
    WriteRationale,
)

__all__ = ["ExplainMistake", "LearnFromMistake", "ReviewRationale", "SolveQuestion", "WriteRationale"]
