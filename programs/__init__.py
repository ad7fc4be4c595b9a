"""DSPy modules for MAPD: student exam, teacher roles, review panel and the gated MAPD program."""

from mapd_dspy.programs.gate import AcceptanceGate, GateDecision
from mapd_dspy.programs.ledger import InvalidOutput, Ledger
from mapd_dspy.programs.mapd import MAPDProgram, examine, read_answer, student_response_text
from mapd_dspy.programs.modules import MistakeExplainer, RationaleWriter, Reviewer, StudentExam
from mapd_dspy.programs.roles import Role, bind, call_module, output_schema

__all__ = [
    "AcceptanceGate",
    "GateDecision",
    "InvalidOutput",
    "Ledger",
    "MAPDProgram",
    "MistakeExplainer",
    "RationaleWriter",
    "Reviewer",
    "Role",
    "StudentExam",
    "bind",
    "call_module",
    "examine",
    "output_schema",
    "read_answer",
    "student_response_text",
]
