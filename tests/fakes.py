"""Test doubles: a tiny arithmetic task and DummyLM-backed roles."""

from __future__ import annotations

from dataclasses import dataclass

from dspy.utils.dummies import DummyLM

from mapd_dspy.programs import Role
from mapd_dspy.tasks import get_task


@dataclass(frozen=True)
class Q:
    id: str
    question: str
    gold: str
    options: tuple = ()


def svamp():
    return get_task("svamp")


class ScriptedLM(DummyLM):
    """DummyLM whose copies share one script: dspy.BestOfN copies the LM per attempt, and the
    attempts must consume the next scripted answers rather than start the script again."""

    def copy(self, **kwargs):
        return self


def role(name: str, answers: list[dict]) -> Role:
    """A role whose model replies with ``answers`` in call order (ChatAdapter format)."""
    return Role(name, ScriptedLM(answers))
