"""The load generator's HTTP client: the gateway's own lean HTTP/1.1 client
(``app/proxy/upstream.py``, httptools, keep-alive) instead of aiohttp.

On a 2-core machine the load generator shares the CPUs with what it measures: aiohttp costs
about 300 µs of CPU per request against about 75 µs for this client, and every one of those
microseconds is taken from the gateway and the engine under test, on both sides of a
comparison alike.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

from app.proxy.upstream import (
    UpstreamConnectError,
    UpstreamDisconnected,
    UpstreamError,
    UpstreamPool,
    UpstreamResponse,
)

__all__ = ["Poster", "auth_head", "error_kind", "sse_lines"]


class Poster:
    """POSTs JSON bodies to one URL (``http(s)://host:port/v1/chat/completions``)."""

    def __init__(self, url: str, timeout_s: float | None = None) -> None:
        parts = urlsplit(url)
        self._base = f"{parts.scheme}://{parts.netloc}"
        self._path = parts.path + (f"?{parts.query}" if parts.query else "")
        self.timeout_s = timeout_s
        # A benchmark opens as many connections as it keeps requests in flight, and keeps them.
        self._pool = UpstreamPool(connect_timeout_s=10.0, idle_s=4.0, max_idle=1_000_000)

    async def post(self, body: bytes, head: bytes) -> UpstreamResponse:
        return await self._pool.post(self._base, self._path, body, head)

    def close(self) -> None:
        self._pool.close()


def auth_head(secret: str) -> bytes:
    return f"authorization: Bearer {secret}\r\n".encode("latin-1")


async def sse_lines(resp: UpstreamResponse) -> AsyncIterator[tuple[float, bytes]]:
    """The lines of a streamed body, each with the time its bytes arrived."""
    rest = b""
    while chunk := await resp.readany():
        now = time.perf_counter()
        *lines, rest = (rest + chunk).split(b"\n")
        for line in lines:
            yield now, line
    if rest:
        yield time.perf_counter(), rest


def error_kind(exc: BaseException) -> str:
    """A short, stable name for a client-side failure (the keys of ``errors`` in a report)."""
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, UpstreamConnectError):
        return "connect"
    if isinstance(exc, UpstreamDisconnected):
        return "disconnected"
    if isinstance(exc, UpstreamError):
        return "http_error"
    return type(exc).__name__
