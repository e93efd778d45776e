"""Everything a request handler needs, built once per app in ``lifespan`` (no singletons)."""

from __future__ import annotations

from dataclasses import dataclass

import aiohttp
from redis.asyncio import Redis
from starlette.requests import Request

from app.auth.authenticator import Authenticator
from app.auth.keys import KeyStore
from app.limits.limiter import Limiter
from app.limits.peers import PeerCount
from app.metrics import GatewayMetrics
from app.proxy.relay import Proxy
from app.routing.pool import Router
from app.settings import Settings
from app.usage import Accounting, TaskSet


@dataclass
class Services:
    settings: Settings
    redis: Redis
    session: aiohttp.ClientSession
    metrics: GatewayMetrics
    keys: KeyStore
    auth: Authenticator
    router: Router
    proxy: Proxy
    accounting: Accounting
    tasks: TaskSet
    limiter: Limiter
    peers: PeerCount


async def get_services(request: Request) -> Services:
    """Async on purpose: FastAPI runs a sync dependency in a thread pool, one hop per request."""
    services: Services = request.app.state.services
    return services
