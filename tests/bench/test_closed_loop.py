"""Closed loop: the concurrency asked for is the concurrency kept."""

from __future__ import annotations

import asyncio

from app.bench.client import LoadSpec, percentiles, run_load
from tests.bench.conftest import base_url, run
from tests.conftest import sim_config
from tests.support.procs import Proc


def test_closed_loop_keeps_the_concurrency(bench_sim: Proc) -> None:
    # 30 ms per request whatever the load (256 slots): throughput = c / 30 ms by Little's law.
    sim_config(bench_sim, ttft_ms=30, tokens_per_s=0, output_tokens=1)
    result = run(base_url(bench_sim), concurrency=6, requests=120)
    s = result.summary
    assert s["ok"] == 120
    assert s["in_flight"]["max"] == 6
    assert s["in_flight"]["mean"] > 5.4  # only the last few requests run with fewer
    expected_rps = 6 / (s["latency_ms"]["mean"] / 1000)
    assert abs(s["throughput_rps"] / expected_rps - 1) < 0.15


def test_closed_loop_for_a_duration(bench_sim: Proc) -> None:
    result = run(base_url(bench_sim), concurrency=2, duration_s=0.8)
    s = result.summary
    assert s["ok"] > 10
    last_start = max(r.due for r in result.records) - result.started
    assert last_start < 0.8


def test_the_older_closed_loop_api_of_the_bench_scripts_still_works(
    simulators: dict[str, list[Proc]],
) -> None:
    spec = LoadSpec(
        base_url=base_url(simulators["chat-small"][0]),
        model="chat-small",
        concurrency=4,
        requests=40,
        stream=True,
        warmup=2,
    )
    result = asyncio.run(run_load(spec))
    assert result.ok == 40
    assert result.errors == {}
    assert set(result.latency_ms) >= {"p50", "p99"}
    assert result.ttft_ms["p50"] < result.latency_ms["p50"]
    assert percentiles([0.001, 0.002])["max"] == 2.0
