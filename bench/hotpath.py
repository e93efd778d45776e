"""Where the gateway's CPU goes, counted rather than timed: Python function calls per proxied
request, by package, under cProfile.

Latency on this 2-core machine swings with whatever else runs; the number of Python calls a
request costs does not, so it shows the effect of a change on the gateway's own work even on a
busy machine. A gateway runs in-process (a thread, uvloop, the production protocol) in front
of a real redis-server and simulator; a key with request and token limits makes every request
pay for both budgets, billing and routing.

Writes bench/results/hotpath.json and hotpath.md.

    .venv/bin/python bench/hotpath.py [--requests 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import cProfile
import json
import os
import pstats
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import uvicorn  # noqa: E402
import uvloop  # noqa: E402

from app.bench.client import LoadSpec, run_load  # noqa: E402
from app.http_protocol import GatewayHttpProtocol  # noqa: E402
from app.local.procs import free_port  # noqa: E402
from app.server import create_app  # noqa: E402
from app.settings import Settings  # noqa: E402
from bench.overhead import RESULTS, create_key, machine, start_stack  # noqa: E402


def _package(filename: str) -> str:
    if "site-packages/" in filename:
        return filename.split("site-packages/")[1].split("/")[0]
    if f"{REPO}/app/" in filename:
        return "app/" + filename.split(f"{REPO}/app/")[1]
    if "python3.11" in filename or "lib/python3" in filename:
        return "stdlib/" + os.path.basename(filename)
    return "builtins" if filename == "~" else filename


class InProcessGateway:
    """A gateway on its own event loop thread, so the profiler sees only the gateway."""

    def __init__(self, settings: Settings) -> None:
        config = uvicorn.Config(
            create_app(settings),
            host="127.0.0.1",
            port=settings.port,
            loop="none",
            http=GatewayHttpProtocol,
            log_config=None,
            access_log=False,
        )
        self.server = uvicorn.Server(config)
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self.server.serve())

    def __enter__(self) -> InProcessGateway:
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    def profiled(self, work: Any) -> cProfile.Profile:
        """Run ``work()`` (in this thread) while the gateway's thread is profiled."""
        prof = cProfile.Profile()
        done = threading.Event()

        def stop() -> None:
            prof.disable()
            done.set()

        self.loop.call_soon_threadsafe(prof.enable)
        time.sleep(0.1)
        try:
            work()
        finally:
            self.loop.call_soon_threadsafe(stop)
            done.wait(10)
        return prof


def summarize(prof: cProfile.Profile, requests: int) -> dict[str, Any]:
    stats = pstats.Stats(prof)
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    calls: collections.Counter[str] = collections.Counter()
    seconds: collections.Counter[str] = collections.Counter()
    functions = []
    for (filename, line, name), (_, ncalls, tottime, _, _) in raw.items():
        pkg = _package(filename)
        calls[pkg] += ncalls
        seconds[pkg] += tottime
        functions.append((tottime, ncalls, f"{pkg}:{line}({name})"))
    total_calls = sum(calls.values())
    total_s = sum(seconds.values()) or 1.0
    functions.sort(reverse=True)
    return {
        "python_calls_per_request": round(total_calls / requests),
        "by_package": [
            {
                "package": pkg,
                "calls_per_request": round(n / requests, 1),
                "share_of_time": round(seconds[pkg] / total_s, 3),
            }
            for pkg, n in calls.most_common(20)
        ],
        "top_functions": [
            {
                "function": f,
                "calls_per_request": round(n / requests, 2),
                "share": round(t / total_s, 3),
            }
            for t, n, f in functions[:15]
        ],
    }


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=4)
    args = p.parse_args()
    out: dict[str, Any] = {
        "benchmark": "gateway Python calls per request (cProfile)",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "load": f"closed loop, concurrency {args.concurrency}, {args.requests} requests, key "
        "with rpm and tpm limits, simulator with no delays",
        "cases": {},
    }
    with tempfile.TemporaryDirectory(prefix="sy-profile-") as tmp:
        children, _, _, _ = start_stack(Path(tmp), ttft_ms=0, tokens_per_s=0)
        try:
            key = create_key("--rpm", str(10**9), "--tpm", str(10**12))
            for c in children:
                if c.name == "gateway":
                    c.stop()  # replaced by the in-process one
            settings = Settings(
                redis_url=os.environ["SWITCHYARD_REDIS_URL"],
                catalog=str(Path(tmp) / "catalog.yaml"),
                port=free_port(),
                log_level="warning",
                spool_dir=Path(tmp) / "spool",
            )
            with InProcessGateway(settings) as gw:
                for case, stream, max_tokens in (("chat", False, 1), ("chat_stream", True, 8)):
                    spec = LoadSpec(
                        base_url=f"http://127.0.0.1:{settings.port}/v1",
                        model="chat-small",
                        api_key=key,
                        concurrency=args.concurrency,
                        requests=args.requests,
                        max_tokens=max_tokens,
                        stream=stream,
                        warmup=50,
                    )
                    results: list[Any] = []
                    prof = gw.profiled(
                        lambda s=spec, r=results: r.append(asyncio.run(run_load(s)))  # type: ignore[misc]
                    )
                    assert results[0].ok == args.requests, results[0].errors
                    out["cases"][case] = summarize(prof, args.requests)
                    print(
                        f"{case}: {out['cases'][case]['python_calls_per_request']} Python calls "
                        "per request",
                        flush=True,
                    )
        finally:
            for c in reversed(children):
                c.stop()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "hotpath.json").write_text(json.dumps(out, indent=2) + "\n")
    lines = [f"# Gateway profile ({out['when']})", "", out["load"], ""]
    for case, data in out["cases"].items():
        lines += [
            f"## {case}: {data['python_calls_per_request']} Python calls per request",
            "",
            "| package | calls/request | share of profiled time |",
            "|---|---:|---:|",
        ]
        lines += [
            f"| {row['package']} | {row['calls_per_request']} | {row['share_of_time']:.1%} |"
            for row in data["by_package"][:12]
        ]
        lines.append("")
    (RESULTS / "hotpath.md").write_text("\n".join(lines))
    print(f"wrote {RESULTS / 'hotpath.json'} and hotpath.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
