"""Progress of a run while it goes: a live rich bar on a terminal, a plain line every few
seconds otherwise (CI logs, pipes), or nothing. Drawn on stderr so that stdout stays the
result. It only reads the run's counters, so it costs the load nothing per request."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any, TextIO

from app.bench.load import Live

MODES = ("auto", "rich", "plain", "none")
PLAIN_EVERY_S = 2.0


def _line(live: Live) -> str:
    elapsed = max(time.perf_counter() - live.started, 1e-9) if live.started else 0.0
    rps = live.ok / elapsed if elapsed else 0.0
    return (
        f"ok {live.ok}  429 {live.rate_limited}  errors {live.errors}  dropped {live.dropped}  "
        f"in flight {live.in_flight}  {rps:.1f} req/s"
    )


def _fraction(live: Live) -> tuple[float, float]:
    """(completed, total) in requests, or in seconds for a run of a set duration."""
    if live.total is not None:
        return float(live.done), float(live.total)
    elapsed = time.perf_counter() - live.started if live.started else 0.0
    total = live.duration_s or 1.0
    return min(elapsed, total), total


async def _plain(live: Live, out: TextIO, every_s: float) -> None:
    while True:
        await asyncio.sleep(every_s)
        if live.started:
            done, total = _fraction(live)
            print(f"bench: {100 * done / total:5.1f}%  {_line(live)}", file=out, flush=True)


async def _rich(live: Live) -> None:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (
        TextColumn("[bold]bench"),
        BarColumn(),
        TextColumn("{task.percentage:>5.1f}%"),
        TimeElapsedColumn(),
        TextColumn("{task.fields[line]}"),
    )
    with Progress(*columns, console=Console(stderr=True), refresh_per_second=8) as bar:
        task = bar.add_task("bench", total=1.0, line="warming up")
        try:
            while True:
                if live.started:
                    done, total = _fraction(live)
                    bar.update(task, completed=done, total=total, line=_line(live))
                await asyncio.sleep(0.125)
        finally:
            done, total = _fraction(live)
            bar.update(task, completed=done, total=total, line=_line(live))


def display(
    mode: str, live: Live, out: TextIO | None = None
) -> Callable[[], Coroutine[Any, Any, None]] | None:
    """A coroutine factory drawing ``live``, for ``load.run_sync(side=...)``; None for no
    display. ``auto`` is rich when stderr is a terminal, plain lines otherwise."""
    out = out or sys.stderr
    mode = choose(mode, out)
    if mode == "rich":
        return lambda: _rich(live)
    if mode == "plain":
        return lambda: _plain(live, out, PLAIN_EVERY_S)
    return None


def choose(mode: str, out: TextIO) -> str:
    """``auto`` resolved: a live bar only where someone watches (a terminal)."""
    if mode == "auto":
        return "rich" if out.isatty() else "plain"
    return mode
