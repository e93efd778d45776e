"""Replica pools: which upstream replicas of a model may take a request right now.

Health comes from two sides: an active check (``GET /health`` every few seconds) and passive
observation (consecutive connect errors or 5xx eject a replica for a cool-down). The pick is
least-outstanding-requests with a rotating tie-break, so idle replicas share work evenly and a
slow replica gets fewer new requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import aiohttp

from app.catalog import Catalog, ModelSpec
from app.metrics import GatewayMetrics

log = logging.getLogger(__name__)

EJECT_AFTER_FAILURES = 3
EJECT_FOR_S = 10.0


@dataclass
class Replica:
    url: str
    healthy: bool = True
    outstanding: int = 0
    consecutive_failures: int = 0
    ejected_until: float = 0.0

    def available(self, now: float) -> bool:
        return self.healthy and now >= self.ejected_until

    def record_success(self) -> None:
        self.consecutive_failures = 0

    def record_failure(self) -> None:
        self.consecutive_failures += 1
        if self.consecutive_failures >= EJECT_AFTER_FAILURES:
            self.ejected_until = time.monotonic() + EJECT_FOR_S
            log.warning(
                "routing: ejecting %s for %.0fs after %d consecutive failures",
                self.url,
                EJECT_FOR_S,
                self.consecutive_failures,
            )
            self.consecutive_failures = 0


@dataclass
class ModelPool:
    spec: ModelSpec
    replicas: list[Replica]
    _rr: itertools.count[int] = field(default_factory=itertools.count)

    def pick(self, exclude: Iterable[str] = ()) -> Replica | None:
        now = time.monotonic()
        excluded = set(exclude)
        candidates = [r for r in self.replicas if r.url not in excluded and r.available(now)]
        if not candidates:
            return None
        start = next(self._rr) % len(candidates)
        rotated = candidates[start:] + candidates[:start]
        return min(rotated, key=lambda r: r.outstanding)

    def any_available(self) -> bool:
        now = time.monotonic()
        return any(r.available(now) for r in self.replicas)


class Router:
    """All model pools plus the background health checker."""

    def __init__(self, catalog: Catalog, metrics: GatewayMetrics, interval_s: float) -> None:
        self.pools = {
            m.name: ModelPool(m, [Replica(u) for u in m.endpoints]) for m in catalog.models
        }
        self._metrics = metrics
        self._interval = interval_s
        self._task: asyncio.Task[None] | None = None

    def pool(self, model: str) -> ModelPool | None:
        return self.pools.get(model)

    def ready(self) -> bool:
        return any(p.any_available() for p in self.pools.values())

    async def start(self, session: aiohttp.ClientSession) -> None:
        await self.check_all(session)
        self._task = asyncio.create_task(self._loop(session), name="health-checker")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self, session: aiohttp.ClientSession) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.check_all(session)
            except Exception:  # the checker must never die
                log.exception("routing: health check round failed")

    async def check_all(self, session: aiohttp.ClientSession) -> None:
        checks = [
            self._check(session, pool.spec.name, r)
            for pool in self.pools.values()
            for r in pool.replicas
        ]
        if checks:
            await asyncio.gather(*checks)

    async def _check(self, session: aiohttp.ClientSession, model: str, replica: Replica) -> None:
        ok = False
        try:
            timeout = aiohttp.ClientTimeout(total=min(2.0, self._interval))
            async with session.get(f"{replica.url}/health", timeout=timeout) as resp:
                ok = resp.status == 200
        except (aiohttp.ClientError, TimeoutError):
            ok = False
        if ok != replica.healthy:
            log.info(
                "routing: replica %s of %s is now %s",
                replica.url,
                model,
                "healthy" if ok else "unhealthy",
            )
        replica.healthy = ok
        self._metrics.replica_healthy.labels(model, replica.url).set(1 if ok else 0)
