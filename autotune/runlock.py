"""One run per output folder: a lock file that a second `autotune train` into the same folder finds taken.

The lock is an flock on `<output_dir>/.autotune.lock`, which the kernel releases when its process dies however
it dies (SIGKILL, OOM killer, power loss): a lock left by a dead process is therefore never in force, only its
file remains, and the next run takes it over and says so. The file records who holds it (pid, host, start time)
for the message the second run prints.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from autotune.errors import UserError
from autotune.fsutil import file_mode

LOCK_NAME = ".autotune.lock"

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no flock; the lock degrades to an existence check
    fcntl = None  # type: ignore[assignment]


def _read_holder(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _describe(holder: dict) -> str:
    if not holder:
        return "another process"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started_at", 0)))
    return f"pid {holder.get('pid')} on {holder.get('host')}, since {since}"


def in_use(folder: str | os.PathLike) -> bool:
    """Whether another process holds `folder` now (its lock file is locked), asked without taking the lock or
    creating the file: what a check before the run takes the lock leaves to the run (RunLock says who holds it)."""
    path = Path(folder) / LOCK_NAME
    if fcntl is None:
        return path.exists()
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing lets go of a shared lock taken here
    return False


class RunLock:
    """`with RunLock(folder):` holds the folder for this process; a UserError when another process holds it.

    `stale` is the holder recorded by a previous process that died without letting go (None otherwise).
    Creates the folder when needed and removes it again on release when the run left nothing in it.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.stale: dict | None = None
        self._fd: int | None = None
        self._created_folder = False

    def acquire(self) -> RunLock:
        if not self.folder.exists():
            self.folder.mkdir(parents=True, exist_ok=True)
            self._created_folder = True
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, file_mode())
            try:
                if fcntl is not None:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                holder = _describe(_read_holder(self.path))
                raise UserError(
                    f"output_dir {self.folder} is in use by another `autotune train` ({holder}): wait for it to "
                    "finish, or give this run another output_dir (--set output_dir=...)"
                ) from None
            # The holder before us may have removed the file between our open and our lock: then we hold a
            # lock on a name nobody else will open. Lock the file that is there now.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = _read_holder(self.path)
        if previous and previous.get("pid") != os.getpid():
            self.stale = previous
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started_at": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        # Unlink while still holding the lock, so no one can take over a name we are about to drop.
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None
        if self._created_folder:
            try:
                self.folder.rmdir()  # only when empty: a run that wrote nothing leaves nothing behind
            except OSError:
                pass

    def describe_stale(self) -> str | None:
        """A note for the console when a dead process's lock was taken over."""
        if self.stale is None:
            return None
        return f"note: took over the lock of a run that is no longer running ({_describe(self.stale)})"

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
