"""Atomic file writes: a reader (or a crash) never sees a half-written file, and files keep the umask."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask. POSIX can only read it by setting it, so set it back at once, under a lock (two
    threads reading it at the same moment would otherwise leave 0 behind)."""
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode open() would give a new file: 0666 less the umask."""
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    """The mode mkdir would give a new folder: 0777 less the umask."""
    return 0o777 & ~current_umask()


def apply_umask(path: str | os.PathLike) -> None:
    """Give a folder and everything in it the modes plain open()/mkdir would have given them.

    tempfile.mkstemp/mkdtemp create 0600/0700 (private until renamed), and some libraries write through
    them (safetensors saves an adapter 0600): files that outlive the run must be readable as the user's
    umask says, like every other file they write."""
    path = Path(path)
    fmode, dmode = file_mode(), dir_mode()
    if path.is_dir():
        for root, dirs, files in os.walk(path):
            for name in dirs:
                os.chmod(os.path.join(root, name), dmode)
            for name in files:
                os.chmod(os.path.join(root, name), fmode)
        os.chmod(path, dmode)
    elif path.exists():
        os.chmod(path, fmode)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside `path` durable (best effort: some filesystems cannot fsync a folder)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write to a temp file in the same directory, fsync, then rename over `path`. The file gets the mode a
    plain open() would give it (0666 less the umask), not mkstemp's 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding=encoding) as f:
            f.write(text)
            f.flush()
            os.fchmod(f.fileno(), file_mode())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def folder_bytes(path: str | os.PathLike) -> int:
    """The bytes of the files under `path` (0 when it does not exist)."""
    total = 0
    for root, _dirs, files in os.walk(os.fspath(path)):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except FileNotFoundError:  # removed while we walked
                pass
    return total


def free_bytes(path: str | os.PathLike) -> int:
    """Free bytes on the filesystem holding `path` (or its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free
