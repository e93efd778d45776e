"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import asyncio
from typing import Annotated, Literal

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from redis.exceptions import RedisError

from app.services import Services, get_services

router = APIRouter(tags=["health"])
ServicesDep = Annotated[Services, Depends(get_services)]


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is alive and serving HTTP."""
    return {"status": "ok"}


class Readiness(BaseModel):
    status: Literal["ready", "not ready"]
    checks: dict[str, bool]


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "Not ready"}},
)
async def readyz(svc: ServicesDep) -> JSONResponse:
    """Ready = Redis answers and at least one model replica is healthy."""
    checks: dict[str, bool] = {}
    try:
        async with asyncio.timeout(1.0):
            checks["redis"] = bool(await svc.redis.ping())
    except (RedisError, TimeoutError, OSError):
        checks["redis"] = False
    checks["replicas"] = svc.router.ready()
    ok = all(checks.values())
    return JSONResponse(
        {"status": "ready" if ok else "not ready", "checks": checks}, status_code=200 if ok else 503
    )


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(svc: ServicesDep) -> Response:
    return Response(generate_latest(svc.metrics.registry), media_type=CONTENT_TYPE_LATEST)
