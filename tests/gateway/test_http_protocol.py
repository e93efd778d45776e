"""The gateway's HTTP protocol sends what one loop turn wrote in one socket write."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import uvicorn
from uvicorn.server import ServerState

from app.http_protocol import CoalescingHttpToolsProtocol, CoalescingTransport, DisconnectHook


class RecordingTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 1) if name == "peername" else default


def test_writes_of_one_loop_turn_leave_in_one_write() -> None:
    asyncio.run(_test_writes_of_one_loop_turn_leave_in_one_write())


async def _test_writes_of_one_loop_turn_leave_in_one_write() -> None:
    real = RecordingTransport()
    transport = CoalescingTransport(real, asyncio.get_running_loop())  # type: ignore[arg-type]
    transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
    transport.write(b"{}")
    assert real.writes == []
    assert transport.get_write_buffer_size() == 40
    await asyncio.sleep(0)
    assert real.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"]
    transport.write(b"data: 1\n\n")
    await asyncio.sleep(0)
    assert real.writes[1:] == [b"data: 1\n\n"]


def test_close_sends_what_was_written_first() -> None:
    asyncio.run(_test_close_sends_what_was_written_first())


async def _test_close_sends_what_was_written_first() -> None:
    real = RecordingTransport()
    transport = CoalescingTransport(real, asyncio.get_running_loop())  # type: ignore[arg-type]
    transport.write(b"bye")
    transport.close()
    assert real.writes == [b"bye"]
    assert real.closed
    await asyncio.sleep(0)  # the scheduled flush finds nothing left
    assert real.writes == [b"bye"]


def test_nothing_is_written_to_a_closing_transport() -> None:
    asyncio.run(_test_nothing_is_written_to_a_closing_transport())


async def _test_nothing_is_written_to_a_closing_transport() -> None:
    real = RecordingTransport()
    transport = CoalescingTransport(real, asyncio.get_running_loop())  # type: ignore[arg-type]
    transport.write(b"late")
    real.closed = True
    await asyncio.sleep(0)
    assert real.writes == []
    assert transport.get_extra_info("peername") == ("127.0.0.1", 1)


def test_the_disconnect_hook_runs_the_current_callback_once() -> None:

    calls: list[str] = []
    hook = DisconnectHook()
    first, second = (lambda: calls.append("first")), (lambda: calls.append("second"))
    hook.set(first)
    hook.clear(second)  # not the registered one: no effect
    hook.fire()
    hook.fire()
    assert calls == ["first"]
    hook.set(second)  # registered after the loss: runs at once
    assert calls == ["first", "second"]
    cleared = DisconnectHook()
    cleared.set(first)
    cleared.clear(first)
    cleared.fire()
    assert calls == ["first", "second"]


def test_a_finished_response_leaves_before_callbacks_queued_ahead_of_it() -> None:
    asyncio.run(_test_a_finished_response_leaves_before_callbacks_queued_ahead_of_it())


async def _test_a_finished_response_leaves_before_callbacks_queued_ahead_of_it() -> None:
    """The request's own bookkeeping (queued while it was answered) must not delay the answer:
    what the client holds when the queued callback runs is the whole response."""
    loop = asyncio.get_running_loop()
    client = socket.socket()
    seen: list[bytes] = []
    ran = asyncio.Event()

    def queued() -> None:
        try:
            seen.append(client.recv(65536))
        except BlockingIOError:
            seen.append(b"")
        ran.set()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        loop.call_soon(queued)
        headers = [(b"content-length", b"4")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"done", "more_body": False})

    config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off")
    config.load()
    state = ServerState()
    server = await loop.create_server(
        lambda: CoalescingHttpToolsProtocol(config=config, server_state=state, app_state={}),
        "127.0.0.1",
        0,
    )
    try:
        port = server.sockets[0].getsockname()[1]
        client.setblocking(False)
        await loop.sock_connect(client, ("127.0.0.1", port))
        await loop.sock_sendall(client, b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        await asyncio.wait_for(ran.wait(), 10)
        assert seen[0].startswith(b"HTTP/1.1 200 OK\r\n")
        assert seen[0].endswith(b"\r\n\r\ndone")
    finally:
        client.close()
        server.close()
        await server.wait_closed()
