"""The gateway's app factory: ``create_app(settings)``.

Resources (Redis pool, upstream HTTP client, health checker) live for the app's lifespan and
reach routes through ``Depends(get_services)``. Every error leaves as an OpenAI-shaped JSON
body; an unexpected exception is logged with its request path and answered 500 without a
traceback.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from redis.asyncio import Redis
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT

from app import __version__
from app.api import admin, health, openai
from app.auth.authenticator import Authenticator
from app.auth.keys import KeyStore
from app.billing.record import Spool, SpoolReplayer
from app.errors import APIError, internal_error
from app.gc_tuning import GcPauses, freeze_startup_heap
from app.limits.limiter import Limiter
from app.limits.peers import PeerCount
from app.metrics import GatewayMetrics
from app.proxy.relay import Proxy
from app.proxy.upstream import UpstreamPool
from app.redis_batch import PipelineBatcher
from app.redis_client import redis_client as packed_redis_client
from app.routing.pool import Router
from app.services import Services
from app.settings import Settings
from app.usage import Accounting, TaskSet

log = logging.getLogger(__name__)


def redis_client(settings: Settings) -> Redis:
    return packed_redis_client(
        settings.redis_url,
        socket_timeout=2.0,
        socket_connect_timeout=1.0,
        max_connections=256,
        health_check_interval=30,
    )


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    metrics: GatewayMetrics = app.state.metrics
    redis = redis_client(settings)
    connector = aiohttp.TCPConnector(
        limit=settings.upstream_max_connections, limit_per_host=0, keepalive_timeout=30
    )
    session = aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=settings.connect_timeout_s),
        auto_decompress=False,
    )
    # The proxy's own lean client; aiohttp's session below serves health checks and scrapes.
    upstream = UpstreamPool(settings.connect_timeout_s, max_idle=settings.upstream_max_connections)
    router = Router(settings.catalog, metrics, settings)
    tasks = TaskSet()
    keys = KeyStore(redis)
    peers = PeerCount(redis, minimum=settings.gateway_replicas)
    # Limiter decisions and accounting writes share round trips (accounting rides along).
    batcher = PipelineBatcher(redis, urgent_timeout_s=settings.limiter_timeout_s)
    limiter = Limiter(
        redis,
        keys,
        metrics,
        peers,
        settings.ratelimit_failure_mode,
        settings.limiter_timeout_s,
        settings.key_cache_ttl_s,
        batcher,
        overlap=settings.limiter_overlap,
    )
    spool = Spool(settings.spool_dir)
    replayer = SpoolReplayer(spool, redis)
    accounting = Accounting(metrics, batcher, limiter, spool)
    app.state.services = Services(
        settings=settings,
        redis=redis,
        session=session,
        metrics=metrics,
        keys=keys,
        auth=Authenticator(keys, settings.key_cache_ttl_s),
        router=router,
        proxy=Proxy(upstream, settings, metrics, accounting, tasks),
        accounting=accounting,
        tasks=tasks,
        limiter=limiter,
        peers=peers,
    )
    await router.start(session)
    await peers.start()
    replayer.start()
    pauses = GcPauses(metrics.gc_pause)
    pauses.install()
    if settings.gc_freeze:
        metrics.gc_frozen.set(freeze_startup_heap())
    try:
        yield
    finally:
        pauses.remove()
        await replayer.stop()
        await peers.stop()
        await router.stop()
        await tasks.drain()
        await batcher.aclose()
        upstream.close()
        await session.close()
        await redis.aclose()


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return exc.response()


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    err = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    status = 400 if err.get("type") == "json_invalid" else 422
    code = "invalid_json" if status == 400 else "invalid_value"
    return APIError(
        status, f"Invalid value for '{param}': {err.get('msg')}.", code=code, param=param
    ).response()


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    messages = {404: "Unknown endpoint.", 405: "Method not allowed on this endpoint."}
    message = messages.get(exc.status_code, str(exc.detail))
    code = {404: "unknown_url", 405: "method_not_allowed"}.get(exc.status_code)
    return APIError(exc.status_code, message, code=code).response(exc.headers)


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return internal_error().response()


class GatewayApp(FastAPI):
    """FastAPI for everything but the proxied POST endpoints, which go straight to plain ASGI
    (see ``ProxyEndpoints``): the same app object, state and lifespan either way."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._proxy = openai.ProxyEndpoints()

    def openapi(self) -> dict[str, Any]:
        """FastAPI's schema plus the plain-ASGI endpoints, described from the same models
        that validate their bodies."""
        if self.openapi_schema:
            return self.openapi_schema
        schema = super().openapi()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        error = {
            "description": "OpenAI-shaped error",
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
        }
        components["Error"] = {
            "type": "object",
            "properties": {
                "error": {
                    "type": "object",
                    "properties": {
                        "message": {"type": "string"},
                        "type": {"type": "string"},
                        "param": {"type": ["string", "null"]},
                        "code": {"type": ["string", "null"]},
                    },
                }
            },
        }
        for path, model in openai.REQUEST_MODELS.items():
            body = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(body.pop("$defs", {}))
            components[model.__name__] = body
            schema.setdefault("paths", {})[path] = {
                "post": {
                    "tags": ["openai"],
                    "summary": f"OpenAI-compatible {path}, proxied to a replica of the model",
                    "security": [{"bearer": []}],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {"$ref": f"#/components/schemas/{model.__name__}"}
                            }
                        },
                    },
                    "responses": {
                        "200": {
                            "description": "The engine's answer (JSON, or text/event-stream "
                            "when stream is true)"
                        },
                        **{
                            str(code): error
                            for code in (400, 401, 403, 404, 413, 422, 429, 502, 503, 504)
                        },
                    },
                }
            }
        schema.setdefault("components", {})["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer"}
        }
        self.openapi_schema = schema
        return schema

    # The proxied endpoints: plain ASGI here (see __call__), and the requests the server
    # starts early (app.http_protocol.EarlyStart).
    early_paths = frozenset(openai.ProxyEndpoints.PATHS)

    @property
    def early_max_body(self) -> int:
        """A request declaring a larger body gets its task (and its 413) at once."""
        return min(HIGH_WATER_LIMIT, int(self.state.settings.max_body_bytes))

    def early_start(self, scope: Scope, body: bytes) -> Any:
        services = getattr(self.state, "services", None)
        if services is None:  # not started (or stopped): the task does it all
            return None
        return self._proxy.early(services, scope, body)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] in self.early_paths:
            if scope["method"] != "POST":
                error = APIError(
                    405,
                    "Method not allowed on this endpoint; use POST.",
                    code="method_not_allowed",
                    headers={"allow": "POST"},
                )
                await error.response()(scope, receive, send)
                return
            scope["app"] = self
            await self._proxy(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def create_app(settings: Settings) -> GatewayApp:
    app = GatewayApp(
        title="Switchyard gateway",
        version=__version__,
        lifespan=_lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.metrics = GatewayMetrics()
    app.include_router(openai.router)
    app.include_router(admin.router)
    app.include_router(health.router)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
    return app


def app_from_env() -> GatewayApp:
    """Factory for ``uvicorn --factory`` worker processes: settings from the environment."""
    from app.logs import configure
    from app.settings import load_settings

    settings = load_settings()
    configure(settings.log_level)
    return create_app(settings)
