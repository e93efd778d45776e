"""Every failure is an OpenAI-shaped JSON error with the right status, never a 500."""

from __future__ import annotations

import http.client
import json
import socket
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import GatewayFactory, GatewayServer, start_simulator
from tests.gateway.test_streaming import metric
from tests.support.procs import free_port

MSG = [{"role": "user", "content": "hi"}]


def post(
    gw: GatewayServer,
    key: str | None,
    body: Any = None,
    *,
    content: bytes | None = None,
    path: str = "/v1/chat/completions",
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    h = {"content-type": "application/json", **(headers or {})}
    if key is not None:
        h["authorization"] = f"Bearer {key}"
    if content is None:
        return httpx.post(f"{gw.url}{path}", json=body, headers=h, timeout=20)
    return httpx.post(f"{gw.url}{path}", content=content, headers=h, timeout=20)


def assert_openai_error(r: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    if code is not None:
        assert err["code"] == code
    return dict(err)


def test_missing_bearer_is_401(gateway: GatewayServer) -> None:
    r = post(gateway, None, {"model": "chat-small", "messages": MSG})
    assert_openai_error(r, 401, "missing_api_key")
    assert r.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize(
    "header", ["Basic abc", "Bearer", "bearer\tx", "sy-abc", "Token x y", "Bearer a b"]
)
def test_malformed_authorization_is_401(gateway: GatewayServer, header: str) -> None:
    r = post(
        gateway, None, {"model": "chat-small", "messages": MSG}, headers={"authorization": header}
    )
    assert_openai_error(r, 401)


def test_wrong_key_is_401_with_openai_client(gateway: GatewayServer, api_key: str) -> None:
    tampered = api_key[:-4] + ("AAAA" if not api_key.endswith("AAAA") else "BBBB")
    with pytest.raises(openai.AuthenticationError) as info:
        gateway.client(tampered).chat.completions.create(model="chat-small", messages=MSG)
    assert info.value.status_code == 401
    assert tampered not in str(info.value)


def test_unknown_key_id_is_401(gateway: GatewayServer) -> None:
    r = post(gateway, "sy-abcdefghijkm-" + "A" * 43, {"model": "chat-small", "messages": MSG})
    assert_openai_error(r, 401, "invalid_api_key")


def test_revoked_key_is_401(gateway: GatewayServer) -> None:
    created = gateway.create_key()
    client = gateway.client(created["key"])
    client.chat.completions.create(model="chat-small", messages=MSG, max_tokens=1)
    with gateway.admin() as admin:
        assert admin.delete(f"/admin/keys/{created['id']}").json()["status"] == "revoked"
    with pytest.raises(openai.AuthenticationError) as info:
        client.chat.completions.create(model="chat-small", messages=MSG, max_tokens=1)
    assert info.value.code == "revoked_api_key"


def test_expired_key_is_401(gateway: GatewayServer, redis_url: str) -> None:
    import orjson
    import redis

    from app.auth.keys import record_key

    created = gateway.create_key(expires_in_s=3600)
    r = redis.Redis.from_url(redis_url)
    raw = orjson.loads(r.get(record_key(created["id"])))  # type: ignore[arg-type]
    raw["expires_at"] = 1.0
    r.set(record_key(created["id"]), orjson.dumps(raw))
    r.close()
    resp = post(gateway, created["key"], {"model": "chat-small", "messages": MSG})
    assert_openai_error(resp, 401, "expired_api_key")


def test_forbidden_model_is_403(gateway: GatewayServer) -> None:
    key = gateway.create_key(models=["embed-small"])["key"]
    with pytest.raises(openai.PermissionDeniedError) as info:
        gateway.client(key).chat.completions.create(model="chat-small", messages=MSG)
    assert info.value.status_code == 403
    assert info.value.code == "model_not_allowed"


def test_unknown_model_is_404(gateway: GatewayServer, api_key: str) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        gateway.client(api_key).chat.completions.create(model="gpt-9", messages=MSG)
    assert info.value.code == "model_not_found"


def test_embeddings_on_a_chat_model_is_400(gateway: GatewayServer, api_key: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        gateway.client(api_key).embeddings.create(model="chat-small", input="x")
    assert info.value.code == "unsupported_endpoint"


@pytest.mark.parametrize("content", [b"{not json", b"", b"\xff\xfe\x00", b"[1, 2]", b"null"])
def test_invalid_json_is_400(gateway: GatewayServer, api_key: str, content: bytes) -> None:
    assert_openai_error(post(gateway, api_key, content=content), 400, "invalid_json")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": MSG}, "model"),
        ({"model": "chat-small"}, "messages"),
        ({"model": "chat-small", "messages": []}, "messages"),
        (
            {"model": "chat-small", "messages": [{"role": "wizard", "content": "x"}]},
            "messages.0.role",
        ),
        ({"model": "chat-small", "messages": MSG, "max_tokens": -5}, "max_tokens"),
        ({"model": "chat-small", "messages": MSG, "max_tokens": "ten"}, "max_tokens"),
        ({"model": "chat-small", "messages": MSG, "n": 100000}, "n"),
        ({"model": "chat-small", "messages": MSG, "stream": "yes"}, "stream"),
        ({"model": 42, "messages": MSG}, "model"),
    ],
)
def test_schema_violations_are_422_naming_the_param(
    gateway: GatewayServer, api_key: str, body: dict[str, Any], param: str
) -> None:
    err = assert_openai_error(post(gateway, api_key, body), 422, "invalid_value")
    assert err["param"] == param


def test_body_too_large_is_413(gateway_factory: GatewayFactory) -> None:
    gw = gateway_factory(max_body_bytes=2048)
    key = gw.create_key()["key"]
    big = {"model": "chat-small", "messages": [{"role": "user", "content": "x" * 5000}]}
    assert_openai_error(post(gw, key, big), 413, "request_too_large")


def test_chunked_body_too_large_is_413(gateway_factory: GatewayFactory) -> None:
    gw = gateway_factory(max_body_bytes=2048)
    key = gw.create_key()["key"]

    def chunks() -> Any:
        for _ in range(10):
            yield b"x" * 1000

    r = httpx.post(
        f"{gw.url}/v1/chat/completions",
        content=chunks(),
        headers={"authorization": f"Bearer {key}"},
        timeout=10,
    )
    assert_openai_error(r, 413, "request_too_large")


def test_context_length_error_from_engine_is_relayed_as_400(
    gateway: GatewayServer, api_key: str
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        gateway.client(api_key).chat.completions.create(
            model="chat-small", messages=MSG, max_tokens=100_000
        )
    assert "maximum context length" in info.value.message


def test_no_healthy_upstream_is_503(gateway_factory: GatewayFactory) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    gw = gateway_factory(catalog={"models": [{"name": "ghost", "endpoints": [dead]}]})
    key = gw.create_key()["key"]
    r = post(gw, key, {"model": "ghost", "messages": MSG})
    assert_openai_error(r, 503, "no_healthy_upstream")
    assert int(r.headers["retry-after"]) >= 1
    assert httpx.get(f"{gw.url}/readyz").status_code == 503


def test_upstream_timeout_is_504(gateway_factory: GatewayFactory, logs_dir: Any) -> None:
    sim = start_simulator(logs_dir, "slow", "--hang")
    try:
        base = sim.url.removesuffix("/health")
        gw = gateway_factory(
            catalog={"models": [{"name": "slow", "endpoints": [base]}]},
            total_timeout_s=0.5,
            first_token_timeout_s=0.5,
        )
        key = gw.create_key()["key"]
        r = post(gw, key, {"model": "slow", "messages": MSG})
        assert_openai_error(r, 504, "upstream_timeout")
        r = post(gw, key, {"model": "slow", "messages": MSG, "stream": True})
        assert_openai_error(r, 504, "upstream_timeout")
    finally:
        sim.stop()


def test_unknown_route_and_method_are_openai_shaped(gateway: GatewayServer) -> None:
    assert_openai_error(httpx.get(f"{gateway.url}/v1/nothing-here"), 404, "unknown_url")
    assert_openai_error(httpx.get(f"{gateway.url}/v1/chat/completions"), 405, "method_not_allowed")


def test_requests_started_early_get_the_same_answers(
    gateway_factory: GatewayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request whose key is cached is checked and sent upstream from the server's callback
    once its body is complete (app.http_protocol.EarlyStart): its errors are the same
    OpenAI-shaped answers, and its success is a success."""
    gw = gateway_factory(max_body_bytes=2000)
    key = gw.create_key(models=["chat-small"])["key"]
    started: list[bytes] = []
    early_start = gw.app.early_start

    def counting(scope: Any, body: bytes) -> Any:
        started.append(body)
        return early_start(scope, body)

    monkeypatch.setattr(gw.app, "early_start", counting)

    def one_write(body: bytes) -> tuple[int, dict[str, Any]]:
        head = (
            f"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {key}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
        ).encode()
        with socket.create_connection(("127.0.0.1", gw.port), timeout=20) as sock:
            sock.sendall(head + body)
            r = http.client.HTTPResponse(sock)
            r.begin()
            return r.status, json.loads(r.read())

    chat = {"model": "chat-small", "messages": MSG, "max_tokens": 3}
    assert one_write(json.dumps(chat).encode())[0] == 200  # the key is cached from here on
    assert metric(gw, "switchyard_early_starts_total", outcome="not_cached") == 1
    cases = [
        (chat, 200, None, True),
        (b"{not json", 400, "invalid_json", True),
        ({"model": "chat-small"}, 422, "invalid_value", True),
        ({**chat, "model": "nope"}, 404, "model_not_found", True),
        ({**chat, "model": "embed-small"}, 403, "model_not_allowed", True),
        # Declared over the limit: refused by the task at once, without waiting for the body.
        ({**chat, "messages": [{"role": "user", "content": "x" * 3000}]}, 413, None, False),
    ]
    for body, status, code, early in cases:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        before = len(started)
        got, answer = one_write(raw)
        assert got == status, (body, answer)
        assert len(started) == before + early  # it did go the early way (or not)
        if status == 200:
            assert answer["choices"][0]["message"]["content"]
        else:
            assert set(answer["error"]) == {"message", "type", "param", "code"}
            if code is not None:
                assert answer["error"]["code"] == code
    # The openai client writes the head and the body apart: started early all the same.
    before = len(started)
    reply = gw.client(key).chat.completions.create(model="chat-small", messages=MSG, max_tokens=3)
    assert reply.choices[0].message.content
    assert len(started) == before + 1
    assert metric(gw, "switchyard_early_starts_total", outcome="started") == len(started) - 1
