"""Routing strategies under uneven load: the same workload through each strategy, one run.

One gateway, one catalogue: every scenario lists the same replicas four times, once per
strategy (round_robin, least_outstanding, queue_aware, prefix_aware; same engine behind each via
``served_name``), and the strategies are measured one after the other on identical load.

Scenarios (simulator replicas, streamed requests, closed loop, max_tokens 24):
  slow_fast       two replicas, one fast (ttft 10 ms, 400 tok/s) and one slow (ttft 60 ms,
                  60 tok/s). Shows what round-robin costs when replicas differ.
  external_queue  two identical replicas (8 slots each); other clients (another gateway) keep
                  ~12 requests queued on the second one, behind this gateway's back. Only the
                  engine's own vllm:num_requests_waiting reveals it. 6 clients through the
                  gateway: one replica could serve them all without a queue.
  shared_prefix   three replicas; 16 long system prompts shared by the requests (a RAG/agent
                  workload). The simulator has no prefix cache, so prefix-aware routing cannot
                  win on TTFT here; what it buys on vLLM is locality, measured by probes: the
                  share of a prefix's requests that land on that prefix's most used replica.

Writes bench/results/routing.json and routing.png.

    .venv/bin/python bench/routing.py [--requests 400]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import orjson
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from app.bench.client import LoadSpec, _one, percentiles, poster_for  # noqa: E402
from app.bench.http import auth_head  # noqa: E402
from app.local.procs import Child, free_port, http_ok, port_open, spawn, wait_until  # noqa: E402
from bench.overhead import create_key, machine  # noqa: E402

RESULTS = REPO / "bench" / "results"
STRATEGIES = ("round_robin", "least_outstanding", "queue_aware", "prefix_aware")
SHORT = {
    "round_robin": "rr",
    "least_outstanding": "least",
    "queue_aware": "queue",
    "prefix_aware": "prefix",
}
SCENARIOS: dict[str, list[list[str]]] = {
    # simulator flags per replica
    "slow_fast": [
        ["--ttft-ms", "10", "--tokens-per-s", "400", "--max-num-seqs", "8"],
        ["--ttft-ms", "60", "--tokens-per-s", "60", "--max-num-seqs", "8"],
    ],
    "external_queue": [
        ["--ttft-ms", "10", "--tokens-per-s", "200", "--max-num-seqs", "8"],
        ["--ttft-ms", "10", "--tokens-per-s", "200", "--max-num-seqs", "8"],
    ],
    "shared_prefix": [
        ["--ttft-ms", "10", "--tokens-per-s", "200", "--max-num-seqs", "8"],
        ["--ttft-ms", "10", "--tokens-per-s", "200", "--max-num-seqs", "8"],
        ["--ttft-ms", "10", "--tokens-per-s", "200", "--max-num-seqs", "8"],
    ],
}
SIMULATOR = [sys.executable, "-m", "app.simulator", "--model", "chat"]
# Closed-loop clients through the gateway. external_queue stays below what one replica can
# serve alone: the question there is whether the gateway notices the other replica's queue.
CONCURRENCY = {"slow_fast": 16, "external_queue": 6, "shared_prefix": 16}
EXTERNAL_CLIENTS = 20
PREFIXES = [
    f"You are agent {i} of the Switchyard rail company. Policy manual section {i}: " * 25
    for i in range(16)
]


def start(work: Path) -> tuple[list[Child], dict[str, list[str]], str, str]:
    """redis, the simulators of every scenario, one gateway. Returns (children, replicas per
    scenario, gateway URL, API key)."""
    children: list[Child] = []
    logs = work / "logs"
    redis_bin = shutil.which("redis-server")
    if redis_bin is None:
        raise SystemExit("redis-server is needed (./dev test installs it)")
    redis_port = free_port()
    redis = spawn(
        "redis", [redis_bin, "--port", str(redis_port), "--save", "", "--appendonly", "no"], logs
    )
    children.append(redis)
    wait_until(lambda: port_open("127.0.0.1", redis_port), redis)
    replicas: dict[str, list[str]] = {}
    for scenario, flags in SCENARIOS.items():
        for i, f in enumerate(flags):
            port = free_port()
            sim = spawn(
                f"sim-{scenario}-{i}",
                [*SIMULATOR, "--port", str(port), "--output-tokens", "1000", *f],
                logs,
            )
            children.append(sim)
            url = f"http://127.0.0.1:{port}"
            wait_until(lambda u=url: http_ok(f"{u}/health"), sim)  # type: ignore[misc]
            replicas.setdefault(scenario, []).append(url)
    models = [
        {
            "name": f"{scenario}-{SHORT[strategy]}".replace("_", "-"),
            "served_name": "chat",
            "endpoints": urls,
            "routing": strategy,
        }
        for scenario, urls in replicas.items()
        for strategy in STRATEGIES
    ]
    catalog = work / "catalog.yaml"
    catalog.write_text(yaml.safe_dump({"models": models}))
    gw_port = free_port()
    env = {
        "SWITCHYARD_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        "SWITCHYARD_CATALOG": str(catalog),
        "SWITCHYARD_PORT": str(gw_port),
        "SWITCHYARD_LOG_LEVEL": "warning",
        "SWITCHYARD_LOAD_SCRAPE_INTERVAL_S": "0.25",
    }
    gw = spawn("gateway", [sys.executable, "-m", "app.cli", "gateway"], logs, env)
    children.append(gw)
    gateway = f"http://127.0.0.1:{gw_port}"
    wait_until(lambda: http_ok(f"{gateway}/readyz"), gw)
    os.environ["SWITCHYARD_REDIS_URL"] = env["SWITCHYARD_REDIS_URL"]
    return children, replicas, gateway, create_key()


def model_name(scenario: str, strategy: str) -> str:
    return f"{scenario}-{SHORT[strategy]}".replace("_", "-")


def body(model: str, prompt: list[dict[str, str]], max_tokens: int) -> bytes:
    return orjson.dumps(
        {
            "model": model,
            "messages": prompt,
            "max_tokens": max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    )


def prompt_for(scenario: str, rng: random.Random) -> list[dict[str, str]]:
    question = {"role": "user", "content": f"Question {rng.randrange(10_000)}?"}
    if scenario != "shared_prefix":
        return [question]
    return [{"role": "system", "content": rng.choice(PREFIXES)}, question]


async def closed_loop(
    base: str,
    key: str,
    model: str,
    make_prompt: Callable[[], list[dict[str, str]]],
    concurrency: int,
    requests: int,
    max_tokens: int,
) -> dict[str, Any]:
    spec = LoadSpec(base_url=f"{base}/v1", model=model, api_key=key, stream=True)
    head = auth_head(key)
    ttfts: list[float] = []
    latencies: list[float] = []
    errors: dict[str, int] = {}
    remaining = requests
    poster = poster_for(spec)
    try:
        for _ in range(concurrency):  # warm-up: connections and the gateway's key cache
            await _one(poster, spec, body(model, make_prompt(), 2), head)

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                lat, ttft, _, err = await _one(
                    poster, spec, body(model, make_prompt(), max_tokens), head
                )
                if err is not None:
                    errors[err] = errors.get(err, 0) + 1
                    continue
                latencies.append(lat)
                if ttft is not None:
                    ttfts.append(ttft)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    finally:
        poster.close()
    return {
        "ok": len(latencies),
        "errors": errors,
        "throughput_rps": round(len(latencies) / wall, 2),
        "ttft_ms": {k: v for k, v in percentiles(ttfts).items() if k in ("p50", "p90", "p99")},
        "latency_ms": {k: v for k, v in percentiles(latencies).items() if k in ("p50", "p99")},
    }


async def background_queue(url: str, concurrency: int, stop: asyncio.Event) -> None:
    """Other clients' requests sent straight to one replica: a queue the gateway cannot see."""
    payload = orjson.dumps(
        {"model": "chat", "messages": [{"role": "user", "content": "x"}], "max_tokens": 24}
    )
    headers = {"content-type": "application/json"}
    async with aiohttp.ClientSession() as session:

        async def loop() -> None:
            while not stop.is_set():
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.post(
                        f"{url}/v1/chat/completions", data=payload, headers=headers
                    ) as resp:
                        await resp.read()

        await asyncio.gather(*(loop() for _ in range(concurrency)))


def received(url: str) -> int:
    value: int = httpx.get(f"{url}/sim/stats", timeout=5).json()["received"]
    return value


def locality(base: str, key: str, model: str, urls: list[str], per_prefix: int = 6) -> float:
    """Share of each prefix's requests that land on its most used replica (idle probes)."""
    hits = 0
    with httpx.Client(timeout=20) as c:
        for prefix in PREFIXES:
            before = [received(u) for u in urls]
            for q in range(per_prefix):
                r = c.post(
                    f"{base}/v1/chat/completions",
                    json={
                        "model": model,
                        "messages": [
                            {"role": "system", "content": prefix},
                            {"role": "user", "content": f"probe {q}"},
                        ],
                        "max_tokens": 1,
                    },
                    headers={"authorization": f"Bearer {key}"},
                )
                r.raise_for_status()
            hits += max(received(u) - b for u, b in zip(urls, before, strict=True))
    return round(hits / (per_prefix * len(PREFIXES)), 3)


async def measure(
    gateway: str, key: str, replicas: dict[str, list[str]], args: argparse.Namespace
) -> list[dict[str, Any]]:
    rows = []
    for scenario, urls in replicas.items():
        for strategy in STRATEGIES:
            model = model_name(scenario, strategy)
            rng = random.Random(1)
            stop = asyncio.Event()
            background: asyncio.Task[None] | None = None
            if scenario == "external_queue":
                background = asyncio.create_task(background_queue(urls[1], EXTERNAL_CLIENTS, stop))
                await asyncio.sleep(1.0)  # the queue builds up and is scraped
            result = await closed_loop(
                gateway,
                key,
                model,
                lambda rng=rng, s=scenario: prompt_for(s, rng),  # type: ignore[misc]
                CONCURRENCY[scenario],
                args.requests,
                args.max_tokens,
            )
            if background is not None:
                stop.set()
                await background
            row: dict[str, Any] = {"scenario": scenario, "strategy": strategy, **result}
            if scenario == "shared_prefix":
                row["prefix_locality"] = await asyncio.to_thread(
                    locality, gateway, key, model, urls
                )
            rows.append(row)
            print(
                f"{scenario:<15} {strategy:<18} ttft p50 {result['ttft_ms'].get('p50', 0):8.1f} ms"
                f"  p99 {result['ttft_ms'].get('p99', 0):8.1f} ms"
                f"  {result['throughput_rps']:7.1f} req/s  errors {sum(result['errors'].values())}"
                + (f"  locality {row['prefix_locality']:.2f}" if "prefix_locality" in row else ""),
                flush=True,
            )
            await asyncio.sleep(0.5)  # let the replicas drain between runs
    return rows


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = list(dict.fromkeys(r["scenario"] for r in rows))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    width = 0.2
    for i, strategy in enumerate(STRATEGIES):
        mine = [next(r for r in rows if r["scenario"] == s and r["strategy"] == strategy)
                for s in scenarios]  # fmt: skip
        xs = [x + (i - 1.5) * width for x in range(len(scenarios))]
        axes[0].bar(xs, [r["ttft_ms"]["p50"] for r in mine], width, label=strategy)
        axes[1].bar(xs, [r["ttft_ms"]["p99"] for r in mine], width, label=strategy)
        axes[2].bar(xs, [r["throughput_rps"] for r in mine], width, label=strategy)
    titles = ("TTFT p50 (ms)", "TTFT p99 (ms)", "Throughput (req/s)")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_xticks(range(len(scenarios)), [s.replace("_", " ") for s in scenarios])
        ax.set_title(title)
    axes[0].set_yscale("log")
    axes[1].set_yscale("log")
    axes[2].legend(fontsize=8)
    loc = {
        r["strategy"]: r.get("prefix_locality") for r in rows if r["scenario"] == "shared_prefix"
    }
    fig.suptitle(
        "Switchyard routing strategies, streamed requests, closed loop; prefix locality: "
        + ", ".join(f"{SHORT[k]} {v:.2f}" for k, v in loc.items() if v is not None)
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--requests", type=int, default=400, help="per strategy and scenario")
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="sy-bench-routing-") as tmp:
        children, replicas, gateway, key = start(Path(tmp))
        try:
            t0 = time.time()
            rows = asyncio.run(measure(gateway, key, replicas, args))
        finally:
            for c in reversed(children):
                c.stop()
    result = {
        "benchmark": "routing strategies on heterogeneous replicas",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0)),
        "machine": machine(),
        "load": {
            "requests_per_run": args.requests,
            "concurrency": CONCURRENCY,
            "max_tokens": args.max_tokens,
            "stream": True,
            "scenarios": {k: [" ".join(f) for f in v] for k, v in SCENARIOS.items()},
            "external_queue": f"{EXTERNAL_CLIENTS} concurrent clients straight to replica 2 "
            "during each run",
            "gateway": "SWITCHYARD_LOAD_SCRAPE_INTERVAL_S=0.25",
        },
        "notes": "The simulator models no prefix cache: prefix-aware routing's TTFT gain on "
        "vLLM (skipped prefill on a cache hit) is not in these numbers; prefix_locality is "
        "the share of a prefix's probe requests served by that prefix's most used replica "
        "(1.0 = every repeat can hit the cache; 1/3 = spread evenly over 3 replicas).",
        "runs": rows,
    }
    (out / "routing.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, out / "routing.png")
    print(f"wrote {out / 'routing.json'} and {out / 'routing.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
