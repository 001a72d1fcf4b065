"""The structured JSONL run log the guide describes: one JSON object per line with timestamp, level,
component, message and metrics (memory and model statistics where the config asks for them).

Every record carries its run's `run_id`: several runs may share one log file (the default path is relative to
the working directory, not to output_dir), and a resumed run keeps the id of the run it continues.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import TextIO

import psutil
import torch

from autotune.config import LOG_LEVELS
from autotune.fsutil import atomic_write_text
from autotune.units import gib

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no flock; records are then never dropped (see drop_records)
    fcntl = None  # type: ignore[assignment]

# The config's level names ranked as the logging module ranks them.
LEVELS = {name: logging.getLevelName(name) for name in LOG_LEVELS}


def memory_stats() -> dict:
    stats = {"process_rss_gb": gib(psutil.Process(os.getpid()).memory_info().rss)}
    if torch.cuda.is_available():
        stats["gpu_allocated_gb"] = gib(torch.cuda.memory_allocated())
        stats["gpu_reserved_gb"] = gib(torch.cuda.memory_reserved())
        stats["gpu_peak_reserved_gb"] = gib(torch.cuda.max_memory_reserved())
    return stats


class RunLog:
    """Appends records to a JSONL file (line-buffered, so a killed run keeps what it logged)."""

    def __init__(
        self, path: str | Path | None, level: str = "INFO", include_memory: bool = True, run_id: str | None = None
    ):
        self.path = Path(path) if path else None
        self.threshold = LEVELS[level]
        self.include_memory = include_memory
        self.run_id = run_id
        self._file: TextIO | None = None
        self._open()

    def _open(self) -> None:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            while True:
                # Open for the run's whole life, closed by close(): a record per line as it happens.
                f = open(self.path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115
                self._file = f
                if fcntl is None:
                    break
                # Shared: any number of runs may append; drop_records needs the file to itself. It may have
                # replaced the file between our open and our lock: then open the new one.
                fcntl.flock(f.fileno(), fcntl.LOCK_SH)
                if os.path.samestat(os.fstat(f.fileno()), os.stat(self.path)):
                    break
                f.close()

    def write(
        self, component: str, message: str, *, level: str = "INFO", metrics: dict | None = None, **fields
    ) -> None:
        if self._file is None or LEVELS[level] < self.threshold:
            return
        record = {
            "timestamp": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "level": level,
            "component": component,
            "message": message,
            "metrics": metrics or {},
            **fields,
        }
        if self.run_id is not None:
            record["run_id"] = self.run_id
        if self.include_memory:
            record["memory"] = memory_stats()
        self._file.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Let go of the file for a moment (drop_records needs it to itself), then append again."""
        self.close()
        try:
            yield
        finally:
            self._open()


def drop_records(path: str | Path, drop: Callable[[dict], bool]) -> int | None:
    """Rewrite a JSONL log without the records `drop` selects (atomically: a crash leaves the old file whole).

    Returns how many were dropped, or None when another run has the file open (its appends would go to the
    replaced file) or the platform cannot tell: then nothing is changed. Lines that are not JSON are kept.
    """
    path = Path(path)
    if fcntl is None or not path.is_file():
        return None if fcntl is None else 0
    with open(path, "r+", encoding="utf-8") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return None
        kept, dropped = [], 0
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if isinstance(record, dict) and drop(record):
                dropped += 1
            else:
                kept.append(line if line.endswith("\n") else line + "\n")
        if dropped:
            atomic_write_text(path, "".join(kept))
    return dropped
