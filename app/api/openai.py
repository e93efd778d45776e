"""The OpenAI-compatible surface: chat, completions, embeddings, models.

Order of checks is fixed and cheap-first: key (401) -> body size (413) -> JSON (400) ->
schema (422) -> model exists (404) -> key may use it (403) -> endpoint fits the model (400)
-> replica (503/502/504). Nothing reaches an engine before all of them pass.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from pydantic import BaseModel, ValidationError

from app.api.schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from app.auth.keys import KeyRecord
from app.catalog import ModelKind, ModelSpec
from app.errors import APIError, bad_request, forbidden, not_found, too_large, unprocessable
from app.proxy.relay import ClientGone
from app.services import Services, get_services
from app.tokens import estimate_prompt_tokens
from app.usage import Call

router = APIRouter(tags=["openai"])

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
EMBEDDINGS = "/v1/embeddings"

_SCHEMAS: dict[str, type[BaseModel]] = {
    CHAT: ChatCompletionRequest,
    COMPLETIONS: CompletionRequest,
    EMBEDDINGS: EmbeddingRequest,
}
_KINDS: dict[str, tuple[ModelKind, ...]] = {
    CHAT: (ModelKind.chat,),
    COMPLETIONS: (ModelKind.chat, ModelKind.completion),
    EMBEDDINGS: (ModelKind.embedding,),
}

_ARTICLE = {ModelKind.chat: "a", ModelKind.completion: "a", ModelKind.embedding: "an"}

ServicesDep = Annotated[Services, Depends(get_services)]


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) as soon as it exceeds ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json(body: bytes) -> dict[str, Any]:
    if not body:
        raise bad_request("The request body is empty; expected a JSON object.", "invalid_json")
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise bad_request(
            f"The request body is not valid JSON: {exc.msg}.", "invalid_json"
        ) from None
    if not isinstance(payload, dict):
        raise bad_request("The request body must be a JSON object.", "invalid_json")
    return payload


def validate(endpoint: str, payload: dict[str, Any]) -> BaseModel:
    try:
        return _SCHEMAS[endpoint].model_validate(payload)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        raise unprocessable(f"Invalid value for '{param}': {err['msg']}.", param) from None


def resolve_model(svc: Services, key: KeyRecord, name: str, endpoint: str) -> ModelSpec:
    spec = svc.settings.catalog.get(name)
    if spec is None:
        raise not_found(f"The model '{name}' does not exist.")
    if not key.allows(name):
        raise forbidden(f"This API key is not allowed to use the model '{name}'.")
    if spec.kind not in _KINDS[endpoint]:
        raise bad_request(
            f"The model '{name}' is {_ARTICLE[spec.kind]} {spec.kind.value} model and does not "
            f"support {endpoint}.",
            "unsupported_endpoint",
            "model",
        )
    return spec


def upstream_body(payload: dict[str, Any], spec: ModelSpec, stream: bool) -> bytes:
    """The body sent to the engine: its own model name, and usage always requested."""
    payload["model"] = spec.upstream_name
    if stream:
        options = payload.get("stream_options") or {}
        payload["stream_options"] = {**options, "include_usage": True}
    return orjson.dumps(payload)


async def _proxy(request: Request, svc: Services, endpoint: str) -> Response:
    started = time.perf_counter()
    model_label = "unknown"
    status = 500
    try:
        key = await svc.auth.authenticate(request.headers.get("authorization"))
        payload = parse_json(await read_body(request, svc.settings.max_body_bytes))
        parsed = validate(endpoint, payload)
        name = payload["model"]
        spec = resolve_model(svc, key, name, endpoint)
        model_label = spec.name
        stream = bool(getattr(parsed, "stream", False))
        options = getattr(parsed, "stream_options", None)
        call = Call(
            request_id=f"req_{uuid.uuid4().hex}",
            key=key,
            spec=spec,
            endpoint=endpoint,
            body=upstream_body(payload, spec, stream),
            stream=stream,
            client_wants_usage=bool(options and options.include_usage),
            prompt_estimate=estimate_prompt_tokens(payload),
            started=started,
        )
        pool = svc.router.pool(spec.name)
        assert pool is not None  # every catalogue model has a pool
        svc.metrics.inflight.labels(model_label).inc()
        try:
            if stream:
                response = await svc.proxy.stream(call, pool)
            else:
                response = await svc.proxy.complete(call, pool, request.receive)
        finally:
            svc.metrics.inflight.labels(model_label).dec()
        status = response.status_code
        return response
    except APIError as exc:
        status = exc.status
        raise
    except ClientGone:
        status = 499
        return Response(status_code=499)
    finally:
        svc.metrics.requests.labels(model_label, endpoint, str(status)).inc()
        if status != 200:  # a success's full duration is observed when its usage is accounted
            svc.metrics.latency.labels(model_label, endpoint).observe(time.perf_counter() - started)


@router.post(CHAT)
async def chat_completions(request: Request, svc: ServicesDep) -> Response:
    return await _proxy(request, svc, CHAT)


@router.post(COMPLETIONS)
async def completions(request: Request, svc: ServicesDep) -> Response:
    return await _proxy(request, svc, COMPLETIONS)


@router.post(EMBEDDINGS)
async def embeddings(request: Request, svc: ServicesDep) -> Response:
    return await _proxy(request, svc, EMBEDDINGS)


def _model_card(spec: ModelSpec) -> dict[str, Any]:
    return {
        "id": spec.name,
        "object": "model",
        "created": 0,
        "owned_by": "switchyard",
        "kind": spec.kind.value,
        "max_model_len": spec.max_model_len,
    }


@router.get("/v1/models")
async def list_models(request: Request, svc: ServicesDep) -> dict[str, Any]:
    key = await svc.auth.authenticate(request.headers.get("authorization"))
    data = [_model_card(m) for m in svc.settings.catalog.models if key.allows(m.name)]
    return {"object": "list", "data": data}


@router.get("/v1/models/{model}")
async def get_model(model: str, request: Request, svc: ServicesDep) -> dict[str, Any]:
    key = await svc.auth.authenticate(request.headers.get("authorization"))
    spec = svc.settings.catalog.get(model)
    if spec is None or not key.allows(model):
        # Not revealing which models exist beyond the key's scope.
        raise not_found(f"The model '{model}' does not exist.")
    return _model_card(spec)
