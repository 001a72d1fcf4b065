"""Checks of a config against the machine (the guide's --validate-hardware-only), and dependency checks.

Each finding says what is wrong and what to change. `error` findings stop a run; `warning` ones do not.
"""

from __future__ import annotations

import importlib.util
import shlex
import subprocess
import sys
from dataclasses import dataclass

from autotune.config import Config
from autotune.errors import UserError
from autotune.hardware import training_gpu

# Room the output needs at least: an adapter, a few checkpoints with optimizer state, logs.
MIN_FREE_DISK_GB = 2.0


@dataclass(frozen=True)
class Finding:
    level: str  # "error" | "warning" | "ok"
    message: str


def check_run_config(cfg: Config) -> None:
    """The refusals of a run's config that need neither a model nor torch, as one UserError: the techniques this
    model takes (techniques.resolve), the data folder and a tokenizer folder that must exist, and the data's
    question/answer markers (an empty separator, a regex that does not compile). `autotune train` runs it before anything starts and `autotune validate` runs it too, so what
    train refuses by these, validate refuses. (The Trainer's names, optimizer, scheduler and report_to, are checked
    by train before it starts: their lists live in transformers, which validate does not import.)"""
    from autotune.catalog import resolve_model
    from autotune.data.parsing import Markers, check_data_dir, check_markers
    from autotune.techniques import resolve
    from autotune.tokenizer import check_tokenizer_dir

    if not cfg.dataset_name:
        check_data_dir(cfg.data_dir)
        check_markers(Markers.of(cfg))
    if cfg.tokenizer_name:
        check_tokenizer_dir(cfg.tokenizer_name)
    check_run_folders(cfg)
    resolve(cfg, resolve_model(cfg.model_name))


def check_run_folders(cfg: Config) -> None:
    """The folders a run writes into (output_dir, its logs, TensorBoard's, the JSONL log's, the data cache) must be
    folders or not exist yet: a file at one of them, or above one, is a UserError naming it, said before anything
    starts (the run would stop with "Not a directory" once set up)."""
    from pathlib import Path

    from autotune.trackers import reports_to_tensorboard

    folders = {"output_dir": cfg.output_dir, "log_dir": cfg.log_dir, "data_cache_dir": cfg.data_cache_dir}
    if reports_to_tensorboard(cfg):
        folders["tensorboard_log_dir"] = cfg.tensorboard_log_dir or str(Path(cfg.log_dir) / "tensorboard")
    if cfg.structured_logging.enabled:
        folders["structured_logging.log_file's folder"] = str(Path(cfg.structured_logging.log_file).parent)
    for key, folder in folders.items():
        path = Path(folder).expanduser()
        for at in (path, *path.parents):
            if at.exists():
                if not at.is_dir():
                    where = "is a file" if at == path else f"is under {at}, which is a file"
                    raise UserError(f"{key} {folder!r} {where}, not a folder. Fix: point {key} at a folder.")
                break


def check_hardware(cfg: Config, probe: dict) -> list[Finding]:
    found: list[Finding] = []
    gpu = training_gpu(probe)
    if gpu is None:
        reason = probe.get("nvml_error") or "no GPU visible"
        found.append(
            Finding(
                "warning",
                f"no usable NVIDIA GPU ({reason}): training would run on the CPU, which suits only the tiny demo model",
            )
        )
    elif gpu.get("error"):
        found.append(
            Finding(
                "warning",
                f"GPU {gpu.get('index')} ({gpu.get('name')}) could not be fully read "
                f"({gpu['error']}): max_memory_gb and bf16 are not checked against it",
            )
        )
    else:
        total, free = gpu["memory_total_gb"], gpu["memory_free_gb"]
        if cfg.max_memory_gb is not None:
            if cfg.max_memory_gb > total:
                found.append(
                    Finding(
                        "error",
                        f"max_memory_gb {cfg.max_memory_gb} exceeds GPU {gpu['index']} "
                        f"({gpu['name']}) total of {total:.1f} GiB: set max_memory_gb <= {total:.1f} (the margin is "
                        "kept inside it)",
                    )
                )
            elif cfg.max_memory_gb > free:
                found.append(
                    Finding(
                        "warning",
                        f"max_memory_gb {cfg.max_memory_gb} exceeds the {free:.1f} GiB free "
                        f"on GPU {gpu['index']} now: other processes hold memory; free it "
                        f"or set max_memory_gb <= {free:.1f} (the margin is kept inside it)",
                    )
                )
            else:
                found.append(
                    Finding(
                        "ok",
                        f"max_memory_gb {cfg.max_memory_gb} fits GPU {gpu['index']} "
                        f"({free:.1f} of {total:.1f} GiB free)",
                    )
                )
        if cfg.bf16 and not gpu.get("bf16_supported"):
            found.append(
                Finding(
                    "error",
                    f"bf16 is on but {gpu['name']} (compute capability "
                    f"{gpu.get('compute_capability')}) has no bf16: set bf16=false, fp16=true",
                )
            )
    disk = probe.get("host", {}).get("disk_free_gb")
    if disk is not None and disk < MIN_FREE_DISK_GB:
        found.append(
            Finding(
                "error",
                f"only {disk:.1f} GiB free at {probe['host'].get('disk_path')}: "
                f"free at least {MIN_FREE_DISK_GB} GiB or move output_dir",
            )
        )
    return found


# ------------------------------------------------------------------------------ dependencies

REQUIRED_MODULES = {
    "torch": "torch",
    "transformers": "transformers",
    "peft": "peft",
    "accelerate": "accelerate",
    "bitsandbytes": "bitsandbytes",
    "tensorboard": "tensorboard",
    "safetensors": "safetensors",
    "pynvml": "nvidia-ml-py",
    "psutil": "psutil",
}


def missing_packages() -> list[str]:
    return [pkg for module, pkg in REQUIRED_MODULES.items() if importlib.util.find_spec(module) is None]


def install_command(packages: list[str]) -> list[str]:
    return [sys.executable, "-m", "pip", "install", *packages]


def ensure_dependencies(auto_install: bool, *, isatty: bool | None = None, ask=input, run=subprocess.run) -> None:
    """Missing packages are an error; with auto_install_deps the exact command is shown and, on a TTY
    only, run after the user says yes. Nothing is ever installed silently."""
    missing = missing_packages()
    if not missing:
        return
    cmd = install_command(missing)
    shown = " ".join(shlex.quote(c) for c in cmd)
    if not auto_install:
        raise UserError(f"missing packages: {', '.join(missing)}. Install them with:\n  {shown}")
    if isatty is None:
        isatty = sys.stdin.isatty()
    if not isatty:
        raise UserError(
            f"missing packages: {', '.join(missing)}. auto_install_deps asks before installing, "
            f"and there is no terminal to ask on. Run it yourself:\n  {shown}"
        )
    try:
        answer = ask(f"autotune needs {', '.join(missing)}. Run `{shown}` now? [y/N] ")
    except EOFError:  # the terminal closed (Ctrl-D): no answer is no
        answer = ""
    if answer.strip().lower() not in ("y", "yes"):
        raise UserError(f"not installed. Run it yourself when ready:\n  {shown}")
    if run(cmd).returncode != 0:
        raise UserError(f"the install failed: `{shown}` exited non-zero; see pip's output above")
