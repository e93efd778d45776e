"""The gateway's HTTP protocol sends what one loop turn wrote in one socket write."""

from __future__ import annotations

import asyncio
from typing import Any

from app.http_protocol import CoalescingTransport, DisconnectHook


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
