"""Model acquisition: put weights on the shared volume once, verified, published atomically.

Volume layout (one model directory per catalogue model, the `--dest` of a pull)::

    <dest>/<revision>/...                 the published files, read-only from then on
    <dest>/<revision>/.switchyard-ready   JSON: source, commit, every file with size + sha256
    <dest>/.partial/<revision>/           staging (same filesystem), kept across crashes: resume
    <dest>/.locks/<revision>.lock         who is pulling this revision right now

A replica mounts `<dest>` and serves `<dest>/<revision>` only once its ready marker exists.
"""

from app.models.layout import READY_MARKER, ModelRevision, list_models, revision_dir
from app.models.pull import PullError, PullResult, pull
from app.models.sources import FileEntry, Source, parse_source

__all__ = [
    "READY_MARKER",
    "FileEntry",
    "ModelRevision",
    "PullError",
    "PullResult",
    "Source",
    "list_models",
    "parse_source",
    "pull",
    "revision_dir",
]
