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


@dataclass(frozen=True, slots=True)
class Plan:
    """A key's budgets for one model, with what its admit.lua call takes that does not change
    from request to request."""

    budgets: list[Budget]
    keys: tuple[str, ...]  # the learned estimate, the leases, then each budget's counter
    limits: tuple[int, ...]  # per budget: limit, period (ms), 1 if it counts tokens


class Plans:
    """Plans per (key, model), kept while the key's record and its customer's limits are the
    same objects: the caches that hold those replace them when they refresh (at least once a
    second), so a changed limit is planned anew and an unchanged one costs no formatting."""

    def __init__(self, max_entries: int = 100_000) -> None:
        self._plans: dict[tuple[str, str], tuple[KeyRecord, Limits | None, Plan]] = {}
        self._max = max_entries

    def get(self, record: KeyRecord, model: str, customer: Limits | None) -> Plan:
        hit = self._plans.get((record.id, model))
        if hit is not None and hit[0] is record and hit[1] is customer:
            return hit[2]
        budgets = budgets_for(record, model, customer)
        plan = Plan(
            budgets,
            (learned_key(record, model), lease_key(record), *(b.key for b in budgets)),
            tuple(x for b in budgets for x in (b.limit, b.period_ms, int(b.tokens))),
        )
        if len(self._plans) >= self._max:
            self._plans.clear()
        self._plans[(record.id, model)] = (record, customer, plan)
        return plan
