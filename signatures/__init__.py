"""DSPy signatures for the MAPD roles: student, teacher (mistake explanation, rationale), reviewer."""

from mapd_dspy.signatures.mapd import ExplainMistake, ReviewRationale, SolveQuestion, WriteRationale

__all__ = ["ExplainMistake", "ReviewRationale", "SolveQuestion", "WriteRationale"]
