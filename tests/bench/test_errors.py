"""Failures are counted by kind, and 429s apart from the other errors."""

from __future__ import annotations

from app.bench.workload import Key, Workload
from app.local.procs import free_port
from tests.bench.conftest import base_url, run
from tests.conftest import GatewayFactory, sim_config
from tests.support.procs import Proc


def test_429s_are_counted_as_rate_limited_not_as_errors(gateway_factory: GatewayFactory) -> None:
    gw = gateway_factory()
    tiny = gw.create_key(customer="cus_tiny", rpm=2)["key"]
    free = gw.create_key(customer="cus_free")["key"]
    workload = Workload("chat-small", keys=(Key(tiny), Key(free)))
    s = run(f"{gw.url}/v1", workload, concurrency=2, requests=30).summary
    assert s["error_count"] == 0
    assert s["errors"] == {}
    limited = s["per_key"][Key(tiny).label]
    assert limited["rate_limited"] >= 10
    assert limited["ok"] + limited["rate_limited"] == 15
    assert s["per_key"][Key(free).label]["ok"] == 15
    assert s["rate_limited"] == limited["rate_limited"]


def test_errors_are_counted_by_kind(bench_sim: Proc) -> None:
    sim_config(bench_sim, fail_rate=0.5)
    s = run(base_url(bench_sim), concurrency=4, requests=100).summary
    assert set(s["errors"]) == {"http_500"}
    assert 30 < s["errors"]["http_500"] < 70
    assert s["ok"] + s["errors"]["http_500"] == 100
    assert s["rate_limited"] == 0


def test_an_unreachable_url_is_a_connect_error() -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    s = run(url, rate=50.0, requests=5).summary
    assert s["errors"] == {"connect": 5}
    assert s["ok"] == 0
