"""Byte units and the memory budget: the one definition every module imports.

Budgets are GiB (2**30 bytes) wherever a user types one (`--max-memory-gb 16`, `max_memory_gb`), as
PyTorch and NVML report memory; everything inside autotune counts bytes. Importing this module must not
import torch.
"""

from __future__ import annotations

from dataclasses import dataclass

MiB = 2**20
GiB = 2**30

# The share of the budget a solver trial's peak must stay under: allocator rounding, a longer real
# sample than the trial's, the memory creeping up over hours. `--margin` changes it.
DEFAULT_MARGIN = 0.05

# What a CUDA process holds outside PyTorch's allocator: the context (~300-500 MiB on recent drivers, more
# with lazy module loading off) plus cuBLAS/cuBLASLt handles and workspaces. The meter measures it
# (memory.measure_cuda_overhead) and falls back on this where NVML cannot tell; the estimate adds it to a
# CUDA peak. Read off an H200 with CUDA 12/13 and lazy loading (bench/results/2026-11-27-NVIDIA-H200.json).
DEFAULT_CUDA_OVERHEAD_BYTES = 640 * MiB


def gib(nbytes: float | None, digits: int = 3) -> float | None:
    """Bytes as GiB, rounded for a report; None stays None."""
    return None if nbytes is None else round(nbytes / GiB, digits)


@dataclass(frozen=True)
class Budget:
    """What a step may use: the card's share the user gave, and the margin kept free under it."""

    total_bytes: int
    margin: float = DEFAULT_MARGIN

    def __post_init__(self) -> None:
        if self.total_bytes <= 0:
            raise ValueError(f"a memory budget must be positive, got {self.total_bytes} bytes")
        if not 0 <= self.margin < 1:
            raise ValueError(f"the margin is a fraction in [0, 1), got {self.margin}")

    @classmethod
    def from_gib(cls, gb: float, margin: float = DEFAULT_MARGIN) -> Budget:
        return cls(int(gb * GiB), margin)

    @property
    def usable_bytes(self) -> int:
        """The most a trial's measured peak may reach and still count as fitting."""
        return int(self.total_bytes * (1 - self.margin))

    @property
    def gb(self) -> float:
        return self.total_bytes / GiB

    def describe(self) -> str:
        return f"{self.gb:g} GiB less a {self.margin:.0%} margin"
