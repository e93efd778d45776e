"""Request- and token-based rate limiting shared by every gateway replica through Redis.

Hot path: one Lua call (admit.lua) decides every budget of a request and reserves its token
estimate; one more (settle.lua, pipelined with the usage record) corrects the reservation to
the real usage. When Redis is unreachable the circuit breaker skips it and the configured
mode applies: ``fail_open`` limits each process locally to its fair share, ``fail_closed``
answers 503.

Overlap: when the last decision for a key on this process left ample headroom in every budget,
the gateway may send the request upstream while the decision is still on its way (see
``may_overlap``). The decision still rules: a refused request is cancelled before the client sees
a byte and consumes no budget; only the engine may have started work on it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Literal

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, RedisError

from app.auth.keys import KeyRecord, KeyStore, Limits
from app.catalog import ModelSpec
from app.errors import APIError, unavailable
from app.limits.breaker import CircuitBreaker
from app.limits.budgets import Budget, Plan, Plans, learned_key, lease_key
from app.limits.gcra import LocalLimiter, Verdict
from app.limits.headers import duration, ratelimit_headers
from app.limits.peers import PeerCount
from app.metrics import GatewayMetrics
from app.redis_batch import Command, PipelineBatcher
from app.ttl_cache import fresh

log = logging.getLogger(__name__)

Mode = Literal["redis", "local", "off"]
LEARN_WEIGHT = 0.2  # EWMA weight of each new sample: about the last ten requests matter
LEARN_TTL_S = 7 * 86400
LEASE_MS = 15 * 60 * 1000  # a concurrency slot of a crashed gateway frees itself after this
# Overlap only while every budget kept this share of its limit after the last decision on this
# process (and at least HEADROOM_REQUESTS requests / twice the request's tokens), for at most
# HEADROOM_TTL_S: other replicas would have to spend that much within a second to make a
# speculatively sent request a refused one.
HEADROOM_SHARE = 0.1
HEADROOM_REQUESTS = 3
HEADROOM_TTL_S = 1.0


def _lua(name: str) -> str:
    return resources.files("app.limits").joinpath("lua", name).read_text(encoding="utf-8")


@dataclass(frozen=True, slots=True)
class Demand:
    """What a request asks for, as the limiter needs it."""

    prompt_tokens: int
    max_tokens: int | None  # per choice; None = not given
    n: int
    default_completion: int
    completion_cap: int  # per choice: the context left after the prompt

    def completion_guess(self) -> int:
        """Completion tokens per choice without history (admit.lua also consults history)."""
        guess = self.max_tokens if self.max_tokens is not None else self.default_completion
        return max(0, min(guess, self.completion_cap))


@dataclass
class Admission:
    """A request let through: what it reserved, so that settle() can correct it."""

    request_id: str
    key: KeyRecord
    model: str
    budgets: list[Budget]
    reserved: int
    expected_completion: int  # per choice, as reserved
    learn: bool  # no max_tokens given: the real length teaches the estimate
    mode: Mode
    n: int = 1
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    settled: bool = False


@dataclass(frozen=True, slots=True)
class _Ask:
    """One request's question to the limiter, as its decision steps pass it along."""

    key: KeyRecord
    spec: ModelSpec
    demand: Demand
    request_id: str
    plan: Plan

    @property
    def budgets(self) -> list[Budget]:
        return self.plan.budgets

    def admitted(
        self,
        reserved: int,
        per_choice: int,
        learn: bool,
        mode: Mode,
        verdicts: list[Verdict],
        share: int,
    ) -> Admission:
        return Admission(
            self.request_id,
            self.key,
            self.spec.name,
            self.budgets,
            reserved,
            per_choice,
            learn,
            mode,
            self.demand.n,
            _headers(self.budgets, verdicts, share),
        )


class Limiter:
    def __init__(
        self,
        redis: Redis,
        keys: KeyStore,
        metrics: GatewayMetrics,
        peers: PeerCount,
        failure_mode: Literal["fail_open", "fail_closed"],
        timeout_s: float,
        cache_ttl_s: float,
        batcher: PipelineBatcher | None = None,
        overlap: bool = False,
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._metrics = metrics
        self._peers = peers
        self._mode = failure_mode
        self._timeout = timeout_s
        self._cache_ttl = cache_ttl_s
        self._admit: AsyncScript = redis.register_script(_lua("admit.lua"))
        self._settle: AsyncScript = redis.register_script(_lua("settle.lua"))
        self._batcher = batcher or PipelineBatcher(redis, urgent_timeout_s=timeout_s)
        self._local = LocalLimiter()
        self._customers: dict[str, tuple[float, Limits | None]] = {}
        self._plans = Plans()
        self._overlap = overlap
        self._headroom: dict[str, float] = {}  # key id -> until when overlapping is safe
        self.breaker = CircuitBreaker(
            "limiter", on_change=lambda is_open: metrics.limiter_circuit_open.set(int(is_open))
        )

    # -- admission ---------------------------------------------------------------------------

    def may_overlap(self, key: KeyRecord) -> bool:
        """Whether this key's request may go upstream before its decision is back: only when
        the previous Redis decision left ample headroom, never for keys with a concurrency cap
        (the cap exists to keep load off the engine)."""
        if not self._overlap or key.max_concurrent is not None:
            return False
        until = self._headroom.get(key.id)
        return until is not None and until > time.monotonic()

    def _note_headroom(
        self, key: KeyRecord, budgets: list[Budget], verdicts: list[Verdict], reserved: int
    ) -> None:
        if not self._overlap:
            return
        for b, v in zip(budgets, verdicts, strict=True):
            floor = max(HEADROOM_SHARE * b.limit, 2 * reserved if b.tokens else HEADROOM_REQUESTS)
            if v.retry_ms != 0 or v.remaining < floor:
                self._headroom.pop(key.id, None)
                return
        if len(self._headroom) > 100_000:
            self._headroom.clear()
        self._headroom[key.id] = time.monotonic() + HEADROOM_TTL_S

    async def admit(
        self, key: KeyRecord, spec: ModelSpec, demand: Demand, request_id: str
    ) -> Admission:
        """Reserve the request's budgets or raise 429 (or 503 when failing closed)."""
        customer = await self._customer_limits(key.customer)
        plan = self._plans.get(key, spec.name, customer)
        if not plan.budgets and key.max_concurrent is None:
            return self._unlimited(key, spec, demand, request_id)
        if self.breaker.allow():
            try:
                return await self._admit_redis(_Ask(key, spec, demand, request_id, plan))
            except (RedisError, OSError, TimeoutError) as exc:
                self.breaker.failure(type(exc).__name__)
        return self._without_redis(_Ask(key, spec, demand, request_id, plan))

    def _unlimited(
        self, key: KeyRecord, spec: ModelSpec, demand: Demand, request_id: str
    ) -> Admission:
        self._metrics.limiter_decisions.labels("off", "allowed").inc()
        return Admission(
            request_id, key, spec.name, [], 0, demand.completion_guess(), False, "off", demand.n
        )

    def admit_now(
        self, key: KeyRecord, spec: ModelSpec, demand: Demand, request_id: str
    ) -> Admission | asyncio.Future[Admission] | None:
        """As much of ``admit`` as can run without awaiting, budgets computed once:

        - an Admission for a key with nothing to decide (no budget of its own, its customer's
          limits cached and empty, no concurrency cap);
        - for a key that may overlap (``may_overlap``), a future of its decision: when the
          customer's limits are cached and the circuit is closed, the Lua call is queued at
          once and the reply's callback decides (no task, no coroutine, most of what a
          decision costs the gateway); otherwise ``admit`` runs as a task;
        - None: the caller awaits ``admit``."""
        cached, customer = fresh(self._customers, key.customer, self._cache_ttl)
        plan = self._plans.get(key, spec.name, customer) if cached else None
        if plan is not None and not plan.budgets and key.max_concurrent is None:
            return self._unlimited(key, spec, demand, request_id)
        if not self.may_overlap(key):
            return None
        loop = asyncio.get_running_loop()
        if plan is None or not plan.budgets or self.breaker.open:
            return loop.create_task(self.admit(key, spec, demand, request_id))
        out: asyncio.Future[Admission] = loop.create_future()
        ask = _Ask(key, spec, demand, request_id, plan)

        def decide(reply: asyncio.Future[list[Any]]) -> None:
            try:
                raw = reply.result()[0]
                if isinstance(raw, NoScriptError):  # Redis restarted: load it, the long way
                    task = loop.create_task(self.admit(key, spec, demand, request_id))
                    task.add_done_callback(lambda t: _chain(t, out))
                    return
                out.set_result(self._verdict(raw, ask))
            except (RedisError, OSError, TimeoutError) as exc:
                self.breaker.failure(type(exc).__name__)
                try:
                    out.set_result(self._without_redis(ask))
                except APIError as refused:
                    out.set_exception(refused)
            except asyncio.CancelledError:
                out.cancel()
            except Exception as exc:  # a refusal (APIError), or a bug: the request learns it
                out.set_exception(exc)

        self._batcher.submit([self._admit_command(ask)]).add_done_callback(decide)
        return out

    def _without_redis(self, ask: _Ask) -> Admission:
        if self._mode == "fail_closed":
            self._metrics.limiter_decisions.labels("closed", "refused").inc()
            raise unavailable("Rate limiting is unavailable; retry shortly.", 1)
        return self._admit_local(ask)

    async def _admit_redis(self, ask: _Ask) -> Admission:
        command = self._admit_command(ask)
        # The batcher times urgent commands out (TimeoutError after the limiter's timeout).
        (raw,) = await self._batcher.submit([command])
        if isinstance(raw, NoScriptError):
            await self._redis.script_load(self._admit.script)
            (raw,) = await self._batcher.submit([command])
        return self._verdict(raw, ask)

    def _admit_command(self, ask: _Ask) -> Command:
        demand, plan = ask.demand, ask.plan
        return (
            "EVALSHA",
            self._admit.sha,
            len(plan.keys),
            *plan.keys,
            demand.prompt_tokens,
            demand.max_tokens if demand.max_tokens is not None else -1,
            demand.default_completion,
            max(0, demand.completion_cap),
            demand.n,
            ask.key.max_concurrent or 0,
            ask.request_id,
            LEASE_MS,
            len(plan.budgets),
            *plan.limits,
        )

    def _verdict(self, raw: Any, ask: _Ask) -> Admission:
        """admit.lua's answer as an Admission, or the 429 it means."""
        if isinstance(raw, Exception):
            raise raw
        self.breaker.success()
        allowed, reserved, conc_ok, _learned = (int(x) for x in raw[:4])
        verdicts = [
            Verdict(int(raw[4 + 3 * i]), int(raw[5 + 3 * i]), int(raw[6 + 3 * i]))
            for i in range(len(ask.budgets))
        ]
        demand = ask.demand
        per_choice = (reserved - demand.prompt_tokens) // max(1, demand.n)
        admission = ask.admitted(
            reserved, per_choice, demand.max_tokens is None, "redis", verdicts, 1
        )
        self._note_headroom(ask.key, ask.budgets, verdicts, reserved)
        self._decide(admission, bool(allowed), bool(conc_ok), verdicts, reserved)
        return admission

    def _admit_local(self, ask: _Ask) -> Admission:
        demand = ask.demand
        per_choice = demand.completion_guess()
        reserved = demand.prompt_tokens + demand.n * per_choice
        share = self._peers.count
        allowed, verdicts = self._local.admit(ask.budgets, reserved, share)
        admission = ask.admitted(reserved, per_choice, False, "local", verdicts, share)
        self._decide(admission, allowed, True, verdicts, reserved)
        return admission

    def _decide(
        self,
        admission: Admission,
        allowed: bool,
        conc_ok: bool,
        verdicts: list[Verdict],
        reserved: int,
    ) -> None:
        mode = admission.mode
        if allowed:
            self._metrics.limiter_decisions.labels(mode, "allowed").inc()
            return
        self._metrics.limiter_decisions.labels(mode, "limited").inc()
        if not conc_ok:
            raise APIError(
                429,
                f"Too many concurrent requests for this key (limit "
                f"{admission.key.max_concurrent}); wait for one to finish.",
                type_="requests",
                code="rate_limit_exceeded",
                headers={"retry-after": "1", "retry-after-ms": "1000"},
            )
        raise _refusal(admission.budgets, verdicts, reserved, admission.headers)

    # -- settlement -------------------------------------------------------------------------

    def settle_command(self, admission: Admission, prompt: int, completion: int) -> Command | None:
        """The EVALSHA that corrects the reservation (sent with the usage record), if any."""
        admission.settled = True
        token_budgets = [b for b in admission.budgets if b.tokens]
        if admission.mode != "redis" or (
            not token_budgets and admission.key.max_concurrent is None and not admission.learn
        ):
            return None
        delta = prompt + completion - admission.reserved
        per_choice = completion / max(1, admission.n)
        argv: list[int | float | str] = [
            delta,
            admission.request_id,
            int(admission.learn),
            per_choice,
            LEARN_WEIGHT,
            LEARN_TTL_S,
        ]
        for b in token_budgets:
            argv += [b.limit, b.period_ms]
        keys = [
            learned_key(admission.key, admission.model),
            lease_key(admission.key),
            *(b.key for b in token_budgets),
        ]
        return ("EVALSHA", self._settle.sha, len(keys), *keys, *argv)

    async def run_again(self, command: Command) -> None:
        """Retry a script command that met NOSCRIPT (Redis restarted and lost its scripts)."""
        for script in (self._settle, self._admit):
            if command[1] == script.sha:
                await self._redis.script_load(script.script)
        await self._redis.execute_command(*command)  # type: ignore[no-untyped-call]

    def settle_local(self, admission: Admission, prompt: int, completion: int) -> None:
        admission.settled = True
        if admission.mode == "local":
            self._local.settle(
                admission.budgets, prompt + completion - admission.reserved, self._peers.count
            )

    def observe_estimate(self, admission: Admission, completion: int) -> None:
        expected = admission.expected_completion * admission.n
        if expected > 0:
            self._metrics.estimate_ratio.labels(admission.model).observe(completion / expected)

    # -- customers ----------------------------------------------------------------------------

    async def _customer_limits(self, customer: str) -> Limits | None:
        cached, limits = fresh(self._customers, customer, self._cache_ttl)
        if cached:
            return limits
        now = time.monotonic()
        hit = self._customers.get(customer)
        if not self.breaker.allow():
            return hit[1] if hit else None
        try:
            async with asyncio.timeout(self._timeout):
                limits = await self._keys.get_customer_limits(customer)
        except (RedisError, OSError, TimeoutError) as exc:
            self.breaker.failure(type(exc).__name__)
            return hit[1] if hit else None
        self.breaker.success()
        if len(self._customers) > 100_000:
            self._customers.clear()
        self._customers[customer] = (now, limits)
        return limits


def _chain(source: asyncio.Future[Admission], target: asyncio.Future[Admission]) -> None:
    if target.done():
        return
    if source.cancelled():
        target.cancel()
    elif (exc := source.exception()) is not None:
        target.set_exception(exc)
    else:
        target.set_result(source.result())


def _headers(
    budgets: list[Budget], verdicts: list[Verdict], share: int = 1
) -> list[tuple[bytes, bytes]]:
    """The most constraining budget of each kind (lowest remaining) speaks for it."""
    out: list[tuple[bytes, bytes]] = []
    for tokens, kind in ((False, "requests"), (True, "tokens")):
        pairs = [(b, v) for b, v in zip(budgets, verdicts, strict=True) if b.tokens is tokens]
        if not pairs:
            continue
        b, v = min(pairs, key=lambda p: p[1].remaining)
        limit = max(1, math.floor(b.limit / share)) if share > 1 else b.limit
        out += ratelimit_headers(kind, limit, v.remaining, v.reset_ms)
    return out


def _refusal(
    budgets: list[Budget],
    verdicts: list[Verdict],
    reserved: int,
    headers: list[tuple[bytes, bytes]],
) -> APIError:
    """429 naming the budget that ran out, with the real wait in Retry-After."""
    refused = [(b, v) for b, v in zip(budgets, verdicts, strict=True) if v.retry_ms != 0]
    never = [(b, v) for b, v in refused if v.retry_ms < 0]
    extra = {k.decode(): v.decode() for k, v in headers}
    if never:
        b, _ = never[0]
        return APIError(
            429,
            f"Request too large for the {b.scope} token limit: it needs about {reserved} "
            f"tokens but the limit is {b.limit} tokens per minute. Lower max_tokens or the "
            "prompt.",
            type_="tokens",
            code="rate_limit_exceeded",
            headers=extra,
        )
    b, v = max(refused, key=lambda p: p[1].retry_ms)
    what = "tokens" if b.tokens else "requests"
    wait_ms = max(1, v.retry_ms)
    return APIError(
        429,
        f"Rate limit reached for {what} per minute ({b.scope} limit {b.limit}). "
        f"Retry in {duration(wait_ms)}.",
        type_=what,
        code="rate_limit_exceeded",
        headers={
            **extra,
            "retry-after": str(math.ceil(wait_ms / 1000)),
            "retry-after-ms": str(wait_ms),
        },
    )
