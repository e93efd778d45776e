"""``switchyard bench``: options -> a LoadPlan, run it with a progress display, write and print
the results. Exit status 1 when not a single request succeeded (a script notices a dead URL)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from app.argtypes import positive_float, positive_int
from app.bench import report
from app.bench.load import Live, LoadPlan, run_sync
from app.bench.progress import MODES, display
from app.bench.workload import Dist, Key, Workload, parse_dist, parse_key


def _dist(text: str) -> Dist:
    try:
        return parse_dist(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _key(text: str) -> Key:
    try:
        return parse_key(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default="http://127.0.0.1:8000/v1", help="OpenAI base URL")
    p.add_argument(
        "--key",
        action="append",
        type=_key,
        default=None,
        metavar="KEY[:WEIGHT]",
        help="API key; repeat for several (round-robin, or weighted when weights differ)",
    )
    p.add_argument("--model", default="chat-small")
    how = p.add_mutually_exclusive_group()
    how.add_argument(
        "--rate", type=positive_float, help="open loop: Poisson arrivals at this many req/s"
    )
    how.add_argument(
        "--concurrency", type=positive_int, help="closed loop: this many requests at a time (8)"
    )
    much = p.add_mutually_exclusive_group()
    much.add_argument("--requests", type=positive_int, help="send this many requests (500)")
    much.add_argument("--duration", type=positive_float, help="or send for this many seconds")
    p.add_argument("--stream", action="store_true", help="stream (TTFT and inter-token latency)")
    p.add_argument(
        "--prompt-tokens",
        type=_dist,
        default=Dist("fixed", 32),
        metavar="DIST",
        help="prompt length: N, uniform:LO:HI, normal:MEAN:STD, lognormal:MEAN:STD (32)",
    )
    p.add_argument(
        "--max-tokens",
        type=_dist,
        default=Dist("fixed", 16),
        metavar="DIST",
        help="same forms (16)",
    )
    p.add_argument(
        "--ignore-eos",
        action="store_true",
        help="ask vLLM to generate exactly max_tokens (so the decode work follows --max-tokens)",
    )
    p.add_argument("--seed", type=int, default=0, help="seeds lengths, texts, keys and arrivals")
    p.add_argument("--warmup", type=int, default=10, help="unrecorded requests first (10)")
    p.add_argument(
        "--max-in-flight",
        type=positive_int,
        default=1000,
        help="open loop: arrivals beyond this many in flight are dropped and counted (1000)",
    )
    p.add_argument("--timeout", type=positive_float, default=60.0, help="per request (60 s)")
    p.add_argument(
        "--output-dir", type=Path, help="write result.json, result.md and PNG plots here"
    )
    p.add_argument("--output", type=Path, help="also write result.json to this file")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--json", action="store_true", help="print JSON instead of the tables")
    p.add_argument("--progress", choices=MODES, default="auto", help="live display on stderr")


def plan_from(args: argparse.Namespace) -> LoadPlan:
    keys = tuple(args.key or [Key("none")])
    workload = Workload(
        model=args.model,
        keys=keys,
        prompt_tokens=args.prompt_tokens,
        max_tokens=args.max_tokens,
        stream=args.stream,
        ignore_eos=args.ignore_eos,
        seed=args.seed,
    )
    requests = args.requests
    if requests is None and args.duration is None:
        requests = 500
    return LoadPlan(
        base_url=args.url.rstrip("/"),
        workload=workload,
        rate=args.rate,
        concurrency=None if args.rate else (args.concurrency or 8),
        requests=requests,
        duration_s=args.duration,
        max_in_flight=args.max_in_flight,
        warmup=args.warmup,
        timeout_s=args.timeout,
    )


def main(args: argparse.Namespace) -> int:
    plan = plan_from(args)
    live = Live()
    result = run_sync(plan, live, side=display(args.progress, live))
    if args.output_dir:
        written = report.write(result, args.output_dir, with_plots=not args.no_plots)
        if not args.no_plots and not any(p.suffix == ".png" for p in written):
            print(
                "bench: no plots (matplotlib missing: pip install 'switchyard[bench]')",
                file=sys.stderr,
            )
        print(f"bench: wrote {', '.join(str(p) for p in written)}", file=sys.stderr)
    doc = report.to_json(result)
    if args.output:
        args.output.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc["summary"], indent=2) if args.json else report.markdown(result))
    return 0 if result.summary.get("ok") else 1
