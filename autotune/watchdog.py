"""A memory watchdog: notices memory creeping up during a long run before it becomes an OOM.

The solver held every trial's peak (the allocator's reserved peak plus the CUDA context) to the usable part of
the budget: the budget less its margin. While training, after each optimizer step, the watchdog reads the
allocator again (reserved, allocated) and, once the footprint passes that same line, it warns once, in the log
and on the console, saying what grew since the run settled: the allocator's cache (fragmentation) or live
tensors (a leak, longer rows than solved for).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import TrainerCallback

from autotune.units import DEFAULT_MARGIN, Budget, GiB

# The first optimizer step creates the optimizer state; the footprint after the second is the settled one.
SETTLE_STEPS = 2


@dataclass(frozen=True)
class MemoryReading:
    reserved_bytes: int  # the allocator's reserved memory plus what the process holds outside it
    allocated_bytes: int  # live tensors


def read_memory() -> MemoryReading | None:
    """The CUDA allocator's figures now; None where there is no GPU (the CPU has no allocator to creep)."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    from autotune.memory import CudaMeter

    index = torch.cuda.current_device()
    global _OVERHEAD
    if _OVERHEAD is None:
        _OVERHEAD = CudaMeter(index).overhead_bytes
    return MemoryReading(torch.cuda.memory_reserved(index) + _OVERHEAD, torch.cuda.memory_allocated(index))


_OVERHEAD: int | None = None


def limit_for(profile: dict | None, budget_gb: float | None) -> tuple[int, str] | None:
    """The footprint past which the watchdog warns, and how to say where it comes from: the usable part of the
    budget (units.Budget: the budget less its margin), the very line the solve held every trial to; the profile's
    budget and margin where there is a profile, else max_memory_gb with the default margin."""
    constraints = (profile or {}).get("constraints") or {}
    gb, margin = constraints.get("max_memory_gb"), constraints.get("margin", DEFAULT_MARGIN)
    source = "the solved budget"
    if not isinstance(gb, (int, float)) or gb <= 0:
        gb, margin, source = budget_gb, DEFAULT_MARGIN, "max_memory_gb"
    if not gb:
        return None
    budget = Budget.from_gib(gb, margin)
    return budget.usable_bytes, f"{source}, {budget.describe()}"


def _gib(nbytes: int) -> str:
    return f"{nbytes / GiB:.2f} GiB"


class MemoryWatchdog(TrainerCallback):
    """Warns once when the footprint passes `limit_bytes`. `read` defaults to read_memory, looked up at each
    reading (a test without a GPU replaces that function: the readings are all it fakes)."""

    def __init__(
        self,
        limit_bytes: int,
        limit_source: str,
        warn: Callable[[str, dict], None],
        read: Callable[[], MemoryReading | None] | None = None,
    ):
        self.limit_bytes, self.limit_source = limit_bytes, limit_source
        self.warn, self._read = warn, read
        self.settled: MemoryReading | None = None
        self.warned = False

    def on_step_end(self, args, state, control, **kwargs):
        if self.warned:
            return
        now = (self._read or read_memory)()
        if now is None:
            return
        if self.settled is None or state.global_step <= SETTLE_STEPS:
            self.settled = now
        if now.reserved_bytes <= self.limit_bytes:
            return
        self.warned = True
        grew_reserved = now.reserved_bytes - self.settled.reserved_bytes
        grew_allocated = now.allocated_bytes - self.settled.allocated_bytes
        if grew_allocated > grew_reserved / 2:
            what = (
                f"live tensors grew by {_gib(grew_allocated)} (allocated {_gib(self.settled.allocated_bytes)} -> "
                f"{_gib(now.allocated_bytes)}): rows longer than the profile was solved for, or something kept "
                "alive from step to step"
            )
        else:
            what = (
                f"the allocator's cache grew by {_gib(grew_reserved)} while live tensors grew by "
                f"{_gib(grew_allocated)}: fragmentation; PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True "
                "avoids most of it"
            )
        message = (
            f"memory is creeping up: at step {state.global_step} the process holds {_gib(now.reserved_bytes)}, past "
            f"{self.limit_source} ({_gib(self.limit_bytes)}); {what}. An out-of-memory error may follow (autotune "
            "then halves the micro-batch); lower batch_size or max_sequence_length to be safe"
        )
        self.warn(
            message,
            {
                "reserved_bytes": now.reserved_bytes,
                "allocated_bytes": now.allocated_bytes,
                "settled_reserved_bytes": self.settled.reserved_bytes,
                "settled_allocated_bytes": self.settled.allocated_bytes,
                "limit_bytes": self.limit_bytes,
            },
        )
