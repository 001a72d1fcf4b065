"""The structured JSONL run log the guide describes: one JSON object per line with timestamp, level,
component, message and metrics (memory and model statistics where the config asks for them)."""

from __future__ import annotations

import json
import logging
import os
from datetime import datetime, timezone
from pathlib import Path

import psutil
import torch

from autotune.config import LOG_LEVELS
from autotune.units import gib

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

    def __init__(self, path: str | Path | None, level: str = "INFO", include_memory: bool = True):
        self.path = Path(path) if path else None
        self.threshold = LEVELS[level]
        self.include_memory = include_memory
        self._file = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Open for the run's whole life, closed by close(): a record per line as it happens.
            self._file = open(self.path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115

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
