"""Automatic pipelining: Redis commands issued close together share one round trip.

Each Redis call costs a socket write and a read, and on a small VM those system calls (each
write wakes another process) bound the gateway more than Redis does. Commands are therefore
queued and sent as one pipeline:

- urgent commands (the limiter's decisions, which a request waits for) leave at the end of the
  current event-loop turn, together with whatever else is queued;
- lazy commands (accounting after a response, which nobody waits for) wait up to
  ``lazy_delay_s`` for an urgent batch to ride along with, so at steady load they cost no
  round trip of their own.

Each caller gets exactly its own commands' results (exceptions included, as values); if the
connection fails, every caller waiting on it gets the exception.

The batches go over one connection that the batcher holds (a *link*): a batch is one
synchronous socket write, and one long-lived task reads the replies and hands them out in
order. redis-py still opens the connection (TLS, AUTH, SELECT, Unix sockets are its), but its
per-command request/response path (a pool checkout, a lock and a coroutine per reply) cost
more CPU than the limiter's whole decision.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import hiredis
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.exceptions import BusyLoadingError, NoScriptError, ReadOnlyError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError

Command = tuple[Any, ...]  # ("EVALSHA", sha, numkeys, *keys, *args), ("XADD", stream, "*", ...)


class _Waiter:
    """One caller's commands on the wire: its future gets its replies once all arrived."""

    __slots__ = ("commands", "fut", "replies", "retried", "sent_at")

    def __init__(self, commands: Sequence[Command], fut: asyncio.Future[list[Any]]) -> None:
        self.commands = commands
        self.fut = fut
        self.replies: list[Any] = []
        self.retried = False
        self.sent_at = 0.0


class PipelineBatcher:
    def __init__(
        self,
        redis: Redis,
        max_commands: int = 512,
        lazy_delay_s: float = 0.005,
        urgent_timeout_s: float | None = None,
        reply_timeout_s: float = 2.0,
    ) -> None:
        """``urgent_timeout_s``: an urgent caller gets ``TimeoutError`` after this long (one
        timer per batch, not per caller). ``reply_timeout_s``: a link whose oldest reply is
        this late is dropped, failing everyone on it, so a hung Redis cannot hold it forever."""
        self._redis = redis
        self._lazy_delay = lazy_delay_s
        self._urgent_timeout = urgent_timeout_s
        self._reply_timeout = reply_timeout_s
        self._queue: list[_Waiter] = []
        self._urgent_queued: list[_Waiter] = []
        self._queued = 0
        self._max = max_commands
        self._urgent = False  # a flush at the end of this loop turn is scheduled
        self._timer: asyncio.TimerHandle | None = None
        self._link: _Link | None = None
        self._backlog: list[_Waiter] = []  # flushed while no link was up
        self._connecting: asyncio.Task[None] | None = None
        self._closed = False
        self.batches_sent = 0  # socket writes, i.e. round trips (tests and benchmarks)

    def submit(self, commands: Sequence[Command], lazy: bool = False) -> asyncio.Future[list[Any]]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[list[Any]] = loop.create_future()
        waiter = _Waiter(commands, fut)
        self._queue.append(waiter)
        self._queued += len(commands)
        if not lazy and self._urgent_timeout is not None:
            self._urgent_queued.append(waiter)
        if self._queued >= self._max:
            self._flush()
        elif not lazy:
            if not self._urgent:
                self._urgent = True
                loop.call_soon(self._flush)
        elif self._timer is None and not self._urgent:
            self._timer = loop.call_later(self._lazy_delay, self._flush)
        return fut

    def _flush(self) -> None:
        self._urgent = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._queue:
            return
        batch, self._queue, self._queued = self._queue, [], 0
        if self._urgent_queued:
            urgent, self._urgent_queued = self._urgent_queued, []
            assert self._urgent_timeout is not None
            asyncio.get_running_loop().call_later(self._urgent_timeout, _expire, urgent)
        self._send(batch)

    def _send(self, batch: list[_Waiter]) -> None:
        link = self._link
        if link is not None and link.alive:
            link.send(batch)
            self.batches_sent += 1
            return
        self._backlog += batch
        if self._connecting is None:
            self._connecting = asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        pool = self._redis.connection_pool
        try:
            conn = await pool.get_connection()  # type: ignore[no-untyped-call]
        except BaseException as exc:  # nobody can be served: every waiting caller learns it
            backlog, self._backlog = self._backlog, []
            _fail(backlog, exc)
            if not isinstance(exc, Exception):
                raise
            return
        finally:
            self._connecting = None
        self._link = _Link(conn, pool, self._reply_timeout, self._retry)
        backlog, self._backlog = self._backlog, []
        if backlog:
            self._send(backlog)

    def _retry(self, waiters: list[_Waiter], exc: Exception) -> None:
        """Callers whose connection dropped before any of their replies (a Redis restart
        leaves the held connection dead): nothing of theirs has run, so they go again, once,
        on a fresh connection; unless the batcher is closing, when they learn ``exc``."""
        if self._closed:
            _fail(waiters, exc)
        else:
            self._send(waiters)

    async def aclose(self) -> None:
        """Send what is queued, wait (briefly) for the replies, then drop the connection."""
        self._flush()
        self._closed = True
        if self._connecting is not None:
            with contextlib.suppress(Exception):
                await self._connecting
        link = self._link
        if link is not None:
            await link.drain(self._reply_timeout)
            await link.close()
        self._link = None


class _Link:
    """A held redis-py connection: batches are written as they come, and one task reads the
    replies (hiredis) and hands them to the waiters in the order they were sent."""

    def __init__(
        self,
        conn: AbstractConnection,
        pool: ConnectionPool,
        reply_timeout_s: float,
        retry: Callable[[list[_Waiter], Exception], None],
    ) -> None:
        self._conn = conn
        self._pool = pool
        self._timed_out = False
        self._writer: asyncio.StreamWriter = conn._writer  # type: ignore[assignment]
        self._reader: asyncio.StreamReader = conn._reader  # type: ignore[assignment]
        self._parser = hiredis.Reader()
        self._waiting: deque[_Waiter] = deque()
        self._reply_timeout = reply_timeout_s
        self._watchdog: asyncio.TimerHandle | None = None
        self._retry = retry
        self._idle = asyncio.Event()
        self._idle.set()
        self.alive = True
        self._released: asyncio.Task[None] | None = None
        self._task = asyncio.get_running_loop().create_task(self._read())

    def send(self, batch: list[_Waiter]) -> None:
        self._writer.write(b"".join([pack_command(c) for w in batch for c in w.commands]))
        now = time.monotonic()
        for w in batch:
            w.sent_at = now
        self._waiting.extend(batch)
        self._idle.clear()
        if self._watchdog is None:
            self._watchdog = asyncio.get_running_loop().call_later(self._reply_timeout, self._check)

    def _check(self) -> None:
        self._watchdog = None
        if not self._waiting or not self.alive:
            return
        late = time.monotonic() - self._waiting[0].sent_at
        if late >= self._reply_timeout:
            self._timed_out = True
            self._task.cancel()
            return
        self._watchdog = asyncio.get_running_loop().call_later(
            self._reply_timeout - late, self._check
        )

    async def _read(self) -> None:
        waiting, parser = self._waiting, self._parser
        try:
            while True:
                data = await self._reader.read(65536)
                if not data:
                    raise RedisConnectionError("Redis closed the connection")
                parser.feed(data)
                while (reply := parser.gets()) is not False:
                    waiter = waiting[0]
                    waiter.replies.append(
                        _error(reply) if isinstance(reply, hiredis.ReplyError) else reply
                    )
                    if len(waiter.replies) == len(waiter.commands):
                        waiting.popleft()
                        if not waiter.fut.done():
                            waiter.fut.set_result(waiter.replies)
                if not waiting:
                    self._idle.set()
        except asyncio.CancelledError:
            if self._timed_out:
                self._lost(TimeoutError(f"no reply from Redis in {self._reply_timeout} s"))
            else:
                self._lost(RedisConnectionError("the connection to Redis was closed"))
        except BaseException as exc:
            self._lost(exc if isinstance(exc, Exception) else RedisConnectionError(str(exc)))
            if not isinstance(exc, Exception):
                raise

    def _lost(self, exc: Exception) -> None:
        self.alive = False
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        waiting = list(self._waiting)
        self._waiting.clear()
        self._idle.set()
        again: list[_Waiter] = []
        for w in waiting:
            if w.fut.done():  # expired or cancelled: nobody wants its replies
                continue
            if isinstance(exc, RedisConnectionError) and not (w.replies or w.retried):
                w.retried = True
                again.append(w)
            else:
                w.fut.set_exception(exc)
        self._released = asyncio.get_running_loop().create_task(self._release())
        if again:
            self._retry(again, exc)

    async def drain(self, limit_s: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(limit_s):
                await self._idle.wait()

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(BaseException):
            await self._task  # its end (_lost) releases the connection
        if self._released is not None:
            await self._released
        else:  # cancelled before it ever ran
            await self._release()

    async def _release(self) -> None:
        with contextlib.suppress(Exception):
            await self._conn.disconnect()
        with contextlib.suppress(Exception):
            await self._pool.release(self._conn)


def _expire(waiters: list[_Waiter]) -> None:
    for w in waiters:
        if not w.fut.done():
            w.fut.set_exception(TimeoutError("Redis did not answer in time"))


def _fail(waiters: list[_Waiter], exc: BaseException) -> None:
    for w in waiters:
        if not w.fut.done():
            w.fut.set_exception(exc)


_ERRORS: dict[str, type[Exception]] = {
    "NOSCRIPT": NoScriptError,
    "LOADING": BusyLoadingError,
    "READONLY": ReadOnlyError,
}


def _error(reply: hiredis.ReplyError) -> Exception:
    """The redis-py exception redis-py itself would have raised for this error reply."""
    message = str(reply)
    return _ERRORS.get(message.split(" ", 1)[0], ResponseError)(message)


def pack_command(command: Command) -> bytes:
    return hiredis.pack_command(command)  # type: ignore[no-any-return]
