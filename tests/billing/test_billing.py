"""Usage recorded by the gateway, folded by billing workers, sent to Stripe exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from app.billing.record import STREAM
from app.billing.reports import reconcile
from app.billing.worker import BillingWorker
from app.settings import Settings
from tests.conftest import GatewayFactory, GatewayServer, wait_for
from tests.limits.test_limits import own_redis  # noqa: F401  (fixture)
from tests.support.fake_stripe import FakeStripe
from tests.support.platform import start_billing_worker

MSG = [{"role": "user", "content": "bill me"}]


@pytest.fixture
def stripe_server() -> Iterator[FakeStripe]:
    with FakeStripe() as server:
        yield server


def worker_settings(redis_url: str, stripe: FakeStripe | None, **extra: Any) -> Settings:
    values: dict[str, Any] = {
        "redis_url": redis_url,
        "billing_window_s": 1,
        "stripe_max_events_per_s": 200,
    }
    if stripe is not None:
        values |= {"stripe_api_key": "sk_test_abc", "stripe_api_base": stripe.url}
    return Settings(**(values | extra))


def drain(worker: BillingWorker, until: Any, timeout: float = 15.0) -> None:
    worker.ensure_group()
    deadline = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < deadline, "billing did not converge"
        worker.aggregate_once(block_ms=50)
        worker.reclaim()
        worker.send_due()


def add_event(
    r: redis.Redis,
    rid: str,
    cus: str = "cus_a",
    pt: int = 10,
    ct: int = 5,
    model: str = "chat-small",
) -> None:
    r.xadd(
        STREAM,
        {
            "rid": rid,
            "key": "k1",
            "cus": cus,
            "model": model,
            "pt": pt,
            "ct": ct,
            "ts": int(time.time() * 1000),
            "src": "upstream",
        },
    )


def test_events_fold_once_and_become_one_meter_event_per_window(
    redis_url: str, stripe_server: FakeStripe
) -> None:
    r = redis.Redis.from_url(redis_url)
    for i in range(50):
        add_event(r, f"req-{i}")
    add_event(r, "req-7")  # a replayed duplicate
    worker = BillingWorker(worker_settings(redis_url, stripe_server))
    drain(worker, lambda: r.hlen("sy:{bill}:recorded") == 2 and not r.zcard("sy:{bill}:windows"))
    assert stripe_server.state.totals() == {
        ("cus_a", "switchyard_input_tokens"): 500,
        ("cus_a", "switchyard_output_tokens"): 250,
    }
    assert len(stripe_server.state.accepted) <= 4  # one per meter and window (1 s windows)
    assert worker.metrics.duplicates._value.get() == 1
    assert r.xlen(STREAM) == 0, "acknowledged entries are deleted"
    assert all(row["difference"] == 0 for row in reconcile(r))
    r.close()


def test_meters_come_from_the_catalogue(redis_url: str, stripe_server: FakeStripe) -> None:
    r = redis.Redis.from_url(redis_url)
    add_event(r, "m1", model="big")
    catalog = {"models": [{"name": "big", "meters": {"input": "big_in", "output": "big_out"}}]}
    worker = BillingWorker(worker_settings(redis_url, stripe_server, catalog=catalog))
    drain(worker, lambda: len(stripe_server.state.accepted) == 2)
    assert set(stripe_server.state.totals()) == {("cus_a", "big_in"), ("cus_a", "big_out")}
    r.close()


def test_stripe_failures_are_retried_until_accepted(
    redis_url: str, stripe_server: FakeStripe
) -> None:
    from tests.support.fake_stripe import Fault

    for kind in ("500", "429", "drop", "429-retry-after"):
        stripe_server.state.faults.append(Fault(kind))
    r = redis.Redis.from_url(redis_url)
    add_event(r, "x1", pt=7, ct=3)
    worker = BillingWorker(worker_settings(redis_url, stripe_server))
    drain(worker, lambda: len(stripe_server.state.accepted) == 2, timeout=30)
    assert stripe_server.state.totals() == {
        ("cus_a", "switchyard_input_tokens"): 7,
        ("cus_a", "switchyard_output_tokens"): 3,
    }
    assert worker.metrics.retries._value.get() >= 4
    r.close()


def test_unknown_customer_goes_to_dead_letters_and_can_be_resent(
    redis_url: str, stripe_server: FakeStripe
) -> None:
    stripe_server.state.customers = {"cus_good"}
    r = redis.Redis.from_url(redis_url)
    add_event(r, "d1", cus="cus_bad")
    add_event(r, "d2", cus="cus_good")
    settings = worker_settings(redis_url, stripe_server)
    worker = BillingWorker(settings)
    drain(worker, lambda: r.llen("sy:{bill}:dead") == 2 and not r.zcard("sy:{bill}:windows"))
    out = subprocess.run(
        [sys.executable, "-m", "app.cli", "billing", "dead-letters"],
        env={**os.environ, "SWITCHYARD_REDIS_URL": redis_url},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    import json

    dead = json.loads(out.stdout)
    assert {d["customer"] for d in dead} == {"cus_bad"}
    assert {d["meter"] for d in dead} == {"switchyard_input_tokens", "switchyard_output_tokens"}
    assert all(row["difference"] == 0 for row in reconcile(r))
    stripe_server.state.customers.add("cus_bad")  # the customer was created in Stripe
    for d in dead:
        assert worker.resend_dead_letter(d["identifier"]).outcome == "sent"
    assert stripe_server.state.totals()[("cus_bad", "switchyard_input_tokens")] == 10
    assert r.llen("sy:{bill}:dead") == 0
    assert all(row["difference"] == 0 and row["dead_letter"] == 0 for row in reconcile(r))
    r.close()


def test_without_a_stripe_key_usage_stays_aggregated(redis_url: str) -> None:
    r = redis.Redis.from_url(redis_url)
    add_event(r, "n1")
    worker = BillingWorker(worker_settings(redis_url, None))
    drain(worker, lambda: r.hlen("sy:{bill}:recorded") == 2)
    time.sleep(1.1)
    worker.send_due()
    rows = reconcile(r)
    assert {row["waiting"] for row in rows} == {10, 5}
    r.close()


def _sum_usage(responses: list[dict[str, Any]], customer: str) -> tuple[int, int]:
    rows = [u for c, u in responses if c == customer]
    return sum(u["prompt_tokens"] for u in rows), sum(u["completion_tokens"] for u in rows)


def _traffic(gw: GatewayServer, keys: dict[str, str], rounds: int) -> list[Any]:
    """Streamed and whole requests; returns (customer, usage) as the clients saw it."""
    seen: list[Any] = []
    with httpx.Client(timeout=20) as c:
        for i in range(rounds):
            for customer, key in keys.items():
                stream = i % 2 == 1
                body: dict[str, Any] = {
                    "model": "chat-small",
                    "messages": MSG,
                    "max_tokens": 3 + i % 5,
                    "stream": stream,
                }
                headers = {"authorization": f"Bearer {key}"}
                if not stream:
                    r = c.post(f"{gw.url}/v1/chat/completions", json=body, headers=headers)
                    assert r.status_code == 200, r.text
                    seen.append((customer, r.json()["usage"]))
                    continue
                body["stream_options"] = {"include_usage": True}
                with c.stream(
                    "POST", f"{gw.url}/v1/chat/completions", json=body, headers=headers
                ) as r:
                    assert r.status_code == 200
                    usage = None
                    for line in r.iter_lines():
                        if '"usage":{' in line:
                            import json

                            usage = json.loads(line[6:])["usage"]
                    seen.append((customer, usage))
    return seen


def start_worker(redis_url: str, stripe: FakeStripe, log: Path) -> subprocess.Popen[bytes]:
    return start_billing_worker(redis_url, stripe.url, log)


def test_billed_tokens_equal_served_tokens_through_faults(
    gateway_factory: GatewayFactory,
    stripe_server: FakeStripe,
    own_redis: Any,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Stripe fails a third of calls; the worker is killed while Stripe is answering one of its
    calls (Stripe records it, the worker never learns) and restarted; Redis is restarted (AOF).
    Billed == served, exactly, and no identifier counted twice."""
    from tests.support.fake_stripe import Fault

    stripe_server.state.fail_every = 3
    gw = gateway_factory(redis_url=own_redis.url)
    keys = {c: gw.create_key(customer=c)["key"] for c in ("cus_e2e_1", "cus_e2e_2")}
    log = tmp_path / "worker.log"
    worker = start_worker(own_redis.url, stripe_server, log)
    try:
        seen = _traffic(gw, keys, 10)
        calls = stripe_server.state.calls
        stripe_server.state.faults.append(Fault("slow", 1.5))  # the next call hangs a while
        wait_for(lambda: stripe_server.state.calls > calls, timeout=10)
        worker.send_signal(signal.SIGKILL)  # mid-send: Stripe will accept, nobody marks it
        worker.wait(10)
        seen += _traffic(gw, keys, 10)
        own_redis.stop()
        own_redis.start()
        worker = start_worker(own_redis.url, stripe_server, log)
        seen += _traffic(gw, keys, 10)
        r = redis.Redis.from_url(own_redis.url)

        def settled() -> bool:
            return r.xlen(STREAM) == 0 and r.zcard("sy:{bill}:windows") == 0

        wait_for(settled, timeout=40, interval=0.2)
        r.close()
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(10)
    totals = stripe_server.state.totals()
    for customer in keys:
        prompt, completion = _sum_usage(seen, customer)
        assert totals[(customer, "switchyard_input_tokens")] == prompt
        assert totals[(customer, "switchyard_output_tokens")] == completion
    idents = [e["identifier"] for e in stripe_server.state.accepted.values()]
    assert len(idents) == len(set(idents))
    assert stripe_server.state.duplicates >= 1, "the killed send was resent and deduplicated"


def test_usage_is_spooled_while_redis_is_away_and_billed_after(
    gateway_factory: GatewayFactory,
    stripe_server: FakeStripe,
    own_redis: Any,  # noqa: F811
    tmp_path: Path,
) -> None:
    gw = gateway_factory(redis_url=own_redis.url)
    key = gw.create_key(customer="cus_spool")["key"]
    seen = _traffic(gw, {"cus_spool": key}, 2)
    own_redis.stop()
    seen += _traffic(gw, {"cus_spool": key}, 6)  # served from cached keys, fail-open limits
    spool = tmp_path / "spool"
    wait_for(lambda: any(spool.glob("usage-*.jsonl")), timeout=5)
    own_redis.start()
    wait_for(lambda: not any(spool.glob("usage-*")), timeout=15, interval=0.2)
    worker = BillingWorker(worker_settings(own_redis.url, stripe_server))
    r = redis.Redis.from_url(own_redis.url)
    drain(worker, lambda: r.xlen(STREAM) == 0 and r.zcard("sy:{bill}:windows") == 0)
    prompt, completion = _sum_usage(seen, "cus_spool")
    totals = stripe_server.state.totals()
    assert totals[("cus_spool", "switchyard_input_tokens")] == prompt
    assert totals[("cus_spool", "switchyard_output_tokens")] == completion
    r.close()


def test_a_key_sees_its_own_usage(gateway: GatewayServer, redis_url: str) -> None:
    key = gateway.create_key(customer="cus_view")["key"]
    other = gateway.create_key(customer="cus_other")["key"]
    seen = _traffic(gateway, {"cus_view": key}, 3)
    _traffic(gateway, {"cus_other": other}, 1)
    worker = BillingWorker(worker_settings(redis_url, None))
    r = redis.Redis.from_url(redis_url)
    drain(worker, lambda: r.xlen(STREAM) == 0 and r.hlen("sy:{bill}:recorded") >= 4)
    r.close()
    mine = httpx.get(f"{gateway.url}/v1/usage", headers={"authorization": f"Bearer {key}"})
    assert mine.status_code == 200
    prompt, completion = _sum_usage(seen, "cus_view")
    assert mine.json()["totals"] == {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "requests": 3,
    }
    with gateway.admin() as admin:
        cus = admin.get("/admin/usage", params={"customer": "cus_view"}).json()
    assert cus["totals"] == mine.json()["totals"]


def stream_reads(r: redis.Redis) -> int:
    stats: dict[str, Any] = r.info("commandstats")
    return int(stats.get("cmdstat_xreadgroup", {}).get("calls", 0))


@pytest.mark.parametrize(("poll_s", "most_reads"), [("0.25", 20), ("0", None)])
def test_a_worker_that_keeps_up_reads_the_stream_once_per_poll_interval_not_per_request(
    redis_url: str, stripe_server: FakeStripe, tmp_path: Path, poll_s: str, most_reads: int | None
) -> None:
    """Events trickling in one at a time (a busy gateway's usage records) are read and folded
    in batches, one per SWITCHYARD_BILLING_POLL_S, and every one is billed; with no pause the
    worker reads once per event."""
    r = redis.Redis.from_url(redis_url)
    worker = start_billing_worker(
        redis_url, stripe_server.url, tmp_path / "worker.log", SWITCHYARD_BILLING_POLL_S=poll_s
    )
    try:
        wait_for(lambda: bool(r.exists(STREAM)) and stream_reads(r) > 0, timeout=15)
        before = stream_reads(r)
        for i in range(80):
            add_event(r, f"trickle-{i}")
            time.sleep(0.02)
        wait_for(
            lambda: stripe_server.state.totals().get(("cus_a", "switchyard_input_tokens")) == 800,
            timeout=15,
        )
        reads = stream_reads(r) - before
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(10)
        r.close()
    assert stripe_server.state.totals()[("cus_a", "switchyard_output_tokens")] == 400
    if most_reads is not None:
        assert reads <= most_reads, reads  # ~1.6 s of events at 4 reads/s: 8 here
    else:
        assert reads >= 40, reads  # the control: a read per event, or nearly
