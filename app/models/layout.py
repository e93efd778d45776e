"""Where things live on the volume, the ready marker, and `switchyard models list`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

READY_MARKER = ".switchyard-ready"
PARTIAL_DIR = ".partial"
LOCKS_DIR = ".locks"
MARKER_FORMAT = 1


def revision_dir(dest: Path, revision: str) -> Path:
    return dest / revision


def staging_dir(dest: Path, revision: str) -> Path:
    return dest / PARTIAL_DIR / revision


def lock_path(dest: Path, revision: str) -> Path:
    return dest / LOCKS_DIR / f"{revision}.lock"


def read_marker(rev_dir: Path) -> dict[str, Any] | None:
    """The ready marker of a published revision, or None if it is not (or not fully) there."""
    try:
        data = json.loads((rev_dir / READY_MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != MARKER_FORMAT:
        return None
    return data


@dataclass(frozen=True)
class ModelRevision:
    model: str
    revision: str
    path: Path
    state: str
    """`ready`, or `partial` for a pull in progress or interrupted (resumable)."""
    size: int
    files: int
    source: str = ""
    commit: str | None = None
    pulled_at: str = ""

    def public(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "revision": self.revision,
            "state": self.state,
            "size": self.size,
            "files": self.files,
            "source": self.source,
            "commit": self.commit,
            "pulled_at": self.pulled_at,
            "path": str(self.path),
        }


def _tree_size(path: Path) -> tuple[int, int]:
    total = count = 0
    for p in path.rglob("*"):
        if p.is_file() and not p.is_symlink():
            total += p.stat().st_size
            count += 1
    return total, count


def _model_revisions(model_dir: Path) -> list[ModelRevision]:
    out = []
    for child in sorted(model_dir.iterdir()):
        if child.name.startswith(".") or not child.is_dir():
            continue
        marker = read_marker(child)
        if marker is None:
            continue
        out.append(
            ModelRevision(
                model=model_dir.name,
                revision=child.name,
                path=child,
                state="ready",
                size=int(marker.get("bytes", 0)),
                files=len(marker.get("files", [])),
                source=str(marker.get("source", "")),
                commit=marker.get("commit"),
                pulled_at=str(marker.get("pulled_at", "")),
            )
        )
    partial = model_dir / PARTIAL_DIR
    if partial.is_dir():
        for child in sorted(partial.iterdir()):
            if child.is_dir():
                size, count = _tree_size(child / "files")
                out.append(ModelRevision(model_dir.name, child.name, child, "partial", size, count))
    return out


def list_models(root: Path) -> list[ModelRevision]:
    """Revisions under `root`: a model directory itself, or a volume of model directories."""
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such directory")
    found = _model_revisions(root)
    if found:
        return found
    out: list[ModelRevision] = []
    for child in sorted(root.iterdir()):
        if child.is_dir() and not child.name.startswith("."):
            out.extend(_model_revisions(child))
    return out


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
