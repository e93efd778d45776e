"""Auto-pipelining against a real redis-server: who shares a round trip, and who gets what."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from app.redis_batch import PipelineBatcher
from tests.support.platform import RedisProcess


class RoundTrips:
    """Socket writes of the last scenario's batcher: one per round trip."""

    count = 0


def run(redis_url: str, scenario: Any) -> Any:
    async def main() -> Any:
        redis = Redis.from_url(redis_url)
        batcher = PipelineBatcher(redis, lazy_delay_s=0.05)
        try:
            return await scenario(redis, batcher)
        finally:
            RoundTrips.count = batcher.batches_sent
            await batcher.aclose()
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
        await batcher.aclose()
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
    assert RoundTrips.count == 2  # 512 at once, the rest after the delay (GET is redis-py's)


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
                await batcher.aclose()
                await redis.aclose()

        assert asyncio.run(main()) == [2]  # AOF kept the first write
    finally:
        server.stop()


def test_a_hung_redis_times_out_urgent_callers_then_the_connection(tmp_path: Path) -> None:
    """A stopped (not dead) server: urgent callers get TimeoutError after the urgent timeout;
    the held connection is dropped once its oldest reply is later than the reply timeout, so
    the next batch after the server resumes goes over a fresh connection."""
    server = RedisProcess(tmp_path / "redis").start()
    assert server.popen is not None
    try:

        async def main() -> tuple[float, BaseException, BaseException, list[Any]]:
            redis = Redis.from_url(server.url)
            batcher = PipelineBatcher(redis, urgent_timeout_s=0.2, reply_timeout_s=0.6)
            try:
                assert await batcher.submit([("SET", "k", "1")]) == [b"OK"]
                assert server.popen is not None
                server.popen.send_signal(signal.SIGSTOP)
                t0 = time.perf_counter()
                urgent = batcher.submit([("INCR", "k")])
                lazy = batcher.submit([("INCR", "k")], lazy=True)
                urgent_error = await asyncio.gather(urgent, return_exceptions=True)
                waited = time.perf_counter() - t0
                lazy_error = await asyncio.gather(lazy, return_exceptions=True)
                server.popen.send_signal(signal.SIGCONT)
                after = await batcher.submit([("GET", "k")])
                return waited, urgent_error[0], lazy_error[0], after
            finally:
                server.popen.send_signal(signal.SIGCONT)
                await batcher.aclose()
                await redis.aclose()

        waited, urgent_error, lazy_error, after = asyncio.run(main())
        assert isinstance(urgent_error, TimeoutError)
        assert 0.18 <= waited < 0.55  # the urgent timeout, not the reply timeout
        assert isinstance(lazy_error, TimeoutError)  # the link gave up on the hung server
        # Both INCRs reached the stopped server's socket and ran once it resumed: a timeout
        # says "unknown", never "not applied" (callers treat it so: accounting spools with
        # the request id that billing dedupes on).
        assert after in ([b"1"], [b"2"], [b"3"])
    finally:
        server.stop()


def test_replies_stay_in_order_across_many_interleaved_batches(redis_url: str) -> None:
    async def scenario(redis: Redis, batcher: PipelineBatcher) -> list[list[Any]]:
        await batcher.submit([("PING",)])  # the connection is up: batches leave as they come
        futures = []
        for i in range(300):
            futures.append(batcher.submit([("SET", f"k{i}", i), ("GET", f"k{i}")], lazy=i % 3 == 0))
            if i % 7 == 0:
                await asyncio.sleep(0)
        return list(await asyncio.gather(*futures))

    results = run(redis_url, scenario)
    assert results == [[b"OK", str(i).encode()] for i in range(300)]
    assert 3 < RoundTrips.count < 300  # callers shared round trips


def test_closing_on_a_hung_redis_fails_the_waiting_callers_and_leaves_no_task(
    tmp_path: Path,
) -> None:
    server = RedisProcess(tmp_path / "redis").start()
    assert server.popen is not None
    try:

        async def main() -> tuple[BaseException, set[asyncio.Task[Any]]]:
            redis = Redis.from_url(server.url)
            batcher = PipelineBatcher(redis, reply_timeout_s=5.0)
            try:
                assert await batcher.submit([("PING",)]) == [b"PONG"]  # raw replies
                assert server.popen is not None
                server.popen.send_signal(signal.SIGSTOP)
                pending = batcher.submit([("INCR", "k")], lazy=True)
                await asyncio.sleep(0.1)  # sent, no reply
                batcher._reply_timeout = 0.3  # shorten the drain at close
                await batcher.aclose()
                (error,) = await asyncio.gather(pending, return_exceptions=True)
                await asyncio.sleep(0)
                me = asyncio.current_task()
                return error, {t for t in asyncio.all_tasks() if t is not me}
            finally:
                server.popen.send_signal(signal.SIGCONT)
                await redis.aclose()

        error, left = asyncio.run(main())
        assert isinstance(error, RedisConnectionError)  # not retried on a new connection
        assert left == set()
    finally:
        server.stop()
