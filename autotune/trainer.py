"""`autotune train`: data -> model -> HF Trainer, with logging, checkpoints, resume and OOM recovery.

The training step itself lives in step.py (shared with the solver); this module is the runner
around it: what is written where, and what happens when the GPU runs out of memory.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from autotune.config import Config
from autotune.context import RunContext
from autotune.data.encoding import CausalLMCollator
from autotune.data.prepare import PreparedData, prepare_data
from autotune.errors import UserError
from autotune.fsutil import atomic_write_json
from autotune.memory import free_memory
from autotune.modeling import BuiltModel, build_model, quiet_libraries
from autotune.runlog import RunLog
from autotune.step import (
    ListDataset,
    check_training_settings,
    make_trainer,
    release_trainer,
    training_arguments,
)

CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer_state.json"  # the last file the Trainer writes into a checkpoint

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


def tensorboard_callback(log_dir: str):
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    return TensorBoardCallback(tb_writer=SummaryWriter(log_dir=log_dir))


# -------------------------------------------------------------------------------- the runner


@dataclass
class Run:
    ctx: RunContext
    built: BuiltModel
    data: PreparedData
    runlog: RunLog
    callbacks: list
    echo: Echo

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


def last_complete_checkpoint(folder: Path) -> str | None:
    """The newest checkpoint-N that was written to the end. The Trainer writes trainer_state.json
    last, so a run killed while saving leaves a newer folder without it, which cannot be resumed."""
    if not folder.is_dir():
        return None
    steps = {}
    for path in folder.glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
        suffix = path.name[len(PREFIX_CHECKPOINT_DIR) + 1 :]
        if suffix.isdigit() and (path / TRAINER_STATE).is_file():
            steps[int(suffix)] = path
    return str(steps[max(steps)]) if steps else None


def smaller_batch(batch: int, effective: int) -> tuple[int, int]:
    """After an OOM: the largest micro-batch of at most half the current one that divides the effective
    batch, and the accumulation that keeps the effective batch exactly (halve and double, when batch is
    a power of two; 3 x 2 becomes 1 x 6, never 1 x 4)."""
    new = max(d for d in range(1, max(1, batch // 2) + 1) if effective % d == 0)
    return new, effective // new


def _collator(run: Run) -> CausalLMCollator:
    # Rounding rows up to a multiple of 8 suits tensor cores, but never past max_sequence_length: the
    # solver measured rows of exactly that length.
    length = run.cfg.max_sequence_length
    return CausalLMCollator(run.tokenizer.pad_token_id, pad_to_multiple_of=8 if length % 8 == 0 else None)


def _fit_with_oom_recovery(run: Run, resume_from: str | None, changes: list[dict]):
    """trainer.train(), and on an OOM: keep the completed optimizer steps, at least halve the micro-batch
    with the accumulation that keeps the effective batch (smaller_batch), and go on from the last
    completed step. Each change is appended to `changes` as it happens (a failed run's summary reports
    them too). Returns the Trainer that finished."""
    batch, accumulation = run.cfg.batch_size, run.cfg.gradient_accumulation_steps
    collator = _collator(run)
    while True:
        args = training_arguments(
            run.cfg,
            run.built,
            run.checkpoint_dir,
            batch_size=batch,
            accumulation=accumulation,
            evaluate=run.data.eval is not None,
        )
        trainer = make_trainer(
            run.built,
            args,
            ListDataset(run.data.train),
            eval_dataset=ListDataset(run.data.eval) if run.data.eval else None,
            collator=collator,
            callbacks=run.callbacks,
            tokenizer=run.tokenizer,
        )
        try:
            trainer.train(resume_from_checkpoint=resume_from)
            return trainer
        except torch.OutOfMemoryError as exc:
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
        resume_from = str(run.checkpoint_dir / f"{PREFIX_CHECKPOINT_DIR}-{step}")
    new_batch, new_accumulation = smaller_batch(batch, batch * accumulation)
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


def _resume_point(cfg: Config, resume: bool) -> str | None:
    if not resume:
        return None
    checkpoint = last_complete_checkpoint(Path(cfg.output_dir) / CHECKPOINTS)
    if checkpoint is None:
        raise UserError(
            f"--resume: no complete checkpoint under {Path(cfg.output_dir) / CHECKPOINTS}; start without --resume"
        )
    return checkpoint


def _callbacks(cfg: Config, built: BuiltModel, runlog: RunLog, extra) -> list:
    callbacks: list = [StructuredLogCallback(runlog, built, cfg.structured_logging.include_model_stats)]
    if cfg.enable_tensorboard:
        callbacks.append(tensorboard_callback(cfg.tensorboard_log_dir or str(Path(cfg.log_dir) / "tensorboard")))
    return callbacks + list(extra)


def _open_runlog(cfg: Config) -> RunLog:
    log = cfg.structured_logging
    return RunLog(log.log_file if log.enabled else None, log.log_level, log.include_memory_stats)


def _inference_test(run: Run, summary: dict) -> None:
    if not run.cfg.enable_inference_test:
        return
    if not run.data.eval_pairs:
        run.echo("note: inference test skipped: no held-out pairs (eval_ratio is 0 or the data is too small)")
        return
    from autotune.inference import run_inference_test

    summary["inference_report"] = run_inference_test(
        run.built, run.tokenizer, run.data.eval_pairs, run.cfg, run.output_dir
    )


def _finish_summary(summary: dict, runlog: RunLog, echo: Echo) -> None:
    summary["finished_at"] = time.time()
    summary["seconds"] = round(summary["finished_at"] - summary["started_at"], 2)
    ok = summary["status"] == "succeeded"
    runlog.write(
        "run",
        f"run {summary['status']}",
        level="INFO" if ok else "ERROR",
        metrics={k: summary.get(k) for k in ("seconds", "final") if k in summary},
    )
    runlog.close()
    try:
        atomic_write_json(Path(summary["output_dir"]) / "run_summary.json", summary)
    except OSError as exc:  # pragma: no cover - a full disk must not hide the real error
        echo(f"warning: could not write run_summary.json: {exc}")


def train(
    cfg: Config,
    *,
    profile: dict | None = None,
    resume: bool = False,
    extra_callbacks: tuple[TrainerCallback, ...] = (),
    echo: Echo = print,
) -> dict:
    """Run a fine-tune. Returns the run summary (also written to <output_dir>/run_summary.json)."""
    quiet_libraries()
    check_training_settings(cfg)  # a bad name is a config error: nothing is started or written
    ctx = RunContext(cfg)
    summary: dict = {"status": "failed", "output_dir": cfg.output_dir, "started_at": time.time()}
    runlog = _open_runlog(cfg)
    try:
        _check_environment(ctx, profile, echo)
        resume_from = _resume_point(cfg, resume)
        data = prepare_data(ctx, echo)
        summary["data"] = data.report
        runlog.write("data", "dataset ready", metrics=data.report)
        built = build_model(ctx)
        summary["model"] = {
            "name": ctx.spec.name,
            "device": str(built.device),
            "dtype": str(built.dtype),
            "quantization": built.quantization,
            **built.parameter_counts(),
        }
        run = Run(ctx, built, data, runlog, _callbacks(cfg, built, runlog, extra_callbacks), echo)
        summary["oom_recoveries"] = []
        trainer = _fit_with_oom_recovery(run, resume_from, summary["oom_recoveries"])
        summary["final"] = _final_metrics(trainer)
        _save_outputs(run, profile)
        _inference_test(run, summary)
        summary["status"] = "succeeded"
        return summary
    except UserError as exc:
        summary["error"] = str(exc)
        raise
    except BaseException as exc:
        summary["error"] = f"{type(exc).__name__}: {exc}"
        summary["traceback"] = traceback.format_exc()
        raise
    finally:
        _finish_summary(summary, runlog, echo)


def _final_metrics(trainer) -> dict:
    history = trainer.state.log_history
    losses = [h["loss"] for h in history if "loss" in h]
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    train_out: dict = next((h for h in reversed(history) if "train_runtime" in h), {})
    return {
        "global_step": trainer.state.global_step,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "eval_loss": evals[-1] if evals else None,
        "train_runtime": train_out.get("train_runtime"),
        "train_loss": train_out.get("train_loss"),
        "num_input_tokens_seen": int(trainer.state.num_input_tokens_seen),
    }


def _save_outputs(run: Run, profile: dict | None) -> None:
    out = run.output_dir
    out.mkdir(parents=True, exist_ok=True)
    run.built.model.save_pretrained(str(out), safe_serialization=True)
    run.tokenizer.save_pretrained(str(out))
    atomic_write_json(out / "autotune_config.json", run.cfg.to_dict())
    if profile is not None:
        atomic_write_json(out / "profile.json", profile)
