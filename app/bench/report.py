"""A run's results as files: result.json (plan, summary, a per-second timeline), result.md (the
tables a person reads) and PNG plots. Plots need matplotlib (``pip install
'switchyard[bench]'``); without it they are skipped with a note, the rest is written."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from app.bench.load import RunResult
from app.bench.stats import RATE_LIMITED


def timeline(result: RunResult) -> list[dict[str, Any]]:
    """Per second of the run (by completion time): successes, 429s, other errors, tokens."""
    rows: dict[int, Counter[str]] = {}
    for r in result.records:
        second = max(0, int(r.end - result.started))
        row = rows.setdefault(second, Counter())
        if r.ok:
            row["ok"] += 1
            row["tokens"] += r.completion_tokens
        elif r.error == RATE_LIMITED:
            row["rate_limited"] += 1
        else:
            row["errors"] += 1
    return [
        {"second": s, **{k: rows[s][k] for k in ("ok", "rate_limited", "errors", "tokens")}}
        for s in sorted(rows)
    ]


def to_json(result: RunResult) -> dict[str, Any]:
    return {
        "plan": result.plan.describe(),
        "summary": result.summary,
        "timeline": timeline(result),
    }


def _num(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.1f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def markdown(result: RunResult) -> str:
    """Two tables: the counts and rates, then the latency percentiles."""
    s = result.summary
    plan = result.plan
    how = (
        f"open loop, {plan.rate:g} req/s Poisson"
        if plan.rate
        else f"closed loop, c={plan.concurrency}"
    )
    wl = plan.workload
    lines = [
        f"# switchyard bench: {plan.base_url} ({wl.model})",
        "",
        f"{how}; {'streaming' if wl.stream else 'non-streaming'}; prompt {wl.prompt_tokens} "
        f"tokens, max_tokens {wl.max_tokens}; {len(wl.keys)} key(s)",
        "",
        "| | value |",
        "|---|---|",
    ]
    rows = [
        ("requests", s.get("requests")),
        ("succeeded", s.get("ok")),
        ("rate limited (429)", s.get("rate_limited")),
        ("other errors", s.get("error_count")),
        *((f"error: {k}", v) for k, v in s.get("errors", {}).items()),
        ("offered (req/s)", s.get("offered_rps")),
        ("throughput (req/s)", s.get("throughput_rps")),
        ("output tokens/s", s.get("output_tokens_per_s")),
        (
            "in flight, mean / max",
            f"{_num(s.get('in_flight', {}).get('mean'))} / "
            f"{_num(s.get('in_flight', {}).get('max'))}",
        ),
        ("wall time (s)", s.get("wall_s")),
    ]
    lines += [f"| {name} | {_num(value)} |" for name, value in rows]
    lines += ["", "| ms | p50 | p90 | p99 | mean | max |", "|---|---|---|---|---|---|"]
    for name, key in (
        ("end-to-end latency", "latency_ms"),
        ("time to first token", "ttft_ms"),
        ("inter-token latency", "itl_ms"),
        ("time per output token", "tpot_ms"),
        ("client send lag", "send_lag_ms"),
    ):
        p = s.get(key) or {}
        if p:
            cells = " | ".join(_num(p.get(q)) for q in ("p50", "p90", "p99", "mean", "max"))
            lines.append(f"| {name} | {cells} |")
    if len(s.get("per_key", {})) > 1:
        lines += ["", "| key | requests | ok | 429 |", "|---|---|---|---|"]
        for label, c in s["per_key"].items():
            lines.append(f"| {label} | {c['requests']} | {c['ok']} | {c['rate_limited']} |")
    return "\n".join(lines) + "\n"


def plots(result: RunResult, out_dir: Path) -> list[Path]:
    """latency.png (distributions) and timeline.png (per second). Empty without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in result.records if r.ok]
    written: list[Path] = []

    fig, ax = plt.subplots(figsize=(7, 4.2))
    series = {
        "end-to-end": [r.latency * 1000 for r in ok],
        "time to first token": [t * 1000 for r in ok if (t := r.ttft) is not None],
        "inter-token": [
            (r.chunk_times[i] - r.chunk_times[i - 1]) * 1000
            for r in ok
            for i in range(1, len(r.chunk_times))
        ],
    }
    for label, values in series.items():
        if values:
            values.sort()
            ax.plot(values, [(i + 1) / len(values) for i in range(len(values))], label=label)
    ax.set_xscale("log")
    ax.set_xlabel("ms (log)")
    ax.set_ylabel("fraction of requests ≤ x")
    ax.set_title("Latency distributions (from the scheduled send time)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    written.append(out_dir / "latency.png")
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)

    rows = timeline(result)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 5.5), sharex=True)
    seconds = [r["second"] for r in rows]
    top.bar(seconds, [r["ok"] for r in rows], label="ok", color="tab:green")
    base = [r["ok"] for r in rows]
    top.bar(
        seconds, [r["rate_limited"] for r in rows], bottom=base, label="429", color="tab:orange"
    )
    base = [b + r["rate_limited"] for b, r in zip(base, rows, strict=True)]
    top.bar(seconds, [r["errors"] for r in rows], bottom=base, label="errors", color="tab:red")
    top.set_ylabel("completions / s")
    top.legend(loc="upper right")
    top.set_title("Per second of the run")
    bottom.scatter(
        [r.end - result.started for r in ok], [r.latency * 1000 for r in ok], s=3, alpha=0.4
    )
    bottom.set_ylabel("latency (ms)")
    bottom.set_xlabel("seconds since start")
    if ok and max(r.latency for r in ok) > 20 * min(r.latency for r in ok):
        bottom.set_yscale("log")
    fig.tight_layout()
    written.append(out_dir / "timeline.png")
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)
    return written


def write(result: RunResult, out_dir: Path, with_plots: bool = True) -> list[Path]:
    """result.json, result.md and the plots into ``out_dir`` (created); the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "result.json", out_dir / "result.md"]
    paths[0].write_text(json.dumps(to_json(result), indent=2) + "\n")
    paths[1].write_text(markdown(result))
    if with_plots:
        paths += plots(result, out_dir)
    return paths
