"""An exclusive claim on a run directory (``--out``): a lock file made with O_CREAT | O_EXCL.

Two commands writing the same ``--out`` at once would interleave their files (a config.json of
one run beside the model.pt of the other). :class:`OutLock` makes the second one refuse: the
file ``<out>/.mil-run.lock`` holds the owner's pid, host and process start time, is created
atomically (of two processes exactly one wins) and is removed when the writer finishes or
fails. A lock left by a process that died (same host, pid gone or reused by another process) is
stale and taken over; one from another host is refused with the path to delete.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import socket
import weakref
from pathlib import Path

from mil.errors import MilError

log = logging.getLogger(__name__)

LOCK_NAME = ".mil-run.lock"


def _start_time(pid: int) -> str | None:
    """The start time of *pid* in clock ticks since boot (Linux /proc), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # field 22 counts from 1; the command (field 2) is in parentheses and may hold spaces
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 else None


def _alive(owner: dict) -> bool:
    """Whether the owner recorded in a lock file (on this host) is still running."""
    try:
        pid = int(owner["pid"])
    except (KeyError, TypeError, ValueError):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass                       # alive, another user's
    started = owner.get("started")
    now = _start_time(pid)
    return not (started and now and started != now)   # the pid was reused by a newer process


class OutLock:
    """The claim of one process on a run directory; :meth:`acquire` raises :class:`MilError` if taken."""

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.path = self.out / LOCK_NAME
        self.held = False
        self._finalizer: weakref.finalize | None = None

    def _owner_doc(self) -> dict:
        pid = os.getpid()
        return {"pid": pid, "host": socket.gethostname(), "started": _start_time(pid),
                "since": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}

    def _read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}               # half-written by a process that died right after creating it

    def _create(self) -> bool:
        """Make the lock file whole in one step (a hard link of a written temp file: of two
        processes exactly one wins) and arm its removal before Ctrl-C can land in between."""
        import signal

        tmp = self.out / f"{LOCK_NAME}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(self._owner_doc()) + "\n")
        blocked = {signal.SIGINT, signal.SIGTERM}
        old = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
        try:
            try:
                os.link(tmp, self.path)
            except FileExistsError:
                return False
            except OSError:  # a file system without hard links: create it exclusively, then fill it
                try:
                    fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                except FileExistsError:
                    return False
                with os.fdopen(fd, "w") as fh:
                    fh.write(tmp.read_text())
            self._held()
            return True
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
            tmp.unlink(missing_ok=True)

    def _refuse(self, owner: dict) -> MilError:
        who = f"pid {owner.get('pid', '?')} on {owner.get('host', '?')}, since {owner.get('since', '?')}"
        if owner.get("host") not in (None, socket.gethostname()):
            return MilError(f"--out {self.out} is in use by another run ({who}); wait for it to finish or choose "
                            f"another --out (if that run is gone, delete {self.path})")
        return MilError(f"--out {self.out} is in use by another run ({who}); wait for it to finish or choose "
                        "another --out")

    def acquire(self) -> "OutLock":
        """Take the claim (the directory must exist); a stale lock of a dead process is replaced."""
        if self._create():
            return self
        import fcntl

        # replacing a stale lock is check-then-act: one process at a time (a guard file held with flock),
        # so two processes that both saw the stale lock cannot both replace it
        with open(self.out / (LOCK_NAME + ".guard"), "a") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)
            for _ in range(3):
                owner = self._read()
                if owner is None:                       # released meanwhile
                    if self._create():
                        return self
                    continue
                same_host = owner.get("host") in (None, socket.gethostname())
                if owner and (not same_host or _alive(owner)):
                    raise self._refuse(owner)
                log.warning("--out %s: replacing the stale lock of pid %s (no longer running)", self.out,
                            owner.get("pid", "?"))
                self.path.unlink(missing_ok=True)
                if self._create():
                    return self
        owner = self._read() or {}
        raise self._refuse(owner)

    def _held(self) -> "OutLock":
        self.held = True
        # released however the writer ends: explicitly, when garbage collected, at interpreter exit
        self._finalizer = weakref.finalize(self, _remove_if_ours, self.path, os.getpid())
        return self

    def release(self) -> None:
        """Remove the lock file (only if it is still this process's)."""
        if self.held:
            self.held = False
            if self._finalizer is not None:
                self._finalizer()

    def __enter__(self) -> "OutLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _remove_if_ours(path: Path, pid: int) -> None:
    try:
        owner = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if owner.get("pid") == pid and owner.get("host") == socket.gethostname():
        path.unlink(missing_ok=True)


__all__ = ["LOCK_NAME", "OutLock"]
