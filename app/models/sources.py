"""Where weights come from: `hf://org/name@revision`, `s3://bucket/prefix`, or a directory.

A source does two things: `resolve()` lists the files of one revision with whatever checksums
it publishes, and `fetch()` writes one file's bytes from an offset (so an interrupted pull
resumes). Verification and publishing are the caller's job, identical for every source.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Protocol

_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_HF_REPO = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
DEFAULT_REVISION = "main"


class SourceError(Exception):
    """The source is malformed, unreachable, or says something we cannot accept."""


@dataclass(frozen=True)
class FileEntry:
    """One file of a revision, with what the source promises about it."""

    path: str
    """Relative POSIX path inside the revision (validated: no `..`, not absolute)."""
    size: int | None
    sha256: str | None = None
    md5: str | None = None
    git_sha1: str | None = None
    """Git blob id (sha1 of `blob <size>\\0<bytes>`): the Hub's checksum for small files."""
    checksum_from: str = ""
    """Where the checksum comes from, for the ready marker and the logs."""
    extra: dict[str, str] = field(default_factory=dict, compare=False)
    """Source-specific details (e.g. the S3 ETag to pin the GET to)."""


@dataclass(frozen=True)
class Resolved:
    commit: str | None
    """The immutable id the revision resolved to (Hub commit sha), when the source has one."""
    files: tuple[FileEntry, ...]


class Sink(Protocol):
    """Where `fetch` writes; it hashes as it goes and stops the fetch when the pull aborts."""

    def write(self, data: bytes, /) -> int: ...


class Source(Protocol):
    uri: str
    """Canonical form, e.g. `hf://org/name@rev`, recorded in the ready marker."""
    revision: str
    """The requested revision: names the published directory."""

    def resolve(self) -> Resolved: ...

    def fetch(self, entry: FileEntry, sink: Sink, offset: int) -> None:
        """Write bytes [offset, end) of `entry` to `sink`."""
        ...


def check_revision(revision: str) -> str:
    if not _REVISION.match(revision) or revision in {".", ".."}:
        raise SourceError(
            f"revision {revision!r} cannot name a directory: use letters, digits, '.', '_', '-'"
        )
    return revision


def check_relative_path(path: str) -> str:
    """A file name from a source must stay inside the revision directory."""
    p = PurePosixPath(path)
    if (
        not path
        or p.is_absolute()
        or any(part in {"", ".", ".."} for part in path.split("/"))
        or "\\" in path
        or "\0" in path
        or p.parts[0].startswith(".switchyard")
    ):
        raise SourceError(f"refusing file name {path!r}: it would leave the model directory")
    return path


def check_sha256(value: str | None) -> str | None:
    if value is None:
        return None
    value = value.strip().lower()
    if not _SHA256.match(value):
        raise SourceError(f"{value!r} is not a sha256 hex digest")
    return value


def parse_sha256sums(text: str) -> dict[str, str]:
    """`sha256sum` output (`<hex>  <path>` or `<hex> *<path>`) -> {path: hex}."""
    sums: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        digest, sep, name = line.partition(" ")
        if not sep:
            raise SourceError(f"SHA256SUMS line {n}: expected '<sha256>  <path>'")
        name = name.lstrip(" ").removeprefix("*").removeprefix("./")
        sums[check_relative_path(name)] = check_sha256(digest) or ""
    return sums


def git_blob_sha1(size: int) -> hashlib._Hash:
    """A hasher primed with git's blob header: feed it the file to get the Hub's blob id."""
    h = hashlib.sha1(usedforsecurity=False)
    h.update(f"blob {size}\0".encode())
    return h


def parse_source(text: str, revision: str | None = None) -> Source:
    """`hf://org/name[@rev]`, `s3://bucket/prefix`, `file:///dir` or `/dir` -> a Source.

    `revision` (the `--revision` option) names the published directory; for hf:// it must
    agree with `@rev` when both are given. Sources are imported lazily: their SDKs are the
    `models` extra and only the one in use has to be installed.
    """
    if revision is not None:
        check_revision(revision)
    if text.startswith("hf://"):
        repo, _, at = text[len("hf://") :].partition("@")
        if not _HF_REPO.match(repo):
            raise SourceError(f"{text!r}: expected hf://org/name[@revision]")
        if at and revision and at != revision:
            raise SourceError(f"{text!r} names revision {at!r} but --revision is {revision!r}")
        rev = check_revision(at or revision or DEFAULT_REVISION)
        from app.models._hf import HubSource

        return HubSource(repo, rev)
    if text.startswith("s3://"):
        bucket, _, prefix = text[len("s3://") :].partition("/")
        if not bucket or "@" in text:
            raise SourceError(f"{text!r}: expected s3://bucket/prefix (and --revision REV)")
        from app.models._s3 import S3Source

        return S3Source(bucket, prefix.strip("/"), revision or DEFAULT_REVISION)
    path_text = text[len("file://") :] if text.startswith("file://") else text
    path = Path(path_text)
    if path.is_absolute() or text.startswith(("./", "../")):
        from app.models._local import LocalSource

        return LocalSource(path.resolve(), revision or DEFAULT_REVISION)
    raise SourceError(
        f"{text!r} is not a model source: use hf://org/name@revision, s3://bucket/prefix "
        "or a directory path"
    )
