"""API keys: hashed at rest, shown once, scoped, revocable everywhere within a second."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
import openai
import pytest
import redis

from tests.conftest import ADMIN_TOKEN, GatewayFactory, GatewayServer

MSG = [{"role": "user", "content": "hi"}]


def cli(redis_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SWITCHYARD_REDIS_URL": redis_url}
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        env=env,
        text=True,
        capture_output=True,
        timeout=60,
        check=False,
    )


def test_only_a_hash_of_the_key_is_stored(gateway: GatewayServer, redis_url: str) -> None:
    created = gateway.create_key(customer="cus_hash")
    secret = created["key"].rsplit("-", 1)[1]
    r = redis.Redis.from_url(redis_url)
    dump = b"".join((r.dump(k) or b"") + k for k in r.scan_iter(count=1000))
    r.close()
    assert secret.encode() not in dump
    assert created["key"].encode() not in dump
    with gateway.admin() as admin:
        listed = admin.get("/admin/keys").json()["data"]
        one = admin.get(f"/admin/keys/{created['id']}").json()
    assert [k["id"] for k in listed] == [created["id"]]
    assert "key" not in listed[0] and "hash" not in listed[0]
    assert "key" not in one and "hash" not in one


def test_cli_create_list_revoke(gateway: GatewayServer, redis_url: str) -> None:
    out = cli(
        redis_url,
        "keys",
        "create",
        "--customer",
        "cus_cli",
        "--models",
        "chat-small,embed-small",
        "--rpm",
        "60",
        "--tpm",
        "10000",
        "--json",
    )
    assert out.returncode == 0, out.stderr
    created = json.loads(out.stdout)
    assert created["customer"] == "cus_cli"
    assert created["models"] == ["chat-small", "embed-small"]
    assert (created["rpm"], created["tpm"]) == (60, 10000)
    client = gateway.client(created["key"])
    client.chat.completions.create(model="chat-small", messages=MSG, max_tokens=1)

    listed = cli(redis_url, "keys", "list")
    assert listed.returncode == 0
    assert created["id"] in listed.stdout
    assert created["key"] not in listed.stdout

    revoked = cli(redis_url, "keys", "revoke", created["id"])
    assert revoked.returncode == 0, revoked.stderr
    time.sleep(gateway.settings.key_cache_ttl_s + 0.05)
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model="chat-small", messages=MSG, max_tokens=1)
    assert cli(redis_url, "keys", "revoke", "nosuchkeyid2").returncode == 1


def test_cli_defaults_allow_all_models_without_limits(redis_url: str) -> None:
    out = cli(redis_url, "keys", "create", "--customer", "cus_all", "--json")
    created = json.loads(out.stdout)
    assert created["models"] is None
    assert created["rpm"] is None and created["tpm"] is None
    assert created["key"].startswith("sy-" + created["id"] + "-")


def test_revocation_reaches_every_gateway_within_a_second(
    gateway_factory: GatewayFactory,
) -> None:
    first, second = gateway_factory(), gateway_factory()
    created = first.create_key()
    clients = [gw.client(created["key"]) for gw in (first, second)]
    for c in clients:  # both gateways now hold the key in their caches
        c.chat.completions.create(model="chat-small", messages=MSG, max_tokens=1)
    with first.admin() as admin:
        assert admin.delete(f"/admin/keys/{created['id']}").status_code == 200
    revoked_at = time.monotonic()
    pending = {0, 1}
    while pending and time.monotonic() - revoked_at < 1.0:
        for i in list(pending):
            try:
                clients[i].models.list()
            except openai.AuthenticationError:
                pending.discard(i)
        time.sleep(0.02)
    assert not pending, f"gateways {pending} still accepted the key after 1 s"


def test_admin_api_needs_the_admin_token(gateway: GatewayServer, api_key: str) -> None:
    url = f"{gateway.url}/admin/keys"
    assert httpx.get(url).status_code == 401
    for token in (api_key, "wrong", ADMIN_TOKEN[:-1]):
        r = httpx.get(url, headers={"authorization": f"Bearer {token}"})
        assert r.status_code == 403
        assert r.json()["error"]["code"] == "not_admin"


def test_admin_api_is_off_without_a_token(gateway_factory: GatewayFactory) -> None:
    gw = gateway_factory(admin_token=None)
    r = httpx.get(f"{gw.url}/admin/keys", headers={"authorization": "Bearer anything"})
    assert r.status_code == 403
    assert r.json()["error"]["code"] == "admin_disabled"


def test_admin_rejects_bad_key_specs(gateway: GatewayServer) -> None:
    with gateway.admin() as admin:
        for body in (
            {"customer": ""},
            {"customer": "cus 1"},
            {"customer": "c", "rpm": 0},
            {"customer": "c", "bogus": 1},
            {},
        ):
            r = admin.post("/admin/keys", json=body)
            assert r.status_code == 422, body
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        assert admin.get("/admin/keys/nope").status_code == 404
        assert admin.delete("/admin/keys/abcdefghijkm").status_code == 404


def test_admin_pool_shows_replicas(gateway: GatewayServer) -> None:
    with gateway.admin() as admin:
        pool = admin.get("/admin/pool").json()
    chat = next(m for m in pool["models"] if m["model"] == "chat-small")
    assert len(chat["replicas"]) == 2
    assert all(r["healthy"] for r in chat["replicas"])
