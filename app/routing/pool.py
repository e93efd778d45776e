"""Replica pools: which upstream replicas of a model may take a request right now.

Health comes from two sides: an active check (``GET /health`` every few seconds) and passive
observation (consecutive connect errors or 5xx eject a replica for a cool-down; a replica back
from a cool-down is on probation, and its first failure ejects it again at once: a circuit
breaker per replica). Which available replica takes a request is the model's routing strategy
(``strategies.py``); engine load (``vllm:num_requests_waiting``, KV-cache usage) is scraped in
the background for the models that need it (queue-aware, prefix-aware, load shedding).

``Router.route`` turns a requested name into a ``Route``: alias split, the model's own canary
split, fallbacks when no replica is available (only those the key may use) and load shedding.
Everything it reads is in memory: no I/O on the request path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import zlib
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field

import aiohttp

from app.auth.keys import KeyRecord
from app.catalog import Catalog, ModelSpec
from app.errors import APIError, unavailable
from app.metrics import GatewayMetrics
from app.routing.canary import Split, SplitTarget
from app.routing.discovery import is_dns, resolve
from app.routing.load import parse_engine_load
from app.routing.strategies import (
    LeastOutstanding,
    RequestInfo,
    RoutingStrategy,
    make_strategy,
)
from app.settings import Settings

log = logging.getLogger(__name__)

EJECT_AFTER_FAILURES = 3
EJECT_FOR_S = 10.0


@dataclass(eq=False)  # identity: two replicas are never "equal"
class Replica:
    url: str
    healthy: bool = True
    outstanding: int = 0
    consecutive_failures: int = 0
    ejected_until: float = 0.0
    eject_after: int = EJECT_AFTER_FAILURES
    eject_for_s: float = EJECT_FOR_S
    probation: bool = False  # back from an ejection, no success yet: one failure ejects
    ejections: int = 0
    # Engine load, scraped from /metrics (0 when not scraped or unreachable).
    waiting: int = 0
    running: int = 0
    kv_usage: float = 0.0
    load_at: float = 0.0
    salt: int = 0

    def __post_init__(self) -> None:
        self.salt = zlib.crc32(self.url.encode()) * 0x9E3779B1

    def available(self, now: float) -> bool:
        return self.healthy and now >= self.ejected_until

    def record_success(self) -> None:
        self.consecutive_failures = 0
        self.probation = False

    def record_failure(self) -> None:
        self.consecutive_failures += 1
        if self.consecutive_failures >= self.eject_after or self.probation:
            self.ejected_until = time.monotonic() + self.eject_for_s
            self.ejections += 1
            log.warning(
                "routing: ejecting %s for %.0fs after %d consecutive failure(s)%s",
                self.url,
                self.eject_for_s,
                self.consecutive_failures,
                " on probation" if self.probation else "",
            )
            self.consecutive_failures = 0
            self.probation = True


@dataclass
class ModelPool:
    spec: ModelSpec
    replicas: list[Replica]
    strategy: RoutingStrategy = field(default_factory=LeastOutstanding)
    shed_waiting: int | None = None
    label: str = ""  # metrics `target` label of requests this pool serves
    static_urls: tuple[str, ...] = ()
    dns_sources: tuple[str, ...] = ()  # dns+http:// endpoints, resolved in the background

    def __post_init__(self) -> None:
        self.label = self.label or self.spec.name
        if not self.static_urls:
            self.static_urls = tuple(r.url for r in self.replicas)

    def pick(
        self, exclude: Iterable[str] = (), request: RequestInfo | None = None
    ) -> Replica | None:
        now = time.monotonic()
        excluded = set(exclude) if exclude else ()
        candidates = [r for r in self.replicas if r.url not in excluded and r.available(now)]
        if not candidates:
            return None
        if len(candidates) == 1:
            return candidates[0]
        return self.strategy.pick(candidates, request)

    def any_available(self) -> bool:
        now = time.monotonic()
        return any(r.available(now) for r in self.replicas)

    def overloaded(self) -> bool:
        """Every available replica has more requests waiting than the shedding threshold."""
        limit = self.shed_waiting
        if limit is None:
            return False
        now = time.monotonic()
        available = [r for r in self.replicas if r.available(now)]
        return bool(available) and all(r.waiting > limit for r in available)

    @property
    def needs_load(self) -> bool:
        return self.shed_waiting is not None or self.strategy.name in (
            "queue_aware",
            "prefix_aware",
        )


class Route:
    """Where one request goes, and what its outcome feeds (canary guards, metrics)."""

    __slots__ = ("decisions", "info", "pool", "requested", "spec", "ttft")

    def __init__(
        self,
        requested: str,
        spec: ModelSpec,
        pool: ModelPool,
        info: RequestInfo | None,
        decisions: list[tuple[Split, SplitTarget]],
    ) -> None:
        self.requested = requested
        self.spec = spec
        self.pool = pool
        self.info = info
        self.decisions = decisions
        self.ttft: float | None = None  # set by a stream relay at its first token

    @property
    def target(self) -> str:
        return self.pool.label

    def observe(self, status: int, ttfb_s: float) -> None:
        """Feed the outcome to the guarded splits this request went through.

        Client errors, limits and disconnects say nothing about the version: only 200 and 5xx
        count. Time to first byte is the first token of a stream or the whole answer."""
        if not self.decisions or (status != 200 and status < 500):
            return
        ttfb = self.ttft if self.ttft is not None else ttfb_s
        for _, target in self.decisions:
            if target.window is not None:
                target.window.add(status >= 500, ttfb)


class Router:
    """All model pools and traffic splits, plus the background health, load and guard tasks."""

    def __init__(self, catalog: Catalog, metrics: GatewayMetrics, settings: Settings) -> None:
        self._settings = settings
        self._metrics = metrics
        self._specs = {m.name: m for m in catalog.models}
        self.pools: dict[str, ModelPool] = {}
        self.canary_pools: dict[str, ModelPool] = {}
        self.model_splits: dict[str, Split] = {}
        self.aliases: dict[str, Split] = {}
        for m in catalog.models:
            self.pools[m.name] = self._pool(m, m.endpoints, m.name)
            canary = m.canary
            if canary is not None and canary.endpoints:
                label = f"{m.name}@{canary.revision}"
                cpool = self._pool(m, canary.endpoints, label)
                self.canary_pools[m.name] = cpool
                pct = canary.traffic_percent
                self.model_splits[m.name] = Split(
                    m.name,
                    [
                        SplitTarget(m.name, 100 - pct, m.name, self.pools[m.name]),
                        SplitTarget(label, pct, m.name, cpool),
                    ],
                    sticky=canary.sticky,
                    guard=canary.guard,
                )
        for a in catalog.aliases:
            self.aliases[a.name] = Split(
                a.name,
                [SplitTarget(t.model, t.weight, t.model) for t in a.targets],
                sticky=a.sticky,
                guard=a.guard,
            )
        for split in self.splits():
            for t in split.targets:
                metrics.canary_weight.labels(split.name, t.label).set(t.effective_weight)
        self._tasks: list[asyncio.Task[None]] = []
        self.resolver: Callable[[str], Awaitable[list[str]]] = resolve

    def _replica(self, url: str, healthy: bool = True) -> Replica:
        s = self._settings
        return Replica(
            url, healthy=healthy, eject_after=s.eject_after_failures, eject_for_s=s.eject_for_s
        )

    def _pool(self, spec: ModelSpec, urls: Iterable[str], label: str) -> ModelPool:
        s = self._settings
        static = tuple(u for u in urls if not is_dns(u))
        dns = tuple(u for u in urls if is_dns(u))
        strategy = make_strategy(spec.routing or s.routing_strategy, s.prefix_busy_slack)
        shed = spec.shed_waiting if spec.shed_waiting is not None else s.shed_waiting
        replicas = [self._replica(u) for u in static]
        return ModelPool(spec, replicas, strategy, shed, label, static, dns)

    def pool(self, model: str) -> ModelPool | None:
        return self.pools.get(model)

    def all_pools(self) -> Iterator[ModelPool]:
        yield from self.pools.values()
        yield from self.canary_pools.values()

    def splits(self) -> Iterator[Split]:
        yield from self.model_splits.values()
        yield from self.aliases.values()

    def ready(self) -> bool:
        return any(p.any_available() for p in self.all_pools())

    # -- the request path ----------------------------------------------------------------------

    def route(self, name: str, key: KeyRecord, info: RequestInfo | None = None) -> Route:
        """The pool for a request to ``name`` (a model or an alias the key is allowed).

        An alias draws a target; a target without an available replica (nor a usable fallback)
        hands over to the alias's other targets, so a dead canary costs no errors. Raises 503
        (with Retry-After) when nothing the key may use has an available replica, or when the
        chosen pool sheds load."""
        alias = self.aliases.get(name)
        if alias is None:
            route = self._serve(name, name, key, info, [])
            if route is None:
                raise unavailable(f"No healthy replica of model '{name}' is available.", 1)
            return route
        first = alias.choose(key.id)
        for target in (first, *(t for t in alias.targets if t is not first)):
            route = self._serve(name, target.model, key, info, [(alias, target)])
            if route is not None:
                return route
        raise unavailable(f"No healthy replica behind '{name}' is available.", 1)

    def _serve(
        self,
        requested: str,
        model: str,
        key: KeyRecord,
        info: RequestInfo | None,
        decisions: list[tuple[Split, SplitTarget]],
    ) -> Route | None:
        """A route to ``model`` or, when it has no available replica, to the first of its
        fallbacks that the key may use and that has one; None when there is none."""
        spec = self._specs[model]  # aliases and fallbacks are checked against the catalogue
        for candidate in (spec.name, *spec.fallbacks):
            cspec = self._specs.get(candidate)
            if cspec is None or cspec.kind != spec.kind:
                continue
            if candidate != spec.name and not key.allows(candidate):
                continue  # a fallback never widens what the key may use
            chosen = self._pick_side(cspec, key)
            if chosen is None:
                continue
            pool, side = chosen
            if pool.overloaded():
                self._metrics.shed.labels(cspec.name).inc()
                raise shed_error(cspec.name, self._settings.shed_retry_after_s)
            if candidate != spec.name:
                self._metrics.fallbacks.labels(spec.name, candidate).inc()
                log.info(
                    "routing: %s has no available replica; using fallback %s", model, candidate
                )
            if side is not None:
                decisions = [*decisions, side]
            return Route(requested, cspec, pool, info, decisions)
        return None

    def _pick_side(
        self, spec: ModelSpec, key: KeyRecord
    ) -> tuple[ModelPool, tuple[Split, SplitTarget] | None] | None:
        """The stable or canary pool of a model (whichever the split says, else the other)."""
        split = self.model_splits.get(spec.name)
        if split is None:
            pool = self.pools[spec.name]
            return (pool, None) if pool.any_available() else None
        first = split.choose(key.id)
        for side in (first, *(t for t in split.targets if t is not first)):
            assert side.pool is not None
            if side.pool.any_available():
                return side.pool, (split, side)
        return None

    # -- background tasks ----------------------------------------------------------------------

    async def start(self, session: aiohttp.ClientSession) -> None:
        s = self._settings
        if any(p.dns_sources for p in self.all_pools()):
            await self.discover_all(session)
            self._tasks.append(
                asyncio.create_task(
                    self._every(s.discovery_interval_s, self.discover_all, session),
                    name="replica-discovery",
                )
            )
        await self.check_all(session)
        self._tasks.append(
            asyncio.create_task(
                self._every(s.health_interval_s, self.check_all, session), name="health-checker"
            )
        )
        if any(p.needs_load for p in self.all_pools()):
            await self.scrape_all(session)
            self._tasks.append(
                asyncio.create_task(
                    self._every(s.load_scrape_interval_s, self.scrape_all, session),
                    name="load-scraper",
                )
            )
        if any(split.guard is not None for split in self.splits()):
            self._tasks.append(
                asyncio.create_task(self._guard_loop(), name="canary-guard"),
            )

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()

    async def _every(
        self,
        interval: float,
        job: Callable[[aiohttp.ClientSession], Awaitable[None]],
        session: aiohttp.ClientSession,
    ) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await job(session)
            except Exception:  # the loop must never die
                log.exception("routing: background round failed")

    async def discover_all(self, session: aiohttp.ClientSession) -> None:
        """Re-resolve every dns+http:// endpoint; new replicas are health-checked before they
        join, vanished ones leave (requests in flight on them finish normally)."""
        for pool in self.all_pools():
            if not pool.dns_sources:
                continue
            found: list[str] = []
            try:
                for source in pool.dns_sources:
                    found += await self.resolver(source)
            except OSError as exc:
                log.warning("routing: cannot resolve replicas of %s: %s", pool.label, exc)
                continue  # keep what we had
            await self._set_replicas(session, pool, [*pool.static_urls, *found])

    async def _set_replicas(
        self, session: aiohttp.ClientSession, pool: ModelPool, urls: list[str]
    ) -> None:
        current = {r.url: r for r in pool.replicas}
        wanted = list(dict.fromkeys(urls))
        new = [self._replica(u, healthy=False) for u in wanted if u not in current]
        if new:
            await asyncio.gather(*(self._check(session, pool, r) for r in new))
        gone = [u for u in current if u not in set(wanted)]
        if not new and not gone:
            return
        fresh = {r.url: r for r in new}
        pool.replicas = [current.get(u) or fresh[u] for u in wanted]
        for url in gone:
            for gauge in (self._metrics.replica_healthy, self._metrics.replica_waiting):
                with contextlib.suppress(KeyError):
                    gauge.remove(pool.label, url)
        log.info(
            "routing: replicas of %s now %s (added %s, removed %s)",
            pool.label,
            wanted,
            [r.url for r in new],
            gone,
        )

    async def check_all(self, session: aiohttp.ClientSession) -> None:
        checks = [self._check(session, pool, r) for pool in self.all_pools() for r in pool.replicas]
        if checks:
            await asyncio.gather(*checks)

    async def _check(
        self, session: aiohttp.ClientSession, pool: ModelPool, replica: Replica
    ) -> None:
        ok = False
        try:
            timeout = aiohttp.ClientTimeout(total=min(2.0, self._settings.health_interval_s))
            async with session.get(f"{replica.url}/health", timeout=timeout) as resp:
                ok = resp.status == 200
        except (aiohttp.ClientError, TimeoutError):
            ok = False
        if ok != replica.healthy:
            log.info(
                "routing: replica %s of %s is now %s",
                replica.url,
                pool.label,
                "healthy" if ok else "unhealthy",
            )
        replica.healthy = ok
        self._metrics.replica_healthy.labels(pool.label, replica.url).set(1 if ok else 0)

    async def scrape_all(self, session: aiohttp.ClientSession) -> None:
        scrapes = [
            self._scrape(session, pool, r)
            for pool in self.all_pools()
            if pool.needs_load
            for r in pool.replicas
        ]
        if scrapes:
            await asyncio.gather(*scrapes)

    async def _scrape(
        self, session: aiohttp.ClientSession, pool: ModelPool, replica: Replica
    ) -> None:
        try:
            timeout = aiohttp.ClientTimeout(total=min(1.0, self._settings.load_scrape_interval_s))
            async with session.get(f"{replica.url}/metrics", timeout=timeout) as resp:
                text = await resp.text() if resp.status == 200 else ""
        except (aiohttp.ClientError, TimeoutError, UnicodeDecodeError):
            text = ""
        load = parse_engine_load(text)  # unknown load reads as idle; health decides the rest
        replica.waiting, replica.running, replica.kv_usage = (
            load.waiting,
            load.running,
            load.kv_usage,
        )
        replica.load_at = time.monotonic()
        self._metrics.replica_waiting.labels(pool.label, replica.url).set(load.waiting)

    async def _guard_loop(self) -> None:
        while True:
            await asyncio.sleep(self._settings.canary_guard_interval_s)
            try:
                self.check_guards()
            except Exception:
                log.exception("routing: canary guard round failed")

    def check_guards(self) -> None:
        for split in self.splits():
            for target, reason in split.check():
                log.warning(
                    "routing: canary guard rolled back %s of %s to weight 0: %s",
                    target.label,
                    split.name,
                    reason,
                )
                self._metrics.canary_rollbacks.labels(split.name, target.label).inc()
                self._metrics.canary_weight.labels(split.name, target.label).set(0)

    def reset_split(self, name: str) -> bool:
        split = self.aliases.get(name) or self.model_splits.get(name)
        if split is None:
            return False
        split.reset()
        for t in split.targets:
            self._metrics.canary_weight.labels(split.name, t.label).set(t.effective_weight)
        log.info("routing: split %s reset to its configured weights", name)
        return True


def shed_error(model: str, retry_after_s: float) -> APIError:
    return APIError(
        503,
        f"Model '{model}' is overloaded: every replica has a long queue. Retry shortly.",
        type_="service_unavailable",
        code="model_overloaded",
        headers={"retry-after": str(max(1, round(retry_after_s)))},
    )
