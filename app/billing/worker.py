"""``switchyard billing run``: usage stream -> per-(customer, meter, window) totals -> Stripe.

Any number of workers may run. Each reads the stream through one consumer group, folds a batch
with one Lua call (each request id at most once) and acknowledges only after the fold returned,
so a worker killed anywhere leaves its batch pending; the others reclaim it (XAUTOCLAIM) and the
fold's dedup makes the second application count zero. Closed windows are sent to Stripe, one
meter event per (customer, meter, window) with a deterministic identifier, and marked sent only
after Stripe accepted; the sent mark and the sent counter change in one transaction. A crash
between Stripe's answer and the mark means a resend with the same identifier, which Stripe
deduplicates.
"""

from __future__ import annotations

import json
import logging
import signal
import socket
import time
from dataclasses import dataclass, field
from importlib import resources
from types import FrameType
from typing import Any

import redis
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from app.billing.record import STREAM
from app.billing.stripe_sender import Result, StripeSender, backoff, identifier
from app.catalog import Catalog, Meters
from app.settings import Settings

log = logging.getLogger(__name__)

GROUP = "billing"
WINDOWS = "sy:{bill}:windows"
RECORDED = "sy:{bill}:recorded"
SENT_TOTAL = "sy:{bill}:sent"
DEAD_LIST = "sy:{bill}:dead"
FOLD_BATCH = 1000  # stream entries read and folded at once
DEDUP_HORIZON_S = 3600  # an event id is remembered for 1-2 h: covers redelivery and replays
STRIPE_DEDUP_S = 23 * 3600  # give up automatic resends before Stripe forgets identifiers
DEFAULT_METERS = Meters()


def window_key(start: int, part: str) -> str:
    return f"sy:{{bill}}:w:{start}:{part}"


@dataclass
class WorkerMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.folded = Counter(
            "switchyard_billing_events_folded", "Usage events folded.", registry=r
        )
        self.duplicates = Counter(
            "switchyard_billing_events_duplicate",
            "Usage events seen again and counted zero times.",
            registry=r,
        )
        self.sent = Counter(
            "switchyard_billing_meter_events_sent", "Meter events Stripe accepted.", registry=r
        )
        self.retries = Counter(
            "switchyard_billing_stripe_retries",
            "Stripe calls to be retried (429, 5xx, network).",
            registry=r,
        )
        self.dead = Counter(
            "switchyard_billing_dead_letters",
            "Meter events Stripe refused for good (see billing dead-letters).",
            registry=r,
        )
        self.pending_windows = Gauge(
            "switchyard_billing_pending_windows",
            "Windows with totals not yet all sent.",
            registry=r,
        )


class RateLimit:
    """Keeps Stripe calls under a configured rate (token bucket, blocking)."""

    def __init__(self, per_s: float) -> None:
        self._interval = 1.0 / per_s
        self._next = time.monotonic()

    def wait(self) -> None:
        now = time.monotonic()
        if self._next > now:
            time.sleep(self._next - now)
        self._next = max(now, self._next) + self._interval


class BillingWorker:
    def __init__(
        self,
        settings: Settings,
        client: redis.Redis | None = None,
        sender: StripeSender | None = None,
        consumer: str | None = None,
    ) -> None:
        self.settings = settings
        # Typed loosely: redis-py's sync stubs mix bytes and str results.
        self.redis: Any = client or redis.Redis.from_url(
            settings.redis_url, socket_timeout=5, socket_connect_timeout=2
        )
        self.catalog: Catalog = settings.catalog
        self.window_s = settings.billing_window_s
        key = settings.stripe_api_key
        self.sender = sender or (
            StripeSender(
                key.get_secret_value(), settings.stripe_api_base, settings.stripe_timeout_s
            )
            if key
            else None
        )
        self.consumer = consumer or f"{socket.gethostname()}-{id(self):x}"
        self.metrics = WorkerMetrics()
        self._fold = self.redis.register_script(
            resources.files("app.billing").joinpath("lua", "fold.lua").read_text("utf-8")
        )
        self._rate = RateLimit(settings.stripe_max_events_per_s)
        self.last_read = 0  # entries the last aggregate_once read
        self._reclaim_idle_ms = int(settings.billing_reclaim_idle_s * 1000)
        # A send lock outlives any call it guards (timeout + margin), and no longer: a killed
        # worker's lock must not hold its totals back for long.
        self._lock_ms = int((settings.stripe_timeout_s + 5) * 1000)
        self._backoff: dict[tuple[int, str], tuple[float, int]] = {}
        self._stopping = False

    # -- aggregate ---------------------------------------------------------------------------

    def ensure_group(self) -> None:
        try:
            self.redis.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def _meters(self, model: str) -> Meters:
        spec = self.catalog.get(model)
        return spec.meters if spec is not None else DEFAULT_METERS

    def fold(self, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> int:
        """Fold entries, then acknowledge (and delete) them. Returns events newly counted."""
        if not entries:
            return 0
        argv: list[str | int] = [self.window_s, DEDUP_HORIZON_S]
        for _, f in entries:
            model = f.get(b"model", b"").decode()
            meters = self._meters(model)
            argv += [
                f[b"rid"].decode(),
                f[b"cus"].decode(),
                f.get(b"key", b"").decode(),
                model,
                meters.input,
                meters.output,
                int(f.get(b"pt", b"0")),
                int(f.get(b"ct", b"0")),
            ]
        folded, duplicates, _ = self._fold(keys=[WINDOWS], args=argv)
        ids = [eid for eid, _ in entries]
        pipe = self.redis.pipeline(transaction=True)
        pipe.xack(STREAM, GROUP, *ids)
        pipe.xdel(STREAM, *ids)
        pipe.execute()
        self.metrics.folded.inc(folded)
        self.metrics.duplicates.inc(duplicates)
        return int(folded)

    def aggregate_once(self, count: int = FOLD_BATCH, block_ms: int = 200) -> int:
        """Read up to ``count`` new entries and fold them; returns how many were new usage
        (``last_read``: how many entries were read, duplicates and empty ones included)."""
        reply = self.redis.xreadgroup(
            GROUP, self.consumer, {STREAM: ">"}, count=count, block=block_ms
        )
        read = [e for _, batch in (reply or []) for e in batch]
        self.last_read = len(read)
        return self.fold([e for e in read if e[1]])

    def reclaim(self) -> int:
        """Take over entries another (dead) consumer read but never acknowledged."""
        total = 0
        start = "0-0"
        while True:
            reply = self.redis.xautoclaim(
                STREAM, GROUP, self.consumer, self._reclaim_idle_ms, start_id=start, count=500
            )
            start, entries = reply[0], reply[1]
            total += self.fold([e for e in entries if e[1]])
            if start in (b"0-0", "0-0"):
                return total

    # -- send -------------------------------------------------------------------------------

    def _now(self) -> int:
        secs, _ = self.redis.time()
        return int(secs)

    def send_due(self) -> int:
        """Send every closed window's unsent totals. Returns meter events accepted."""
        now = self._now()
        starts = [int(s) for s in self.redis.zrangebyscore(WINDOWS, "-inf", now - self.window_s)]
        self.metrics.pending_windows.set(self.redis.zcard(WINDOWS))
        if self.sender is None:
            return 0
        accepted = 0
        for start in starts:
            accepted += self._send_window(start, now)
            if self._stopping:
                break
        return accepted

    def _send_window(self, start: int, now: int) -> int:
        totals = self.redis.hgetall(window_key(start, "totals"))
        done = set(self.redis.hkeys(window_key(start, "sent"))) | set(
            self.redis.hkeys(window_key(start, "dead"))
        )
        accepted = 0
        for raw_field, raw_value in totals.items():
            if raw_field in done:
                continue
            fld = raw_field.decode()
            wait = self._backoff.get((start, fld))
            if wait and wait[0] > time.monotonic():
                continue
            customer, meter = fld.split("\t", 1)
            value = int(raw_value)
            ident = identifier(start, customer, meter)
            lock = f"sy:{{bill}}:lock:{ident}"
            if not self.redis.set(lock, self.consumer, nx=True, px=self._lock_ms):
                continue  # another worker is sending it (one call per customer and meter)
            try:
                if now - start > STRIPE_DEDUP_S:
                    result = Result("dead", "too old to resend safely (Stripe dedup horizon)")
                else:
                    self._rate.wait()
                    result = self.sender.send(meter, customer, value, ident, start)  # type: ignore[union-attr]
                accepted += self._record(start, fld, value, ident, result)
            finally:
                self.redis.delete(lock)
        if set(totals) <= set(self.redis.hkeys(window_key(start, "sent"))) | set(
            self.redis.hkeys(window_key(start, "dead"))
        ):
            pipe = self.redis.pipeline(transaction=True)
            pipe.zrem(WINDOWS, start)
            pipe.delete(
                window_key(start, "totals"), window_key(start, "sent"), window_key(start, "dead")
            )
            pipe.execute()
        return accepted

    def _record(self, start: int, fld: str, value: int, ident: str, result: Result) -> int:
        if result.outcome == "sent":
            pipe = self.redis.pipeline(transaction=True)
            pipe.hset(window_key(start, "sent"), fld, value)
            pipe.hincrby(SENT_TOTAL, fld, value)
            pipe.execute()
            self._backoff.pop((start, fld), None)
            self.metrics.sent.inc()
            return 1
        if result.outcome == "dead":
            customer, meter = fld.split("\t", 1)
            entry = {
                "identifier": ident,
                "window": start,
                "customer": customer,
                "meter": meter,
                "value": value,
                "error": result.detail,
                "at": int(time.time()),
            }
            pipe = self.redis.pipeline(transaction=True)
            pipe.hset(window_key(start, "dead"), fld, value)
            pipe.lpush(DEAD_LIST, json.dumps(entry))
            pipe.execute()
            self.metrics.dead.inc()
            log.error(
                "billing: Stripe refused %s for good (%s); see `switchyard billing dead-letters`",
                ident,
                result.detail,
            )
            return 0
        attempt = self._backoff.get((start, fld), (0.0, 0))[1] + 1
        delay = result.retry_after_s if result.retry_after_s is not None else backoff(attempt)
        self._backoff[(start, fld)] = (time.monotonic() + delay, attempt)
        self.metrics.retries.inc()
        log.warning("billing: will retry %s in %.1fs (%s)", ident, delay, result.detail)
        return 0

    def resend_dead_letter(self, ident: str) -> Result:
        """Try a dead-lettered meter event again (after fixing its customer or meter)."""
        if self.sender is None:
            return Result("retry", "SWITCHYARD_STRIPE_API_KEY is not set")
        for raw in self.redis.lrange(DEAD_LIST, 0, -1):
            entry = json.loads(raw)
            if entry["identifier"] != ident:
                continue
            result = self.sender.send(
                entry["meter"], entry["customer"], int(entry["value"]), ident, int(entry["window"])
            )
            if result.outcome == "sent":
                pipe = self.redis.pipeline(transaction=True)
                pipe.lrem(DEAD_LIST, 1, raw)
                pipe.hincrby(
                    SENT_TOTAL, f"{entry['customer']}\t{entry['meter']}", int(entry["value"])
                )
                pipe.execute()
                self.metrics.sent.inc()
            return result
        return Result("dead", f"no dead letter with identifier {ident}")

    # -- run ----------------------------------------------------------------------------------

    def stop(self, *_: Any) -> None:
        self._stopping = True

    def run(self, idle_exit_s: float | None = None) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        if self.settings.billing_health_port:
            start_http_server(self.settings.billing_health_port, registry=self.metrics.registry)
        while not self._stopping:  # Redis may be away when the worker starts: wait for it
            try:
                self.ensure_group()
                break
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                log.warning("billing: redis unavailable (%s); retrying", type(exc).__name__)
                time.sleep(1.0)
        if self.sender is None:
            log.warning(
                "billing: SWITCHYARD_STRIPE_API_KEY is not set: usage is aggregated "
                "and visible, nothing is sent to Stripe"
            )
        last_reclaim = 0.0
        idle_since = time.monotonic()
        while not self._stopping:
            try:
                worked = self.aggregate_once(count=FOLD_BATCH)
                if time.monotonic() - last_reclaim > 5:
                    worked += self.reclaim()
                    last_reclaim = time.monotonic()
                worked += self.send_due()
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                log.warning("billing: redis unavailable (%s); retrying", type(exc).__name__)
                time.sleep(1.0)
                continue
            if worked:
                idle_since = time.monotonic()
            elif idle_exit_s is not None and time.monotonic() - idle_since > idle_exit_s:
                return
            if 0 < self.last_read < FOLD_BATCH and self.settings.billing_poll_s:
                # Not behind: let events gather. A blocked read returns at the first new
                # event, so without the pause a busy gateway wakes this worker (and costs
                # Redis a read, a fold and a window check) for every request: at 500 req/s
                # that was ~0.3 core with Redis, on a machine the gateway shares.
                time.sleep(self.settings.billing_poll_s)


def install_sigint(worker: BillingWorker) -> None:
    def _handler(signum: int, frame: FrameType | None) -> None:
        worker.stop()

    signal.signal(signal.SIGINT, _handler)
