"""Hardware probe: what GPUs CUDA will see, how much memory they have, and the host around them.

The probe must answer fast and on machines with no GPU at all, so nothing heavy (torch,
transformers, ...) is imported at module import time, and NVML failures become data in the
document instead of exceptions.
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import os
import platform
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from autotune.fsutil import atomic_write_json
from autotune.units import GiB, gib

SCHEMA_VERSION = 1
KIND = "autotune.probe"


# Distribution names, not module names: importlib.metadata reads them without importing anything.
_PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate")
# NVML bindings ship as `nvidia-ml-py` (official) or the older `pynvml` distribution.
_NVML_DISTS = ("nvidia-ml-py", "pynvml")


# --------------------------------------------------------------------------- small helpers


def _text(value: Any) -> Any:
    """Older pynvml versions return bytes for names, UUIDs and PCI bus ids."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return value


def _cuda_version_str(v: int | None) -> str | None:
    """NVML encodes CUDA versions as 1000*major + 10*minor (12040 -> "12.4")."""
    if v is None:
        return None
    return f"{v // 1000}.{(v % 1000) // 10}"


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- packages / torch


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def package_versions() -> dict[str, str | None]:
    versions = {name: _dist_version(name) for name in _PACKAGES}
    versions["nvidia-ml-py"] = next((v for v in map(_dist_version, _NVML_DISTS) if v is not None), None)
    return versions


def _cuda_from_torch_version_file() -> tuple[bool, str | None]:
    """Read `cuda = ...` from torch/version.py without importing torch (which takes seconds).

    Returns (found, value): found is False when torch is missing or the file is unreadable.
    """
    try:
        spec = importlib.util.find_spec("torch")  # top-level find_spec imports nothing
    except (ImportError, ValueError):
        return False, None
    if spec is None or not spec.origin:
        return False, None
    try:
        tree = ast.parse(Path(spec.origin).with_name("version.py").read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError):
        return False, None
    for node in tree.body:
        target, value = None, None
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
        elif isinstance(node, ast.AnnAssign):
            target, value = node.target, node.value
        if isinstance(target, ast.Name) and target.id == "cuda" and value is not None:
            try:
                cuda = ast.literal_eval(value)
            except ValueError:
                return False, None
            return True, cuda if isinstance(cuda, str) else None
    return False, None


def torch_cuda_build() -> str | None:
    """The CUDA version torch was built against ("12.4"), or None for CPU builds / no torch.

    Prefers an already-imported torch, then torch/version.py read as text; imports torch only
    as a last resort, since that costs seconds.
    """
    loaded = sys.modules.get("torch")
    if loaded is not None and hasattr(loaded, "version"):
        return getattr(loaded.version, "cuda", None)
    found, cuda = _cuda_from_torch_version_file()
    if found:
        return cuda
    if importlib.util.find_spec("torch") is None:
        return None
    try:
        import torch
    except (ImportError, OSError, RuntimeError):  # a broken torch install must not break the probe
        return None
    return getattr(torch.version, "cuda", None)


# --------------------------------------------------------------------------- host


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or None


def _existing_ancestor(path: str | Path) -> Path:
    """The output dir may not exist yet; its free space is that of the nearest existing parent."""
    p = Path(path).expanduser().absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def available_ram_bytes() -> int:
    """The host memory a new process can have now (psutil's `available`: free plus reclaimable cache)."""
    import psutil  # lazy: keeps `import autotune.hardware` cheap for the CLI's other commands

    return int(psutil.virtual_memory().available)


def probe_host(output_dir: str | Path = ".") -> dict[str, Any]:
    import psutil

    mem = psutil.virtual_memory()
    disk_path = _existing_ancestor(output_dir)
    try:
        disk_free = shutil.disk_usage(disk_path).free
    except OSError:
        disk_free = None
    return {
        "cpu_model": _cpu_model(),
        "cpu_physical_cores": psutil.cpu_count(logical=False),
        "cpu_logical_cores": psutil.cpu_count(logical=True),
        "ram_total_bytes": mem.total,
        "ram_available_bytes": mem.available,
        "ram_total_gb": gib(mem.total, 2),
        "ram_available_gb": gib(mem.available, 2),
        "disk_path": str(disk_path),
        "disk_free_bytes": disk_free,
        "disk_free_gb": gib(disk_free, 2),
        "os": platform.platform(),
        "python": platform.python_version(),
        "packages": package_versions(),
        "torch_cuda_build": torch_cuda_build(),
    }


# --------------------------------------------------------------------------- GPUs via NVML


class _GpuReader:
    """Runs NVML queries for one GPU, keeping the first NVMLError instead of raising it,
    so a single sick GPU never hides the healthy ones."""

    def __init__(self, nvml: Any, nvml_index: int):
        self.nvml = nvml
        self.errors: list[str] = []
        self.handle = self.query("handle", nvml.nvmlDeviceGetHandleByIndex, nvml_index)

    def query(self, what: str, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except self.nvml.NVMLError as err:
            self.errors.append(f"{what}: {err}")
            return None

    def device(self, what: str, fn_name: str) -> Any:
        if self.handle is None:
            return None
        return self.query(what, getattr(self.nvml, fn_name), self.handle)


def _other_processes(nvml: Any, handle: Any) -> list[dict[str, Any]] | None:
    # Not readable is routine (containers, permissions, unsupported), so it is None rather than
    # a GPU error: it says nothing about whether the GPU can train.
    if handle is None:
        return None
    try:
        procs = nvml.nvmlDeviceGetComputeRunningProcesses(handle)
    except nvml.NVMLError:
        return None
    # usedGpuMemory is None when the driver cannot tell (e.g. Windows WDDM).
    return [{"pid": p.pid, "used_bytes": getattr(p, "usedGpuMemory", None)} for p in procs]


def _read_gpu(nvml: Any, nvml_index: int) -> dict[str, Any]:
    r = _GpuReader(nvml, nvml_index)
    mem = r.device("memory", "nvmlDeviceGetMemoryInfo")
    pci = r.device("pci", "nvmlDeviceGetPciInfo")
    cc = r.device("compute capability", "nvmlDeviceGetCudaComputeCapability")
    total = getattr(mem, "total", None)
    free = getattr(mem, "free", None)
    return {
        "index": None,  # the CUDA index, assigned once visibility is resolved
        "nvml_index": nvml_index,
        "name": _text(r.device("name", "nvmlDeviceGetName")),
        "uuid": _text(r.device("uuid", "nvmlDeviceGetUUID")),
        "pci_bus_id": _text(getattr(pci, "busId", None)),
        "memory_total_bytes": total,
        "memory_free_bytes": free,
        "memory_used_bytes": getattr(mem, "used", None),
        "memory_total_gb": gib(total, 2),
        "memory_free_gb": gib(free, 2),
        "compute_capability": f"{cc[0]}.{cc[1]}" if cc else None,
        "bf16_supported": cc[0] >= 8 if cc else None,
        "other_processes": _other_processes(nvml, r.handle),
        "error": "; ".join(r.errors) or None,
    }


def _read_driver(nvml: Any) -> dict[str, str | None]:
    def call(*names: str) -> Any:
        for name in names:
            fn = getattr(nvml, name, None)
            if fn is None:
                continue
            try:
                return fn()
            except nvml.NVMLError:
                continue
        return None

    return {
        "version": _text(call("nvmlSystemGetDriverVersion")),
        "cuda": _cuda_version_str(call("nvmlSystemGetCudaDriverVersion_v2", "nvmlSystemGetCudaDriverVersion")),
    }


def _resolve_entry(entry: str, gpus: list[dict[str, Any]]) -> dict[str, Any] | None:
    """One CUDA_VISIBLE_DEVICES entry -> the physical GPU it names, or None if invalid."""
    if not entry:
        return None  # "" is a prefix of every UUID, but CUDA reads an empty entry as no device
    if entry.lstrip("+-").isdigit():
        n = int(entry)
        return next((g for g in gpus if g["nvml_index"] == n), None)
    # CUDA accepts full UUIDs or any unambiguous prefix of one ("GPU-8a3f").
    matches = [g for g in gpus if g["uuid"] and g["uuid"].lower().startswith(entry.lower())]
    return matches[0] if len(matches) == 1 else None


def visible_gpus(gpus: list[dict[str, Any]], cuda_visible: str | None) -> list[dict[str, Any]]:
    """Apply CUDA_VISIBLE_DEVICES (which NVML ignores) and number GPUs the way CUDA will.

    Integer entries are NVML (PCI bus) indices; CUDA numbers GPUs fastest-first unless
    CUDA_DEVICE_ORDER=PCI_BUS_ID, so on a machine with mixed GPU models use UUIDs or set that order.

    Like CUDA, parsing stops at the first entry that names no GPU (or repeats one): the GPUs
    listed before it stay visible, the rest are hidden.
    """
    if cuda_visible is None:
        chosen = list(gpus)
    else:
        chosen = []
        for raw in cuda_visible.split(","):
            gpu = _resolve_entry(raw.strip(), gpus)
            if gpu is None or any(gpu is c for c in chosen):
                break
            chosen.append(gpu)
    return [dict(g, index=i) for i, g in enumerate(chosen)]


def _load_nvml() -> Any:
    import pynvml  # lazy: only the probe needs it

    return pynvml


# pynvml's constants, with their values where an older binding lacks the name.
_P2P_READ, _P2P_NVLINK, _P2P_OK = (
    ("NVML_P2P_CAPS_INDEX_READ", 0),
    ("NVML_P2P_CAPS_INDEX_NVLINK", 2),
    ("NVML_P2P_STATUS_OK", 0),
)
# nvmlDeviceGetTopologyCommonAncestor's levels: the closest thing two GPUs share (nvidia-smi topo's words).
TOPOLOGY = {
    0: "same board",
    10: "one PCIe switch",
    20: "several PCIe switches",
    30: "one PCIe host bridge",
    40: "one NUMA node",
    50: "across NUMA nodes",
}


def _constant(nvml: Any, named: tuple[str, int]) -> int:
    return getattr(nvml, named[0], named[1])


def _optional(nvml: Any, name: str, *args: Any) -> Any:
    """An NVML query that a driver, a GPU or the binding may not support: None instead of an error."""
    fn = getattr(nvml, name, None)
    if fn is None:
        return None
    try:
        return fn(*args)
    except nvml.NVMLError:
        return None
    except (AttributeError, TypeError, ValueError):  # a binding whose function the driver library lacks
        return None


def _nvlink_links(nvml: Any, handle: Any) -> int | None:
    """Active NVLink links of one GPU; None when NVML cannot tell (no NVLink, or not supported)."""
    states = [
        _optional(nvml, "nvmlDeviceGetNvLinkState", handle, link)
        for link in range(getattr(nvml, "NVML_NVLINK_MAX_LINKS", 18))
    ]
    known = [s for s in states if s is not None]
    if not known:
        return None
    return sum(1 for s in known if s == getattr(nvml, "NVML_FEATURE_ENABLED", 1))


def _p2p(nvml: Any, a: Any, b: Any, index: tuple[str, int]) -> bool | None:
    status = _optional(nvml, "nvmlDeviceGetP2PStatus", a, b, _constant(nvml, index))
    return None if status is None else status == _constant(nvml, _P2P_OK)


def read_interconnect(nvml: Any, gpus: list[dict[str, Any]]) -> dict[str, Any]:
    """How the visible GPUs reach each other, as far as NVML says (each query optional: None = unknown):
    active NVLink links per GPU, and per pair whether peer-to-peer reads work, whether over NVLink, and the
    closest thing the two share on the PCIe/CPU topology. What DDP's all-reduce and FSDP's all-gathers run on."""
    handles = {g["index"]: _optional(nvml, "nvmlDeviceGetHandleByIndex", g["nvml_index"]) for g in gpus}
    links = {str(i): (_nvlink_links(nvml, h) if h is not None else None) for i, h in handles.items()}
    pairs = []
    indexes = sorted(handles)
    for n, i in enumerate(indexes):
        for j in indexes[n + 1 :]:
            a, b = handles[i], handles[j]
            known = a is not None and b is not None
            level = _optional(nvml, "nvmlDeviceGetTopologyCommonAncestor", a, b) if known else None
            pairs.append(
                {
                    "gpus": [i, j],
                    "p2p": _p2p(nvml, a, b, _P2P_READ) if known else None,
                    "nvlink": _p2p(nvml, a, b, _P2P_NVLINK) if known else None,
                    "topology": TOPOLOGY.get(level) if isinstance(level, int) else None,
                }
            )
    return {"nvlink_active_links": links, "pairs": pairs}


def probe_gpus(nvml: Any = None) -> tuple[list[dict[str, Any]], dict[str, Any], str | None, dict[str, Any] | None]:
    """(visible gpus, driver info, nvml_error, interconnect of the visible gpus). Never raises for NVML problems."""
    driver: dict[str, Any] = {"version": None, "cuda": None}
    if nvml is None:
        try:
            nvml = _load_nvml()
        except ImportError as err:
            return [], driver, f"NVML Python bindings not installed (nvidia-ml-py): {err}", None
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as err:
        return [], driver, str(err), None
    try:
        driver = _read_driver(nvml)
        try:
            count = nvml.nvmlDeviceGetCount()
        except nvml.NVMLError as err:
            return [], driver, str(err), None
        physical = [_read_gpu(nvml, i) for i in range(count)]
        visible = visible_gpus(physical, os.environ.get("CUDA_VISIBLE_DEVICES"))
        interconnect = read_interconnect(nvml, visible) if len(visible) > 1 else None
    finally:
        try:
            nvml.nvmlShutdown()
        except nvml.NVMLError:
            pass  # the data is already read; a failing shutdown must not lose it
    return visible, driver, None, interconnect


# --------------------------------------------------------------------------- public API


def probe(output_dir: str | Path = ".", nvml: Any = None) -> dict[str, Any]:
    """Describe the GPUs CUDA will see and the host, as one versioned JSON-able document."""
    gpus, driver, nvml_error, interconnect = probe_gpus(nvml)
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": KIND,
        "created_at": _now_iso(),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "gpus": gpus,
        "driver": driver,
        "host": probe_host(output_dir),
        "nvml_error": nvml_error,
        # Between the visible GPUs (None with fewer than two): NVLink, peer-to-peer, PCIe/NUMA topology.
        "interconnect": interconnect,
    }


def training_gpu(doc: dict[str, Any]) -> dict[str, Any] | None:
    """The GPU training runs on: CUDA device 0, if any is visible. The one answer to "which GPU counts":
    the budget, the preflight checks, the profile's fingerprint and the benchmarks all ask this."""
    return next((g for g in doc.get("gpus") or [] if g.get("index") == 0), None)


def save_probe(doc: dict[str, Any], path: str | Path) -> Path:
    return atomic_write_json(path, doc)


# --------------------------------------------------------------------------- rendering


def _fmt(value: Any, spec: str = "") -> str:
    return "?" if value is None else format(value, spec)


def _fmt_procs(procs: list[dict[str, Any]] | None) -> str:
    if procs is None:
        return "unknown"
    if not procs:
        return "none"
    used = [p["used_bytes"] for p in procs if p.get("used_bytes") is not None]
    return f"{len(procs)} ({sum(used) / GiB:.2f} GiB)" if used else str(len(procs))


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

    return [line(headers), line(["-" * w for w in widths]), *map(line, rows)]


def _no_gpu_line(doc: dict[str, Any]) -> str:
    if doc.get("nvml_error"):
        return f"No NVIDIA GPU available: {doc['nvml_error']} (no driver, or no GPU on this machine)"
    cvd = doc.get("cuda_visible_devices")
    if cvd is not None:
        return f"No NVIDIA GPU visible to CUDA: CUDA_VISIBLE_DEVICES={cvd!r} hides every GPU"
    return "No NVIDIA GPU available: the driver reports zero devices"


def _gpu_lines(doc: dict[str, Any]) -> list[str]:
    gpus = doc.get("gpus") or []
    if not gpus:
        return [_no_gpu_line(doc)]
    headers = ["CUDA", "NVML", "Name", "Total GiB", "Free GiB", "Used GiB", "CC", "bf16", "Other processes"]
    rows = [
        [
            str(g["index"]),
            str(g["nvml_index"]),
            _fmt(g.get("name")),
            _fmt(g.get("memory_total_gb"), ".2f"),
            _fmt(g.get("memory_free_gb"), ".2f"),
            _fmt(gib(g.get("memory_used_bytes"), 2), ".2f"),
            _fmt(g.get("compute_capability")),
            {True: "yes", False: "no"}.get(g.get("bf16_supported"), "?"),
            _fmt_procs(g.get("other_processes")),
        ]
        for g in gpus
    ]
    lines = _table(headers, rows)
    lines += [f"  GPU {g['index']} error: {g['error']}" for g in gpus if g.get("error")]
    return lines + _interconnect_lines(doc.get("interconnect"))


def _interconnect_lines(interconnect: dict[str, Any] | None) -> list[str]:
    if not interconnect:
        return []
    links = interconnect.get("nvlink_active_links") or {}
    lines = ["Interconnect"]
    for pair in interconnect.get("pairs") or []:
        i, j = pair["gpus"]
        if pair.get("nvlink"):
            how = f"NVLink ({_fmt(links.get(str(i)))} / {_fmt(links.get(str(j)))} active links)"
        elif pair.get("nvlink") is False:
            how = "no NVLink"
        else:
            how = "NVLink unknown"
        p2p = {True: "P2P ok", False: "no P2P"}.get(pair.get("p2p"), "P2P unknown")
        where = pair.get("topology") or "topology unknown"
        lines.append(f"  GPU {i} <-> GPU {j}: {how}, {p2p}, {where}")
    return lines


def _host_lines(host: dict[str, Any]) -> list[str]:
    pkgs = host.get("packages") or {}
    fields = [
        (
            "CPU",
            f"{_fmt(host.get('cpu_model'))} ({_fmt(host.get('cpu_physical_cores'))} "
            f"physical / {_fmt(host.get('cpu_logical_cores'))} logical cores)",
        ),
        (
            "RAM",
            f"{_fmt(host.get('ram_available_gb'), '.2f')} GiB available of {_fmt(host.get('ram_total_gb'), '.2f')} GiB",
        ),
        ("Disk", f"{_fmt(host.get('disk_free_gb'), '.2f')} GiB free at {host.get('disk_path')}"),
        ("OS", _fmt(host.get("os"))),
        ("Python", _fmt(host.get("python"))),
        ("torch CUDA", host.get("torch_cuda_build") or "none (CPU-only build or no torch)"),
        ("Packages", ", ".join(f"{k} {v or 'not installed'}" for k, v in pkgs.items())),
    ]
    width = max(len(k) for k, _ in fields)
    return ["Host"] + [f"  {k.ljust(width)}  {v}" for k, v in fields]


def render_table(doc: dict[str, Any]) -> str:
    """Plain-text report: GPU table (or one line saying why there is none), driver, host."""
    driver = doc.get("driver") or {}
    lines = ["GPUs", *_gpu_lines(doc), ""]
    lines.append(f"Driver: {driver.get('version') or 'n/a'}   CUDA (driver): {driver.get('cuda') or 'n/a'}")
    lines += ["", *_host_lines(doc.get("host") or {})]
    return "\n".join(lines) + "\n"
