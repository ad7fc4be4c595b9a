"""Datasets as tasks: loading, answer extraction and the metric, one file per dataset.

    >>> from mapd_dspy.tasks import get_task
    >>> task = get_task("gsm8k")
    >>> examples = task.load("test")              # ../shared/data/gsm8k, else the hub
    >>> task.is_correct(task.extract_answer(model_text, examples[0]), examples[0])

Adding a task:

1. Create one file ``mapd_dspy/tasks/<name>.py``.
2. In it, subclass :class:`Task` (usually together with the answer-kind mixin from
   ``answers.py``: ``NumericAnswers``, ``YesNoAnswers`` or ``OptionAnswers``), set the class
   attributes ``name``, ``hub_id`` and ``answer_format`` (and ``splits`` if not train/test), and
   implement ``load_local`` and ``example_from_hub_row``. Raise :class:`TaskDataError` naming the
   file, the row and the field for any bad data.
3. Decorate the class with ``@register_task`` (from ``mapd_dspy.tasks.registry``).
4. Import the module below so that registration happens on ``import mapd_dspy.tasks``.

``README.md`` beside this file documents the split rules of each dataset and source resolution.
"""

from mapd_dspy.tasks.base import Example, Task, TaskDataError
from mapd_dspy.tasks.registry import (
    UnknownTaskError,
    available_tasks,
    get_task,
    register_task,
)

# Imported for their @register_task side effect.
from mapd_dspy.tasks import gsm8k, logiqa, strategyqa, svamp  # noqa: E402,F401  isort: skip

__all__ = [
    "Example",
    "Task",
    "TaskDataError",
    "UnknownTaskError",
    "available_tasks",
    "get_task",
    "register_task",
]
