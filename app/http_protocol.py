"""uvicorn's httptools protocol with writes coalesced per event-loop turn.

uvicorn writes a response's status line and headers, then its body, as separate socket writes;
on small VMs every write is an expensive system call, and a non-streamed answer pays two. Here
the writes made in one loop turn leave together in one call (the flush is scheduled with
``call_soon``, so nothing waits for more than the rest of the current turn).
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.errors import APIError


class CoalescingTransport:
    """Delegates everything to the real transport except ``write``, which is batched."""

    __slots__ = ("_loop", "_pending", "_scheduled", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []
        self._scheduled = False

    def write(self, data: bytes) -> None:
        if not data:
            return
        self._pending.append(data)
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        pending = self._pending
        if not pending:
            return
        self._pending = []
        if not self._transport.is_closing():
            self._transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def close(self) -> None:
        self.flush()  # a response written just before closing still goes out
        self._transport.close()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(map(len, self._pending))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class CoalescingHttpToolsProtocol(HttpToolsProtocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(CoalescingTransport(transport, self.loop))  # type: ignore[arg-type]


MAX_HEAD_BYTES = 64 * 1024


class GatewayHttpProtocol(CoalescingHttpToolsProtocol):
    """The gateway's HTTP protocol: coalesced writes, and a bound on the request head.

    httptools keeps a request's line and headers in memory however long they grow (uvicorn's
    ``h11_max_incomplete_event_size`` applies to h11 only), so one client could make the
    gateway buffer megabytes of headers. A head longer than ``MAX_HEAD_BYTES`` is answered
    431 (OpenAI-shaped) and the connection closed: once complete (its line and headers
    counted exactly), or as soon as more than that has arrived without completing it (so at
    most one read more is ever held)."""

    max_head_bytes = MAX_HEAD_BYTES

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._in_head = True
        self._head_bytes = 0  # read while the head was incomplete
        self._refused = False
        super().connection_made(transport)

    def on_message_begin(self) -> None:
        if self._refused:
            return
        self._in_head = True
        self._head_bytes = 0
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        if self._refused:
            return
        self._in_head = False
        size = len(self.url) + sum(len(k) + len(v) + 4 for k, v in self.headers)
        if size > self.max_head_bytes:
            self._refuse_head()
            return
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if not self._refused:
            super().on_message_complete()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        super().data_received(data)
        if not self._in_head or self._refused:
            return
        self._head_bytes += len(data)
        if self._head_bytes > self.max_head_bytes:
            self._refuse_head()

    def _refuse_head(self) -> None:
        self._refused = True
        error = APIError(
            431,
            f"The request line and headers are larger than {self.max_head_bytes} bytes.",
            code="request_header_too_large",
        )
        body = orjson.dumps(error.body())
        head = [b"HTTP/1.1 431 Request Header Fields Too Large\r\n"]
        head += [k + b": " + v + b"\r\n" for k, v in self.server_state.default_headers]
        head += [
            b"content-type: application/json\r\n",
            b"content-length: " + str(len(body)).encode() + b"\r\n",
            b"connection: close\r\n\r\n",
        ]
        self.transport.write(b"".join(head) + body)
        self.transport.close()
