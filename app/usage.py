"""What one finished request consumed, and the place where that is accounted for.

Accounting runs in its own task (see ``TaskSet``) so that a client disconnect, which cancels
the request's task, can never cancel the write of what it used.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, Literal

from redis.exceptions import NoScriptError, RedisError

from app.auth.keys import KeyRecord
from app.billing.record import STREAM, Spool, usage_event
from app.catalog import ModelSpec
from app.limits.limiter import Admission, Limiter
from app.metrics import GatewayMetrics
from app.redis_batch import Command, PipelineBatcher

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
    # Set instead of ``admission`` while the limiter's decision is still on its way (overlap).
    decision: asyncio.Future[Admission] | None = None

    async def decided(self) -> bool:
        """Wait for an overlapped decision; False if the request was refused (never served).

        ``asyncio.wait`` rather than ``await``: cancelling the waiter must not cancel the
        decision, whose reservation has to be settled either way."""
        decision = self.decision
        if decision is not None and self.admission is None:
            if not decision.done():
                await asyncio.wait((decision,))
            if decision.cancelled() or decision.exception() is not None:
                return False
            self.admission = decision.result()
        return True


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
    """Where a finished call's usage goes: metrics, and one pipelined Redis write that settles
    the rate-limit reservation and appends the usage event to the billing stream. If Redis
    cannot take the event, it goes to the local spool: no usage is ever dropped."""

    def __init__(
        self, metrics: GatewayMetrics, batcher: PipelineBatcher, limiter: Limiter, spool: Spool
    ) -> None:
        self._metrics = metrics
        self._batcher = batcher
        self._limiter = limiter
        self._spool = spool

    async def finish(self, call: Call, usage: Usage) -> None:
        model = call.spec.name
        if not await call.decided():
            # Sent upstream ahead of a decision that then refused it: the client got a 429,
            # no budget was consumed, and nothing is billed.
            self._metrics.overlap_refused.labels(model).inc()
            return
        self._metrics.latency.labels(model, call.endpoint).observe(
            time.perf_counter() - call.started
        )
        self._metrics.tokens.labels(model, "prompt").inc(usage.prompt_tokens)
        self._metrics.tokens.labels(model, "completion").inc(usage.completion_tokens)
        event = None
        if usage.total_tokens > 0:
            event = usage_event(
                call.request_id,
                call.key.id,
                call.key.customer,
                model,
                usage.prompt_tokens,
                usage.completion_tokens,
                usage.source,
            )
        admission = call.admission
        if admission is not None and admission.settled:
            admission = None  # nothing left to settle
        if admission is not None and usage.source == "upstream":
            self._limiter.observe_estimate(admission, usage.completion_tokens)
        if self._limiter.breaker.open:
            self._degraded(call, usage, event)
            return
        commands: list[Command] = []
        if admission is not None:
            if admission.mode == "redis":
                command = self._limiter.settle_command(
                    admission, usage.prompt_tokens, usage.completion_tokens
                )
                if command is not None:
                    commands.append(command)
            else:
                self._limiter.settle_local(admission, usage.prompt_tokens, usage.completion_tokens)
        if event is not None:
            commands.append(("XADD", STREAM, "*", *(x for kv in event.items() for x in kv)))
        if not commands:
            return
        try:
            # Nobody waits for it: it rides along with the next decisions' round trip.
            results = await self._batcher.submit(commands, lazy=True)
        except (RedisError, OSError) as exc:
            log.warning(
                "accounting: redis unavailable for %s (%s)", call.request_id, type(exc).__name__
            )
            self._degraded(call, usage, event)
            return
        if event is not None and isinstance(results[-1], Exception):
            self._spool_event(event)
        for command, result in zip(commands, results, strict=True):
            if isinstance(result, NoScriptError):
                with contextlib.suppress(RedisError, OSError):
                    await self._limiter.run_again(command)

    def _degraded(self, call: Call, usage: Usage, event: dict[str, str] | None) -> None:
        if call.admission is not None and not call.admission.settled:
            self._limiter.settle_local(call.admission, usage.prompt_tokens, usage.completion_tokens)
        if event is not None:
            self._spool_event(event)

    def _spool_event(self, event: dict[str, str]) -> None:
        self._spool.append(event)
        self._metrics.usage_spooled.inc()
