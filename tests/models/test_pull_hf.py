"""`switchyard models pull hf://...` against a local server that answers like the Hub."""

from __future__ import annotations

import hashlib
import json
import os
import pty
import signal
import subprocess
import time
from pathlib import Path

import pytest

from app.models import READY_MARKER
from tests.models.conftest import HF_TOKEN, cli, run, start
from tests.models.fake_hub import FakeHub, Repo
from tests.support.procs import REPO

COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO_ID = "acme/tiny-llm"


def tiny_model(weights: int = 1 << 20) -> Repo:
    rnd = hashlib.sha256(b"seed").digest()
    blob = (rnd * (weights // len(rnd) + 1))[:weights]
    blob = bytes((b + i) % 256 for i, b in enumerate(blob))
    return Repo(
        commit=COMMIT,
        files={
            "config.json": b'{"architectures": ["LlamaForCausalLM"], "hidden_size": 64}\n',
            "tokenizer/tokenizer.json": b'{"version": "1.0", "model": {"type": "BPE"}}\n',
            "model.safetensors": blob,
        },
        lfs={"model.safetensors"},
    )


def published(dest: Path, rev: str = COMMIT) -> Path:
    return dest / rev


def test_pull_publishes_every_file_verified(
    hub: FakeHub, env: dict[str, str], tmp_path: Path
) -> None:
    repo = tiny_model()
    hub.add(REPO_ID, "main", repo)
    dest = tmp_path / "models" / "chat-tiny"

    done = run(env, "pull", f"hf://{REPO_ID}@{COMMIT}", "--dest", str(dest), "--json")

    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["path"] == str(dest / COMMIT) and result["commit"] == COMMIT
    assert result["fetched"] == sum(len(b) for b in repo.files.values())
    for name, data in repo.files.items():
        assert (dest / COMMIT / name).read_bytes() == data
    marker = json.loads((dest / COMMIT / READY_MARKER).read_text())
    checks = {f["path"]: f["verified"] for f in marker["files"]}
    assert checks["model.safetensors"] == ["size", "sha256"]
    assert checks["config.json"] == ["size", "git-sha1"]
    assert marker["commit"] == COMMIT and marker["source"] == f"hf://{REPO_ID}@{COMMIT}"
    # Only the published tree is left: no staging, no lock, no Hub cache inside the model.
    assert sorted(p.name for p in (dest / ".partial").iterdir()) == []
    assert sorted(p.name for p in (dest / ".locks").iterdir()) == []
    assert not (dest / COMMIT / ".cache").exists()


def test_token_goes_to_the_hub_and_never_to_the_cdn(
    hub: FakeHub, env: dict[str, str], tmp_path: Path
) -> None:
    hub.add(REPO_ID, "main", tiny_model())
    assert run(env, "pull", f"hf://{REPO_ID}@main", "--dest", str(tmp_path)).returncode == 0
    cdn_port = hub.cdn_url.rsplit(":", 1)[1]
    hub_requests = [r for r in hub.requests if r.path.startswith("/api/")]
    assert hub_requests and all(r.auth == f"Bearer {HF_TOKEN}" for r in hub_requests)
    cdn_gets = [r for r in hub.requests if r.path.startswith(f"/{REPO_ID}/{COMMIT}/")]
    assert cdn_gets and all(r.auth is None for r in cdn_gets), cdn_port
    # A branch name is resolved once and the files are fetched at that commit.
    assert all(f"/resolve/{COMMIT}/" in r.path for r in hub.requests if "/resolve/" in r.path)
    assert (tmp_path / "main" / READY_MARKER).exists()


def test_second_pull_of_a_published_revision_does_nothing(
    hub: FakeHub, env: dict[str, str], tmp_path: Path
) -> None:
    hub.add(REPO_ID, "main", tiny_model())
    source = f"hf://{REPO_ID}@{COMMIT}"
    assert run(env, "pull", source, "--dest", str(tmp_path)).returncode == 0
    marker = (tmp_path / COMMIT / READY_MARKER).read_bytes()
    before = len(hub.requests)

    again = run(env, "pull", source, "--dest", str(tmp_path), "--json")

    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["already_present"] is True
    assert len(hub.requests) == before  # not even a metadata call
    assert (tmp_path / COMMIT / READY_MARKER).read_bytes() == marker


def test_checksum_mismatch_is_refused_and_nothing_is_published(
    hub: FakeHub, env: dict[str, str], tmp_path: Path
) -> None:
    repo = tiny_model()
    good = repo.files["model.safetensors"]
    repo.served["model.safetensors"] = good[:1000] + bytes([good[1000] ^ 1]) + good[1001:]
    hub.add(REPO_ID, "main", repo)

    done = run(env, "pull", f"hf://{REPO_ID}@{COMMIT}", "--dest", str(tmp_path))

    assert done.returncode == 1
    assert "checksum mismatch for model.safetensors" in done.stderr
    assert "nothing was published" in done.stderr
    assert not (tmp_path / COMMIT).exists()
    staged = list((tmp_path / ".partial").rglob("model.safetensors*"))
    assert staged == []  # the bad bytes are gone, so a retry cannot resume from them


def _wait_for_partial(dest: Path, name: str, at_least: int, proc: subprocess.Popen[str]) -> int:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        for part in (dest / ".partial").rglob(f"{name}.part"):
            size = part.stat().st_size
            if size >= at_least:
                return size
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    raise AssertionError(f"{name}.part never reached {at_least} bytes")


def test_killed_pull_resumes_where_it_stopped(
    hub: FakeHub, env: dict[str, str], tmp_path: Path
) -> None:
    # huggingface_hub writes in 10 MiB blocks: 14 MiB at 1 MiB per 0.1 s leaves time to kill
    # the pull after its first block and before its last.
    repo = tiny_model(weights=14 << 20)
    repo.throttle["model.safetensors"] = 0.1
    repo.chunk = 1 << 20
    hub.add(REPO_ID, "main", repo)
    source = f"hf://{REPO_ID}@{COMMIT}"
    first = start(env, "pull", source, "--dest", str(tmp_path))
    _wait_for_partial(tmp_path, "model.safetensors", 10 << 20, first)
    first.send_signal(signal.SIGKILL)  # no cleanup at all, like a lost node
    first.communicate()
    assert not (tmp_path / COMMIT).exists()
    staged = next((tmp_path / ".partial").rglob("model.safetensors.part")).stat().st_size
    assert (tmp_path / ".locks" / f"{COMMIT}.lock").exists()  # left behind by the dead pull

    repo.throttle.clear()
    sent_before = hub.bytes_sent
    done = run(env, "pull", source, "--dest", str(tmp_path), "--json")

    assert done.returncode == 0, done.stderr
    assert "broke stale lock (its holder is gone)" in done.stderr
    assert "resuming model.safetensors at" in done.stderr
    ranges = [r.range for r in hub.requests if r.method == "GET" and r.range]
    assert f"bytes={staged}-" in ranges
    size = len(repo.files["model.safetensors"])
    assert hub.bytes_sent - sent_before == size - staged  # the second run did not start over
    assert (tmp_path / COMMIT / "model.safetensors").read_bytes() == repo.files["model.safetensors"]


def test_two_pulls_at_once_publish_once_and_agree(
    hub: FakeHub, env: dict[str, str], tmp_path: Path
) -> None:
    repo = tiny_model(weights=1 << 20)
    repo.throttle["model.safetensors"] = 0.02
    hub.add(REPO_ID, "main", repo)
    source = f"hf://{REPO_ID}@{COMMIT}"

    procs = [start(env, "pull", source, "--dest", str(tmp_path), "--json") for _ in range(2)]
    outs = [p.communicate(timeout=30) for p in procs]

    assert [p.returncode for p in procs] == [0, 0], outs
    results = [json.loads(out) for out, _ in outs]
    assert sorted(r["already_present"] for r in results) == [False, True]
    waited = next(err for (_, err), r in zip(outs, results, strict=True) if r["already_present"])
    assert "waiting for" in waited and "published by another pull" in waited
    size = len(repo.files["model.safetensors"])
    cdn_gets = [
        r for r in hub.requests if r.method == "GET" and r.path.startswith(f"/{REPO_ID}/{COMMIT}/")
    ]
    assert len(cdn_gets) == 1  # the weights crossed the network once
    assert (tmp_path / COMMIT / "model.safetensors").read_bytes() == repo.files["model.safetensors"]
    assert (tmp_path / COMMIT / "model.safetensors").stat().st_size == size


def test_a_lock_without_heartbeat_from_another_node_is_broken(
    hub: FakeHub, env: dict[str, str], tmp_path: Path
) -> None:
    hub.add(REPO_ID, "main", tiny_model())
    lock = tmp_path / ".locks" / f"{COMMIT}.lock"
    lock.parent.mkdir(parents=True)
    lock.write_text(
        json.dumps({"host": "node-gone", "pid": 7, "token": "x", "since": 1, "beat": 3})
    )

    started = time.monotonic()
    done = run(
        env, "pull", f"hf://{REPO_ID}@{COMMIT}", "--dest", str(tmp_path), "--lock-stale-after", "1"
    )

    assert done.returncode == 0, done.stderr
    assert "held by host node-gone pid 7" in done.stderr
    assert "broke stale lock (no heartbeat)" in done.stderr
    assert time.monotonic() - started >= 1.0


def test_unknown_revision_fails_with_the_hubs_answer(
    hub: FakeHub, env: dict[str, str], tmp_path: Path
) -> None:
    hub.add(REPO_ID, "main", tiny_model())
    done = run(env, "pull", f"hf://{REPO_ID}@nope", "--dest", str(tmp_path))
    assert done.returncode == 1
    assert "RevisionNotFound" in done.stderr or "404" in done.stderr
    assert not (tmp_path / "nope").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_pull_refuses_when_the_volume_is_too_small(
    hub: FakeHub, env: dict[str, str], tmp_path: Path
) -> None:
    hub.add(REPO_ID, "main", tiny_model(weights=2 << 20))
    volume = tmp_path / "small"
    volume.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(volume)], check=True)
    try:
        done = run(env, "pull", f"hf://{REPO_ID}@{COMMIT}", "--dest", str(volume / "m"))
        assert done.returncode == 1
        assert "not enough disk space" in done.stderr and "2.0 MiB more" in done.stderr
        assert not (volume / "m" / COMMIT).exists()
        gets = [r for r in hub.requests if r.method == "GET" and "/api/" not in r.path]
        assert gets == []  # refused before downloading anything
    finally:
        subprocess.run(["umount", str(volume)], check=True)


def test_sigterm_releases_the_lock_and_keeps_what_was_fetched(
    hub: FakeHub, env: dict[str, str], tmp_path: Path
) -> None:
    repo = tiny_model(weights=14 << 20)
    repo.throttle["model.safetensors"] = 0.1
    repo.chunk = 1 << 20
    hub.add(REPO_ID, "main", repo)
    source = f"hf://{REPO_ID}@{COMMIT}"
    first = start(env, "pull", source, "--dest", str(tmp_path))
    _wait_for_partial(tmp_path, "model.safetensors", 10 << 20, first)
    first.send_signal(signal.SIGTERM)  # how Kubernetes stops a Job's pod
    first.communicate(timeout=20)

    assert first.returncode == 128 + signal.SIGTERM
    assert not (tmp_path / ".locks" / f"{COMMIT}.lock").exists()
    assert next((tmp_path / ".partial").rglob("model.safetensors.part")).stat().st_size > 0
    repo.throttle.clear()
    done = run(env, "pull", source, "--dest", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "waiting for" not in done.stderr and "resuming model.safetensors" in done.stderr


def test_a_terminal_gets_a_progress_bar(hub: FakeHub, env: dict[str, str], tmp_path: Path) -> None:
    hub.add(REPO_ID, "main", tiny_model())
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        cli("pull", f"hf://{REPO_ID}@{COMMIT}", "--dest", str(tmp_path)),
        env=env,
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=follower,
    )
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(leader)
    assert proc.wait(timeout=30) == 0
    text = b"".join(chunks).decode()
    assert "\r\x1b[K" in text and "100% |" in text
    assert "progress:" not in text  # the plain-line form is for logs only
