"""vLLM's Prometheus metrics, recorded with plain ints and exposed through a custom collector.

Recording happens per token on the hot path, so it must cost a list increment, not a lock:
the simulator is single-threaded (one event loop), and the values are turned into metric
families only when /metrics is scraped. Each app gets its own CollectorRegistry.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

# Bucket bounds as vLLM's metrics module defines them (seconds).
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
ITL_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
E2E_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
    60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip

FINISHED_REASONS = ("stop", "length", "abort")


class Histogram:
    """Bucket counts with Prometheus `le` semantics; observe() is a bisect and an add."""

    __slots__ = ("bounds", "count", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.count = 0
        self.total = 0.0

    def observe(self, value: float, times: int = 1) -> None:
        if times <= 0:
            return
        self.counts[bisect_left(self.bounds, value)] += times
        self.count += times
        self.total += value * times

    def cumulative(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        running = 0
        for bound, n in zip(self.bounds, self.counts, strict=False):
            running += n
            out.append((repr(float(bound)), running))
        out.append(("+Inf", self.count))
        return out


@dataclass(slots=True)
class EngineMetrics:
    """Monotonic counters and histograms (never reset, unlike /sim/stats)."""

    prompt_tokens: int = 0
    generation_tokens: int = 0
    finished: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FINISHED_REASONS, 0))
    ttft: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS))
    itl: Histogram = field(default_factory=lambda: Histogram(ITL_BUCKETS))
    e2e: Histogram = field(default_factory=lambda: Histogram(E2E_BUCKETS))


@dataclass(frozen=True, slots=True)
class Gauges:
    running: int
    waiting: int
    kv_cache_usage: float


class VllmCollector(Collector):
    """Turns the engine's state into vLLM-named metric families at scrape time."""

    def __init__(self, model: str, metrics: EngineMetrics, gauges: Callable[[], Gauges]) -> None:
        self._model = model
        self._m = metrics
        self._gauges = gauges

    def collect(self) -> Iterator[Metric]:
        labels = ["model_name"]
        value = [self._model]
        g = self._gauges()
        for name, doc, v in (
            ("vllm:num_requests_running", "Number of requests in model execution batches.",
             g.running),
            ("vllm:num_requests_waiting", "Number of requests waiting to be processed.",
             g.waiting),
            ("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
             g.kv_cache_usage),
        ):  # fmt: skip
            gauge = GaugeMetricFamily(name, doc, labels=labels)
            gauge.add_metric(value, v)
            yield gauge
        for name, doc, n in (
            ("vllm:prompt_tokens", "Number of prefill tokens processed.", self._m.prompt_tokens),
            ("vllm:generation_tokens", "Number of generation tokens processed.",
             self._m.generation_tokens),
        ):  # fmt: skip
            counter = CounterMetricFamily(name, doc, labels=labels)
            counter.add_metric(value, n)
            yield counter
        success = CounterMetricFamily(
            "vllm:request_success",
            "Count of successfully processed requests.",
            labels=["model_name", "finished_reason"],
        )
        for reason, n in self._m.finished.items():
            success.add_metric([self._model, reason], n)
        yield success
        for name, doc, hist in (
            ("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
             self._m.ttft),
            ("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
             self._m.itl),
            ("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
             self._m.e2e),
        ):  # fmt: skip
            family = HistogramMetricFamily(name, doc, labels=labels)
            family.add_metric(value, hist.cumulative(), sum_value=hist.total)
            yield family


def make_registry(collector: Collector) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
