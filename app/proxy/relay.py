"""Forward a call to a replica and relay the answer, streamed chunk by chunk or whole.

Failover happens only before the client has seen a byte: connect errors, 5xx answers and
streams that end before their first event are retried on another replica. A stream is primed
(its first event read) before the response starts, so a replica that dies at once is
invisible to the client. The engine is always asked for ``include_usage``; the extra chunk is
dropped again when the client did not ask for it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from typing import TypeVar

import orjson

from app.errors import APIError, bad_gateway, gateway_timeout, unavailable
from app.metrics import GatewayMetrics
from app.proxy.sse import SSESplitter, inspect
from app.proxy.upstream import (
    Sent,
    UpstreamDisconnected,
    UpstreamError,
    UpstreamPool,
    UpstreamResponse,
)
from app.routing.pool import Replica, Route
from app.settings import Settings
from app.usage import Accounting, Call, TaskSet, Usage

log = logging.getLogger(__name__)

_CONNECT_ERRORS = (UpstreamError,)
_RELAYED_CLIENT_ERRORS = {400, 413, 422}
_T = TypeVar("_T")


class _UpstreamFailure(Exception):
    """One attempt failed; ``retry`` says whether another replica may be tried."""

    def __init__(self, reason: str, error: APIError, retry: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.error = error
        self.retry = retry


def _upstream_error(status: int, body: bytes) -> APIError:
    """Map an engine's non-200 answer to what the client sees."""
    message = ""
    try:
        obj = orjson.loads(body)
        err = obj.get("error", obj) if isinstance(obj, dict) else {}
        if isinstance(err, dict):
            message = str(err.get("message") or "")
    except orjson.JSONDecodeError:
        pass
    if status in _RELAYED_CLIENT_ERRORS:
        return APIError(
            status,
            message or "The model rejected the request.",
            code="invalid_request" if status != 413 else "request_too_large",
        )
    return bad_gateway(f"The model replica answered HTTP {status}.")


def _check_status(status: int, body: bytes) -> None:
    if status >= 500:
        raise _UpstreamFailure("status_5xx", _upstream_error(status, body), retry=True)
    if status != 200:
        raise _upstream_error(status, body)


_DISCONNECTED = "The model replica closed the connection."


class Begun:
    """A first attempt already on its way: its replica (whose ``outstanding`` it holds) and
    the request as written, or about to be, to it."""

    __slots__ = ("replica", "sent")

    def __init__(self, replica: Replica, sent: Sent) -> None:
        self.replica = replica
        self.sent = sent


class Proxy:
    def __init__(
        self,
        upstream: UpstreamPool,
        settings: Settings,
        metrics: GatewayMetrics,
        accounting: Accounting,
        tasks: TaskSet,
    ) -> None:
        self._upstream = upstream
        self._settings = settings
        self.metrics = metrics
        self._accounting = accounting
        self._tasks = tasks

    def account(self, call: Call, usage: Usage) -> None:
        """Account a call exactly once, in its own task (a cancelled request cannot stop it)."""
        if call.accounted:
            return
        call.accounted = True
        self._tasks.spawn(self._accounting.finish(call, usage))

    def begin(self, call: Call, route: Route) -> Begun | None:
        """Pick the first replica and write the request to it now, if a kept connection is
        idle (see ``UpstreamPool.send``). The answer is awaited by ``complete`` or ``stream``,
        which pick and send on their own when this returns None (no replica available, or
        its URL refused: the usual failover and errors follow)."""
        replica = route.pool.pick([], route.info)
        if replica is None:
            return None
        try:
            sent = self._upstream.send(replica.url, call.endpoint, call.body)
        except UpstreamError:
            return None  # the first attempt, made again, fails over as usual
        replica.outstanding += 1
        return Begun(replica, sent)

    async def _with_failover(
        self,
        call: Call,
        route: Route,
        attempt: Callable[[Replica, Sent | None], Awaitable[_T]],
        begun: Begun | None,
    ) -> _T:
        """Run ``attempt`` on up to 1 + upstream_retries distinct replicas, the first of them
        ``begun``'s when given.

        Each attempt takes one unit of the replica's ``outstanding`` count; it must give it
        back when it fails or finishes, or hand it on (a stream gives it to its relay)."""
        pool, info = route.pool, route.info
        tried: list[str] = []
        last: APIError | None = None
        for _ in range(self._settings.upstream_retries + 1):
            sent: Sent | None = None
            if begun is not None:
                replica, sent, begun = begun.replica, begun.sent, None
            else:
                picked = pool.pick(tried, info)
                if picked is None:
                    break
                replica = picked
                replica.outstanding += 1
            tried.append(replica.url)
            try:
                result = await attempt(replica, sent)
            except _UpstreamFailure as failure:
                replica.record_failure()
                self.metrics.upstream_errors.labels(call.spec.name, failure.reason).inc()
                log.warning(
                    "proxy: %s on %s failed: %s", call.request_id, replica.url, failure.reason
                )
                if not failure.retry:
                    raise failure.error from None
                last = failure.error
                continue
            replica.record_success()
            return result
        if last is not None:
            raise last
        raise unavailable(f"No healthy replica of model '{call.spec.name}' is available.", 1)

    # -- whole responses ----------------------------------------------------------------------

    async def complete(self, call: Call, route: Route, begun: Begun | None = None) -> bytes:
        """Non-streamed call: the engine's answer, accounted and renamed for the client.

        Cancelling it (the client left) closes the upstream connection, which stops the engine;
        ``abandon`` then accounts what is known."""
        body = await self._with_failover(call, route, partial(self._post, call), begun)
        return self._whole_response(call, body)

    def abandon(self, call: Call) -> None:
        """The client left before a non-streamed answer: only the prompt is known."""
        self.metrics.client_aborts.labels(call.spec.name).inc()
        self.account(call, Usage(call.prompt_estimate, 0, "estimated"))

    async def _post(self, call: Call, replica: Replica, sent: Sent | None) -> bytes:
        try:
            if sent is None:
                sent = self._upstream.send(replica.url, call.endpoint, call.body)
            async with asyncio.timeout(self._settings.total_timeout_s):
                async with await self._upstream.receive(sent) as resp:
                    status, body = resp.status, await resp.read()
        except _CONNECT_ERRORS:
            raise _UpstreamFailure("connect", bad_gateway(_DISCONNECTED), retry=True) from None
        except TimeoutError:
            error = gateway_timeout(
                f"The model did not answer within {self._settings.total_timeout_s:g}s."
            )
            raise _UpstreamFailure("timeout", error, retry=False) from None
        finally:
            replica.outstanding -= 1
        _check_status(status, body)
        return body

    def _whole_response(self, call: Call, body: bytes) -> bytes:
        try:
            obj = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise bad_gateway("The model replica sent an invalid JSON answer.") from None
        usage = obj.get("usage") if isinstance(obj, dict) else None
        if isinstance(usage, dict):
            prompt = int(usage.get("prompt_tokens") or 0)
            completion = int(usage.get("completion_tokens") or 0)
            self.account(call, Usage(prompt, completion, "upstream"))
        else:
            self.account(call, Usage(call.prompt_estimate, 0, "estimated"))
        if call.spec.upstream_name != call.spec.name and isinstance(obj, dict):
            obj["model"] = call.spec.name
            body = orjson.dumps(obj)
        return body

    # -- streams -------------------------------------------------------------------------------

    async def stream(self, call: Call, route: Route, begun: Begun | None = None) -> StreamRelay:
        """A primed stream: its first event is read, so earlier failures could fail over."""
        attempt = partial(self._open_stream, call, route)
        return await self._with_failover(call, route, attempt, begun)

    async def _open_stream(
        self, call: Call, route: Route, replica: Replica, sent: Sent | None
    ) -> StreamRelay:
        """Connect and read the first event, so that failures before it can fail over."""
        resp: UpstreamResponse | None = None
        splitter = SSESplitter()
        first: list[bytes] = []
        timeout = self._settings.first_token_timeout_s
        try:
            if sent is None:
                sent = self._upstream.send(replica.url, call.endpoint, call.body)
            async with asyncio.timeout(timeout):
                resp = await self._upstream.receive(sent)
                if resp.status != 200:
                    _check_status(resp.status, await resp.read())
                while not first:
                    data = await resp.readany()
                    if not data:
                        raise UpstreamDisconnected("stream ended before any event")
                    first = splitter.feed(data)
        except BaseException as exc:
            replica.outstanding -= 1
            if resp is not None:
                resp.close()
            if isinstance(exc, _CONNECT_ERRORS):
                raise _UpstreamFailure("connect", bad_gateway(_DISCONNECTED), retry=True) from None
            if isinstance(exc, TimeoutError):
                error = gateway_timeout(f"The model sent no token within {timeout:g}s.")
                raise _UpstreamFailure("timeout", error, retry=False) from None
            raise
        return StreamRelay(self, call, replica, resp, splitter, first, route)


class StreamRelay:
    """One primed upstream stream; ``finish`` is idempotent and never awaits, so it is safe
    to call from a cancelled task."""

    def __init__(
        self,
        proxy: Proxy,
        call: Call,
        replica: Replica,
        resp: UpstreamResponse,
        splitter: SSESplitter,
        first: list[bytes],
        route: Route | None = None,
    ) -> None:
        self._proxy = proxy
        self._route = route
        self._call = call
        self._replica = replica
        self._resp = resp
        self._splitter = splitter
        self._first = first
        self._usage: dict[str, int] | None = None
        self._saw_done = False
        self._send_now: Callable[[bytes], bool] | None = None
        self._end_now: Callable[[], None] | None = None
        self._held = b""
        self._pipe_error: ValueError | None = None
        self._chunks = 0
        self._completed = False
        self._finished = False
        self._first_token_at: float | None = None
        rename = call.spec.upstream_name != call.spec.name
        self._rename: Callable[[bytes], bytes] | None = None
        if rename:
            old = orjson.dumps({"model": call.spec.upstream_name})[1:-1]
            new = orjson.dumps({"model": call.spec.name})[1:-1]
            self._rename = lambda b: b.replace(old, new)

    def _observe_ttft(self, ttft: float) -> None:
        """At the first generated token, which need not be in the first event (an engine
        may send the assistant role apart)."""
        route = self._route
        model = self._call.spec.name
        requested, target = (route.requested, route.target) if route else (model, model)
        self._proxy.metrics.ttft.labels(requested, target).observe(ttft)
        if route is not None:
            route.ttft = ttft

    def _filter(self, events: list[bytes]) -> bytes:
        out: list[bytes] = []
        keep_usage = self._call.client_wants_usage
        for ev in events:
            info = inspect(ev)
            if info.done:
                self._saw_done = True
            elif info.usage is not None:
                self._usage = info.usage
                if info.usage_only and not keep_usage:
                    continue
            if info.content:
                self._chunks += 1
                if self._first_token_at is None:
                    self._first_token_at = time.perf_counter()
                    self._observe_ttft(self._first_token_at - self._call.started)
            out.append(ev)
        data = b"".join(out)
        return self._rename(data) if self._rename is not None else data

    async def events(
        self,
        send_now: Callable[[bytes], bool] | None = None,
        end_now: Callable[[], None] | None = None,
    ) -> AsyncIterator[bytes]:
        """The stream's events for the client to be sent by the caller: all of them, or, with
        ``send_now``, only the first ones and those the client's connection could not take at
        once (``send_now`` returned False: it is paused for back-pressure).

        ``send_now`` sends events from the upstream connection's own read callback, as they
        arrive, so no task wakes and no generator steps per event (at 500 streams/s the
        gateway relays ~8,500 events/s); ``end_now`` is called there too once the engine's
        stream has ended whole after its last event went out, so that the response can end
        without waiting for the task. No deadline here: a timeout around a generator would
        also fire while its consumer is blocked writing to a slow client; the request's total
        deadline is kept by the consumer (see ``api.openai._send_stream``)."""
        try:
            data = self._filter(self._first)
            if data:
                yield data
            if send_now is not None:
                self._send_now, self._end_now = send_now, end_now
                while not await self._resp.pipe(self._pipe, self._pipe_end):
                    if self._pipe_error is not None:
                        raise self._pipe_error
                    held, self._held = self._held, b""
                    if held:
                        yield held
                if self._pipe_error is not None:
                    raise self._pipe_error
            else:
                while raw := await self._resp.readany():
                    if data := self._filter(self._splitter.feed(raw)):
                        yield data
            if not self._saw_done:
                raise UpstreamDisconnected("stream ended without [DONE]")
            self._completed = True
        except (UpstreamError, ValueError) as exc:
            yield self.broken("broken_stream", type(exc).__name__)
        finally:
            self.finish()

    def _pipe(self, raw: bytes) -> bool:
        """``UpstreamResponse.pipe``'s sink: relay what ``raw`` completes, now. False (stop)
        when the client's connection cannot take it (kept in ``_held``) or the engine sent
        what the splitter refuses (kept in ``_pipe_error``: a sink must not raise)."""
        try:
            data = self._filter(self._splitter.feed(raw))
        except ValueError as exc:
            self._pipe_error = exc
            return False
        if not data:
            return True
        assert self._send_now is not None
        if self._send_now(data):
            return True
        self._held = data
        return False

    def _pipe_end(self) -> None:
        """The engine's stream ended whole while piped: finish here, then let the response
        end. In that order: the connection must be back in the pool before the client hears
        the end, or the client's next request finds none idle and waits for a new one."""
        if self._saw_done and self._pipe_error is None:
            self._completed = True
            self.finish()
            if self._end_now is not None:
                self._end_now()

    def broken(self, reason: str, detail: str) -> bytes:
        """The error event that ends a stream the engine failed (or was too slow) to finish."""
        self._proxy.metrics.upstream_errors.labels(self._call.spec.name, reason).inc()
        log.warning(
            "proxy: %s stream from %s broke: %s", self._call.request_id, self._replica.url, detail
        )
        if reason == "timeout":
            limit = self._proxy._settings.total_timeout_s
            err = gateway_timeout(f"The model did not finish within {limit:g}s.")
        else:
            err = APIError(
                502,
                "The model replica failed mid-stream.",
                type_="upstream_error",
                code="upstream_error",
            )
        return b"data: " + orjson.dumps(err.body()) + b"\n\n"

    def finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        if self._completed:
            self._resp.release()
        else:
            self._resp.close()  # closing the connection makes the engine abort generation
            if self._usage is None:
                self._proxy.metrics.client_aborts.labels(self._call.spec.name).inc()
        self._replica.outstanding -= 1
        call = self._call
        if self._usage is not None:
            usage = Usage(
                self._usage.get("prompt_tokens", call.prompt_estimate),
                self._usage.get("completion_tokens", self._chunks),
                "upstream",
            )
        else:
            # Cut off before the engine reported usage: one event per generated token.
            usage = Usage(call.prompt_estimate, self._chunks, "estimated")
        self._proxy.account(call, usage)
