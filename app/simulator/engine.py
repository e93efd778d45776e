"""The simulated scheduler: a bounded set of running requests and a FIFO of waiting ones.

Like vLLM's scheduler it admits up to `max_num_seqs` requests at once (a request with n
choices takes one slot here, and n times the tokens); the rest wait in arrival order, so
queueing time shows up in time to first token. The engine also owns the counters that
/sim/stats and /metrics read, so every exit path of a request is accounted in one place.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

from app.simulator import errors
from app.simulator.config import SimulatorConfig
from app.simulator.metrics import EngineMetrics, Gauges


@dataclass(slots=True)
class Stats:
    """Counters for tests (`GET /sim/stats`); reset by `POST /sim/reset`."""

    received: int = 0  # every request to a generation or embedding endpoint
    rejected: int = 0  # answered 4xx (bad body, unknown model, too long)
    overloaded: int = 0  # answered 503 because the waiting queue was full
    failed: int = 0  # answered fail_status by fail_rate
    hung: int = 0  # accepted and never answered (hang)
    started: int = 0  # got a running slot
    finished: int = 0  # answered completely
    aborted: int = 0  # the client went away first
    dropped: int = 0  # connection cut on purpose (fail_after_tokens)
    prompt_tokens: int = 0  # of started requests
    tokens_generated: int = 0  # output tokens produced, including those of aborted requests


class ActiveRequest:
    """A request holding a running slot; knows how many KV-cache tokens it holds."""

    __slots__ = ("generated", "interval", "prompt_tokens", "streaming", "t_first", "total")

    def __init__(self, prompt_tokens: int, streaming: bool) -> None:
        self.prompt_tokens = prompt_tokens
        self.streaming = streaming
        self.generated = 0
        self.t_first = math.inf
        self.interval = 0.0
        self.total = 0

    def schedule(self, t_first: float, interval: float, total: int) -> None:
        self.t_first, self.interval, self.total = t_first, interval, total

    def generated_by(self, now: float) -> int:
        """Tokens produced by `now`: counted when streaming, derived from time otherwise."""
        if self.streaming:
            return self.generated
        if now < self.t_first:
            return 0
        if self.interval <= 0:
            return self.total
        return min(self.total, int((now - self.t_first) / self.interval) + 1)


class Engine:
    """Admission (running/waiting), runtime config, and accounting of one simulated replica."""

    def __init__(self, config: SimulatorConfig) -> None:
        self.config = config
        self.stats = Stats()
        self.metrics = EngineMetrics()
        self._used = 0
        self._active: set[ActiveRequest] = set()
        self._waiting: deque[asyncio.Future[None]] = deque()
        self._fail_rng = random.Random(config.seed)
        self._arrivals = 0

    # -- runtime config -------------------------------------------------------------------
    def set_config(self, config: SimulatorConfig) -> None:
        if config.seed != self.config.seed:
            self._fail_rng = random.Random(config.seed)
        self.config = config
        self._promote()

    def next_arrival(self) -> int:
        self._arrivals += 1
        return self._arrivals

    def should_fail(self) -> bool:
        rate = self.config.fail_rate
        return rate > 0 and self._fail_rng.random() < rate

    # -- admission --------------------------------------------------------------------------
    @property
    def running(self) -> int:
        return self._used

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def admit(self) -> asyncio.Future[None] | None:
        """Take a running slot now (None) or a place in the FIFO (a future to await).

        Synchronous on purpose: a full queue is answered 503 before any byte is sent.
        """
        if self._used < self.config.max_num_seqs and not self._waiting:
            self._used += 1
            return None
        limit = self.config.max_waiting
        if limit is not None and len(self._waiting) >= limit:
            self.stats.overloaded += 1
            raise errors.overloaded(len(self._waiting))
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append(fut)
        return fut

    def abandon(self, fut: asyncio.Future[None]) -> None:
        """Give up a queue place from admit(), whether or not it was granted meanwhile."""
        if fut.done() and not fut.cancelled():
            self._used -= 1
            self._promote()
            return
        fut.cancel()
        with contextlib.suppress(ValueError):
            self._waiting.remove(fut)

    def start(self, active: ActiveRequest) -> None:
        """The request holds its slot and starts prefill."""
        self._active.add(active)
        self.stats.started += 1
        self.stats.prompt_tokens += active.prompt_tokens
        self.metrics.prompt_tokens += active.prompt_tokens

    def release(self, active: ActiveRequest) -> None:
        self._active.discard(active)
        self._used -= 1
        self._promote()

    def _promote(self) -> None:
        while self._waiting and self._used < self.config.max_num_seqs:
            fut = self._waiting.popleft()
            if not fut.done():
                self._used += 1
                fut.set_result(None)

    # -- accounting ---------------------------------------------------------------------------
    def add_tokens(self, n: int) -> None:
        self.stats.tokens_generated += n
        self.metrics.generation_tokens += n

    def finish(self, reason: str) -> None:
        """A request ended: reason is a finish_reason ("stop", "length") or "abort"."""
        if reason == "abort":
            self.stats.aborted += 1
        else:
            self.stats.finished += 1
        self.metrics.finished[reason] = self.metrics.finished.get(reason, 0) + 1

    def gauges(self) -> Gauges:
        now = asyncio.get_running_loop().time()
        held = sum(a.prompt_tokens + a.generated_by(now) for a in self._active)
        return Gauges(
            running=self._used,
            waiting=len(self._waiting),
            kv_cache_usage=min(1.0, held / self.config.kv_cache_tokens),
        )

    def stats_dict(self) -> dict[str, Any]:
        out = asdict(self.stats)
        out["running"] = self._used
        out["waiting"] = len(self._waiting)
        return out

    def reset_stats(self) -> None:
        self.stats = Stats()
