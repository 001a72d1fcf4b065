"""The structured JSONL run log the guide describes: one JSON object per line with timestamp, level,
component, message and metrics (memory and model statistics where the config asks for them)."""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path

import psutil

LEVELS = {"DEBUG": 10, "INFO": 20, "WARNING": 30, "ERROR": 40}


def memory_stats() -> dict:
    stats = {"process_rss_gb": round(psutil.Process(os.getpid()).memory_info().rss / 2**30, 3)}
    try:
        import torch

        if torch.cuda.is_available():
            stats["gpu_allocated_gb"] = round(torch.cuda.memory_allocated() / 2**30, 3)
            stats["gpu_reserved_gb"] = round(torch.cuda.memory_reserved() / 2**30, 3)
            stats["gpu_peak_reserved_gb"] = round(torch.cuda.max_memory_reserved() / 2**30, 3)
    except ImportError:  # pragma: no cover
        pass
    return stats


class RunLog:
    """Appends records to a JSONL file (line-buffered, so a killed run keeps what it logged)."""

    def __init__(self, path: str | Path | None, level: str = "INFO", include_memory: bool = True):
        self.path = Path(path) if path else None
        self.threshold = LEVELS[level]
        self.include_memory = include_memory
        self._file = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8", buffering=1)

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
        if self.include_memory:
            record["memory"] = memory_stats()
        self._file.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
