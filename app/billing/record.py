"""The gateway's side of billing: one usage event per finished request.

The event is appended to the Redis Stream ``sy:{bill}:usage`` in the same pipeline that settles
the rate-limit reservation. When Redis cannot take it, it is appended to a local spool file
(one JSON object per line, fsync'd) and replayed into the stream once Redis answers again. A
replay may repeat an event; the billing worker folds each request id once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from pathlib import Path

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

STREAM = "sy:{bill}:usage"
FIELDS = ("rid", "key", "cus", "model", "pt", "ct", "ts", "src")


def usage_event(
    request_id: str,
    key_id: str,
    customer: str,
    model: str,
    prompt: int,
    completion: int,
    source: str,
) -> dict[str, str]:
    return {
        "rid": request_id,
        "key": key_id,
        "cus": customer,
        "model": model,
        "pt": str(prompt),
        "ct": str(completion),
        "ts": str(int(time.time() * 1000)),
        "src": source,
    }


class Spool:
    """Append-only, fsync'd local file of usage events Redis could not take."""

    def __init__(self, directory: Path) -> None:
        self._dir = directory
        self._path = directory / f"usage-{os.getpid()}.jsonl"
        self._lock = asyncio.Lock()

    def append(self, event: dict[str, str]) -> None:
        """Synchronous on purpose: the event must be on disk before the request is done."""
        self._dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, orjson.dumps(event) + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)

    def pending(self) -> list[Path]:
        """Spool files of this and of earlier (crashed) processes in the same directory."""
        if not self._dir.is_dir():
            return []
        return sorted(self._dir.glob("usage-*.jsonl"))

    async def replay(self, redis: Redis) -> int:
        """Move every spooled event into the stream; a file is removed only when all of it is
        in. Returns the number of events replayed."""
        async with self._lock:
            moved = 0
            for path in self.pending():
                claimed = path.with_suffix(f".replay-{os.getpid()}")
                try:
                    path.rename(claimed)  # one replayer per file, also across processes
                except OSError:
                    continue
                events = [
                    orjson.loads(line) for line in claimed.read_bytes().splitlines() if line.strip()
                ]
                try:
                    async with redis.pipeline(transaction=False) as pipe:
                        for event in events:
                            pipe.xadd(STREAM, event)
                        await pipe.execute()
                except (RedisError, OSError):
                    self._release(claimed)  # try again later; nothing lost
                    raise
                claimed.unlink()
                moved += len(events)
            if moved:
                log.warning("billing: replayed %d spooled usage events into Redis", moved)
            return moved

    def _release(self, claimed: Path) -> None:
        """Give a claimed file back to the spool under a new name of the pending pattern: its
        old name may hold events appended since (renaming over it would drop them)."""
        claimed.rename(self._dir / f"usage-{os.getpid()}-{uuid.uuid4().hex}.jsonl")

    def recover_claims(self) -> None:
        """Files a crashed replay left claimed go back to the spool."""
        if self._dir.is_dir():
            for claimed in self._dir.glob("usage-*.replay-*"):
                with contextlib.suppress(OSError):
                    self._release(claimed)


class SpoolReplayer:
    """Background task: replays the spool whenever there is something in it."""

    def __init__(self, spool: Spool, redis: Redis, interval_s: float = 2.0) -> None:
        self._spool = spool
        self._redis = redis
        self._interval = interval_s
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._spool.recover_claims()
        self._task = asyncio.create_task(self._loop(), name="spool-replayer")

    async def _loop(self) -> None:
        while True:
            if self._spool.pending():
                try:
                    await self._spool.replay(self._redis)
                except (RedisError, OSError) as exc:
                    log.debug("billing: spool replay deferred (%s)", type(exc).__name__)
            await asyncio.sleep(self._interval)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
