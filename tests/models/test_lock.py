"""The volume lock: exclusive, kept alive by its heartbeat, broken only when stale, fenced."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from app.models.lock import LockLost, VolumeLock


def test_a_held_lock_with_a_heartbeat_is_never_taken(tmp_path: Path) -> None:
    path = tmp_path / "r.lock"
    holder = VolumeLock(path, stale_after=0.3, heartbeat=0.05)
    holder.acquire()
    try:
        waiter = VolumeLock(path, stale_after=0.3, poll=0.02)
        with pytest.raises(TimeoutError, match="held by host"):
            waiter.acquire(timeout=1.2)  # four stale periods: only the heartbeat keeps it
        holder.check()
    finally:
        holder.release()
    assert not path.exists()


def test_a_lock_whose_holder_stalled_is_broken_and_the_holder_learns_it(tmp_path: Path) -> None:
    path = tmp_path / "r.lock"
    stalled = VolumeLock(path, heartbeat=3600)  # alive but silent (a frozen node)
    stalled.acquire()
    messages: list[str] = []
    taker = VolumeLock(path, stale_after=0.3, poll=0.02, on_wait=messages.append)
    taker.acquire(timeout=5)
    try:
        assert any("broke stale lock (no heartbeat)" in m for m in messages)
        with pytest.raises(LockLost):
            stalled.check()  # fencing: the old holder must not publish
        taker.check()
    finally:
        stalled.release()  # must not delete the new holder's lock
        assert path.exists()
        taker.release()


def test_only_one_of_many_waiters_gets_a_stale_lock(tmp_path: Path) -> None:
    path = tmp_path / "r.lock"
    path.write_text(json.dumps({"host": "elsewhere", "pid": 1, "token": "old"}))
    inside = 0
    overlaps = 0
    guard = threading.Lock()

    def contend() -> None:
        nonlocal inside, overlaps
        # stale_after is 50 heartbeats: a holder's heartbeat thread starved for longer (as on
        # a machine loaded far beyond its cores) would look dead; 0.2 s flaked at load 5.
        lock = VolumeLock(path, stale_after=1.0, heartbeat=0.02, poll=0.01)
        lock.acquire(timeout=20)
        with guard:
            inside += 1
            overlaps += inside > 1
        time.sleep(0.1)
        with guard:
            inside -= 1
        lock.release()

    threads = [threading.Thread(target=contend) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert overlaps == 0
    assert not path.exists()


def test_a_break_guard_left_by_a_dead_breaker_does_not_block_breaking(tmp_path: Path) -> None:
    path = tmp_path / "r.lock"
    path.write_text(json.dumps({"host": "elsewhere", "pid": 1, "token": "old"}))
    guard = tmp_path / "r.lock.break"
    guard.write_text("")
    old = time.time() - 10
    os.utime(guard, (old, old))
    lock = VolumeLock(path, stale_after=0.3, heartbeat=0.05, poll=0.01)
    lock.acquire(timeout=5)
    try:
        assert json.loads(path.read_text())["token"] == lock.token
        assert not guard.exists()
    finally:
        lock.release()
