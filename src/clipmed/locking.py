"""Exclusive locks on folders clipmed writes (run folders, prepared data, cache entries, indexes).

A lock is a file created with O_EXCL that holds the holder's host and PID. A second process gets a one-line
error naming the holder. A lock whose holder is gone (same host, PID not alive) is stale and taken over; a
lock from another host is never broken automatically (its PID means nothing here): the message says which
file to remove.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from types import TracebackType

from .errors import ClipmedError

LOCK_NAME = ".clipmed.lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


class FileLock:
    """`with FileLock(folder, what="train"):` holds `folder/.clipmed.lock` for the block.

    Re-entrant within one process (a nested lock on the same folder by the same PID is a no-op), so a library
    function that locks can be called from a CLI command that already locked.
    """

    _held: dict[str, int] = {}

    def __init__(self, folder: str | os.PathLike, *, what: str = "clipmed") -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.what = what
        self._owner = False

    def holder(self) -> dict | None:
        """The holder's record ({host, pid, what, since}), or None when unlocked or unreadable."""
        try:
            return json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def acquire(self) -> "FileLock":
        key = str(self.path.resolve())
        if self._held.get(key, 0):
            self._held[key] += 1
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        record = {"host": socket.gethostname(), "pid": os.getpid(), "what": self.what, "since": time.time()}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self.holder()
                if holder is None:
                    # Created but not yet written by its holder, or truncated by a crash: wait briefly.
                    time.sleep(0.2)
                    if self.holder() is None and self.path.exists() and time.time() - self.path.stat().st_mtime > 5:
                        self.path.unlink(missing_ok=True)
                    continue
                if holder.get("host") == record["host"] and not _pid_alive(int(holder.get("pid", -1))):
                    self.path.unlink(missing_ok=True)  # stale: its process is gone
                    continue
                where = (f"process {holder.get('pid')} on this host" if holder.get("host") == record["host"]
                         else f"process {holder.get('pid')} on host {holder.get('host')}")
                raise ClipmedError(f"{self.folder} is locked by {where} ({holder.get('what', 'clipmed')}): wait for "
                                   f"it to finish, or remove {self.path} if that process is gone")
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(record, handle)
            self._held[key] = 1
            self._owner = True
            return self
        raise ClipmedError(f"could not lock {self.folder}: remove {self.path} if no clipmed process uses it")

    def release(self) -> None:
        key = str(self.path.resolve())
        count = self._held.get(key, 0)
        if count > 1:
            self._held[key] = count - 1
            return
        if count == 1:
            del self._held[key]
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "FileLock":
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
