"""The small closed-loop API the benchmark scripts in bench/ use: fixed concurrency, fixed
request count, latency / TTFT percentiles. Kept as it is so that their results stay comparable
with earlier ones; ``switchyard bench`` and the open loop live in load.py (engines),
workload.py, stats.py, report.py and progress.py.

A lean HTTP client (app/bench/http.py) rather than the ``openai`` client or aiohttp: on a
small machine the client's own CPU cost would otherwise dominate what is being measured.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson

from app.bench.http import Poster, auth_head, error_kind, sse_lines
from app.bench.stats import percentiles
from app.proxy.upstream import UpstreamError

__all__ = ["LoadResult", "LoadSpec", "percentiles", "run_load"]


@dataclass(frozen=True)
class LoadSpec:
    base_url: str  # e.g. http://127.0.0.1:8000/v1
    model: str
    api_key: str = "none"
    concurrency: int = 1
    requests: int = 100
    stream: bool = False
    max_tokens: int = 16
    max_tokens_spread: int = 0  # each request asks for max_tokens +- spread (seeded)
    seed: int = 0
    prompt: str = "Say something about switchyards and trains."
    warmup: int = 10


@dataclass
class LoadResult:
    spec: dict[str, Any]
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0
    throughput_rps: float = 0.0
    completion_tokens: int = 0
    latency_ms: dict[str, float] = field(default_factory=dict)
    ttft_ms: dict[str, float] = field(default_factory=dict)


async def _one(
    poster: Poster, spec: LoadSpec, body: bytes, head: bytes
) -> tuple[float, float | None, int, str | None]:
    """Return (latency, ttft, completion_tokens, error)."""
    t0 = time.perf_counter()
    ttft: float | None = None
    tokens = 0
    try:
        async with await poster.post(body, head) as resp:
            if resp.status != 200:
                await resp.read()
                return time.perf_counter() - t0, None, 0, f"http_{resp.status}"
            if not spec.stream:
                obj = orjson.loads(await resp.read())
                tokens = int(obj.get("usage", {}).get("completion_tokens", 0))
                return time.perf_counter() - t0, None, tokens, None
            async for now, line in sse_lines(resp):
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                if ttft is None and b'"content"' in line:
                    ttft = now - t0
                if b'"usage":{' in line or b'"usage": {' in line:
                    usage = orjson.loads(line[6:]).get("usage") or {}
                    tokens = int(usage.get("completion_tokens", 0))
            return time.perf_counter() - t0, ttft, tokens, None
    except (UpstreamError, TimeoutError) as exc:
        return time.perf_counter() - t0, None, 0, error_kind(exc)


def poster_for(spec: LoadSpec) -> Poster:
    return Poster(f"{spec.base_url}/chat/completions")


async def run_load(spec: LoadSpec) -> LoadResult:
    payload: dict[str, Any] = {
        "model": spec.model,
        "messages": [{"role": "user", "content": spec.prompt}],
        "max_tokens": spec.max_tokens,
        "stream": spec.stream,
    }
    if spec.stream:
        payload["stream_options"] = {"include_usage": True}
    rng = random.Random(spec.seed)

    def next_body() -> bytes:
        if spec.max_tokens_spread:
            payload["max_tokens"] = spec.max_tokens + rng.randint(
                -spec.max_tokens_spread, spec.max_tokens_spread
            )
        return orjson.dumps(payload)

    head = auth_head(spec.api_key)
    result = LoadResult(spec=asdict(spec) | {"api_key": "[redacted]"})
    latencies: list[float] = []
    ttfts: list[float] = []
    poster = poster_for(spec)
    try:
        for _ in range(spec.warmup):
            await _one(poster, spec, next_body(), head)
        remaining = spec.requests

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                lat, ttft, tokens, err = await _one(poster, spec, next_body(), head)
                if err is not None:
                    result.errors[err] = result.errors.get(err, 0) + 1
                    continue
                result.ok += 1
                result.completion_tokens += tokens
                latencies.append(lat)
                if ttft is not None:
                    ttfts.append(ttft)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(spec.concurrency)))
        result.wall_s = round(time.perf_counter() - t0, 4)
    finally:
        poster.close()
    result.throughput_rps = round(result.ok / result.wall_s, 2) if result.wall_s else 0.0
    result.latency_ms = percentiles(latencies)
    result.ttft_ms = percentiles(ttfts)
    return result
