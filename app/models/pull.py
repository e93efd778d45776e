"""`switchyard models pull`: download into staging, verify every file, publish atomically.

1. The ready marker of `<dest>/<revision>` exists -> nothing to do (no network needed).
2. Take the revision's volume lock (see lock.py); check the marker again (a concurrent pull
   may have published while we waited).
3. Resolve the source: file list, sizes, checksums; refuse if the volume lacks the space.
4. Fetch each missing file into `<dest>/.partial/<revision>/files/<path>.part`, appending to
   what an interrupted pull left, hashing as bytes arrive; verify size and every checksum the
   source gave; rename to its final name and journal it (so a resume skips it).
5. Write the ready marker into the staging tree, then rename the tree to `<dest>/<revision>`:
   one rename on one filesystem, so a replica sees all of it or nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import threading
import time
import uuid
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from app.models.layout import (
    MARKER_FORMAT,
    READY_MARKER,
    human,
    lock_path,
    read_marker,
    revision_dir,
    staging_dir,
)
from app.models.lock import LockLost, VolumeLock
from app.models.progress import Progress
from app.models.sources import FileEntry, Resolved, Source, SourceError, git_blob_sha1

JOURNAL = "verified.jsonl"
STATE = "source.json"
PART = ".part"
HASH_CHUNK = 1 << 20


class PullError(Exception):
    """The pull cannot complete; the message says why and what to do."""


class _Aborted(Exception):
    pass


@dataclass(frozen=True)
class PullResult:
    path: Path
    revision: str
    commit: str | None
    files: int
    bytes: int
    fetched: int
    """Bytes transferred by this run (less than `bytes` after a resume; 0 when present)."""
    already_present: bool


class _Sink:
    """The staging file of one entry: appends, hashes, counts, and stops when told to."""

    def __init__(
        self,
        f: Any,
        entry: FileEntry,
        offset: int,
        part: Path,
        progress: Progress,
        abort: threading.Event,
    ) -> None:
        self.f = f
        self.entry = entry
        self.pos = offset
        self.high = offset
        self.progress = progress
        self.abort = abort
        self.rehash = False
        self.hashers = _hashers(entry)
        if offset:
            with open(part, "rb") as existing:
                remaining = offset
                while remaining and (chunk := existing.read(min(HASH_CHUNK, remaining))):
                    for h in self.hashers.values():
                        h.update(chunk)
                    remaining -= len(chunk)

    def write(self, data: bytes, /) -> int:
        if self.abort.is_set():
            raise _Aborted
        self.f.write(data)
        for h in self.hashers.values():
            h.update(data)
        self.pos += len(data)
        if self.pos > self.high:
            self.progress.add(self.pos - self.high)
            self.high = self.pos
        return len(data)

    # huggingface_hub's http_get rewinds and truncates when a server ignores our Range header.
    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = 0) -> int:
        if whence != 0:
            raise OSError("only absolute seeks are supported")
        self.f.seek(pos)
        self.pos = pos
        return pos

    def truncate(self, size: int | None = None) -> int:
        size = self.pos if size is None else size
        self.f.truncate(size)
        self.progress.add(size - self.high)
        self.high = self.pos = size
        self.rehash = True  # the running hashes include bytes that are gone: recompute at the end
        return size

    def flush(self) -> None:
        self.f.flush()


def _hashers(entry: FileEntry) -> dict[str, Any]:
    hashers: dict[str, Any] = {"sha256": hashlib.sha256()}
    if entry.md5:
        hashers["md5"] = hashlib.md5(usedforsecurity=False)
    if entry.git_sha1 and entry.size is not None:
        hashers["git-sha1"] = git_blob_sha1(entry.size)
    return hashers


def _hash_file(path: Path, entry: FileEntry) -> dict[str, str]:
    hashers = _hashers(entry)
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            for h in hashers.values():
                h.update(chunk)
    return {k: h.hexdigest() for k, h in hashers.items()}


def _verify(entry: FileEntry, size: int, digests: dict[str, str]) -> list[str]:
    """Checks passed (for the marker); raises PullError naming the first one that failed."""
    checks = []
    if entry.size is not None:
        if size != entry.size:
            raise PullError(f"{entry.path}: size {size} bytes, the source says {entry.size}")
        checks.append("size")
    expected = {"sha256": entry.sha256, "md5": entry.md5, "git-sha1": entry.git_sha1}
    for name, want in expected.items():
        if want is None:
            continue
        got = digests.get(name)
        if got != want.lower():
            raise PullError(
                f"checksum mismatch for {entry.path}: {name} is {got}, "
                f"{entry.checksum_from or 'the source'} says {want}"
            )
        checks.append(name)
    return checks


class _Journal:
    """Files already fetched and verified in this staging tree (one JSON object per line)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = threading.Lock()
        self.entries: dict[str, dict[str, Any]] = {}
        with contextlib.suppress(FileNotFoundError):
            for line in path.read_text().splitlines():
                with contextlib.suppress(ValueError):
                    rec = json.loads(line)
                    self.entries[rec["path"]] = rec

    def valid(self, entry: FileEntry, target: Path) -> dict[str, Any] | None:
        rec = self.entries.get(entry.path)
        if rec is None:
            return None
        try:
            st = target.stat()
        except FileNotFoundError:
            return None
        if st.st_size != rec["size"] or st.st_mtime_ns != rec["mtime_ns"]:
            return None
        if entry.size is not None and entry.size != rec["size"]:
            return None
        if entry.sha256 is not None and entry.sha256 != rec["sha256"]:
            return None
        return rec

    def add(self, rec: dict[str, Any]) -> None:
        with self.lock:
            self.entries[rec["path"]] = rec
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")
                f.flush()
                os.fsync(f.fileno())


def _fsync_write(path: Path, data: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    with open(tmp, "w") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class _Puller:
    def __init__(
        self,
        source: Source,
        dest: Path,
        resolved: Resolved,
        *,
        jobs: int,
        keep_free: int,
        out: TextIO,
        bar: bool,
        lock: VolumeLock,
    ) -> None:
        self.source = source
        self.dest = dest
        self.resolved = resolved
        self.jobs = jobs
        self.keep_free = keep_free
        self.out = out
        self.bar = bar
        self.lock = lock
        self.stage = staging_dir(dest, source.revision)
        self.files_dir = self.stage / "files"
        self.abort = threading.Event()

    def _prepare_stage(self) -> None:
        """Keep an interrupted pull's staging only if it was for the very same content.

        The fingerprint covers every file's size, checksums and S3 ETag: an object replaced
        between two attempts must not be resumed onto the old object's first bytes.
        """
        listing = [
            [e.path, e.size, e.sha256, e.md5, e.git_sha1, e.extra.get("etag")]
            for e in self.resolved.files
        ]
        state = {
            "source": self.source.uri,
            "commit": self.resolved.commit,
            "files": hashlib.sha256(json.dumps(listing).encode()).hexdigest(),
        }
        try:
            previous = json.loads((self.stage / STATE).read_text())
        except (OSError, ValueError):
            previous = None
        if previous != state and self.stage.exists():
            shutil.rmtree(self.stage)
        self.files_dir.mkdir(parents=True, exist_ok=True)
        if previous != state:
            _fsync_write(self.stage / STATE, json.dumps(state))

    def _check_space(self, todo: list[FileEntry]) -> None:
        needed = 0
        for e in todo:
            target = self.files_dir / e.path
            have = 0
            for p in (target, target.with_name(target.name + PART)):
                with contextlib.suppress(FileNotFoundError):
                    have = max(have, p.stat().st_size)
            needed += max(0, (e.size or 0) - have)
        free = shutil.disk_usage(self.files_dir).free
        if needed + self.keep_free > free:
            reserve = f" and keep {human(self.keep_free)} free" if self.keep_free else ""
            raise PullError(
                f"not enough disk space on {self.dest}: this pull needs {human(needed)} more"
                f"{reserve}, only {human(free)} is free. Free space or grow the volume, then "
                "run the same command again (what is already staged is kept)."
            )

    def run(self) -> PullResult:
        self._prepare_stage()
        journal = _Journal(self.stage / JOURNAL)
        done: dict[str, dict[str, Any]] = {}
        todo: list[FileEntry] = []
        for entry in self.resolved.files:
            rec = journal.valid(entry, self.files_dir / entry.path)
            if rec is not None:
                done[entry.path] = rec
            else:
                todo.append(entry)
        self._remove_strays()
        self._check_space(todo)
        total = sum(e.size or 0 for e in self.resolved.files)
        have = sum(int(r["size"]) for r in done.values())
        progress = Progress(total, have, self.out, bar=self.bar)
        if done:
            progress.line(f"resuming: {len(done)} file(s), {human(have)} already verified")
        try:
            self._fetch_all(todo, journal, done, progress)
        finally:
            progress.close()
        self.lock.check()
        return self._publish(done, progress.fetched, total)

    def _remove_strays(self) -> None:
        wanted = {e.path for e in self.resolved.files}
        wanted |= {p + PART for p in wanted}
        for p in sorted(self.files_dir.rglob("*"), reverse=True):
            rel = p.relative_to(self.files_dir).as_posix()
            if p.is_dir():
                with contextlib.suppress(OSError):
                    p.rmdir()  # only empty directories
            elif rel not in wanted:
                p.unlink()

    def _fetch_all(
        self,
        todo: list[FileEntry],
        journal: _Journal,
        done: dict[str, dict[str, Any]],
        progress: Progress,
    ) -> None:
        if not todo:
            return
        with ThreadPoolExecutor(max_workers=max(1, min(self.jobs, len(todo)))) as pool:
            futures = [pool.submit(self._fetch_one, e, journal, progress) for e in todo]
            try:
                finished, _ = wait(futures, return_when=FIRST_EXCEPTION)
                failed = [f for f in finished if f.exception() is not None]
                if failed:
                    self.abort.set()
                    wait(futures)
                    exc = failed[0].exception()
                    if isinstance(exc, _Aborted) and self.lock.lost.is_set():
                        raise LockLost(f"{self.lock.path} was taken over by another pull")
                    assert exc is not None
                    raise exc
            except BaseException:
                self.abort.set()  # Ctrl-C or SIGTERM: the workers stop at their next write
                raise
        for f in futures:
            rec = f.result()
            done[rec["path"]] = rec

    def _fetch_one(self, entry: FileEntry, journal: _Journal, progress: Progress) -> dict[str, Any]:
        if self.lock.lost.is_set():
            self.abort.set()
            raise _Aborted
        target = self.files_dir / entry.path
        target.parent.mkdir(parents=True, exist_ok=True)
        part = target.with_name(target.name + PART)
        if target.exists():
            # Fetched but not journaled (crash in between): verify what is there.
            digests = _hash_file(target, entry)
            try:
                checks = _verify(entry, target.stat().st_size, digests)
            except PullError:
                target.unlink()
            else:
                progress.skip(target.stat().st_size)
                return self._journal(journal, entry, target, digests, checks)
        offset = part.stat().st_size if part.exists() else 0
        if entry.size is not None and offset > entry.size:
            part.unlink()
            offset = 0
        if offset:
            progress.skip(offset)
            progress.line(f"resuming {entry.path} at {human(offset)}")
        with open(part, "ab") as f:
            sink = _Sink(f, entry, offset, part, progress, self.abort)
            try:
                self.source.fetch(entry, sink, offset)
            except (_Aborted, PullError):
                raise
            except SourceError as exc:
                raise PullError(str(exc)) from exc
            except Exception as exc:
                raise PullError(f"{entry.path}: {type(exc).__name__}: {exc}") from exc
            f.flush()
            os.fsync(f.fileno())
        if sink.rehash:
            digests = _hash_file(part, entry)
        else:
            digests = {k: h.hexdigest() for k, h in sink.hashers.items()}
        try:
            checks = _verify(entry, part.stat().st_size, digests)
        except PullError as exc:
            part.unlink()  # a retry must fetch it again, not resume from bad bytes
            raise PullError(f"{exc}; the file was deleted and nothing was published") from exc
        os.replace(part, target)
        return self._journal(journal, entry, target, digests, checks, progress)

    def _journal(
        self,
        journal: _Journal,
        entry: FileEntry,
        target: Path,
        digests: dict[str, str],
        checks: list[str],
        progress: Progress | None = None,
    ) -> dict[str, Any]:
        st = target.stat()
        rec = {
            "path": entry.path,
            "size": st.st_size,
            "sha256": digests["sha256"],
            "verified": checks,
            "checksum_from": entry.checksum_from,
            "mtime_ns": st.st_mtime_ns,
        }
        journal.add(rec)
        if progress is not None:
            what = "+".join(checks) if checks else "nothing to check against"
            progress.line(f"verified {entry.path} ({human(st.st_size)}; {what})")
        return rec

    def _publish(self, done: dict[str, dict[str, Any]], fetched: int, total: int) -> PullResult:
        final = revision_dir(self.dest, self.source.revision)
        files = [
            {k: done[e.path][k] for k in ("path", "size", "sha256", "verified", "checksum_from")}
            for e in self.resolved.files
        ]
        marker = {
            "format": MARKER_FORMAT,
            "source": self.source.uri,
            "revision": self.source.revision,
            "commit": self.resolved.commit,
            "bytes": total,
            "files": files,
            "pulled_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        _fsync_write(self.files_dir / READY_MARKER, json.dumps(marker, indent=1))
        self.lock.check()
        if final.exists():
            # A directory without a valid marker (a manual copy, an old layout): set it aside.
            aside = self.stage / f"replaced-{uuid.uuid4().hex[:8]}"
            os.rename(final, aside)
        os.rename(self.files_dir, final)
        shutil.rmtree(self.stage, ignore_errors=True)
        return PullResult(
            path=final,
            revision=self.source.revision,
            commit=self.resolved.commit,
            files=len(files),
            bytes=total,
            fetched=fetched,
            already_present=False,
        )


def _present(final: Path, marker: dict[str, Any]) -> PullResult:
    return PullResult(
        path=final,
        revision=final.name,
        commit=marker.get("commit"),
        files=len(marker.get("files", [])),
        bytes=int(marker.get("bytes", 0)),
        fetched=0,
        already_present=True,
    )


def pull(
    source: Source,
    dest: Path,
    *,
    jobs: int = 4,
    keep_free: int = 0,
    stale_after: float = 60.0,
    out: TextIO | None = None,
    bar: bool | None = None,
) -> PullResult:
    """Put `source` at `dest/<revision>`, verified; see the module docstring for the steps."""
    out = out or sys.stderr
    bar = out.isatty() if bar is None else bar
    final = revision_dir(dest, source.revision)
    marker = read_marker(final)
    if marker is not None:
        return _present(final, marker)
    dest.mkdir(parents=True, exist_ok=True)

    def say(msg: str) -> None:
        out.write(msg + "\n")
        out.flush()

    lock = VolumeLock(lock_path(dest, source.revision), stale_after=stale_after, on_wait=say)
    lock.acquire()
    try:
        marker = read_marker(final)
        if marker is not None:
            say(f"{final} was published by another pull while we waited")
            return _present(final, marker)
        try:
            resolved = source.resolve()
        except SourceError as exc:
            raise PullError(str(exc)) from exc
        commit = f" (commit {resolved.commit})" if resolved.commit else ""
        size = sum(e.size or 0 for e in resolved.files)
        say(f"pulling {source.uri}{commit}: {len(resolved.files)} file(s), {human(size)}")
        puller = _Puller(
            source,
            dest,
            resolved,
            jobs=jobs,
            keep_free=keep_free,
            out=out,
            bar=bar,
            lock=lock,
        )
        try:
            return puller.run()
        except LockLost as exc:
            raise PullError(f"{exc}; stopped without publishing") from exc
    finally:
        lock.release()
