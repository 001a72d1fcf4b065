"""What one trial says: the shape it ran, whether it fit, its peak and its speed. Written by the measured step
(trial.py), read by the search (solve/), recorded in the profile. Importing this module must not import torch."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from autotune.techniques import Knobs
from autotune.units import GiB


@dataclass
class Trial:
    batch: int
    seq: int
    rank: int
    fits: bool  # ran, and its peak is inside the usable budget (budget less margin)
    oom: bool  # the step ran out of memory under the cap
    peak_bytes: int | None
    seconds: float  # wall time of the whole trial
    step_seconds: float | None  # mean of the optimizer steps after the first
    tokens_per_second: float | None
    predicted_bytes: int | None = None
    note: str = ""
    knobs: Knobs | None = None  # the techniques the step ran with (None: a synthetic trial that has none)
    memory: dict = field(default_factory=dict)  # the meter's details of the peak (CUDA: reserved, allocated)
    kind: str = "train"  # "train": optimizer steps; "eval": an evaluation step
    # False: the peak is the estimate's, not a measurement (FSDP's per-rank memory, which one process cannot run)
    measured: bool = True
    # The host memory the run would hold at this shape (estimate/run.py), and whether the host lacks it: planned
    # over the probed RAM (the step is then not run) or a host allocation failed in it (memory.HostOutOfMemory).
    host_bytes: int | None = None
    over_host_ram: bool = False

    @property
    def checkpointing(self) -> bool | None:
        return self.knobs.checkpointing if self.knobs else None

    def to_dict(self) -> dict:
        """The trial as a profile records it (its knobs as a dict of booleans)."""
        doc = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        doc["knobs"] = self.knobs.to_dict() if self.knobs else None
        doc["memory"] = dict(self.memory)
        return doc

    def describe(self, budget_bytes: int) -> str:
        peak = (
            f"{self.peak_bytes / GiB:7.3f} GiB ({self.peak_bytes / budget_bytes:5.1%})"
            if self.peak_bytes
            else "      -"
        )
        verdict = "fits" if self.fits else ("host RAM" if self.over_host_ram else "OOM" if self.oom else "over margin")
        if not self.measured:
            verdict += " (est.)"
        speed = f"{self.tokens_per_second:9.0f} tok/s" if self.tokens_per_second else ""
        knobs = f" {self.knobs.describe():<26}" if self.knobs else ""
        return (
            f"batch {self.batch:4d} x seq {self.seq:6d}  r={self.rank:<4d}{knobs} peak {peak}  {verdict:11s} "
            f"{self.seconds:6.1f}s {speed}"
        )
