"""Fixtures of the hardening tests: gateways and engines that live for a whole module.

A fuzzing or hostile-client module sends thousands of requests; starting a gateway per test
would cost more than the tests. These gateways use their own Redis database (not the one the
per-test ``redis_url`` fixture flushes), and engines of their own that answer at once, so a
test elsewhere that reconfigures the shared simulators cannot disturb them.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as redis_sync

from app.settings import Settings
from tests.conftest import ADMIN_TOKEN, GatewayServer
from tests.support.procs import Proc, free_port, start

HARDENING_DB = 7  # a Redis database of its own; the per-test fixture flushes database 0


def engine(logs: Path, model: str, *args: str) -> Proc:
    """A simulated engine that answers as fast as it can (16 tokens, no time to first token)."""
    port = free_port()
    command = [sys.executable, "-m", "app.simulator", "--model", model, "--port", str(port)]
    return start(
        [*command, "--ttft-ms", "0", "--tokens-per-s", "0", *args],
        logs / f"hardening-{model}-{port}.log",
        ready_url=f"http://127.0.0.1:{port}/health",
    )


def base_url(proc: Proc) -> str:
    return proc.url.removesuffix("/health")


@pytest.fixture(scope="module")
def fast_engines(logs_dir: Path) -> Iterator[dict[str, Proc]]:
    procs = {
        "chat-small": engine(logs_dir, "chat-small"),
        "embed-small": engine(logs_dir, "embed-small", "--kind", "embedding"),
    }
    yield procs
    for p in procs.values():
        p.stop()


def hardening_catalog(engines: dict[str, Proc]) -> dict[str, Any]:
    return {
        "models": [
            {"name": "chat-small", "endpoints": [base_url(engines["chat-small"])]},
            {
                "name": "embed-small",
                "kind": "embedding",
                "endpoints": [base_url(engines["embed-small"])],
            },
        ]
    }


def hardening_redis_url(redis_server: str) -> str:
    url = f"{redis_server.rsplit('/', 1)[0]}/{HARDENING_DB}"
    client = redis_sync.Redis.from_url(url)
    client.flushdb()
    client.close()
    return url


@pytest.fixture(scope="module")
def module_gateway(
    redis_server: str, fast_engines: dict[str, Proc], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayServer]:
    """One in-process gateway (uvicorn + httptools, as in production) for a whole module."""
    settings = Settings(
        redis_url=hardening_redis_url(redis_server),
        catalog=hardening_catalog(fast_engines),
        admin_token=ADMIN_TOKEN,
        health_interval_s=0.5,
        spool_dir=tmp_path_factory.mktemp("spool"),
        gc_freeze=False,  # in-process: the heap is pytest's
    )
    gw = GatewayServer(settings).start()
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def module_key(module_gateway: GatewayServer) -> str:
    """A valid API key of the module's gateway: every model, no limits."""
    key: str = module_gateway.create_key(customer="cus_hardening")["key"]
    return key


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    """Count the inputs a hypothesis (or schemathesis) test tried: ``inputs_tried`` in the
    results table of bench/hardening.py."""
    handle = getattr(getattr(item, "obj", None), "hypothesis", None)
    if handle is None:
        yield
        return
    inner = handle.inner_test
    tried = 0

    @functools.wraps(inner)
    def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal tried
        tried += 1
        return inner(*args, **kwargs)

    handle.inner_test = counted
    try:
        yield
    finally:
        handle.inner_test = inner
        item.user_properties.append(("inputs_tried", tried))
