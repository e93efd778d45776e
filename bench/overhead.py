"""Gateway overhead: the same load sent to a simulator directly and through the gateway.

One run measures both sides, interleaved round by round, so the machine's noise hits both
alike. Cases: non-streaming and streaming, concurrency 1 and 32. Writes
bench/results/overhead.json and overhead.png: added latency p50/p99, added time to first
token, and the throughput ratio (gateway / direct).

    .venv/bin/python bench/overhead.py [--rounds 3] [--requests 1500]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from app.bench.client import LoadResult, LoadSpec, run_load  # noqa: E402
from app.cli import main as cli  # noqa: E402
from app.local.procs import Child, free_port, http_ok, port_open, spawn, wait_until  # noqa: E402

RESULTS = REPO / "bench" / "results"
CASES = [(False, 1), (False, 32), (True, 1), (True, 32)]


def machine() -> dict[str, Any]:
    """Where a result was measured (results are compared within one run, never across)."""
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def create_key(*options: str) -> str:
    """A key made the way an operator would (SWITCHYARD_REDIS_URL set by start_stack)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        cli(["keys", "create", "--customer", "cus_bench", "--json", *options])
    key: str = json.loads(out.getvalue())["key"]
    return key


def start_stack(
    work: Path, ttft_ms: float = 10, tokens_per_s: float = 200
) -> tuple[list[Child], str, str, str]:
    """redis-server, one simulator, one gateway; returns (children, direct, gateway, key)."""
    children: list[Child] = []
    logs = work / "logs"
    redis_port, sim_port = free_port(), free_port()
    redis_bin = shutil.which("redis-server")
    if redis_bin is None:
        raise SystemExit("redis-server is needed (./dev test installs it)")
    redis = spawn(
        "redis", [redis_bin, "--port", str(redis_port), "--save", "", "--appendonly", "no"], logs
    )
    children.append(redis)
    wait_until(lambda: port_open("127.0.0.1", redis_port), redis)
    sim = spawn(
        "simulator",
        [
            sys.executable,
            "-m",
            "app.simulator",
            "--model",
            "chat-small",
            "--port",
            str(sim_port),
            "--ttft-ms",
            str(ttft_ms),
            "--tokens-per-s",
            str(tokens_per_s),
            "--output-tokens",
            "1000",
        ],
        logs,
    )
    children.append(sim)
    direct = f"http://127.0.0.1:{sim_port}"
    wait_until(lambda: http_ok(f"{direct}/health"), sim)
    catalog = work / "catalog.yaml"
    catalog.write_text(yaml.safe_dump({"models": [{"name": "chat-small", "endpoints": [direct]}]}))
    os.environ["SWITCHYARD_REDIS_URL"] = f"redis://127.0.0.1:{redis_port}/0"
    gw, gateway = start_gateway(work, "gateway")
    children.append(gw)
    return children, direct, gateway, create_key()


def start_gateway(work: Path, name: str, **settings: str) -> tuple[Child, str]:
    """A gateway process on the stack of ``start_stack`` (its Redis and catalogue), with
    extra SWITCHYARD_* settings; returns it and its URL."""
    port = free_port()
    env = {
        "SWITCHYARD_REDIS_URL": os.environ["SWITCHYARD_REDIS_URL"],
        "SWITCHYARD_CATALOG": str(work / "catalog.yaml"),
        "SWITCHYARD_PORT": str(port),
        "SWITCHYARD_LOG_LEVEL": "warning",
        **{f"SWITCHYARD_{k.upper()}": v for k, v in settings.items()},
    }
    workers = os.environ.get("BENCH_GATEWAY_WORKERS", "1")
    child = spawn(
        name, [sys.executable, "-m", "app.cli", "gateway", "--workers", workers], work / "logs", env
    )
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: http_ok(f"{url}/readyz"), child)
    return child, url


def merge(results: list[LoadResult]) -> dict[str, Any]:
    """Median of each statistic over rounds."""

    def med(values: list[float]) -> float:
        return round(statistics.median(values), 3)

    out: dict[str, Any] = {
        "ok": sum(r.ok for r in results),
        "errors": sum(sum(r.errors.values()) for r in results),
        "throughput_rps": med([r.throughput_rps for r in results]),
        "latency_ms": {
            k: med([r.latency_ms[k] for r in results]) for k in ("p50", "p90", "p99", "mean")
        },
    }
    if all(r.ttft_ms for r in results):
        out["ttft_ms"] = {k: med([r.ttft_ms[k] for r in results]) for k in ("p50", "p99")}
    return out


async def measure(
    direct: str, gateway: str, key: str, rounds: int, requests: int, max_tokens: int
) -> list[dict[str, Any]]:
    rows = []
    for stream, concurrency in CASES:
        n = requests if concurrency > 1 else max(100, requests // 10)
        sides: dict[str, list[LoadResult]] = {"direct": [], "gateway": []}
        for _ in range(rounds):
            for side, base in (("direct", direct), ("gateway", gateway)):
                spec = LoadSpec(
                    base_url=f"{base}/v1",
                    model="chat-small",
                    api_key=key,
                    concurrency=concurrency,
                    requests=n,
                    stream=stream,
                    max_tokens=max_tokens,
                    warmup=min(concurrency * 2, 50),
                )
                sides[side].append(await run_load(spec))
        d, g = merge(sides["direct"]), merge(sides["gateway"])
        row: dict[str, Any] = {
            "stream": stream,
            "concurrency": concurrency,
            "requests_per_round": n,
            "direct": d,
            "gateway": g,
            "added_p50_ms": round(g["latency_ms"]["p50"] - d["latency_ms"]["p50"], 3),
            "added_p99_ms": round(g["latency_ms"]["p99"] - d["latency_ms"]["p99"], 3),
            "throughput_ratio": round(g["throughput_rps"] / d["throughput_rps"], 4),
        }
        if stream:
            row["added_ttft_p50_ms"] = round(g["ttft_ms"]["p50"] - d["ttft_ms"]["p50"], 3)
            row["added_ttft_p99_ms"] = round(g["ttft_ms"]["p99"] - d["ttft_ms"]["p99"], 3)
        rows.append(row)
        print(
            f"stream={stream!s:<5} c={concurrency:<3} added p50 {row['added_p50_ms']:7.2f} ms"
            f"  p99 {row['added_p99_ms']:7.2f} ms  throughput x{row['throughput_ratio']:.3f}"
            + (f"  ttft +{row['added_ttft_p50_ms']:.2f} ms" if stream else ""),
            flush=True,
        )
    return rows


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{'stream' if r['stream'] else 'whole'}\nc={r['concurrency']}" for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    xs = range(len(rows))
    axes[0].bar([x - 0.2 for x in xs], [r["added_p50_ms"] for r in rows], 0.4, label="p50")
    axes[0].bar([x + 0.2 for x in xs], [r["added_p99_ms"] for r in rows], 0.4, label="p99")
    axes[0].axhline(2.0, color="red", linestyle="--", linewidth=1, label="2 ms target (p50)")
    axes[0].set_title("Latency added by the gateway (ms)")
    axes[0].legend()
    streams = [r for r in rows if r["stream"]]
    axes[1].bar(range(len(streams)), [r["added_ttft_p50_ms"] for r in streams], 0.5)
    axes[1].set_xticks(range(len(streams)), [f"c={r['concurrency']}" for r in streams])
    axes[1].set_title("Time to first token added, p50 (ms)")
    axes[2].bar(xs, [r["throughput_ratio"] for r in rows], 0.5)
    axes[2].axhline(1.0, color="grey", linewidth=1)
    axes[2].set_ylim(0, 1.1)
    axes[2].set_title("Throughput, gateway / direct")
    for ax in (axes[0], axes[2]):
        ax.set_xticks(list(xs), labels)
    fig.suptitle("Switchyard gateway vs direct engine (simulator), same load, one run")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--requests", type=int, default=1500, help="per round at concurrency 32")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="sy-bench-") as tmp:
        children, direct, gateway, key = start_stack(Path(tmp))
        try:
            t0 = time.time()
            rows = asyncio.run(
                measure(direct, gateway, key, args.rounds, args.requests, args.max_tokens)
            )
        finally:
            for c in reversed(children):
                c.stop()
    result = {
        "benchmark": "gateway overhead vs direct simulator",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0)),
        "machine": machine(),
        "load": {
            "rounds": args.rounds,
            "max_tokens": args.max_tokens,
            "simulator": "ttft 10 ms, 200 tokens/s per sequence",
            "client": asdict(LoadSpec(base_url="", model="chat-small"))["prompt"],
        },
        "target": "added p50 < 2 ms at concurrency 32",
        "cases": rows,
    }
    (out / "overhead.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, out / "overhead.png")
    print(f"wrote {out / 'overhead.json'} and {out / 'overhead.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
