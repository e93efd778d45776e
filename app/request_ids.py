"""Request ids: unique across processes and hosts, without a system call per request.

A request id names a request in logs, in ``x-request-id`` and in the usage record, where the
billing worker deduplicates on it, so two requests must never share one. ``uuid4`` reads 16
random bytes from the kernel for every request (measured at ~25 µs on the hot path of a
cold-cached 2-core VM); here each process draws 80 random bits once (again in a forked child)
and counts.
"""

from __future__ import annotations

import itertools
import os

_prefix = ""
_counter = itertools.count()


def _reseed() -> None:
    global _prefix, _counter
    _prefix = f"req_{os.urandom(10).hex()}"
    _counter = itertools.count()


_reseed()
os.register_at_fork(after_in_child=_reseed)


def new_request_id() -> str:
    """``req_`` + 20 hex digits of this process's random prefix + a counter."""
    return f"{_prefix}{next(_counter):012x}"
