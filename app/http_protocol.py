"""uvicorn's httptools protocol with writes coalesced per event-loop turn.

uvicorn writes a response's status line and headers, then its body, as separate socket writes;
on small VMs every write is an expensive system call, and a non-streamed answer pays two. Here
the writes made in one loop turn leave together in one call (the flush is scheduled with
``call_soon``, so nothing waits for more than the rest of the current turn).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Callable
from typing import Any

import orjson
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

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

    def on_response_complete(self) -> None:
        # A finished response leaves now, not after the callbacks already queued in this
        # loop turn (the request's own accounting task among them): they are not the
        # client's business.
        self.transport.flush()  # type: ignore[attr-defined]
        super().on_response_complete()


MAX_HEAD_BYTES = 64 * 1024
# ASGI extension offered to the app: ``scope["extensions"][ABORT_EXTENSION]()`` drops the
# connection at once (an ASGI app can only end a response; uvicorn then close()s, which waits
# for a client that may never read). app/api/openai.py uses it for streams past their deadline.
ABORT_EXTENSION = "switchyard.abort"
# ``scope["extensions"][DISCONNECT_EXTENSION]``: a ``DisconnectHook``; the callback set on it
# runs when the client's connection is lost, so the app need not keep a task blocked in
# ``receive()`` per request just to learn that.
DISCONNECT_EXTENSION = "switchyard.disconnect"


class DisconnectHook:
    """At most one callback (the current request's), run once if the connection is lost."""

    __slots__ = ("_callback", "lost")

    def __init__(self) -> None:
        self._callback: Callable[[], None] | None = None
        self.lost = False

    def set(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` when the connection is lost (at once if it already is)."""
        if self.lost:
            callback()
        else:
            self._callback = callback

    def clear(self, callback: Callable[[], None]) -> None:
        if self._callback is callback:
            self._callback = None

    def fire(self) -> None:
        self.lost = True
        callback, self._callback = self._callback, None
        if callback is not None:
            callback()


class GatewayHttpProtocol(CoalescingHttpToolsProtocol):
    """The gateway's HTTP protocol: coalesced writes, and bounds on the request head.

    httptools keeps a request's line and headers in memory however long they grow (uvicorn's
    ``h11_max_incomplete_event_size`` applies to h11 only), so one client could make the
    gateway buffer megabytes of headers. A head longer than ``MAX_HEAD_BYTES`` is answered
    431 (OpenAI-shaped) and the connection closed: once complete (its line and headers
    counted exactly), or as soon as more than that has arrived without completing it (so at
    most one read more is ever held).

    uvicorn also waits without end for a head that never completes (a connection that sends
    nothing, or a header a byte at a time: slowloris); a head not complete ``head_timeout_s``
    after the connection opened or the request began is answered 408 and the connection
    closed. Likewise a body not complete ``body_timeout_s`` after its headers (408 if no
    answer has started, the app told of a disconnect). Idle keep-alive connections keep
    uvicorn's own timeout.

    Each request's scope offers ``ABORT_EXTENSION`` and ``DISCONNECT_EXTENSION``."""

    max_head_bytes = MAX_HEAD_BYTES

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        head_timeout_s: float = 30.0,
        body_timeout_s: float = 60.0,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.head_timeout_s = head_timeout_s
        self.body_timeout_s = body_timeout_s
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._in_head = True
        self._head_bytes = 0  # read while the head was incomplete
        self._refused = False
        self._disconnect_hook = DisconnectHook()
        super().connection_made(transport)
        self._start_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        self._stop_body_timer()
        super().connection_lost(exc)
        self._disconnect_hook.fire()

    def on_message_begin(self) -> None:
        if self._refused:
            return
        self._in_head = True
        self._head_bytes = 0
        if self._head_timer is None:
            self._start_head_timer()
        super().on_message_begin()
        # A callable, not the dict the ASGI types expect of an extension: ours, read by our app.
        extensions: dict[str, Any] = {
            ABORT_EXTENSION: self._abort,
            DISCONNECT_EXTENSION: self._disconnect_hook,
        }
        self.scope["extensions"] = extensions

    def _abort(self) -> None:
        """Drop the connection now: a reset, so neither this process nor the kernel keeps
        unsent bytes for a client that does not read, and the ASGI cycle sees the
        disconnect at once (no 'returned without completing response' error)."""
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        cycle = getattr(self, "cycle", None)
        if cycle is not None:
            cycle.disconnected = True
        self.transport.abort()

    def on_headers_complete(self) -> None:
        if self._refused:
            return
        self._in_head = False
        self._stop_head_timer()
        size = len(self.url) + sum(len(k) + len(v) + 4 for k, v in self.headers)
        if size > self.max_head_bytes:
            self._refuse_head()
            return
        super().on_headers_complete()
        self._body_timer = self.loop.call_later(self.body_timeout_s, self._body_timed_out)

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        self._stop_body_timer()
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

    def _start_head_timer(self) -> None:
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _stop_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _body_timed_out(self) -> None:
        self._body_timer = None
        cycle = getattr(self, "cycle", None)
        if cycle is None or self._refused or self.transport.is_closing():
            return
        waited = f"{self.body_timeout_s:g}s"
        if not cycle.response_started:
            message = f"The request body did not arrive within {waited} of its headers."
            self._refuse(APIError(408, message, code="request_timeout"), b"Request Timeout")
        else:
            self._refused = True
            self.transport.close()
        cycle.disconnected = True  # the app, waiting for the body, hears of a disconnect
        cycle.message_event.set()

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._in_head and not self._refused and not self.transport.is_closing():
            waited = f"{self.head_timeout_s:g}s"
            message = f"The request line and headers did not arrive within {waited}."
            self._refuse(APIError(408, message, code="request_timeout"), b"Request Timeout")

    def _refuse_head(self) -> None:
        message = f"The request line and headers are larger than {self.max_head_bytes} bytes."
        error = APIError(431, message, code="request_header_too_large")
        self._refuse(error, b"Request Header Fields Too Large")

    def _refuse(self, error: APIError, reason: bytes) -> None:
        """Answer before any ASGI request exists, and close the connection."""
        self._refused = True
        self._stop_head_timer()
        body = orjson.dumps(error.body())
        head = [b"HTTP/1.1 " + str(error.status).encode() + b" " + reason + b"\r\n"]
        head += [k + b": " + v + b"\r\n" for k, v in self.server_state.default_headers]
        head += [
            b"content-type: application/json\r\n",
            b"content-length: " + str(len(body)).encode() + b"\r\n",
            b"connection: close\r\n\r\n",
        ]
        self.transport.write(b"".join(head) + body)
        self.transport.close()
