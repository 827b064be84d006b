"""The lock that serialises builders of one cache entry, with a holder that can be named and a
wait that cannot hang silently.

``filelock`` gives the mutual exclusion (an OS lock: a holder that dies releases it). Around it:

- the holder writes ``<entry>.owner`` (pid, host, since) and touches it every
  :data:`HEARTBEAT` seconds from a daemon thread while it holds the lock: a sign of life. A
  stopped process (SIGSTOP, a debugger, a laptop lid) stops all its threads, so its heartbeat
  stops too, while its lock stays held;
- a waiter polls the lock, says once after :data:`FIRST_NOTICE` seconds and then every
  :data:`NOTICE_EVERY` seconds whose lock it waits for, and gives up with one line once the
  holder has shown no sign of life for ``timeout`` seconds. A live holder, however long its
  build, is waited for.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from .errors import CacheError

HEARTBEAT = 5.0
POLL = 1.0
FIRST_NOTICE = 5.0
NOTICE_EVERY = 60.0


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class OwnedLock:
    """``acquire()`` / ``release()`` of ``<entry>.lock``; ``discard()`` removes the lock's files
    and the directory when nothing else is in it (after a failed first build)."""

    def __init__(self, entry: Path, *, timeout: float, notify: Callable[[str], None] | None = None):
        from filelock import FileLock

        self.entry = Path(entry)
        self.path = Path(f"{entry}.lock")
        self.owner = Path(f"{entry}.owner")
        self.timeout = float(timeout)
        self.notify = notify or _stderr
        self._lock = FileLock(str(self.path))
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def acquire(self) -> None:
        from filelock import Timeout

        start = last_notice = time.time()
        noticed = False
        while True:
            try:
                self._lock.acquire(timeout=POLL)
                break
            except Timeout:
                pass
            now = time.time()
            holder = self._holder()
            silent = now - (holder.get("beat") or start)
            if silent > max(self.timeout, 3 * HEARTBEAT):  # never shorter than a few heartbeats
                raise CacheError(
                    f"gave up waiting for the reference cache lock {self.path}: {self._who(holder)} has shown no "
                    f"sign of life for {silent:.0f} s (stopped or hung?); end that process, or raise "
                    "--kld-lock-timeout=SECONDS to wait longer"
                )
            if now - start >= FIRST_NOTICE and (not noticed or now - last_notice >= NOTICE_EVERY):
                noticed, last_notice = True, now
                self.notify(
                    f"pytest-kld: waiting for the reference cache lock {self.path}, held by {self._who(holder)} "
                    f"(last sign of life {silent:.0f} s ago; giving up after {self.timeout:.0f} s without one)"
                )
        self._start_heartbeat()

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=HEARTBEAT)
        try:
            self.owner.unlink()
        except OSError:
            pass
        self._lock.release()

    def discard(self) -> None:
        """Remove the lock file and the entry's directory if it holds nothing else (the caller
        still holds the lock; a waiter then takes an orphaned lock and finds no entry)."""
        for p in (self.owner, self.path):
            try:
                p.unlink()
            except OSError:
                pass
        try:
            self.entry.parent.rmdir()
        except OSError:  # not empty, or not ours to remove
            pass

    # -- the holder's side

    def _start_heartbeat(self) -> None:
        from .files import write_text

        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        try:
            write_text(self.owner, json.dumps(info))
        except OSError:  # a read-only or full disk: waiters fall back to their own clock
            return
        self._stop.clear()

        def beat():
            while not self._stop.wait(HEARTBEAT):
                try:
                    os.utime(self.owner)
                except OSError:
                    return

        self._beat = threading.Thread(target=beat, name="pytest-kld-lock-heartbeat", daemon=True)
        self._beat.start()

    # -- the waiter's side

    def _holder(self) -> dict:
        from .files import UnreadableFile, read_json

        try:
            info = read_json(self.owner, 1 << 16)
            if not isinstance(info, dict):  # another program's file, or a hostile one: no facts
                return {}
            info = {k: v for k, v in info.items() if k in ("pid", "host", "since")}
            if not isinstance(info.get("pid"), int) or not isinstance(info.get("host", ""), str) or not (
                    isinstance(info.get("since", 0), (int, float)) and 0 <= info.get("since", 0) < 1e11):
                return {}
            info["host"] = "".join(c for c in info.get("host", "?") if c.isprintable())[:100]
            info["beat"] = self.owner.stat().st_mtime
            return info
        except (OSError, UnreadableFile):
            return {}

    @staticmethod
    def _who(holder: dict) -> str:
        if not holder.get("pid"):
            return "another process"
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since") or 0))
        return f"pid {holder['pid']} on {holder.get('host', '?')} since {since}"
