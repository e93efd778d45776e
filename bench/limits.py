"""Rate limiter cost: decisions per second of the limiter alone, and the latency it adds to a
request through the gateway.

1. The limiter alone: ``Limiter.admit`` (one Lua call deciding a key's request and token
   budgets) in a loop against a real redis-server, 16 coroutines in one process.
2. Through the gateway: the same requests with a key that has limits (admit + settle in
   Redis) and with an unlimited key (the limiter makes no Redis call), interleaved in one run,
   at concurrency 1 and 8. The limited key is measured twice: on the default gateway, where a
   key with ample headroom goes upstream while its decision is on the way (overlap), and on a
   second gateway process with ``SWITCHYARD_LIMITER_OVERLAP=false``, where every request waits
   for its decision.

Writes bench/results/limits.json. Targets: >= 5,000 decisions/s per gateway process,
<= 0.3 ms added at p50.

    .venv/bin/python bench/limits.py [--seconds 5] [--requests 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from app.auth.keys import KeyStore  # noqa: E402
from app.bench.client import LoadSpec, run_load  # noqa: E402
from app.catalog import parse_catalog  # noqa: E402
from app.limits.limiter import Demand, Limiter  # noqa: E402
from app.limits.peers import PeerCount  # noqa: E402
from app.metrics import GatewayMetrics  # noqa: E402
from app.server import redis_client  # noqa: E402
from app.settings import Settings  # noqa: E402
from bench.overhead import (  # noqa: E402
    RESULTS,
    create_key,
    machine,
    start_gateway,
    start_stack,
)


async def limiter_alone(redis_url: str, seconds: float, workers: int) -> dict[str, Any]:
    redis = redis_client(Settings(redis_url=redis_url))
    keys = KeyStore(redis)
    record, _ = await keys.create(customer="cus_bench_alone", rpm=10**9, tpm=10**12)
    spec = parse_catalog({"models": [{"name": "chat-small"}]}).models[0]
    limiter = Limiter(redis, keys, GatewayMetrics(), PeerCount(redis), "fail_open", 1.0, 1.0)
    demand = Demand(
        prompt_tokens=30, max_tokens=64, n=1, default_completion=256, completion_cap=4000
    )
    count = 0
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def worker(w: int) -> None:
        nonlocal count
        i = 0
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            admission = await limiter.admit(record, spec, demand, f"r{w}-{i}")
            latencies.append(time.perf_counter() - t0)
            assert admission.mode == "redis"
            count += 1
            i += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(workers)))
    wall = time.perf_counter() - t0
    await redis.aclose()
    latencies.sort()
    return {
        "decisions": count,
        "seconds": round(wall, 3),
        "decisions_per_s": round(count / wall),
        "concurrency": workers,
        "latency_ms": {
            "p50": round(latencies[len(latencies) // 2] * 1000, 3),
            "p99": round(latencies[int(len(latencies) * 0.99)] * 1000, 3),
        },
    }


async def through_gateway(
    sides: dict[str, tuple[str, str]], requests: int, rounds: int
) -> list[dict[str, Any]]:
    """``sides``: name -> (gateway URL, key); each round runs every side once, in turn."""
    rows = []
    for concurrency in (1, 8):
        p50s: dict[str, list[float]] = {side: [] for side in sides}
        for _ in range(rounds):
            for side, (gateway, key) in sides.items():
                spec = LoadSpec(
                    base_url=f"{gateway}/v1",
                    model="chat-small",
                    api_key=key,
                    concurrency=concurrency,
                    requests=requests,
                    max_tokens=1,
                    warmup=20,
                )
                result = await run_load(spec)
                assert result.ok == requests, result.errors
                p50s[side].append(result.latency_ms["p50"])
        med = {k: sorted(v)[len(v) // 2] for k, v in p50s.items()}
        row: dict[str, Any] = {"concurrency": concurrency, "p50_ms": med}
        for side in sides:
            if side != "unlimited":
                row[f"added_p50_ms_{side}"] = round(med[side] - med["unlimited"], 3)
        row["added_p50_ms"] = row["added_p50_ms_limited"]
        rows.append(row)
        print(
            f"c={concurrency}: limiter adds {row['added_p50_ms']:.3f} ms at p50 "
            f"({row['added_p50_ms_limited_no_overlap']:.3f} ms without overlap)",
            flush=True,
        )
    return rows


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="sy-bench-") as tmp:
        children, _, gateway, _ = start_stack(Path(tmp), ttft_ms=0, tokens_per_s=0)
        try:
            redis_url = os.environ["SWITCHYARD_REDIS_URL"]
            alone = asyncio.run(limiter_alone(redis_url, args.seconds, 16))
            print(
                f"limiter alone: {alone['decisions_per_s']} decisions/s "
                f"(p50 {alone['latency_ms']['p50']} ms)",
                flush=True,
            )
            no_overlap, no_overlap_url = start_gateway(
                Path(tmp), "gateway-no-overlap", limiter_overlap="false"
            )
            children.append(no_overlap)
            limited = create_key("--rpm", str(10**9), "--tpm", str(10**12))
            sides = {
                "unlimited": (gateway, create_key()),
                "limited": (gateway, limited),
                "limited_no_overlap": (no_overlap_url, limited),
            }
            rows = asyncio.run(through_gateway(sides, args.requests, args.rounds))
        finally:
            for c in reversed(children):
                c.stop()
    out = {
        "benchmark": "rate limiter cost",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "targets": {"decisions_per_s": 5000, "added_p50_ms": 0.3},
        "limiter_alone": alone,
        "through_gateway": rows,
        "engine": "simulator with ttft 0 and no decode delay, max_tokens 1",
        "sides": {
            "unlimited": "key without limits: the limiter makes no Redis call",
            "limited": "key with limits, default gateway (overlap on: ample headroom)",
            "limited_no_overlap": "same key, gateway with SWITCHYARD_LIMITER_OVERLAP=false",
        },
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "limits.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {RESULTS / 'limits.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
