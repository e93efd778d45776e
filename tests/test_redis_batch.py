"""Auto-pipelining against a real redis-server: who shares a round trip, and who gets what."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from app.redis_batch import PipelineBatcher
from tests.support.platform import RedisProcess


class RoundTrips:
    """Counts the connections the batcher takes from the pool: one per round trip."""

    count = 0

    @classmethod
    def watch(cls, redis: Redis) -> None:
        pool = redis.connection_pool
        take = pool.get_connection

        async def counted(*args: Any, **kwargs: Any) -> Any:
            cls.count += 1
            return await take(*args, **kwargs)

        pool.get_connection = counted  # type: ignore[method-assign]


def run(redis_url: str, scenario: Any) -> Any:
    async def main() -> Any:
        RoundTrips.count = 0
        redis = Redis.from_url(redis_url)
        RoundTrips.watch(redis)
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
    assert RoundTrips.count == 1


def test_a_lazy_command_alone_waits_for_its_delay(redis_url: str) -> None:
    async def scenario(redis: Redis, batcher: PipelineBatcher) -> float:
        t0 = time.perf_counter()
        assert await batcher.submit([("SET", "k", "v")], lazy=True) == [b"OK"]  # raw replies
        return time.perf_counter() - t0

    waited = run(redis_url, scenario)
    assert 0.045 <= waited < 1.0
    assert RoundTrips.count == 1


def test_a_lazy_command_rides_along_with_the_next_urgent_one(redis_url: str) -> None:
    async def scenario(redis: Redis, batcher: PipelineBatcher) -> tuple[float, list[Any]]:
        t0 = time.perf_counter()
        lazy = batcher.submit([("SET", "k", "v")], lazy=True)
        await asyncio.sleep(0.005)
        urgent = await batcher.submit([("GET", "k")])
        assert await lazy == [b"OK"]
        return time.perf_counter() - t0, urgent

    elapsed, urgent = run(redis_url, scenario)
    assert urgent == [b"v"]  # queued first, so applied first
    assert elapsed < 0.045  # neither waited for the lazy delay
    assert RoundTrips.count == 1


def test_a_command_error_reaches_only_its_caller(redis_url: str) -> None:
    async def scenario(redis: Redis, batcher: PipelineBatcher) -> list[list[Any]]:
        good = batcher.submit([("SET", "s", "text")])
        bad = batcher.submit([("INCR", "s"), ("GET", "s")])
        return list(await asyncio.gather(good, bad))

    good, bad = run(redis_url, scenario)
    assert good == [b"OK"]
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
    assert RoundTrips.count == 3  # 512 at once, the rest after the delay, then the GET


def test_after_a_redis_restart_the_next_batch_succeeds(tmp_path: Path) -> None:
    """Every pooled connection died with the old server; nothing had run on it, so the batch
    is sent again on a fresh connection instead of failing its callers."""
    server = RedisProcess(tmp_path / "redis").start()
    try:

        async def main() -> list[Any]:
            redis = Redis.from_url(server.url)
            batcher = PipelineBatcher(redis)
            assert await batcher.submit([("SET", "k", "1")]) == [b"OK"]
            server.kill()
            server.start()
            try:
                return await batcher.submit([("INCR", "k")])
            finally:
                await redis.aclose()

        assert asyncio.run(main()) == [2]  # AOF kept the first write
    finally:
        server.stop()
