"""Routing pieces on their own: splits, the guard, strategies, load parsing, the catalogue."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest

from app.catalog import CanaryGuard, CatalogError, parse_catalog
from app.routing.canary import Split, SplitTarget, Window, WindowStats, breach, pick_weighted
from app.routing.load import parse_engine_load
from app.routing.pool import ModelPool, Replica
from app.routing.strategies import (
    LeastOutstanding,
    PrefixAware,
    QueueAware,
    RequestInfo,
    RoundRobin,
    prompt_prefix,
)

T = TypeVar("T")


def split_95_5(sticky: bool = False, guard: CanaryGuard | None = None) -> Split:
    return Split(
        "chat",
        [SplitTarget("stable", 95, "stable"), SplitTarget("canary", 5, "canary")],
        sticky=sticky,
        guard=guard,
    )


def test_a_95_5_split_over_10000_requests_lands_within_one_point() -> None:
    split = split_95_5()
    split._rng.seed(7)
    canary = sum(split.choose().label == "canary" for _ in range(10_000))
    assert abs(canary / 10_000 - 0.05) <= 0.01


def test_a_sticky_95_5_split_over_10000_keys_lands_within_one_point() -> None:
    split = split_95_5(sticky=True)
    canary = sum(split.choose(f"key_{i}").label == "canary" for i in range(10_000))
    assert abs(canary / 10_000 - 0.05) <= 0.01


def test_a_sticky_split_keeps_each_key_on_one_target() -> None:
    split = split_95_5(sticky=True)
    for i in range(200):
        assert len({split.choose(f"key_{i}").label for _ in range(20)}) == 1


def test_weights_are_cumulative_intervals() -> None:
    targets = [SplitTarget("a", 1, "a"), SplitTarget("b", 0, "b"), SplitTarget("c", 3, "c")]
    assert pick_weighted(targets, 0.0).label == "a"
    assert pick_weighted(targets, 0.2499).label == "a"
    assert pick_weighted(targets, 0.25).label == "c"
    assert pick_weighted(targets, 0.9999).label == "c"


def test_a_rolled_back_canary_gets_no_traffic_and_a_reset_restores_it() -> None:
    split = split_95_5()
    split.targets[1].rolled_back = True
    assert all(split.choose().label == "stable" for _ in range(1000))
    split.reset()
    assert any(split.choose().label == "canary" for _ in range(1000))


def test_the_guard_rolls_back_a_canary_with_more_errors() -> None:
    guard = CanaryGuard(window_s=60, min_requests=20, max_error_ratio=2, error_margin=0.02)
    split = split_95_5(guard=guard)
    stable, canary = (t.window for t in split.targets)
    assert stable is not None and canary is not None
    for i in range(100):
        stable.add(i % 50 == 0, 0.01)  # 2 % errors
    for i in range(19):
        canary.add(i % 2 == 0, 0.01)
    assert split.check() == [], "too few canary requests to judge"
    canary.add(True, 0.01)
    rolled = split.check()
    assert [t.label for t, _ in rolled] == ["canary"]
    assert "error rate" in rolled[0][1]
    assert split.targets[1].effective_weight == 0


def test_the_guard_compares_p95_time_to_first_byte() -> None:
    guard = CanaryGuard(min_requests=5, max_ttft_ratio=2, ttft_margin_ms=10)
    ok = breach(guard, WindowStats(50, 0.0, 0.100), WindowStats(50, 0.0, 0.205))
    assert ok is None
    bad = breach(guard, WindowStats(50, 0.0, 0.100), WindowStats(50, 0.0, 0.250))
    assert bad is not None and "p95" in bad


def test_a_window_forgets_what_is_older_than_its_span() -> None:
    w = Window(10)
    now = time.monotonic()
    w.add(True, 1.0, now - 11)
    w.add(False, 0.5, now - 1)
    stats = w.stats(now)
    assert (stats.requests, stats.error_rate, stats.p95_ttfb_s) == (1, 0.0, 0.5)


def replicas(n: int) -> list[Replica]:
    return [Replica(f"http://10.0.0.{i}:8000") for i in range(n)]


def test_round_robin_cycles() -> None:
    rs, rr = replicas(3), RoundRobin()
    assert [rr.pick(rs, None) for _ in range(6)] == rs + rs


def test_least_outstanding_prefers_the_idle_replica() -> None:
    rs = replicas(3)
    rs[0].outstanding, rs[1].outstanding, rs[2].outstanding = 4, 1, 3
    assert LeastOutstanding().pick(rs, None) is rs[1]


def test_queue_aware_avoids_the_replica_with_a_queue() -> None:
    rs = replicas(2)
    rs[0].waiting = 12  # other gateways' load, invisible to outstanding
    strategy = QueueAware()
    assert {strategy.pick(rs, None).url for _ in range(10)} == {rs[1].url}  # type: ignore[union-attr]


def chat(system: str, user: str) -> dict[str, object]:
    return {"messages": [{"role": "system", "content": system}, {"role": "user", "content": user}]}


def test_prefix_aware_sends_a_shared_prefix_to_one_replica() -> None:
    rs, strategy = replicas(4), PrefixAware(busy_slack=4)
    systems = [f"You are assistant number {i}. " * 30 for i in range(20)]
    homes = []
    for s in systems:
        picks = {strategy.pick(rs, RequestInfo("k", chat(s, f"q{j}"), 512)) for j in range(5)}
        assert len(picks) == 1
        homes.append(picks.pop())
    assert len({id(h) for h in homes}) >= 3, "prefixes spread over the replicas"


def test_prefix_aware_leaves_a_busy_replica_for_the_least_loaded() -> None:
    rs, strategy = replicas(2), PrefixAware(busy_slack=2)
    info = RequestInfo("k", chat("shared " * 100, "q"), 512)
    home = strategy.pick(rs, info)
    assert home is not None
    home.outstanding = 2
    other = strategy.pick(rs, info)
    assert other is not home
    home.outstanding = 1
    assert strategy.pick(rs, info) is home


def test_prefix_mapping_survives_losing_another_replica() -> None:
    rs, strategy = replicas(4), PrefixAware()
    infos = [RequestInfo("k", {"prompt": f"prefix {i} " * 20}, 512) for i in range(50)]
    before = [strategy.pick(rs, i) for i in infos]
    lost = rs[3]
    after = [strategy.pick(rs[:3], i) for i in infos]
    moved = [b is not a for b, a in zip(before, after, strict=True) if b is not lost]
    assert not any(moved), "only the lost replica's prefixes move"


def test_prompt_prefix_reads_chat_parts_and_completions() -> None:
    payload = {"messages": [{"role": "user", "content": [{"type": "text", "text": "abc"}]}]}
    assert "abc" in prompt_prefix(payload, 100)
    assert prompt_prefix({"prompt": "x" * 50}, 16) == "x" * 16


def test_a_pool_only_offers_available_replicas() -> None:
    pool = ModelPool(parse_catalog({"models": [{"name": "m"}]}).models[0], replicas(2))
    pool.replicas[0].ejected_until = time.monotonic() + 60
    assert {pool.pick() for _ in range(5)} == {pool.replicas[1]}
    pool.replicas[1].healthy = False
    assert pool.pick() is None


def test_a_replica_on_probation_is_ejected_by_its_first_failure() -> None:
    r = Replica("http://10.0.0.1:8000", eject_after=3, eject_for_s=0.01)
    for _ in range(3):
        r.record_failure()
    assert not r.available(time.monotonic()) and r.probation
    time.sleep(0.02)
    assert r.available(time.monotonic())
    r.record_failure()
    assert not r.available(time.monotonic()), "back from cool-down: one failure ejects again"
    time.sleep(0.02)
    r.record_success()
    r.record_failure()
    assert r.available(time.monotonic()), "a success ends the probation"


def test_engine_load_parsing_sums_label_sets() -> None:
    text = (
        "# HELP vllm:num_requests_waiting Number of requests waiting.\n"
        "# TYPE vllm:num_requests_waiting gauge\n"
        'vllm:num_requests_waiting{model_name="a"} 3.0\n'
        'vllm:num_requests_waiting{model_name="b"} 2.0\n'
        'vllm:num_requests_running{model_name="a"} 7.0\n'
        "vllm:kv_cache_usage_perc 0.25\n"
        'vllm:num_requests_waiting_other{model_name="a"} 100.0\n'
    )
    load = parse_engine_load(text)
    assert (load.waiting, load.running, load.kv_usage) == (5, 7, 0.25)
    assert parse_engine_load("garbage\n") == parse_engine_load("")


def test_the_catalogue_checks_aliases() -> None:
    base = [{"name": "a"}, {"name": "b"}, {"name": "e", "kind": "embedding"}]
    ok = parse_catalog(
        {"models": base, "aliases": [{"name": "chat", "targets": [{"model": "a", "weight": 95}]}]}
    )
    assert ok.alias("chat") is not None and ok.alias("a") is None
    bad = {
        "targets unknown model": [{"name": "x", "targets": [{"model": "zz", "weight": 1}]}],
        "clashes": [{"name": "a", "targets": [{"model": "b", "weight": 1}]}],
        "mixes": [
            {"name": "x", "targets": [{"model": "a", "weight": 1}, {"model": "e", "weight": 1}]}
        ],
        "must not all be 0": [{"name": "x", "targets": [{"model": "a", "weight": 0}]}],
        "twice": [
            {"name": "x", "targets": [{"model": "a", "weight": 1}, {"model": "a", "weight": 1}]}
        ],
    }
    for message, aliases in bad.items():
        with pytest.raises(CatalogError, match=message):
            parse_catalog({"models": base, "aliases": aliases})


def test_the_minimal_catalogue_still_works() -> None:
    cat = parse_catalog(
        {"models": [{"name": "chat-small", "endpoints": ["http://127.0.0.1:9001"]}]}
    )
    spec = cat.models[0]
    assert spec.routing is None and spec.shed_waiting is None and cat.aliases == ()


def test_strategies_are_seeded_independently() -> None:
    random.seed(1)  # the split's draw uses its own RNG, untouched by the global one
    assert split_95_5()._rng is not split_95_5()._rng


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run on a private loop: asyncio.run would unset the thread's current loop, which other
    suites (Pulumi's mocks) rely on."""
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


def test_dns_endpoints_are_resolved_and_refreshed_without_a_restart() -> None:
    import aiohttp

    from app.metrics import GatewayMetrics
    from app.routing.pool import Router
    from app.settings import Settings
    from tests.support.procs import free_port

    static = f"http://127.0.0.1:{free_port()}"
    a, b = (f"http://127.0.0.1:{free_port()}" for _ in range(2))
    settings = Settings(
        catalog={"models": [{"name": "m", "endpoints": [static, "dns+http://m.svc:8000"]}]}
    )
    router = Router(settings.catalog, GatewayMetrics(), settings)
    answers: list[list[str] | OSError] = [[a, b], [b], OSError("SERVFAIL")]

    async def fake_resolve(url: str) -> list[str]:
        assert url == "dns+http://m.svc:8000"
        answer = answers.pop(0)
        if isinstance(answer, OSError):
            raise answer
        return answer

    router.resolver = fake_resolve
    pool = router.pools["m"]

    async def scenario() -> None:
        async with aiohttp.ClientSession() as session:
            await router.discover_all(session)
            assert [r.url for r in pool.replicas] == [static, a, b]
            assert not pool.replicas[1].healthy, "checked before joining (nothing listens)"
            kept = pool.replicas[2]
            await router.discover_all(session)
            assert [r.url for r in pool.replicas] == [static, b]
            assert pool.replicas[1] is kept, "a replica that stays keeps its state"
            await router.discover_all(session)
            assert [r.url for r in pool.replicas] == [static, b], "a failed lookup changes nothing"

    run(scenario())


def test_dns_resolution_expands_a_name_into_replica_urls() -> None:
    from app.routing.discovery import resolve

    urls = run(resolve("dns+http://localhost:8123/v1/"))
    assert "http://127.0.0.1:8123/v1" in urls
