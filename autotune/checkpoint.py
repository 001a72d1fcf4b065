"""Checkpoints that a kill, a crash or a full disk cannot leave half-written, and what a resume may change.

The HF Trainer writes checkpoint-N in place, file by file, and then deletes the oldest ones (save_total_limit).
Here a save goes to a hidden staging folder beside the checkpoints and is renamed to checkpoint-N only once
every file is written and synced, so a checkpoint-N folder is always whole; the free space is checked first,
and a disk that fills anyway becomes a UserError that names the last good checkpoint. The Trainer's own
save code writes the files (the same files in both transformers versions autotune supports); only where
they land changes.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autotune.errors import UserError
from autotune.fsutil import apply_umask, atomic_write_json, folder_bytes, free_bytes, fsync_dir
from autotune.run_files import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    CHECKPOINT_PREFIX,
    CHECKPOINTS,
    CONFIG_FILE,
    FAILED,
    INTERRUPTED,
    REPLACED,
    RUNNING,
    SUCCEEDED,
    SUMMARY,
    check_start_flags,
    read_json_doc,
)
from autotune.runlock import in_use
from autotune.units import MiB

if TYPE_CHECKING:
    from autotune.config import Config

TRAINER_STATE = "trainer_state.json"  # the last file the Trainer writes into a checkpoint
# A save in progress (or cut short by a kill): hidden, so neither autotune nor the Trainer takes it for a checkpoint.
STAGING_PREFIX = f".{CHECKPOINT_PREFIX}-"
STAGING_SUFFIX = ".partial"

# The settings that decide the shapes (and meaning) of a checkpoint's adapter and optimizer state: a resume
# that changes one would load tensors of the wrong size, or an adapter trained on other base weights.
SHAPE_KEYS = ("model_name", "init", "quantization", "lora_r", "target_modules")
# The settings a resume may change but that change what the run trains: said when it does (the adapter's scale,
# the data, the order it is read in, the window).
MEANING_KEYS = ("lora_alpha", "data_dir", "dataset_name", "dataset_split", "seed", "max_sequence_length")

# A save needs its estimated size times this, plus FREE_FLOOR_BYTES left over for the logs and the run summary.
SAVE_HEADROOM = 1.25
FREE_FLOOR_BYTES = 16 * MiB
# Before the first checkpoint its size is estimated: the adapter plus two 32-bit Adam moments per trainable
# parameter, plus the files that do not scale with the adapter (tokenizer, RNG, scheduler, trainer state).
FIRST_SAVE_FIXED_BYTES = 32 * MiB


def complete_checkpoints(folder: str | os.PathLike) -> list[str]:
    """The checkpoint-N folders that were written to the end, newest first (trainer_state.json is the last file in
    one; a folder from before atomic saves, cut short by a kill, lacks it and cannot be resumed)."""
    steps = {step: path for step, path in checkpoint_folders(folder).items() if (path / TRAINER_STATE).is_file()}
    return [str(steps[step]) for step in sorted(steps, reverse=True)]


def checkpoint_folders(folder: str | os.PathLike) -> dict[int, Path]:
    """Every checkpoint-N under `folder` by its step, complete or not (hidden staging folders are not named so)."""
    found = {}
    for path in Path(folder).glob(f"{CHECKPOINT_PREFIX}-*"):
        suffix = path.name[len(CHECKPOINT_PREFIX) + 1 :]
        if suffix.isdigit():
            found[int(suffix)] = path
    return found


def last_complete_checkpoint(folder: str | os.PathLike) -> str | None:
    """The newest checkpoint-N that was written to the end."""
    found = complete_checkpoints(folder)
    return found[0] if found else None


def checkpoint_step(path: str | os.PathLike) -> int:
    return int(Path(path).name[len(CHECKPOINT_PREFIX) + 1 :])


# What a resume reads from a checkpoint (peft's adapter, transformers' Trainer state, autotune's config), each by the
# names it may have (one process, DDP's per-rank RNG state, FSDP's sharded folders). A missing one is damage:
# transformers stops with a traceback without the adapter, and without the optimizer or scheduler state it goes on
# with fresh ones, in silence, and the resume is no longer exact.
RESUME_FILES = (
    ("the adapter", (ADAPTER_WEIGHTS, "pytorch_model_fsdp_*")),
    ("the adapter's config", (ADAPTER_CONFIG,)),
    ("the optimizer's state", ("optimizer.pt", "optimizer_*")),
    ("the learning-rate schedule", ("scheduler.pt",)),
    ("the random-number state", ("rng_state.pth", "rng_state_*.pth")),
    ("the run's config", (CONFIG_FILE,)),
)


def checkpoint_damage(path: str | os.PathLike) -> str | None:
    """What is wrong with a checkpoint's files, read without loading them (None: every file a resume reads is there
    and opens): none of RESUME_FILES missing, the JSON files parse, torch's zip archives (optimizer, scheduler, RNG
    state) have every member intact, the safetensors files hold every tensor their header lists. A checkpoint is
    renamed into place whole, so damage comes from outside: a copy cut short, a disk error, a hand edit."""
    folder = Path(path)
    for what, names in RESUME_FILES:
        if not any(next(folder.glob(name), None) for name in names):
            return f"{names[0]}: missing ({what})"
    for file in sorted(folder.iterdir()):
        if not file.is_file():
            continue
        try:
            problem = _file_damage(file)
        except OSError as exc:
            problem = f"cannot read it ({exc.strerror or exc})"
        if problem:
            return f"{file.name}: {problem}"
    return None


def _file_damage(file: Path) -> str | None:
    import zipfile

    if file.suffix == ".json":
        try:
            json.loads(file.read_text(encoding="utf-8"))
        except ValueError as exc:
            return f"not JSON ({str(exc).splitlines()[0][:120]})"
    elif file.suffix in (".pt", ".pth", ".bin"):
        try:
            with zipfile.ZipFile(file) as archive:
                bad = archive.testzip()
        except (zipfile.BadZipFile, EOFError) as exc:
            return f"not a whole torch archive ({exc})"
        if bad is not None:
            return f"member {bad} is corrupt"
    elif file.suffix == ".safetensors":
        raw = file.read_bytes()
        if len(raw) < 8:
            return "truncated before its header"
        size = int.from_bytes(raw[:8], "little")
        try:
            header = json.loads(raw[8 : 8 + size])
        except ValueError:
            return "its header is not JSON"
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        if len(raw) < 8 + size + end:
            return f"truncated: {len(raw)} bytes of the {8 + size + end} its header lists"
    return None


def remove_partial_saves(folder: str | os.PathLike) -> list[str]:
    """Delete staging folders a killed save left behind (call it holding the run lock: no save is running)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in folder.glob(f"{STAGING_PREFIX}*{STAGING_SUFFIX}"):
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path.name)
    return removed


def estimate_checkpoint_bytes(folder: Path, model) -> int:
    """The size of the next checkpoint: the last one's, else an estimate from the trainable parameters."""
    latest = last_complete_checkpoint(folder)
    if latest is not None:
        return folder_bytes(latest)
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return 3 * trainable + FIRST_SAVE_FIXED_BYTES


def _describe_last(last_good: str | None) -> str:
    if last_good is None:
        return "there is no complete checkpoint yet, so nothing can be resumed: free space and start again"
    return f"the last good checkpoint is {last_good}: free space, then run the same command with --resume"


def check_free_space(folder: Path, step: int, need: int, last_good: str | None) -> None:
    free = free_bytes(folder)
    if free < need:
        raise UserError(
            f"not enough disk space for checkpoint-{step}: {free / MiB:.0f} MiB free on the disk holding {folder}, "
            f"a checkpoint needs about {need / MiB:.0f} MiB; {_describe_last(last_good)} (or lower "
            "save_total_limit, or move output_dir to a larger disk)"
        )


def is_disk_full(exc: BaseException | None) -> bool:
    """ENOSPC / EDQUOT however it arrives: an OSError from Python, or a library's own wrapper (torch.save's
    "file write failed", safetensors' StorageFull)."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(exc)
        if any(
            m in text for m in ("No space left on device", "StorageFull", "Disk quota exceeded", "file write failed")
        ):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


@contextmanager
def disk_full_is_a_user_error(what: str, folder: Path, last_good: Callable[[], str | None]) -> Iterator[None]:
    """Turn a full disk while writing `what` into one clear message naming the last good checkpoint."""
    try:
        yield
    except UserError:
        raise
    except Exception as exc:
        if not is_disk_full(exc):
            raise
        raise UserError(
            f"the disk holding {folder} is full: {what} could not be written "
            f"({str(exc).splitlines()[0][:160]}); {_describe_last(last_good())}"
        ) from None


def fsync_tree(path: Path) -> None:
    """fsync every file under `path`, so that a rename after it publishes data that is on the disk (also
    distributed.save_checkpoint_collectively's, where each rank writes part of one checkpoint)."""
    for root, _dirs, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def move_into_place(written: Path, final: Path) -> None:
    """Rename `written` to `final`; a checkpoint of the same step already there (an OOM recovery or a resume
    saves that step again) is moved aside first and deleted after, so `final` is never half of each."""
    if not final.exists():
        os.replace(written, final)
        return
    old = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{final.name}.old.", suffix=STAGING_SUFFIX, dir=final.parent))
    os.replace(final, old / final.name)
    os.replace(written, final)
    shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(trainer, save: Callable[[Any, Any], None], model, trial, extra_files: dict[str, Any]) -> None:
    """The Trainer's _save_checkpoint (`save`), made atomic: staged, synced, renamed, then the old ones rotated.

    `extra_files` (name -> JSON document) are written into the checkpoint before it becomes visible."""
    run_dir = Path(trainer._get_output_dir(trial=trial))
    step = trainer.state.global_step
    final = run_dir / f"{CHECKPOINT_PREFIX}-{step}"
    run_dir.mkdir(parents=True, exist_ok=True)
    need = int(estimate_checkpoint_bytes(run_dir, model) * SAVE_HEADROOM) + FREE_FLOOR_BYTES
    check_free_space(run_dir, step, need, last_complete_checkpoint(run_dir))
    staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{step}.", suffix=STAGING_SUFFIX, dir=run_dir))
    # The Trainer saves into <its output dir>/checkpoint-N and rotates there: point it at the staging folder,
    # where the only checkpoint is this one, so its rotation deletes nothing.
    trainer._get_output_dir = lambda trial=None: str(staging)
    try:
        with disk_full_is_a_user_error(f"checkpoint-{step}", run_dir, lambda: last_complete_checkpoint(run_dir)):
            save(model, trial)
            written = staging / final.name
            for name, doc in extra_files.items():
                atomic_write_json(written / name, doc)
            apply_umask(written)  # mkdtemp and some writers (safetensors) make files private
            fsync_tree(written)
            move_into_place(written, final)
            fsync_dir(run_dir)
    finally:
        del trainer._get_output_dir  # the instance attribute goes; the method shows through again
        shutil.rmtree(staging, ignore_errors=True)
    if trainer.args.should_save:
        # As the Trainer would have, on the real folder. Step order, not mtime: a checkpoint re-saved after a
        # resume is no newer than the steps it follows.
        from transformers.trainer_utils import rotate_checkpoints

        rotate_checkpoints(
            output_dir=str(run_dir),
            save_total_limit=trainer.args.save_total_limit,
            best_model_checkpoint=trainer.state.best_model_checkpoint,
            use_mtime=False,
        )


def saved_settings(checkpoint: str | os.PathLike) -> dict | None:
    """The settings a checkpoint was trained with that a resume compares (SHAPE_KEYS, MEANING_KEYS): from its
    autotune_config.json, else (a checkpoint written before autotune put its config there) the rank and targets
    of peft's adapter_config."""
    folder = Path(checkpoint)
    for name in (CONFIG_FILE, ADAPTER_CONFIG):
        try:
            doc = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not isinstance(doc, dict):
            continue
        if name == CONFIG_FILE:
            return {k: doc[k] for k in (*SHAPE_KEYS, *MEANING_KEYS) if k in doc}
        return {"lora_r": doc.get("r"), "target_modules": doc.get("target_modules")}
    return None


def _same(key: str, then: Any, now: Any) -> bool:
    if key == "target_modules" and isinstance(then, (list, tuple)) and isinstance(now, (list, tuple)):
        return sorted(then) == sorted(now)
    return then == now


def resume_changes(checkpoint: str | os.PathLike, config: dict, keys: tuple[str, ...] = SHAPE_KEYS) -> list[str]:
    """`key then -> now` for each of `keys` (default: the shape-defining settings) a resume would change (empty:
    it may resume)."""
    then = saved_settings(checkpoint) or {}
    return [
        f"{key} {then[key]!r} -> {config.get(key)!r}"
        for key in keys
        if key in then and then[key] is not None and not _same(key, then[key], config.get(key))
    ]


def require_finished(path: Path) -> None:
    """The adapter of a run whose summary does not say it succeeded is an earlier run's (a run killed after
    --overwrite... started, or resumed and stopped): exporting it would pass off old weights as the run's."""
    summary_path = path / SUMMARY
    if not summary_path.is_file():
        return  # a folder written by hand, or by an autotune before run summaries: nothing says otherwise
    status = read_json_doc(summary_path, "re-run `autotune train`").get("status")
    if status == SUCCEEDED:
        return
    last = last_complete_checkpoint(path / CHECKPOINTS)  # what `train --resume` would go on from
    newest = f"; its newest checkpoint is at step {checkpoint_step(last)}" if last else ""
    raise UserError(
        f"{path}: the run there has not finished (its {SUMMARY} says {status!r}){newest}, so its "
        f"{ADAPTER_WEIGHTS} is not that run's result. Fix: finish it (`autotune train --resume` with its config), "
        "then export."
    )


# ------------------------------------------------------------------- where a run starts in its folder
#
# Light (no torch): `autotune train` asks them before it imports the training stack, so that a refusal answers in a
# third of a second; the runner asks them again holding the folder's lock (runner._start), which is what counts.


def read_summary(output_dir: Path) -> dict | None:
    """The run summary in output_dir, or None (absent or unreadable)."""
    try:
        doc = json.loads((output_dir / SUMMARY).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def existing_run(output_dir: Path, previous: dict | None) -> str | None:
    """What run output_dir holds that a new run would destroy (trained weights, or a finished run), described
    for the message; None when it holds none (a run that failed before its first checkpoint leaves nothing
    to lose)."""
    checkpoints = sorted(checkpoint_folders(output_dir / CHECKPOINTS))
    adapter = (output_dir / ADAPTER_WEIGHTS).is_file()
    status = (previous or {}).get("status")
    if not checkpoints and not adapter and status != SUCCEEDED:
        return None
    steps = ((previous or {}).get("final") or {}).get("global_step")
    if status == SUCCEEDED:
        what = f"a finished run ({steps} steps)" if steps else "a finished run"
    elif status == INTERRUPTED:
        what = "an interrupted run"
    elif status in (RUNNING, FAILED):
        what = "a run that stopped before finishing" if status == RUNNING else "a failed run"
    else:
        what = "a run's adapter" if adapter else "a run"
    if checkpoints:
        what += f" with checkpoints up to step {checkpoints[-1]}"
    return what


def holds_a_run(out: Path, held: str) -> UserError:
    return UserError(
        f"output_dir {out} already holds {held}, and a new run would replace it. To continue it, run "
        "the same command with --resume; to keep it, give this run another folder (--set output_dir=...); "
        "to replace it, add --overwrite"
    )


def resume_point(cfg: Config) -> str:
    """The checkpoint a --resume goes on from; a UserError when there is none, or when the config changed a
    setting the checkpoint's tensors were shaped by."""
    folder = Path(cfg.output_dir) / CHECKPOINTS
    checkpoint = last_complete_checkpoint(folder)
    if checkpoint is None:
        raise UserError(f"--resume: no complete checkpoint under {folder}; start without --resume")
    damage = checkpoint_damage(checkpoint)
    if damage is not None:
        earlier = [c for c in complete_checkpoints(folder)[1:] if checkpoint_damage(c) is None]
        way = (
            f"the newest intact one is {Path(earlier[0]).name}: move {Path(checkpoint).name} out of {folder} and "
            f"--resume again (the steps after {checkpoint_step(earlier[0])} are trained again)"
            if earlier
            else "no earlier checkpoint is intact: start again with --overwrite"
        )
        raise UserError(f"--resume: {checkpoint} is damaged ({damage}); {way}")
    changed = resume_changes(checkpoint, cfg.to_dict())
    if changed:
        raise UserError(
            f"--resume: {checkpoint} was trained with other settings ({'; '.join(changed)}). Its adapter and "
            "optimizer state fit only the settings they were trained with: resume with those (--set key=old value), "
            "or start a new run (another output_dir, or --overwrite)"
        )
    return checkpoint


def check_start(cfg: Config, resume: bool, overwrite: bool) -> None:
    """What `autotune train` refuses of its folder before anything starts: --resume and --overwrite together, a
    resume without an intact checkpoint of the same shapes, a new run over one the folder holds without
    --overwrite. A folder where a killed --overwrite left the run it replaced aside is the runner's to settle
    first (runner._tidy_folder), and one another run holds now is that run's: neither is judged here."""
    check_start_flags(resume, overwrite)
    out = Path(cfg.output_dir)
    if (out / REPLACED).exists() or in_use(out):  # a run holds the folder now: the runner says which
        return
    if resume:
        resume_point(cfg)
        return
    held = existing_run(out, read_summary(out))
    if held is not None and not overwrite:
        raise holds_a_run(out, held)
