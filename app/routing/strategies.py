"""Routing strategies: which of a model's available replicas takes the next request.

One small interface (``RoutingStrategy.pick(candidates, request)``), as production-stack's
``RoutingInterface``: the pool hands over the replicas that may take a request right now
(healthy, not ejected, not already tried by this request) and the strategy picks one. Strategies
only read in-memory state (``outstanding`` counted by the proxy, ``waiting``/``kv_usage``
scraped in the background), so a pick costs microseconds and never I/O.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from app.catalog import RoutingStrategyName

if TYPE_CHECKING:
    from app.routing.pool import Replica

_MASK = (1 << 64) - 1


class RequestInfo:
    """What a strategy may look at: the key id and, lazily, the prompt prefix hash."""

    __slots__ = ("_payload", "_prefix_chars", "_prefix_hash", "key_id")

    def __init__(self, key_id: str, payload: dict[str, Any], prefix_chars: int = 512) -> None:
        self.key_id = key_id
        self._payload = payload
        self._prefix_chars = prefix_chars
        self._prefix_hash: int | None = None

    @property
    def prefix_hash(self) -> int:
        """64-bit hash of the first ``prefix_chars`` characters of the prompt text."""
        if self._prefix_hash is None:
            text = prompt_prefix(self._payload, self._prefix_chars)
            digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
            self._prefix_hash = int.from_bytes(digest, "big")
        return self._prefix_hash


def prompt_prefix(payload: dict[str, Any], limit: int) -> str:
    """The leading prompt text of a chat, completion or embedding request, up to ``limit``."""
    parts: list[str] = []
    size = 0

    def add(text: str) -> bool:
        nonlocal size
        parts.append(text[: limit - size])
        size += len(parts[-1])
        return size >= limit

    messages = payload.get("messages")
    if isinstance(messages, list):
        for m in messages:
            if not isinstance(m, dict):
                continue
            content = m.get("content")
            if isinstance(content, list):
                content = "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
            if add(f"{m.get('role', '')}\x1f{content or ''}\x1e"):
                break
    else:
        prompt = payload.get("prompt", payload.get("input", ""))
        if isinstance(prompt, list) and prompt:
            prompt = prompt[0]
        add(str(prompt))
    return "".join(parts)


def _mix(x: int) -> int:
    """splitmix64 finaliser: a cheap, well-spread 64-bit integer hash."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


class RoutingStrategy(Protocol):
    name: RoutingStrategyName

    def pick(self, candidates: Sequence[Replica], request: RequestInfo | None) -> Replica | None:
        """One of ``candidates`` (never empty when called), or None to refuse."""
        ...


class _Rotating:
    """A rotating start, so ties are broken evenly instead of always favouring replica 0."""

    def __init__(self) -> None:
        self._counter = itertools.count()

    def _rotated(self, candidates: Sequence[Replica]) -> list[Replica]:
        start = next(self._counter) % len(candidates)
        return [*candidates[start:], *candidates[:start]]


class RoundRobin(_Rotating):
    name: RoutingStrategyName = "round_robin"

    def pick(self, candidates: Sequence[Replica], request: RequestInfo | None) -> Replica | None:
        return candidates[next(self._counter) % len(candidates)]


class LeastOutstanding(_Rotating):
    """Fewest requests in flight from this gateway: a slow replica finishes fewer and so gets
    fewer new ones. Blind to load that other gateways put on the same replica."""

    name: RoutingStrategyName = "least_outstanding"

    def pick(self, candidates: Sequence[Replica], request: RequestInfo | None) -> Replica | None:
        return min(self._rotated(candidates), key=lambda r: r.outstanding)


class QueueAware(_Rotating):
    """The engine's own view of its load, scraped from ``/metrics``: requests waiting for a
    slot (what adds to time to first token), plus this gateway's in-flight count (fresh between
    scrapes, so a burst does not all land on the replica that looked idle a second ago), with
    KV-cache usage (0..1) breaking ties towards the replica with room for longer sequences."""

    name: RoutingStrategyName = "queue_aware"

    def pick(self, candidates: Sequence[Replica], request: RequestInfo | None) -> Replica | None:
        return min(self._rotated(candidates), key=lambda r: r.waiting + r.outstanding + r.kv_usage)


class PrefixAware(_Rotating):
    """Requests sharing a prompt prefix go to the same replica, so vLLM's prefix cache hits.

    Rendezvous (highest-random-weight) hashing of the prefix over the candidate replicas: the
    mapping survives replicas coming and going (only the keys of a lost replica move). When the
    prefix's replica is ``busy_slack`` requests busier than the least-loaded one, the next
    replica in the prefix's own order is tried, down to the least-loaded one."""

    name: RoutingStrategyName = "prefix_aware"

    def __init__(self, busy_slack: int = 4) -> None:
        super().__init__()
        self.busy_slack = busy_slack

    def pick(self, candidates: Sequence[Replica], request: RequestInfo | None) -> Replica | None:
        if request is None:
            return min(self._rotated(candidates), key=_load)
        floor = min(_load(r) for r in candidates)
        h = request.prefix_hash
        ranked = sorted(candidates, key=lambda r: _mix(h ^ r.salt), reverse=True)
        for r in ranked:
            if _load(r) < floor + self.busy_slack or _load(r) == floor:
                return r
        return ranked[0]  # unreachable: the least-loaded replica always qualifies


def _load(r: Replica) -> int:
    return r.outstanding + r.waiting


def make_strategy(name: RoutingStrategyName, busy_slack: int = 4) -> RoutingStrategy:
    if name == "round_robin":
        return RoundRobin()
    if name == "least_outstanding":
        return LeastOutstanding()
    if name == "queue_aware":
        return QueueAware()
    if name == "prefix_aware":
        return PrefixAware(busy_slack)
    raise ValueError(
        f"unknown routing strategy {name!r} "
        "(round_robin, least_outstanding, queue_aware, prefix_aware)"
    )
