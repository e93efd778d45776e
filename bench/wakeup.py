"""What one event-loop turn costs a process woken from idle, on this machine.

A proxy pays such turns that the engine it fronts does not: its request has to wake the
gateway, and the gateway's task has to be scheduled before it can write upstream. On a small VM
the first turn after an idle gap runs with cold caches and TLBs, and costs far more than the
same turn on a busy loop. A uvloop server answers a client that sends one byte, waits, and
sends the next; the server measures from the moment its ``data_received`` starts to a
``call_soon`` callback and to the first step of a new task. Gaps of 0.5, 2 and 20 ms stand for
~2,000, 500 and 50 requests/s; "busy" sends the next byte as soon as the answer arrives.

Writes bench/results/wakeup.json.

    .venv/bin/python bench/wakeup.py [--samples 400]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import uvloop

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.overhead import RESULTS, machine  # noqa: E402

GAPS_MS = (0.0, 0.5, 2.0, 20.0)


class _Probe(asyncio.Protocol):
    def __init__(self, soon: list[float], task: list[float], samples: int) -> None:
        self.soon = soon
        self.task = task
        self.samples = samples
        self.done = asyncio.Event()
        self.running: set[asyncio.Task[None]] = set()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        began = time.perf_counter()
        loop = asyncio.get_running_loop()
        loop.call_soon(lambda: self.soon.append(time.perf_counter() - began))

        async def step() -> None:
            self.task.append(time.perf_counter() - began)
            assert self.transport is not None
            self.transport.write(b"k")
            if len(self.task) >= self.samples:
                self.done.set()

        running = loop.create_task(step())
        self.running.add(running)
        running.add_done_callback(self.running.discard)


def _client(port: int, gap_s: float, samples: int) -> None:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        for _ in range(samples):
            sock.sendall(b"x")
            sock.recv(1)
            if gap_s:
                time.sleep(gap_s)


async def _measure(gap_ms: float, samples: int) -> dict[str, Any]:
    soon: list[float] = []
    task: list[float] = []
    loop = asyncio.get_running_loop()
    probe = _Probe(soon, task, samples)
    server = await loop.create_server(lambda: probe, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    pid = os.fork()
    if pid == 0:  # the client is another process, as it is for a gateway
        try:
            _client(port, gap_ms / 1000, samples)
        finally:
            os._exit(0)
    await probe.done.wait()
    await asyncio.to_thread(os.waitpid, pid, 0)
    server.close()
    skip = samples // 10  # warm-up

    def us(values: list[float]) -> dict[str, float]:
        kept = sorted(values[skip:])
        return {
            "p50": round(statistics.median(kept) * 1e6, 1),
            "p90": round(kept[int(len(kept) * 0.9)] * 1e6, 1),
        }

    return {"gap_ms": gap_ms, "call_soon_us": us(soon), "task_first_step_us": us(task)}


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--samples", type=int, default=400)
    args = p.parse_args()
    rows = [uvloop.run(_measure(gap, args.samples)) for gap in GAPS_MS]
    out = {
        "benchmark": "event-loop turn after an idle gap (uvloop)",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "samples_per_gap": args.samples,
        "rows": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "wakeup.json").write_text(json.dumps(out, indent=2) + "\n")
    for row in rows:
        print(
            f"gap {row['gap_ms']:>5} ms: call_soon p50 {row['call_soon_us']['p50']} us, "
            f"new task p50 {row['task_first_step_us']['p50']} us"
        )
    print(f"wrote {RESULTS / 'wakeup.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
