"""Shared fixtures: a real redis-server, real simulator processes, real gateways on free ports.

Gateways run in-process (uvicorn in a thread, the same server and event loop as production)
so a test can build one with exactly the settings it needs; simulators and Redis are separate
processes so they can be killed like real replicas.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis as redis_sync
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.http_protocol import GatewayHttpProtocol
from app.server import create_app
from app.settings import Settings
from tests.support.procs import Proc, free_port, start

ADMIN_TOKEN = "test-admin-token-0123456789"


@pytest.fixture(scope="session")
def logs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed (the README's test command installs it)")
    port = free_port()
    data = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(data),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    client = redis_sync.Redis(port=port)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis_sync.ConnectionError:
            if time.monotonic() > deadline:
                proc.kill()
                pytest.fail("redis-server did not start")
            time.sleep(0.05)
    client.close()
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(5)


@pytest.fixture
def redis_url(redis_server: str) -> str:
    """A clean database for each test."""
    client = redis_sync.Redis.from_url(redis_server)
    client.flushdb()
    client.close()
    return redis_server


def start_simulator(logs: Path, model: str, *args: str) -> Proc:
    port = free_port()
    return start(
        [sys.executable, "-m", "app.simulator", "--model", model, "--port", str(port), *args],
        logs / f"sim-{model}-{port}.log",
        ready_url=f"http://127.0.0.1:{port}/health",
    )


@pytest.fixture(scope="session")
def simulators(logs_dir: Path) -> Iterator[dict[str, list[Proc]]]:
    """Two chat replicas and one embedding replica, shared by the whole session.

    Tests that change a replica's behaviour (POST /sim/config) must restore it."""
    procs = {
        "chat-small": [
            start_simulator(logs_dir, "chat-small", "--ttft-ms", "5", "--tokens-per-s", "500"),
            start_simulator(logs_dir, "chat-small", "--ttft-ms", "5", "--tokens-per-s", "500"),
        ],
        "embed-small": [start_simulator(logs_dir, "embed-small", "--kind", "embedding")],
    }
    yield procs
    for group in procs.values():
        for p in group:
            p.stop()


def catalog_for(simulators: dict[str, list[Proc]], **extra_models: Any) -> dict[str, Any]:
    models: list[dict[str, Any]] = [
        {
            "name": "chat-small",
            "endpoints": [p.url.removesuffix("/health") for p in simulators["chat-small"]],
        },
        {
            "name": "embed-small",
            "kind": "embedding",
            "endpoints": [p.url.removesuffix("/health") for p in simulators["embed-small"]],
        },
    ]
    for name, spec in extra_models.items():
        models.append({"name": name, **spec})
    return {"models": models}


class GatewayServer:
    """One in-process gateway on a free port, with helpers for tests."""

    def __init__(
        self, settings: Settings, protocol: type[HttpToolsProtocol] = GatewayHttpProtocol
    ) -> None:
        self.settings = settings
        self.app = create_app(settings)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            self.app,
            host="127.0.0.1",
            port=self.port,
            loop="uvloop",
            http=protocol,
            log_config=None,
            access_log=False,
            lifespan="on",
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name=f"gw-{self.port}", daemon=True)
        self._clients: list[openai.OpenAI] = []

    def start(self) -> GatewayServer:
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("gateway did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        for client in self._clients:
            client.close()
        self.server.should_exit = True
        self.thread.join(15)

    @property
    def services(self) -> Any:
        return self.app.state.services

    def admin(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=10
        )

    def create_key(self, **body: Any) -> dict[str, Any]:
        body.setdefault("customer", "cus_test")
        with self.admin() as c:
            r = c.post("/admin/keys", json=body)
        assert r.status_code == 201, r.text
        data: dict[str, Any] = r.json()
        return data

    def stream_chat(
        self, key: str, body: dict[str, Any], timeout: float = 10.0
    ) -> AbstractContextManager[httpx.Response]:
        """POST ``body`` to chat completions and stream the answer: ``with gw.stream_chat(...)
        as r``, read with ``r.iter_lines()`` (raw SSE, which the openai client hides)."""
        return httpx.stream(
            "POST",
            f"{self.url}/v1/chat/completions",
            json=body,
            headers={"authorization": f"Bearer {key}"},
            timeout=timeout,
        )

    def client(self, key: str, **kwargs: Any) -> openai.OpenAI:
        """An openai client for this gateway, closed when the gateway stops."""
        kwargs.setdefault("max_retries", 0)
        kwargs.setdefault("timeout", 20)
        client = openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, **kwargs)
        self._clients.append(client)
        return client


GatewayFactory = Callable[..., GatewayServer]


@pytest.fixture
def gateway_factory(
    redis_url: str, simulators: dict[str, list[Proc]], tmp_path: Path
) -> Iterator[GatewayFactory]:
    started: list[GatewayServer] = []

    def make(
        catalog: dict[str, Any] | None = None,
        protocol: type[HttpToolsProtocol] = GatewayHttpProtocol,
        **overrides: Any,
    ) -> GatewayServer:
        values: dict[str, Any] = {
            "redis_url": redis_url,
            "catalog": catalog if catalog is not None else catalog_for(simulators),
            "admin_token": ADMIN_TOKEN,
            "health_interval_s": 0.5,
            "spool_dir": tmp_path / "spool",
            "gc_freeze": False,  # in-process gateways: the heap is pytest's
        }
        settings = Settings(**(values | overrides))
        gw = GatewayServer(settings, protocol).start()
        started.append(gw)
        return gw

    yield make
    for gw in started:
        gw.stop()


@pytest.fixture
def gateway(gateway_factory: GatewayFactory) -> GatewayServer:
    return gateway_factory()


@pytest.fixture
def api_key(gateway: GatewayServer) -> str:
    key: str = gateway.create_key(customer="cus_default")["key"]
    return key


def sim_config(proc: Proc, **changes: Any) -> None:
    base = proc.url.removesuffix("/health")
    r = httpx.post(f"{base}/sim/config", json=changes, timeout=5)
    assert r.status_code == 200, r.text


def sim_stats(proc: Proc) -> dict[str, Any]:
    base = proc.url.removesuffix("/health")
    stats: dict[str, Any] = httpx.get(f"{base}/sim/stats", timeout=5).json()
    return stats


def sim_reset(proc: Proc) -> None:
    base = proc.url.removesuffix("/health")
    httpx.post(f"{base}/sim/reset", timeout=5).raise_for_status()


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(interval)
