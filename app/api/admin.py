"""Admin API under /admin/: keys and the replica pool. Guarded by SWITCHYARD_ADMIN_TOKEN.

Without a configured admin token the admin API is off (403), never open.
"""

from __future__ import annotations

import hmac
import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from app.auth.keys import CUSTOMER_RE, Limits, valid_id
from app.billing.reports import usage
from app.errors import documented, forbidden, not_found, unauthorized
from app.routing.canary import Split
from app.routing.pool import ModelPool
from app.services import Services, get_services

CUSTOMER_PATTERN = r"^[A-Za-z0-9_.:-]{1,255}$"


async def require_admin(request: Request) -> None:
    svc = await get_services(request)
    token = svc.settings.admin_token
    header = request.headers.get("authorization", "")
    scheme, _, presented = header.partition(" ")
    if scheme.lower() != "bearer" or not presented.strip():
        raise unauthorized(
            "Admin endpoints need 'Authorization: Bearer <admin token>'.", "missing_admin_token"
        )
    if token is None:
        raise forbidden("The admin API is disabled: set SWITCHYARD_ADMIN_TOKEN.", "admin_disabled")
    if not hmac.compare_digest(presented.strip().encode(), token.get_secret_value().encode()):
        raise forbidden("This token is not the admin token.", "not_admin")


router = APIRouter(
    prefix="/admin",
    tags=["admin"],
    dependencies=[Depends(require_admin)],
    responses=documented(401, 403),
)
ServicesDep = Annotated[Services, Depends(get_services)]


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    customer: str = Field(pattern=CUSTOMER_PATTERN, description="Stripe customer id")
    name: str = Field("", max_length=200)
    models: list[Annotated[str, Field(min_length=1, max_length=256)]] | None = Field(
        None, description="Allowed models; null = all"
    )
    rpm: int | None = Field(None, ge=1, description="Requests per minute; null = no limit")
    tpm: int | None = Field(None, ge=1, description="Tokens per minute; null = no limit")
    expires_in_s: int | None = Field(None, ge=1, description="Lifetime in seconds")
    model_limits: dict[str, Limits] | None = Field(
        None, description="Extra per-model budgets, e.g. {'chat-large': {'tpm': 10000}}"
    )
    max_concurrent: int | None = Field(None, ge=1, description="Concurrent requests cap")


@router.post("/keys", status_code=201, responses=documented(400, 422))
async def create_key(body: KeyCreate, svc: ServicesDep) -> JSONResponse:
    expires_at = time.time() + body.expires_in_s if body.expires_in_s else None
    record, plaintext = await svc.keys.create(
        customer=body.customer,
        models=body.models,
        rpm=body.rpm,
        tpm=body.tpm,
        expires_at=expires_at,
        name=body.name,
        model_limits=body.model_limits,
        max_concurrent=body.max_concurrent,
    )
    return JSONResponse({**record.public(), "key": plaintext}, status_code=201)


@router.get("/keys")
async def list_keys(svc: ServicesDep) -> dict[str, Any]:
    return {"object": "list", "data": [r.public() for r in await svc.keys.list()]}


def _check_id(key_id: str) -> None:
    if not valid_id(key_id):
        raise not_found(f"No key with id '{key_id[:40]}'.", "key_not_found", "id")


@router.get("/keys/{key_id}", responses=documented(404, 422))
async def get_key(key_id: str, svc: ServicesDep) -> dict[str, Any]:
    _check_id(key_id)
    record = await svc.keys.get(key_id)
    if record is None:
        raise not_found(f"No key with id '{key_id}'.", "key_not_found", "id")
    return record.public()


@router.delete("/keys/{key_id}", responses=documented(404, 422))
async def revoke_key(key_id: str, svc: ServicesDep) -> dict[str, Any]:
    _check_id(key_id)
    record = await svc.keys.revoke(key_id)
    if record is None:
        raise not_found(f"No key with id '{key_id}'.", "key_not_found", "id")
    svc.auth.invalidate(key_id)
    return record.public()


@router.get("/pool")
async def pool(svc: ServicesDep) -> dict[str, Any]:
    """Replicas (health, ejection, load, strategy) and traffic splits (weights, guard state)."""
    now = time.monotonic()
    router = svc.router

    def replicas(p: ModelPool) -> list[dict[str, Any]]:
        return [
            {
                "url": r.url,
                "healthy": r.healthy,
                "available": r.available(now),
                "outstanding": r.outstanding,
                "waiting": r.waiting,
                "running": r.running,
                "kv_cache_usage": round(r.kv_usage, 4),
                "load_age_s": round(now - r.load_at, 1) if r.load_at else None,
                "ejected_for_s": max(0.0, round(r.ejected_until - now, 1)),
                "ejections": r.ejections,
                "probation": r.probation,
            }
            for r in p.replicas
        ]

    def split(s: Split) -> dict[str, Any]:
        return {
            "name": s.name,
            "sticky": s.sticky,
            "guard": s.guard.model_dump() if s.guard else None,
            "targets": [
                {
                    "target": t.label,
                    "model": t.model,
                    "weight": t.weight,
                    "effective_weight": t.effective_weight,
                    "rolled_back": t.rolled_back,
                }
                for t in s.targets
            ],
        }

    models = []
    for name, p in router.pools.items():
        entry: dict[str, Any] = {
            "model": name,
            "kind": p.spec.kind.value,
            "routing": p.strategy.name,
            "shed_waiting": p.shed_waiting,
            "fallbacks": list(p.spec.fallbacks),
            "replicas": replicas(p),
        }
        canary = router.canary_pools.get(name)
        if canary is not None:
            entry["canary"] = {"target": canary.label, "replicas": replicas(canary)}
            entry["split"] = split(router.model_splits[name])
        models.append(entry)
    return {"models": models, "aliases": [split(a) for a in router.aliases.values()]}


@router.post("/pool/splits/{name}/reset", responses=documented(404, 422))
async def reset_split(name: str, svc: ServicesDep) -> dict[str, Any]:
    """Give a split's rolled-back canaries their configured weights again."""
    if not svc.router.reset_split(name):
        raise not_found(f"No alias or model canary named '{name[:80]}'.", "split_not_found", "name")
    return {"name": name, "reset": True}


def _check_customer(customer: str) -> None:
    if not CUSTOMER_RE.match(customer):
        raise not_found(f"No customer '{customer[:40]}'.", "customer_not_found", "customer")


@router.get("/customers/{customer}/limits", responses=documented(404, 422))
async def get_customer_limits(customer: str, svc: ServicesDep) -> dict[str, Any]:
    _check_customer(customer)
    limits = await svc.keys.get_customer_limits(customer)
    return {"customer": customer, **(limits or Limits()).model_dump()}


@router.put("/customers/{customer}/limits", responses=documented(400, 404, 422))
async def set_customer_limits(customer: str, body: Limits, svc: ServicesDep) -> dict[str, Any]:
    """Budgets shared by all of the customer's keys (null removes a dimension)."""
    _check_customer(customer)
    await svc.keys.set_customer_limits(customer, body)
    return {"customer": customer, **body.model_dump()}


@router.get("/usage", responses=documented(404, 422))
async def customer_usage(
    customer: str, svc: ServicesDep, days: Annotated[int, Query(ge=1, le=400)] = 7
) -> dict[str, Any]:
    _check_customer(customer)
    return {"customer": customer, **await usage(svc.redis, "cus", customer, days)}
