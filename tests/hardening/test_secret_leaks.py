"""No plaintext API key, key secret, admin token or Stripe key reaches a log line, a metric,
an error body, Redis or a CLI report — whatever traffic the platform sees.

tests/test_logs_and_schema.py checks the redaction function on single strings. Here real
traffic goes through an in-process gateway (its log records captured raw by ``caplog``, i.e.
*before* the redacting handler: the code must not log secrets at all), a ``switchyard gateway``
process and a ``switchyard billing run`` process (their log files, written through the
production logging set-up, at debug level), and the billing worker talks to a fake Stripe that
fails, rate-limits and refuses a customer. Then every captured text is searched for every
secret, whole and in 10-character fragments from either end (a "helpful" truncated echo such as
``sy-abc…xyz`` would show up there).

Where a client itself puts its key into a field that is echoed back to it (``"model": key``:
"The model '…' does not exist"), the echo goes only to the sender, who had the key already; such
answers are left out of the error-body search but their logs and metrics are still searched.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from app.billing.record import STREAM
from tests.conftest import ADMIN_TOKEN, GatewayFactory, catalog_for, wait_for
from tests.support.fake_stripe import FakeStripe, Fault
from tests.support.platform import start_billing_worker, start_gateway, write_catalog
from tests.support.procs import Proc, free_port, switchyard

TEST_CLIENT_LOGGERS = ("httpx", "httpcore")  # this test's own HTTP client, not the gateway
MSG = [{"role": "user", "content": "hello"}]
CHAT, COMPLETIONS, EMBEDDINGS = "/v1/chat/completions", "/v1/completions", "/v1/embeddings"


class Capture:
    """Every response a test saw, split into what must be searched and what may echo."""

    def __init__(self) -> None:
        self.texts: list[tuple[str, str]] = []  # (where, text) searched for secrets
        self.responses = 0

    def add(self, where: str, text: str) -> None:
        self.texts.append((where, text))

    def response(self, r: httpx.Response, echoes_own_input: bool = False) -> httpx.Response:
        self.responses += 1
        headers = "\n".join(f"{k}: {v}" for k, v in r.headers.items())
        self.add(f"{r.request.method} {r.request.url.path} headers", headers)
        if r.status_code >= 400 and not echoes_own_input:
            self.add(f"{r.request.method} {r.request.url.path} {r.status_code} body", r.text)
        return r


def fragments(secret: str) -> list[str]:
    """The secret and its 10-character ends (a truncated echo shows one of them)."""
    return [secret, secret[:10], secret[-10:]]


def secret_part(key: str) -> str:
    """What follows ``sy-<12-character id>-`` (the secret itself may contain '-')."""
    assert key.startswith("sy-") and key[15] == "-", key
    return key[16:]


def find_leaks(searched: dict[str, list[str]], texts: list[tuple[str, str]]) -> list[str]:
    leaks = []
    for name, needles in searched.items():
        for fragment in needles:
            for where, text in texts:
                if fragment in text:
                    leaks.append(f"{name} ({fragment!r}) in {where}")
    return leaks


@pytest.fixture
def stripe_server() -> Iterator[FakeStripe]:
    with FakeStripe() as server:
        yield server


def gateway_traffic(base: str, admin_token: str, capture: Capture) -> dict[str, str]:
    """Successful calls, bad keys, revoked keys and admin calls against one gateway; returns
    every key (and would-be key) the traffic used, by name."""
    used: dict[str, str] = {}
    admin = {"authorization": f"Bearer {admin_token}"}
    with httpx.Client(base_url=base, timeout=20) as c:

        def create(customer: str, **spec: Any) -> dict[str, Any]:
            r = c.post("/admin/keys", json={"customer": customer, **spec}, headers=admin)
            assert r.status_code == 201, r.text
            created: dict[str, Any] = r.json()  # holds the plaintext once, by design
            return created

        good = create("cus_leak_a")
        scoped = create("cus_leak_b", models=["chat-small"])
        revoked = create("cus_leak_a")
        used |= {"good key": good["key"], "scoped key": scoped["key"], "revoked": revoked["key"]}
        prefix = good["key"][: -len(secret_part(good["key"]))]
        near = good["key"][:-1] + ("A" if good["key"][-1] != "A" else "B")
        far = prefix + "".join("A" if ch != "A" else "B" for ch in secret_part(good["key"]))
        unknown = "sy-" + "a" * 12 + "-" + secrets.token_urlsafe(32)
        used |= {"near miss": near, "far miss": far, "unknown id": unknown}

        def auth(key: str) -> dict[str, str]:
            return {"authorization": f"Bearer {key}"}

        def requests(key: str, echo: bool = False) -> None:
            bodies: list[tuple[str, dict[str, Any]]] = [
                (CHAT, {"model": "chat-small", "messages": MSG, "max_tokens": 3}),
                (CHAT, {"model": "chat-small", "messages": MSG, "max_tokens": 3, "stream": True}),
                (COMPLETIONS, {"model": "chat-small", "prompt": "hi", "max_tokens": 3}),
                (EMBEDDINGS, {"model": "embed-small", "input": "hi"}),
                (EMBEDDINGS, {"model": "chat-small", "input": "hi"}),  # 400 or 403
            ]
            for path, payload in bodies:
                capture.response(c.post(path, json=payload, headers=auth(key)), echo)
            for path in ("/v1/models", "/v1/models/chat-small", "/v1/models/nope", "/v1/usage"):
                capture.response(c.get(path, headers=auth(key)), echo)

        for key in (good["key"], scoped["key"], revoked["key"]):
            requests(key)
        r = capture.response(c.delete(f"/admin/keys/{revoked['id']}", headers=admin))
        assert r.status_code == 200
        for key in (revoked["key"], near, far, unknown, good["key"] + "x", good["key"][:-3]):
            requests(key)
        for headers in (
            {"authorization": good["key"]},  # no scheme
            {"authorization": f"bearer  {good['key']}"},
            {"authorization": f"Basic {good['key']}"},
            {"x-api-key": good["key"]},
            {"api-key": good["key"]},
        ):
            capture.response(c.post(CHAT, json={"model": "chat-small"}, headers=headers))
        capture.response(c.get("/v1/models", params={"api_key": good["key"]}))
        # the key misplaced in the body: bad values must not be echoed (except the model name)
        for payload in (
            {"model": "chat-small", "messages": MSG, "max_tokens": good["key"]},
            {"model": "chat-small", "messages": good["key"]},
            {"model": "chat-small", "messages": MSG, "user": good["key"], "n": good["key"]},
            {"model": "chat-small", "messages": MSG, good["key"]: 1},
        ):
            capture.response(c.post(CHAT, json=payload, headers=auth(good["key"])))
        capture.response(c.post(CHAT, content=f'{{"k": "{good["key"]}"', headers=auth(unknown)))
        capture.response(
            c.post(CHAT, json={"model": good["key"], "messages": MSG}, headers=auth(good["key"])),
            echoes_own_input=True,
        )
        capture.response(
            c.get(f"/v1/models/{good['key']}", headers=auth(good["key"])), echoes_own_input=True
        )
        # admin: right token, wrong tokens, API keys
        for path in ("/admin/keys", f"/admin/keys/{good['id']}", "/admin/pool"):
            capture.response(c.get(path, headers=admin))
            for token in (good["key"], admin_token + "x", admin_token[:-1], "garbage"):
                capture.response(c.get(path, headers=auth(token)))
            capture.response(c.get(path, headers={"authorization": admin_token}))
        capture.response(
            c.put("/admin/customers/cus_leak_a/limits", json={"tpm": 100000}, headers=admin)
        )
        capture.response(c.get("/admin/usage", params={"customer": "cus_leak_a"}, headers=admin))
        # a key pasted where a customer id goes (invalid: the space): refused without an echo
        bad_customer = {"customer": good["key"] + " "}
        capture.response(c.post("/admin/keys", json=bad_customer, headers=admin))
        capture.add("metrics", c.get("/metrics").text)
        capture.add("readyz", c.get("/readyz").text)
    return used


def test_no_secret_reaches_logs_metrics_error_bodies_redis_or_reports(
    gateway_factory: GatewayFactory,
    simulators: dict[str, list[Proc]],
    redis_url: str,
    stripe_server: FakeStripe,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    record_property: Any,
) -> None:
    caplog.set_level(logging.DEBUG)
    stripe_key = f"sk_test_{secrets.token_hex(16)}"
    process_admin_token = f"adm-{secrets.token_urlsafe(24)}"
    stripe_server.state.customers = {"cus_leak_a"}  # cus_leak_b is refused: a dead letter
    for kind in ("500", "429-retry-after", "drop", "429"):
        stripe_server.state.faults.append(Fault(kind))
    capture = Capture()

    in_process = gateway_factory(stripe_api_key=stripe_key, log_level="debug")
    used = gateway_traffic(in_process.url, ADMIN_TOKEN, capture)

    catalog = write_catalog(tmp_path / "catalog.yaml", catalog_for(simulators))
    gw_log = tmp_path / "gateway.log"
    process = start_gateway(
        gw_log,
        redis_url,
        catalog,
        SWITCHYARD_ADMIN_TOKEN=process_admin_token,
        SWITCHYARD_STRIPE_API_KEY=stripe_key,
        SWITCHYARD_LOG_LEVEL="debug",
        SWITCHYARD_SPOOL_DIR=str(tmp_path / "spool-process"),
    )
    try:
        more = gateway_traffic(process.url, process_admin_token, capture)
        used |= {f"{name} (process)": key for name, key in more.items()}
    finally:
        process.stop()

    worker_log = tmp_path / "worker.log"
    health_port = free_port()
    worker = start_billing_worker(
        redis_url,
        stripe_server.url,
        worker_log,
        stripe_key=stripe_key,
        SWITCHYARD_LOG_LEVEL="debug",
        SWITCHYARD_BILLING_HEALTH_PORT=str(health_port),
    )
    r = redis.Redis.from_url(redis_url)
    try:
        wait_for(
            lambda: (
                r.xlen(STREAM) == 0
                and r.zcard("sy:{bill}:windows") == 0
                and r.llen("sy:{bill}:dead") > 0
            ),
            timeout=30,
            interval=0.2,
        )
        capture.add("worker metrics", httpx.get(f"http://127.0.0.1:{health_port}/metrics").text)
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(10)
    assert stripe_server.state.accepted, "the worker did send to Stripe"
    env = {"SWITCHYARD_REDIS_URL": redis_url, "SWITCHYARD_STRIPE_API_KEY": stripe_key}
    for args in (("billing", "dead-letters"), ("billing", "reconcile"), ("keys", "list")):
        out = subprocess.run(
            switchyard(*args),
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        capture.add(f"switchyard {' '.join(args)}", out.stdout + out.stderr)
    dump = [(k.decode(), repr(r.dump(k))) for k in r.scan_iter(count=1000)]
    r.close()

    gateway_records = [
        f"{rec.name} {rec.levelname} {rec.getMessage()} {rec.exc_text or ''}"
        for rec in caplog.records
        if not rec.name.startswith(TEST_CLIENT_LOGGERS)
    ]
    capture.add("in-process gateway log records (raw)", "\n".join(gateway_records))
    capture.add("gateway process log", gw_log.read_text(errors="replace"))
    capture.add("billing worker log", worker_log.read_text(errors="replace"))
    capture.add("redis", "\n".join(f"{k} {v}" for k, v in dump))

    searched = {name: [key, *fragments(secret_part(key))] for name, key in used.items()}
    searched |= {
        "admin token": fragments(ADMIN_TOKEN),
        "admin token (process)": fragments(process_admin_token),
        "stripe key": fragments(stripe_key.removeprefix("sk_test_")),
    }
    log_lines = sum(t.count("\n") + 1 for w, t in capture.texts if "log" in w)
    record_property(
        "secret_search",
        {
            "responses": capture.responses,
            "texts": len(capture.texts),
            "log_lines": log_lines,
            "secrets": len(searched),
            "stripe_calls": stripe_server.state.calls,
        },
    )
    assert "Stripe refused" in worker_log.read_text(), "the dead-letter path ran"
    assert "will retry" in worker_log.read_text(), "the retry path ran"
    leaks = find_leaks(searched, capture.texts)
    assert not leaks, "\n".join(leaks)


def test_the_leak_search_finds_a_leak() -> None:
    """The control: the search above does see a key, a secret or a truncated echo."""
    key = "sy-abcdefghijkm-" + secrets.token_urlsafe(32)
    texts = [
        ("log", f"auth failed for {key}"),
        ("body", f"Incorrect API key provided: {key[:19]}…{key[-10:]}"),
    ]
    searched = {"key": [key, *fragments(secret_part(key))]}
    assert len(find_leaks(searched, texts)) >= 2
    assert find_leaks(searched, [("log", "sy-abcdefghijkm-[redacted]")]) == []
