"""Progress for humans (a bar redrawn in place on a terminal) and for logs (plain lines)."""

from __future__ import annotations

import threading
import time
from typing import TextIO

from app.models.layout import human

BAR_WIDTH = 28


class Progress:
    def __init__(
        self,
        total: int,
        done: int,
        stream: TextIO,
        *,
        bar: bool,
        every_percent: int = 10,
        every_seconds: float = 30.0,
    ) -> None:
        self.total = total
        self.done = done
        self.fetched = 0
        self.stream = stream
        self.bar = bar
        self._lock = threading.Lock()
        self._start = time.monotonic()
        self._last_draw = self._start
        self._every_percent = every_percent
        self._every_seconds = every_seconds
        self._next_percent = self._percent() // every_percent * every_percent + every_percent
        self._drawn = False

    def _percent(self) -> int:
        return 100 if self.total <= 0 else min(100, self.done * 100 // self.total)

    def _rate(self) -> float:
        return self.fetched / max(time.monotonic() - self._start, 1e-6)

    def add(self, n: int) -> None:
        with self._lock:
            self.done += n
            self.fetched += n
            now = time.monotonic()
            if self.bar:
                if now - self._last_draw >= 0.1:
                    self._draw(now)
            elif self._percent() >= self._next_percent or (
                n > 0 and now - self._last_draw >= self._every_seconds
            ):
                pct = self._percent()
                self._next_percent = pct // self._every_percent * self._every_percent
                self._next_percent += self._every_percent
                self._last_draw = now
                self.stream.write(
                    f"progress: {pct}% {human(self.done)} of {human(self.total)}, "
                    f"{human(self._rate())}/s\n"
                )
                self.stream.flush()

    def _draw(self, now: float) -> None:
        self._last_draw = now
        pct = self._percent()
        filled = BAR_WIDTH * pct // 100
        rate = self._rate()
        left = (self.total - self.done) / rate if rate > 0 else 0
        eta = f" ETA {left:.0f}s" if rate > 0 and self.done < self.total else ""
        self.stream.write(
            f"\r\x1b[K{pct:3d}% |{'#' * filled}{'.' * (BAR_WIDTH - filled)}| "
            f"{human(self.done)}/{human(self.total)} {human(rate)}/s{eta}"
        )
        self.stream.flush()
        self._drawn = True

    def skip(self, n: int) -> None:
        """Bytes that count as done without being transferred (verified leftovers, resumes)."""
        with self._lock:
            self.done += n

    def line(self, message: str) -> None:
        """A message that stays (printed above the bar on a terminal)."""
        with self._lock:
            if self.bar and self._drawn:
                self.stream.write("\r\x1b[K")
            self.stream.write(message + "\n")
            if self.bar and self._drawn:
                self._draw(time.monotonic())
            self.stream.flush()

    def close(self) -> None:
        with self._lock:
            if self.bar:
                self._draw(time.monotonic())
                self.stream.write("\n")
                self.stream.flush()
