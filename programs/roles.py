"""A *role* is a named model endpoint that DSPy modules call: the ``dspy.LM`` plus how to talk to it.

Small served models follow DSPy's text formats poorly, so for vLLM-served models the role sends
the signature's output schema as ``response_format`` and vLLM constrains decoding to it (see
ARCHITECTURE.md section 4). Whatever the model returns, :func:`call_module` turns the outcome
into either a prediction or a :class:`~mapd_dspy.records.Failure`: never an exception, never a
silent default.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import dspy
from dspy.utils.exceptions import AdapterParseError
from dspy.utils.usage_tracker import track_usage

from mapd_dspy.limits import ProviderLimiter
from mapd_dspy.records import Failure


@dataclass
class Role:
    name: str
    lm: dspy.BaseLM
    adapter: dspy.Adapter | None = None  # None: DSPy's default (ChatAdapter, JSON fallback)
    structured_outputs: bool = False
    limiter: ProviderLimiter | None = None  # this provider's in-flight / rpm / tpm limits

    @property
    def model(self) -> str:
        return getattr(self.lm, "model", type(self.lm).__name__)


def output_schema(signature: type[dspy.Signature], overrides: dict[str, dict[str, Any]] | None = None) -> dict:
    """JSON schema of a signature's output fields, in field order (reasoning comes first)."""
    overrides = overrides or {}
    properties = {}
    for name, info in signature.output_fields.items():
        json_type = {int: "integer", float: "number", bool: "boolean"}.get(info.annotation, "string")
        properties[name] = overrides.get(name, {"type": json_type})
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
    }


def bind(module: dspy.Module, role: Role, schema_overrides: dict[str, dict[str, Any]] | None = None) -> dspy.Module:
    """Point every predictor of ``module`` at the role's LM (and its output schema, if structured).

    ``schema_overrides`` tightens fields of the schema sent to vLLM, e.g. a score enum.
    """
    for _, predictor in module.named_predictors():
        predictor.lm = role.lm
        if role.structured_outputs:
            schema = output_schema(predictor.signature, schema_overrides)
            predictor.config["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": predictor.signature.__name__, "schema": schema, "strict": True},
            }
    return module


@dataclass
class CallResult:
    prediction: dspy.Prediction | None
    failure: Failure | None
    usage: dict[str, int]
    seconds: float


def call_module(role: Role, module: dspy.Module, **inputs: Any) -> CallResult:
    """Run ``module`` for ``role``; LM errors and unparseable answers become failures.

    The call first waits for a slot of the role's limiter (in-flight, rpm, tpm), if it has one.
    """
    if role.limiter is None:
        return _call(role, module, inputs)
    with role.limiter.slot() as slot:
        result = _call(role, module, inputs)
        slot.tokens = sum(result.usage.values())
    return result


def _call(role: Role, module: dspy.Module, inputs: dict[str, Any]) -> CallResult:
    started = time.monotonic()
    prediction, failure = None, None
    # Our own tracker rather than the prediction's usage: a call whose answer fails to parse was
    # paid for too, and then there is no prediction to carry it.
    with dspy.context(adapter=role.adapter, track_usage=True), track_usage() as tracker:
        try:
            prediction = module(**inputs)
        except AdapterParseError as exc:
            failure = Failure(kind="parse_error", reason=_parse_error_reason(exc), raw=exc.lm_response)
        except Exception as exc:  # noqa: BLE001 - any provider/transport error is recorded, not raised
            failure = Failure(kind="lm_error", reason=f"{type(exc).__name__}: {_first_line(exc)}")
    usage = _token_totals(tracker.get_total_tokens())
    return CallResult(prediction, failure, usage, round(time.monotonic() - started, 3))


def _parse_error_reason(exc: AdapterParseError) -> str:
    raw = (exc.lm_response or "").rstrip()
    if raw.startswith("{") and not raw.endswith("}"):
        # Small models often loop until max_tokens; say so, since raising max_tokens may help.
        return "response cut off before the JSON object closed (max_tokens reached?)"
    return _first_line(exc)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:500]


def _token_totals(usage_by_model: dict[str, dict[str, Any]] | None) -> dict[str, int]:
    if not usage_by_model:
        return {}
    totals: dict[str, int] = {}
    for per_model in usage_by_model.values():
        for key in ("prompt_tokens", "completion_tokens"):
            value = per_model.get(key)
            if isinstance(value, int):
                totals[key] = totals.get(key, 0) + value
    return totals
