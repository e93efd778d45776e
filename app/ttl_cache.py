"""The per-process caches of key records and customer limits: entries stamped with the
monotonic time they were fetched, fresh for a TTL (at most a second, so a change written to
Redis by any process takes effect everywhere within it)."""

from __future__ import annotations

import time
from typing import TypeVar

K = TypeVar("K")
V = TypeVar("V")


def fresh(cache: dict[K, tuple[float, V]], key: K, ttl_s: float) -> tuple[bool, V | None]:
    """(whether ``cache`` holds a fresh entry for ``key``, its value if so)."""
    hit = cache.get(key)
    if hit is not None and time.monotonic() - hit[0] < ttl_s:
        return True, hit[1]
    return False, None
