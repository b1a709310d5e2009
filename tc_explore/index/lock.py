"""A lock on an index folder, held by one build or merge at a time.

The lock is a small JSON file *beside* the folder (``<parent>/.<name>.lock``),
so replacing or deleting the folder never touches it. It records who holds it:
pid, host, the process's start time (to tell a live holder from a reused pid)
and when and why it was taken. Anyone else is refused with that information.
A lock whose process is dead (same host) is stale: it is renamed away in one
atomic step (only one of several contenders can win that rename) and taken over.
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from ..errors import IndexLockedError

_TAKE_TRIES = 5


def lock_path(folder: str | os.PathLike) -> Path:
    folder = Path(os.path.abspath(folder))
    return folder.parent / f".{folder.name}.lock"


def _process_start(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode("ascii", "replace")
    except OSError:
        return None
    # Field 22 (starttime), counted after the ")" that ends the command name.
    return stat.rsplit(")", 1)[-1].split()[19]


def _alive(holder: dict) -> bool:
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:            # alive, owned by another user
        return True
    started = holder.get("process_start")
    now = _process_start(pid)
    return started is None or now is None or now == started


class FolderLock:
    """``with FolderLock(folder, "build"):`` holds the lock on ``folder`` for
    the block. Raises ``IndexLockedError`` naming the holder if a live process
    holds it."""

    def __init__(self, folder: str | os.PathLike, purpose: str):
        self.folder = Path(folder)
        self.path = lock_path(folder)
        self.purpose = purpose
        self.stale_holder: dict | None = None    # the dead holder this lock was taken from
        self._held = False

    def acquire(self) -> "FolderLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "process_start": _process_start(os.getpid()),
              "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "purpose": self.purpose,
              "folder": str(self.folder)}
        for _ in range(_TAKE_TRIES):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._read_holder()
                if holder is None:                  # released (or being written) meanwhile
                    time.sleep(0.05)
                    continue
                if holder.get("host") != me["host"] or _alive(holder):
                    raise IndexLockedError(self._refusal(holder))
                self._take_over(holder)
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(me, f)
            self._held = True
            return self
        raise IndexLockedError(f"Could not take the lock {self.path} on {self.folder} after "
                               f"{_TAKE_TRIES} tries: other processes keep taking it.")

    def _read_holder(self) -> dict | None:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        try:
            holder = json.loads(text)
        except ValueError:
            # Being written right now, or a damaged file: judged by its age.
            try:
                age = time.time() - self.path.stat().st_mtime
            except FileNotFoundError:
                return None
            if age < 5:
                return None
            return {"pid": None, "host": socket.gethostname(), "note": "unreadable lock file"}
        return holder if isinstance(holder, dict) else {"pid": None, "host": socket.gethostname()}

    def _take_over(self, holder: dict) -> None:
        """Move a dead holder's lock aside in one rename: of several processes
        taking over at once, exactly one succeeds; the others retry."""
        aside = self.path.with_name(f"{self.path.name}.stale.{os.getpid()}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        try:
            moved = json.loads(aside.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            moved = holder
        if isinstance(moved, dict) and moved.get("host") == socket.gethostname() and _alive(moved):
            # A live process took the lock between our read and our rename: give it back.
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
            aside.unlink(missing_ok=True)
            raise IndexLockedError(self._refusal(moved))
        aside.unlink(missing_ok=True)
        self.stale_holder = holder

    def _refusal(self, holder: dict) -> str:
        who = (f"pid {holder.get('pid')} on host {holder.get('host')!r}, "
               f"{holder.get('purpose', 'working')} since {holder.get('started_at', '?')}")
        return (f"The index folder {self.folder} is in use by another process ({who}). Wait for it "
                f"to finish, or use another folder. If that process is gone (e.g. on another "
                f"machine that crashed), delete the lock file {self.path}.")

    def release(self) -> None:
        if self._held:
            self._held = False
            try:
                holder = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                return
            if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
                self.path.unlink(missing_ok=True)

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
