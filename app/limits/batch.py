"""Automatic pipelining of the limiter's script calls.

Each Redis call costs a socket write and a read; on a small machine those syscalls, not Redis,
bound the decisions per second. Calls made in the same event-loop turn are therefore sent as
one pipeline: a lone request pays one extra loop iteration, many concurrent requests share
one round trip.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

Call = tuple[AsyncScript, Sequence[str], Sequence[Any], "asyncio.Future[Any]"]


class ScriptBatcher:
    def __init__(self, redis: Redis, max_batch: int = 256) -> None:
        self._redis = redis
        self._queue: list[Call] = []
        self._max = max_batch
        self._scheduled = False

    def call(
        self, script: AsyncScript, keys: Sequence[str], args: Sequence[Any]
    ) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._queue.append((script, keys, args, fut))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        return fut

    def _flush(self) -> None:
        self._scheduled = False
        while self._queue:
            batch, self._queue = self._queue[: self._max], self._queue[self._max :]
            asyncio.get_running_loop().create_task(self._send(batch))

    async def _send(self, batch: list[Call]) -> None:
        try:
            results = await self._execute(batch)
            if any(isinstance(r, NoScriptError) for r in results):
                for script in {id(c[0]): c[0] for c in batch}.values():
                    await self._redis.script_load(script.script)
                results = await self._execute(batch)
        except BaseException as exc:  # the connection failed: every caller learns it
            for *_, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for (*_, fut), result in zip(batch, results, strict=True):
            if fut.done():
                continue
            if isinstance(result, Exception):
                fut.set_exception(result)
            else:
                fut.set_result(result)

    async def _execute(self, batch: list[Call]) -> list[Any]:
        pipe = self._redis.pipeline(transaction=False)
        for script, keys, args, _ in batch:
            pipe.evalsha(script.sha, len(keys), *keys, *args)
        results: list[Any] = await pipe.execute(raise_on_error=False)
        return results
