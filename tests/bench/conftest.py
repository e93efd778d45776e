"""Fixtures of the load generator's tests: a simulator of their own (its behaviour is changed
per test, which the session's shared replicas must not be) and helpers to run a plan."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from app.bench.load import LoadPlan, RunResult, run_sync
from app.bench.workload import Workload
from tests.conftest import sim_config, sim_reset, start_simulator
from tests.support.procs import Proc

DEFAULTS = {
    "ttft_ms": 5,
    "tokens_per_s": 500,
    "max_num_seqs": 256,
    "output_tokens": 16,
    "fail_rate": 0.0,
}


@pytest.fixture(scope="session")
def bench_sim_proc(logs_dir: Path) -> Iterator[Proc]:
    proc = start_simulator(logs_dir, "chat-small", "--ttft-ms", "5", "--tokens-per-s", "500")
    yield proc
    proc.stop()


@pytest.fixture
def bench_sim(bench_sim_proc: Proc) -> Iterator[Proc]:
    """The bench tests' own simulator, back to its defaults after each test."""
    yield bench_sim_proc
    sim_config(bench_sim_proc, **DEFAULTS)
    sim_reset(bench_sim_proc)


def base_url(proc: Proc) -> str:
    return proc.url.removesuffix("/health") + "/v1"


def run(url: str, workload: Workload | None = None, **plan: object) -> RunResult:
    """One run against ``url`` (no warm-up unless asked), on a fresh event loop."""
    plan.setdefault("warmup", 0)
    return run_sync(LoadPlan(base_url=url, workload=workload or Workload("chat-small"), **plan))  # type: ignore[arg-type]
