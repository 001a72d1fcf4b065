"""Memory meters: how many bytes a training step needs, on a GPU or simulated on the CPU.

One interface, two meters:

- `CudaMeter` reads PyTorch's caching allocator and enforces a budget with
  `torch.cuda.set_per_process_memory_fraction`, so a trial that would not fit the user's budget fails with a
  real `torch.OutOfMemoryError` even on a bigger card.
- `CpuTrackedMeter` counts live tensor storages with a `TorchDispatchMode` and raises `SimulatedOOM` (a
  `torch.OutOfMemoryError`) from inside the op that crosses the cap, so the solver's OOM handling is exercised
  the same way without a GPU. It works under `FakeTensorMode` too (storages are keyed by identity, not by
  address), which is how the tests trace models that do not fit in RAM (tests/trace.py).

Small functions, one concern each, in the manner of accelerate's `utils/memory.py`. No transformers import.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import math
import os
import threading
import weakref
from abc import ABC, abstractmethod
from collections.abc import Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from autotune.units import DEFAULT_CUDA_OVERHEAD_BYTES, GiB, MiB

# Device-wide usage above this is taken to include other processes (see overhead_from_device_usage).
MAX_PLAUSIBLE_OVERHEAD_BYTES = 2 * GiB


class SimulatedOOM(torch.OutOfMemoryError):
    """Raised by the CPU meter when live tensor bytes exceed its cap.

    A subclass of `torch.OutOfMemoryError`, so the `except torch.OutOfMemoryError` that handles a real CUDA
    OOM handles this one too.
    """


class HostOutOfMemory(torch.OutOfMemoryError):
    """Host memory ran out where a technique keeps tensors there (offloaded activations, the host embedding's
    rows): a failed pinned allocation is a RuntimeError in torch, not an OOM. Raised as an OutOfMemoryError so that
    a solver trial records the combination as not fitting and training's OOM recovery shrinks the micro-batch
    (which shrinks what goes to the host), with a message that names host RAM."""


# torch's allocation, named here so that a test can make it fail as a host out of RAM would (tests/test_trust.py).
_host_empty = torch.empty


def host_empty(shape, dtype: torch.dtype, *, pinned: bool, what: str) -> torch.Tensor:
    """An empty host tensor (page-locked where `pinned`, for asynchronous copies to and from a GPU) for `what`;
    HostOutOfMemory where the host cannot give it."""
    try:
        return _host_empty(shape, dtype=dtype, device="cpu", pin_memory=pinned)
    except RuntimeError as exc:
        if isinstance(exc, torch.OutOfMemoryError):
            raise
        nbytes = math.prod(shape) * dtype.itemsize
        kind = "page-locked (pinned) " if pinned else ""
        raise HostOutOfMemory(
            f"host RAM: cannot allocate {nbytes / MiB:.1f} MiB of {kind}host memory for {what} "
            f"({str(exc).splitlines()[0][:200]}); free host memory, or switch off the technique that keeps it there"
        ) from exc


# --------------------------------------------------------------------------------- interface


class MemoryMeter(ABC):
    """Measures and caps the memory of a region of code (a solver trial, a training step)."""

    device: str  # "cuda" | "cpu"

    @abstractmethod
    def cap(self, budget_bytes: int | None) -> None:
        """Make allocations beyond `budget_bytes` raise an OOM; None removes the cap."""

    @abstractmethod
    def reset_peak(self) -> None:
        """Start a new peak measurement from the bytes held now."""

    @abstractmethod
    def peak_bytes(self) -> int:
        """Peak since `reset_peak`, as the user's device would see it."""

    @abstractmethod
    def current_bytes(self) -> int:
        """Bytes of live tensors now."""

    def details(self) -> dict:
        """What the peak is made of, for the record (the estimate's validation reads it): {} by default."""
        return {}

    def __enter__(self) -> MemoryMeter:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def cleanup(self) -> None:
        """Release what a finished or failed trial left behind (free_memory)."""
        free_memory()


def free_memory() -> None:
    """The one cleanup, so the next model, trial or attempt starts from what is really live: once the device has
    finished its queued work, accelerate's clear_device_cache with garbage collection (an OOM's traceback frames
    hold activations in reference cycles, which only the cycle collector frees; then the allocator's cached
    blocks go back to the device), and on the host the freed heap pages go back to the OS (glibc keeps them
    mapped, so RSS would stay high after a big failed trial and a leak check on RSS would see caching)."""
    from accelerate.utils.memory import clear_device_cache

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    clear_device_cache(garbage_collection=True)
    release_host_memory()


# --------------------------------------------------------------------------------- CUDA


def allocator_fraction(budget_bytes: int, overhead_bytes: int, total_bytes: int) -> float:
    """The fraction of the card to give PyTorch's allocator so that allocator + overhead stays in budget.

    The budget is what the user's card offers the whole process; the CUDA context and library workspaces
    (overhead) live outside the allocator, so the allocator gets the rest. Clamped to [0, 1]: a budget
    below the overhead leaves nothing (every allocation fails), one above the card is the whole card.
    """
    if total_bytes <= 0:
        raise ValueError(f"total device memory must be positive, got {total_bytes}")
    return min(1.0, max(0.0, (budget_bytes - overhead_bytes) / total_bytes))


def merge_alloc_conf(current: str | None, setting: str = "expandable_segments:True") -> str:
    """Add `setting` to an allocator config string, replacing an earlier value of the same key."""
    key = setting.split(":", 1)[0]
    parts = [p for p in (current or "").split(",") if p.strip() and p.split(":", 1)[0].strip() != key]
    return ",".join(parts + [setting])


def ensure_expandable_segments() -> bool:
    """Ask PyTorch's CUDA allocator for expandable segments, which avoid most fragmentation (so the peak
    we measure is the peak the tensors need, not an artefact of block splitting).

    The allocator reads its config once, at the first CUDA allocation: call this before anything touches
    CUDA. Returns False (and changes nothing) when CUDA is already initialised.
    """
    if torch.cuda.is_initialized():
        return False
    # The CUDA allocator reads PYTORCH_CUDA_ALLOC_CONF first and falls back to PYTORCH_ALLOC_CONF; other
    # allocators read PYTORCH_ALLOC_CONF. Keep whatever else either already says.
    cuda_conf = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", os.environ.get("PYTORCH_ALLOC_CONF"))
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = merge_alloc_conf(cuda_conf)
    if "PYTORCH_ALLOC_CONF" in os.environ:
        os.environ["PYTORCH_ALLOC_CONF"] = merge_alloc_conf(os.environ["PYTORCH_ALLOC_CONF"])
    return True


def _nvml_process_used_bytes(index: int) -> int | None:
    """GPU memory NVML charges to this process on CUDA device `index`, or None if it cannot tell."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return None
    try:
        handle = _nvml_handle(pynvml, index)
        if handle is None:
            return None
        procs = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
        used = [p.usedGpuMemory for p in procs if p.pid == os.getpid()]
        return used[0] if used and used[0] is not None else None
    except pynvml.NVMLError:
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass


def _nvml_handle(pynvml, index: int):
    """NVML numbers GPUs physically and ignores CUDA_VISIBLE_DEVICES, so match by UUID."""
    uuid = str(getattr(torch.cuda.get_device_properties(index), "uuid", "") or "")
    for candidate in (uuid, f"GPU-{uuid}"):
        if not candidate or candidate == "GPU-":
            continue
        try:
            return pynvml.nvmlDeviceGetHandleByUUID(candidate)
        except pynvml.NVMLError:
            continue
    return None


def overhead_from_device_usage(total: int, free: int, reserved: int) -> int | None:
    """The overhead read off device-wide usage (total - free - reserved), which also counts every other
    process on the card: believed only when small enough to be ours alone, else None."""
    used = total - free - reserved
    return used if 0 <= used <= MAX_PLAUSIBLE_OVERHEAD_BYTES else None


def measure_cuda_overhead(index: int = 0) -> int:
    """Bytes this process holds on the GPU outside PyTorch's allocator (context, cuBLAS handles).

    Initialises CUDA and runs one small matmul first so the cuBLAS handle and workspace exist, since a
    training step will create them anyway. Sources, best first: NVML's figure for our pid (invisible from
    inside a container's pid namespace), the device-wide usage when it is plausibly ours alone,
    DEFAULT_CUDA_OVERHEAD_BYTES.
    """
    with torch.cuda.device(index):
        a = torch.ones(64, 64, device=f"cuda:{index}")
        (a @ a).sum().item()
        del a
        torch.cuda.synchronize(index)
    reserved = torch.cuda.memory_reserved(index)
    used = _nvml_process_used_bytes(index)
    if used is not None:
        return max(0, used - reserved)
    free, total = torch.cuda.mem_get_info(index)
    device_wide = overhead_from_device_usage(total, free, reserved)
    return DEFAULT_CUDA_OVERHEAD_BYTES if device_wide is None else device_wide


class CudaMeter(MemoryMeter):
    """The caching allocator's numbers plus the process's non-allocator overhead."""

    device = "cuda"

    def __init__(self, index: int = 0, overhead_bytes: int | None = None):
        self.index = index
        self._overhead = overhead_bytes

    @property
    def overhead_bytes(self) -> int:
        if self._overhead is None:
            self._overhead = measure_cuda_overhead(self.index)
        return self._overhead

    def remeasure_overhead(self) -> int:
        """Measure again and keep the larger figure: lazily loaded kernels grow the context during the first
        real step, so a measurement after a warm-up step is the more honest one."""
        self._overhead = max(self._overhead or 0, measure_cuda_overhead(self.index))
        return self._overhead

    def total_bytes(self) -> int:
        return torch.cuda.get_device_properties(self.index).total_memory

    def cap(self, budget_bytes: int | None) -> None:
        fraction = (
            1.0 if budget_bytes is None else allocator_fraction(budget_bytes, self.overhead_bytes, self.total_bytes())
        )
        torch.cuda.set_per_process_memory_fraction(fraction, self.index)

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.index)

    def peak_bytes(self) -> int:
        # Reserved, not allocated: cached-but-free blocks are memory the card no longer has for others.
        return torch.cuda.max_memory_reserved(self.index) + self.overhead_bytes

    def current_bytes(self) -> int:
        return torch.cuda.memory_allocated(self.index)

    def details(self) -> dict:
        """The peak's parts: the allocator's reserved and allocated peaks and the overhead outside it."""
        return {
            "max_reserved_bytes": torch.cuda.max_memory_reserved(self.index),
            "max_allocated_bytes": torch.cuda.max_memory_allocated(self.index),
            "overhead_bytes": self.overhead_bytes,
        }


# --------------------------------------------------------------------------------- CPU


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """glibc, where it is the C library (malloc_trim and mallopt are its own: musl and macOS have neither)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim  # noqa: B018
        libc.mallopt  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


def release_host_memory() -> bool:
    """Return freed heap memory to the OS (glibc `malloc_trim`). False where there is no glibc."""
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


# mallopt's parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def reuse_freed_host_memory() -> bool:
    """Where the CPU is the training device: keep freed host memory in the process for the next allocation.

    glibc serves every allocation over 32 MiB (the tiny Qwen3's logits: 117 MB a micro-batch of the demo) with a
    mapping of its own and unmaps it at free, so every step faults its largest tensors in again, page by page: on
    the demo that was 40% of a step, in the kernel. Served from the heap instead, and the heap not trimmed at every
    free, a step reuses the pages the last one freed (the demo's steps: 1.7x faster; bench/overhead_bench.py).
    free_memory() still gives the memory back between trials (malloc_trim). False where there is no glibc."""
    libc = _glibc()
    if libc is None:
        return False
    libc.mallopt(_M_MMAP_MAX, 0)
    libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    return True


class _StorageRef(weakref.ref):
    """A weak reference to a storage that remembers what we counted for it. Cheaper than
    `weakref.finalize` (no global registry, no atexit hook), which matters at thousands of ops per step."""

    __slots__ = ("key", "nbytes")
    key: int
    nbytes: int

    def __new__(cls, storage, callback, key: int, nbytes: int):
        self = super().__new__(cls, storage, callback)
        self.key, self.nbytes = key, nbytes
        return self

    def __init__(self, storage, callback, key: int, nbytes: int):
        super().__init__(storage, callback)  # type: ignore[call-arg]  # weakref.ref takes (object, callback)


class _StorageTracker(TorchDispatchMode):
    """Counts the bytes of live tensor storages created while the mode is active.

    Each storage is counted once, keyed by its StorageImpl (`_cdata`): views share their base's storage,
    in-place ops return an existing one, and fake/meta storages (all at address 0) stay distinct. A
    weak reference on the storage subtracts its bytes when the last tensor using it dies, wherever
    that happens (inside or outside the mode, in the autograd engine, during gc).
    """

    def __init__(self, meter: CpuTrackedMeter):
        super().__init__()
        self.meter = meter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        meter = self.meter
        if _HOST.depth:  # host memory (see host_memory): not the device's
            return out
        if isinstance(out, torch.Tensor):  # fast path: most ops return one tensor
            meter._track(out)
        else:
            for leaf in tree_leaves(out):
                if isinstance(leaf, torch.Tensor):
                    meter._track(leaf)
        if meter._cap is not None and meter._live > meter._cap:
            live = meter._live
            # Drop our reference first: the traceback keeps this frame alive, and with it `out`.
            del out, args, kwargs
            raise SimulatedOOM(
                f"Simulated CUDA out of memory: {live / MiB:.1f} MiB live exceeds the cap of "
                f"{meter._cap / MiB:.1f} MiB (while running {func})"
            )
        return out


class _HostDepth(threading.local):
    depth = 0


_HOST = _HostDepth()
HOST_TENSOR = "_autotune_host"  # set on a tensor that lives in host memory for good (a table kept on the CPU)


@contextlib.contextmanager
def host_memory():
    """Tensors created inside live in host (CPU) memory, not on the device: offloaded activations, copies
    parked for backward. On a GPU this says nothing (they are CPU tensors already); on the CPU, where the
    tracked meter stands in for a GPU, it keeps them out of the count, as a GPU's allocator would."""
    _HOST.depth += 1
    try:
        yield
    finally:
        _HOST.depth -= 1


def module_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    """Every tensor a module holds on its device: parameters, buffers, and the quantization state that
    bitsandbytes keeps beside a k-bit weight (absmax, code books, row scales; not registered as parameters or
    buffers). Tensors marked HOST_TENSOR live in host memory and are left out."""
    tensors = [t for t in (*module.parameters(), *module.buffers()) if not getattr(t, HOST_TENSOR, False)]
    for param in module.parameters():
        # Int8Params keeps CB (the int8 weight, same storage) and SCB (fp32 row scales) as attributes.
        tensors.extend(v for v in vars(param).values() if isinstance(v, torch.Tensor))
        tensors.extend(_quant_state_tensors(getattr(param, "quant_state", None)))
    return tensors


def _quant_state_tensors(state) -> list[torch.Tensor]:
    """The tensors of a bitsandbytes QuantState, nested state (double quantization) included. Duck-typed,
    so bitsandbytes is never imported here."""
    if state is None or not hasattr(state, "__dict__"):
        return []
    found = [v for v in vars(state).values() if isinstance(v, torch.Tensor)]
    return found + _quant_state_tensors(getattr(state, "state2", None))


class CpuTrackedMeter(MemoryMeter):
    """Counts tensor storage bytes of CPU (or fake) tensors; simulates a card with `cap` bytes.

    Only tensors created inside `with meter:` or registered with `track_existing` are counted: register the
    model's parameters and buffers so the peak includes the weights, as it would on a GPU.
    """

    device = "cpu"

    def __init__(self):
        self._live = 0
        self._peak = 0
        self._cap: int | None = None
        self._refs: dict[int, _StorageRef] = {}  # StorageImpl address -> weak ref carrying its bytes
        # Storages of host tensors (HOST_TENSOR) seen by track_existing: never counted, whatever op later takes a
        # view of them inside the meter (a table's rows sliced to quantize, a state_dict's detach).
        self._host: dict[int, weakref.ref] = {}
        self._mode = _StorageTracker(self)
        self._depth = 0

    # -- bookkeeping

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self._host:
            return
        ref = self._refs.get(key)
        if ref is None:
            nbytes = storage.nbytes()
            if nbytes == 0:
                return
            self._refs[key] = _StorageRef(storage, self._release, key, nbytes)
            self._live += nbytes
        else:
            nbytes = storage.nbytes()
            if nbytes == ref.nbytes:
                return
            self._live += nbytes - ref.nbytes  # resized in place (resize_, out= ops)
            ref.nbytes = nbytes
        if self._live > self._peak:
            self._peak = self._live

    def _release(self, ref: _StorageRef) -> None:
        # Called by the weakref machinery when the storage dies, from whatever thread frees it.
        if self._refs.pop(ref.key, None) is not None:
            self._live -= ref.nbytes

    def track_existing(self, tensors: torch.nn.Module | torch.Tensor | Iterable[torch.Tensor]) -> int:
        """Count tensors created outside the meter (model parameters and buffers, inputs).

        Returns the bytes newly counted. Raises SimulatedOOM if the cap is already exceeded, as loading a
        model too big for the card would.
        """
        if isinstance(tensors, torch.nn.Module):
            for host in (*tensors.parameters(), *tensors.buffers()):
                if getattr(host, HOST_TENSOR, False):
                    self._mark_host(host)
            tensors = module_tensors(tensors)
        elif isinstance(tensors, torch.Tensor):
            tensors = [tensors]
        before = self._live
        for t in tensors:
            self._track(t)
        if self._cap is not None and self._live > self._cap:
            raise SimulatedOOM(
                f"Simulated CUDA out of memory: the tracked tensors alone take "
                f"{self._live / MiB:.1f} MiB, over the cap of {self._cap / MiB:.1f} MiB"
            )
        return self._live - before

    def _mark_host(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key not in self._host:

            def forget(_ref: weakref.ref, key: int = key) -> None:
                self._host.pop(key, None)

            self._host[key] = weakref.ref(storage, forget)

    # -- MemoryMeter

    def cap(self, budget_bytes: int | None) -> None:
        self._cap = budget_bytes

    def reset_peak(self) -> None:
        self._peak = self._live

    def peak_bytes(self) -> int:
        return self._peak

    def current_bytes(self) -> int:
        return self._live

    def __enter__(self) -> CpuTrackedMeter:
        if self._depth == 0:
            self._mode.__enter__()
        self._depth += 1
        return self

    def __exit__(self, *exc) -> None:
        self._depth -= 1
        if self._depth == 0:
            self._mode.__exit__(*exc)


def make_meter(device: str) -> MemoryMeter:
    """ "cuda", "cuda:N" -> CudaMeter; "cpu" -> CpuTrackedMeter."""
    kind, _, index = str(device).partition(":")
    if kind == "cuda":
        return CudaMeter(int(index) if index else 0)
    if kind == "cpu":
        return CpuTrackedMeter()
    raise ValueError(f"no memory meter for device {device!r}: use 'cuda', 'cuda:N' or 'cpu'")
