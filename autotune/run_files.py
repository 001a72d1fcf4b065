"""The files of a run's output_dir, one name each: what train writes, what --resume and --overwrite look for,
what export reads. Importing this module must not import torch."""

from __future__ import annotations

import os
from pathlib import Path

from autotune.errors import UserError

CHECKPOINTS = "checkpoints"  # the folder of checkpoint-N folders
# A checkpoint folder's name before its step: transformers' PREFIX_CHECKPOINT_DIR, named here so that finding a run's
# checkpoints needs no transformers import (tests/test_architecture.py holds the two equal).
CHECKPOINT_PREFIX = "checkpoint"
SUMMARY = "run_summary.json"  # the run's status and figures ("running" while it lives)
CONFIG_FILE = "autotune_config.json"  # the resolved config, in output_dir and in every checkpoint
PROFILE = "profile.json"  # the profile the run trained with
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # peft's adapter
ADAPTER_CONFIG = "adapter_config.json"  # peft's, beside the adapter and in every checkpoint
INFERENCE_REPORT_JSON = "inference_report.json"
INFERENCE_REPORT_MD = "inference_report.md"
EXPORT_MANIFEST = "autotune_export.json"  # what `autotune export` wrote into its folder
# The run --overwrite replaces, moved aside (renamed, never copied) until the new run has its first checkpoint: a
# new run that fails or is killed before then leaves the old one whole (runner.py puts it back).
REPLACED = ".autotune-replaced"

# A run summary's statuses ("running" while it lives: a killed run's summary still says so).
RUNNING, SUCCEEDED, FAILED, INTERRUPTED = "running", "succeeded", "failed", "interrupted"

# Every file a run writes into output_dir (peft's adapter and model card, the tokenizer's files, autotune's own):
# what --overwrite removes, and nothing else, so a user's own files in the folder survive it.
RUN_FILES = (
    ADAPTER_WEIGHTS,
    ADAPTER_CONFIG,
    "README.md",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    CONFIG_FILE,
    PROFILE,
    INFERENCE_REPORT_JSON,
    INFERENCE_REPORT_MD,
    SUMMARY,
)


def require_run_files(run_dir: str | os.PathLike) -> Path:
    """The folder of a finished `autotune train`, as far as its file names tell: a UserError naming what is missing
    otherwise. Light (no torch), so that `autotune export` refuses a wrong folder before importing what it exports
    with."""
    path = Path(run_dir)
    if not path.is_dir():
        raise UserError(
            f"{run_dir}: no such run folder. Fix: give the output_dir of a finished `autotune train` "
            f"(it holds {ADAPTER_WEIGHTS} and {CONFIG_FILE})."
        )
    if not (path / ADAPTER_WEIGHTS).is_file():
        other = (path / "adapter_model.bin").is_file()
        raise UserError(
            f"{path}: no {ADAPTER_WEIGHTS}"
            + (" (only a pickled adapter_model.bin, which autotune never loads: safetensors only)" if other else "")
            + ". Fix: give the output_dir of a finished `autotune train`; a run that failed or is still running "
            "has not written its adapter yet."
        )
    for name in (ADAPTER_CONFIG, CONFIG_FILE):
        if not (path / name).is_file():
            raise UserError(f"{path}: no {name}. Fix: give the output_dir of a finished `autotune train`.")
    return path


def check_start_flags(resume: bool, overwrite: bool) -> None:
    """--resume continues the run a folder holds, --overwrite replaces it: never both."""
    if resume and overwrite:
        raise UserError(
            "--resume and --overwrite contradict each other: --resume continues the run, --overwrite replaces it"
        )


def default_export_dir(run_dir: str | os.PathLike, merge: bool) -> Path:
    """Where `autotune export` writes without --out: beside the run's files, in the run folder."""
    return Path(run_dir) / ("merged" if merge else "adapter")


def check_export_destination(out: Path, run_path: Path, overwrite: bool) -> None:
    """Where an export may go: not the run folder or above it; a new or empty folder, or with --overwrite an
    earlier export holding only what it wrote (its manifest's list). A UserError naming the fix otherwise."""
    run_path, target = run_path.resolve(), out.resolve()
    if target == run_path or target in run_path.parents:
        raise UserError(
            f"--out {out}: that is the run folder or holds it, and an export there would replace the run. "
            "Fix: choose another folder (default: RUN_DIR/merged or RUN_DIR/adapter)."
        )
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is a file. Fix: choose a folder name.")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise UserError(
                f"--out {out}: the folder exists and is not empty. Fix: choose another --out, or pass --overwrite "
                "to replace an earlier export there."
            )
        if not (out / EXPORT_MANIFEST).is_file():
            # --overwrite replaces what an export wrote, never a run's checkpoints or a user's own files.
            shown = ", ".join(sorted(p.name for p in out.iterdir())[:4])
            raise UserError(
                f"--out {out}: the folder holds files that are not an autotune export ({shown}); --overwrite "
                f"replaces only an earlier export (a folder with {EXPORT_MANIFEST}). Fix: choose another --out."
            )
        listed = read_json_doc(out / EXPORT_MANIFEST, "remove the folder, or choose another --out").get("files")
        if isinstance(listed, list):  # (an export from before the manifest listed its files: all of it was its own)
            foreign = sorted(p.name for p in out.iterdir() if p.name not in {*map(str, listed), EXPORT_MANIFEST})
            if foreign:
                raise UserError(
                    f"--out {out}: beside the earlier export it holds files the export did not write "
                    f"({', '.join(foreign[:4])}{', ...' if len(foreign) > 4 else ''}), which --overwrite would delete. "
                    "Fix: move them out of the folder, or choose another --out."
                )


def read_json_doc(path: Path, fix: str) -> dict:
    """A run folder's JSON file as a dict ({} for another JSON value); a UserError naming it and `fix` when it does
    not parse."""
    import json

    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot read it as JSON ({exc}). Fix: {fix}.") from None
    return doc if isinstance(doc, dict) else {}
