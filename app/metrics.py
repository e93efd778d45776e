"""Gateway Prometheus metrics, one registry per app (so tests can run several gateways).

Labels are bounded: model names come from the catalogue (unknown names are folded into
"unknown"), never key ids, customers or anything secret.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

# The *_created series double the scrape size and nothing here reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]

_LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    120,
    300,
)
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)


@dataclass
class GatewayMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = Counter(
            "switchyard_requests",
            "Requests answered, by requested model (or alias), serving target "
            "(model, or model@revision for a canary), endpoint and HTTP status.",
            ["model", "target", "endpoint", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "switchyard_request_duration_seconds",
            "Time from request arrival to the last byte sent.",
            ["model", "endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "switchyard_time_to_first_token_seconds",
            "Time from request arrival to the first generated token relayed (streams), by "
            "requested model (or alias) and serving target.",
            ["model", "target"],
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "switchyard_tokens",
            "Tokens served, by model and type (prompt|completion).",
            ["model", "type"],
            registry=r,
        )
        self.upstream_errors = Counter(
            "switchyard_upstream_errors",
            "Upstream failures, by model and reason (connect|timeout|status_5xx|broken_stream).",
            ["model", "reason"],
            registry=r,
        )
        self.inflight = Gauge(
            "switchyard_inflight_requests",
            "Requests being proxied right now.",
            ["model"],
            registry=r,
        )
        self.client_aborts = Counter(
            "switchyard_client_disconnects",
            "Requests whose client went away before the response finished.",
            ["model"],
            registry=r,
        )
        self.slow_clients = Counter(
            "switchyard_slow_clients",
            "Streams cut off at the total timeout because the client stopped reading.",
            registry=r,
        )
        self.limiter_decisions = Counter(
            "switchyard_ratelimit_decisions",
            "Rate-limit decisions, by mode (redis|local|off|closed) and result.",
            ["mode", "result"],
            registry=r,
        )
        self.limiter_circuit_open = Gauge(
            "switchyard_ratelimit_redis_circuit_open",
            "1 while the limiter skips an unreachable Redis (fail-open or fail-closed applies).",
            registry=r,
        )
        self.overlapped = Counter(
            "switchyard_ratelimit_overlapped",
            "Requests sent upstream while their rate-limit decision was still pending.",
            ["model"],
            registry=r,
        )
        self.overlap_refused = Counter(
            "switchyard_ratelimit_overlap_refused",
            "Requests sent upstream while their rate-limit decision was pending, then refused "
            "(the engine may have started them; the client got a 429 and was not billed).",
            ["model"],
            registry=r,
        )
        self.early_starts = Counter(
            "switchyard_early_starts",
            "Proxied requests begun in the server's read callback (started: checked, and sent "
            "upstream unless refused) or left to their task because the key's record was not "
            "cached (not_cached).",
            ["outcome"],
            registry=r,
        )
        self.estimate_ratio = Histogram(
            "switchyard_completion_estimate_ratio",
            "Real completion tokens / tokens reserved for the completion up front.",
            ["model"],
            buckets=(0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2, 4, 10),
            registry=r,
        )
        self.usage_spooled = Counter(
            "switchyard_usage_spooled",
            "Usage events written to the local spool because Redis could not take them.",
            registry=r,
        )
        self.replica_healthy = Gauge(
            "switchyard_replica_healthy",
            "1 if the replica passed its last health check.",
            ["model", "replica"],
            registry=r,
        )
        self.replica_waiting = Gauge(
            "switchyard_replica_waiting_requests",
            "vllm:num_requests_waiting of the replica at its last scrape.",
            ["model", "replica"],
            registry=r,
        )
        self.shed = Counter(
            "switchyard_shed_requests",
            "Requests answered 503 at once because every replica's queue was too long.",
            ["model"],
            registry=r,
        )
        self.fallbacks = Counter(
            "switchyard_fallbacks",
            "Requests served by a fallback model because the model had no available replica.",
            ["model", "fallback"],
            registry=r,
        )
        self.canary_weight = Gauge(
            "switchyard_canary_weight",
            "Effective weight of each target of a traffic split (alias or model canary).",
            ["split", "target"],
            registry=r,
        )
        self.canary_rollbacks = Counter(
            "switchyard_canary_rollbacks",
            "Canaries moved to weight 0 by the guard.",
            ["split", "target"],
            registry=r,
        )
        self.gc_pause = Histogram(
            "switchyard_gc_pause_seconds",
            "Garbage-collector pauses of this process, by generation collected.",
            ["generation"],
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1),
            registry=r,
        )
        self.gc_frozen = Gauge(
            "switchyard_gc_frozen_objects",
            "Objects moved out of the collector's sight once start-up was done.",
            registry=r,
        )
        # Every request asks for the same few label children: prometheus' labels() costs
        # several µs, a cache hit a fraction of one. These children are never removed.
        for metric in (
            self.requests,
            self.latency,
            self.ttft,
            self.tokens,
            self.inflight,
            self.limiter_decisions,
            self.overlapped,
            self.early_starts,
        ):
            metric.labels = functools.lru_cache(maxsize=4096)(metric.labels)  # type: ignore[method-assign,assignment]
