"""Switchyard against direct access and against LiteLLM's proxy, same simulator, one run.

Targets, all on this machine and in front of the same simulator replica:
- direct: the simulator itself;
- switchyard: the gateway with everything on (key auth, request + token budgets, usage records,
  the billing worker folding them, least-outstanding routing);
- litellm: LiteLLM's proxy (``litellm[proxy]``, one worker, master key, no database), installed
  by this script into ``.bench/litellm-venv`` so it never touches the project's environment.

For each concurrency level the three targets take turns (closed loop, non-streaming and
streaming). Reported: added p50/p99 latency vs direct at equal concurrency, the highest
throughput each reached, and throughput per CPU second of the proxy process, as ratios.
Writes bench/results/compare.json and compare.png.

    .venv/bin/python bench/compare.py [--concurrency 1,8,32,64] [--requests 600] [--no-litellm]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from app.bench.client import LoadSpec, run_load  # noqa: E402
from app.local.procs import Child, free_port, http_ok, spawn, wait_until  # noqa: E402
from bench.overhead import RESULTS, create_key, machine, start_stack  # noqa: E402

LITELLM_VENV = REPO / ".bench" / "litellm-venv"


def ensure_litellm() -> Path:
    exe = LITELLM_VENV / "bin" / "litellm"
    if not exe.exists():
        print("installing litellm[proxy] into .bench/litellm-venv (once)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(LITELLM_VENV)], check=True)
        subprocess.run(
            [str(LITELLM_VENV / "bin" / "pip"), "install", "-q", "litellm[proxy]"], check=True
        )
    return exe


def start_litellm(exe: Path, upstream: str, work: Path) -> tuple[Child, str]:
    port = free_port()
    config = work / "litellm.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model_list": [
                    {
                        "model_name": "chat-small",
                        "litellm_params": {
                            "model": "openai/chat-small",
                            "api_base": f"{upstream}/v1",
                            "api_key": "none",
                        },
                    }
                ],
                "general_settings": {"master_key": "sk-bench-master"},
                "litellm_settings": {"drop_params": True, "set_verbose": False},
            }
        )
    )
    env = {"LITELLM_LOG": "ERROR", "LITELLM_TELEMETRY": "False", "NO_DOCS": "True"}
    child = spawn(
        "litellm",
        [str(exe), "--config", str(config), "--port", str(port), "--num_workers", "1"],
        work / "logs",
        env,
    )
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: http_ok(f"{url}/health/liveliness"), child, timeout=180)
    return child, url


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its children (workers), from /proc."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    pids = [pid]
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        pids += [int(c) for c in children]
    except OSError:
        pass
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except OSError:
            continue
    return total


async def sweep(
    targets: dict[str, tuple[str, str, int | None]], levels: list[int], requests: int
) -> list[dict[str, Any]]:
    rows = []
    for stream in (False, True):
        for c in levels:
            n = max(100, requests if c > 1 else requests // 4)
            for name, (url, key, pid) in targets.items():
                before = cpu_seconds(pid) if pid else 0.0
                spec = LoadSpec(
                    base_url=f"{url}/v1",
                    model="chat-small",
                    api_key=key,
                    concurrency=c,
                    requests=n,
                    stream=stream,
                    max_tokens=16,
                    warmup=min(2 * c, 40),
                )
                result = await run_load(spec)
                cpu = cpu_seconds(pid) - before if pid else None
                row = {
                    "target": name,
                    "stream": stream,
                    "concurrency": c,
                    "ok": result.ok,
                    "errors": result.errors,
                    "throughput_rps": result.throughput_rps,
                    "latency_ms": result.latency_ms,
                    "ttft_ms": result.ttft_ms,
                    "proxy_cpu_s": round(cpu, 3) if cpu is not None else None,
                    "rps_per_cpu_s": round(result.ok / cpu, 1) if cpu else None,
                }
                rows.append(row)
                print(
                    f"{name:<11} stream={stream!s:<5} c={c:<3} {result.throughput_rps:8.1f} "
                    f"req/s  p50 {result.latency_ms.get('p50', 0):8.2f} ms  "
                    f"p99 {result.latency_ms.get('p99', 0):8.2f} ms  errors {result.errors}",
                    flush=True,
                )
    return rows


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    def pick(target: str, stream: bool, c: int) -> dict[str, Any] | None:
        return next(
            (
                r
                for r in rows
                if r["target"] == target and r["stream"] == stream and r["concurrency"] == c
            ),
            None,
        )

    out: dict[str, Any] = {"added_latency_ms": [], "max_throughput_rps": {}, "per_cpu": {}}
    targets = sorted({r["target"] for r in rows})
    for r in rows:
        if r["target"] == "direct":
            continue
        base = pick("direct", r["stream"], r["concurrency"])
        if base and r["latency_ms"] and base["latency_ms"]:
            out["added_latency_ms"].append(
                {
                    "target": r["target"],
                    "stream": r["stream"],
                    "concurrency": r["concurrency"],
                    "p50": round(r["latency_ms"]["p50"] - base["latency_ms"]["p50"], 3),
                    "p99": round(r["latency_ms"]["p99"] - base["latency_ms"]["p99"], 3),
                }
            )
    for t in targets:
        out["max_throughput_rps"][t] = max(r["throughput_rps"] for r in rows if r["target"] == t)
        per = [r["rps_per_cpu_s"] for r in rows if r["target"] == t and r["rps_per_cpu_s"]]
        if per:
            out["per_cpu"][t] = max(per)
    if "litellm" in out["max_throughput_rps"]:
        sy, ll = out["max_throughput_rps"]["switchyard"], out["max_throughput_rps"]["litellm"]
        out["throughput_ratio_switchyard_over_litellm"] = round(sy / ll, 2) if ll else None
        if "litellm" in out["per_cpu"] and "switchyard" in out["per_cpu"]:
            out["per_cpu_ratio_switchyard_over_litellm"] = round(
                out["per_cpu"]["switchyard"] / out["per_cpu"]["litellm"], 2
            )
    return out


def plot(rows: list[dict[str, Any]], summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for target in sorted({r["target"] for r in rows}):
        pts = [r for r in rows if r["target"] == target and not r["stream"]]
        axes[0].plot(
            [r["throughput_rps"] for r in pts],
            [r["latency_ms"]["p50"] for r in pts],
            marker="o",
            label=target,
        )
    axes[0].set_xlabel("throughput (req/s), non-streaming")
    axes[0].set_ylabel("p50 latency (ms)")
    axes[0].set_title("Latency vs throughput (closed loop, rising concurrency)")
    axes[0].legend()
    names = list(summary["max_throughput_rps"])
    axes[1].bar(names, [summary["max_throughput_rps"][n] for n in names])
    axes[1].set_title("Highest throughput reached (req/s)")
    fig.suptitle("Direct vs Switchyard (auth, limits, billing, routing) vs LiteLLM, one run")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--concurrency", default="1,8,32,64")
    p.add_argument("--requests", type=int, default=600)
    p.add_argument("--no-litellm", action="store_true")
    args = p.parse_args()
    levels = [int(x) for x in args.concurrency.split(",")]
    exe = None if args.no_litellm else ensure_litellm()
    with tempfile.TemporaryDirectory(prefix="sy-compare-") as tmp:
        work = Path(tmp)
        children, direct, gateway, _ = start_stack(work, ttft_ms=5, tokens_per_s=1000)
        try:
            key = create_key("--rpm", str(10**8), "--tpm", str(10**11))
            env = {"SWITCHYARD_REDIS_URL": os.environ["SWITCHYARD_REDIS_URL"]}
            children.append(
                spawn(
                    "billing",
                    [sys.executable, "-m", "app.cli", "billing", "run"],
                    work / "logs",
                    env,
                )
            )
            gw_pid = next(c.popen.pid for c in children if c.name == "gateway")
            targets: dict[str, tuple[str, str, int | None]] = {
                "direct": (direct, "none", None),
                "switchyard": (gateway, key, gw_pid),
            }
            if exe is not None:
                child, url = start_litellm(exe, direct, work)
                children.append(child)
                targets["litellm"] = (url, "sk-bench-master", child.popen.pid)
            rows = asyncio.run(sweep(targets, levels, args.requests))
        finally:
            for c in reversed(children):
                c.stop()
    summary = summarize(rows)
    out = {
        "benchmark": "direct vs switchyard vs litellm",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "engine": "simulator, ttft 5 ms, 1000 tokens/s, 16 tokens",
        "summary": summary,
        "rows": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "compare.json").write_text(json.dumps(out, indent=2) + "\n")
    plot(rows, summary, RESULTS / "compare.png")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
