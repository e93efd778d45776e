"""Automatic pipelining: Redis commands issued in the same event-loop turn share one round trip.

Each Redis call costs a socket write and a read, and on a small machine those system calls, not
Redis, bound the gateway. The limiter's decisions and the accounting writes of many concurrent
requests are therefore queued and sent as one pipeline; a lone request pays one extra loop
iteration. Each caller gets exactly its own commands' results (exceptions included, as values);
if the connection fails, every caller of that batch gets the exception.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis

Command = tuple[Any, ...]  # ("EVALSHA", sha, numkeys, *keys, *args), ("XADD", stream, "*", ...)


class PipelineBatcher:
    def __init__(self, redis: Redis, max_commands: int = 512, delay_s: float = 0.0) -> None:
        self._redis = redis
        self._delay = delay_s
        self._queue: list[tuple[Sequence[Command], asyncio.Future[list[Any]]]] = []
        self._queued = 0
        self._max = max_commands
        self._scheduled = False

    def submit(self, commands: Sequence[Command]) -> asyncio.Future[list[Any]]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[list[Any]] = loop.create_future()
        self._queue.append((commands, fut))
        self._queued += len(commands)
        if self._queued >= self._max:
            self._flush()
        elif not self._scheduled:
            self._scheduled = True
            if self._delay:
                loop.call_later(self._delay, self._flush)
            else:
                loop.call_soon(self._flush)
        return fut

    def _flush(self) -> None:
        self._scheduled = False
        if self._queue:
            batch, self._queue, self._queued = self._queue, [], 0
            asyncio.get_running_loop().create_task(self._send(batch))

    async def _send(self, batch: list[tuple[Sequence[Command], asyncio.Future[list[Any]]]]) -> None:
        pipe = self._redis.pipeline(transaction=False)
        for commands, _ in batch:
            for command in commands:
                pipe.execute_command(*command)
        try:
            results: list[Any] = await pipe.execute(raise_on_error=False)
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
