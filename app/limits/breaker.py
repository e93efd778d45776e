"""A circuit breaker around the limiter's Redis calls.

Without it, every request would wait out a timeout while Redis is down. After
``threshold`` consecutive failures the circuit opens: calls are skipped (the limiter falls back
at once) for ``cool_down_s``; then one probe call is let through, and its success closes the
circuit again. Transitions are logged and exported as a gauge.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class CircuitBreaker:
    def __init__(
        self,
        name: str,
        threshold: int = 3,
        cool_down_s: float = 1.0,
        on_change: Callable[[bool], None] | None = None,
    ) -> None:
        self.name = name
        self._threshold = threshold
        self._cool_down = cool_down_s
        self._failures = 0
        self._opened_at: float | None = None
        self._probing = False
        self._on_change = on_change

    @property
    def open(self) -> bool:
        return self._opened_at is not None

    def allow(self) -> bool:
        """May a call be made now? In the open state only one probe per cool-down."""
        if self._opened_at is None:
            return True
        if not self._probing and time.monotonic() - self._opened_at >= self._cool_down:
            self._probing = True
            return True
        return False

    def success(self) -> None:
        self._failures = 0
        if self._opened_at is not None:
            self._opened_at = None
            self._probing = False
            log.warning("%s: redis reachable again, circuit closed", self.name)
            if self._on_change:
                self._on_change(False)

    def failure(self, reason: str) -> None:
        self._failures += 1
        if self._opened_at is not None:
            self._opened_at = time.monotonic()  # the probe failed: wait another cool-down
            self._probing = False
            return
        if self._failures >= self._threshold:
            self._opened_at = time.monotonic()
            log.warning("%s: redis unavailable (%s), circuit open", self.name, reason)
            if self._on_change:
                self._on_change(True)
