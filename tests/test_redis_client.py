"""The hiredis packer sends exactly what redis-py's own packer would, over every scheme."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from redis.asyncio.connection import Connection
from redis.exceptions import DataError

from app.redis_client import (
    PackedConnection,
    PackedSSLConnection,
    PackedUnixConnection,
    redis_client,
)

COMMANDS: list[tuple[Any, ...]] = [
    ("EVALSHA", "0" * 40, 2, "sy:rl:{cus_1}:k:abc:r", b"raw\x00bytes", 30, -1, 0.2, 1 / 3),
    ("XADD", "sy:{bill}:usage", "*", "model", "chat-ü", "tokens", 10**15),
    ("CONFIG GET", "maxmemory"),
    (b"CLIENT SETNAME", "x"),
    ("SET", "k", 1e20, "PX", 1000),
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: str(c[0]))
def test_packs_like_redis_py(command: tuple[Any, ...]) -> None:
    ours = b"".join(PackedConnection().pack_command(*command))
    theirs = b"".join(Connection().pack_command(*command))
    assert ours == theirs


def test_refuses_what_redis_py_refuses() -> None:
    with pytest.raises(DataError):
        PackedConnection().pack_command("SET", "k", object())


@pytest.mark.parametrize(
    ("url", "cls"),
    [
        ("redis://127.0.0.1:6379/0", PackedConnection),
        ("rediss://:secret@cache.example:6380/0", PackedSSLConnection),
        ("unix:///run/redis.sock?db=0", PackedUnixConnection),
    ],
)
def test_every_scheme_keeps_its_transport(url: str, cls: type) -> None:
    client = redis_client(url)
    assert client.connection_pool.connection_class is cls
    if url.startswith("rediss"):
        assert client.connection_pool.connection_kwargs["password"] == "secret"


def test_round_trip_against_a_real_server(redis_url: str) -> None:
    async def main() -> list[Any]:
        client = redis_client(redis_url)
        try:
            async with client.pipeline(transaction=False) as pipe:
                pipe.set("k", "välue")
                pipe.incrbyfloat("f", 0.2)
                pipe.get("k")
                return list(await pipe.execute())
        finally:
            await client.aclose()

    assert asyncio.run(main()) == [True, 0.2, "välue".encode()]
