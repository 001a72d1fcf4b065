"""`autotune train`: the runner. Setup helpers (the folder, the inputs, the data, the model, the callbacks), then a
linear run (`train`), in the manner of torchtune's recipes.

The training step itself lives in step.py (the HF Trainer subclass, shared with the solver's trials); this
module is what happens around it: what is written where, and what happens when the GPU runs out of memory, the
user presses Ctrl-C, or a folder already holds a run.

A run holds its output_dir for its whole life (runlock.py: a second run into the folder is refused, a dead
run's lock is taken over). A folder that holds a finished or resumable run is never overwritten unless the
user asks (--overwrite), and then only the files a run writes are removed, once the new run's inputs have
proven good.
"""

from __future__ import annotations

import autotune.quiet  # noqa: F401  (before transformers imports bitsandbytes: see quiet.py)

# isort: split
import json
import os
import shutil
import signal
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from transformers import TrainerCallback, TrainerState

from autotune import distributed, hub, techniques
from autotune.batching import BatchPlan
from autotune.catalog import TEXT_ONLY_NOTE
from autotune.checkpoint import (
    MEANING_KEYS,
    TRAINER_STATE,
    checkpoint_step,
    disk_full_is_a_user_error,
    existing_run,
    holds_a_run,
    last_complete_checkpoint,
    read_summary,
    remove_partial_saves,
    resume_changes,
    resume_point,
)
from autotune.config import Config
from autotune.context import RunContext
from autotune.data.prepare import PreparedData, prepare_data
from autotune.errors import UserError
from autotune.fsutil import apply_umask, atomic_write_json, fsync_dir
from autotune.memory import free_memory
from autotune.modeling import BuiltModel, build_model, pick_device, quiet_libraries
from autotune.preflight import check_run_config
from autotune.run_files import (
    ADAPTER_WEIGHTS,
    CHECKPOINT_PREFIX,
    CHECKPOINTS,
    CONFIG_FILE,
    FAILED,
    INTERRUPTED,
    PROFILE,
    REPLACED,
    RUN_FILES,
    RUNNING,
    SUCCEEDED,
    SUMMARY,
    check_start_flags,
)
from autotune.runlock import RunLock
from autotune.runlog import RunLog, drop_records
from autotune.step import (
    ListDataset,
    check_training_settings,
    make_trainer,
    release_trainer,
    training_arguments,
)
from autotune.techniques.packing import collator_for
from autotune.trackers import reports_to_tensorboard
from autotune.watchdog import MemoryWatchdog, limit_for

Echo = Callable[[str], None]


# --------------------------------------------------------------------------------- callbacks


class StructuredLogCallback(TrainerCallback):
    def __init__(self, runlog: RunLog, built: BuiltModel, include_model_stats: bool):
        self.runlog, self.built, self.include_model_stats = runlog, built, include_model_stats

    def on_train_begin(self, args, state, control, **kwargs):
        metrics = self.built.parameter_counts() if self.include_model_stats else {}
        self.runlog.write(
            "trainer",
            "training started",
            metrics=metrics,
            global_step=state.global_step,
            batch_size=args.per_device_train_batch_size,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            max_steps=state.max_steps,
        )

    def on_log(self, args, state, control, logs=None, **kwargs):
        kind = "evaluation" if any(k.startswith("eval_") for k in logs or {}) else "metrics"
        self.runlog.write("trainer", kind, metrics=dict(logs or {}), global_step=state.global_step)

    def on_save(self, args, state, control, **kwargs):
        self.runlog.write("checkpoint", "checkpoint saved", global_step=state.global_step)


class EvalOOMReporter(TrainerCallback):
    """Hears evaluation.py's on_eval_oom: logs it, says it, records it, and keeps the smaller evaluation batch
    for the rest of the run (a Trainer rebuilt after a training OOM starts from it)."""

    def __init__(self, run: Run, changes: list[dict]):
        self.run, self.changes = run, changes

    def on_eval_oom(self, state, change: dict) -> None:
        self.changes.append(change)
        old, new = change["eval_batch_size"]
        self.run.eval_batch = new
        step = change["at_step"]
        if new is None:
            message = (
                f"out of memory in evaluation at step {step} with eval_batch_size=1: evaluation is skipped for "
                "the rest of the run; training goes on unchanged (lower max_sequence_length, or set eval_ratio=0)"
            )
        else:
            message = (
                f"out of memory in evaluation at step {step}: eval_batch_size {old} -> {new}; the training "
                "micro-batch is unchanged"
            )
        self.run.runlog.write("oom", message, level="WARNING", global_step=step, metrics=change)
        self.run.echo(f"warning: {message}")


class GracefulInterrupt(TrainerCallback):
    """The first Ctrl-C asks the Trainer to finish the optimizer step under way, save a checkpoint and stop; a
    second one stops at once (KeyboardInterrupt: the last complete checkpoint stays the resume point)."""

    def __init__(self, echo: Echo):
        self.echo = echo
        self.requested = False

    def _handler(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.echo("\ninterrupt: finishing this step and saving a checkpoint (press Ctrl-C again to stop at once)")

    def on_step_end(self, args, state, control, **kwargs):
        # Several ranks stop together at the same step, or those that did not see the Ctrl-C would wait for the
        # others in the next gradient all-reduce (one small all-reduce per step decides it).
        requested = distributed.any_rank(self.requested) if args.world_size > 1 else self.requested
        if requested:
            self.requested = True
            control.should_save = True
            control.should_training_stop = True

    @contextmanager
    def installed(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield
            return
        previous = signal.signal(signal.SIGINT, self._handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)


class InjectedOOM(TrainerCallback):
    """distributed.INJECT_OOM_ENV's testing hook: a CUDA-style OOM on one rank at the start of one step, raised
    where a real one would reach the runner (a CPU cannot run out of memory on one rank on cue)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            self.step = -1
            raise torch.OutOfMemoryError(f"injected OOM at step {state.global_step} ({distributed.INJECT_OOM_ENV})")


def _silent(message: str) -> None:
    """The console of the ranks other than 0: they run the same run, rank 0 says it once."""


def tensorboard_dir(cfg: Config, run_id: str) -> Path:
    """Where a run's TensorBoard events go: a folder of their own per run (its run_id), so that two runs'
    curves never mix, a resume continues its own, and --overwrite can remove the replaced run's alone."""
    return Path(cfg.tensorboard_log_dir or Path(cfg.log_dir) / "tensorboard") / run_id


def tensorboard_callback(log_dir: Path, purge_step: int | None = None):
    """HF's TensorBoardCallback on our writer. `purge_step`: a resume's first step; TensorBoard then hides
    what the interrupted attempt logged from that step on, as the JSONL log drops those records."""
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    return TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(log_dir), purge_step=purge_step))


# -------------------------------------------------------------------------------- the runner


@dataclass
class Run:
    ctx: RunContext
    built: BuiltModel
    data: PreparedData
    runlog: RunLog
    echo: Echo
    callbacks: list = field(default_factory=list)
    eval_batch: int | None = None  # set once an evaluation OOM has shrunk it

    @property
    def cfg(self) -> Config:
        return self.ctx.cfg

    @property
    def tokenizer(self):
        return self.ctx.tokenizer

    @property
    def output_dir(self) -> Path:
        return Path(self.cfg.output_dir)

    @property
    def checkpoint_dir(self) -> Path:
        return self.output_dir / CHECKPOINTS


def training_collator(cfg: Config, built: BuiltModel, pad_token_id: int):
    """The collator training batches go through: packed rows, or rows padded to the longest sample, rounded up
    to a multiple of 8 for tensor cores but never past max_sequence_length (the solver measured rows of
    exactly that length)."""
    return collator_for(built.knobs.packing, pad_token_id, max_length=cfg.max_sequence_length)


def _fit_with_oom_recovery(run: Run, resume_from: str | None, changes: list[dict], *, finished: bool = False):
    """trainer.train(), and on an OOM: keep the completed optimizer steps, at least halve the micro-batch
    with the accumulation that keeps the effective batch (BatchPlan.smaller), and go on from the last
    completed step. Each change is appended to `changes` as it happens (a failed run's summary reports
    them too). An OOM in evaluation never gets here (evaluation.py shrinks the evaluation batch). Returns the
    Trainer that finished. `finished`: `resume_from` holds every planned step (its final save failed): the
    checkpoint is loaded, not trained on, so that the outputs are written from it."""
    batch, accumulation = run.cfg.batch_size, run.cfg.gradient_accumulation_steps
    collator = training_collator(run.cfg, run.built, run.tokenizer.pad_token_id)
    while True:
        args = training_arguments(
            run.cfg,
            run.built,
            run.checkpoint_dir,
            batch_size=batch,
            accumulation=accumulation,
            evaluate=run.data.eval is not None,
        )
        # null eval_batch_size means the training micro-batch (as it is now, after any OOM halving).
        args.per_device_eval_batch_size = run.eval_batch or run.cfg.eval_batch_size or batch
        trainer = make_trainer(
            run.built,
            args,
            ListDataset(run.data.train),
            eval_dataset=ListDataset(run.data.eval) if run.data.eval else None,
            collator=collator,
            callbacks=run.callbacks,
            tokenizer=run.tokenizer,
        )
        # Every checkpoint carries the config it was trained with: a resume compares its shape settings.
        trainer.checkpoint_files = {CONFIG_FILE: run.cfg.to_dict()}
        if finished and resume_from is not None:
            trainer._load_from_checkpoint(resume_from)
            trainer.state = TrainerState.load_from_json(str(Path(resume_from) / TRAINER_STATE))
            return trainer
        try:
            trainer.train(resume_from_checkpoint=resume_from)
            return trainer
        except torch.OutOfMemoryError as exc:
            if distributed.world().distributed:
                _restart_for_oom(run, trainer, exc, batch, accumulation, changes)  # raises: torchrun restarts all
            resume_from, batch, accumulation = _recover_from_oom(run, trainer, exc, batch, accumulation, changes)
            release_trainer(trainer, run.built.model)
            del trainer
            free_memory()


def _recover_from_oom(
    run: Run, trainer, exc: BaseException, batch: int, accumulation: int, changes: list[dict]
) -> tuple[str | None, int, int]:
    """Checkpoint the completed steps and pick the smaller micro-batch; a UserError when none is left.
    Returns (the checkpoint to resume from, the new micro-batch, the new accumulation)."""
    cfg, step = run.cfg, trainer.state.global_step
    if batch == 1 or len(changes) >= cfg.max_oom_retries:
        run.runlog.write("oom", "out of memory, giving up", level="ERROR", global_step=step, batch_size=batch)
        four_bit = "" if cfg.quantization == "4bit" else 'use quantization="4bit", '
        raise UserError(
            f"out of GPU memory at step {step} with batch_size={batch}"
            f"{' (the smallest)' if batch == 1 else f' after {len(changes)} halvings'}: lower "
            f"max_sequence_length (now {cfg.max_sequence_length}) or lora_r (now {cfg.lora_r}), "
            f"{four_bit}or run `autotune solve` for a profile that fits"
        ) from None
    # Partial gradients of the interrupted step are discarded; everything up to the last
    # completed optimizer step is kept in a checkpoint the next attempt resumes from.
    run.built.model.zero_grad(set_to_none=True)
    resume_from = None
    if step > 0:
        trainer._save_checkpoint(trainer.model, trial=None)
        resume_from = str(run.checkpoint_dir / f"{CHECKPOINT_PREFIX}-{step}")
    smaller = BatchPlan(batch, accumulation).smaller()
    assert smaller is not None  # batch > 1 here
    new_batch, new_accumulation = smaller.micro, smaller.accumulation
    change = {
        "at_step": step,
        "error": str(exc).splitlines()[0][:200],
        "batch_size": [batch, new_batch],
        "gradient_accumulation_steps": [accumulation, new_accumulation],
        "effective_batch_size": batch * accumulation,
    }
    changes.append(change)
    run.runlog.write(
        "oom",
        "out of memory: smaller micro-batch, more accumulation",
        level="WARNING",
        global_step=step,
        metrics=change,
    )
    run.echo(
        f"OOM at step {step}: batch_size {batch} -> {new_batch}, gradient_accumulation_steps {accumulation} -> "
        f"{new_accumulation} (effective batch {new_batch * new_accumulation} unchanged); continuing from step {step}"
    )
    return resume_from, new_batch, new_accumulation


def _restart_for_oom(run: Run, trainer, exc: BaseException, batch: int, accumulation: int, changes: list[dict]):
    """An OOM on one of several ranks: the others are waiting in a collective this rank will never join, so
    nothing can be recovered in this process. Write the decision (the smaller micro-batch, or the smaller
    evaluation batch when evaluation ran out) for the restarted group, and stop this rank: torchrun stops
    the others and restarts all of them (--max-restarts), and each goes on with the decision from the last
    complete checkpoint (distributed.oom_decisions)."""
    w, cfg, step = distributed.world(), run.cfg, trainer.state.global_step
    checkpoint = last_complete_checkpoint(run.checkpoint_dir)
    change: dict = {
        "at_step": step,
        "rank": w.rank,
        "error": str(exc).splitlines()[0][:200],
        "resume_from": checkpoint,
    }
    if getattr(trainer, "oom_in_evaluation", False):
        old = trainer.args.per_device_eval_batch_size
        change["eval_batch_size"] = [old, old // 2 if old > 1 else None]
        what = f"evaluation batch {old} -> {old // 2}" if old > 1 else "no more evaluation"
    else:
        training = [c for c in changes if "batch_size" in c]
        if batch == 1 or len(training) >= cfg.max_oom_retries:
            four_bit = "" if cfg.quantization == "4bit" else 'use quantization="4bit", '
            raise UserError(
                f"out of GPU memory on rank {w.rank} at step {step} with batch_size={batch}"
                f"{' (the smallest)' if batch == 1 else f' after {len(training)} halvings'}: lower "
                f"max_sequence_length (now {cfg.max_sequence_length}) or lora_r (now {cfg.lora_r}), "
                f"{four_bit}use more GPUs with --strategy fsdp, or run `autotune solve --gpus {w.size}`"
            ) from None
        smaller = BatchPlan(batch, accumulation).smaller()
        assert smaller is not None  # batch > 1 here
        new_batch, new_accumulation = smaller.micro, smaller.accumulation
        change.update(
            batch_size=[batch, new_batch],
            gradient_accumulation_steps=[accumulation, new_accumulation],
            effective_batch_size=batch * accumulation * w.size,
        )
        what = (
            f"batch_size {batch} -> {new_batch}, gradient_accumulation_steps {accumulation} -> {new_accumulation} "
            f"(effective batch {batch * accumulation * w.size} unchanged)"
        )
    distributed.record_oom(run.output_dir, change, w)
    run.runlog.write("oom", "out of memory on one rank: every rank restarts", level="WARNING", metrics=change)
    by_hand = f"--set batch_size={change['batch_size'][1]}" if "batch_size" in change else "--set eval_batch_size=1"
    raise distributed.RestartForOOM(
        f"out of memory on rank {w.rank} at step {step}: every rank restarts with {what}, from "
        f"{checkpoint or 'the start (no checkpoint yet)'}. torchrun restarts the group when it was given "
        "--max-restarts (`autotune train --nproc` gives max_oom_retries); otherwise run the same command again with "
        f"--resume {by_hand}"
    ) from None


def _after_oom_restart(
    cfg: Config, decisions: list[dict], w: distributed.World, echo: Echo
) -> tuple[Config, bool, bool]:
    """A group torchrun restarted after an OOM: the config with the decided micro-batch (and evaluation batch),
    whether there is a checkpoint to resume from, and whether to evaluate at all."""
    training = [d for d in decisions if "batch_size" in d]
    evaluation = [d for d in decisions if "eval_batch_size" in d]
    if training:
        cfg = replace(
            cfg,
            batch_size=training[-1]["batch_size"][1],
            gradient_accumulation_steps=training[-1]["gradient_accumulation_steps"][1],
        )
    evaluate = not evaluation or evaluation[-1]["eval_batch_size"][1] is not None
    if evaluation:
        cfg = replace(cfg, eval_batch_size=evaluation[-1]["eval_batch_size"][1] or 1)
    checkpoint = last_complete_checkpoint(Path(cfg.output_dir) / CHECKPOINTS)
    last = decisions[-1]
    echo(
        f"restart {w.restart} of this launch after an out-of-memory on rank {last.get('rank')} at step "
        f"{last.get('at_step')}: batch_size {cfg.batch_size}, gradient_accumulation_steps "
        f"{cfg.gradient_accumulation_steps}"
        + ((f", eval_batch_size {cfg.eval_batch_size}" if evaluate else ", no evaluation") if evaluation else "")
        + (f"; resuming from {checkpoint}" if checkpoint else "; starting over (no checkpoint yet)")
    )
    return cfg, checkpoint is not None, evaluate


# ------------------------------------------------------------------------- checks before a run


def check_profile_model(ctx: RunContext, profile: dict | None) -> None:
    """A profile solved for another architecture has memory figures for another model: refuse it up front."""
    if profile is None:
        return
    from autotune.profile import model_mismatch

    found = model_mismatch(profile, ctx.cfg.model_name, ctx.architecture)
    if found is not None and found[1]:
        raise UserError(
            f"--profile: {found[0]}. Solve for this model (`autotune solve --model {ctx.cfg.model_name}`), "
            "or train without --profile"
        )


def _check_environment(ctx: RunContext, profile: dict | None, echo: Echo) -> None:
    """Dependencies, the hardware against the config (verify_environment), and where the profile was solved
    against where it is used (warnings: a profile solved on one 24 GB card is a fair start on another)."""
    from autotune.hardware import probe
    from autotune.preflight import check_hardware, ensure_dependencies
    from autotune.profile import hardware_fingerprint, mismatches

    cfg = ctx.cfg
    ensure_dependencies(cfg.auto_install_deps)
    if not cfg.verify_environment and profile is None:
        return
    doc = probe(cfg.output_dir)
    if profile is not None:
        here = hardware_fingerprint(doc, profile["hardware"].get("device") or "cpu")
        for warning in mismatches(profile, here, cfg.model_name, ctx.architecture):
            echo(f"warning: {warning}")
    if not cfg.verify_environment:
        return
    findings = check_hardware(cfg, doc)
    for f in findings:
        if f.level == "warning":
            echo(f"warning: {f.message}")
    errors = [f.message for f in findings if f.level == "error"]
    if errors:
        raise UserError("environment check failed (verify_environment): " + "; ".join(errors))


def _finished_at(checkpoint: str, cfg: Config) -> int | None:
    """The checkpoint's step when it holds every step the run plans under `cfg` (None: there is more to train):
    max_steps when the config sets it, else the steps the checkpoint's own run planned (trainer_state.json), if the
    config's epochs are the checkpoint's."""
    try:
        state = json.loads((Path(checkpoint) / TRAINER_STATE).read_text(encoding="utf-8"))
        trained = json.loads((Path(checkpoint) / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    step, planned = state.get("global_step"), state.get("max_steps")
    if cfg.max_steps is not None:
        planned = cfg.max_steps
    elif (
        not isinstance(trained, dict)
        or trained.get("max_steps") is not None
        or trained.get("num_epochs") != cfg.num_epochs
    ):
        return None
    return step if isinstance(step, int) and isinstance(planned, int) and step >= planned else None


def _outputs_whole(out: Path, previous: dict | None) -> bool:
    """Whether a finished run's outputs were all written: its summary says it succeeded, its adapter is there."""
    return previous is not None and previous.get("status") == SUCCEEDED and (out / ADAPTER_WEIGHTS).is_file()


def _callbacks(cfg: Config, built: BuiltModel, runlog: RunLog, extra, *, run_id: str, resume_from: str | None) -> list:
    callbacks: list = [StructuredLogCallback(runlog, built, cfg.structured_logging.include_model_stats)]
    if reports_to_tensorboard(cfg) and distributed.world().is_main:  # one writer: rank 0
        purge = checkpoint_step(resume_from) + 1 if resume_from else None
        callbacks.append(tensorboard_callback(tensorboard_dir(cfg, run_id), purge_step=purge))
    injected = distributed.injected_oom_step()
    if injected is not None:
        callbacks.append(InjectedOOM(injected))
    return callbacks + list(extra)


def _watchdog(run: Run, profile: dict | None, summary: dict) -> MemoryWatchdog | None:
    found = limit_for(profile, run.cfg.max_memory_gb)
    if found is None:
        return None
    summary["memory_warnings"] = []

    def warn(message: str, metrics: dict) -> None:
        summary["memory_warnings"].append(message)
        run.runlog.write("memory", message, level="WARNING", metrics=metrics)
        run.echo(f"warning: {message}")

    return MemoryWatchdog(found[0], found[1], warn)


def _open_runlog(cfg: Config, run_id: str) -> RunLog:
    log = cfg.structured_logging
    path = log.log_file if log.enabled and distributed.world().is_main else None  # one writer: rank 0
    return RunLog(path, log.log_level, log.include_memory_stats, run_id=run_id)


def _inference_test(run: Run, summary: dict) -> None:
    if not run.cfg.enable_inference_test:
        return
    from autotune.data.parsing import parse_data, split_pairs
    from autotune.inference import run_inference_test

    # The pairs trained on, split exactly as prepare_data split them (the same function, the same seed).
    trained, _ = split_pairs(parse_data(run.cfg).pairs, run.cfg.eval_ratio, run.cfg.seed)
    summary["inference_report"] = run_inference_test(
        run.built, run.tokenizer, trained, run.data.eval_pairs, run.cfg, run.output_dir
    )


def _finish_summary(summary: dict, runlog: RunLog, echo: Echo, write: bool) -> None:
    summary["finished_at"] = time.time()
    summary["seconds"] = round(summary["finished_at"] - summary["started_at"], 2)
    level = {SUCCEEDED: "INFO", INTERRUPTED: "WARNING"}.get(summary["status"], "ERROR")
    runlog.write(
        "run",
        f"run {summary['status']}",
        level=level,
        metrics={k: summary.get(k) for k in ("seconds", "final") if k in summary},
    )
    runlog.close()
    if not write:
        return
    try:
        atomic_write_json(Path(summary["output_dir"]) / SUMMARY, summary)
    except OSError as exc:  # a full disk must not hide the real error
        echo(f"warning: could not write {SUMMARY}: {exc}")


def _move_previous_aside(out: Path, echo: Echo) -> None:
    """--overwrite: the previous run's checkpoints and the files a run writes renamed into out/REPLACED, where they
    wait until this run has its first checkpoint (_discard_replaced) or stops before it (_restore_replaced). The
    user's own files in the folder stay where they are."""
    aside = out / REPLACED
    aside.mkdir()  # _tidy_folder settled any earlier one: an existing one here is a bug, not something to delete
    for name in (CHECKPOINTS, *RUN_FILES):
        if (out / name).exists():
            os.replace(out / name, aside / name)
    fsync_dir(out)
    echo(f"--overwrite: the previous run in {out} is moved aside ({REPLACED}) until this run's first checkpoint")


def _replaced_id(out: Path) -> str | None:
    return (read_summary(out / REPLACED) or {}).get("run_id")


def _discard_replaced(cfg: Config, runlog: RunLog | None, echo: Echo) -> None:
    """This run has a checkpoint: the run it replaced goes for good (its folder aside, its TensorBoard events, its
    JSONL records)."""
    out = Path(cfg.output_dir)
    if not (out / REPLACED).is_dir():
        return
    old_id = _replaced_id(out)
    shutil.rmtree(out / REPLACED, ignore_errors=True)
    if old_id:
        shutil.rmtree(tensorboard_dir(cfg, old_id), ignore_errors=True)
        dropped = _drop_run_records(cfg, runlog, old_id)
        if dropped is None:
            echo(f"note: the previous run's records stay in {cfg.structured_logging.log_file} (another run has it "
                 f"open); run_id {old_id}")  # fmt: skip
    echo(f"--overwrite: the previous run in {out} is removed (this run has its first checkpoint)")


def _restore_replaced(cfg: Config, runlog: RunLog | None, new_id: str | None) -> bool:
    """This run stopped before its first checkpoint: its files go and the run it was to replace comes back whole.
    Returns whether there was one to put back."""
    out = Path(cfg.output_dir)
    aside = out / REPLACED
    if not aside.is_dir():
        return False
    shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)
    for path in aside.iterdir():
        os.replace(path, out / path.name)
    aside.rmdir()
    fsync_dir(out)
    if new_id:
        shutil.rmtree(tensorboard_dir(cfg, new_id), ignore_errors=True)
        _drop_run_records(cfg, runlog, new_id)
    return True


def _drop_run_records(cfg: Config, runlog: RunLog | None, run_id: str) -> int | None:
    if not cfg.structured_logging.enabled:
        return 0
    drop = lambda record: record.get("run_id") == run_id  # noqa: E731
    if runlog is None or runlog.path is None:
        return drop_records(cfg.structured_logging.log_file, drop)
    with runlog.paused():
        return drop_records(runlog.path, drop)


class DiscardReplaced(TrainerCallback):
    """The first checkpoint of a run started with --overwrite: the run it replaces, waiting aside, goes."""

    def __init__(self, cfg: Config, runlog: RunLog, echo: Echo):
        self.cfg, self.runlog, self.echo = cfg, runlog, echo

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            _discard_replaced(self.cfg, self.runlog, self.echo)


def _forget_rerun_steps(cfg: Config, run_id: str | None, resumed_step: int, echo: Echo) -> None:
    """A resume re-runs the steps after its checkpoint: drop the interrupted attempt's records of them, so the
    JSONL holds each step once."""
    log = cfg.structured_logging
    if not (log.enabled and run_id):
        return

    def rerun(record: dict) -> bool:
        step = record.get("global_step")
        return record.get("run_id") == run_id and isinstance(step, int) and step > resumed_step

    if drop_records(log.log_file, rerun) is None:
        echo(f"note: {log.log_file} is open in another run: the re-run steps after {resumed_step} appear twice")


@dataclass
class Start:
    """How this run starts in its folder: its id, the checkpoint it resumes from, and the earlier run it replaces."""

    run_id: str
    resume_from: str | None = None
    replaces: str | None = None  # what the folder holds that --overwrite replaces (existing_run's words)
    previous: dict | None = None  # the folder's earlier run summary
    finished_at: int | None = None  # a resume whose checkpoint has every planned step: nothing left to train


def train(
    cfg: Config,
    *,
    profile: dict | None = None,
    resume: bool = False,
    overwrite: bool = False,
    extra_callbacks: tuple[TrainerCallback, ...] = (),
    echo: Echo = print,
) -> dict:
    """Run a fine-tune. Returns the run summary (also written to <output_dir>/run_summary.json); its status is
    "succeeded", or "interrupted" after a Ctrl-C (resume with resume=True). Bad inputs raise a UserError
    before anything is written."""
    quiet_libraries()
    check_start_flags(resume, overwrite)
    check_training_settings(cfg)  # a bad name is a config error: nothing is started or written
    w = distributed.world()
    device = pick_device()
    # One rank's share: the strategy, and the micro-batch and accumulation that keep the effective batch exact.
    strategy = distributed.resolve_strategy(cfg, profile, device.type)
    techniques.check_strategy(cfg, strategy, w.size)  # refused before anything starts, with the reason
    check_run_config(cfg)  # the techniques for this model, the data's markers: as `autotune validate` checks them
    cfg, notes = distributed.plan_for_world(cfg, profile, strategy, w)
    evaluate = True
    decisions = distributed.oom_decisions(cfg.output_dir, w)
    if not w.is_main:
        echo = _silent
    if decisions:  # torchrun restarted the group after an OOM on one rank: go on with what it decided
        cfg, resume, evaluate = _after_oom_restart(cfg, decisions, w, echo)
        overwrite = False  # the first attempt of this launch already did what --overwrite asked
    ctx = RunContext(cfg)
    check_profile_model(ctx, profile)
    for note in notes if not decisions else ():  # after a restart, the restart's own line says the batch
        echo(f"note: {note}")
    if device.type == "cuda" and (liger := techniques.liger_problem()):
        echo(f"note: {liger}")
    if ctx.architecture.is_hybrid and cfg.init != "random":
        echo(f"note: {ctx.spec.name}: {TEXT_ONLY_NOTE}")
    distributed.join(device)
    with _holding(cfg.output_dir, w, echo):
        return _run(ctx, profile, resume, overwrite, tuple(extra_callbacks), echo, decisions, evaluate)


@contextmanager
def _holding(output_dir: str, w: distributed.World, echo: Echo) -> Iterator[None]:
    """The run's folder held for its whole life (runlock.py). Under torchrun the ranks of one run share it: the
    main process holds it for all of them."""
    if not w.is_main:
        yield
        return
    with RunLock(output_dir) as lock:
        stale = lock.describe_stale()
        if stale:
            echo(stale)
        yield


def _run(
    ctx: RunContext,
    profile: dict | None,
    resume: bool,
    overwrite: bool,
    extra_callbacks: tuple,
    echo: Echo,
    decisions: list[dict],
    evaluate: bool,
) -> dict:
    """The run, start to end, in the folder this process holds."""
    cfg, out = ctx.cfg, Path(ctx.cfg.output_dir)
    main = distributed.world().is_main  # under torchrun, rank 0 alone writes; the others read
    if main:
        _tidy_folder(cfg, decisions, echo)
    start = _start(cfg, resume, overwrite, main, echo)
    if start.finished_at is not None and _outputs_whole(out, start.previous):
        # A finished run resumed: nothing to train, nothing written (transformers' loop would run one more step).
        echo(
            f"note: {out} holds a finished run (step {start.finished_at}, every step it planned) with its adapter: "
            "nothing to train. To train longer, raise max_steps or num_epochs and --resume; to start again, "
            "--overwrite"
        )
        return {**(start.previous or {}), "already_finished": True}
    summary = _new_summary(cfg, start)
    # The summary file is this run's once no earlier run's would be lost by writing it: at once for a resume
    # (the same run) or a free folder; after --overwrite has removed the previous run otherwise. Rank 0's alone.
    owns_summary = start.replaces is None and main
    runlog = _open_runlog(cfg, start.run_id)
    try:
        _check_environment(ctx, profile, echo)
        if cfg.init == "pretrained" and ctx.spec.hub_id and not ctx.spec.local_path:
            hub.require_reachable("model", ctx.spec.hub_id)  # before the data: a missing model fails at once
        data = _prepare(ctx, evaluate, summary, runlog, echo)
        built = _build(ctx, summary)
        # Everything that can refuse this run (data, model, logging folders, the profile's watchdog) before
        # --overwrite removes the previous one: a bad input leaves that run whole.
        run, interrupt = _setup_run(ctx, built, data, runlog, profile, start, summary, decisions, extra_callbacks, echo)
        if start.replaces is not None and main:
            _move_previous_aside(out, echo)
            owns_summary = True
        if main:
            run.callbacks.append(DiscardReplaced(cfg, runlog, echo))
        if main:
            atomic_write_json(out / SUMMARY, {**summary, "status": RUNNING})  # a killed run says it never finished
        distributed.wait_for_everyone()  # no rank trains before rank 0 has cleared and claimed the folder
        with interrupt.installed():
            trainer = _fit_with_oom_recovery(
                run, start.resume_from, summary["oom_recoveries"], finished=start.finished_at is not None
            )
        summary["final"] = _final_metrics(trainer)
        if interrupt.requested and trainer.state.global_step < trainer.state.max_steps:
            distributed.leave()
            summary["status"] = INTERRUPTED
            summary["resume_from"] = last_complete_checkpoint(run.checkpoint_dir)
            return summary
        with disk_full_is_a_user_error("the adapter", out, lambda: last_complete_checkpoint(out / CHECKPOINTS)):
            _save_outputs(run, profile, trainer)
            distributed.leave()  # the last collective: every rank has its part of the outputs written
            if main and cfg.distributed_strategy != "fsdp":  # FSDP: no rank holds the whole model to generate
                _inference_test(run, summary)
        summary["status"] = SUCCEEDED
        if main:
            _discard_replaced(cfg, runlog, echo)  # a run shorter than its first checkpoint: its outputs count
            distributed.forget_oom_decisions(out)
        return summary
    except UserError as exc:
        summary["error"] = str(exc)
        raise
    except KeyboardInterrupt:
        # A second Ctrl-C (or one before training started): the last complete checkpoint is the resume point.
        summary["status"] = INTERRUPTED
        summary["resume_from"] = last_complete_checkpoint(out / CHECKPOINTS)
        return summary
    except BaseException as exc:
        summary["error"] = f"{type(exc).__name__}: {exc}"
        summary["traceback"] = traceback.format_exc()
        if distributed.world().distributed and distributed.peer_stopped(exc):
            raise distributed.PeerStopped(
                f"{distributed.world().describe()}: another rank stopped mid-step (its own message says why), so "
                "this one stops too; torchrun restarts the group after an out-of-memory, else run the command "
                "again with --resume"
            ) from None
        raise
    finally:
        # Stopped before its first checkpoint: the run --overwrite was to replace comes back whole (several ranks:
        # torchrun may restart the group after an OOM, which goes on from the folder as it is; the next launch's
        # _tidy_folder settles it).
        stopped = main and summary["status"] != SUCCEEDED and not distributed.world().distributed
        if stopped and _restore_replaced(cfg, runlog, start.run_id):
            owns_summary = False
            echo(f"the previous run in {out} is back in place: this run stopped before its first checkpoint")
        _finish_summary(summary, runlog, echo, write=owns_summary)


# ------------------------------------------------------------------------- setup helpers


def _tidy_folder(cfg: Config, decisions: list[dict], echo: Echo) -> None:
    """What a killed run left: a save it cut short (we hold the folder, so none is running), an earlier launch's
    OOM decisions (this launch starts from the config), and a run --overwrite moved aside: discarded if the killed
    run had reached a checkpoint, else put back (a restart of this launch after an OOM goes on as it was)."""
    out = Path(cfg.output_dir)
    remove_partial_saves(out / CHECKPOINTS)
    if decisions:
        return
    distributed.forget_oom_decisions(out)
    if not (out / REPLACED).is_dir():
        return
    if last_complete_checkpoint(out / CHECKPOINTS):
        _discard_replaced(cfg, None, echo)
    elif _restore_replaced(cfg, None, (read_summary(out) or {}).get("run_id")):
        echo(
            f"note: {out}: the run started there with --overwrite was stopped before its first checkpoint; the run "
            "it was to replace is back in place"
        )


def _start(cfg: Config, resume: bool, overwrite: bool, main: bool, echo: Echo) -> Start:
    """Where this run starts: a resume goes on from the last complete checkpoint under the same run_id; a new run
    gets a new id, and is refused where the folder holds a run unless --overwrite says to replace it."""
    out = Path(cfg.output_dir)
    previous = read_summary(out)
    if resume:
        resume_from = resume_point(cfg)
        changed = resume_changes(resume_from, cfg.to_dict(), MEANING_KEYS)
        if changed and main:
            echo(
                f"note: resuming {Path(resume_from).name} with {'; '.join(changed)}: the steps so far were trained "
                "with the earlier values, the rest trains with these"
            )
        finished_at = _finished_at(resume_from, cfg)
        if main and finished_at is None:
            _forget_rerun_steps(cfg, (previous or {}).get("run_id"), checkpoint_step(resume_from), echo)
        run_id = (previous or {}).get("run_id") or uuid.uuid4().hex[:12]
        return Start(run_id, resume_from=resume_from, previous=previous, finished_at=finished_at)
    held = existing_run(out, previous)
    if held is not None and not overwrite:
        raise holds_a_run(out, held)
    return Start(uuid.uuid4().hex[:12], replaces=held, previous=previous)


def _new_summary(cfg: Config, start: Start) -> dict:
    summary: dict = {
        "status": FAILED,
        "run_id": start.run_id,
        "output_dir": cfg.output_dir,
        "started_at": time.time(),
        "pid": os.getpid(),
    }
    if start.resume_from:
        summary["resumed_from"] = start.resume_from
    return summary


def _prepare(ctx: RunContext, evaluate: bool, summary: dict, runlog: RunLog, echo: Echo) -> PreparedData:
    """The tokenized data (rank 0 tokenizes into the cache, the others read it); no evaluation split after an
    evaluation that could not fit even one sample."""
    with distributed.main_process_first():
        data = prepare_data(ctx, echo)
    if not evaluate:
        data = replace(data, eval=None)
    summary["data"] = data.report
    runlog.write("data", "dataset ready", metrics=data.report)
    return data


def _build(ctx: RunContext, summary: dict) -> BuiltModel:
    built = build_model(ctx)
    summary["model"] = {
        "name": ctx.spec.name,
        "device": str(built.device),
        "dtype": str(built.dtype),
        "quantization": built.quantization,
        **({"experts_4bit": True} if built.knobs.experts_4bit else {}),
        **built.parameter_counts(),
    }
    return built


def _setup_run(
    ctx: RunContext,
    built: BuiltModel,
    data: PreparedData,
    runlog: RunLog,
    profile: dict | None,
    start: Start,
    summary: dict,
    decisions: list[dict],
    extra_callbacks: tuple,
    echo: Echo,
) -> tuple[Run, GracefulInterrupt]:
    """The Run and its callbacks: logging, TensorBoard, the evaluation-OOM reporter, Ctrl-C, the memory watchdog;
    the OOM changes an earlier attempt of this launch made, recorded in the summary."""
    run = Run(ctx, built, data, runlog, echo)
    interrupt = GracefulInterrupt(echo)
    summary["oom_recoveries"] = [d for d in decisions if "batch_size" in d]
    summary["eval_oom_recoveries"] = [d for d in decisions if "eval_batch_size" in d]
    run.callbacks = _callbacks(
        ctx.cfg, built, runlog, extra_callbacks, run_id=start.run_id, resume_from=start.resume_from
    ) + [EvalOOMReporter(run, summary["eval_oom_recoveries"]), interrupt]
    watchdog = _watchdog(run, profile, summary)
    if watchdog is not None:
        run.callbacks.append(watchdog)
    return run, interrupt


def _final_metrics(trainer) -> dict:
    history = trainer.state.log_history
    losses = [h["loss"] for h in history if "loss" in h]
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    train_out: dict = next((h for h in reversed(history) if "train_runtime" in h), {})
    return {
        "global_step": trainer.state.global_step,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "losses_logged": len(losses),
        "eval_loss": evals[-1] if evals else None,
        "train_runtime": train_out.get("train_runtime"),
        "train_loss": train_out.get("train_loss"),
        "num_input_tokens_seen": int(trainer.state.num_input_tokens_seen),
    }


def _save_outputs(run: Run, profile: dict | None, trainer=None) -> None:
    """The adapter, tokenizer, resolved config and profile into output_dir, by rank 0 (under FSDP every rank
    first hands its shard of the adapter to rank 0)."""
    w = distributed.world()
    state = None
    if w.distributed and run.cfg.distributed_strategy == "fsdp" and trainer is not None:
        state = distributed.full_trainable_state(trainer.model_wrapped)  # collective
    if not w.is_main:
        return
    out = run.output_dir
    out.mkdir(parents=True, exist_ok=True)
    run.built.model.save_pretrained(str(out), safe_serialization=True, state_dict=state)
    run.tokenizer.save_pretrained(str(out))
    atomic_write_json(out / CONFIG_FILE, run.cfg.to_dict())
    if profile is not None:
        atomic_write_json(out / PROFILE, profile)
    for name in RUN_FILES:  # safetensors writes the adapter through a private temp file
        apply_umask(out / name)
