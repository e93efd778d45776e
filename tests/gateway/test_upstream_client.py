"""The proxy's HTTP/1.1 client against small real servers that answer exactly as scripted."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from app.local.procs import free_port
from app.proxy.upstream import (
    HIGH_WATER,
    UpstreamConnectError,
    UpstreamDisconnected,
    UpstreamPool,
)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return head, await reader.readexactly(length)


def ok(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)


def run(handler: Handler, scenario: Callable[[str, dict[str, Any]], Awaitable[Any]]) -> Any:
    """Serve ``handler`` on a free port and run ``scenario(base_url, stats)`` against it."""

    async def main() -> Any:
        stats: dict[str, Any] = {"connections": 0, "requests": []}

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            stats["connections"] += 1
            try:
                await handler(reader, writer)
            except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
                pass
            finally:
                writer.close()

        async def recording(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await serve(reader, writer)

        port = free_port()
        server = await asyncio.start_server(recording, "127.0.0.1", port)
        stats["server"] = server
        try:
            return await scenario(f"http://127.0.0.1:{port}", stats)
        finally:
            server.close()

    return asyncio.run(main())


async def echo_forever(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        head, body = await read_request(reader)
        path = head.split(b" ")[1]
        writer.write(ok(path + b" " + body))
        await writer.drain()


async def events_then_end(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Three events 20 ms apart on a chunked stream, then the end; then the next request."""
    await read_request(reader)
    writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
    for event in (b"data: 1\n\n", b"data: 2\n\n", b"data: [DONE]\n\n"):
        writer.write(b"%x\r\n%s\r\n" % (len(event), event))
        await writer.drain()
        await asyncio.sleep(0.02)
    writer.write(b"0\r\n\r\n")
    await writer.drain()
    await read_request(reader)


def test_a_body_with_content_length_is_read_whole_and_the_connection_kept() -> None:
    async def scenario(url: str, stats: dict[str, Any]) -> list[bytes]:
        pool = UpstreamPool(1.0)
        bodies = []
        for i in range(3):
            async with await pool.post(url, "/v1/chat/completions", b"%d" % i) as resp:
                assert resp.status == 200
                bodies.append(await resp.read())
        pool.close()
        return bodies

    stats: dict[str, Any] = {}

    async def counted(url: str, s: dict[str, Any]) -> list[bytes]:
        out = await scenario(url, s)
        stats.update(s)
        return out

    assert run(echo_forever, counted) == [
        b"/v1/chat/completions 0",
        b"/v1/chat/completions 1",
        b"/v1/chat/completions 2",
    ]
    assert stats["connections"] == 1  # kept alive


def test_a_path_prefix_in_the_replica_url_is_kept() -> None:
    async def scenario(url: str, _: dict[str, Any]) -> bytes:
        pool = UpstreamPool(1.0)
        async with await pool.post(url + "/engine/", "/v1/completions", b"x") as resp:
            return await resp.read()

    assert run(echo_forever, scenario) == b"/engine/v1/completions x"


def test_a_chunked_stream_arrives_piece_by_piece() -> None:
    async def scenario(url: str, _: dict[str, Any]) -> list[bytes]:
        pool = UpstreamPool(1.0)
        resp = await pool.post(url, "/v1/chat/completions", b"{}")
        pieces = []
        while data := await resp.readany():
            pieces.append(data)
        resp.release()
        return pieces

    assert run(events_then_end, scenario) == [b"data: 1\n\n", b"data: 2\n\n", b"data: [DONE]\n\n"]


def test_an_error_status_is_returned_with_its_body() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        body = b'{"error": {"message": "too long"}}'
        writer.write(
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
        )
        await writer.drain()

    async def scenario(url: str, _: dict[str, Any]) -> tuple[int, bytes]:
        async with await UpstreamPool(1.0).post(url, "/v1/chat/completions", b"{}") as resp:
            return resp.status, await resp.read()

    assert run(handler, scenario) == (400, b'{"error": {"message": "too long"}}')


def test_nobody_listening_is_a_connect_error() -> None:
    async def main() -> None:
        with pytest.raises(UpstreamConnectError):
            await UpstreamPool(1.0).post(f"http://127.0.0.1:{free_port()}", "/v1/x", b"")

    asyncio.run(main())


def test_a_connection_cut_mid_body_is_a_disconnect() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly part")
        await writer.drain()

    async def scenario(url: str, _: dict[str, Any]) -> None:
        resp = await UpstreamPool(1.0).post(url, "/v1/chat/completions", b"{}")
        with pytest.raises(UpstreamDisconnected):
            await resp.read()
        resp.close()

    run(handler, scenario)


def test_garbage_instead_of_http_is_a_disconnect() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"SSH-2.0-OpenSSH\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.5)

    async def scenario(url: str, _: dict[str, Any]) -> None:
        with pytest.raises(UpstreamDisconnected):
            await UpstreamPool(1.0).post(url, "/v1/chat/completions", b"{}")

    run(handler, scenario)


def test_a_kept_connection_the_server_closed_is_replaced_without_an_error() -> None:
    async def one_request_per_connection(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await read_request(reader)
        writer.write(ok(b"fine"))  # says keep-alive, then closes anyway
        await writer.drain()

    async def scenario(url: str, stats: dict[str, Any]) -> tuple[list[bytes], int]:
        pool = UpstreamPool(1.0)
        bodies = []
        for _ in range(3):
            async with await pool.post(url, "/v1/x", b"") as resp:
                bodies.append(await resp.read())
        return bodies, stats["connections"]

    bodies, connections = run(one_request_per_connection, scenario)
    assert bodies == [b"fine"] * 3
    assert connections == 3


def test_a_response_not_read_to_the_end_is_never_reused() -> None:
    async def slow_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\n")
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.write(b"body")
            await writer.drain()

    async def scenario(url: str, stats: dict[str, Any]) -> int:
        pool = UpstreamPool(1.0)
        resp = await pool.post(url, "/v1/x", b"a")
        resp.release()  # the body is still on its way: this connection cannot serve another
        async with await pool.post(url, "/v1/x", b"b") as resp:
            assert await resp.read() == b"body"
        async with await pool.post(url, "/v1/x", b"c") as resp:
            assert await resp.read() == b"body"
        return int(stats["connections"])

    assert run(slow_body, scenario) == 2  # the second connection was kept for the third


def test_a_stream_nobody_reads_stops_being_read_from_the_socket() -> None:
    """Back-pressure: the client holds at most about HIGH_WATER of an unread stream."""
    sent = {"bytes": 0}

    async def firehose(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        chunk = b"x" * 16384
        while sent["bytes"] < 50 * HIGH_WATER:
            writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            sent["bytes"] += len(chunk)
            await writer.drain()  # blocks once the client stops reading

    async def scenario(url: str, _: dict[str, Any]) -> tuple[int, int]:
        resp = await UpstreamPool(1.0).post(url, "/v1/x", b"")
        await asyncio.sleep(0.5)
        buffered = resp._size
        first = len(await resp.readany())
        resp.close()
        return buffered, first

    buffered, first = run(firehose, scenario)
    assert buffered <= HIGH_WATER + 256 * 1024  # at most one socket read past the mark
    assert first == buffered
    # The server was held back (kernel buffers full), not read dry: 12.8 MB were never sent.
    assert sent["bytes"] < 50 * HIGH_WATER


def test_an_https_replica_is_spoken_to_with_tls() -> None:
    """A plain-HTTP server behind an https:// URL fails the TLS handshake: TLS was tried."""

    async def scenario(url: str, stats: dict[str, Any]) -> None:
        with pytest.raises(UpstreamConnectError):
            await UpstreamPool(1.0).post(url.replace("http://", "https://"), "/v1/x", b"")
        assert stats["connections"] == 1  # it connected, then the handshake failed

    run(echo_forever, scenario)


def test_an_unsupported_scheme_is_a_connect_error() -> None:
    async def main() -> None:
        with pytest.raises(UpstreamConnectError):
            await UpstreamPool(1.0).post("ftp://127.0.0.1:21", "/v1/x", b"")

    asyncio.run(main())


def test_send_writes_at_once_on_a_kept_connection_and_receive_connects_otherwise() -> None:
    seen: list[bytes] = []
    arrivals: dict[bytes, asyncio.Event] = {}

    async def recording_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head, body = await read_request(reader)
            path = head.split(b" ")[1]
            seen.append(path)
            arrivals.setdefault(path, asyncio.Event()).set()
            writer.write(ok(path + b" " + body))
            await writer.drain()

    async def scenario(url: str, stats: dict[str, Any]) -> None:
        pool = UpstreamPool(1.0)
        first = pool.send(url, "/v1/a", b"1")
        assert first.response is None  # nothing kept yet: written once received
        async with await pool.receive(first) as resp:
            assert await resp.read() == b"/v1/a 1"
        kept = pool.send(url, "/v1/b", b"2")
        assert kept.response is not None  # on the kept connection: written already
        await asyncio.wait_for(arrivals.setdefault(b"/v1/b", asyncio.Event()).wait(), 5)
        async with await pool.receive(kept) as resp:  # the engine had it before we waited
            assert await resp.read() == b"/v1/b 2"
        dropped = pool.send(url, "/v1/c", b"3")
        dropped.close()  # never received: its connection goes, nothing is reused
        assert dropped.response is None
        async with await pool.post(url, "/v1/d", b"4") as resp:
            assert await resp.read() == b"/v1/d 4"
        pool.close()
        assert seen[:2] == [b"/v1/a", b"/v1/b"] and seen[-1] == b"/v1/d"
        assert stats["connections"] == 2

    run(recording_echo, scenario)


def test_a_piped_stream_reaches_the_sink_in_the_read_callback_and_the_connection_is_kept() -> None:
    async def scenario(url: str, _: dict[str, Any]) -> tuple[list[bytes], bool, bool]:
        pool = UpstreamPool(1.0)
        resp = await pool.post(url, "/v1/chat/completions", b"{}")
        owner = asyncio.current_task()
        pieces: list[bytes] = []
        in_owner: list[bool] = []

        def sink(data: bytes) -> bool:
            pieces.append(data)
            in_owner.append(asyncio.current_task() is owner)
            return True

        ended = await resp.pipe(sink)
        resp.release()
        following = pool.send(url, "/v1/next", b"")
        kept = following.response is not None  # written on the same connection
        following.close()
        # The first piece may have been buffered with the headers, and is handed over by
        # pipe itself; the ones that came later never woke the task.
        return pieces, ended, any(in_owner[1:]) or not kept

    pieces, ended, stray = run(events_then_end, scenario)
    assert pieces == [b"data: 1\n\n", b"data: 2\n\n", b"data: [DONE]\n\n"]
    assert ended is True
    assert stray is False  # later pieces came in the read callback; one connection served both


def test_a_sink_that_must_wait_stops_the_pipe_and_pausing_holds_the_rest_back() -> None:
    async def scenario(url: str, _: dict[str, Any]) -> tuple[list[bytes], list[bool], bool]:
        resp = await UpstreamPool(1.0).post(url, "/v1/chat/completions", b"{}")
        pieces: list[bytes] = []
        results = [await resp.pipe(lambda data: bool(pieces.append(data)))]  # stops at once
        assert resp._conn is not None and resp._conn._paused  # nothing read while it waits
        await asyncio.sleep(0.1)  # the server wrote the rest meanwhile
        paused_pieces = list(pieces)

        def sink(data: bytes) -> bool:
            pieces.append(data)
            return True

        results.append(await resp.pipe(sink))  # resumes: the rest, then the end
        resp.release()
        return pieces, results, paused_pieces == [b"data: 1\n\n"]

    pieces, results, held = run(events_then_end, scenario)
    assert b"".join(pieces) == b"data: 1\n\ndata: 2\n\ndata: [DONE]\n\n"
    assert results == [False, True]
    assert held


def test_a_pipe_raises_when_the_replica_cuts_the_stream() -> None:
    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n9\r\ndata: 1\n\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)

    async def scenario(url: str, _: dict[str, Any]) -> list[bytes]:
        resp = await UpstreamPool(1.0).post(url, "/v1/chat/completions", b"{}")
        pieces: list[bytes] = []
        with pytest.raises(UpstreamDisconnected):
            await resp.pipe(lambda data: pieces.append(data) is None)
        resp.close()
        return pieces

    assert run(cut, scenario) == [b"data: 1\n\n"]


def test_a_pipe_whose_end_callback_fails_still_returns_and_drops_the_connection() -> None:
    async def scenario(url: str, _: dict[str, Any]) -> tuple[bool, bool]:
        resp = await UpstreamPool(1.0).post(url, "/v1/chat/completions", b"{}")
        conn = resp._conn
        assert conn is not None

        def on_end() -> None:
            raise RuntimeError("a bug in the caller")

        ended = await asyncio.wait_for(resp.pipe(lambda data: True, on_end), 5)
        resp.close()
        return ended, conn.lost

    ended, lost = run(events_then_end, scenario)
    assert ended is True  # woken, not left waiting for a deadline
    assert lost is True  # a connection whose parser raised is never reused
