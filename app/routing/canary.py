"""Traffic splits between versions, and the guard that rolls a bad canary back.

Two kinds of split share this code: an alias (a public name split by weight between catalogue
models, ``aliases:`` in the catalogue) and a model's own canary (``canary.endpoints`` with
``canary.traffic_percent``: the gateway splits the model's traffic between its stable and its
canary replicas, as KServe would in Knative mode). The first target of a split is the stable one.

The choice is a weighted draw: uniform for each request, or, when sticky, a hash of the key id
and the split's name, so one key always lands on the same target while the weights stay put.
The guard only reads per-target sliding windows filled in when requests finish; it runs in a
background task, never on the request path.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from app.catalog import CanaryGuard

if TYPE_CHECKING:
    from app.routing.pool import ModelPool

log = logging.getLogger(__name__)

_WINDOW_MAX = 100_000  # observations kept per target, whatever the rate


class Window:
    """Recent outcomes of one target: (monotonic time, failed, seconds to first byte)."""

    def __init__(self, span_s: float) -> None:
        self.span_s = span_s
        self._items: deque[tuple[float, bool, float]] = deque(maxlen=_WINDOW_MAX)

    def add(self, failed: bool, ttfb_s: float, now: float | None = None) -> None:
        self._items.append((time.monotonic() if now is None else now, failed, ttfb_s))

    def stats(self, now: float | None = None) -> WindowStats:
        now = time.monotonic() if now is None else now
        items = self._items
        while items and items[0][0] < now - self.span_s:
            items.popleft()
        n = len(items)
        if n == 0:
            return WindowStats(0, 0.0, 0.0)
        errors = sum(1 for _, failed, _ in items if failed)
        ttfbs = sorted(t for _, failed, t in items if not failed)
        p95 = ttfbs[min(len(ttfbs) - 1, int(0.95 * len(ttfbs)))] if ttfbs else 0.0
        return WindowStats(n, errors / n, p95)


@dataclass(frozen=True, slots=True)
class WindowStats:
    requests: int
    error_rate: float
    p95_ttfb_s: float


@dataclass
class SplitTarget:
    label: str  # the metrics `target` label: a model name, or model@revision
    weight: float
    model: str  # the catalogue model behind this side
    pool: ModelPool | None = None  # set for a model's own canary split (the side's replicas)
    rolled_back: bool = False
    window: Window | None = None

    @property
    def effective_weight(self) -> float:
        return 0.0 if self.rolled_back else self.weight


@dataclass
class Split:
    name: str
    targets: list[SplitTarget]
    sticky: bool = False
    guard: CanaryGuard | None = None
    _rng: random.Random = field(default_factory=random.Random)

    def __post_init__(self) -> None:
        if self.guard is not None:
            for t in self.targets:
                t.window = Window(self.guard.window_s)

    @property
    def stable(self) -> SplitTarget:
        return self.targets[0]

    def choose(self, key_id: str | None = None) -> SplitTarget:
        """The target for one request (sticky splits: the same for the same key id)."""
        if self.sticky and key_id is not None:
            digest = hashlib.blake2b(f"{self.name}\x00{key_id}".encode(), digest_size=8).digest()
            u = int.from_bytes(digest, "big") / 2**64
        else:
            u = self._rng.random()
        return pick_weighted(self.targets, u)

    def check(self, now: float | None = None) -> list[tuple[SplitTarget, str]]:
        """Roll back every canary that breaches the guard; returns (target, reason) of each."""
        guard = self.guard
        if guard is None:
            return []
        stable_window = self.stable.window
        assert stable_window is not None
        base = stable_window.stats(now)
        rolled: list[tuple[SplitTarget, str]] = []
        for t in self.targets[1:]:
            if t.rolled_back or t.window is None:
                continue
            cur = t.window.stats(now)
            if cur.requests < guard.min_requests or base.requests < guard.min_requests:
                continue
            reason = breach(guard, base, cur)
            if reason:
                t.rolled_back = True
                rolled.append((t, reason))
        return rolled

    def reset(self) -> None:
        """Give rolled-back canaries their configured weight again (operator action), and start
        the guard's windows afresh so the old evidence does not roll them back at once."""
        for t in self.targets:
            t.rolled_back = False
            if t.window is not None:
                t.window = Window(t.window.span_s)


def breach(guard: CanaryGuard, stable: WindowStats, canary: WindowStats) -> str | None:
    """Why the canary is worse than the guard allows, or None."""
    error_limit = stable.error_rate * guard.max_error_ratio + guard.error_margin
    if canary.error_rate > error_limit:
        return (
            f"error rate {canary.error_rate:.1%} > {error_limit:.1%} "
            f"(stable {stable.error_rate:.1%})"
        )
    ttft_limit = stable.p95_ttfb_s * guard.max_ttft_ratio + guard.ttft_margin_ms / 1000
    if canary.p95_ttfb_s > ttft_limit:
        return (
            f"p95 time to first byte {canary.p95_ttfb_s * 1000:.0f} ms > "
            f"{ttft_limit * 1000:.0f} ms (stable {stable.p95_ttfb_s * 1000:.0f} ms)"
        )
    return None


def pick_weighted(targets: Sequence[SplitTarget], u: float) -> SplitTarget:
    """The target whose cumulative weight interval holds ``u`` (0 <= u < 1).

    With every weight at 0 (all canaries rolled back and a stable weight of 0) the stable
    target is the answer: a split never refuses traffic."""
    total = sum(t.effective_weight for t in targets)
    if total <= 0:
        return targets[0]
    point = u * total
    acc = 0.0
    for t in targets:
        w = t.effective_weight
        if w <= 0:
            continue
        acc += w
        if point < acc:
            return t
    return next(t for t in reversed(targets) if t.effective_weight > 0)
