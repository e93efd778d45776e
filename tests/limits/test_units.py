"""The limiter's pure parts: GCRA arithmetic, header formatting, circuit breaker."""

from __future__ import annotations

import time

import pytest

from app.auth.keys import KeyRecord, Limits
from app.limits.breaker import CircuitBreaker
from app.limits.budgets import Budget, Plans, budgets_for, learned_key, lease_key
from app.limits.gcra import LocalLimiter, check
from app.limits.headers import duration, ratelimit_headers


def test_gcra_admits_a_full_burst_then_refuses() -> None:
    tat, now = 0.0, 1_000_000.0
    for i in range(10):
        verdict, tat = check(tat, now, limit=10, period_ms=60_000, cost=1)
        assert verdict.retry_ms == 0
        assert verdict.remaining == 9 - i
    verdict, _ = check(tat, now, limit=10, period_ms=60_000, cost=1)
    assert verdict.retry_ms == 6000  # one unit refills every 6 s
    assert verdict.reset_ms == 60_000


def test_gcra_refills_linearly() -> None:
    now = 0.0
    tat = now + 60_000  # empty bucket
    verdict, _ = check(tat, now + 6000, limit=10, period_ms=60_000, cost=1)
    assert verdict.retry_ms == 0


def test_gcra_cost_above_the_limit_never_fits() -> None:
    verdict, _ = check(0.0, 0.0, limit=100, period_ms=60_000, cost=101)
    assert verdict.retry_ms == -1


def test_local_limiter_divides_the_limit_among_replicas() -> None:
    limiter = LocalLimiter()
    budget = [Budget("k:r", 10, False, "key")]
    admitted = sum(limiter.admit(budget, 0, share=2)[0] for _ in range(20))
    assert admitted == 5


def test_local_limiter_refuses_all_budgets_together() -> None:
    limiter = LocalLimiter()
    budgets = [Budget("k:r", 100, False, "key"), Budget("k:t", 100, True, "key")]
    assert limiter.admit(budgets, 80, share=1)[0]
    assert not limiter.admit(budgets, 80, share=1)[0]
    # the refused request consumed nothing: requests budget still has 99
    assert limiter.admit([budgets[0]], 0, share=1)[1][0].remaining == 98


@pytest.mark.parametrize(
    ("ms", "text"),
    [
        (0, "0ms"),
        (250.2, "251ms"),
        (1000, "1s"),
        (1500, "1.5s"),
        (360_000, "6m0s"),
        (61_250, "1m1.25s"),
        (3_600_000, "1h0m0s"),
    ],
)
def test_durations_read_like_openai(ms: float, text: str) -> None:
    assert duration(ms) == text


def test_header_names() -> None:
    names = [k for k, _ in ratelimit_headers("tokens", 100, -3, 1200)]
    assert names == [
        b"x-ratelimit-limit-tokens",
        b"x-ratelimit-remaining-tokens",
        b"x-ratelimit-reset-tokens",
    ]
    assert dict(ratelimit_headers("tokens", 100, -3, 1200))[b"x-ratelimit-remaining-tokens"] == b"0"


def test_breaker_opens_after_threshold_and_probes_once() -> None:
    changes: list[bool] = []
    breaker = CircuitBreaker("t", threshold=2, cool_down_s=0.05, on_change=changes.append)
    breaker.failure("x")
    assert breaker.allow()
    breaker.failure("x")
    assert breaker.open and changes == [True]
    assert not breaker.allow()
    time.sleep(0.06)
    assert breaker.allow()  # the probe
    assert not breaker.allow()  # only one
    breaker.success()
    assert not breaker.open and changes == [True, False]
    assert breaker.allow()


def _record(**fields: object) -> KeyRecord:
    return KeyRecord.model_validate(
        {"id": "abcdefghijkm", "hash": "0" * 64, "customer": "cus_1", "created_at": 0.0, **fields}
    )


def test_a_plan_is_kept_while_its_record_and_customer_limits_are_the_same_objects() -> None:
    plans = Plans()
    record = _record(rpm=10, tpm=1000, model_limits={"m": {"rpm": 5}})
    customer = Limits(tpm=50_000)
    plan = plans.get(record, "m", customer)
    assert plan.budgets == budgets_for(record, "m", customer)
    assert plan.keys == (
        learned_key(record, "m"),
        lease_key(record),
        *(b.key for b in plan.budgets),
    )
    assert plan.limits == (10, 60_000, 0, 1000, 60_000, 1, 5, 60_000, 0, 50_000, 60_000, 1)
    assert plans.get(record, "m", customer) is plan
    # A refreshed record (the key cache replaces it) or customer limits: planned anew.
    changed = _record(rpm=20)
    assert plans.get(changed, "m", customer).limits[:3] == (20, 60_000, 0)
    assert plans.get(changed, "m", None).budgets == budgets_for(changed, "m", None)
    assert plans.get(record, "other", customer).budgets == budgets_for(record, "other", customer)
