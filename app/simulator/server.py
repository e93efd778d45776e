"""The simulator's HTTP surface as a pure ASGI app (no framework on the hot path).

Routes: vLLM's OpenAI API (/v1/models, /v1/chat/completions, /v1/completions,
/v1/embeddings), /health, /metrics, and the test controls /sim/config, /sim/stats, /sim/reset.
A plain dict dispatch and hand-built responses keep a tiny request to a few tens of
microseconds, so benchmarks measure the gateway, not the simulator.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

import orjson
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.types import Receive, Scope, Send

from app.simulator import errors
from app.simulator.config import SimulatorConfig
from app.simulator.embeddings import embed, to_base64
from app.simulator.engine import ActiveRequest, Engine
from app.simulator.errors import ApiError
from app.simulator.generation import ChoicePlan, plan_choices
from app.simulator.metrics import VllmCollector, exposition, make_registry
from app.simulator.protocol import (
    Endpoint,
    GenerateRequest,
    check_model,
    parse_embedding,
    parse_generate,
    parse_json,
)
from app.simulator.responses import (
    DONE,
    StreamEvents,
    chat_completion,
    embedding_list,
    model_list,
    now_s,
    request_id,
    text_completion,
)
from app.simulator.tokens import TextSource

Handler = Callable[[Receive, Send], Awaitable[None]]

_JSON = b"application/json"
_SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8")]
# vLLM's answer when a model without a chat template gets a chat request.
_NO_CHAT_TEMPLATE = (
    "As of transformers v4.44, default chat template is no longer allowed, so you must "
    "provide a chat template if the tokenizer does not define one."
)


def _ttft_s(config: SimulatorConfig, prompt_tokens: int) -> float:
    """Time to first token once a request has its slot (queueing comes on top)."""
    return (config.ttft_ms + config.prefill_ms_per_token * prompt_tokens) / 1000.0


class _Schedule(NamedTuple):
    t_first: float  # loop time of the first token
    interval: float  # seconds between tokens of one sequence
    total: int  # tokens over all choices
    steps: int  # tokens of the longest choice
    budget: int | None  # fail_after_tokens when it cuts this answer short


class SimulatedDrop(Exception):
    """Raised after the response started: the server then closes the connection mid-body."""


class ClientGone(Exception):
    """The client disconnected before its request body was read."""


class QuietDrops(logging.Filter):
    """Keeps uvicorn from logging a traceback for each deliberate connection drop."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, SimulatedDrop)


class DisconnectWatch:
    """Cancels the request's task when the client disconnects (abort, like vLLM).

    Armed lazily, only before the request first waits, so an instant request costs no task.
    """

    __slots__ = ("_done", "_owner", "_receive", "_task", "fired")

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._task: asyncio.Task[None] | None = None
        self._owner: asyncio.Task[Any] | None = None
        self._done = False
        self.fired = False

    def arm(self) -> None:
        if self._task is None and not self._done:
            self._owner = asyncio.current_task()
            self._task = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass
        if not self._done and self._owner is not None:
            self.fired = True
            self._owner.cancel()

    def close(self) -> None:
        """The response is (about to be) complete: a disconnect no longer means abort."""
        self._done = True
        if self._task is not None:
            self._task.cancel()


async def _read_body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _respond(send: Send, status: int, body: bytes, content_type: bytes = _JSON) -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _respond_error(send: Send, exc: ApiError) -> None:
    await _respond(send, exc.status, exc.body())


async def _respond_detail(send: Send, status: int, detail: str) -> None:
    await _respond(send, status, orjson.dumps({"detail": detail}))


class SimulatorApp:
    """One simulated vLLM replica; all state lives on the instance (several can coexist)."""

    def __init__(self, config: SimulatorConfig) -> None:
        self.engine = Engine(config)
        self._text = TextSource(config.seed)
        self._created = now_s()
        self.registry = make_registry(
            VllmCollector(config.model, self.engine.metrics, self.engine.gauges)
        )
        routes: dict[str, dict[str, Handler]] = {
            "/v1/models": {"GET": self._models},
            "/health": {"GET": self._health},
            "/metrics": {"GET": self._metrics},
            "/sim/config": {"GET": self._get_config, "POST": self._set_config},
            "/sim/stats": {"GET": self._stats},
            "/sim/reset": {"POST": self._reset},
        }
        if config.kind == "embedding":
            routes["/v1/embeddings"] = {"POST": self._embeddings}
        else:
            routes["/v1/chat/completions"] = {"POST": self._chat}
            routes["/v1/completions"] = {"POST": self._completions}
        self._routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            methods = self._routes.get(scope["path"])
            if methods is None:
                await _respond_detail(send, 404, "Not Found")
                return
            handler = methods.get(scope["method"])
            if handler is None:
                await _respond_detail(send, 405, "Method Not Allowed")
                return
            try:
                await handler(receive, send)
            except ClientGone:
                return
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)

    @staticmethod
    async def _lifespan(receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    # -- plain endpoints ----------------------------------------------------------------------
    async def _models(self, receive: Receive, send: Send) -> None:
        await _respond(send, 200, model_list(self.engine.config, self._created))

    async def _health(self, receive: Receive, send: Send) -> None:
        await _respond(send, 200 if self.engine.config.healthy else 503, b"")

    async def _metrics(self, receive: Receive, send: Send) -> None:
        await _respond(send, 200, exposition(self.registry), CONTENT_TYPE_LATEST.encode())

    async def _get_config(self, receive: Receive, send: Send) -> None:
        await _respond(send, 200, orjson.dumps(self.engine.config.to_dict()))

    async def _set_config(self, receive: Receive, send: Send) -> None:
        try:
            data = parse_json(await _read_body(receive))
            new = self.engine.config.updated(data)
        except ApiError as exc:
            await _respond_error(send, exc)
            return
        except ValueError as exc:
            await _respond_error(send, errors.bad_request(str(exc)))
            return
        if new.seed != self.engine.config.seed:
            self._text = TextSource(new.seed)
        self.engine.set_config(new)
        await _respond(send, 200, orjson.dumps(new.to_dict()))

    async def _stats(self, receive: Receive, send: Send) -> None:
        await _respond(send, 200, orjson.dumps(self.engine.stats_dict()))

    async def _reset(self, receive: Receive, send: Send) -> None:
        self.engine.reset_stats()
        await _respond(send, 200, orjson.dumps(self.engine.stats_dict()))

    # -- generation ---------------------------------------------------------------------------
    async def _chat(self, receive: Receive, send: Send) -> None:
        await self._generate(receive, send, "chat")

    async def _completions(self, receive: Receive, send: Send) -> None:
        await self._generate(receive, send, "completion")

    async def _generate(self, receive: Receive, send: Send, endpoint: Endpoint) -> None:
        engine = self.engine
        arrival = asyncio.get_running_loop().time()
        config = engine.config
        engine.stats.received += 1
        try:
            data = parse_json(await _read_body(receive))
            if endpoint == "chat" and config.kind == "completion":
                check_model(data, config)
                raise errors.bad_request(_NO_CHAT_TEMPLATE)
            req = parse_generate(data, endpoint, config)
            if config.hang:
                await self._hang(receive)
                return
            if engine.should_fail():
                engine.stats.failed += 1
                raise errors.simulated_failure(config.fail_status)
            place = engine.admit()
        except ApiError as exc:
            if exc.status < 500:
                engine.stats.rejected += 1
            await _respond_error(send, exc)
            return
        plans = plan_choices(req, config, self._text, engine.next_arrival())
        await self._run(req, plans, config, arrival, place, receive, send)

    async def _hang(self, receive: Receive) -> None:
        self.engine.stats.hung += 1
        while (await receive())["type"] != "http.disconnect":
            pass

    async def _run(
        self,
        req: GenerateRequest,
        plans: list[ChoicePlan],
        config: SimulatorConfig,
        arrival: float,
        place: asyncio.Future[None] | None,
        receive: Receive,
        send: Send,
    ) -> None:
        active = ActiveRequest(req.prompt_tokens, req.stream)

        async def work(watch: DisconnectWatch) -> None:
            if req.stream:
                await self._stream(req, plans, config, arrival, active, watch, send)
            else:
                await self._complete(req, plans, config, arrival, active, watch, send)

        # vLLM sends a stream's headers at once, even while the request is still queued.
        opening = (
            send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
            if req.stream
            else None
        )
        await self._with_slot(place, active, receive, work, opening)

    async def _with_slot(
        self,
        place: asyncio.Future[None] | None,
        active: ActiveRequest,
        receive: Receive,
        work: Callable[[DisconnectWatch], Awaitable[None]],
        opening: Awaitable[None] | None = None,
    ) -> None:
        """Wait for the slot, run `work`, and account for every way this can end.

        A client disconnect cancels this task (see DisconnectWatch): that is an abort, and
        the tokens produced so far still count, as they would on a real engine.
        """
        engine = self.engine
        watch = DisconnectWatch(receive)
        holding = place is None
        try:
            if opening is not None:
                await opening
            if place is not None:
                watch.arm()
                await place
                holding = True
            engine.start(active)
            await work(watch)
        except asyncio.CancelledError:
            if not watch.fired:
                raise
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            if holding and not active.streaming:
                engine.add_tokens(active.generated_by(asyncio.get_running_loop().time()))
            engine.finish("abort")
        except SimulatedDrop:
            engine.stats.dropped += 1
            raise
        finally:
            watch.close()
            if holding:
                engine.release(active)
            elif place is not None:
                engine.abandon(place)

    @staticmethod
    def _schedule(
        req: GenerateRequest,
        plans: list[ChoicePlan],
        config: SimulatorConfig,
        active: ActiveRequest,
        now: float,
    ) -> _Schedule:
        """When each token is due, for a request that just got its slot (shared by both
        response shapes, so streamed and whole answers take the same time)."""
        ttft = _ttft_s(config, req.prompt_tokens)
        interval = 1.0 / config.tokens_per_s if config.tokens_per_s > 0 else 0.0
        total = sum(p.tokens for p in plans)
        active.schedule(now + ttft, interval, total)
        budget = config.fail_after_tokens
        return _Schedule(
            now + ttft,
            interval,
            total,
            max(p.tokens for p in plans),
            budget if budget is not None and budget < total else None,
        )

    async def _stream(
        self,
        req: GenerateRequest,
        plans: list[ChoicePlan],
        config: SimulatorConfig,
        arrival: float,
        active: ActiveRequest,
        watch: DisconnectWatch,
        send: Send,
    ) -> None:
        engine, metrics = self.engine, self.engine.metrics
        loop = asyncio.get_running_loop()
        t_first, interval, total, steps, budget = self._schedule(
            req, plans, config, active, loop.time()
        )
        chat = req.endpoint == "chat"
        events = StreamEvents(
            chat, request_id("chatcmpl" if chat else "cmpl"), now_s(), config.model
        )
        if budget == 0:
            raise SimulatedDrop
        last = 0.0
        for step in range(steps):
            delay = t_first + step * interval - loop.time()
            if delay > 0:
                watch.arm()
                await asyncio.sleep(delay)
            now = loop.time()
            if step == 0:
                metrics.ttft.observe(now - arrival)
            else:
                metrics.itl.observe(now - last)
            last = now
            chunks = [events.role(p.index) for p in plans] if chat and step == 0 else []
            emitted = 0
            for p in plans:
                if step < p.tokens:
                    if budget is not None and active.generated + emitted >= budget:
                        break
                    reason = p.finish_reason if step == p.tokens - 1 else None
                    chunks.append(events.token(p.index, p.pieces[step], reason))
                    emitted += 1
            active.generated += emitted
            engine.add_tokens(emitted)
            await send({"type": "http.response.body", "body": b"".join(chunks), "more_body": True})
            if budget is not None and active.generated >= budget:
                raise SimulatedDrop
        tail = events.usage(req.prompt_tokens, total) + DONE if req.include_usage else DONE
        watch.close()
        engine.finish(_request_reason(plans))
        metrics.e2e.observe(loop.time() - arrival)
        await send({"type": "http.response.body", "body": tail, "more_body": False})

    async def _complete(
        self,
        req: GenerateRequest,
        plans: list[ChoicePlan],
        config: SimulatorConfig,
        arrival: float,
        active: ActiveRequest,
        watch: DisconnectWatch,
        send: Send,
    ) -> None:
        engine, metrics = self.engine, self.engine.metrics
        loop = asyncio.get_running_loop()
        t_first, interval, total, steps, budget = self._schedule(
            req, plans, config, active, loop.time()
        )
        if budget is not None:
            # Cut after `budget` tokens: wait until they exist, send headers, drop the body.
            await self._sleep_until(t_first + max(0, budget - 1) * interval, watch)
            engine.add_tokens(budget)
            await send({"type": "http.response.start", "status": 200, "headers": [
                (b"content-type", _JSON)]})  # fmt: skip
            raise SimulatedDrop
        await self._sleep_until(t_first + (steps - 1) * interval, watch)
        metrics.ttft.observe(t_first - arrival)
        metrics.itl.observe(interval, steps - 1)
        engine.add_tokens(total)
        active.generated = total
        watch.close()
        rid = request_id("chatcmpl" if req.endpoint == "chat" else "cmpl")
        build = chat_completion if req.endpoint == "chat" else text_completion
        body = build(rid, now_s(), config.model, plans, req.prompt_tokens)
        engine.finish(_request_reason(plans))
        metrics.e2e.observe(loop.time() - arrival)
        await _respond(send, 200, body)

    @staticmethod
    async def _sleep_until(deadline: float, watch: DisconnectWatch) -> None:
        delay = deadline - asyncio.get_running_loop().time()
        if delay > 0:
            watch.arm()
            await asyncio.sleep(delay)

    # -- embeddings ---------------------------------------------------------------------------
    async def _embeddings(self, receive: Receive, send: Send) -> None:
        engine = self.engine
        loop = asyncio.get_running_loop()
        arrival = loop.time()
        config = engine.config
        engine.stats.received += 1
        try:
            req = parse_embedding(parse_json(await _read_body(receive)), config)
            if config.hang:
                await self._hang(receive)
                return
            if engine.should_fail():
                engine.stats.failed += 1
                raise errors.simulated_failure(config.fail_status)
            place = engine.admit()
        except ApiError as exc:
            if exc.status < 500:
                engine.stats.rejected += 1
            await _respond_error(send, exc)
            return
        active = ActiveRequest(req.prompt_tokens, streaming=False)

        async def work(watch: DisconnectWatch) -> None:
            done_at = loop.time() + _ttft_s(config, req.prompt_tokens)
            await self._sleep_until(done_at, watch)
            watch.close()
            dim = req.dimensions or config.embedding_dim
            vectors = [embed(item.key, dim, config.seed) for item in req.inputs]
            data: list[Any] = (
                [to_base64(v) for v in vectors] if req.encoding_format == "base64" else vectors
            )
            body = embedding_list(
                request_id("embd"), now_s(), config.model, data, req.prompt_tokens
            )
            engine.finish("stop")
            engine.metrics.e2e.observe(loop.time() - arrival)
            await _respond(send, 200, body)

        await self._with_slot(place, active, receive, work)


def _request_reason(plans: list[ChoicePlan]) -> str:
    """finish_reason of the request as a whole: that of its longest choice."""
    return max(plans, key=lambda p: p.tokens).finish_reason


def create_app(config: SimulatorConfig | None = None) -> SimulatorApp:
    """An ASGI app simulating one vLLM replica, for uvicorn or in-process tests."""
    return SimulatorApp(config or SimulatorConfig())
