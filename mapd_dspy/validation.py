"""Shared pydantic base for config sections: unknown keys are errors and so are booleans for numbers.

pydantic's lax mode reads ``true`` as 1 for an int field, so ``task.limit = true`` would quietly
examine one question. Config sections derive from :class:`StrictSection` to refuse that.
"""

from __future__ import annotations

import typing

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator


def _accepts_bool(annotation: object) -> bool:
    if annotation is bool:
        return True
    return any(_accepts_bool(arg) for arg in typing.get_args(annotation))


class StrictSection(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_other_types(cls, value: object, info: ValidationInfo) -> object:
        field = cls.model_fields.get(info.field_name or "")
        if isinstance(value, bool) and field is not None and not _accepts_bool(field.annotation):
            raise ValueError(f"expected {getattr(field.annotation, '__name__', field.annotation)}, not a boolean")
        return value
