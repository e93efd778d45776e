"""The two ways of offering load.

* Open loop (``rate``): arrivals follow a Poisson process at the given rate, drawn in advance
  and independent of how fast answers come back, like real users. A request's latency counts
  from its scheduled arrival, so when the server (or this client) falls behind, the waiting
  shows up in the numbers instead of silently lowering the offered rate (coordinated
  omission). A cap on requests in flight keeps a saturated target from exhausting the client;
  arrivals beyond it are counted as ``dropped`` errors, never delayed.
* Closed loop (``concurrency``): that many workers, each sending its next request when the
  previous one is answered: the load adapts to the server, which is how to find its maximum
  throughput, not how to measure latency under a given load.
"""

from __future__ import annotations

import asyncio
import gc
import random
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from app.bench.http import Poster, auth_head
from app.bench.request import send
from app.bench.stats import DROPPED, RATE_LIMITED, RequestRecord, summarize
from app.bench.workload import Planned, Workload
from app.gc_tuning import freeze_startup_heap


@dataclass(frozen=True)
class LoadPlan:
    """One run: where, what (the workload), how (rate xor concurrency) and how long
    (requests xor duration)."""

    base_url: str  # e.g. http://127.0.0.1:8000/v1
    workload: Workload
    rate: float | None = None  # requests per second, open loop
    concurrency: int | None = None  # workers, closed loop
    requests: int | None = None
    duration_s: float | None = None
    max_in_flight: int = 1000  # open loop only
    warmup: int = 0  # requests sent (closed loop, not recorded) before the run starts
    timeout_s: float = 60.0
    endpoint: str = "chat/completions"

    def __post_init__(self) -> None:
        if (self.rate is None) == (self.concurrency is None):
            raise ValueError("give either a rate (open loop) or a concurrency (closed loop)")
        if (self.requests is None) == (self.duration_s is None):
            raise ValueError("give either a number of requests or a duration")
        if self.rate is not None and self.rate <= 0:
            raise ValueError("the rate must be > 0")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError("the concurrency must be >= 1")

    @property
    def mode(self) -> str:
        return "open" if self.rate is not None else "closed"

    def describe(self) -> dict[str, Any]:
        """The plan as stored in a result file (keys by label only, never the secrets)."""
        out = asdict(self)
        wl = self.workload
        out["mode"] = self.mode
        out["workload"] = {
            "model": wl.model,
            "keys": [{"label": k.label, "weight": k.weight} for k in wl.keys],
            "prompt_tokens": str(wl.prompt_tokens),
            "max_tokens": str(wl.max_tokens),
            "stream": wl.stream,
            "ignore_eos": wl.ignore_eos,
            "seed": wl.seed,
        }
        return out


@dataclass
class Live:
    """Counters a progress display reads while the run goes on (no locks: one event loop)."""

    started: float = 0.0
    total: int | None = None
    duration_s: float | None = None
    done: int = 0
    ok: int = 0
    rate_limited: int = 0
    errors: int = 0
    dropped: int = 0
    in_flight: int = 0

    def finish(self, record: RequestRecord) -> None:
        self.done += 1
        if record.ok:
            self.ok += 1
        elif record.error == RATE_LIMITED:
            self.rate_limited += 1
        elif record.error == DROPPED:
            self.dropped += 1
        else:
            self.errors += 1


@dataclass
class RunResult:
    plan: LoadPlan
    records: list[RequestRecord]
    started: float
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def key_labels(self) -> list[str]:
        return [k.label for k in self.plan.workload.keys]


def poisson_arrivals(rate: float, seed: int) -> Iterator[float]:
    """Offsets (s) of a Poisson process: independent exponential gaps of mean 1/rate."""
    rng = random.Random(seed)
    t = 0.0
    while True:
        yield t
        t += rng.expovariate(rate)


class _Runner:
    def __init__(self, plan: LoadPlan, live: Live) -> None:
        self.plan = plan
        self.live = live
        self.url = f"{plan.base_url.rstrip('/')}/{plan.endpoint}"
        self.heads = [auth_head(k.secret) for k in plan.workload.keys]
        self.requests = plan.workload.plan()
        self.records: list[RequestRecord] = []

    async def one(self, poster: Poster, p: Planned, record: RequestRecord) -> None:
        """Send and account for one request (the caller counted it in flight already, so the
        open loop's cap also sees requests whose task has not started yet)."""
        try:
            await send(poster, p.body, self.heads[p.key], record, self.plan.workload.stream)
        finally:
            self.live.in_flight -= 1
            self.live.finish(record)

    def record(self, p: Planned, due: float) -> RequestRecord:
        r = RequestRecord(p.index, p.key, due, asked_prompt=p.prompt_tokens)
        r.asked_max_tokens = p.max_tokens
        self.records.append(r)
        return r

    async def warmup(self, poster: Poster) -> None:
        async def worker(n: int) -> None:
            for _ in range(n):
                p = next(self.requests)
                scratch = RequestRecord(p.index, p.key, time.perf_counter())
                await send(poster, p.body, self.heads[p.key], scratch, self.plan.workload.stream)

        width = min(self.plan.concurrency or 4, self.plan.warmup)
        if width:
            share = [
                self.plan.warmup // width + (i < self.plan.warmup % width) for i in range(width)
            ]
            await asyncio.gather(*(worker(n) for n in share))

    async def open_loop(self, poster: Poster, t0: float) -> None:
        plan = self.plan
        assert plan.rate is not None
        tasks: set[asyncio.Task[None]] = set()
        arrivals = poisson_arrivals(plan.rate, plan.workload.seed + 1)
        for n, offset in enumerate(arrivals):
            if plan.requests is not None and n >= plan.requests:
                break
            if plan.duration_s is not None and offset >= plan.duration_s:
                break
            due = t0 + offset
            delay = due - time.perf_counter()
            # Behind schedule: send at once (still timed from `due`), but let the loop run.
            await asyncio.sleep(max(delay, 0.0))
            p = next(self.requests)
            record = self.record(p, due)
            if self.live.in_flight >= plan.max_in_flight:
                record.sent = record.end = time.perf_counter()
                record.error = DROPPED
                self.live.finish(record)
                continue
            self.live.in_flight += 1
            task = asyncio.create_task(self.one(poster, p, record))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)

    async def closed_loop(self, poster: Poster, t0: float) -> None:
        plan = self.plan
        assert plan.concurrency is not None
        budget = plan.requests
        deadline = None if plan.duration_s is None else t0 + plan.duration_s

        async def worker() -> None:
            nonlocal budget
            while True:
                if budget is not None:
                    if budget <= 0:
                        return
                    budget -= 1
                now = time.perf_counter()
                if deadline is not None and now >= deadline:
                    return
                p = next(self.requests)
                self.live.in_flight += 1
                await self.one(poster, p, self.record(p, now))

        await asyncio.gather(*(worker() for _ in range(plan.concurrency)))


async def run(plan: LoadPlan, live: Live | None = None) -> RunResult:
    """Run the plan and summarize it. ``live`` is updated as requests finish."""
    live = live or Live()
    runner = _Runner(plan, live)
    # One connection per request in flight (the open loop's cap is our own, in_flight).
    poster = Poster(runner.url, plan.timeout_s)
    freeze_startup_heap()  # the caller's heap out of the collector's way while we time
    try:
        await runner.warmup(poster)
        live.total, live.duration_s = plan.requests, plan.duration_s
        t0 = live.started = time.perf_counter()
        if plan.rate is not None:
            await runner.open_loop(poster, t0)
        else:
            await runner.closed_loop(poster, t0)
    finally:
        gc.unfreeze()
        poster.close()
    result = RunResult(plan, runner.records, t0)
    result.summary = summarize(runner.records, t0, result.key_labels)
    return result


Side = Callable[[], Coroutine[Any, Any, None]]


def _on_fresh_loop(main: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main())
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main())


def run_sync(plan: LoadPlan, live: Live | None = None, *, side: Side | None = None) -> RunResult:
    """``run`` on a fresh event loop (uvloop when installed: less client CPU per request).

    ``side`` is an optional coroutine factory run alongside (a progress display); it is
    cancelled when the load is done."""

    async def main() -> RunResult:
        task = asyncio.create_task(side()) if side is not None else None
        try:
            return await run(plan, live)
        finally:
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    result: RunResult = _on_fresh_loop(main)
    return result


def run_together(plans: Sequence[LoadPlan]) -> list[RunResult]:
    """Several plans at the same time on one event loop. For paired comparisons (gateway vs
    direct): both sides live through the same moments of a noisy machine, instead of one
    side getting the quiet minute and the other a neighbour's burst."""

    async def main() -> list[RunResult]:
        return list(await asyncio.gather(*(run(p) for p in plans)))

    results: list[RunResult] = _on_fresh_loop(main)
    return results
