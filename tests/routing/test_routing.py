"""Routing with real simulator processes: failover under load, ejection and readmission,
aliases and canaries (split, stickiness, the guard), queue- and prefix-aware picks, load
shedding and fallbacks that never widen a key's access."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.cli import main as cli
from tests.conftest import (
    ADMIN_TOKEN,
    GatewayFactory,
    GatewayServer,
    sim_config,
    sim_stats,
    start_simulator,
    wait_for,
)
from tests.support.procs import Proc, free_port

MSG = [{"role": "user", "content": "hi"}]

SimFactory = Callable[..., list[Proc]]


@pytest.fixture
def sims(logs_dir: Path) -> Iterator[SimFactory]:
    """Start private simulators (tests kill or reconfigure them); all stopped afterwards."""
    started: list[Proc] = []

    def make(model: str, n: int = 1, *args: str) -> list[Proc]:
        procs = [
            start_simulator(logs_dir, model, "--ttft-ms", "2", "--tokens-per-s", "0", *args)
            for _ in range(n)
        ]
        started.extend(procs)
        return procs

    yield make
    for p in started:
        p.stop()


def base(p: Proc) -> str:
    return p.url.removesuffix("/health")


def urls(procs: list[Proc]) -> list[str]:
    return [base(p) for p in procs]


def post(gw: GatewayServer, key: str, model: str, **body: Any) -> httpx.Response:
    return httpx.post(
        f"{gw.url}/v1/chat/completions",
        json={"model": model, "messages": MSG, "max_tokens": 2, **body},
        headers={"authorization": f"Bearer {key}"},
        timeout=20,
    )


def pool_view(gw: GatewayServer) -> dict[str, Any]:
    with gw.admin() as admin:
        view: dict[str, Any] = admin.get("/admin/pool").json()
    return view


def flood(proc: Proc, n: int, max_tokens: int) -> list[threading.Thread]:
    """Requests sent straight to a replica, as other gateways would: they queue there."""

    def one() -> None:
        with contextlib.suppress(httpx.HTTPError):  # the replica is stopped at teardown
            httpx.post(
                f"{base(proc)}/v1/chat/completions",
                json={"model": "m", "messages": MSG, "max_tokens": max_tokens},
                timeout=30,
            )

    threads = [threading.Thread(target=one, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    return threads


# -- failover and ejection -------------------------------------------------------------------


def test_killing_a_replica_under_load_fails_no_request(
    gateway_factory: GatewayFactory, sims: SimFactory
) -> None:
    pair = sims("m", 2, "--tokens-per-s", "200")
    gw = gateway_factory(catalog={"models": [{"name": "m", "endpoints": urls(pair)}]})
    key = gw.create_key()["key"]
    done = threading.Event()

    def worker() -> list[int]:
        statuses = []
        with httpx.Client(timeout=20) as c:
            while not done.is_set():
                r = c.post(
                    f"{gw.url}/v1/chat/completions",
                    json={"model": "m", "messages": MSG, "max_tokens": 8},
                    headers={"authorization": f"Bearer {key}"},
                )
                statuses.append(r.status_code)
        return statuses

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(worker) for _ in range(8)]
        wait_for(lambda: sim_stats(pair[0])["finished"] >= 20, timeout=10)
        pair[0].kill()  # mid-generation for some requests
        time.sleep(1.0)
        done.set()
        statuses = [s for f in futures for s in f.result()]
    assert len(statuses) > 40
    assert set(statuses) == {200}


def test_a_replica_answering_500s_is_ejected_then_readmitted_after_its_cool_down(
    gateway_factory: GatewayFactory, sims: SimFactory
) -> None:
    pair = sims("m", 2)
    sim_config(pair[0], fail_rate=1.0)
    gw = gateway_factory(
        catalog={"models": [{"name": "m", "endpoints": urls(pair)}]}, eject_for_s=1.0
    )
    key = gw.create_key()["key"]
    for _ in range(6):
        assert post(gw, key, "m").status_code == 200
    assert sim_stats(pair[0])["failed"] == 3
    bad = pool_view(gw)["models"][0]["replicas"][0]
    assert not bad["available"] and bad["ejections"] == 1

    sim_config(pair[0], fail_rate=0.0)  # it recovers
    wait_for(lambda: pool_view(gw)["models"][0]["replicas"][0]["available"], timeout=3)
    for _ in range(6):
        assert post(gw, key, "m").status_code == 200
    assert sim_stats(pair[0])["finished"] >= 2, "readmitted and serving again"
    assert not pool_view(gw)["models"][0]["replicas"][0]["probation"]


# -- aliases and canaries --------------------------------------------------------------------


def alias_catalog(
    stable: list[Proc], canary: list[Proc], weights: tuple[float, float], **alias: Any
) -> dict[str, Any]:
    return {
        "models": [
            {"name": "stable", "endpoints": urls(stable)},
            {"name": "canary", "endpoints": urls(canary)},
        ],
        "aliases": [
            {
                "name": "chat",
                "targets": [
                    {"model": "stable", "weight": weights[0]},
                    {"model": "canary", "weight": weights[1]},
                ],
                **alias,
            }
        ],
    }


def test_an_alias_routes_to_both_targets_and_metrics_carry_the_target(
    gateway_factory: GatewayFactory, sims: SimFactory
) -> None:
    stable, canary = sims("stable"), sims("canary")
    gw = gateway_factory(catalog=alias_catalog(stable, canary, (50, 50)))
    key = gw.create_key(models=["chat"])["key"]  # the alias alone is enough
    served = [post(gw, key, "chat").json()["model"] for _ in range(40)]
    assert set(served) == {"stable", "canary"}
    text = httpx.get(f"{gw.url}/metrics").text
    assert 'model="chat",status="200",target="canary"' in text.replace(
        'endpoint="/v1/chat/completions",', ""
    )


def test_an_alias_is_listed_as_a_model_for_keys_allowed_it(
    gateway_factory: GatewayFactory, sims: SimFactory
) -> None:
    stable, canary = sims("stable"), sims("canary")
    gw = gateway_factory(catalog=alias_catalog(stable, canary, (95, 5)))
    client = gw.client(gw.create_key(models=["chat"])["key"])
    assert [m.id for m in client.models.list()] == ["chat"]
    assert client.models.retrieve("chat").id == "chat"
    other = gw.client(gw.create_key(models=["stable"])["key"])
    assert [m.id for m in other.models.list()] == ["stable"]


def test_a_key_must_be_allowed_the_alias(gateway_factory: GatewayFactory, sims: SimFactory) -> None:
    stable, canary = sims("stable"), sims("canary")
    gw = gateway_factory(catalog=alias_catalog(stable, canary, (50, 50)))
    key = gw.create_key(models=["stable", "canary"])["key"]
    r = post(gw, key, "chat")
    assert r.status_code == 403 and r.json()["error"]["code"] == "model_not_allowed"


def test_a_sticky_alias_keeps_a_key_on_one_target(
    gateway_factory: GatewayFactory, sims: SimFactory
) -> None:
    stable, canary = sims("stable"), sims("canary")
    gw = gateway_factory(catalog=alias_catalog(stable, canary, (50, 50), sticky=True))
    seen_per_key = []
    for _ in range(6):
        key = gw.create_key()["key"]
        seen_per_key.append({post(gw, key, "chat").json()["model"] for _ in range(8)})
    assert all(len(seen) == 1 for seen in seen_per_key)


def test_an_alias_target_without_replicas_hands_over_to_the_other_targets(
    gateway_factory: GatewayFactory, sims: SimFactory
) -> None:
    stable = sims("stable")
    catalog = alias_catalog(stable, [], (50, 50))
    catalog["models"][1]["endpoints"] = [f"http://127.0.0.1:{free_port()}"]  # canary is down
    gw = gateway_factory(catalog=catalog)
    key = gw.create_key(models=["chat"])["key"]
    assert {post(gw, key, "chat").status_code for _ in range(20)} == {200}
    assert sim_stats(stable[0])["finished"] == 20


def test_a_failing_canary_is_rolled_back_by_the_guard(
    gateway_factory: GatewayFactory, sims: SimFactory
) -> None:
    stable, canary = sims("stable"), sims("canary")
    sim_config(canary[0], fail_rate=0.5)
    guard = {"window_s": 30, "min_requests": 10, "max_error_ratio": 2, "error_margin": 0.05}
    gw = gateway_factory(
        catalog=alias_catalog(stable, canary, (50, 50), guard=guard),
        eject_after_failures=100,  # the guard must act, not the ejection
        upstream_retries=0,
        canary_guard_interval_s=0.1,
    )
    key = gw.create_key()["key"]
    for _ in range(40):
        post(gw, key, "chat")
    wait_for(lambda: pool_view(gw)["aliases"][0]["targets"][1]["rolled_back"], timeout=3)
    before = sim_stats(canary[0])["received"]
    assert all(post(gw, key, "chat").json()["model"] == "stable" for _ in range(20))
    assert sim_stats(canary[0])["received"] == before
    text = httpx.get(f"{gw.url}/metrics").text
    assert 'switchyard_canary_rollbacks_total{split="chat",target="canary"} 1.0' in text
    assert 'switchyard_canary_weight{split="chat",target="canary"} 0.0' in text


def test_a_slow_model_canary_is_rolled_back_by_the_guard(
    gateway_factory: GatewayFactory, sims: SimFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    stable, slow = sims("m"), sims("m")
    sim_config(slow[0], ttft_ms=150)
    canary = {
        "revision": "v2",
        "traffic_percent": 50,
        "endpoints": urls(slow),
        "guard": {"min_requests": 5, "max_ttft_ratio": 2, "ttft_margin_ms": 20},
    }
    gw = gateway_factory(
        catalog={"models": [{"name": "m", "endpoints": urls(stable), "canary": canary}]},
        canary_guard_interval_s=0.1,
    )
    client = gw.client(gw.create_key()["key"])
    for _ in range(24):
        list(
            client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=2, stream=True
            )
        )
    wait_for(lambda: pool_view(gw)["models"][0]["split"]["targets"][1]["rolled_back"], timeout=3)
    text = httpx.get(f"{gw.url}/metrics").text
    assert 'target="m@v2"' in text  # TTFT and requests of the canary are labelled
    before = sim_stats(slow[0])["received"]
    for _ in range(10):
        client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
    assert sim_stats(slow[0])["received"] == before
    assert cli(["pool", "--url", gw.url, "--token", ADMIN_TOKEN]) == 0
    table = capsys.readouterr().out
    assert "m@v2 50 -> 0 (rolled back by the guard)" in table
    assert "(canary)" in table and "least_outstanding" in table
    with gw.admin() as admin:
        assert admin.post("/admin/pool/splits/m/reset").status_code == 200
    assert not pool_view(gw)["models"][0]["split"]["targets"][1]["rolled_back"]


# -- load-aware strategies and shedding ------------------------------------------------------


def test_queue_aware_routing_avoids_the_replica_with_a_long_queue(
    gateway_factory: GatewayFactory, sims: SimFactory
) -> None:
    pair = sims("m", 2, "--max-num-seqs", "1", "--tokens-per-s", "50")
    gw = gateway_factory(
        catalog={"models": [{"name": "m", "endpoints": urls(pair), "routing": "queue_aware"}]},
        load_scrape_interval_s=0.1,
    )
    key = gw.create_key()["key"]
    flood(pair[0], 4, max_tokens=100)  # 1 running, 3 waiting for ~6 s
    wait_for(lambda: pool_view(gw)["models"][0]["replicas"][0]["waiting"] >= 2, timeout=3)
    before = sim_stats(pair[0])["received"]
    for _ in range(8):
        assert post(gw, key, "m").status_code == 200
    assert sim_stats(pair[0])["received"] == before
    assert sim_stats(pair[1])["finished"] == 8


def test_prefix_aware_routing_sends_a_shared_prefix_to_one_replica(
    gateway_factory: GatewayFactory, sims: SimFactory
) -> None:
    trio = sims("m", 3)
    gw = gateway_factory(
        catalog={"models": [{"name": "m", "endpoints": urls(trio), "routing": "prefix_aware"}]}
    )
    key = gw.create_key()["key"]
    homes = set()
    for group in range(6):
        system = f"You are support agent {group} for the switchyard. " * 20
        before = [sim_stats(s)["received"] for s in trio]
        for q in range(5):
            messages = [
                {"role": "system", "content": system},
                {"role": "user", "content": f"question {q}"},
            ]
            assert post(gw, key, "m", messages=messages).status_code == 200
        delta = [sim_stats(s)["received"] - b for s, b in zip(trio, before, strict=True)]
        assert sorted(delta) == [0, 0, 5], "the whole group on one replica"
        homes.add(delta.index(5))
    assert len(homes) >= 2, "different prefixes spread over the replicas"


def test_load_shedding_answers_503_with_retry_after_when_every_queue_is_long(
    gateway_factory: GatewayFactory, sims: SimFactory
) -> None:
    pair = sims("m", 2, "--max-num-seqs", "1", "--tokens-per-s", "50")
    gw = gateway_factory(
        catalog={"models": [{"name": "m", "endpoints": urls(pair), "shed_waiting": 1}]},
        load_scrape_interval_s=0.1,
    )
    key = gw.create_key()["key"]
    for p in pair:
        flood(p, 4, max_tokens=100)
    wait_for(
        lambda: all(r["waiting"] > 1 for r in pool_view(gw)["models"][0]["replicas"]), timeout=10
    )
    t0 = time.perf_counter()
    r = post(gw, key, "m")
    assert time.perf_counter() - t0 < 0.5, "answered at once, not queued"
    assert r.status_code == 503
    assert r.headers["retry-after"] == "1"
    assert r.json()["error"]["code"] == "model_overloaded"
    assert 'switchyard_shed_requests_total{model="m"} 1.0' in httpx.get(f"{gw.url}/metrics").text


# -- fallbacks -------------------------------------------------------------------------------


def fallback_catalog(backup: list[Proc]) -> dict[str, Any]:
    dead = f"http://127.0.0.1:{free_port()}"
    return {
        "models": [
            {"name": "primary", "endpoints": [dead], "fallbacks": ["backup"]},
            {"name": "backup", "endpoints": urls(backup)},
        ]
    }


def test_a_model_without_replicas_is_served_by_its_fallback(
    gateway_factory: GatewayFactory, sims: SimFactory
) -> None:
    backup = sims("backup")
    gw = gateway_factory(catalog=fallback_catalog(backup))
    key = gw.create_key(models=["primary", "backup"])["key"]
    r = post(gw, key, "primary")
    assert r.status_code == 200 and r.json()["model"] == "backup"


def test_a_fallback_the_key_may_not_use_is_never_used(
    gateway_factory: GatewayFactory, sims: SimFactory
) -> None:
    backup = sims("backup")
    gw = gateway_factory(catalog=fallback_catalog(backup))
    key = gw.create_key(models=["primary"])["key"]
    r = post(gw, key, "primary")
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "no_healthy_upstream"
    assert sim_stats(backup[0])["received"] == 0


def test_replicas_behind_a_dns_name_serve_requests(
    gateway_factory: GatewayFactory, sims: SimFactory
) -> None:
    sim = sims("m")[0]
    port = base(sim).rsplit(":", 1)[1]
    gw = gateway_factory(
        catalog={"models": [{"name": "m", "endpoints": [f"dns+http://localhost:{port}"]}]}
    )
    key = gw.create_key()["key"]
    assert post(gw, key, "m").status_code == 200
    replicas = pool_view(gw)["models"][0]["replicas"]
    assert {"url": f"http://127.0.0.1:{port}", "available": True}.items() <= next(
        r for r in replicas if "127.0.0.1" in r["url"]
    ).items()
