"""Switchyard against direct access and against LiteLLM's proxy, same simulator, one run.

Targets, all on this machine and in front of the same simulator replica:
- direct: the simulator itself;
- switchyard: the gateway with everything on (key auth, request + token budgets, usage records,
  the billing worker folding them, least-outstanding routing);
- litellm: LiteLLM's proxy (``litellm[proxy]``, one worker, master key, no database), installed
  by this script into ``.bench/litellm-venv`` so it never touches the project's environment.

A sweep of request rates in an open loop (Poisson arrivals, latency from the scheduled send
time, see app/bench/load.py): at each rate the targets take turns, and a target leaves the
sweep at the first rate it cannot sustain (throughput below 95 % of the offered rate, more than
1 % errors or drops, or p99 above the latency bound). Reported, as ratios: added latency vs
direct at equal load (every rate both sustained), the maximum sustainable throughput, and that
throughput per CPU core the proxy process used. Writes bench/results/compare.json and
compare.png.

    .venv/bin/python bench/compare.py [--quick] [--no-litellm] [--step-s 8] [--rates 20,40,...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from app.bench.load import LoadPlan, RunResult, run_sync  # noqa: E402
from app.bench.workload import Dist, Key, Workload  # noqa: E402
from app.local.procs import Child, free_port, http_ok, spawn, wait_until  # noqa: E402
from bench.overhead import RESULTS, create_key, machine, start_stack  # noqa: E402

LITELLM_VENV = REPO / ".bench" / "litellm-venv"
LITELLM_EXE = LITELLM_VENV / "bin" / "litellm"
ENGINE = {"ttft_ms": 5, "tokens_per_s": 1000, "max_tokens": 16}
FULL_RATES = [20, 40, 80, 120, 160, 240, 320, 480, 640, 960, 1280, 1920, 2560]
QUICK_RATES = [20, 80, 160, 320, 640, 1280]


@dataclass(frozen=True)
class Target:
    name: str
    url: str  # base URL without /v1
    key: str
    pid: int | None  # the proxy process whose CPU is counted (None: the simulator itself)
    engine_pid: int | None = None  # the simulator behind it (its CPU too: a cost reference)
    support_pids: tuple[int, ...] = ()  # what the proxy needs besides itself (Redis, billing)


def ensure_litellm() -> Path:
    if not LITELLM_EXE.exists():
        print("installing litellm[proxy] into .bench/litellm-venv (once)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(LITELLM_VENV)], check=True)
        subprocess.run(
            [str(LITELLM_VENV / "bin" / "pip"), "install", "-q", "litellm[proxy]"], check=True
        )
    return LITELLM_EXE


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


def process_tree(pid: int) -> list[int]:
    """``pid`` and the processes it started (a gateway's ``--workers``), from /proc."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return [pid]  # it has exited: its stat read fails too, and counts nothing
    return [pid, *(p for c in children for p in process_tree(int(c)))]


def pin(pid: int, cpus: set[int]) -> None:
    """Every thread of ``pid`` and of its processes onto ``cpus``; threads and processes
    started later inherit it."""
    for p in process_tree(pid):
        try:
            tasks = list(Path(f"/proc/{p}/task").iterdir())
        except FileNotFoundError:
            continue  # it has exited
        for task in tasks:
            try:
                os.sched_setaffinity(int(task.name), cpus)
            except (ProcessLookupError, PermissionError):
                continue


@contextmanager
def targets(work: Path, litellm: Path | None, pinned: bool = False) -> Iterator[dict[str, Target]]:
    """direct, switchyard with everything on, and LiteLLM when ``litellm`` is given; all in
    front of one simulator replica, stopped on exit.

    ``pinned``: the proxies and what they use (gateway, Redis, billing worker, LiteLLM) on the
    last CPU, the load generator and the simulator on the others, for every target alike. In
    production the gateway has cores of its own and its clients and engines are elsewhere;
    sharing two cores with them here makes its latency include theirs in the scheduler's
    queue (a woken process waits while both cores run someone else)."""
    children, direct, gateway, _ = start_stack(
        work, ttft_ms=ENGINE["ttft_ms"], tokens_per_s=ENGINE["tokens_per_s"]
    )
    try:
        # Limits high enough never to refuse, but checked and reserved on every request.
        key = create_key("--rpm", str(10**8), "--tpm", str(10**11))
        env = {"SWITCHYARD_REDIS_URL": os.environ["SWITCHYARD_REDIS_URL"]}
        billing = [sys.executable, "-m", "app.cli", "billing", "run"]
        children.append(spawn("billing", billing, work / "logs", env))
        pids = {c.name: c.popen.pid for c in children}
        gw_pid, sim_pid = pids["gateway"], pids["simulator"]
        support = (pids["redis"], pids["billing"])
        out = {
            "direct": Target("direct", direct, "none", None, sim_pid),
            "switchyard": Target("switchyard", gateway, key, gw_pid, sim_pid, support),
        }
        if litellm is not None:
            child, url = start_litellm(litellm, direct, work)
            children.append(child)
            out["litellm"] = Target("litellm", url, "sk-bench-master", child.popen.pid, sim_pid)
        if pinned:
            cpus = sorted(os.sched_getaffinity(0))
            if len(cpus) < 2:
                raise SystemExit("--pin needs at least two CPUs")
            world, proxies = set(cpus[:-1]), {cpus[-1]}
            for c in children:
                pin(c.popen.pid, world if c.name == "simulator" else proxies)
            pin(os.getpid(), world)  # the load generator
        yield out
    finally:
        for c in reversed(children):
            c.stop()


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its children (workers), from /proc."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for p in process_tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except OSError:
            continue
    return total


def workload(target: Target, stream: bool) -> Workload:
    return Workload(
        "chat-small",
        keys=(Key(target.key),),
        prompt_tokens=Dist("fixed", 32),
        max_tokens=Dist("fixed", ENGINE["max_tokens"]),
        stream=stream,
    )


def measure(target: Target, plan: LoadPlan) -> tuple[RunResult, dict[str, Any]]:
    """Run ``plan`` and describe it as one row, with the proxy's CPU over the run."""
    before = cpu_seconds(target.pid) if target.pid else 0.0
    engine_before = cpu_seconds(target.engine_pid) if target.engine_pid else 0.0
    support_before = sum(cpu_seconds(pid) for pid in target.support_pids)
    client_before = time.process_time()
    result = run_sync(plan)
    client = time.process_time() - client_before
    support = sum(cpu_seconds(pid) for pid in target.support_pids) - support_before
    s = result.summary
    cpu = cpu_seconds(target.pid) - before if target.pid else None
    engine = cpu_seconds(target.engine_pid) - engine_before if target.engine_pid else None
    row: dict[str, Any] = {
        "target": target.name,
        "stream": plan.workload.stream,
        "rate": plan.rate,
        "concurrency": plan.concurrency,
        "requests": s["requests"],
        "ok": s["ok"],
        "errors": s["errors"],
        "offered_rps": s["offered_rps"],
        "throughput_rps": s["throughput_rps"],
        "latency_ms": s["latency_ms"],
        "ttft_ms": s["ttft_ms"],
        "send_lag_ms": s["send_lag_ms"],
        "proxy_cpu_s": round(cpu, 3) if cpu is not None else None,
        "engine_cpu_s": round(engine, 3) if engine is not None else None,
        "client_cpu_s": round(client, 3),  # the load generator (this process)
        "support_cpu_s": round(support, 3) if target.support_pids else None,
        # Requests per CPU-second of the proxy = the throughput one fully used core would give.
        "rps_per_core": round(s["ok"] / cpu, 1) if cpu else None,
    }
    return result, row


def sustained(row: dict[str, Any], p99_bound_ms: float) -> bool:
    """Every arrival answered (at most 1 % errors or drops), throughput keeping up with the
    arrivals actually drawn (a short Poisson step is rarely exactly the nominal rate), and p99
    within the bound: past saturation the backlog grows all step long, so one of these fails."""
    failed = sum(row["errors"].values())
    return bool(
        row["ok"]
        and failed <= 0.01 * row["requests"]
        and row["throughput_rps"] >= 0.9 * (row["offered_rps"] or row["rate"])
        and row["latency_ms"].get("p99", 1e9) <= p99_bound_ms
    )


def sweep(
    tgts: dict[str, Target], rates: list[float], step_s: float, stream: bool, p99_bound_ms: float
) -> list[dict[str, Any]]:
    """Rising rates, targets taking turns at each; a target stops at its first unsustained
    rate (one more step would only measure an overloaded queue). An unsustained step is run
    once more before it counts: on a shared machine a neighbour's burst can stall one step."""
    rows: list[dict[str, Any]] = []
    active = dict(tgts)
    for rate in rates:
        for name, target in list(active.items()):
            plan = LoadPlan(
                base_url=f"{target.url}/v1",
                workload=workload(target, stream),
                rate=rate,
                duration_s=step_s,
                # A saturated target builds a backlog: cap it so the step ends on time.
                max_in_flight=max(64, int(rate)),
                warmup=10,
                timeout_s=30,
            )
            first: dict[str, Any] | None = None
            for _ in range(2):
                _, row = measure(target, plan)
                row["sustained"] = sustained(row, p99_bound_ms)
                # The client is one Python process on the same cores: if it sent late, the
                # rate was not really offered and saturation may be the client's.
                row["client_limited"] = row["send_lag_ms"].get("p90", 0) > 5
                print(
                    f"{name:<11} stream={stream!s:<5} rate {rate:>6g}/s -> "
                    f"{row['throughput_rps']:8.1f} req/s"
                    f"  p50 {row['latency_ms'].get('p50', 0):8.2f}"
                    f"  p99 {row['latency_ms'].get('p99', 0):8.2f} ms  errors {row['errors']}"
                    f"{'' if row['sustained'] else '  SATURATED'}"
                    f"{'  (client lagging)' if row['client_limited'] else ''}"
                    f"{'  (second try)' if first else ''}",
                    flush=True,
                )
                if row["sustained"] or first is not None:
                    break
                first = row
            if first is not None:
                row["first_try"] = {k: first[k] for k in ("throughput_rps", "latency_ms", "errors")}
            rows.append(row)
            if not row["sustained"]:
                del active[name]
        if not active:
            break
    return rows


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for stream in sorted({r["stream"] for r in rows}):
        mode = "stream" if stream else "whole"
        part = [r for r in rows if r["stream"] == stream]
        names = sorted({r["target"] for r in part})
        best: dict[str, dict[str, Any]] = {}
        for name in names:
            ok = [r for r in part if r["target"] == name and r["sustained"]]
            if ok:
                top = max(ok, key=lambda r: r["rate"])
                best[name] = {
                    "max_sustainable_rate": top["rate"],
                    "throughput_rps": top["throughput_rps"],
                    "rps_per_core": top["rps_per_core"],
                    # Proxy CPU per request in units of the engine's (simulator's) CPU per
                    # request, for the same requests: the least noisy measure of its cost.
                    "cpu_over_engine": round(top["proxy_cpu_s"] / top["engine_cpu_s"], 3)
                    if top["proxy_cpu_s"] and top["engine_cpu_s"]
                    else None,
                    "client_limited": top["client_limited"]
                    or any(r["client_limited"] for r in part if r["target"] == name),
                    # False: the ladder ended first, so the maximum is a lower bound.
                    "saturated": any(not r["sustained"] for r in part if r["target"] == name),
                }
        added = []
        for r in part:
            if r["target"] == "direct" or not r["sustained"]:
                continue
            base = next(
                (
                    d
                    for d in part
                    if d["target"] == "direct" and d["rate"] == r["rate"] and d["sustained"]
                ),
                None,
            )
            if base:
                entry = {
                    "target": r["target"],
                    "rate": r["rate"],
                    "p50_ms": round(r["latency_ms"]["p50"] - base["latency_ms"]["p50"], 3),
                    "p99_ms": round(r["latency_ms"]["p99"] - base["latency_ms"]["p99"], 3),
                }
                if r["ttft_ms"] and base["ttft_ms"]:  # streams: time to first token, p50
                    ttft = r["ttft_ms"]["p50"] - base["ttft_ms"]["p50"]
                    entry["ttft_p50_ms"] = round(ttft, 3)
                added.append(entry)
        ratios: dict[str, float | None] = {}
        sy, ll = best.get("switchyard"), best.get("litellm")
        if sy and ll:
            ratios["max_throughput_switchyard_over_litellm"] = round(
                sy["throughput_rps"] / ll["throughput_rps"], 2
            )
            if sy["rps_per_core"] and ll["rps_per_core"]:
                ratios["per_core_switchyard_over_litellm"] = round(
                    sy["rps_per_core"] / ll["rps_per_core"], 2
                )
        if sy and "direct" in best:
            ratios["max_throughput_switchyard_over_direct"] = round(
                sy["throughput_rps"] / best["direct"]["throughput_rps"], 2
            )
        low = min((a["rate"] for a in added), default=None)
        at_low = {a["target"]: a for a in added if a["rate"] == low}
        if "switchyard" in at_low and "litellm" in at_low and at_low["switchyard"]["p50_ms"] > 0:
            ratios["added_p50_litellm_over_switchyard"] = round(
                at_low["litellm"]["p50_ms"] / at_low["switchyard"]["p50_ms"], 1
            )
        out[mode] = {
            "max_sustainable": best,
            "added_latency_ms": added,
            "ratios": ratios,
        }
    return out


def plot(rows: list[dict[str, Any]], summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = sorted({r["stream"] for r in rows})
    fig, axes = plt.subplots(1, len(modes) + 1, figsize=(6 * (len(modes) + 1), 4.2))
    for ax, stream in zip(axes, modes, strict=False):
        for target in sorted({r["target"] for r in rows}):
            pts = [r for r in rows if r["target"] == target and r["stream"] == stream]
            ax.plot(
                [r["rate"] for r in pts],
                [r["latency_ms"].get("p50", float("nan")) for r in pts],
                marker="o",
                label=target,
            )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("offered rate (req/s, Poisson)")
        ax.set_ylabel("p50 latency from scheduled send (ms)")
        ax.set_title(f"{'streaming' if stream else 'non-streaming'}: latency vs load")
        ax.legend()
    whole = summary.get("whole", summary.get("stream", {})).get("max_sustainable", {})
    names = list(whole)
    axes[-1].bar(names, [whole[n]["throughput_rps"] for n in names])
    axes[-1].set_title("Max sustainable throughput, non-streaming (req/s)")
    fig.suptitle("Direct vs Switchyard (auth, limits, billing, routing) vs LiteLLM, one run")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="a coarse, short sweep (~1-2 min)")
    p.add_argument("--rates", help="comma-separated req/s (default: a geometric ladder)")
    p.add_argument("--step-s", type=float, help="seconds per rate and target (default 8)")
    p.add_argument("--p99-bound-ms", type=float, default=500.0)
    p.add_argument("--no-litellm", action="store_true")
    p.add_argument("--no-stream", action="store_true", help="only the non-streaming sweep")
    p.add_argument(
        "--pin",
        action="store_true",
        help="proxies, Redis and the billing worker on the last CPU; load generator and "
        "simulator on the others (written to compare-pinned.json)",
    )
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    rates = [float(x) for x in args.rates.split(",")] if args.rates else None
    rates = rates or (QUICK_RATES if args.quick else FULL_RATES)
    step_s = args.step_s or (2.0 if args.quick else 8.0)
    streams = [False] if args.quick or args.no_stream else [False, True]
    exe = None if args.no_litellm else ensure_litellm()
    started = time.time()
    with (
        tempfile.TemporaryDirectory(prefix="sy-compare-") as tmp,
        targets(Path(tmp), exe, args.pin) as t,
    ):
        rows = [r for s in streams for r in sweep(t, rates, step_s, s, args.p99_bound_ms)]
    summary = summarize(rows)
    out = {
        "benchmark": "direct vs switchyard vs litellm, open-loop rate sweep",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "machine": machine(),
        "engine": "simulator, ttft {ttft_ms} ms, {tokens_per_s} tokens/s, {max_tokens} "
        "tokens".format(**ENGINE),
        "sweep": {
            "rates": rates,
            "step_s": step_s,
            "p99_bound_ms": args.p99_bound_ms,
            "quick": args.quick,
            "pinned": args.pin,
        },
        "summary": summary,
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    name = ("compare-quick" if args.quick else "compare") + ("-pinned" if args.pin else "")
    (args.out / f"{name}.json").write_text(json.dumps(out, indent=2) + "\n")
    plot(rows, summary, args.out / f"{name}.png")
    print(json.dumps(summary, indent=2))
    print(f"wrote {args.out / name}.json and .png, {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
