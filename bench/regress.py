"""Benchmark regression gate (``./dev bench``): a short version of compare.py whose ratios must
stay within a tolerance of the committed baseline (bench/baseline.json).

Ratios, never absolute times: this machine (2 shared cores) is noisy, and what must not
regress is the gateway's cost relative to the same engine measured in the same run. In one run
in front of one simulator replica (the engine of compare.py):

- latency: Switchyard with everything on (auth, both limits, billing worker, least-load
  routing) vs direct, p50 at a low open-loop rate (20 req/s each, no queueing), non-streaming
  and streaming; both sides are measured at the same time, in 3 rounds, median ratio;
- saturation: closed loop at concurrency 32, the targets alternating in short rounds (median
  round): throughput gateway / direct, and the gateway's CPU per request over the simulator's
  CPU for the same requests (CPU time is far less noisy than wall-clock throughput here);
- against LiteLLM's proxy, if its venv (.bench/litellm-venv, made by compare.py) exists, in
  the same rounds: highest throughput and requests per CPU-second of the proxy, Switchyard /
  LiteLLM. Without the venv these ratios are skipped, and the result says so.

Writes bench/results/regress.json; exits 1 when a ratio is worse than its baseline by more
than its tolerance, 0 otherwise.

    .venv/bin/python bench/regress.py [--no-litellm] [--update-baseline]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from app.bench.load import LoadPlan, run_together  # noqa: E402
from bench.compare import ENGINE, LITELLM_EXE, Target, measure, targets, workload  # noqa: E402
from bench.overhead import RESULTS, machine  # noqa: E402

BASELINE = REPO / "bench" / "baseline.json"
LOW_RATE = 20.0
ROUNDS = 3
ROUND_S = 4.0
SATURATION_C = 32
SATURATION_N = 600  # per round and target
LITELLM_C = 16
LITELLM_N = 120  # LiteLLM manages ~30-70 req/s here: ~3 s a round


def low_rate_pair(direct: Target, gateway: Target, stream: bool, round_no: int) -> list[float]:
    """p50 of direct and of the gateway, measured at the same time (independent Poisson
    arrivals, LOW_RATE each): both see the same machine, so their ratio is what the gateway
    adds, not what the neighbours did during one side's turn."""
    plans = [
        LoadPlan(
            base_url=f"{t.url}/v1",
            workload=replace(workload(t, stream), seed=2 * round_no + i),
            rate=LOW_RATE,
            duration_s=ROUND_S,
            warmup=5,
            timeout_s=30,
        )
        for i, t in enumerate((direct, gateway))
    ]
    p50s = []
    for target, result in zip((direct, gateway), run_together(plans), strict=True):
        s = result.summary
        if s["ok"] < s["requests"]:
            raise SystemExit(f"regress: {target.name} failed requests at {LOW_RATE}/s: {s}")
        p50s.append(float(s["latency_ms"]["p50"]))
    return p50s


def saturation(target: Target, concurrency: int, requests: int) -> dict[str, Any]:
    plan = LoadPlan(
        base_url=f"{target.url}/v1",
        workload=workload(target, False),
        concurrency=concurrency,
        requests=requests,
        warmup=concurrency,
        timeout_s=60,
    )
    _, row = measure(target, plan)
    return row


def median_ratio(rounds: list[dict[str, Any]], top: str, bottom: str, field: str) -> float:
    return statistics.median(r[top][field] / r[bottom][field] for r in rounds)


def measure_ratios(t: dict[str, Target]) -> tuple[dict[str, float], dict[str, Any], list[str]]:
    ratios: dict[str, float] = {}
    raw: dict[str, Any] = {}
    notes: list[str] = []
    direct, gateway = t["direct"], t["switchyard"]
    for stream in (False, True):
        per_round = []
        for n in range(ROUNDS):
            d, g = low_rate_pair(direct, gateway, stream, n)
            per_round.append({"direct_p50_ms": d, "switchyard_p50_ms": g, "ratio": g / d})
        name = f"latency_p50_{'stream' if stream else 'whole'}_switchyard_over_direct"
        ratios[name] = round(statistics.median(r["ratio"] for r in per_round), 3)
        raw[name] = per_round
        print(f"{name}: {ratios[name]}", flush=True)
    # Saturation: the targets alternate in short rounds so that a burst of someone else's
    # load hits one round of each rather than all of one side; the median round counts.
    rounds: list[dict[str, Any]] = []
    for _ in range(ROUNDS):
        row = {
            "direct": saturation(direct, SATURATION_C, SATURATION_N),
            "switchyard": saturation(gateway, SATURATION_C, SATURATION_N),
        }
        if "litellm" in t:
            row["litellm"] = saturation(t["litellm"], LITELLM_C, LITELLM_N)
        rounds.append(row)
    raw["saturation_rounds"] = rounds
    ratios["throughput_saturated_switchyard_over_direct"] = round(
        median_ratio(rounds, "switchyard", "direct", "throughput_rps"), 3
    )
    # The gateway's CPU per request in units of the simulator's CPU for the same requests
    # (both processes handle exactly those requests): CPU time, unlike wall-clock throughput,
    # hardly depends on what else runs on the machine.
    gw_cpu = sum(r["switchyard"]["proxy_cpu_s"] for r in rounds)
    sim_cpu = sum(r["switchyard"]["engine_cpu_s"] for r in rounds)
    ratios["cpu_per_request_switchyard_over_engine"] = round(gw_cpu / sim_cpu, 3)
    if "litellm" in t:
        ratios["throughput_saturated_switchyard_over_litellm"] = round(
            median_ratio(rounds, "switchyard", "litellm", "throughput_rps"), 2
        )
        ratios["per_core_switchyard_over_litellm"] = round(
            median_ratio(rounds, "switchyard", "litellm", "rps_per_core"), 2
        )
    else:
        notes.append(
            f"LiteLLM ratios skipped: {LITELLM_EXE} does not exist "
            "(bench/compare.py installs it once)"
        )
    for name in ratios:
        if "latency" not in name:
            print(f"{name}: {ratios[name]}", flush=True)
    return ratios, raw, notes


def revision() -> dict[str, Any]:
    """The commit measured, and whether the working tree differed from it (shared tree)."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
        return done.stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}


def judge(ratios: dict[str, float], baseline: dict[str, Any]) -> list[dict[str, Any]]:
    """One verdict per baseline ratio: ok, regressed, or skipped (not measured this run)."""
    verdicts = []
    for name, spec in baseline["ratios"].items():
        base, tol, better = spec["value"], spec["tolerance"], spec["better"]
        value = ratios.get(name)
        if value is None:
            verdicts.append({"ratio": name, "status": "skipped", "baseline": base})
            continue
        # Tolerance is relative to the baseline value, in the direction that is worse.
        limit = base * (1 + tol) if better == "lower" else base * (1 - tol)
        worse = value > limit if better == "lower" else value < limit
        verdicts.append(
            {
                "ratio": name,
                "status": "regressed" if worse else "ok",
                "value": value,
                "baseline": base,
                "limit": round(limit, 3),
                "better": better,
            }
        )
    return verdicts


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--no-litellm", action="store_true", help="skip the LiteLLM ratios")
    p.add_argument("--baseline", type=Path, default=BASELINE)
    p.add_argument(
        "--update-baseline",
        action="store_true",
        help="write the measured values into the baseline (tolerances and reasons are kept)",
    )
    p.add_argument("--out", type=Path, default=RESULTS / "regress.json")
    args = p.parse_args()
    baseline = json.loads(args.baseline.read_text())
    litellm = None if args.no_litellm or not LITELLM_EXE.exists() else LITELLM_EXE
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="sy-regress-") as tmp, targets(Path(tmp), litellm) as t:
        ratios, raw, notes = measure_ratios(t)
    if args.no_litellm:
        notes = ["LiteLLM ratios skipped: --no-litellm"]
    verdicts = judge(ratios, baseline)
    regressed = [v for v in verdicts if v["status"] == "regressed"]
    result = {
        "benchmark": "regression gate: short comparison, ratios vs bench/baseline.json",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "seconds": round(time.time() - started, 1),
        "machine": machine(),
        "revision": revision(),
        "engine": ENGINE,
        "ratios": ratios,
        "verdicts": verdicts,
        "notes": notes,
        "passed": not regressed,
        "measurements": raw,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    if args.update_baseline:
        for name, value in ratios.items():
            if name in baseline["ratios"]:
                baseline["ratios"][name]["value"] = value
        args.baseline.write_text(json.dumps(baseline, indent=2, ensure_ascii=False) + "\n")
    for v in verdicts:
        shown = v.get("value", "—")
        print(f"{v['status']:>9}  {v['ratio']:<48} {shown!s:>7}  (baseline {v['baseline']})")
    for note in notes:
        print(note)
    print(f"wrote {args.out} in {result['seconds']} s")
    if regressed:
        print(f"regress: {len(regressed)} ratio(s) regressed beyond tolerance", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
