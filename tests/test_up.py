"""`switchyard up` as a new user runs it: one command, a demo key, everything works, Ctrl-C
stops it all."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from app.local.procs import port_open
from tests.support.procs import free_port

pytestmark = pytest.mark.slow


def test_up_serves_the_openai_api_and_stops_cleanly(tmp_path: Path) -> None:
    port, redis_port = free_port(), free_port()
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "SWITCHYARD_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
    }
    env.pop("SWITCHYARD_CATALOG", None)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "app.cli",
            "up",
            "--port",
            str(port),
            "--state-dir",
            str(tmp_path / "state"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 90
    try:
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "Press Ctrl-C" in line:
                break
        output = "".join(lines)
        assert "Press Ctrl-C" in output, output
        key = re.search(r"demo key\s+(sy-\S+)", output)
        url = re.search(r"API\s+(http://\S+)", output)
        assert key and url, output
        assert url.group(1) == f"http://127.0.0.1:{port}/v1"

        with openai.OpenAI(base_url=url.group(1), api_key=key.group(1), max_retries=0) as c:
            models = {m.id for m in c.models.list()}
            assert {"chat-small", "embed-small"} <= models
            msg = [{"role": "user", "content": "Hello"}]
            whole = c.chat.completions.create(model="chat-small", messages=msg, max_tokens=4)
            assert whole.usage is not None and whole.usage.completion_tokens == 4
            chunks = list(
                c.chat.completions.create(
                    model="chat-small", messages=msg, max_tokens=4, stream=True
                )
            )
            assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
            assert c.completions.create(model="chat-small", prompt="Hi", max_tokens=2).choices
            assert len(c.embeddings.create(model="embed-small", input="Hi").data) == 1
        with (
            openai.OpenAI(base_url=url.group(1), api_key="sy-wrong", max_retries=0) as c,
            pytest.raises(openai.AuthenticationError),
        ):
            c.models.list()
        # the billing worker folds usage, and the key sees it
        deadline = time.monotonic() + 20
        totals: dict[str, int] = {}
        while time.monotonic() < deadline and totals.get("requests", 0) < 4:
            reply = httpx.get(
                f"{url.group(1)}/usage", headers={"authorization": f"Bearer {key.group(1)}"}
            )
            totals = reply.json()["totals"]
            time.sleep(0.2)
        assert totals["requests"] == 4
        assert totals["completion_tokens"] == 4 + 4 + 2
    finally:
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, rest
    assert "Stopped." in rest
    assert not port_open("127.0.0.1", port)
    assert not port_open("127.0.0.1", redis_port)
    assert (tmp_path / "state" / "logs" / "gateway.log").exists()
    assert "billing    worker running" in output
