"""Local directory sources, `models list`, and the names a source may not use."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pytest

from app.models import list_models, parse_source, pull
from app.models.sources import SourceError, check_relative_path
from tests.models.conftest import run


def make_dir(root: Path, weights: bytes = b"w" * 5000) -> Path:
    (root / "tok").mkdir(parents=True)
    (root / "config.json").write_text('{"a": 1}')
    (root / "tok" / "vocab.txt").write_text("a\nb\n")
    (root / "model.safetensors").write_bytes(weights)
    return root


def test_a_directory_source_with_sha256sums_is_verified(tmp_path: Path) -> None:
    src = make_dir(tmp_path / "src")
    digest = hashlib.sha256((src / "model.safetensors").read_bytes()).hexdigest()
    (src / "SHA256SUMS").write_text(f"{digest}  model.safetensors\n")
    result = pull(parse_source(str(src), "v1"), tmp_path / "vol" / "m", out=io.StringIO())
    marker = json.loads((result.path / ".switchyard-ready").read_text())
    checks = {f["path"]: f["verified"] for f in marker["files"]}
    assert checks["model.safetensors"] == ["size", "sha256"]
    assert checks["tok/vocab.txt"] == ["size"]


def test_list_shows_ready_and_partial_revisions_with_sizes(
    tmp_path: Path, env: dict[str, str]
) -> None:
    src = make_dir(tmp_path / "src")
    vol = tmp_path / "vol"
    for model, rev in (("chat-a", "r1"), ("chat-a", "r2"), ("embed-b", "main")):
        done = run(env, "pull", str(src), "--dest", str(vol / model), "--revision", rev)
        assert done.returncode == 0, done.stderr
    (vol / "chat-a" / ".partial" / "r3" / "files").mkdir(parents=True)
    (vol / "chat-a" / ".partial" / "r3" / "files" / "x.part").write_bytes(b"1234")

    listed = run(env, "list", str(vol), "--json")
    table = run(env, "list", str(vol))

    assert listed.returncode == 0, listed.stderr
    rows = {(r["model"], r["revision"]): r for r in json.loads(listed.stdout)}
    assert set(rows) == {("chat-a", "r1"), ("chat-a", "r2"), ("chat-a", "r3"), ("embed-b", "main")}
    assert rows[("chat-a", "r1")]["state"] == "ready"
    assert rows[("chat-a", "r1")]["size"] == 5000 + 8 + 4 and rows[("chat-a", "r1")]["files"] == 3
    assert rows[("chat-a", "r3")]["state"] == "partial" and rows[("chat-a", "r3")]["size"] == 4
    assert "embed-b" in table.stdout and "4.9 KiB" in table.stdout
    # One model's directory (what a replica mounts) lists too.
    one = run(env, "list", str(vol / "embed-b"), "--json")
    assert [r["revision"] for r in json.loads(one.stdout)] == ["main"]


def test_keep_free_refuses_before_downloading(tmp_path: Path, env: dict[str, str]) -> None:
    src = make_dir(tmp_path / "src")
    done = run(env, "pull", str(src), "--dest", str(tmp_path / "m"), "--keep-free", "1000T")
    assert done.returncode == 1
    assert "not enough disk space" in done.stderr and "keep 1000.0 TiB free" in done.stderr
    assert not (tmp_path / "m" / "main").exists()


@pytest.mark.parametrize(
    "name", ["../evil", "/etc/passwd", "a/../../b", "a//b", ".switchyard-ready", "a\\b"]
)
def test_file_names_that_would_escape_the_model_directory_are_refused(name: str) -> None:
    with pytest.raises(SourceError, match="leave the model directory"):
        check_relative_path(name)


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("hf://just-a-name", "expected hf://org/name"),
        ("hf://org/name@main", None),
        ("ftp://host/x", "not a model source"),
        ("relative/dir", "not a model source"),
    ],
)
def test_source_syntax(text: str, error: str | None) -> None:
    if error is None:
        assert parse_source(text).revision == "main"
    else:
        with pytest.raises(SourceError, match=error):
            parse_source(text)


def test_hf_revision_and_option_must_agree() -> None:
    assert parse_source("hf://org/name@abc", "abc").revision == "abc"
    with pytest.raises(SourceError, match="names revision 'abc' but --revision is 'def'"):
        parse_source("hf://org/name@abc", "def")
    assert parse_source("hf://org/name", "def").revision == "def"


def test_list_models_of_a_missing_directory_fails(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        list_models(tmp_path / "nope")
