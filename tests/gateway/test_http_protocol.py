"""The gateway's HTTP protocol sends what one loop turn wrote in one socket write."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from app.http_protocol import (
    EARLY_EXTENSION,
    SEND_CHUNK_EXTENSION,
    CoalescingHttpToolsProtocol,
    CoalescingTransport,
    DisconnectHook,
    GatewayHttpProtocol,
)


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


@contextlib.asynccontextmanager
async def _serving(
    app: Any, protocol: type[HttpToolsProtocol] = GatewayHttpProtocol, **options: Any
) -> AsyncIterator[int]:
    """``app`` behind ``protocol`` on a free port (yielded), closed on exit."""
    loop = asyncio.get_running_loop()
    config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off", **options)
    config.load()
    state = ServerState()
    server = await loop.create_server(
        lambda: protocol(config=config, server_state=state, app_state={}),
        "127.0.0.1",
        0,
    )
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


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

    async with _serving(app, CoalescingHttpToolsProtocol) as port:
        try:
            client.setblocking(False)
            await loop.sock_connect(client, ("127.0.0.1", port))
            await loop.sock_sendall(client, b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            await asyncio.wait_for(ran.wait(), 10)
            assert seen[0].startswith(b"HTTP/1.1 200 OK\r\n")
            assert seen[0].endswith(b"\r\n\r\ndone")
        finally:
            client.close()


def test_send_chunk_writes_a_stream_chunk_from_a_callback_at_once_and_waits_out_back_pressure() -> (
    None
):
    asyncio.run(_test_send_chunk())


async def _test_send_chunk() -> None:
    """``send_chunk`` runs outside any task; what it sends is on the socket when it returns,
    while the client's connection is paused it sends nothing and says so, and ``last`` ends the
    response there and then: the connection serves the next request."""
    loop = asyncio.get_running_loop()
    client = socket.socket()
    protocols: list[GatewayHttpProtocol] = []
    results: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        send_chunk = scope["extensions"][SEND_CHUNK_EXTENSION]
        await send({"type": "http.response.start", "status": 200, "headers": []})
        if scope["path"] == "/again":
            await send({"type": "http.response.body", "body": b"again", "more_body": False})
            return
        done = loop.create_future()

        def callback() -> None:
            results.append(asyncio.current_task())
            results.append(send_chunk(b"a"))
            try:
                results.append(client.recv(65536))
            except BlockingIOError:
                results.append(b"")
            protocols[0].pause_writing()
            results.append(send_chunk(b"b"))
            results.append(send_chunk(b"c", last=True))
            protocols[0].resume_writing()
            results.append(send_chunk(b"z", last=True))
            done.set_result(None)

        loop.call_soon(callback)
        await done  # and sends nothing more: the response is complete

    class Recorded(GatewayHttpProtocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            protocols.append(self)

    async def read_until(end: bytes) -> bytes:
        data = b""
        while not data.endswith(end):
            data += await asyncio.wait_for(loop.sock_recv(client, 65536), 10)
        return data

    async with _serving(app, Recorded) as port:
        try:
            client.setblocking(False)
            await loop.sock_connect(client, ("127.0.0.1", port))
            await loop.sock_sendall(client, b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            rest = await read_until(b"0\r\n\r\n")
            await loop.sock_sendall(client, b"GET /again HTTP/1.1\r\nhost: x\r\n\r\n")
            again = await read_until(b"0\r\n\r\n")
        finally:
            client.close()
    no_task, sent, on_socket, refused, refused_last, ended = results
    assert no_task is None
    assert sent is True
    assert on_socket.startswith(b"HTTP/1.1 200 OK\r\n")  # head and chunk, already written
    assert on_socket.endswith(b"transfer-encoding: chunked\r\n\r\n1\r\na\r\n")
    assert (refused, refused_last, ended) == (False, False, True)
    assert rest == b"1\r\nz\r\n0\r\n\r\n"  # "b" and "c" were never sent
    assert again.startswith(b"HTTP/1.1 200 OK\r\n")
    assert again.endswith(b"5\r\nagain\r\n0\r\n\r\n")


class EarlyApp:
    """An app that offers the early start for POST /hot and records what it got."""

    early_paths = frozenset({"/hot"})
    early_max_body = 64 * 1024

    def __init__(self) -> None:
        self.early_calls: list[tuple[str, bytes]] = []
        self.taken: list[Any] = []

    def early_start(self, scope: Any, body: bytes) -> Any:
        self.early_calls.append((scope["path"], body))
        return f"prepared {body.decode()}"

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        early = scope["extensions"].get(EARLY_EXTENSION)
        self.taken.append(early.take() if early is not None else "no early start")
        while (await receive()).get("more_body"):
            pass
        headers = [(b"content-length", b"2")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"ok", "more_body": False})


async def _exchange(port: int, *parts: bytes, between: Any = None) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for i, part in enumerate(parts):
            if i and between is not None:
                await between()
            writer.write(part)
            await writer.drain()
        return await asyncio.wait_for(reader.readuntil(b"\r\n\r\nok"), 10)
    finally:
        writer.close()


def test_a_complete_request_is_started_early_and_its_task_takes_the_result() -> None:
    asyncio.run(_test_a_complete_request_is_started_early_and_its_task_takes_the_result())


async def _test_a_complete_request_is_started_early_and_its_task_takes_the_result() -> None:
    app = EarlyApp()
    async with _serving(app) as port:
        await _exchange(port, b"POST /hot HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\r\nhello")
        assert app.early_calls == [("/hot", b"hello")]
        assert app.taken == ["prepared hello"]
        # Not offered for other methods or paths.
        await _exchange(port, b"GET /hot HTTP/1.1\r\nhost: x\r\n\r\n")
        await _exchange(port, b"POST /cold HTTP/1.1\r\nhost: x\r\ncontent-length: 1\r\n\r\nx")
        assert app.taken[1:] == ["no early start", "no early start"]
        assert len(app.early_calls) == 1


def test_a_body_sent_apart_from_its_head_is_still_started_early() -> None:
    asyncio.run(_test_a_body_sent_apart_from_its_head_is_still_started_early())


async def _test_a_body_sent_apart_from_its_head_is_still_started_early() -> None:
    """Clients such as the openai package write the head and the body separately: the task
    waits for the whole body, so the early start happens all the same."""
    app = EarlyApp()
    async with _serving(app) as port:
        head = b"POST /hot HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\r\n"
        await _exchange(port, head, b"hel", b"lo", between=lambda: asyncio.sleep(0.05))
        assert app.early_calls == [("/hot", b"hello")]
        assert app.taken == ["prepared hello"]


def test_a_request_waiting_for_100_continue_or_with_a_large_body_goes_to_its_task() -> None:
    asyncio.run(_test_a_request_waiting_for_100_continue_or_with_a_large_body_goes_to_its_task())


async def _test_a_request_waiting_for_100_continue_or_with_a_large_body_goes_to_its_task() -> None:
    """The task must send ``100 Continue`` (uvicorn does so when the app first reads), and a
    body past uvicorn's high-water mark is only read on while the app reads it: neither can
    wait for the whole body."""
    app = EarlyApp()
    async with _serving(app) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /hot HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\nexpect: 100-continue\r\n\r\n"
        )
        assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10) == (
            b"HTTP/1.1 100 Continue\r\n\r\n"
        )
        writer.write(b"hello")
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\nok"), 10)
        writer.close()
        large = b"x" * (256 * 1024)
        head = b"POST /hot HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n" % len(large)
        await _exchange(port, head + large)
        chunked = b"POST /hot HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
        chunk = b"4000\r\n" + b"x" * 0x4000 + b"\r\n"
        await _exchange(port, chunked + chunk * 16 + b"0\r\n\r\n")
        # 100-continue and a declared body over early_max_body: not offered; a chunked body
        # past the high-water mark: its task started while it came, nothing was done early.
        assert app.taken == ["no early start", "no early start", None]
        assert app.early_calls == []


def test_a_request_over_the_concurrency_limit_is_not_started_early() -> None:
    asyncio.run(_test_a_request_over_the_concurrency_limit_is_not_started_early())


async def _test_a_request_over_the_concurrency_limit_is_not_started_early() -> None:
    """Past ``--limit-concurrency`` uvicorn answers 503 itself: nothing may reach the app."""
    app = EarlyApp()
    async with _serving(app, limit_concurrency=1) as port:  # this connection is the one
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /hot HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\r\nhello")
        status = await asyncio.wait_for(reader.readuntil(b"\r\n"), 10)
        writer.close()
        assert status.startswith(b"HTTP/1.1 503")
        assert app.early_calls == [] and app.taken == []


def test_write_now_sends_what_is_pending_first_in_one_write() -> None:
    async def main() -> None:
        transport = RecordingTransport()
        coalescing = CoalescingTransport(transport, asyncio.get_running_loop())  # type: ignore[arg-type]
        coalescing.write_now(b"alone")
        coalescing.write(b"head ")
        coalescing.write_now(b"chunk")
        assert transport.writes == [b"alone", b"head chunk"]
        await asyncio.sleep(0)  # the scheduled flush finds nothing left
        assert transport.writes == [b"alone", b"head chunk"]
        transport.closed = True
        coalescing.write_now(b"late")
        assert transport.writes == [b"alone", b"head chunk"]

    asyncio.run(main())
