"""Closed-loop load generator for any OpenAI-compatible base URL (gateway, engine, or a
deployed environment): fixed concurrency, fixed request count, latency / TTFT percentiles.

Raw aiohttp rather than the ``openai`` client: on a small machine the client's own CPU cost
would otherwise dominate what is being measured.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp
import orjson


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


def percentiles(samples: list[float]) -> dict[str, float]:
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


async def _one(
    session: aiohttp.ClientSession, spec: LoadSpec, body: bytes, headers: dict[str, str]
) -> tuple[float, float | None, int, str | None]:
    """Return (latency, ttft, completion_tokens, error)."""
    url = f"{spec.base_url}/chat/completions"
    t0 = time.perf_counter()
    ttft: float | None = None
    tokens = 0
    try:
        async with session.post(url, data=body, headers=headers) as resp:
            if resp.status != 200:
                await resp.read()
                return time.perf_counter() - t0, None, 0, f"http_{resp.status}"
            if not spec.stream:
                obj = orjson.loads(await resp.read())
                tokens = int(obj.get("usage", {}).get("completion_tokens", 0))
                return time.perf_counter() - t0, None, tokens, None
            async for line in resp.content:
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                if ttft is None and b'"content"' in line:
                    ttft = time.perf_counter() - t0
                if b'"usage":{' in line or b'"usage": {' in line:
                    usage = orjson.loads(line[6:]).get("usage") or {}
                    tokens = int(usage.get("completion_tokens", 0))
            return time.perf_counter() - t0, ttft, tokens, None
    except (aiohttp.ClientError, TimeoutError) as exc:
        return time.perf_counter() - t0, None, 0, type(exc).__name__


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

    headers = {"authorization": f"Bearer {spec.api_key}", "content-type": "application/json"}
    result = LoadResult(spec=asdict(spec) | {"api_key": "[redacted]"})
    latencies: list[float] = []
    ttfts: list[float] = []
    connector = aiohttp.TCPConnector(limit=spec.concurrency, limit_per_host=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        for _ in range(spec.warmup):
            await _one(session, spec, next_body(), headers)
        remaining = spec.requests

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                lat, ttft, tokens, err = await _one(session, spec, next_body(), headers)
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
    result.throughput_rps = round(result.ok / result.wall_s, 2) if result.wall_s else 0.0
    result.latency_ms = percentiles(latencies)
    result.ttft_ms = percentiles(ttfts)
    return result


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default="http://127.0.0.1:8000/v1", help="OpenAI base URL")
    p.add_argument("--key", default="none", help="API key (default: none)")
    p.add_argument("--model", default="chat-small")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--requests", type=int, default=500)
    p.add_argument("--stream", action="store_true")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--output", default=None, help="write the result as JSON to this file")


def main(args: argparse.Namespace) -> int:
    spec = LoadSpec(
        base_url=args.url.rstrip("/"),
        model=args.model,
        api_key=args.key,
        concurrency=args.concurrency,
        requests=args.requests,
        stream=args.stream,
        max_tokens=args.max_tokens,
    )
    result = asyncio.run(run_load(spec))
    text = json.dumps(asdict(result), indent=2)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    print(text)
    return 0 if result.ok else 1
