"""images/vllm/entrypoint.py run for real, with a stand-in for `vllm serve` printing its argv."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ENTRYPOINT = REPO / "images" / "vllm" / "entrypoint.py"
STAND_IN = """
import json, os, sys
print(json.dumps({"argv": sys.argv[1:], "offline": os.environ.get("HF_HUB_OFFLINE"),
                  "transformers": os.environ.get("TRANSFORMERS_OFFLINE")}))
"""
REV = "0e9e39f249a16976918f6564b8830bc894c89659"


@pytest.fixture
def server(tmp_path: Path) -> str:
    script = tmp_path / "fake_vllm.py"
    script.write_text(STAND_IN)
    return f"{shlex.quote(sys.executable)} {shlex.quote(str(script))} serve"


def publish(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text("{}")
    tmp = directory / ".marker.tmp"
    tmp.write_text(json.dumps({"format": 1, "source": "hf://org/m@x", "commit": REV}))
    tmp.rename(directory / ".switchyard-ready")


def environ(root: Path, server: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SWITCHYARD_", "HF_"))}
    env.update(
        SWITCHYARD_MODEL_ROOT=str(root),
        SWITCHYARD_MODEL_REVISION=REV,
        SWITCHYARD_SERVED_NAME="chat-small",
        SWITCHYARD_MAX_MODEL_LEN="8192",
        SWITCHYARD_TENSOR_PARALLEL_SIZE="2",
        SWITCHYARD_VLLM_COMMAND=server,
        SWITCHYARD_READY_POLL="0.05",
        HF_HUB_OFFLINE="0",  # whatever the pod says, the replica goes offline
    )
    env.update(extra)
    return env


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ENTRYPOINT), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_builds_the_exact_vllm_command(tmp_path: Path, server: str) -> None:
    publish(tmp_path / REV)
    # What KServe passes: the runtime's args, then the catalogue's vllm_args.
    done = run(
        environ(tmp_path, server),
        "--port=8080",
        "--served-model-name=chat-small-canary",
        "--gpu-memory-utilization=0.85",
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["argv"] == [
        "serve",
        str(tmp_path / REV),
        "--served-model-name",
        "chat-small",
        "--max-model-len",
        "8192",
        "--tensor-parallel-size",
        "2",
        "--safetensors-load-strategy",
        "eager",
        "--port=8080",
        "--gpu-memory-utilization=0.85",
    ]
    assert out["offline"] == "1" and out["transformers"] == "1"
    assert f"commit {REV}" in done.stderr and "exec " in done.stderr


def test_defaults_and_an_explicit_loader(tmp_path: Path, server: str) -> None:
    publish(tmp_path / REV)
    env = environ(tmp_path, server)
    del env["SWITCHYARD_MAX_MODEL_LEN"], env["SWITCHYARD_TENSOR_PARALLEL_SIZE"]
    done = run(env, "--load-format", "runai_streamer", "--model", "meta-llama/Llama-3-8B")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["argv"] == [
        "serve",
        str(tmp_path / REV),
        "--served-model-name",
        "chat-small",
        "--gpu-memory-utilization",
        "0.90",
        "--tensor-parallel-size",
        "1",
        "--load-format",
        "runai_streamer",
    ]
    assert "ignoring --model" in done.stderr


def test_waits_for_the_ready_marker_before_starting(tmp_path: Path, server: str) -> None:
    directory = tmp_path / REV
    directory.mkdir()
    (directory / "model.safetensors.part").write_bytes(b"half")  # a pull still running
    proc = subprocess.Popen(
        [sys.executable, str(ENTRYPOINT)],
        env=environ(tmp_path, server),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(0.6)
    assert proc.poll() is None  # still waiting: vLLM has not been started
    publish(directory)
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert "waiting for" in err
    assert json.loads(out)["argv"][1] == str(directory)


def test_gives_up_with_a_clear_message_when_no_pull_published(tmp_path: Path, server: str) -> None:
    done = run(environ(tmp_path, server, SWITCHYARD_READY_TIMEOUT="0.3"))
    assert done.returncode == 1
    assert "did not appear within" in done.stderr and "pull Job" in done.stderr
    assert done.stdout == ""


def test_a_root_that_is_itself_a_published_revision_is_served(tmp_path: Path, server: str) -> None:
    publish(tmp_path)
    done = run(environ(tmp_path, server, SWITCHYARD_MODEL_REVISION=""))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["argv"][1] == str(tmp_path)


@pytest.mark.parametrize("revision", ["", "../other-model", "a/b"])
def test_refuses_a_revision_that_is_not_a_directory_name(
    tmp_path: Path, server: str, revision: str
) -> None:
    done = run(environ(tmp_path, server, SWITCHYARD_MODEL_REVISION=revision))
    assert done.returncode == 1 and "SWITCHYARD_MODEL_REVISION" in done.stderr
