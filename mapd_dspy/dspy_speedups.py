"""Throughput fixes for many concurrent DSPy calls in one process: a memoised model-metadata
lookup (DSPy 3.4.1), and an interpreter tuned for I/O-bound threads while an LLM stage runs.

The lookup: ``dspy.clients.model_metadata.model_info`` scans the whole bundled metadata snapshot (thousands of
entries) whenever a model is not in it, which is the case for every ``hosted_vllm/NAME`` model and
any self-served teacher, and DSPy calls it three times per LM call (capabilities once, pricing
twice). Measured with the scripted server (``python -m mapd_dspy.bench committee``): about 1 ms of
the ~5 ms of client CPU per call; with 32 calls in flight on a 2-core machine, that CPU, serialised
by the GIL, is what keeps the engine from the latency-bound limit. The snapshot does not change once
loaded, so the answer for a ``(provider, model, namespaces)`` triple is cached; callers still get
their own deep copy, as from the original.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import gc
import sys
import threading
from collections.abc import Iterator

_lock = threading.Lock()
_applied = False


def memoize_model_metadata() -> bool:
    """Install the memoised lookup once (idempotent). False if this DSPy has no such function."""
    global _applied
    with _lock:
        if _applied:
            return True
        try:
            from dspy.clients import capabilities, costs, model_metadata
        except ImportError:
            return False
        modules = [m for m in (model_metadata, capabilities, costs) if hasattr(m, "model_info")]
        if model_metadata not in modules:
            return False
        lookup = _memoized(model_metadata.model_info)
        for module in modules:
            module.model_info = lookup  # capabilities and costs imported the name itself
        _applied = True
        return True


def _memoized(model_info):
    @functools.lru_cache(maxsize=1024)
    def cached(provider, model, namespaces):
        return model_info(provider, model, namespaces=namespaces)

    @functools.wraps(model_info)
    def lookup(provider, model, *, namespaces=None):
        key = tuple(namespaces) if namespaces is not None else None
        return copy.deepcopy(cached(provider, model, key))

    lookup.uncached = model_info
    return lookup


@contextlib.contextmanager
def io_bound_stage(switch_interval_s: float = 0.001) -> Iterator[None]:
    """Tune the interpreter for an LLM stage: dozens of threads waiting on sockets.

    * GIL hand-over every ``switch_interval_s`` (Python's default: 5 ms). Each response needs a few
      ms of DSPy work; with the default a thread whose response has arrived often waits a whole
      slice, several times per call, before it may parse it and send the next request.
    * ``gc.freeze()``: the objects that exist before the stage (modules, task data, records read
      from disk) move to the permanent generation, so the stage's full collections skip them.

    Measured with ``python -m mapd_dspy.bench committee`` (1200 calls of 200 ms, 32 in flight,
    2 cores): 9.9-10.6 s with neither, 8.0-8.5 s with the switch interval, 7.97-8.02 s with both.
    Both are process-wide, so they are undone on exit.
    """
    previous = sys.getswitchinterval()
    sys.setswitchinterval(min(previous, switch_interval_s))
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
        sys.setswitchinterval(previous)
