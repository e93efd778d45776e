"""Pieces of a whole platform for end-to-end tests: a Redis process that can be SIGKILLed and
restarted on its data, gateway and billing-worker processes, and the catalogue file they read."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import redis
import yaml

from tests.support.procs import Proc, free_port, start, switchyard


class RedisProcess:
    """A redis-server of one test: same port and data directory across restarts.

    With ``fsync_always`` every acknowledged write is on disk before the reply (AOF with
    ``appendfsync always``), so a SIGKILL loses nothing a client was told had been written."""

    def __init__(self, data_dir: Path, fsync_always: bool = True) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed")
        self.binary = binary
        self.data_dir = data_dir
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.fsync = "always" if fsync_always else "everysec"
        self.popen: subprocess.Popen[bytes] | None = None
        self.kills = 0

    def start(self, timeout: float = 10.0) -> RedisProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.data_dir),
            "--save", "",
            "--appendonly", "yes",
            "--appendfsync", self.fsync,
        ]  # fmt: skip
        self.popen = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        client = redis.Redis(port=self.port, socket_timeout=1)
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    if client.ping():
                        return self
                except redis.RedisError:
                    pass
                if self.popen.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not start")
                time.sleep(0.02)
        finally:
            client.close()

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final fsync; what survives is what the AOF already holds."""
        if self.popen is not None and self.alive():
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait(5)
            self.kills += 1

    def stop(self) -> None:
        if self.popen is not None and self.alive():
            self.popen.terminate()
            self.popen.wait(5)

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=5)


def write_catalog(path: Path, catalog: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(catalog))
    return path


def start_gateway(log_path: Path, redis_url: str, catalog_path: Path, **env: str) -> Proc:
    """``switchyard gateway`` as its own process (its logging set up as in production)."""
    port = free_port()
    full_env = {
        "SWITCHYARD_REDIS_URL": redis_url,
        "SWITCHYARD_CATALOG": str(catalog_path),
        "SWITCHYARD_HEALTH_INTERVAL_S": "0.5",
        **env,
    }
    proc = start(
        switchyard("gateway", "--port", str(port)),
        log_path,
        ready_url=f"http://127.0.0.1:{port}/healthz",
        env=full_env,
    )
    proc.url = f"http://127.0.0.1:{port}"
    return proc


def start_billing_worker(
    redis_url: str, stripe_url: str, log_path: Path, stripe_key: str = "sk_test_e2e", **env: str
) -> subprocess.Popen[bytes]:
    """``switchyard billing run`` with 1 s windows, sending to ``stripe_url``; appends to
    ``log_path`` so that successive workers of one test share a log."""
    full_env = {
        **os.environ,
        "SWITCHYARD_REDIS_URL": redis_url,
        "SWITCHYARD_BILLING_WINDOW_S": "1",
        "SWITCHYARD_STRIPE_API_KEY": stripe_key,
        "SWITCHYARD_STRIPE_API_BASE": stripe_url,
        "SWITCHYARD_STRIPE_MAX_EVENTS_PER_S": "200",
        **env,
    }
    with log_path.open("ab") as out:
        return subprocess.Popen(
            switchyard("billing", "run"), env=full_env, stdout=out, stderr=subprocess.STDOUT
        )
