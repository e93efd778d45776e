"""The sender against a local Stripe stand-in: what each answer means for a meter event."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from app.billing.stripe_sender import StripeSender, identifier
from tests.support.fake_stripe import FakeStripe, Fault


@pytest.fixture
def stripe_server() -> Iterator[FakeStripe]:
    with FakeStripe() as server:
        yield server


def sender(server: FakeStripe) -> StripeSender:
    return StripeSender("sk_test_123", server.url, timeout_s=2)


def test_accepted_event_arrives_form_encoded(stripe_server: FakeStripe) -> None:
    ident = identifier(1_700_000_000, "cus_1", "tokens_in")
    import time

    result = sender(stripe_server).send("tokens_in", "cus_1", 42, ident, int(time.time()))
    assert result.outcome == "sent"
    event = stripe_server.state.accepted[ident]
    assert (event["customer"], event["event_name"], event["value"]) == ("cus_1", "tokens_in", 42)
    assert len(ident) <= 100


def test_a_resend_is_deduplicated_and_counts_as_sent(stripe_server: FakeStripe) -> None:
    import time

    s = sender(stripe_server)
    ident = identifier(1, "cus_1", "m")
    assert s.send("m", "cus_1", 5, ident, int(time.time())).outcome == "sent"
    again = s.send("m", "cus_1", 5, ident, int(time.time()))
    assert again.outcome == "sent"
    assert stripe_server.state.duplicates == 1
    assert stripe_server.state.totals() == {("cus_1", "m"): 5}


@pytest.mark.parametrize(
    ("fault", "retry_after"),
    [
        (Fault("500"), None),
        (Fault("429"), None),
        (Fault("429-retry-after"), 1.0),
        (Fault("drop"), None),
    ],
)
def test_transient_failures_are_retried(
    stripe_server: FakeStripe, fault: Fault, retry_after: float | None
) -> None:
    import time

    stripe_server.state.faults.append(fault)
    result = sender(stripe_server).send("m", "cus_1", 5, "sy-1-a", int(time.time()))
    assert result.outcome == "retry"
    assert result.retry_after_s == retry_after
    assert stripe_server.state.accepted == {}


def test_slow_answer_times_out_as_retry(stripe_server: FakeStripe) -> None:
    import time

    stripe_server.state.faults.append(Fault("slow", 3.0))
    result = StripeSender("sk_test_1", stripe_server.url, timeout_s=0.5).send(
        "m", "cus_1", 5, "sy-1-b", int(time.time())
    )
    assert result.outcome == "retry"


@pytest.mark.parametrize("what", ["customer", "meter"])
def test_permanent_errors_are_dead_letters(stripe_server: FakeStripe, what: str) -> None:
    import time

    stripe_server.state.customers = {"cus_known"}
    stripe_server.state.meters = {"m"}
    customer, meter = ("cus_ghost", "m") if what == "customer" else ("cus_known", "nope")
    result = sender(stripe_server).send(meter, customer, 5, "sy-1-c", int(time.time()))
    assert result.outcome == "dead"
    assert "resource_missing" in result.detail
