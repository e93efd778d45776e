"""Billing throughput: usage events per second through record -> aggregate -> send, and how
many Stripe calls 10,000 requests cost.

Records N usage events the way the gateway does (pipelined XADD of ``usage_event``), lets one
billing worker fold them (timed), then sends the closed window to a local Stripe stand-in and
counts the calls. Writes bench/results/billing.json. Targets: >= 20,000 events/s aggregated by
one worker; <= 1 Stripe call per customer, meter and window.

    .venv/bin/python bench/billing.py [--events 100000] [--customers 50]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import redis

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from app.billing.record import STREAM, usage_event  # noqa: E402
from app.billing.worker import WINDOWS, BillingWorker  # noqa: E402
from app.local.procs import free_port, port_open, spawn, wait_until  # noqa: E402
from app.settings import Settings  # noqa: E402
from bench.overhead import RESULTS  # noqa: E402
from tests.support.fake_stripe import FakeStripe  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--events", type=int, default=100_000)
    p.add_argument("--customers", type=int, default=50)
    p.add_argument("--window", type=int, default=5, help="billing window, seconds")
    args = p.parse_args()
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is needed")
    with tempfile.TemporaryDirectory(prefix="sy-bench-") as tmp, FakeStripe() as stripe:
        port = free_port()
        child = spawn(
            "redis",
            [binary, "--port", str(port), "--save", "", "--appendonly", "yes", "--dir", tmp],
            Path(tmp),
        )
        try:
            wait_until(lambda: port_open("127.0.0.1", port), child)
            url = f"redis://127.0.0.1:{port}/0"
            r = redis.Redis.from_url(url)
            models = ["chat-small", "chat-large"]
            t0 = time.perf_counter()
            pipe = r.pipeline(transaction=False)
            for i in range(args.events):
                pipe.xadd(
                    STREAM,
                    usage_event(  # type: ignore[arg-type]
                        f"req_{i}",
                        f"key{i % (args.customers * 2)}",
                        f"cus_{i % args.customers}",
                        models[i % 2],
                        50 + i % 7,
                        20 + i % 11,
                        "upstream",
                    ),
                )
                if i % 1000 == 999:
                    pipe.execute()
            pipe.execute()
            record_s = time.perf_counter() - t0
            settings = Settings(
                redis_url=url,
                billing_window_s=args.window,
                stripe_api_key="sk_test_bench",
                stripe_api_base=stripe.url,
                stripe_max_events_per_s=1000,
            )
            worker = BillingWorker(settings)
            worker.ensure_group()
            t0 = time.perf_counter()
            folded = 0
            while r.xlen(STREAM):
                folded += worker.aggregate_once(count=2000, block_ms=10)
            fold_s = time.perf_counter() - t0
            # wait for the window(s) to close, then send
            deadline = time.monotonic() + args.window * 3 + 10
            while r.zcard(WINDOWS) and time.monotonic() < deadline:
                worker.send_due()
                time.sleep(0.05)
            calls = stripe.state.calls
            windows = {e["identifier"].split("-")[1] for e in stripe.state.accepted.values()}
            per_cmw = len(stripe.state.accepted) / max(1, len(windows) * args.customers * 2)
            billed = sum(stripe.state.totals().values())
            expected = sum(50 + i % 7 + 20 + i % 11 for i in range(args.events))
            r.close()
        finally:
            child.stop()
    out = {
        "benchmark": "billing record -> aggregate -> send",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cpus": os.cpu_count(),
        "events": args.events,
        "customers": args.customers,
        "record_events_per_s": round(args.events / record_s),
        "aggregate_events_per_s": round(folded / fold_s),
        "stripe_calls": calls,
        "stripe_calls_per_10k_requests": round(calls / args.events * 10_000, 2),
        "meter_events_per_customer_meter_window": round(per_cmw, 3),
        "windows": len(windows),
        "billed_tokens": billed,
        "served_tokens": expected,
        "targets": {"aggregate_events_per_s": 20_000, "calls_per_customer_meter_window": 1},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "billing.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    return 0 if billed == expected else 1


if __name__ == "__main__":
    sys.exit(main())
