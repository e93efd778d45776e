"""What a run measured: one record per request, and the summary computed from them.

Times are ``time.perf_counter()`` seconds. Latency counts from the moment the request was
*due* (its scheduled arrival in an open loop), not from when the client got round to sending
it: otherwise a slow server would also slow the client down and hide the queueing it causes
(coordinated omission).
"""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

RATE_LIMITED = "http_429"
DROPPED = "dropped"  # the open loop's in-flight cap was reached: the request was never sent


@dataclass(slots=True)
class RequestRecord:
    """One request as the client saw it."""

    index: int
    key: int
    due: float  # when it should have been sent (scheduled arrival; the send time when closed)
    sent: float = 0.0  # when it was actually handed to the HTTP client
    end: float = 0.0
    first_token: float | None = None
    chunk_times: list[float] = field(default_factory=list)  # arrival of each content chunk
    status: int = 0
    error: str | None = None  # None = success; "http_429", "http_503", "timeout", "dropped"…
    prompt_tokens: int = 0  # from the response's usage
    completion_tokens: int = 0
    asked_prompt: int = 0  # what the workload asked for (words of the prompt, max_tokens)
    asked_max_tokens: int = 0

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def latency(self) -> float:
        return self.end - self.due

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.due


def percentiles(samples: list[float]) -> dict[str, float]:
    """p50/p90/p99/mean/max of samples in seconds, reported in milliseconds."""
    if not samples:
        return {}
    s = sorted(samples)

    def q(p: float) -> float:
        return round(s[min(len(s) - 1, int(p * len(s)))] * 1000, 3)

    return {
        "p50": q(0.50),
        "p90": q(0.90),
        "p99": q(0.99),
        "mean": round(statistics.fmean(s) * 1000, 3),
        "max": round(s[-1] * 1000, 3),
    }


def inter_token_gaps(records: list[RequestRecord]) -> list[float]:
    """Gaps between consecutive content chunks of every successful stream (vLLM's ITL)."""
    gaps: list[float] = []
    for r in records:
        if r.ok and len(r.chunk_times) > 1:
            t = r.chunk_times
            gaps.extend(t[i] - t[i - 1] for i in range(1, len(t)))
    return gaps


def _counts(values: list[int]) -> dict[str, float]:
    if not values:
        return {}
    return {
        "mean": round(statistics.fmean(values), 2),
        "std": round(statistics.pstdev(values), 2),
        "min": min(values),
        "max": max(values),
    }


def concurrency(records: list[RequestRecord], wall: float) -> dict[str, float]:
    """Requests in flight: time-weighted mean (Little's law: throughput x latency) and peak."""
    sent = [r for r in records if r.error != DROPPED]
    events = sorted([(r.sent, 1) for r in sent] + [(r.end, -1) for r in sent])
    current = peak = 0
    for _, delta in events:
        current += delta
        peak = max(peak, current)
    return {"mean": round(sum(r.end - r.sent for r in sent) / wall, 2), "max": peak}


def summarize(
    records: list[RequestRecord], started: float, key_labels: list[str]
) -> dict[str, Any]:
    """The numbers a run reports (see the README's benchmark section for each one).

    Throughput counts successes over the whole run, from the first due time to the last
    answer; 429s are reported apart from the other errors because against a gateway they are
    the limiter doing its job, not a failure."""
    if not records:
        return {"requests": 0}
    end = max((r.end for r in records), default=started)
    wall = max(end - started, 1e-9)
    ok = [r for r in records if r.ok]
    errors = Counter(r.error for r in records if r.error is not None and r.error != RATE_LIMITED)
    rate_limited = sum(1 for r in records if r.error == RATE_LIMITED)
    sent = [r for r in records if r.error != DROPPED]
    arrivals = max(r.due for r in records) - started
    tokens = sum(r.completion_tokens for r in ok)
    per_key: dict[str, dict[str, int]] = {}
    for r in records:
        entry = per_key.setdefault(key_labels[r.key], {"requests": 0, "ok": 0, "rate_limited": 0})
        entry["requests"] += 1
        entry["ok"] += r.ok
        entry["rate_limited"] += r.error == RATE_LIMITED
    ttfts = [t for r in ok if (t := r.ttft) is not None]
    tpots = [
        (r.chunk_times[-1] - r.chunk_times[0]) / (len(r.chunk_times) - 1)
        for r in ok
        if len(r.chunk_times) > 1
    ]
    return {
        "requests": len(records),
        "ok": len(ok),
        "rate_limited": rate_limited,
        "errors": dict(sorted(errors.items())),
        "error_count": sum(errors.values()),
        "wall_s": round(wall, 4),
        "in_flight": concurrency(records, wall),
        "offered_rps": round((len(records) - 1) / arrivals, 2) if arrivals > 0 else None,
        "throughput_rps": round(len(ok) / wall, 2),
        "output_tokens_per_s": round(tokens / wall, 1),
        "completion_tokens": tokens,
        "prompt_tokens": sum(r.prompt_tokens for r in ok),
        "latency_ms": percentiles([r.latency for r in ok]),
        "ttft_ms": percentiles(ttfts),
        "itl_ms": percentiles(inter_token_gaps(ok)),
        "tpot_ms": percentiles(tpots),
        # How late the client sent requests after they were due: large values mean the load
        # generator itself was the bottleneck and the offered rate was not really offered.
        "send_lag_ms": percentiles([r.sent - r.due for r in sent]),
        "lengths": {
            "prompt_tokens": _counts([r.prompt_tokens for r in ok]),
            "completion_tokens": _counts([r.completion_tokens for r in ok]),
        },
        "per_key": per_key,
    }
