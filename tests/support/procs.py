"""Start real server processes on free ports for tests, and stop them reliably."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from app.local.procs import free_port  # noqa: F401  (re-exported for the tests)

REPO = Path(__file__).resolve().parents[2]


def wait_http(url: str, timeout: float = 20.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Poll until url answers 2xx; fail early if the process died."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            r = httpx.get(url, timeout=1.0)
            if r.status_code < 300:
                return
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer within {timeout}s (last error: {last})")


@dataclass
class Proc:
    """A child process with its log file; stop() is idempotent."""

    popen: subprocess.Popen[bytes]
    log_path: Path
    url: str = ""
    extra: dict[str, object] = field(default_factory=dict)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self) -> None:
        if self.alive():
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait(5)

    def stop(self, timeout: float = 5.0) -> None:
        if not self.alive():
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()


def start(
    args: Sequence[str],
    log_path: Path,
    ready_url: str | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 20.0,
) -> Proc:
    """Start `args` with stdout/stderr to log_path; wait until ready_url answers."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, **(env or {})}
    with log_path.open("wb") as out:
        popen = subprocess.Popen(
            list(args), stdout=out, stderr=subprocess.STDOUT, env=full_env, cwd=REPO
        )
    proc = Proc(popen=popen, log_path=log_path, url=ready_url or "")
    if ready_url:
        try:
            wait_http(ready_url, timeout=timeout, proc=popen)
        except BaseException:
            proc.stop()
            raise RuntimeError(f"{args!r} failed to start; log:\n{proc.log()[-4000:]}") from None
    return proc


def switchyard(*args: str) -> list[str]:
    """Command line that runs the switchyard CLI with this interpreter."""
    return [sys.executable, "-m", "app.cli", *args]
