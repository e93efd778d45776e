"""Replica load as the engine reports it: a few gauges read from vLLM's Prometheus text.

Only the lines we need are looked at (a prefix test per line, no full exposition parser), so a
scrape of a busy replica costs well under a millisecond of gateway CPU.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

WAITING = "vllm:num_requests_waiting"
RUNNING = "vllm:num_requests_running"
KV_USAGE = "vllm:kv_cache_usage_perc"
_WANTED = (WAITING, RUNNING, KV_USAGE)


@dataclass(frozen=True, slots=True)
class EngineLoad:
    waiting: int = 0
    running: int = 0
    kv_usage: float = 0.0


def parse_engine_load(text: str) -> EngineLoad:
    """Sum each gauge over its label sets (one engine may expose several model names)."""
    sums = dict.fromkeys(_WANTED, 0.0)
    for line in text.splitlines():
        if not line.startswith("vllm:"):
            continue
        for name in _WANTED:
            if line.startswith(name) and line[len(name)] in " {":
                rest = line[len(name) :]
                if rest.startswith("{"):
                    rest = rest[rest.rfind("}") + 1 :]
                with contextlib.suppress(ValueError, IndexError):
                    sums[name] += float(rest.split()[0])
                break
    return EngineLoad(int(sums[WAITING]), int(sums[RUNNING]), min(1.0, sums[KV_USAGE]))
