"""bench/compare.py's summary (added latency, time to first token, ratios) and CPU pinning."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest

from bench.compare import pin, summarize


def row(target: str, stream: bool, rate: float, p50: float, p99: float, **extra: Any) -> Any:
    return {
        "target": target,
        "stream": stream,
        "rate": rate,
        "latency_ms": {"p50": p50, "p99": p99},
        "ttft_ms": extra.pop("ttft", {}),
        "throughput_rps": extra.pop("rps", rate),
        "rps_per_core": extra.pop("per_core", None),
        "proxy_cpu_s": extra.pop("cpu", None),
        "engine_cpu_s": extra.pop("engine", None),
        "client_limited": False,
        "sustained": extra.pop("sustained", True),
    }


def test_added_latency_and_time_to_first_token_are_taken_at_equal_load() -> None:
    rows = [
        row("direct", False, 500, 20.0, 22.0),
        row("switchyard", False, 500, 20.7, 23.5, cpu=2.0, engine=1.0, per_core=1000),
        row("direct", True, 500, 21.0, 23.0, ttft={"p50": 5.9, "p99": 7.0}),
        row("switchyard", True, 500, 21.6, 25.0, ttft={"p50": 6.7, "p99": 9.0}),
        row("switchyard", True, 1000, 40.0, 900.0, ttft={"p50": 30.0}, sustained=False),
    ]
    summary = summarize(rows)
    (whole,) = summary["whole"]["added_latency_ms"]
    assert whole == {"target": "switchyard", "rate": 500, "p50_ms": 0.7, "p99_ms": 1.5}
    (stream,) = summary["stream"]["added_latency_ms"]  # the unsustained rate is left out
    assert stream["ttft_p50_ms"] == pytest.approx(0.8)
    assert summary["whole"]["max_sustainable"]["switchyard"]["cpu_over_engine"] == 2.0
    assert summary["stream"]["max_sustainable"]["switchyard"]["saturated"] is True


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_pin_moves_every_thread_of_a_process() -> None:
    cpu = max(os.sched_getaffinity(0))
    code = "import threading, time; threading.Thread(target=time.sleep, args=(30,)).start(); "
    code += "print(flush=True); time.sleep(30)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        proc.stdout.readline()  # both threads exist
        pin(proc.pid, {cpu})
        threads = os.listdir(f"/proc/{proc.pid}/task")
        assert len(threads) == 2
        assert all(os.sched_getaffinity(int(t)) == {cpu} for t in threads)
    finally:
        proc.kill()
        proc.communicate()
