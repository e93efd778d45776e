"""Failures before the first byte are retried on another replica; clients never see them."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import GatewayFactory, sim_config, sim_stats, start_simulator
from tests.support.procs import Proc, free_port

MSG = [{"role": "user", "content": "hi"}]


@pytest.fixture
def pair(logs_dir: Path) -> Iterator[list[Proc]]:
    sims = [
        start_simulator(logs_dir, "pair", "--ttft-ms", "1", "--tokens-per-s", "0") for _ in range(2)
    ]
    yield sims
    for s in sims:
        s.stop()


def endpoints(sims: list[Proc]) -> list[str]:
    return [s.url.removesuffix("/health") for s in sims]


def test_a_dead_replica_is_invisible_to_clients(
    gateway_factory: GatewayFactory, pair: list[Proc]
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    gw = gateway_factory(
        catalog={"models": [{"name": "pair", "endpoints": [dead, *endpoints(pair)]}]},
        health_interval_s=60,  # only passive detection may help here
    )
    gw.services.router.pool("pair").replicas[0].healthy = True  # pretend the check missed it
    client = gw.client(gw.create_key()["key"])
    for i in range(12):
        if i % 2:
            r = client.chat.completions.create(model="pair", messages=MSG, max_tokens=2)
            assert r.usage is not None and r.usage.completion_tokens == 2
        else:
            chunks = list(
                client.chat.completions.create(
                    model="pair", messages=MSG, max_tokens=2, stream=True
                )
            )
            assert chunks[-1].choices[0].finish_reason == "length"
    assert sum(sim_stats(s)["finished"] for s in pair) == 12


def test_a_replica_answering_500_is_retried_and_ejected(
    gateway_factory: GatewayFactory, pair: list[Proc]
) -> None:
    sim_config(pair[0], fail_rate=1.0)
    gw = gateway_factory(catalog={"models": [{"name": "pair", "endpoints": endpoints(pair)}]})
    client = gw.client(gw.create_key()["key"])
    for _ in range(10):
        r = client.chat.completions.create(model="pair", messages=MSG, max_tokens=1)
        assert r.choices[0].finish_reason == "length"
    bad = sim_stats(pair[0])
    assert bad["failed"] == 3, "ejected after three consecutive failures"
    assert sim_stats(pair[1])["finished"] == 10
    replica = gw.services.router.pool("pair").replicas[0]
    assert not replica.available(time.monotonic())


def test_all_replicas_failing_is_a_clean_502(
    gateway_factory: GatewayFactory, pair: list[Proc]
) -> None:
    for s in pair:
        sim_config(s, fail_rate=1.0)
    gw = gateway_factory(catalog={"models": [{"name": "pair", "endpoints": endpoints(pair)}]})
    key = gw.create_key()["key"]
    r = httpx.post(
        f"{gw.url}/v1/chat/completions",
        json={"model": "pair", "messages": MSG},
        headers={"authorization": f"Bearer {key}"},
    )
    assert r.status_code == 502
    assert r.json()["error"]["code"] == "upstream_error"
