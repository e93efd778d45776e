"""Sending one aggregated meter event to Stripe, and deciding what a failure means.

Uses the official ``stripe`` package (``StripeClient`` with its base address from
``SWITCHYARD_STRIPE_API_BASE``). Its own retries are off: 429s (which stripe-python does not
retry) and everything else are retried by the worker with backoff, so one policy covers all.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Literal

import stripe

Outcome = Literal["sent", "retry", "dead"]
IDENTIFIER_PREFIX = "sy"


def identifier(window_start: int, customer: str, meter: str) -> str:
    """Deterministic, <= 100 characters: a resend of the same total is deduplicated."""
    digest = hashlib.sha256(f"{customer}\t{meter}".encode()).hexdigest()[:24]
    return f"{IDENTIFIER_PREFIX}-{window_start}-{digest}"


@dataclass(frozen=True)
class Result:
    outcome: Outcome
    detail: str = ""
    retry_after_s: float | None = None


class StripeSender:
    def __init__(self, api_key: str, api_base: str, timeout_s: float = 10.0) -> None:
        self._client = stripe.StripeClient(
            api_key,
            base_addresses={"api": api_base},
            max_network_retries=0,
            http_client=stripe.new_default_http_client(timeout=timeout_s),
        )

    def send(
        self, event_name: str, customer: str, value: int, ident: str, timestamp: int
    ) -> Result:
        try:
            self._client.v1.billing.meter_events.create(
                params={
                    "event_name": event_name,
                    "payload": {"stripe_customer_id": customer, "value": str(value)},
                    "identifier": ident,
                    "timestamp": timestamp,
                }
            )
        except stripe.RateLimitError as exc:
            return Result("retry", "429 rate limited", _retry_after(exc))
        except stripe.InvalidRequestError as exc:
            if _already_recorded(exc):
                return Result("sent", "duplicate identifier: already recorded by Stripe")
            return Result("dead", f"{exc.http_status} {exc.code or ''} {exc.user_message or ''}")
        except stripe.AuthenticationError as exc:
            return Result("retry", f"authentication failed ({exc.http_status}); check the key")
        except stripe.PermissionError as exc:
            return Result("dead", f"permission denied: {exc.user_message or ''}")
        except stripe.APIConnectionError as exc:
            return Result("retry", f"connection error: {type(exc).__name__}")
        except stripe.StripeError as exc:  # 5xx and anything unexpected: try again later
            status = getattr(exc, "http_status", None)
            return Result("retry", f"stripe error {status}", _retry_after(exc))
        return Result("sent")


def _already_recorded(exc: stripe.StripeError) -> bool:
    message = (exc.user_message or str(exc) or "").lower()
    return exc.code == "resource_already_exists" or (
        "identifier" in message and "already" in message
    )


def _retry_after(exc: stripe.StripeError) -> float | None:
    headers = exc.headers or {}
    value = headers.get("retry-after") or headers.get("Retry-After")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def backoff(attempt: int, base_s: float = 0.5, cap_s: float = 300.0) -> float:
    """Exponential backoff with full jitter."""
    return random.uniform(0, min(cap_s, base_s * 2**attempt))
