"""Overlapped admission: a key with ample headroom goes upstream while its decision is on the
way. The decision still rules: refused requests are cancelled, consume nothing, bill nothing."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from app.billing.record import STREAM
from tests.conftest import (
    GatewayFactory,
    GatewayServer,
    sim_config,
    sim_stats,
    start_simulator,
    wait_for,
)
from tests.gateway.test_streaming import metric
from tests.limits.test_limits import chat, remaining
from tests.support.procs import Proc


def overlapped(gw: GatewayServer, model: str = "chat-small") -> float:
    return metric(gw, "switchyard_ratelimit_overlapped_total", model=model)


def refused_after_overlap(gw: GatewayServer, model: str) -> float:
    return metric(gw, "switchyard_ratelimit_overlap_refused_total", model=model)


def usage_events(redis_url: str) -> int:
    with redis.Redis.from_url(redis_url) as r:
        return int(r.xlen(STREAM))


def exhaust_requests(redis_url: str, key: dict[str, Any]) -> None:
    """What other replicas spending the whole request budget looks like in Redis."""
    with redis.Redis.from_url(redis_url) as r:
        seconds, micros = r.time()
        now_ms = seconds * 1000 + micros // 1000
        r.set(f"sy:rl:{{{key['customer']}}}:k:{key['id']}:r", now_ms + 60_000, px=60_000)


@pytest.fixture
def slow_sim(logs_dir: Path) -> Iterator[Proc]:
    sim = start_simulator(logs_dir, "slow-chat", "--ttft-ms", "400")
    yield sim
    sim.stop()


@pytest.fixture
def slow_gateway(gateway_factory: GatewayFactory, slow_sim: Proc) -> GatewayServer:
    endpoint = slow_sim.url.removesuffix("/health")
    return gateway_factory(catalog={"models": [{"name": "slow-chat", "endpoints": [endpoint]}]})


def test_first_request_of_a_key_waits_for_its_decision(gateway: GatewayServer) -> None:
    key = gateway.create_key(rpm=1000)["key"]
    assert chat(gateway, key).status_code == 200
    assert overlapped(gateway) == 0


def test_requests_with_headroom_overlap_and_are_settled_and_billed(
    gateway: GatewayServer, redis_url: str
) -> None:
    key = gateway.create_key(rpm=100, tpm=20_000)["key"]
    t0 = time.monotonic()
    first = chat(gateway, key, max_tokens=500)
    second = chat(gateway, key, max_tokens=500)  # overlapped; engine stops at 16 tokens
    time.sleep(0.2)  # settlement runs right after each response
    third = chat(gateway, key, max_tokens=500)
    assert [r.status_code for r in (first, second, third)] == [200, 200, 200]
    assert overlapped(gateway) == 2
    assert remaining(second, "requests") == 98
    used = sum(r.json()["usage"]["total_tokens"] for r in (first, second))
    reserved_third = 20_000 - remaining(first, "tokens")  # same request, same reservation
    expected = 20_000 - used - reserved_third  # without the refunds: ~20_000 - 3 * 520
    refilled = (time.monotonic() - t0) * 20_000 / 60
    assert expected - 2 <= remaining(third, "tokens") <= expected + refilled + 2
    wait_for(lambda: usage_events(redis_url) == 3)
    assert refused_after_overlap(gateway, "chat-small") == 0


@pytest.mark.parametrize("stream", [False, True])
def test_a_refused_overlapped_request_is_cancelled_and_not_billed(
    slow_gateway: GatewayServer, slow_sim: Proc, redis_url: str, stream: bool
) -> None:
    record = slow_gateway.create_key(rpm=100)
    assert chat(slow_gateway, record["key"], model="slow-chat").status_code == 200
    exhaust_requests(redis_url, record)  # another replica spent the rest meanwhile
    received = sim_stats(slow_sim)["received"]
    started = time.perf_counter()
    refused = chat(slow_gateway, record["key"], model="slow-chat", stream=stream)
    elapsed = time.perf_counter() - started
    assert refused.status_code == 429
    assert refused.headers["content-type"] == "application/json"
    assert refused.json()["error"]["type"] == "requests"
    assert int(refused.headers["retry-after-ms"]) > 0
    assert elapsed < 0.35, "the refusal must not wait for the engine's first token (400 ms)"
    assert overlapped(slow_gateway, "slow-chat") == 1
    # The engine had the request and lost it when the gateway hung up.
    wait_for(lambda: sim_stats(slow_sim)["aborted"] >= 1)
    assert sim_stats(slow_sim)["received"] == received + 1
    wait_for(lambda: refused_after_overlap(slow_gateway, "slow-chat") == 1)
    time.sleep(0.1)
    assert usage_events(redis_url) == 1  # only the first, served request


def test_after_a_refusal_the_key_waits_for_decisions_again(
    slow_gateway: GatewayServer, slow_sim: Proc, redis_url: str
) -> None:
    record = slow_gateway.create_key(rpm=100)
    assert chat(slow_gateway, record["key"], model="slow-chat").status_code == 200
    exhaust_requests(redis_url, record)
    assert chat(slow_gateway, record["key"], model="slow-chat").status_code == 429
    received = sim_stats(slow_sim)["received"]
    assert chat(slow_gateway, record["key"], model="slow-chat").status_code == 429
    assert overlapped(slow_gateway, "slow-chat") == 1
    assert sim_stats(slow_sim)["received"] == received  # the engine never saw it


def test_near_the_limit_requests_wait_for_their_decision(gateway: GatewayServer) -> None:
    key = gateway.create_key(rpm=8)["key"]  # overlap while at least 3 requests are left
    statuses = [chat(gateway, key).status_code for _ in range(9)]
    assert statuses == [200] * 8 + [429]
    # left after each: 7 6 5 4 3 | 2 1 0 -> requests 2 to 6 overlap, 7 to 9 wait
    assert overlapped(gateway) == 5


def test_keys_with_a_concurrency_cap_never_overlap(gateway: GatewayServer) -> None:
    key = gateway.create_key(rpm=1000, max_concurrent=4)["key"]
    assert all(chat(gateway, key).status_code == 200 for _ in range(3))
    assert overlapped(gateway) == 0


def test_overlap_can_be_switched_off(gateway_factory: GatewayFactory) -> None:
    gw = gateway_factory(limiter_overlap=False)
    key = gw.create_key(rpm=1000)["key"]
    assert all(chat(gw, key).status_code == 200 for _ in range(3))
    assert overlapped(gw) == 0
    assert metric(gw, "switchyard_ratelimit_decisions_total", mode="redis", result="allowed") == 3


def test_an_upstream_error_after_an_overlapped_admission_carries_the_limit_headers(
    slow_gateway: GatewayServer, slow_sim: Proc
) -> None:
    # rpm 10: one request refills every 6 s, far longer than the slow first request takes
    # (with rpm 100 a refill every 0.6 s raced it on a busy machine).
    key = slow_gateway.create_key(rpm=10)["key"]
    assert chat(slow_gateway, key, model="slow-chat").status_code == 200
    sim_config(slow_sim, fail_rate=1.0, fail_status=500)
    try:
        failed = chat(slow_gateway, key, model="slow-chat")
    finally:
        sim_config(slow_sim, fail_rate=0.0)
    assert overlapped(slow_gateway, "slow-chat") == 1
    assert failed.status_code == 502
    assert remaining(failed, "requests") == 8  # as a request that waited for its decision


def test_an_overlapped_decision_survives_redis_losing_its_scripts(
    gateway: GatewayServer, redis_url: str
) -> None:
    """A restarted Redis has no scripts: the overlapped decision meets NOSCRIPT in the reply's
    callback, loads the script and decides the long way; nothing surfaces to the client."""
    key = gateway.create_key(rpm=100)["key"]
    assert chat(gateway, key).status_code == 200
    with redis.Redis.from_url(redis_url) as r:
        r.script_flush()
    second = chat(gateway, key)
    assert second.status_code == 200
    assert overlapped(gateway) == 1
    assert remaining(second, "requests") == 98  # decided in Redis, not locally
    decisions = "switchyard_ratelimit_decisions_total"
    assert metric(gateway, decisions, mode="redis", result="allowed") == 2
    assert metric(gateway, decisions, mode="local", result="allowed") == 0
