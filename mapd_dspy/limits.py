"""Per-provider call limits: calls in flight, requests per minute, tokens per minute.

One :class:`ProviderLimiter` belongs to one role (a teacher, or the student) and wraps each of
its calls (``programs/roles.py`` ``call_module``)::

    with limiter.slot() as slot:
        prediction = module(...)
        slot.tokens = prompt_tokens + completion_tokens

Retries of 429/5xx/timeouts are not handled here: ``dspy.LM(num_retries=...)`` retries with
backoff inside the call, while the slot is held, so a retried call still counts once in flight.
The per-minute limits are sliding 60-second windows over request starts (``rpm``) and over the
tokens of calls that finished (``tpm``; a call's tokens are known only once it answered).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

WINDOW_S = 60.0


@dataclass
class Slot:
    """What the caller reports back when its call ends."""

    tokens: int = 0


class ProviderLimiter:
    """Caps one provider's concurrent calls, request rate and token rate (each optional)."""

    def __init__(
        self,
        max_concurrency: int | None = None,
        rpm: float | None = None,
        tpm: float | None = None,
        window_s: float = WINDOW_S,
    ):
        for name, value in (("max_concurrency", max_concurrency), ("rpm", rpm), ("tpm", tpm)):
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        self.max_concurrency, self.rpm, self.tpm = max_concurrency, rpm, tpm
        self.window_s = window_s  # 60 s: "per minute"; tests shrink it
        self._in_flight = threading.BoundedSemaphore(max_concurrency) if max_concurrency else None
        self._changed = threading.Condition()
        self._request_starts: deque[float] = deque()
        self._token_log: deque[tuple[float, int]] = deque()

    @classmethod
    def from_config(cls, cfg: object) -> "ProviderLimiter | None":
        """A limiter for a model config's ``max_concurrency``/``rpm``/``tpm``; None if none is set."""
        limits = {name: getattr(cfg, name, None) for name in ("max_concurrency", "rpm", "tpm")}
        return cls(**limits) if any(value is not None for value in limits.values()) else None

    @contextmanager
    def slot(self) -> Iterator[Slot]:
        """Wait for a free slot within every limit; hold it for the duration of the call."""
        if self._in_flight is not None:
            self._in_flight.acquire()
        try:
            self._wait_for_rate()
            slot = Slot()
            yield slot
            self._log_tokens(slot.tokens)
        finally:
            if self._in_flight is not None:
                self._in_flight.release()

    # -- rate windows ----------------------------------------------------------------------------

    def _wait_for_rate(self) -> None:
        with self._changed:
            while True:
                wait_s = self._seconds_until_allowed(time.monotonic())
                if wait_s <= 0:
                    self._request_starts.append(time.monotonic())
                    return
                # Woken early when a call logs its tokens; otherwise re-check when the window moves.
                self._changed.wait(timeout=wait_s)

    def _seconds_until_allowed(self, now: float) -> float:
        self._forget_before(now - self.window_s)
        waits = [0.0]
        if self.rpm is not None and len(self._request_starts) >= self.rpm:
            waits.append(self._request_starts[0] + self.window_s - now)
        if self.tpm is not None and self._tokens_in_window() >= self.tpm:
            waits.append(self._token_log[0][0] + self.window_s - now)
        return max(waits)

    def _forget_before(self, cutoff: float) -> None:
        while self._request_starts and self._request_starts[0] <= cutoff:
            self._request_starts.popleft()
        while self._token_log and self._token_log[0][0] <= cutoff:
            self._token_log.popleft()

    def _tokens_in_window(self) -> int:
        return sum(tokens for _, tokens in self._token_log)

    def _log_tokens(self, tokens: int) -> None:
        if self.tpm is None or tokens <= 0:
            return
        with self._changed:
            self._token_log.append((time.monotonic(), tokens))
            self._changed.notify_all()
