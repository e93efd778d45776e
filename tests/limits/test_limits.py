"""Rate limits through the gateway, against a real redis-server, as clients see them."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.conftest import GatewayFactory, GatewayServer, start_simulator, wait_for
from tests.support.procs import Proc

MSG = [{"role": "user", "content": "hi"}]


def chat(gw: GatewayServer, key: str, **body: Any) -> httpx.Response:
    payload = {"model": "chat-small", "messages": MSG, "max_tokens": 2, **body}
    return httpx.post(
        f"{gw.url}/v1/chat/completions",
        json=payload,
        headers={"authorization": f"Bearer {key}"},
        timeout=20,
    )


def remaining(r: httpx.Response, kind: str) -> int:
    return int(r.headers[f"x-ratelimit-remaining-{kind}"])


def test_burst_up_to_the_limit_then_429_with_retry_after(gateway: GatewayServer) -> None:
    key = gateway.create_key(rpm=5)["key"]
    seen = [chat(gateway, key) for _ in range(5)]
    assert [r.status_code for r in seen] == [200] * 5
    assert [remaining(r, "requests") for r in seen] == [4, 3, 2, 1, 0]
    assert seen[0].headers["x-ratelimit-limit-requests"] == "5"
    refused = chat(gateway, key)
    assert refused.status_code == 429
    err = refused.json()["error"]
    assert err["code"] == "rate_limit_exceeded"
    assert err["type"] == "requests"
    assert "requests per minute" in err["message"]
    wait_ms = int(refused.headers["retry-after-ms"])
    assert 10_000 <= wait_ms <= 12_000  # one request refills every 12 s
    assert refused.headers["retry-after"] == str(-(-wait_ms // 1000))
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"


def test_budget_refills_over_time(gateway: GatewayServer) -> None:
    key = gateway.create_key(rpm=30)["key"]  # one every 2 s
    t0 = time.monotonic()
    admitted = 0
    while (refused := chat(gateway, key)).status_code == 200:
        admitted += 1
        assert admitted <= 30 + (time.monotonic() - t0) / 2 + 1
    assert refused.status_code == 429
    assert admitted >= 30
    time.sleep(int(refused.headers["retry-after-ms"]) / 1000 + 0.05)
    assert chat(gateway, key).status_code == 200


def test_openai_client_sees_429_as_rate_limit_error(gateway: GatewayServer) -> None:
    import openai

    key = gateway.create_key(rpm=1)["key"]
    client = gateway.client(key)
    client.chat.completions.create(model="chat-small", messages=MSG, max_tokens=1)
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="chat-small", messages=MSG, max_tokens=1)
    assert info.value.response.headers["retry-after"]


def test_token_budget_refuses_large_max_tokens_while_small_pass(gateway: GatewayServer) -> None:
    key = gateway.create_key(tpm=1000)["key"]
    big = chat(gateway, key, max_tokens=2000)
    assert big.status_code == 429
    assert big.json()["error"]["type"] == "tokens"
    assert "too large" in big.json()["error"]["message"]
    for _ in range(5):
        r = chat(gateway, key, max_tokens=5)
        assert r.status_code == 200
        assert r.headers["x-ratelimit-limit-tokens"] == "1000"


def test_tokens_exhausted_then_429_naming_tokens(gateway: GatewayServer) -> None:
    key = gateway.create_key(tpm=300)["key"]
    # ignore_eos (vLLM): the engine really generates all 100 tokens, so nothing is refunded
    statuses = [chat(gateway, key, max_tokens=100, ignore_eos=True).status_code for _ in range(4)]
    assert statuses[:2] == [200, 200]
    assert 429 in statuses
    r = chat(gateway, key, max_tokens=100)
    assert r.status_code == 429
    assert r.json()["error"]["type"] == "tokens"
    assert int(r.headers["retry-after-ms"]) > 0


def test_reconcile_refunds_unused_reservation(gateway: GatewayServer) -> None:
    """The engine stops naturally at 16 tokens; a 500-token reservation is mostly refunded."""
    key = gateway.create_key(tpm=2000)["key"]
    t0 = time.monotonic()
    first = chat(gateway, key, max_tokens=500)
    assert first.status_code == 200
    used = first.json()["usage"]["total_tokens"]
    assert first.json()["usage"]["completion_tokens"] == 16
    reserved_first = 2000 - remaining(first, "tokens")
    assert reserved_first >= 500
    time.sleep(0.2)  # settlement runs right after the response
    second = chat(gateway, key, max_tokens=500)
    # Without the refund the second admission would leave ~2000 - 2 * reserved.
    expected = 2000 - used - reserved_first
    refilled = (time.monotonic() - t0) * 2000 / 60
    assert expected - 2 <= remaining(second, "tokens") <= expected + refilled + 2


def test_stream_cut_by_client_is_charged_for_what_was_generated(
    gateway_factory: GatewayFactory, logs_dir: Path
) -> None:
    sim = start_simulator(logs_dir, "slow-chat", "--tokens-per-s", "20", "--output-tokens", "1000")
    try:
        gw = gateway_factory(
            catalog={
                "models": [{"name": "slow-chat", "endpoints": [sim.url.removesuffix("/health")]}]
            }
        )
        key = gw.create_key(tpm=5000)["key"]
        body = {"model": "slow-chat", "messages": MSG, "max_tokens": 2000, "stream": True}
        with gw.stream_chat(key, body) as r:
            assert remaining(r, "tokens") < 3000  # 2000 reserved up front
            for n, _ in enumerate(r.iter_lines()):
                if n >= 6:
                    break
        time.sleep(0.3)
        after = httpx.post(
            f"{gw.url}/v1/chat/completions",
            json={"model": "slow-chat", "messages": MSG, "max_tokens": 1},
            headers={"authorization": f"Bearer {key}"},
            timeout=10,
        )
        # only the prompt and the few tokens sent were kept: ~5000 - 20 - 10
        assert remaining(after, "tokens") > 4900
    finally:
        sim.stop()


def test_two_gateway_processes_share_one_budget(
    gateway_factory: GatewayFactory,
    simulators: dict[str, list[Proc]],
    redis_url: str,
    tmp_path: Path,
) -> None:
    """One gateway in this process, one in its own process, both on the same Redis."""
    import sys

    import yaml

    from tests.conftest import catalog_for
    from tests.support.procs import free_port, start

    first = gateway_factory()
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(yaml.safe_dump(catalog_for(simulators)))
    port = free_port()
    second = start(
        [sys.executable, "-m", "app.cli", "gateway", "--port", str(port)],
        tmp_path / "gateway2.log",
        ready_url=f"http://127.0.0.1:{port}/readyz",
        env={
            "SWITCHYARD_REDIS_URL": redis_url,
            "SWITCHYARD_CATALOG": str(catalog),
            "SWITCHYARD_SPOOL_DIR": str(tmp_path / "spool2"),
        },
    )
    try:
        key = first.create_key(rpm=40)["key"]
        results: list[int] = []
        lock = threading.Lock()

        def hammer(url: str) -> None:
            with httpx.Client(timeout=20) as c:
                for _ in range(40):
                    r = c.post(
                        f"{url}/v1/chat/completions",
                        json={"model": "chat-small", "messages": MSG, "max_tokens": 1},
                        headers={"authorization": f"Bearer {key}"},
                    )
                    with lock:
                        results.append(r.status_code)

        urls = [first.url, f"http://127.0.0.1:{port}"] * 2
        threads = [threading.Thread(target=hammer, args=(u,)) for u in urls]
        started = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - started
    finally:
        second.stop()
    admitted = results.count(200)
    refill = int(elapsed * 40 / 60)  # one more per 1.5 s of test
    assert set(results) <= {200, 429}
    assert 40 <= admitted <= 40 + refill + 1, (admitted, elapsed)


def test_customer_limit_is_shared_by_its_keys(gateway: GatewayServer) -> None:
    with gateway.admin() as admin:
        r = admin.put("/admin/customers/cus_shared/limits", json={"rpm": 3})
        assert r.status_code == 200
    a = gateway.create_key(customer="cus_shared")["key"]
    b = gateway.create_key(customer="cus_shared")["key"]
    statuses = [chat(gateway, k).status_code for k in (a, b, a, b)]
    assert statuses == [200, 200, 200, 429]
    other = gateway.create_key(customer="cus_other")["key"]
    assert chat(gateway, other).status_code == 200


def test_per_model_override_adds_a_budget(gateway: GatewayServer) -> None:
    key = gateway.create_key(rpm=100, model_limits={"embed-small": {"rpm": 2}})["key"]

    def embed() -> httpx.Response:
        return httpx.post(
            f"{gateway.url}/v1/embeddings",
            json={"model": "embed-small", "input": "x"},
            headers={"authorization": f"Bearer {key}"},
        )

    assert [embed().status_code for _ in range(3)] == [200, 200, 429]
    assert chat(gateway, key).status_code == 200  # other models keep the key budget


def test_concurrency_cap(gateway_factory: GatewayFactory, logs_dir: Path) -> None:
    sim = start_simulator(logs_dir, "slow-chat", "--tokens-per-s", "20", "--output-tokens", "1000")
    try:
        gw = gateway_factory(
            catalog={
                "models": [{"name": "slow-chat", "endpoints": [sim.url.removesuffix("/health")]}]
            }
        )
        key = gw.create_key(max_concurrent=1)["key"]
        headers = {"authorization": f"Bearer {key}"}
        body = {"model": "slow-chat", "messages": MSG, "max_tokens": 20, "stream": True}
        with gw.stream_chat(key, body) as r:
            assert r.status_code == 200
            second = httpx.post(
                f"{gw.url}/v1/chat/completions",
                json={**body, "stream": False},
                headers=headers,
                timeout=10,
            )
            assert second.status_code == 429
            assert "concurrent" in second.json()["error"]["message"]
            r.read()
        time.sleep(0.2)
        third = httpx.post(
            f"{gw.url}/v1/chat/completions",
            json={**body, "stream": False, "max_tokens": 1},
            headers=headers,
            timeout=10,
        )
        assert third.status_code == 200
    finally:
        sim.stop()


def test_expected_completion_is_learned_per_key_and_model(
    gateway: GatewayServer, redis_url: str
) -> None:
    created = gateway.create_key(tpm=100_000)
    key = created["key"]
    first = chat(gateway, key, max_tokens=None)
    assert first.status_code == 200
    reserved_first = 100_000 - remaining(first, "tokens")
    assert reserved_first >= 256  # the model default before anything is known
    for _ in range(3):
        chat(gateway, key, max_tokens=None)
    time.sleep(0.2)
    r = redis.Redis.from_url(redis_url)
    learned = [k for k in r.scan_iter(match="sy:rl:*:learned")]
    assert len(learned) == 1
    assert 15.5 <= float(r.get(learned[0])) <= 16.5  # type: ignore[arg-type]
    r.close()
    later = chat(gateway, key, max_tokens=None)
    before = remaining(chat(gateway, key, max_tokens=None), "tokens")
    assert later.status_code == 200
    assert before > 100_000 - 300  # now ~16 reserved per request, not 256


def test_unlimited_keys_get_no_limit_headers(gateway: GatewayServer, api_key: str) -> None:
    r = chat(gateway, api_key)
    assert r.status_code == 200
    assert not any(h.startswith("x-ratelimit") for h in r.headers)


def test_streams_carry_the_headers_too(gateway: GatewayServer) -> None:
    key = gateway.create_key(rpm=10, tpm=10_000)["key"]
    body = {"model": "chat-small", "messages": MSG, "max_tokens": 2, "stream": True}
    with gateway.stream_chat(key, body, timeout=5.0) as r:  # httpx's default, as before
        r.read()
    for name in ("limit", "remaining", "reset"):
        for kind in ("requests", "tokens"):
            assert f"x-ratelimit-{name}-{kind}" in r.headers
    assert r.headers["x-ratelimit-reset-requests"].endswith("s")


# -- Redis goes away ---------------------------------------------------------------------------


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[Any]:
    """A redis-server this test may stop and start again (same port, same data)."""
    from tests.support.procs import free_port

    port = free_port()
    proc: dict[str, Any] = {}

    def start() -> None:
        import subprocess

        proc["p"] = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(tmp_path),
                "--save",
                "",
                "--appendonly",
                "yes",
            ],
            stdout=subprocess.DEVNULL,
        )
        client = redis.Redis(port=port)
        wait_for(lambda: _pings(client), timeout=10)
        client.close()

    def stop() -> None:
        proc["p"].terminate()
        proc["p"].wait(5)

    start()
    yield type(
        "R",
        (),
        {
            "url": f"redis://127.0.0.1:{port}/0",
            "start": staticmethod(start),
            "stop": staticmethod(stop),
        },
    )
    if proc["p"].poll() is None:
        stop()


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


def decisions(gw: GatewayServer, mode: str) -> float:
    from tests.gateway.test_streaming import metric

    return metric(gw, "switchyard_ratelimit_decisions_total", mode=mode, result="allowed") + metric(
        gw, "switchyard_ratelimit_decisions_total", mode=mode, result="limited"
    )


def test_fail_open_limits_locally_and_recovers(
    gateway_factory: GatewayFactory, own_redis: Any, simulators: dict[str, list[Proc]]
) -> None:
    gw = gateway_factory(redis_url=own_redis.url, gateway_replicas=2)
    key = gw.create_key(rpm=20)["key"]
    assert chat(gw, key).status_code == 200
    own_redis.stop()
    statuses = [chat(gw, key).status_code for _ in range(15)]
    assert 500 not in statuses
    # a fair share of 20 rpm between 2 replicas: 10 here, then 429
    assert statuses.count(200) == 10, statuses
    assert set(statuses) == {200, 429}
    from tests.gateway.test_streaming import metric

    assert metric(gw, "switchyard_ratelimit_redis_circuit_open") == 1
    assert httpx.get(f"{gw.url}/readyz").status_code == 503
    own_redis.start()
    wait_for(
        lambda: (
            chat(gw, key).status_code in (200, 429)
            and metric(gw, "switchyard_ratelimit_redis_circuit_open") == 0
        ),
        timeout=10,
    )
    before = decisions(gw, "redis")
    chat(gw, key)
    assert decisions(gw, "redis") == before + 1


def test_fail_closed_answers_503_without_redis(
    gateway_factory: GatewayFactory, own_redis: Any
) -> None:
    gw = gateway_factory(redis_url=own_redis.url, ratelimit_failure_mode="fail_closed")
    key = gw.create_key(rpm=20)["key"]
    assert chat(gw, key).status_code == 200
    own_redis.stop()
    started = time.monotonic()
    statuses = [chat(gw, key).status_code for _ in range(10)]
    assert statuses == [503] * 10
    assert time.monotonic() - started < 5, "the circuit breaker must stop the waiting"
    own_redis.start()
    wait_for(lambda: chat(gw, key).status_code == 200, timeout=10)
