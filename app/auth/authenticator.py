"""Bearer-key authentication with a per-process cache.

Each gateway process caches key records for at most ``key_cache_ttl_s`` (<= 1 s), so a
revocation written to Redis by any process (CLI, admin API, another gateway) takes effect
everywhere within a second, while a busy key costs at most one Redis GET per second per
process. When Redis cannot be reached, a record seen before is still honoured (stale) rather
than failing every request; a key never seen gets 503.
"""

from __future__ import annotations

import asyncio
import logging
import time

from redis.exceptions import RedisError

from app.auth.keys import KeyRecord, KeyStore, hash_matches, parse_key
from app.errors import APIError, unauthorized, unavailable
from app.ttl_cache import fresh

log = logging.getLogger(__name__)

_MAX_CACHE = 100_000


def _bearer(authorization: str | None) -> tuple[str, str]:
    """(key id, token) of a well-formed bearer header, else 401."""
    if not authorization:
        raise unauthorized(
            "Missing bearer token: send 'Authorization: Bearer <api key>'.", "missing_api_key"
        )
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise unauthorized("Malformed Authorization header: expected 'Bearer <api key>'.")
    key_id = parse_key(token)
    if key_id is None:
        raise unauthorized("Incorrect API key provided.")
    return key_id, token


def _checked(record: KeyRecord | None, token: str) -> KeyRecord:
    """The record if ``token`` is its key and it is active, else 401."""
    # Hash and compare even for an unknown id, so both paths cost the same.
    if not hash_matches(record, token) or record is None:
        raise unauthorized("Incorrect API key provided.")
    if record.revoked_at is not None:
        raise unauthorized("This API key has been revoked.", "revoked_api_key")
    if not record.active():
        raise unauthorized("This API key has expired.", "expired_api_key")
    return record


class Authenticator:
    def __init__(self, store: KeyStore, ttl_s: float) -> None:
        self._store = store
        self._ttl = ttl_s
        self._cache: dict[str, tuple[float, KeyRecord | None]] = {}
        self._inflight: dict[str, asyncio.Future[KeyRecord | None]] = {}

    def invalidate(self, key_id: str) -> None:
        self._cache.pop(key_id, None)

    async def authenticate(self, authorization: str | None) -> KeyRecord:
        """Return the active record for an ``Authorization: Bearer`` header or raise 401/503."""
        key_id, token = _bearer(authorization)
        return _checked(await self._lookup(key_id), token)

    def authenticate_cached(self, authorization: str | None) -> KeyRecord | None:
        """``authenticate`` without awaiting: None when the key's record is not freshly
        cached (the caller then awaits ``authenticate``)."""
        key_id, token = _bearer(authorization)
        cached, record = fresh(self._cache, key_id, self._ttl)
        return _checked(record, token) if cached else None

    async def _lookup(self, key_id: str) -> KeyRecord | None:
        cached, record = fresh(self._cache, key_id, self._ttl)
        if cached:
            return record
        hit = self._cache.get(key_id)  # stale: still honoured while Redis cannot answer
        # Single flight: concurrent requests for the same key share one Redis GET.
        pending = self._inflight.get(key_id)
        if pending is not None:
            return await asyncio.shield(pending)
        fut: asyncio.Future[KeyRecord | None] = asyncio.get_running_loop().create_future()
        self._inflight[key_id] = fut
        try:
            record = await self._store.get(key_id)
        except RedisError as exc:
            if hit is not None:
                log.warning(
                    "auth: redis unavailable (%s); using cached record for key %s",
                    type(exc).__name__,
                    key_id,
                )
                fut.set_result(hit[1])
                return hit[1]
            err: APIError = unavailable("Key store unavailable; retry shortly.", 1)
            fut.set_exception(err)
            fut.exception()  # mark retrieved so an unawaited future does not warn
            raise err from exc
        finally:
            self._inflight.pop(key_id, None)
        if len(self._cache) >= _MAX_CACHE:
            self._cache.clear()
        self._cache[key_id] = (time.monotonic(), record)
        fut.set_result(record)
        return record
