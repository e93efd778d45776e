"""Auto-pipelining against a real redis-server: who shares a round trip, and who gets what."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from app.redis_batch import PipelineBatcher


class CountingRedis(Redis):
    """Counts pipelines, i.e. round trips."""

    pipelines = 0

    def pipeline(self, *args: Any, **kwargs: Any) -> Any:
        CountingRedis.pipelines += 1
        return super().pipeline(*args, **kwargs)


def run(redis_url: str, scenario: Any) -> Any:
    async def main() -> Any:
        CountingRedis.pipelines = 0
        redis = CountingRedis.from_url(redis_url)
        try:
            return await scenario(redis, PipelineBatcher(redis, lazy_delay_s=0.05))
        finally:
            await redis.aclose()

    return asyncio.run(main())


def test_urgent_commands_of_one_loop_turn_share_one_round_trip(redis_url: str) -> None:
    async def scenario(redis: Redis, batcher: PipelineBatcher) -> list[list[Any]]:
        futures = [batcher.submit([("INCRBY", "n", i), ("GET", "n")]) for i in range(1, 4)]
        return list(await asyncio.gather(*futures))

    results = run(redis_url, scenario)
    assert results == [[1, b"1"], [3, b"3"], [6, b"6"]]  # each caller gets its own replies
    assert CountingRedis.pipelines == 1


def test_a_lazy_command_alone_waits_for_its_delay(redis_url: str) -> None:
    async def scenario(redis: Redis, batcher: PipelineBatcher) -> float:
        t0 = time.perf_counter()
        assert await batcher.submit([("SET", "k", "v")], lazy=True) == [True]
        return time.perf_counter() - t0

    waited = run(redis_url, scenario)
    assert 0.045 <= waited < 1.0
    assert CountingRedis.pipelines == 1


def test_a_lazy_command_rides_along_with_the_next_urgent_one(redis_url: str) -> None:
    async def scenario(redis: Redis, batcher: PipelineBatcher) -> tuple[float, list[Any]]:
        t0 = time.perf_counter()
        lazy = batcher.submit([("SET", "k", "v")], lazy=True)
        await asyncio.sleep(0.005)
        urgent = await batcher.submit([("GET", "k")])
        assert await lazy == [True]
        return time.perf_counter() - t0, urgent

    elapsed, urgent = run(redis_url, scenario)
    assert urgent == [b"v"]  # queued first, so applied first
    assert elapsed < 0.045  # neither waited for the lazy delay
    assert CountingRedis.pipelines == 1


def test_a_command_error_reaches_only_its_caller(redis_url: str) -> None:
    async def scenario(redis: Redis, batcher: PipelineBatcher) -> list[list[Any]]:
        good = batcher.submit([("SET", "s", "text")])
        bad = batcher.submit([("INCR", "s"), ("GET", "s")])
        return list(await asyncio.gather(good, bad))

    good, bad = run(redis_url, scenario)
    assert good == [True]
    assert isinstance(bad[0], ResponseError)  # not an integer
    assert bad[1] == b"text"  # the rest of the batch still ran


def test_a_dead_connection_fails_every_caller_of_the_batch() -> None:
    async def main() -> list[BaseException]:
        redis = Redis(port=1, socket_connect_timeout=0.5)  # nothing listens on port 1
        batcher = PipelineBatcher(redis)
        futures = [batcher.submit([("PING",)]), batcher.submit([("PING",)], lazy=True)]
        outcomes = await asyncio.gather(*futures, return_exceptions=True)
        await redis.aclose()
        return [o for o in outcomes if isinstance(o, BaseException)]

    errors = asyncio.run(main())
    assert len(errors) == 2
    assert all(isinstance(e, RedisConnectionError | OSError) for e in errors)


def test_a_full_queue_is_sent_at_once(redis_url: str) -> None:
    async def scenario(redis: Redis, batcher: PipelineBatcher) -> int:
        futures = [batcher.submit([("INCR", "n")], lazy=True) for _ in range(600)]
        await asyncio.gather(*futures)
        return int(await redis.get("n"))

    assert run(redis_url, scenario) == 600
    assert CountingRedis.pipelines == 2  # 512 at once, then the rest after the delay
