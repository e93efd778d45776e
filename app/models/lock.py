"""A lock that holds across the nodes of an NFS volume (EFS), and survives its holder dying.

Why not `fcntl`/`flock`: whether they span clients depends on mount options (`nolock`,
`local_lock=`) and silently degrade to node-local locks. Why not `filelock.SoftFileLock`: it
is an O_EXCL file with no notion of staleness, so a Job killed mid-pull (OOM, node lost,
deadline) leaves it behind and every retry waits forever.

So: the lock is a file created with O_CREAT|O_EXCL (atomic on NFSv3+/v4.1), holding a JSON
record of its owner. The owner rewrites it every `heartbeat` seconds. A waiter treats the lock
as stale when its content has not changed for `stale_after` seconds *by the waiter's own
monotonic clock* (no clock comparison between nodes), re-reading it through a fresh open()
so NFS close-to-open consistency defeats attribute caching. On the owner's own host (same
boot, same pid namespace) a dead pid is known at once. Waiters break a stale lock one at a
time, each under a `<lock>.break` guard (O_EXCL) and only if the lock still holds what they
judged stale, so none can remove a lock another has just taken (a guard left by a breaker that
died is itself cleared after `stale_after`).

Fencing: the owner's heartbeat checks that the file still carries its token; if not (a
waiter judged it stale), `lost` is set and the pull aborts before publishing.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any


class LockLost(Exception):
    """Another pull broke our lock (we looked dead to it); stop before publishing."""


def _read(path: Path) -> bytes | None:
    try:
        with open(path, "rb") as f:  # a fresh open revalidates NFS attributes and data
            return f.read()
    except FileNotFoundError:
        return None


def _proc_start(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22: start time in clock ticks


def _identity() -> dict[str, Any]:
    ident: dict[str, Any] = {"host": socket.gethostname(), "pid": os.getpid()}
    with contextlib.suppress(OSError):
        ident["boot_id"] = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    with contextlib.suppress(OSError):
        ident["pidns"] = os.stat("/proc/self/ns/pid").st_ino
    ident["start"] = _proc_start(os.getpid())
    return ident


def holder_is_dead(record: dict[str, Any]) -> bool:
    """True only when the holder is provably gone: same host, boot and pid namespace."""
    me = _identity()
    if not all(record.get(k) == me.get(k) for k in ("host", "boot_id", "pidns")):
        return False
    if me.get("boot_id") is None or me.get("pidns") is None:
        return False
    pid = record.get("pid")
    if not isinstance(pid, int):
        return False
    start = _proc_start(pid)
    return start is None or start != record.get("start")


def describe(record: dict[str, Any]) -> str:
    since = record.get("since")
    when = time.strftime("%H:%M:%S", time.gmtime(since)) + " UTC" if since else "?"
    return f"host {record.get('host', '?')} pid {record.get('pid', '?')} since {when}"


class VolumeLock:
    def __init__(
        self,
        path: Path,
        *,
        stale_after: float = 60.0,
        heartbeat: float | None = None,
        poll: float = 0.25,
        on_wait: Callable[[str], None] | None = None,
    ) -> None:
        self.path = path
        self.stale_after = stale_after
        self.heartbeat = heartbeat if heartbeat is not None else max(0.05, stale_after / 6)
        self.poll = poll
        self.on_wait = on_wait or (lambda _msg: None)
        self.token = uuid.uuid4().hex
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._beat = 0

    def _record(self) -> bytes:
        rec = {**_identity(), "token": self.token, "since": self._since, "beat": self._beat}
        return json.dumps(rec).encode()

    def acquire(self, timeout: float | None = None) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = None if timeout is None else time.monotonic() + timeout
        seen: bytes | None = None
        seen_at = time.monotonic()
        announced = False
        while True:
            self._since = time.time()
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                pass
            else:
                try:
                    os.write(fd, self._record())
                    os.fsync(fd)
                finally:
                    os.close(fd)
                self._thread = threading.Thread(target=self._beats, daemon=True, name="lock-beat")
                self._thread.start()
                return
            content = _read(self.path)
            if content is None:
                continue  # released between our open and read: try again at once
            now = time.monotonic()
            if content != seen:
                seen, seen_at = content, now
            record = _parse(content)
            if not announced:
                self.on_wait(f"waiting for {self.path.name}, held by {describe(record)}")
                announced = True
            if holder_is_dead(record) or now - seen_at >= self.stale_after:
                reason = "its holder is gone" if holder_is_dead(record) else "no heartbeat"
                if self._break(content):
                    self.on_wait(f"broke stale lock ({reason}): {describe(record)}")
                seen = None
                continue
            if deadline is not None and now >= deadline:
                raise TimeoutError(f"{self.path} is held by {describe(record)}")
            time.sleep(self.poll)

    def _break(self, expected: bytes) -> bool:
        """Remove the lock if it still holds ``expected``. Waiters that judged it stale
        together break it one at a time, each under ``<lock>.break`` (O_EXCL) and only after
        re-reading it: otherwise one could rename away the fresh lock another had just taken
        after breaking the stale one, and a third could take the name before it was put back
        (two holders, left to fencing; seen in 1 of 15 runs of four waiters)."""
        guard = self.path.with_name(self.path.name + ".break")
        try:
            fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            self._clear_stale_guard(guard)
            return False  # another waiter is breaking it: look again
        os.close(fd)
        try:
            if _read(self.path) != expected:
                return False  # released, broken or re-taken meanwhile
            aside = self.path.with_name(f"{self.path.name}.stale-{uuid.uuid4().hex[:8]}")
            try:
                os.rename(self.path, aside)
            except FileNotFoundError:
                return False  # its holder released it
            with contextlib.suppress(FileNotFoundError):
                os.unlink(aside)
            return True
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(guard)

    def _clear_stale_guard(self, guard: Path) -> None:
        """A breaker that died between creating and removing ``guard`` (microseconds of
        work) must not block breaking forever: a guard older than ``stale_after`` goes. Its
        age compares the server's mtime with this node's clock; node clocks are NTP-synced
        and ``stale_after`` (a minute by default) dwarfs their skew."""
        try:
            age = time.time() - os.stat(guard).st_mtime
        except FileNotFoundError:
            return
        if age >= self.stale_after:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(guard)

    def _owned(self) -> bool:
        content = _read(self.path)
        return content is not None and _parse(content).get("token") == self.token

    def _beats(self) -> None:
        while not self._stop.wait(self.heartbeat):
            if not self._owned():
                self.lost.set()
                return
            self._beat += 1
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_TRUNC)
                try:
                    os.write(fd, self._record())
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except FileNotFoundError:
                self.lost.set()
                return

    def check(self) -> None:
        if self.lost.is_set() or not self._owned():
            self.lost.set()
            raise LockLost(f"{self.path} was taken over by another pull")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if not self.lost.is_set() and self._owned():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    def __enter__(self) -> VolumeLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _parse(content: bytes) -> dict[str, Any]:
    try:
        value = json.loads(content)
    except ValueError:
        return {}  # being rewritten by a heartbeat at this very moment
    return value if isinstance(value, dict) else {}
