"""Streams pass through as they are generated, and a client that leaves stops the engine."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.http_protocol import GatewayHttpProtocol
from tests.conftest import GatewayFactory, GatewayServer, sim_stats, start_simulator, wait_for
from tests.support.procs import Proc, free_port

MSG = [{"role": "user", "content": "Tell me a long story"}]


@pytest.fixture
def slow_sim(logs_dir: Path) -> Iterator[Proc]:
    """20 tokens/s: a 40-token answer takes about two seconds."""
    sim = start_simulator(
        logs_dir, "slow-chat", "--ttft-ms", "10", "--tokens-per-s", "20", "--output-tokens", "1000"
    )
    yield sim
    sim.stop()


@pytest.fixture(
    params=[GatewayHttpProtocol, HttpToolsProtocol],
    ids=["events-sent-from-the-read-callback", "events-sent-by-the-task"],
)
def slow_gateway(
    gateway_factory: GatewayFactory, slow_sim: Proc, request: pytest.FixtureRequest
) -> GatewayServer:
    """The gateway behind its own protocol, which relays a stream's events from the engine
    connection's callback (``send_chunk``), and behind uvicorn's, which offers no extension:
    the request's task relays them."""
    base = slow_sim.url.removesuffix("/health")
    catalog = {"models": [{"name": "slow-chat", "endpoints": [base]}]}
    return gateway_factory(catalog=catalog, protocol=request.param)


def metric(gw: GatewayServer, name: str, **labels: str) -> float:
    text = httpx.get(f"{gw.url}/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def test_tokens_arrive_as_they_are_generated(slow_gateway: GatewayServer) -> None:
    key = slow_gateway.create_key()["key"]
    arrivals: list[float] = []
    t0 = time.perf_counter()
    stream = slow_gateway.client(key).chat.completions.create(
        model="slow-chat", messages=MSG, max_tokens=20, stream=True
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.perf_counter() - t0)
    assert len(arrivals) == 20
    # At 20 tokens/s the stream lasts ~1 s; a buffering proxy would deliver everything at the end.
    assert arrivals[0] < 0.5 * arrivals[-1]
    spread = [b - a for a, b in itertools.pairwise(arrivals)]
    assert sum(1 for s in spread if s > 0.02) >= 15, "chunks were batched, not relayed"


def test_client_disconnect_aborts_the_engine_and_bills_what_was_sent(
    slow_gateway: GatewayServer, slow_sim: Proc
) -> None:
    key = slow_gateway.create_key()["key"]
    body = {"model": "slow-chat", "messages": MSG, "max_tokens": 200, "stream": True}
    received = 0
    with slow_gateway.stream_chat(key, body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if '"content":"' in line and '"content":""' not in line:
                received += 1
            if received == 3:
                break
    wait_for(lambda: sim_stats(slow_sim)["aborted"] == 1, timeout=5)
    stats = sim_stats(slow_sim)
    assert stats["running"] == 0
    assert stats["tokens_generated"] < 20, "the engine kept generating after the client left"
    wait_for(
        lambda: metric(slow_gateway, "switchyard_client_disconnects_total", model="slow-chat") == 1
    )
    completion = metric(
        slow_gateway, "switchyard_tokens_total", model="slow-chat", type="completion"
    )
    assert 3 <= completion <= 6, "tokens relayed before the cut must be accounted"
    pool = slow_gateway.services.router.pool("slow-chat")
    wait_for(lambda: pool.replicas[0].outstanding == 0)


def test_non_streamed_client_disconnect_aborts_the_engine(
    slow_gateway: GatewayServer, slow_sim: Proc
) -> None:
    key = slow_gateway.create_key()["key"]
    body = {"model": "slow-chat", "messages": MSG, "max_tokens": 200}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{slow_gateway.url}/v1/chat/completions",
            json=body,
            headers={"authorization": f"Bearer {key}"},
            timeout=0.5,
        )
    wait_for(lambda: sim_stats(slow_sim)["aborted"] == 1, timeout=5)
    assert sim_stats(slow_sim)["running"] == 0


def test_metrics_count_requests_tokens_and_ttft(slow_gateway: GatewayServer) -> None:
    key = slow_gateway.create_key()["key"]
    client = slow_gateway.client(key)
    client.chat.completions.create(model="slow-chat", messages=MSG, max_tokens=2)
    list(client.chat.completions.create(model="slow-chat", messages=MSG, max_tokens=2, stream=True))
    labels = {"model": "slow-chat", "endpoint": "/v1/chat/completions", "status": "200"}
    wait_for(lambda: metric(slow_gateway, "switchyard_requests_total", **labels) == 2)
    wait_for(
        lambda: (
            metric(slow_gateway, "switchyard_tokens_total", model="slow-chat", type="completion")
            == 4
        )
    )
    assert (
        metric(slow_gateway, "switchyard_time_to_first_token_seconds_count", model="slow-chat") == 1
    )
    assert (
        metric(
            slow_gateway,
            "switchyard_request_duration_seconds_count",
            model="slow-chat",
            endpoint="/v1/chat/completions",
        )
        == 2
    )
    text = httpx.get(f"{slow_gateway.url}/metrics").text
    assert key not in text
    assert key.split("-")[1] not in text, "key ids are not metric labels"


def test_a_stream_past_the_total_timeout_ends_with_a_timeout_event(
    gateway_factory: GatewayFactory, slow_sim: Proc
) -> None:
    base = slow_sim.url.removesuffix("/health")
    gw = gateway_factory(
        catalog={"models": [{"name": "slow-chat", "endpoints": [base]}]}, total_timeout_s=1.0
    )
    key = gw.create_key()["key"]
    body = {"model": "slow-chat", "messages": MSG, "max_tokens": 200, "stream": True}
    t0 = time.monotonic()
    with gw.stream_chat(key, body) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    elapsed = time.monotonic() - t0
    assert 0.9 <= elapsed < 3.0
    assert 5 <= len(lines) < 40  # ~20 tokens/s for one second, then the error event
    assert '"code":"upstream_timeout"' in lines[-1]
    assert "data: [DONE]" not in lines
    assert metric(gw, "switchyard_upstream_errors_total", model="slow-chat", reason="timeout") == 1
    wait_for(lambda: sim_stats(slow_sim)["aborted"] == 1, timeout=5)  # the engine stopped
    # what was generated before the cut is accounted
    wait_for(
        lambda: metric(gw, "switchyard_tokens_total", model="slow-chat", type="completion") >= 5
    )


def test_streams_one_after_another_reuse_one_engine_connection(
    slow_gateway: GatewayServer, slow_sim: Proc
) -> None:
    """A relayed stream hands its engine connection back before the client hears the end, so
    the client's next request is written on it instead of waiting for a new connection."""
    key = slow_gateway.create_key()["key"]
    client = slow_gateway.client(key)
    pool, _ = slow_gateway.services.proxy._upstream._host(slow_sim.url.removesuffix("/health"))
    seen: list[object] = []  # the idle connections to the engine after each stream
    for _ in range(4):
        chunks = list(
            client.chat.completions.create(
                model="slow-chat", messages=MSG, max_tokens=2, stream=True
            )
        )
        assert chunks[-1].choices[0].finish_reason == "length"
        seen += [c for c in pool._idle if all(c is not s for s in seen)]
    assert len(seen) == 1


class SplitEngine:
    """An engine that sends its role event, then its first token 50 ms later, as vLLM may:
    the first token is not in the event the gateway primes the stream with."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._loop = asyncio.new_event_loop()
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._serve, "127.0.0.1", self.port)
        )
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        async def shut() -> None:
            self._server.close()
            for writer in self._writers:
                writer.close()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._server.wait_closed()

        asyncio.run_coroutine_threadsafe(shut(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                await reader.readexactly(length)
                if not head.startswith(b"POST"):
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
                    continue
                writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
                chunk = '{"id":"c","object":"chat.completion.chunk","model":"split","choices":%s}'
                role = chunk % '[{"index":0,"delta":{"role":"assistant","content":""}}]'
                token = chunk % '[{"index":0,"delta":{"content":"hi"},"finish_reason":"length"}]'
                usage = chunk.removesuffix("}") % "[]" + (
                    ',"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}'
                )
                for event, pause in ((role, 0.05), (token, 0), (usage, 0), ("[DONE]", 0)):
                    data = f"data: {event}\n\n".encode()
                    writer.write(b"%x\r\n%s\r\n" % (len(data), data))
                    await writer.drain()
                    await asyncio.sleep(pause)
                writer.write(b"0\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._writers.discard(writer)
            self._tasks.discard(task)
            writer.close()


@pytest.mark.parametrize("protocol", [GatewayHttpProtocol, HttpToolsProtocol])
def test_time_to_first_token_counts_from_the_first_token_not_the_first_event(
    gateway_factory: GatewayFactory, protocol: type[HttpToolsProtocol]
) -> None:
    engine = SplitEngine()
    try:
        gw = gateway_factory(
            catalog={"models": [{"name": "split", "endpoints": [engine.url]}]}, protocol=protocol
        )
        client = gw.client(gw.create_key()["key"])
        chunks = list(client.chat.completions.create(model="split", messages=MSG, stream=True))
        assert [c.choices[0].delta.content for c in chunks] == ["", "hi"]
        count = "switchyard_time_to_first_token_seconds_count"
        wait_for(lambda: metric(gw, count, model="split") == 1)
        assert metric(gw, "switchyard_time_to_first_token_seconds_sum", model="split") >= 0.05
        wait_for(
            lambda: metric(gw, "switchyard_tokens_total", model="split", type="completion") == 1
        )
    finally:
        engine.stop()
