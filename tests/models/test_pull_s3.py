"""`switchyard models pull s3://...` against moto's S3 server (boto3 end to end)."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import pytest

from app.models import READY_MARKER, parse_source, pull
from app.models._s3 import S3Source
from app.models.sources import FileEntry, Sink, SourceError
from tests.models.conftest import run

WEIGHTS = bytes(range(256)) * 8192  # 2 MiB
CONFIG = b'{"hidden_size": 64}\n'


@pytest.fixture
def bucket(s3: Any, request: pytest.FixtureRequest) -> str:
    name = f"weights-{request.node.name.replace('_', '-')[:40].lower()}"
    s3.create_bucket(Bucket=name)
    s3.put_object(Bucket=name, Key="tiny/v1/config.json", Body=CONFIG)
    s3.put_object(
        Bucket=name,
        Key="tiny/v1/model.safetensors",
        Body=WEIGHTS,
        ChecksumAlgorithm="SHA256",
    )
    s3.put_object(Bucket=name, Key="tiny/v1/", Body=b"")  # a console "folder" marker
    return name


def test_s3_pull_verifies_with_what_s3_publishes(
    bucket: str, env: dict[str, str], tmp_path: Path
) -> None:
    done = run(env, "pull", f"s3://{bucket}/tiny/v1", "--dest", str(tmp_path), "--revision", "v1")

    assert done.returncode == 0, done.stderr
    assert (tmp_path / "v1" / "model.safetensors").read_bytes() == WEIGHTS
    marker = json.loads((tmp_path / "v1" / READY_MARKER).read_text())
    files = {f["path"]: f for f in marker["files"]}
    assert set(files) == {"config.json", "model.safetensors"}
    assert files["model.safetensors"]["verified"] == ["size", "sha256", "md5"]
    assert files["model.safetensors"]["checksum_from"] == "S3 ChecksumSHA256"
    assert files["model.safetensors"]["sha256"] == hashlib.sha256(WEIGHTS).hexdigest()
    assert files["config.json"]["verified"] == ["size", "md5"]  # single-part ETag


def test_s3_second_pull_does_nothing(bucket: str, env: dict[str, str], tmp_path: Path) -> None:
    args = ("pull", f"s3://{bucket}/tiny/v1", "--dest", str(tmp_path), "--revision", "v1")
    assert run(env, *args).returncode == 0
    again = run(env, *args, "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["already_present"] is True


def test_sha256sums_mismatch_is_refused_and_nothing_published(
    s3: Any, bucket: str, env: dict[str, str], tmp_path: Path
) -> None:
    s3.put_object(Bucket=bucket, Key="tiny/v1/model.safetensors", Body=WEIGHTS)  # no checksum
    wrong = hashlib.sha256(b"other weights").hexdigest()
    s3.put_object(Bucket=bucket, Key="tiny/v1/SHA256SUMS", Body=f"{wrong}  model.safetensors\n")

    done = run(env, "pull", f"s3://{bucket}/tiny/v1", "--dest", str(tmp_path), "--revision", "v1")

    assert done.returncode == 1
    assert "checksum mismatch for model.safetensors" in done.stderr
    assert "SHA256SUMS says" in done.stderr
    assert not (tmp_path / "v1").exists()


class _CrashingS3(S3Source):
    """The real S3 source, cut off after `limit` bytes of one file (a crash mid-transfer)."""

    limit = 700_000

    def fetch(self, entry: FileEntry, sink: Sink, offset: int) -> None:
        if entry.path != "model.safetensors":
            return super().fetch(entry, sink, offset)
        buf = io.BytesIO()
        super().fetch(entry, buf, offset)
        sink.write(buf.getvalue()[: self.limit])
        raise ConnectionResetError("connection lost")


def test_s3_interrupted_pull_resumes_with_a_range_request(
    bucket: str, env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(key, env[key])
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    crashing = _CrashingS3(bucket, "tiny/v1", "v1")
    with pytest.raises(Exception, match="connection lost"):
        pull(crashing, tmp_path, out=io.StringIO(), bar=False)
    part = next((tmp_path / ".partial").rglob("model.safetensors.part"))
    assert part.stat().st_size == _CrashingS3.limit
    # Files are fetched in parallel: the crash may stop config.json before it completed.
    config_done = any((tmp_path / ".partial").rglob("config.json"))
    config_left = 0 if config_done else len(CONFIG)

    done = run(
        env, "pull", f"s3://{bucket}/tiny/v1", "--dest", str(tmp_path), "--revision", "v1", "--json"
    )

    assert done.returncode == 0, done.stderr
    assert "resuming model.safetensors at" in done.stderr
    fetched = json.loads(done.stdout)["fetched"]
    assert fetched == len(WEIGHTS) - _CrashingS3.limit + config_left
    assert (tmp_path / "v1" / "model.safetensors").read_bytes() == WEIGHTS


def test_an_s3_source_names_its_revision_directory() -> None:
    source = parse_source("s3://bucket/models/tiny/", "v7")
    assert (source.uri, source.revision) == ("s3://bucket/models/tiny", "v7")
    with pytest.raises(SourceError, match="cannot name a directory"):
        parse_source("s3://bucket/x", "../escape")


def test_an_object_replaced_between_attempts_is_fetched_again_not_resumed(
    s3: Any, bucket: str, env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(key, env[key])
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with pytest.raises(Exception, match="connection lost"):
        pull(_CrashingS3(bucket, "tiny/v1", "v1"), tmp_path, out=io.StringIO(), bar=False)
    replaced = bytes(reversed(WEIGHTS))  # same size, different bytes: a re-upload
    s3.put_object(Bucket=bucket, Key="tiny/v1/model.safetensors", Body=replaced)

    done = run(
        env, "pull", f"s3://{bucket}/tiny/v1", "--dest", str(tmp_path), "--revision", "v1", "--json"
    )

    assert done.returncode == 0, done.stderr
    assert "resuming" not in done.stderr
    assert json.loads(done.stdout)["fetched"] >= len(WEIGHTS)
    assert (tmp_path / "v1" / "model.safetensors").read_bytes() == replaced
