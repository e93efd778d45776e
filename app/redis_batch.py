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
connection fails, every caller of that batch gets the exception.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import hiredis
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

Command = tuple[Any, ...]  # ("EVALSHA", sha, numkeys, *keys, *args), ("XADD", stream, "*", ...)


class PipelineBatcher:
    def __init__(self, redis: Redis, max_commands: int = 512, lazy_delay_s: float = 0.005) -> None:
        self._redis = redis
        self._lazy_delay = lazy_delay_s
        self._queue: list[tuple[Sequence[Command], asyncio.Future[list[Any]]]] = []
        self._queued = 0
        self._max = max_commands
        self._urgent = False  # a flush at the end of this loop turn is scheduled
        self._timer: asyncio.TimerHandle | None = None

    def submit(self, commands: Sequence[Command], lazy: bool = False) -> asyncio.Future[list[Any]]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[list[Any]] = loop.create_future()
        self._queue.append((commands, fut))
        self._queued += len(commands)
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
        if self._queue:
            batch, self._queue, self._queued = self._queue, [], 0
            asyncio.get_running_loop().create_task(self._send(batch))

    async def _send(self, batch: list[tuple[Sequence[Command], asyncio.Future[list[Any]]]]) -> None:
        try:
            results = await self._execute([c for commands, _ in batch for c in commands])
        except BaseException as exc:  # the connection failed: every caller learns it
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        start = 0
        for commands, fut in batch:
            end = start + len(commands)
            if not fut.done():
                fut.set_result(results[start:end])
            start = end

    async def _execute(self, commands: list[Command]) -> list[Any]:
        """One write and the replies, on a pooled redis-py connection (so TLS, AUTH, SELECT
        and reconnects are redis-py's) without its Pipeline object, whose bookkeeping cost
        ~40% of the CPU of a batch. Replies are raw (no response callbacks); errors are
        values. A connection that dropped before any reply (a Redis restart leaves every
        pooled connection dead) is retried once on a fresh one: nothing has run then."""
        packed = b"".join(map(pack_command, commands))
        pool = self._redis.connection_pool
        for attempt in (1, 2):
            conn = await pool.get_connection()  # type: ignore[no-untyped-call]
            results: list[Any] = []
            try:
                await conn.send_packed_command(packed, check_health=False)
                for _ in commands:
                    try:
                        results.append(await conn.read_response())
                    except ResponseError as exc:
                        results.append(exc)
                return results
            except BaseException as exc:
                await conn.disconnect()  # unread replies may be left: never reuse this socket
                if attempt == 1 and not results and isinstance(exc, RedisConnectionError):
                    continue
                raise
            finally:
                await pool.release(conn)
        raise AssertionError("unreachable")


def pack_command(command: Command) -> bytes:
    return hiredis.pack_command(command)  # type: ignore[no-any-return]
