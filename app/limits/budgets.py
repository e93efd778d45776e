"""Which budgets apply to a request, and where they live in Redis.

Every limiter key of a customer shares one hash tag, ``{<customer id>}``, so that the key's own
budgets, its per-model budgets and the customer's shared budget are decided by one Lua call on
one Redis Cluster slot (tagging by key id would put the customer budget on another slot).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from app.auth.keys import KeyRecord, Limits

PERIOD_MS = 60_000  # limits are per minute, like OpenAI's RPM / TPM

Scope = Literal["key", "model", "customer"]


@dataclass(frozen=True, slots=True)
class Budget:
    key: str
    limit: int
    tokens: bool  # False: counts requests; True: counts tokens
    scope: Scope
    period_ms: int = PERIOD_MS


def _prefix(customer: str) -> str:
    return f"sy:rl:{{{customer}}}"


def learned_key(record: KeyRecord, model: str) -> str:
    return f"{_prefix(record.customer)}:k:{record.id}:m:{model}:learned"


def lease_key(record: KeyRecord) -> str:
    return f"{_prefix(record.customer)}:k:{record.id}:leases"


def _pair(base: str, limits: Limits | None, scope: Scope) -> list[Budget]:
    if limits is None:
        return []
    out = []
    if limits.rpm:
        out.append(Budget(f"{base}:r", limits.rpm, False, scope))
    if limits.tpm:
        out.append(Budget(f"{base}:t", limits.tpm, True, scope))
    return out


def budgets_for(record: KeyRecord, model: str, customer: Limits | None) -> list[Budget]:
    """The key's budgets, its override for this model, and the customer's shared budgets."""
    p = _prefix(record.customer)
    override = (record.model_limits or {}).get(model)
    return [
        *_pair(f"{p}:k:{record.id}", Limits(rpm=record.rpm, tpm=record.tpm), "key"),
        *_pair(f"{p}:k:{record.id}:m:{model}", override, "model"),
        *_pair(f"{p}:c", customer, "customer"),
    ]
