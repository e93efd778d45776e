"""uvicorn's httptools protocol with writes coalesced per event-loop turn.

uvicorn writes a response's status line and headers, then its body, as separate socket writes;
on small VMs every write is an expensive system call, and a non-streamed answer pays two. Here
the writes made in one loop turn leave together in one call (the flush is scheduled with
``call_soon``, so nothing waits for more than the rest of the current turn).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
import struct
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import orjson
from uvicorn._types import ASGI3Application
from uvicorn.config import Config
from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
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

    def write_now(self, data: bytes) -> None:
        """Write ``data`` at once, after whatever is pending, in one call."""
        if self._pending:
            self._pending.append(data)
            self.flush()
        elif not self._transport.is_closing():
            self._transport.write(data)

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
        self.coalescing = CoalescingTransport(transport, self.loop)
        super().connection_made(self.coalescing)  # type: ignore[arg-type]

    def on_response_complete(self) -> None:
        # A finished response leaves now, not after the callbacks already queued in this
        # loop turn (the request's own accounting task among them): they are not the
        # client's business.
        self.coalescing.flush()
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
# ``scope["extensions"][FLUSH_EXTENSION]()`` writes what the response has sent so far now,
# not at the end of the loop turn: a stream's events go out as they come.
FLUSH_EXTENSION = "switchyard.flush"
# ``scope["extensions"][SEND_CHUNK_EXTENSION](data, last=False) -> bool`` writes one chunk of
# a started chunked response (what an ASGI ``http.response.body`` would; ``last``: and ends the
# response) out at once, from any callback: no task need wake for it. False, with nothing
# written, while the client's connection is paused for back-pressure: the app then sends with
# the ASGI ``send``, which waits for the client to catch up. After a ``last`` that returned
# True the app sends nothing more. app/proxy/relay.py relays stream events with it from the
# upstream connection's read callback.
SEND_CHUNK_EXTENSION = "switchyard.send_chunk"
# ``scope["extensions"][EARLY_EXTENSION]``: an ``EarlyStart``, for the requests the app's
# ``early_paths`` name (POST only); the app also names ``early_max_body`` (bytes).
EARLY_EXTENSION = "switchyard.early"


class SendChunk(Protocol):
    """The type of ``SEND_CHUNK_EXTENSION``."""

    def __call__(self, data: bytes, last: bool = False) -> bool: ...


class EarlyStart:
    """What the app's ``early_start(scope, body)`` made of a request once its body was
    complete, computed in the server's callback before the request's ASGI task starts: the
    task runs one loop turn later, and on a 2-core VM the turn of a loop woken from idle
    costs ~0.1 ms, which the request would otherwise wait before it can reach the engine.
    The task ``take``s it (None: nothing was done, the task must do it all)."""

    __slots__ = ("result", "taken")

    def __init__(self) -> None:
        self.result: Any = None
        self.taken = False

    def take(self) -> Any:
        self.taken = True
        result, self.result = self.result, None
        return result


def _declared_length(headers: Iterable[tuple[bytes, bytes]]) -> int:
    """The declared Content-Length (0 for none: a chunked body is bounded as it comes)."""
    for name, value in headers:
        if name == b"content-length":
            return int(value) if value.isdigit() else 0
    return 0


def _early_app(app: Any) -> Any:
    """The app (under uvicorn's middleware wrappers) that offers ``early_start``, if any."""
    for _ in range(8):
        if app is None or hasattr(app, "early_start"):
            return app
        app = getattr(app, "app", None)
    return None


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

    Each request's scope offers ``ABORT_EXTENSION``, ``DISCONNECT_EXTENSION``,
    ``FLUSH_EXTENSION`` and ``SEND_CHUNK_EXTENSION``; a POST to one of the app's
    ``early_paths`` also ``EARLY_EXTENSION``."""

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
        self._early_app = _early_app(getattr(config, "loaded_app", None))
        self._early: EarlyStart | None = None
        self._deferred: tuple[RequestResponseCycle, ASGI3Application] | None = None
        self._in_headers_complete = False

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
            FLUSH_EXTENSION: self.coalescing.flush,
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

    def _send_chunk(self, cycle: RequestResponseCycle, data: bytes, last: bool = False) -> bool:
        if cycle.disconnected:
            return True  # dropped, as uvicorn's send drops it
        if cycle.flow.write_paused:
            return False
        if not cycle.response_started or cycle.response_complete or not cycle.chunked_encoding:
            raise RuntimeError("send_chunk: no chunked response is under way")
        if last:  # uvicorn's own send, for its bookkeeping: it awaits only a paused client
            step = cycle.send({"type": "http.response.body", "body": data, "more_body": False})
            try:
                step.send(None)
            except StopIteration:
                return True
            step.close()
            raise RuntimeError("send_chunk: uvicorn's send waited")
        if data:
            self.coalescing.write_now(b"%x\r\n%s\r\n" % (len(data), data))
        return True

    def on_headers_complete(self) -> None:
        if self._refused:
            return
        self._in_head = False
        self._stop_head_timer()
        size = len(self.url) + sum(len(k) + len(v) + 4 for k, v in self.headers)
        if size > self.max_head_bytes:
            self._refuse_head()
            return
        self._in_headers_complete = True
        try:
            super().on_headers_complete()  # starts the ASGI task: see _start_asgi_task
        finally:
            self._in_headers_complete = False
        cycle = self.cycle
        if cycle is not None and cycle.scope is self.scope:  # not an upgrade uvicorn took
            # Its task, started or deferred, runs a loop turn later and finds this in scope.
            extensions: dict[str, Any] = self.scope["extensions"]
            extensions[SEND_CHUNK_EXTENSION] = functools.partial(self._send_chunk, cycle)
        self._body_timer = self.loop.call_later(self.body_timeout_s, self._body_timed_out)

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: ASGI3Application) -> None:
        """A POST to one of the app's ``early_paths`` gets its task once its body is complete
        (its ``EarlyStart`` made first: see ``on_message_complete``), however the client cut
        its writes; unless it waits for ``100 Continue``, which the task must send, or it
        declares a body over the app's ``early_max_body``, which the task refuses at once."""
        early_app = self._early_app
        if (
            self._in_headers_complete
            and early_app is not None
            and app is self.app  # not uvicorn's 503 past --limit-concurrency
            and cycle is self.cycle
            and cycle.scope["method"] == "POST"
            and cycle.scope["path"] in early_app.early_paths
            and not cycle.waiting_for_100_continue
            and _declared_length(cycle.scope["headers"]) <= early_app.early_max_body
        ):
            self._early = EarlyStart()
            extensions: dict[str, Any] = cycle.scope["extensions"]
            extensions[EARLY_EXTENSION] = self._early
            self._deferred = (cycle, app)
            return
        super()._start_asgi_task(cycle, app)

    def _start_deferred(self) -> None:
        deferred, self._deferred = self._deferred, None
        if deferred is not None:
            super()._start_asgi_task(*deferred)

    def on_body(self, body: bytes) -> None:
        if self._refused:
            return
        super().on_body(body)
        if self._deferred is not None and len(self.cycle.body) > HIGH_WATER_LIMIT:
            # uvicorn stopped reading until the app asks for the body: it streams to the app.
            self._start_deferred()

    def on_message_complete(self) -> None:
        self._stop_body_timer()
        if self._refused:
            return
        super().on_message_complete()
        early, self._early = self._early, None
        if early is not None and not early.taken and self._early_app is not None:
            early.result = self._early_app.early_start(self.scope, bytes(self.cycle.body))
        self._start_deferred()

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
