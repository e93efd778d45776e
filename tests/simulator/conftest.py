"""Real simulator processes on free ports, shared per session and reset before each test."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.procs import Proc, free_port, start

FAST = ("--ttft-ms", "0", "--tokens-per-s", "0")


@dataclass
class Sim:
    """A running simulator and the test controls it exposes."""

    proc: Proc
    url: str
    baseline: dict[str, Any]
    http: httpx.Client  # one pooled client: a fresh one per call costs ~30 ms

    def stop(self) -> None:
        self.http.close()
        self.proc.stop()

    def configure(self, **fields: Any) -> dict[str, Any]:
        r = self.http.post("/sim/config", json=fields)
        assert r.status_code == 200, r.text
        return dict(r.json())

    def stats(self) -> dict[str, int]:
        return dict(self.http.get("/sim/stats").json())

    def wait_stats(
        self, pred: Callable[[dict[str, int]], bool], timeout: float = 5.0
    ) -> dict[str, int]:
        """Poll /sim/stats until pred holds (an event, not a sleep)."""
        deadline = time.monotonic() + timeout
        while True:
            stats = self.stats()
            if pred(stats):
                return stats
            if time.monotonic() > deadline:
                raise AssertionError(f"condition not reached; last stats {stats}")
            time.sleep(0.01)

    def metrics(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        """Samples of /metrics keyed by (sample name, labels without model_name)."""
        text = self.http.get("/metrics").text
        out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = {k: v for k, v in s.labels.items() if k != "model_name"}
                assert s.labels.get("model_name") == self.baseline["model"]
                out[(s.name, frozenset(labels.items()))] = s.value
        return out

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics()[(name, frozenset(labels.items()))]

    def restore(self) -> None:
        """Back to the start-up config with zeroed stats, once earlier requests are gone."""
        self.configure(**{k: v for k, v in self.baseline.items() if k not in ("model", "kind")})
        self.wait_stats(lambda s: s["running"] == 0 and s["waiting"] == 0)
        self.http.post("/sim/reset").raise_for_status()


def _start_sim(tmp: Path, name: str, *flags: str) -> Sim:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = [sys.executable, "-m", "app.simulator", "--port", str(port), *flags]
    proc = start(args, tmp / f"{name}.log", ready_url=f"{url}/health")
    http = httpx.Client(base_url=url, timeout=10.0)
    baseline = dict(http.get("/sim/config").json())
    return Sim(proc=proc, url=url, baseline=baseline, http=http)


@pytest.fixture(scope="session")
def chat_proc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sim]:
    sim = _start_sim(tmp_path_factory.mktemp("sim"), "chat", "--model", "chat-small", *FAST)
    yield sim
    sim.stop()


@pytest.fixture(scope="session")
def embed_proc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sim]:
    sim = _start_sim(
        tmp_path_factory.mktemp("sim"), "embed", "--model", "embed-small", "--kind", "embedding",
        *FAST,
    )  # fmt: skip
    yield sim
    sim.stop()


@pytest.fixture
def sim(chat_proc: Sim) -> Sim:
    """The shared chat simulator, reset to its start-up behaviour for this test."""
    chat_proc.restore()
    return chat_proc


@pytest.fixture
def embed_sim(embed_proc: Sim) -> Sim:
    embed_proc.restore()
    return embed_proc
