"""API keys: issued once in plaintext, stored only as a SHA-256 hash, looked up by id.

A key reads ``sy-<id>-<secret>``. The id is public (it appears in listings, logs and usage);
the secret is 32 random bytes. Looking the record up by id and then comparing hashes with
``hmac.compare_digest`` makes a check's timing independent of how much of a key matched.
A fast hash is right here (unlike for passwords): the secret has 256 bits of entropy.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field
from redis.asyncio import Redis

KEY_PREFIX = "sy-"
_ID_ALPHABET = "abcdefghijkmnpqrstuvwxyz23456789"  # no look-alikes (l, o, 0, 1)
_KEY_RE = re.compile(r"^sy-([a-z2-9]{12})-([A-Za-z0-9_-]{43})$")
_ID_RE = re.compile(r"^[a-z2-9]{12}$")
INDEX = "sy:keys"


def record_key(key_id: str) -> str:
    return f"sy:key:{{{key_id}}}"


class Limits(BaseModel):
    """Requests and tokens per minute; None = no limit on that dimension."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    rpm: int | None = Field(None, ge=1)
    tpm: int | None = Field(None, ge=1)


CUSTOMER_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,255}$")


def customer_key(customer: str) -> str:
    return f"sy:customer:{{{customer}}}"


class KeyRecord(BaseModel):
    """What the gateway knows about a key. ``models=None`` means every model."""

    model_config = ConfigDict(frozen=True)

    id: str
    hash: str = Field(repr=False)
    customer: str
    name: str = ""
    models: tuple[str, ...] | None = None
    rpm: int | None = Field(None, ge=1)
    tpm: int | None = Field(None, ge=1)
    model_limits: dict[str, Limits] | None = None
    max_concurrent: int | None = Field(None, ge=1)
    expires_at: float | None = None
    created_at: float
    revoked_at: float | None = None

    def allows(self, model: str) -> bool:
        return self.models is None or model in self.models

    def active(self, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        return self.revoked_at is None and (self.expires_at is None or now < self.expires_at)

    def public(self) -> dict[str, Any]:
        """The record without its hash, for listings and the admin API."""
        data = self.model_dump(exclude={"hash"}, exclude_none=False)
        data["models"] = list(self.models) if self.models is not None else None
        data["status"] = (
            "revoked" if self.revoked_at else ("expired" if not self.active() else "active")
        )
        return data


def hash_key(plaintext: str) -> str:
    return hashlib.sha256(plaintext.encode()).hexdigest()


def parse_key(plaintext: str) -> str | None:
    """Return the key id if the key is well formed, else None."""
    m = _KEY_RE.match(plaintext)
    return m.group(1) if m else None


def new_key() -> tuple[str, str]:
    key_id = "".join(secrets.choice(_ID_ALPHABET) for _ in range(12))
    return key_id, f"{KEY_PREFIX}{key_id}-{secrets.token_urlsafe(32)}"


_NO_HASH = "0" * 64


def hash_matches(record: KeyRecord | None, plaintext: str) -> bool:
    """Constant-time check; an absent record is compared against a hash nothing matches."""
    expected = record.hash if record is not None else _NO_HASH
    return hmac.compare_digest(expected, hash_key(plaintext))


def valid_id(key_id: str) -> bool:
    return bool(_ID_RE.match(key_id))


class KeyStore:
    """Key records in Redis: one string per key (hash-tagged by id) plus an index set."""

    def __init__(self, redis: Redis) -> None:
        self._redis = redis

    async def create(
        self,
        customer: str,
        models: list[str] | None = None,
        rpm: int | None = None,
        tpm: int | None = None,
        expires_at: float | None = None,
        name: str = "",
        model_limits: dict[str, Limits] | None = None,
        max_concurrent: int | None = None,
    ) -> tuple[KeyRecord, str]:
        """Store a new key and return (record, plaintext). The plaintext is not kept."""
        if not CUSTOMER_RE.match(customer):
            raise ValueError("customer must be 1-255 of letters, digits and _ . : -")
        while True:
            key_id, plaintext = new_key()
            record = KeyRecord(
                id=key_id,
                hash=hash_key(plaintext),
                customer=customer,
                name=name,
                models=tuple(models) if models is not None else None,
                rpm=rpm,
                tpm=tpm,
                model_limits=model_limits,
                max_concurrent=max_concurrent,
                expires_at=expires_at,
                created_at=time.time(),
            )
            if await self._redis.set(record_key(key_id), record.model_dump_json(), nx=True):
                break
        await self._redis.sadd(INDEX, key_id)
        return record, plaintext

    async def get(self, key_id: str) -> KeyRecord | None:
        raw = await self._redis.get(record_key(key_id))
        return KeyRecord.model_validate(orjson.loads(raw)) if raw else None

    async def list(self) -> list[KeyRecord]:
        ids = sorted(await self._redis.smembers(INDEX))
        if not ids:
            return []
        raws = await self._redis.mget(
            [record_key(i if isinstance(i, str) else i.decode()) for i in ids]
        )
        records = [KeyRecord.model_validate(orjson.loads(r)) for r in raws if r]
        return sorted(records, key=lambda r: r.created_at)

    async def revoke(self, key_id: str) -> KeyRecord | None:
        """Mark the key revoked (kept for audit and usage attribution). Idempotent."""
        record = await self.get(key_id)
        if record is None:
            return None
        if record.revoked_at is None:
            record = record.model_copy(update={"revoked_at": time.time()})
            await self._redis.set(record_key(key_id), record.model_dump_json())
        return record

    async def get_customer_limits(self, customer: str) -> Limits | None:
        raw = await self._redis.get(customer_key(customer))
        return Limits.model_validate(orjson.loads(raw)) if raw else None

    async def set_customer_limits(self, customer: str, limits: Limits | None) -> None:
        """Limits shared by all of a customer's keys; None removes them."""
        if not CUSTOMER_RE.match(customer):
            raise ValueError("customer must be 1-255 of letters, digits and _ . : -")
        if limits is None or (limits.rpm is None and limits.tpm is None):
            await self._redis.delete(customer_key(customer))
        else:
            await self._redis.set(customer_key(customer), limits.model_dump_json())
