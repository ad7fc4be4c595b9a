"""Name -> Task class registry. Kept apart from ``__init__`` so task modules can import it
without importing the package's other task modules first (no import cycle)."""

from __future__ import annotations

from mapd_dspy.tasks.base import Task

_TASK_CLASSES: dict[str, type[Task]] = {}


class UnknownTaskError(KeyError, ValueError):
    """Raised by :func:`get_task` for a name that is not registered."""

    def __str__(self) -> str:
        # KeyError would show the message inside quotes; keep it readable.
        return str(self.args[0]) if self.args else ""


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: register a Task subclass under ``cls.name``; a taken name is an error."""
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise TypeError(f"register_task expects a Task subclass, got {cls!r}")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{cls.__name__} needs a non-empty class attribute `name`")
    if name in _TASK_CLASSES and _TASK_CLASSES[name] is not cls:
        taken_by = _TASK_CLASSES[name].__qualname__
        raise ValueError(f"task name {name!r} is already registered by {taken_by}")
    _TASK_CLASSES[name] = cls
    return cls


def get_task(name: str) -> Task:
    """A fresh instance of the task registered as ``name`` (case-insensitive)."""
    cls = _TASK_CLASSES.get(name) or _TASK_CLASSES.get(str(name).lower())
    if cls is None:
        raise UnknownTaskError(
            f"unknown task {name!r}; available tasks: {', '.join(available_tasks())}"
        )
    return cls()


def available_tasks() -> list[str]:
    """Registered task names, sorted."""
    return sorted(_TASK_CLASSES)
