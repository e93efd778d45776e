"""The OpenAI-compatible surface: chat, completions, embeddings, models.

Order of checks is fixed and cheap-first: key (401) -> body size (413) -> JSON (400) ->
schema (422) -> model exists (404) -> key may use it (403) -> endpoint fits the model (400)
-> replica (503/502/504). Nothing reaches an engine before all of them pass.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Annotated, Any, TypeVar

import orjson
from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ValidationError
from starlette.types import Receive, Scope, Send

from app.api.schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from app.auth.keys import KeyRecord
from app.billing.reports import usage
from app.catalog import Alias, Catalog, ModelKind, ModelSpec
from app.errors import (
    APIError,
    bad_request,
    documented,
    forbidden,
    internal_error,
    not_found,
    too_large,
    unprocessable,
)
from app.http_protocol import (
    ABORT_EXTENSION,
    DISCONNECT_EXTENSION,
    EARLY_EXTENSION,
    FLUSH_EXTENSION,
    SEND_CHUNK_EXTENSION,
    DisconnectHook,
    SendChunk,
)
from app.limits.limiter import Admission, Demand
from app.proxy.relay import Begun, StreamRelay
from app.request_ids import new_request_id
from app.routing.pool import Route
from app.routing.strategies import RequestInfo
from app.services import Services, get_services
from app.tokens import estimate_prompt_tokens
from app.usage import Call, Usage

log = logging.getLogger(__name__)
router = APIRouter(tags=["openai"], responses=documented(401))

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
EMBEDDINGS = "/v1/embeddings"

REQUEST_MODELS: dict[str, type[BaseModel]] = {
    CHAT: ChatCompletionRequest,
    COMPLETIONS: CompletionRequest,
    EMBEDDINGS: EmbeddingRequest,
}
_KINDS: dict[str, tuple[ModelKind, ...]] = {
    CHAT: (ModelKind.chat,),
    COMPLETIONS: (ModelKind.chat, ModelKind.completion),
    EMBEDDINGS: (ModelKind.embedding,),
}

COMPLETIONS_DEFAULT = 16  # max_tokens of /v1/completions when absent (OpenAI, vLLM)
_ARTICLE = {ModelKind.chat: "a", ModelKind.completion: "a", ModelKind.embedding: "an"}

ServicesDep = Annotated[Services, Depends(get_services)]
_T = TypeVar("_T")


async def read_body(receive: Receive, headers: dict[bytes, bytes], limit: int) -> bytes:
    """The request body, refusing (413) as soon as it exceeds ``limit`` bytes."""
    declared = headers.get(b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large(limit)
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
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
        return REQUEST_MODELS[endpoint].model_validate(payload)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        raise unprocessable(f"Invalid value for '{param}': {err['msg']}.", param) from None


def resolve_model(svc: Services, key: KeyRecord, name: str, endpoint: str) -> ModelSpec:
    """The model behind ``name`` (for an alias: its stable target, all targets share a kind).

    The key must be allowed ``name`` itself, the alias for an alias: that is the product the
    key buys. An alias's targets need no grant of their own; fallbacks do (see Router.route)."""
    catalog = svc.settings.catalog
    spec = catalog.get(name)
    if spec is None:
        alias = catalog.alias(name)
        if alias is None:
            raise not_found(f"The model '{name}' does not exist.")
        spec = catalog.get(alias.targets[0].model)
        assert spec is not None
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


def demand(parsed: BaseModel, spec: ModelSpec, prompt_tokens: int) -> Demand:
    """What the request may consume, for the limiter's up-front reservation."""
    if isinstance(parsed, EmbeddingRequest):
        max_tokens: int | None = 0
        n = 1
    elif isinstance(parsed, ChatCompletionRequest):
        max_tokens, n = parsed.completion_cap(), parsed.n or 1
    else:
        assert isinstance(parsed, CompletionRequest)
        max_tokens = parsed.max_tokens if parsed.max_tokens is not None else COMPLETIONS_DEFAULT
        n = parsed.n or 1
    return Demand(
        prompt_tokens=prompt_tokens,
        max_tokens=max_tokens,
        n=n,
        default_completion=spec.default_max_tokens,
        completion_cap=max(0, spec.max_model_len - prompt_tokens),
    )


def upstream_body(payload: dict[str, Any], spec: ModelSpec, stream: bool) -> bytes:
    """The body sent to the engine: its own model name, and usage always requested."""
    payload["model"] = spec.upstream_name
    if stream:
        options = payload.get("stream_options") or {}
        payload["stream_options"] = {**options, "include_usage": True}
    return orjson.dumps(payload)


class ClientDisconnected(Exception):
    """The client went away; nobody is left to answer."""


_JSON_HEADERS = [(b"content-type", b"application/json")]
_SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]


class _Prepared:
    """A request past every check: its call, where it goes, and either the demand still to
    be admitted (``wants``) or its first attempt already begun (``begun``)."""

    __slots__ = ("begun", "call", "route", "wants")

    def __init__(self, call: Call, route: Route) -> None:
        self.call = call
        self.route = route
        self.wants: Demand | None = None
        self.begun: Begun | None = None


class ProxyEndpoints:
    """The three proxied POST endpoints as plain ASGI, ahead of FastAPI's routing and
    dependency machinery: they are the hot path, paid for by every request. A client
    disconnect cancels the request, which closes the upstream connection and so stops the
    engine.

    ``early`` runs in the server's own callback when a request's body is complete before its
    ASGI task has started (see ``app.http_protocol.EarlyStart``): every check, the limiter's
    decision sent and the upstream request written without awaiting, so the engine starts a
    loop turn sooner (on a 2-core VM an idle loop's turn costs ~0.1 ms); the task carries on
    from there."""

    PATHS = (CHAT, COMPLETIONS, EMBEDDINGS)

    @staticmethod
    def early(
        svc: Services, scope: Scope, body: bytes
    ) -> tuple[_Exchange, _Prepared | Exception] | None:
        state = _Exchange(svc, scope["path"], time.perf_counter())
        try:
            authorization = _header(scope, b"authorization")
            key = svc.auth.authenticate_cached(authorization)
            if key is None:
                svc.metrics.early_starts.labels("not_cached").inc()
                return None  # nothing done yet: the task authenticates, awaiting Redis
            svc.metrics.early_starts.labels("started").inc()
            if len(body) > svc.settings.max_body_bytes:
                raise too_large(svc.settings.max_body_bytes)
            return state, _prepare(state, key, body)
        except Exception as exc:  # an APIError, or a bug: the task raises it
            return state, exc

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        svc: Services = scope["app"].state.services
        # Offered by app.http_protocol (the gateway's server); absent under other servers.
        extensions = scope.get("extensions") or {}
        early = extensions.get(EARLY_EXTENSION)
        taken = early.take() if early is not None else None
        prepared: _Prepared | Exception | None = None
        if taken is not None:
            state, prepared = taken
        else:
            state = _Exchange(svc, scope["path"], time.perf_counter())
        state.abort = extensions.get(ABORT_EXTENSION)
        state.disconnect_hook = extensions.get(DISCONNECT_EXTENSION)
        state.flush = extensions.get(FLUSH_EXTENSION)
        state.send_chunk = extensions.get(SEND_CHUNK_EXTENSION)
        try:
            if isinstance(prepared, Exception):
                raise prepared
            if prepared is None:
                key = await svc.auth.authenticate(_header(scope, b"authorization"))
                body = await read_body(receive, dict(scope["headers"]), svc.settings.max_body_bytes)
                prepared = _prepare(state, key, body)
            await self._serve(state, prepared, receive, send)
        except APIError as exc:
            state.status = exc.status
            if not state.response_started:
                await _send_error(send, exc, state.headers)
        except ClientDisconnected:
            state.status = 499
        except Exception as exc:  # never a traceback to the client
            log.error("unhandled error on POST %s", state.endpoint, exc_info=exc)
            state.status = 500
            if not state.response_started:
                await _send_error(send, internal_error())
        finally:
            state.record()

    async def _serve(
        self, state: _Exchange, prepared: _Prepared, receive: Receive, send: Send
    ) -> None:
        svc, call, route = state.svc, prepared.call, prepared.route
        if prepared.wants is not None:  # decided before anything goes upstream
            call.admission = await svc.limiter.admit(
                call.key, call.spec, prepared.wants, call.request_id
            )
            state.headers = call.admission.headers
            prepared.begun = svc.proxy.begin(call, route)
        inflight = svc.metrics.inflight.labels(call.spec.name)
        inflight.inc()
        watcher = _DisconnectWatcher(receive, state.disconnect_hook)
        try:
            if call.stream:
                relay = await _once_admitted(
                    state, call, svc.proxy.stream(call, route, prepared.begun)
                )
                await _send_stream(state, call, relay, send, watcher)
            else:
                body = await _once_admitted(
                    state, call, svc.proxy.complete(call, route, prepared.begun)
                )
                state.status = 200
                watcher.done = True
                await _send_whole(send, 200, body, call.request_id, state.headers)
        except asyncio.CancelledError:
            if not watcher.gone:
                raise
            if not call.stream:
                svc.proxy.abandon(call)
            raise ClientDisconnected() from None
        finally:
            watcher.stop()
            inflight.dec()
            if not call.accounted:  # failed before any answer: give the reservation back
                svc.proxy.account(call, Usage(0, 0, "estimated"))


def _header(scope: Scope, name: bytes) -> str | None:
    """The header's last value, as ``dict(scope["headers"])`` would give it."""
    found: bytes | None = None
    for key, value in scope["headers"]:
        if key == name:
            found = value
    return found.decode("latin-1") if found is not None else None


def _prepare(state: _Exchange, key: KeyRecord, body: bytes) -> _Prepared:
    """Every check on a request, then its admission: decided at once (unlimited), or
    overlapped (the decision is on its way and the request goes upstream now), or left to
    ``Limiter.admit`` (``wants``). Nothing awaits; a refused request raises its APIError."""
    svc, endpoint = state.svc, state.endpoint
    payload = parse_json(body)
    parsed = validate(endpoint, payload)
    name = payload["model"]
    resolve_model(svc, key, name, endpoint)
    state.model = name
    route = svc.router.route(name, key, RequestInfo(key.id, payload, svc.settings.prefix_chars))
    state.route = route
    spec = route.spec  # the model that serves: an alias's target, or a fallback
    stream = bool(getattr(parsed, "stream", False))
    options = getattr(parsed, "stream_options", None)
    request_id = new_request_id()
    prompt_estimate = estimate_prompt_tokens(payload)
    wants = demand(parsed, spec, prompt_estimate)
    call = Call(
        request_id=request_id,
        key=key,
        spec=spec,
        endpoint=endpoint,
        body=upstream_body(payload, spec, stream),
        stream=stream,
        client_wants_usage=bool(options and options.include_usage),
        prompt_estimate=prompt_estimate,
        started=state.started,
    )
    prepared = _Prepared(call, route)
    early = svc.limiter.admit_now(key, spec, wants, request_id)
    if isinstance(early, Admission):  # nothing to decide
        call.admission = early
    elif early is not None:  # decided while the request goes upstream
        call.decision = early
        svc.metrics.overlapped.labels(spec.name).inc()
    else:
        prepared.wants = wants
        return prepared
    prepared.begun = svc.proxy.begin(call, route)
    return prepared


async def _once_admitted(state: _Exchange, call: Call, work: Coroutine[Any, Any, _T]) -> _T:
    """``work`` (the upstream call), released to the client only once the limiter admitted it.

    With an overlapped decision (``Call.decision``) the upstream call runs while the decision
    is on its way; a refusal cancels it (which closes the upstream connection, so the engine
    stops) and raises the 429. Once admitted, the decision's rate-limit headers go on whatever
    the client gets, an upstream error included. Inline rather than in a task of its own: it
    is the hot path."""
    decision = call.decision
    if decision is None:
        return await work
    owner = asyncio.current_task()
    assert owner is not None
    waiting = True

    async def admitted() -> bool:
        if not await call.decided():
            return False
        assert call.admission is not None
        state.headers = call.admission.headers
        return True

    def on_decision(task: asyncio.Future[Admission]) -> None:
        if waiting and (task.cancelled() or task.exception() is not None):
            owner.cancel()

    decision.add_done_callback(on_decision)
    try:
        result = await work
    except asyncio.CancelledError:
        if not decision.done() or await admitted():
            raise  # the client went away, not a refusal
        owner.uncancel()
        decision.result()  # raises the refusal (429, or 503 when failing closed)
        raise
    except Exception:
        if not await admitted():  # a refusal outranks an upstream error
            decision.result()
        raise
    finally:
        waiting = False
    if not await admitted():
        if isinstance(result, StreamRelay):
            result.finish()  # a primed stream holds a connection; its usage is not billed
        decision.result()
    return result


class _Exchange:
    """What one request's metrics need, filled in as it goes."""

    __slots__ = (
        "abort",
        "disconnect_hook",
        "endpoint",
        "flush",
        "headers",
        "model",
        "response_started",
        "route",
        "send_chunk",
        "started",
        "status",
        "svc",
    )

    def __init__(self, svc: Services, endpoint: str, started: float) -> None:
        self.svc = svc
        self.endpoint = endpoint
        self.started = started
        self.model = "unknown"
        self.status = 500
        self.response_started = False
        self.headers: list[tuple[bytes, bytes]] = []
        self.route: Route | None = None
        self.abort: Callable[[], None] | None = None  # drops the client connection at once
        self.disconnect_hook: DisconnectHook | None = None
        self.flush: Callable[[], None] | None = None  # writes what was sent so far at once
        self.send_chunk: SendChunk | None = None  # a stream's events, from any callback

    def record(self) -> None:
        metrics = self.svc.metrics
        route = self.route
        target = route.target if route is not None else "none"
        metrics.requests.labels(self.model, target, self.endpoint, str(self.status)).inc()
        elapsed = time.perf_counter() - self.started
        if route is not None:
            route.observe(self.status, elapsed)
        if self.status != 200:  # a success's duration is observed when its usage is accounted
            metrics.latency.labels(self.model, self.endpoint).observe(elapsed)


class _DisconnectWatcher:
    """Cancels the current task when the client disconnects (once the body has been read):
    through the server's disconnect hook when it offers one, else with a task that waits in
    ``receive()`` for ``http.disconnect``."""

    def __init__(self, receive: Receive, hook: DisconnectHook | None) -> None:
        self.gone = False
        self.done = False  # set before the final send: a finished response is no disconnect
        self._receive = receive
        self._owner = asyncio.current_task()
        self._hook = hook
        self._callback = self._lost  # one bound method: the hook clears it by identity
        self._task: asyncio.Task[None] | None = None
        if hook is not None:
            hook.set(self._callback)
        else:
            self._task = asyncio.get_running_loop().create_task(self._watch())

    def _lost(self) -> None:
        if not self.done and self._owner is not None:
            self.gone = True
            self._owner.cancel()

    async def _watch(self) -> None:
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                self._lost()
                return

    def stop(self) -> None:
        if self._hook is not None:
            self._hook.clear(self._callback)
        if self._task is not None:
            self._task.cancel()


async def _send_stream(
    state: _Exchange, call: Call, relay: StreamRelay, send: Send, watcher: _DisconnectWatcher
) -> None:
    """Relay a primed stream. One timer keeps the request's total deadline over the engine's
    reads and the client's writes alike: past it, a stream waiting for the engine ends with an
    error event, and one waiting for a client that does not read is cut off (the connection
    aborted, so neither a task nor a socket buffer stays behind)."""
    owner = asyncio.current_task()
    assert owner is not None
    expired = False
    sending = True
    ended = False  # by end_now: the response is complete, nothing more may be sent
    send_chunk = state.send_chunk

    def expire() -> None:
        nonlocal expired
        if not ended:
            expired = True
            owner.cancel()

    def end_now() -> None:
        nonlocal ended
        assert send_chunk is not None
        watcher.done = True
        ended = send_chunk(b"", True)

    remaining = call.started + state.svc.settings.total_timeout_s - time.perf_counter()
    timer = asyncio.get_running_loop().call_later(max(0.001, remaining), expire)
    try:
        headers = [*_SSE_HEADERS, (b"x-request-id", call.request_id.encode()), *state.headers]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        state.response_started = True
        state.status = 200
        sending = False
        flush = state.flush
        async for chunk in relay.events(send_chunk, end_now):
            sending = True
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            if flush is not None:  # now, not when this task next waits for the engine
                flush()
            sending = False
        watcher.done = True
        sending = True
        if not ended:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
    except asyncio.CancelledError:
        if not expired or watcher.gone:
            raise
        owner.uncancel()
        await _past_deadline(state, relay, send, watcher, client_stuck=sending)
    finally:
        timer.cancel()
        relay.finish()


async def _past_deadline(
    state: _Exchange,
    relay: StreamRelay,
    send: Send,
    watcher: _DisconnectWatcher,
    client_stuck: bool,
) -> None:
    """The total deadline passed mid-stream: end it cleanly, whoever was slow."""
    if not client_stuck:  # the engine was slow: say so in the stream, then end it
        relay_error = relay.broken("timeout", "total timeout")
        watcher.done = True
        try:
            async with asyncio.timeout(1.0):
                await send({"type": "http.response.body", "body": relay_error, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        except TimeoutError:
            pass  # and the client does not read either
    log.info("stream %s cut off: the client stopped reading", state.endpoint)
    state.svc.metrics.slow_clients.inc()
    if state.abort is not None:
        state.abort()
    raise ClientDisconnected()


async def _send_whole(
    send: Send,
    status: int,
    body: bytes,
    request_id: str | None = None,
    extra: list[tuple[bytes, bytes]] | None = None,
) -> None:
    headers = [*_JSON_HEADERS, (b"content-length", str(len(body)).encode())]
    if request_id:
        headers.append((b"x-request-id", request_id.encode()))
    if extra:
        headers.extend(extra)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _send_error(
    send: Send, exc: APIError, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    extra = [(k.encode(), v.encode()) for k, v in exc.headers.items()]
    if headers:  # rate-limit headers of an admitted request (a 429 brings its own)
        names = {k for k, _ in extra}
        extra += [(k, v) for k, v in headers if k not in names]
    await _send_whole(send, exc.status, orjson.dumps(exc.body()), extra=extra)


def _model_card(
    spec: ModelSpec, name: str | None = None, max_len: int | None = None
) -> dict[str, Any]:
    return {
        "id": name or spec.name,
        "object": "model",
        "created": 0,
        "owned_by": "switchyard",
        "kind": spec.kind.value,
        "max_model_len": max_len or spec.max_model_len,
    }


def _alias_card(catalog: Catalog, alias: Alias) -> dict[str, Any]:
    """An alias looks like a model: its targets' kind, and the context all of them accept."""
    specs = [s for t in alias.targets if (s := catalog.get(t.model)) is not None]
    return _model_card(specs[0], alias.name, min(s.max_model_len for s in specs))


@router.get("/v1/models")
async def list_models(request: Request, svc: ServicesDep) -> dict[str, Any]:
    key = await svc.auth.authenticate(request.headers.get("authorization"))
    catalog = svc.settings.catalog
    data = [_model_card(m) for m in catalog.models if key.allows(m.name)]
    data += [_alias_card(catalog, a) for a in catalog.aliases if key.allows(a.name)]
    return {"object": "list", "data": data}


@router.get("/v1/models/{model}", responses=documented(404, 422))
async def get_model(model: str, request: Request, svc: ServicesDep) -> dict[str, Any]:
    key = await svc.auth.authenticate(request.headers.get("authorization"))
    catalog = svc.settings.catalog
    spec = catalog.get(model)
    alias = catalog.alias(model) if spec is None else None
    if key.allows(model):
        if spec is not None:
            return _model_card(spec)
        if alias is not None:
            return _alias_card(catalog, alias)
    # Not revealing which models exist beyond the key's scope.
    raise not_found(f"The model '{model}' does not exist.")


@router.get("/v1/usage", responses=documented(422))
async def own_usage(
    request: Request, svc: ServicesDep, days: Annotated[int, Query(ge=1, le=400)] = 7
) -> dict[str, Any]:
    """The calling key's own daily token usage (as aggregated by the billing worker)."""
    key = await svc.auth.authenticate(request.headers.get("authorization"))
    return {"key": key.id, **await usage(svc.redis, "key", key.id, days)}
