"""OpenAI's rate-limit headers: x-ratelimit-{limit,remaining,reset}-{requests,tokens}.

Reset times are durations in Go's notation, as OpenAI sends them ("1s", "6m0s", "250ms").
"""

from __future__ import annotations

import math


def duration(ms: float) -> str:
    ms = max(0.0, ms)
    if ms < 1000:
        return f"{math.ceil(ms)}ms"
    seconds = ms / 1000
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    s = f"{secs:.3f}".rstrip("0").rstrip(".")
    if hours:
        return f"{int(hours)}h{int(minutes)}m{s}s"
    if minutes:
        return f"{int(minutes)}m{s}s"
    return f"{s}s"


def ratelimit_headers(
    kind: str, limit: int, remaining: int, reset_ms: float
) -> list[tuple[bytes, bytes]]:
    return [
        (f"x-ratelimit-limit-{kind}".encode(), str(limit).encode()),
        (f"x-ratelimit-remaining-{kind}".encode(), str(max(0, remaining)).encode()),
        (f"x-ratelimit-reset-{kind}".encode(), duration(reset_ms).encode()),
    ]
