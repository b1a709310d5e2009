"""A lock on an index (or weight-view) folder, held by one build or merge at a time.

The lock is a small JSON file *beside* the folder (``<parent>/.<name>.lock``),
so replacing or deleting the folder never touches it. It records who holds it:
pid, host, the process's start time (to tell a live holder from a reused pid)
and when and why it was taken. Anyone else is refused with that information.

While held, a daemon thread of the holder refreshes the lock file's
modification time every ``HEARTBEAT_EVERY`` seconds (its heartbeat). A lock
is stale, and taken over, when

* its holder runs on this host and its process is dead; or
* its holder runs on another host (which we cannot ask) and its heartbeat is
  older than ``STALE_AFTER`` seconds (10 minutes): that machine crashed or
  lost the shared filesystem. A ``StaleLockWarning`` names the old holder.
  Hosts that share a folder need clocks that agree to well within that time.
  Locks written by versions without a heartbeat are never judged stale on
  another host: delete them by hand.

A stale lock is renamed away in one atomic step (only one of several
contenders can win that rename) and taken over.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
import warnings
from pathlib import Path

from .errors import IndexLockedError, StaleLockWarning, StorageError

_TAKE_TRIES = 5
# The holder touches its lock file this often; a lock of another host whose
# file is older than STALE_AFTER is taken over (recorded in the file, so a
# holder's own promise is what others judge it by).
HEARTBEAT_EVERY = 30.0
STALE_AFTER = 600.0


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
    the block, refreshing its heartbeat from a daemon thread. Raises
    ``IndexLockedError`` naming the holder if a live process holds it."""

    def __init__(self, folder: str | os.PathLike, purpose: str, heartbeat_every: float = HEARTBEAT_EVERY,
                 stale_after: float = STALE_AFTER):
        self.folder = Path(folder)
        self.path = lock_path(folder)
        self.purpose = purpose
        self.heartbeat_every, self.stale_after = float(heartbeat_every), float(stale_after)
        self.stale_holder: dict | None = None    # the dead holder this lock was taken from
        self.lost: str | None = None             # why the heartbeat found the lock no longer ours
        self._held = False
        self._token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def acquire(self) -> "FolderLock":
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise StorageError(f"Cannot create the folder {self.path.parent} that holds the lock on "
                               f"{self.folder} ({error.strerror or error}): choose a folder you can write to."
                               ) from error
        me = {"pid": os.getpid(), "host": socket.gethostname(), "process_start": _process_start(os.getpid()),
              "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "purpose": self.purpose,
              "folder": str(self.folder), "token": self._token, "heartbeat_every": self.heartbeat_every,
              "stale_after": self.stale_after}
        for _ in range(_TAKE_TRIES):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._read_holder()
                if holder is None:                  # released (or being written) meanwhile
                    time.sleep(0.05)
                    continue
                if not self._stale(holder):
                    raise IndexLockedError(self._refusal(holder))
                self._take_over(holder)
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(me, f)
            self._held = True
            self._start_heartbeat()
            return self
        raise IndexLockedError(f"Could not take the lock {self.path} on {self.folder} after "
                               f"{_TAKE_TRIES} tries: other processes keep taking it.")

    def _stale(self, holder: dict) -> bool:
        """Dead on this host; or, on another host, silent for longer than it promised."""
        if holder.get("host") == socket.gethostname():
            return not _alive(holder)
        limit = holder.get("stale_after")
        if not isinstance(limit, (int, float)) or isinstance(limit, bool) or holder.get("_age") is None:
            return False                    # no heartbeat promised: only a person can tell
        return holder["_age"] > limit

    # -- heartbeat ---------------------------------------------------------------------
    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._beat = threading.Thread(target=self._heartbeat, name=f"tc-lock-heartbeat {self.folder.name}",
                                      daemon=True)
        self._beat.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_every):
            if not self.beat():
                return

    def beat(self) -> bool:
        """Refresh the lock's heartbeat (its file's modification time), if the
        lock is still ours; False (and ``lost`` says why) when it is not."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            self.lost = f"the lock file {self.path} was removed"
            return False
        try:
            with os.fdopen(fd, "r", encoding="utf-8", closefd=False) as f:
                holder = json.loads(f.read())
            if not isinstance(holder, dict) or holder.get("token") != self._token:
                self.lost = f"the lock {self.path} was taken over by {self._who(holder or {})}"
                return False
            os.utime(fd)                                           # now, on this file only
            return True
        except (OSError, ValueError) as err:
            self.lost = f"the lock file {self.path} could not be refreshed ({err})"
            return False
        finally:
            os.close(fd)

    def check_held(self) -> None:
        """Raise ``IndexLockedError`` if another process took this lock over
        (this one was judged dead: e.g. suspended for longer than ``stale_after``)."""
        if self._held and (self.lost is not None or not self.beat()):
            raise IndexLockedError(
                f"This process no longer holds the lock on {self.folder}: {self.lost}. It stops "
                "rather than write into a folder another process now owns.")

    def _read_holder(self) -> dict | None:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        try:
            age = time.time() - self.path.stat().st_mtime          # since the last heartbeat
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
        if not isinstance(holder, dict):
            return {"pid": None, "host": socket.gethostname()}
        return {**holder, "_age": age}

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
        if isinstance(moved, dict):
            try:
                moved["_age"] = time.time() - aside.stat().st_mtime
            except OSError:
                moved["_age"] = None
        if isinstance(moved, dict) and not self._stale(moved):
            # A live process took the lock, or beat, between our read and our rename: give it back.
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
            aside.unlink(missing_ok=True)
            raise IndexLockedError(self._refusal(moved))
        aside.unlink(missing_ok=True)
        self.stale_holder = holder
        if holder.get("host") != socket.gethostname():
            warnings.warn(
                f"Took over the lock on {self.folder} from {self._who(holder)}: its last heartbeat was "
                f"{holder['_age']:.0f} s ago, longer than the {holder['stale_after']:.0f} s after which a "
                "holder on another host is presumed dead.", StaleLockWarning, stacklevel=4)

    @staticmethod
    def _who(holder: dict) -> str:
        return (f"pid {holder.get('pid')} on host {holder.get('host')!r}, "
                f"{holder.get('purpose', 'working')} since {holder.get('started_at', '?')}")

    def _refusal(self, holder: dict) -> str:
        if holder.get("host") != socket.gethostname() and isinstance(holder.get("stale_after"), (int, float)):
            age = holder.get("_age")
            gone = (f"Its heartbeat is {age:.0f} s old; it is taken over once that exceeds "
                    f"{holder['stale_after']:.0f} s (that process's host crashed or stopped).")
        else:
            gone = (f"If that process is gone (e.g. on another machine that crashed), delete the lock "
                    f"file {self.path}.")
        return (f"The index folder {self.folder} is in use by another process ({self._who(holder)}). "
                f"Wait for it to finish, or use another folder. {gone}")

    def release(self) -> None:
        if self._held:
            self._held = False
            self._stop.set()
            if self._beat is not None and self._beat is not threading.current_thread():
                self._beat.join()
            try:
                holder = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                return
            if isinstance(holder, dict) and holder.get("token", self._token) == self._token and \
                    holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
                self.path.unlink(missing_ok=True)

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
