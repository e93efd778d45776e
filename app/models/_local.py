"""A directory as a source (another mount, a pre-downloaded snapshot).

It publishes no checksum of its own unless it holds a `SHA256SUMS` file; sizes are checked
before and after the copy, so a file still being written to is refused.
"""

from __future__ import annotations

import os
from pathlib import Path

from app.models.sources import (
    FileEntry,
    Resolved,
    Sink,
    SourceError,
    check_relative_path,
    parse_sha256sums,
)

SUMS_FILE = "SHA256SUMS"
CHUNK = 1 << 20


class LocalSource:
    def __init__(self, root: Path, revision: str) -> None:
        self.root = root
        self.revision = revision
        self.uri = str(root)

    def resolve(self) -> Resolved:
        if not self.root.is_dir():
            raise SourceError(f"{self.root}: not a directory")
        sums: dict[str, str] = {}
        if (self.root / SUMS_FILE).is_file():
            sums = parse_sha256sums((self.root / SUMS_FILE).read_text())
        files = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                full = Path(dirpath) / name
                rel = check_relative_path(full.relative_to(self.root).as_posix())
                if rel.startswith(".") or (full.is_symlink() and not full.exists()):
                    continue
                digest = sums.pop(rel, None)
                files.append(
                    FileEntry(
                        rel,
                        size=full.stat().st_size,
                        sha256=digest,
                        checksum_from=SUMS_FILE if digest else "",
                    )
                )
        if sums:
            raise SourceError(f"{self.root}: {SUMS_FILE} lists missing files {sorted(sums)}")
        if not files:
            raise SourceError(f"{self.root}: the directory is empty")
        return Resolved(commit=None, files=tuple(files))

    def fetch(self, entry: FileEntry, sink: Sink, offset: int) -> None:
        path = self.root / entry.path
        with open(path, "rb") as f:
            f.seek(offset)
            while chunk := f.read(CHUNK):
                sink.write(chunk)
        if entry.size is not None and path.stat().st_size != entry.size:
            raise SourceError(f"{path}: changed size while it was being copied")
