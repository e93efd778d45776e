"""The bodies of `switchyard models pull|list` (the parser lives in app/cli.py)."""

from __future__ import annotations

import argparse
import json
import re
import signal
import sys
from pathlib import Path
from types import FrameType

from app.models.layout import human, list_models
from app.models.pull import PullError, pull
from app.models.sources import SourceError, parse_source

_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B?)$", re.IGNORECASE)
_POWERS = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}


def size(text: str) -> int:
    """`0`, `512M`, `10GiB`, `1.5T` -> bytes (binary units: a volume is sized in GiB)."""
    m = _SIZE.match(text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 0, 512M or 10G")
    return int(float(m.group(1)) * 1024 ** _POWERS[m.group(2).upper()])


def _terminate(signum: int, frame: FrameType | None) -> None:
    # Kubernetes stops a Job with SIGTERM: unwind so the lock is released and staging kept.
    raise SystemExit(128 + signum)


def run_pull(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, _terminate)
    bar = {"auto": None, "bar": True, "plain": False}[args.progress]
    try:
        source = parse_source(args.source, args.revision)
        result = pull(
            source,
            Path(args.dest),
            jobs=args.jobs,
            keep_free=args.keep_free,
            stale_after=args.lock_stale_after,
            bar=bar,
        )
    except (SourceError, PullError) as exc:
        print(f"switchyard: models pull: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(
            json.dumps(
                {
                    "path": str(result.path),
                    "revision": result.revision,
                    "commit": result.commit,
                    "files": result.files,
                    "bytes": result.bytes,
                    "fetched": result.fetched,
                    "already_present": result.already_present,
                }
            )
        )
    elif result.already_present:
        print(f"{result.path}: already present ({result.files} files, {human(result.bytes)})")
    else:
        print(
            f"ready: {result.path} ({result.files} files, {human(result.bytes)}, "
            f"fetched {human(result.fetched)})"
        )
    return 0


def run_list(args: argparse.Namespace) -> int:
    try:
        found = list_models(Path(args.dir))
    except FileNotFoundError as exc:
        print(f"switchyard: models list: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps([m.public() for m in found]))
        return 0
    print(f"{'MODEL':<24}{'REVISION':<42}{'STATE':<9}{'FILES':>6}{'SIZE':>12}  SOURCE")
    for m in found:
        print(
            f"{m.model[:23]:<24}{m.revision[:41]:<42}{m.state:<9}{m.files:>6}"
            f"{human(m.size):>12}  {m.source}"
        )
    return 0
