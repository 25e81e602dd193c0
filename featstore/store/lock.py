"""Claims on one slide of a store: a lock file with a heartbeat (local stores), a no-op elsewhere."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from pathlib import Path

from featstore.store._layout import now

log = logging.getLogger(__name__)


class SlideLock:
    """An exclusive claim on one slide of a local store (a lock file with a heartbeat).

    The file is created with O_EXCL, so of two processes exactly one wins. The owner touches it
    every ``heartbeat`` seconds; a lock whose file is older than ``stale_after`` (its owner died)
    is taken over. Remote stores rely on disjoint work lists instead (see docs/scale-out.md).
    """

    def __init__(self, path: Path, stale_after: float = 120.0, heartbeat: float = 15.0):
        self.path = path
        self.stale_after = stale_after
        self.heartbeat = heartbeat
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._held = False  # release() removes the file only if this claim made it (never another's)

    def acquire(self) -> bool:
        """Take the claim; False when another live process holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if not self._is_stale():
                    return False
                log.warning("taking over stale lock %s", self.path)
                try:
                    self.path.unlink()
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(f"{socket.gethostname()} {os.getpid()} {now()}\n")
            self._held = True
            self._thread = threading.Thread(target=self._beat, daemon=True, name=f"lock-{self.path.stem}")
            self._thread.start()
            return True
        return False

    def _is_stale(self) -> bool:
        try:
            age = time.time() - self.path.stat().st_mtime
            owner = self.path.read_text().split()
        except (FileNotFoundError, OSError):
            return True
        if len(owner) >= 2 and owner[0] == socket.gethostname():
            try:
                os.kill(int(owner[1]), 0)
            except ProcessLookupError:
                return True  # owner process on this host is gone
            except (PermissionError, ValueError):
                pass
        return age > self.stale_after

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            try:
                os.utime(self.path)
            except FileNotFoundError:
                return

    def release(self) -> None:
        """Stop the heartbeat and remove the lock file (once; a second call does nothing)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1)
        if not self._held:
            return
        self._held = False
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    def __enter__(self) -> "SlideLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class NullLock:
    """Lock stand-in for stores without a local filesystem (work is partitioned instead)."""

    def acquire(self) -> bool:
        return True

    def release(self) -> None:
        pass

    def __enter__(self) -> "NullLock":
        return self

    def __exit__(self, *exc) -> None:
        pass
