"""The same GCRA as admit.lua, in process: the fail-open fallback while Redis is away.

Each gateway process then enforces ``limit / share`` (its fair share among the gateway
replicas last seen alive), so N replicas together still admit about the configured limit.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from app.limits.budgets import Budget


@dataclass(frozen=True, slots=True)
class Verdict:
    remaining: int
    reset_ms: int
    retry_ms: int  # 0 = admitted now, -1 = never (cost above the limit)


def check(
    tat: float, now: float, limit: float, period_ms: float, cost: float
) -> tuple[Verdict, float]:
    """One budget's verdict and the TAT it would have if the request is admitted."""
    interval = period_ms / limit
    tat = max(tat, now)
    new_tat = tat + cost * interval
    if cost > limit:
        return Verdict(
            math.floor((period_ms - (tat - now)) / interval), math.ceil(tat - now), -1
        ), new_tat
    if new_tat - now > period_ms:
        return Verdict(
            math.floor((period_ms - (tat - now)) / interval),
            math.ceil(tat - now),
            math.ceil(new_tat - now - period_ms),
        ), new_tat
    return Verdict(
        math.floor((period_ms - (new_tat - now)) / interval), math.ceil(new_tat - now), 0
    ), new_tat


class LocalLimiter:
    """In-memory budgets of one process, same semantics as the Redis script."""

    def __init__(self, max_keys: int = 100_000) -> None:
        self._tats: dict[str, float] = {}
        self._max = max_keys

    @staticmethod
    def _now() -> float:
        return time.monotonic() * 1000

    def admit(self, budgets: list[Budget], reserved: int, share: int) -> tuple[bool, list[Verdict]]:
        now = self._now()
        verdicts: list[Verdict] = []
        new_tats: list[float] = []
        for b in budgets:
            limit = max(1.0, b.limit / max(1, share))
            verdict, new_tat = check(
                self._tats.get(b.key, now), now, limit, b.period_ms, reserved if b.tokens else 1
            )
            verdicts.append(verdict)
            new_tats.append(new_tat)
        allowed = all(v.retry_ms == 0 for v in verdicts)
        if allowed:
            if len(self._tats) > self._max:
                self._tats = {k: t for k, t in self._tats.items() if t > now}
            for b, tat in zip(budgets, new_tats, strict=True):
                self._tats[b.key] = tat
        return allowed, verdicts

    def settle(self, budgets: list[Budget], delta: int, share: int) -> None:
        now = self._now()
        for b in budgets:
            if not b.tokens or b.key not in self._tats:
                continue
            limit = max(1.0, b.limit / max(1, share))
            self._tats[b.key] = max(now, self._tats[b.key] + delta * b.period_ms / limit)
