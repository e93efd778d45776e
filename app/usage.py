"""What one finished request consumed, and the place where that is accounted for.

Accounting runs in its own task (see ``TaskSet``) so that a client disconnect, which cancels
the request's task, can never cancel the write of what it used.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, Literal

from redis.asyncio import Redis
from redis.exceptions import NoScriptError, RedisError

from app.auth.keys import KeyRecord
from app.catalog import ModelSpec
from app.limits.limiter import Admission, Limiter
from app.metrics import GatewayMetrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    source: Literal["upstream", "estimated"]

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class Call:
    """One client request on its way through the gateway."""

    request_id: str
    key: KeyRecord
    spec: ModelSpec
    endpoint: str
    body: bytes
    stream: bool
    client_wants_usage: bool
    prompt_estimate: int
    started: float
    admission: Admission | None = None
    accounted: bool = False


class TaskSet:
    """Keeps strong references to background tasks and lets shutdown wait for them."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed", exc_info=task.exception())

    async def drain(self, limit_s: float = 10.0) -> None:
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=limit_s)


class Accounting:
    """Where a finished call's usage goes: metrics, and one pipelined Redis write that
    settles the rate-limit reservation (and carries the usage record)."""

    def __init__(self, metrics: GatewayMetrics, redis: Redis, limiter: Limiter) -> None:
        self._metrics = metrics
        self._redis = redis
        self._limiter = limiter

    async def finish(self, call: Call, usage: Usage) -> None:
        model = call.spec.name
        self._metrics.latency.labels(model, call.endpoint).observe(
            time.perf_counter() - call.started
        )
        self._metrics.tokens.labels(model, "prompt").inc(usage.prompt_tokens)
        self._metrics.tokens.labels(model, "completion").inc(usage.completion_tokens)
        admission = call.admission
        if admission is None or admission.settled:
            return
        if usage.source == "upstream":
            self._limiter.observe_estimate(admission, usage.completion_tokens)
        if admission.mode != "redis" or self._limiter.breaker.open:
            self._limiter.settle_local(admission, usage.prompt_tokens, usage.completion_tokens)
            return
        pipe = self._redis.pipeline(transaction=False)
        self._limiter.settle_into(pipe, admission, usage.prompt_tokens, usage.completion_tokens)
        if not len(pipe):
            return
        try:
            results = await pipe.execute(raise_on_error=False)
            if any(isinstance(r, NoScriptError) for r in results):
                await self._limiter.settle_again(
                    admission, usage.prompt_tokens, usage.completion_tokens
                )
            elif failed := [r for r in results if isinstance(r, Exception)]:
                raise failed[0]
        except (RedisError, OSError) as exc:
            log.warning(
                "accounting: settling %s failed (%s); its reservation expires by itself",
                call.request_id,
                type(exc).__name__,
            )
