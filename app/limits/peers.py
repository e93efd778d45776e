"""How many gateway replicas are alive, for the fail-open fair share.

Each gateway refreshes its heartbeat in a Redis sorted set every few seconds and reads how many
are fresh; the last count seen stays in force while Redis is unreachable, which is exactly when
it is needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid

from redis.asyncio import Redis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

PEERS_KEY = "sy:gateways"


class PeerCount:
    def __init__(self, redis: Redis, interval_s: float = 5.0, minimum: int = 1) -> None:
        self._redis = redis
        self._interval = interval_s
        self.count = max(1, minimum)
        self._minimum = max(1, minimum)
        self.instance = uuid.uuid4().hex[:12]
        self._task: asyncio.Task[None] | None = None

    async def beat(self) -> None:
        now = time.time()
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.zadd(PEERS_KEY, {self.instance: now})
            pipe.zremrangebyscore(PEERS_KEY, "-inf", now - 3 * self._interval)
            pipe.zcard(PEERS_KEY)
            pipe.expire(PEERS_KEY, int(10 * self._interval) + 1)
            result = await pipe.execute()
        self.count = max(self._minimum, int(result[2]))

    async def start(self) -> None:
        with contextlib.suppress(RedisError, OSError):
            await self.beat()
        self._task = asyncio.create_task(self._loop(), name="peer-heartbeat")

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.beat()
            except (RedisError, OSError) as exc:
                log.debug(
                    "peers: heartbeat failed (%s); keeping count %d", type(exc).__name__, self.count
                )

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(RedisError, OSError):
            await self._redis.zrem(PEERS_KEY, self.instance)
