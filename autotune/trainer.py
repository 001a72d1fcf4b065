"""`autotune train`: data -> model -> HF Trainer, with logging, checkpoints, resume and OOM recovery.

The training step itself lives in step.py (shared with the solver); this module is the runner
around it: what is written where, and what happens when the GPU runs out of memory.
"""

from __future__ import annotations

import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from autotune.catalog import ModelSpec, resolve_model
from autotune.config import Config
from autotune.data.encoding import CausalLMCollator, length_stats, load_or_encode
from autotune.data.parsing import parse_data, split_pairs
from autotune.errors import UserError
from autotune.fsutil import atomic_write_json
from autotune.memory import free_memory
from autotune.modeling import BuiltModel, build_model, quiet_libraries
from autotune.runlog import RunLog
from autotune.step import ListDataset, check_training_settings, make_trainer, training_arguments
from autotune.tokenizer import load_tokenizer

CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer_state.json"  # the last file the Trainer writes into a checkpoint


# ------------------------------------------------------------------------------------------ data


@dataclass
class PreparedData:
    train: ListDataset
    eval: ListDataset | None
    eval_pairs: list
    report: dict  # what the parser and the encoder did, for the run summary


def prepare_data(cfg: Config, tokenizer, spec: ModelSpec, echo=print) -> PreparedData:
    parsed = parse_data(cfg)
    for warning in parsed.warnings:
        echo(f"warning: {warning}")
    train_pairs, eval_pairs = split_pairs(parsed.pairs, cfg.eval_ratio, cfg.seed)
    opts = dict(system_prompt=cfg.system_prompt, thinking_model=spec.thinking, overflow=cfg.overflow)
    train_rows, train_report, hit = load_or_encode(
        tokenizer, train_pairs, cfg.max_sequence_length, cfg.data_cache_dir, **opts
    )
    eval_rows, eval_report, _ = load_or_encode(
        tokenizer, eval_pairs, cfg.max_sequence_length, cfg.data_cache_dir, **opts
    )
    if not train_rows:
        raise UserError(
            f"no training sample fits max_sequence_length={cfg.max_sequence_length} "
            f'({train_report.dropped} dropped): raise max_sequence_length or set overflow="truncate"'
        )
    if train_report.truncated or train_report.dropped:
        echo(
            f"note: {train_report.truncated} training samples truncated (answer cut, end-of-turn kept), "
            f"{train_report.dropped} dropped as longer than {cfg.max_sequence_length} tokens"
        )
    report = {
        "files": len(parsed.files),
        "pairs": len(parsed.pairs),
        "train_pairs": len(train_pairs),
        "eval_pairs": len(eval_pairs),
        "train_encoding": asdict(train_report),
        "eval_encoding": asdict(eval_report),
        "cache_hit": hit,
    }
    return PreparedData(ListDataset(train_rows), ListDataset(eval_rows) if eval_rows else None, eval_pairs, report)


def data_length_stats(cfg: Config, tokenizer, spec: ModelSpec) -> dict:
    """Token-length statistics of the training data (the solver sizes the sequence from them)."""
    parsed = parse_data(cfg)
    return length_stats(tokenizer, parsed.pairs, cfg.system_prompt, spec.thinking)


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


class InjectOOM(TrainerCallback):
    """Raise a CUDA-style OOM at the start of the given optimizer steps (each once): lets tests on a
    CPU exercise the recovery path exactly as a real OOM would reach it."""

    def __init__(self, at_steps):
        self.pending = set(at_steps)

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step in self.pending:
            self.pending.discard(state.global_step)
            raise torch.OutOfMemoryError(f"injected OOM at step {state.global_step}")


def tensorboard_callback(log_dir: str):
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    return TensorBoardCallback(tb_writer=SummaryWriter(log_dir=log_dir))


# -------------------------------------------------------------------------------- the runner


@dataclass
class Run:
    cfg: Config
    built: BuiltModel
    tokenizer: object
    data: PreparedData
    output_dir: Path
    runlog: RunLog
    callbacks: list
    echo: object

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


def _fit_with_oom_recovery(
    run: Run, resume_from: str | None, changes: list[dict] | None = None
) -> tuple[object, list[dict]]:
    """trainer.train(), and on an OOM: keep the completed optimizer steps, at least halve the micro-batch
    with the accumulation that keeps the effective batch (smaller_batch), and go on from the last
    completed step.
    Each change is appended to `changes` as it happens (a failed run's summary reports them too)."""
    cfg = run.cfg
    changes = [] if changes is None else changes
    batch, accumulation = cfg.batch_size, cfg.gradient_accumulation_steps
    # Rounding rows up to a multiple of 8 suits tensor cores, but never past max_sequence_length: the
    # solver measured rows of exactly that length.
    collator = CausalLMCollator(
        run.tokenizer.pad_token_id, pad_to_multiple_of=8 if cfg.max_sequence_length % 8 == 0 else None
    )
    while True:
        args = training_arguments(
            cfg,
            run.built,
            run.checkpoint_dir,
            batch_size=batch,
            accumulation=accumulation,
            evaluate=run.data.eval is not None,
        )
        trainer = make_trainer(
            run.built,
            args,
            run.data.train,
            eval_dataset=run.data.eval,
            collator=collator,
            callbacks=run.callbacks,
            tokenizer=run.tokenizer,
        )
        try:
            trainer.train(resume_from_checkpoint=resume_from)
            return trainer, changes
        except torch.OutOfMemoryError as exc:
            step = trainer.state.global_step
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
                resume_from = str(run.checkpoint_dir / f"checkpoint-{step}")
            new_batch, new_accumulation = smaller_batch(batch, batch * accumulation)
            change = {
                "at_step": step,
                "error": str(exc).splitlines()[0][:200],
                "batch_size": [batch, new_batch],
                "gradient_accumulation_steps": [accumulation, new_accumulation],
                "effective_batch_size": batch * accumulation,
            }
            batch, accumulation = new_batch, new_accumulation
            changes.append(change)
            run.runlog.write(
                "oom",
                "out of memory: smaller micro-batch, more accumulation",
                level="WARNING",
                global_step=step,
                metrics=change,
            )
            run.echo(
                f"OOM at step {step}: batch_size {change['batch_size'][0]} -> {batch}, "
                f"gradient_accumulation_steps {change['gradient_accumulation_steps'][0]} -> {accumulation} "
                f"(effective batch {batch * accumulation} unchanged); continuing from step {step}"
            )
            trainer.optimizer = trainer.lr_scheduler = None
            del trainer
            free_memory()


def _check_environment(cfg: Config, echo) -> dict:
    from autotune.hardware import probe
    from autotune.preflight import check_hardware, ensure_dependencies

    ensure_dependencies(cfg.auto_install_deps)
    doc = probe(cfg.output_dir)
    findings = check_hardware(cfg, doc)
    for f in findings:
        if f.level == "warning":
            echo(f"warning: {f.message}")
    errors = [f.message for f in findings if f.level == "error"]
    if errors:
        raise UserError("environment check failed (verify_environment): " + "; ".join(errors))
    return doc


def train(cfg: Config, *, profile: dict | None = None, resume: bool = False, extra_callbacks=(), echo=print) -> dict:
    """Run a fine-tune. Returns the run summary (also written to <output_dir>/run_summary.json)."""
    quiet_libraries()
    check_training_settings(cfg)  # a bad name is a config error: nothing is started or written
    output_dir = Path(cfg.output_dir)
    summary: dict = {"status": "failed", "output_dir": str(output_dir), "started_at": time.time()}
    runlog = RunLog(
        cfg.structured_logging.log_file if cfg.structured_logging.enabled else None,
        cfg.structured_logging.log_level,
        cfg.structured_logging.include_memory_stats,
    )
    try:
        if cfg.verify_environment:
            _check_environment(cfg, echo)
        resume_from = None
        if resume:
            resume_from = last_complete_checkpoint(output_dir / CHECKPOINTS)
            if resume_from is None:
                raise UserError(
                    f"--resume: no complete checkpoint under {output_dir / CHECKPOINTS}; start without --resume"
                )
        spec = resolve_model(cfg.model_name)
        tokenizer = load_tokenizer(cfg.tokenizer_name or spec.tokenizer_name)
        data = prepare_data(cfg, tokenizer, spec, echo)
        summary["data"] = data.report
        runlog.write("data", "dataset ready", metrics=data.report)
        built = build_model(cfg, spec=spec)
        summary["model"] = {
            "name": spec.name,
            "device": str(built.device),
            "dtype": str(built.dtype),
            "quantization": built.quantization,
            **built.parameter_counts(),
        }
        callbacks = [StructuredLogCallback(runlog, built, cfg.structured_logging.include_model_stats)]
        if cfg.enable_tensorboard:
            callbacks.append(tensorboard_callback(cfg.tensorboard_log_dir or str(Path(cfg.log_dir) / "tensorboard")))
        callbacks.extend(extra_callbacks)
        run = Run(cfg, built, tokenizer, data, output_dir, runlog, callbacks, echo)
        summary["oom_recoveries"] = []
        trainer, _ = _fit_with_oom_recovery(run, resume_from, summary["oom_recoveries"])
        summary["final"] = _final_metrics(trainer)
        _save_outputs(run, trainer, profile)
        if cfg.enable_inference_test and not data.eval_pairs:
            echo("note: inference test skipped: no held-out pairs (eval_ratio is 0 or the data is too small)")
        if cfg.enable_inference_test and data.eval_pairs:
            from autotune.inference import run_inference_test

            summary["inference_report"] = run_inference_test(built, tokenizer, data.eval_pairs, cfg, output_dir)
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
        summary["finished_at"] = time.time()
        summary["seconds"] = round(summary["finished_at"] - summary["started_at"], 2)
        runlog.write(
            "run",
            f"run {summary['status']}",
            level="INFO" if summary["status"] == "succeeded" else "ERROR",
            metrics={k: summary.get(k) for k in ("seconds", "final") if k in summary},
        )
        runlog.close()
        try:
            atomic_write_json(output_dir / "run_summary.json", summary)
        except OSError as exc:  # pragma: no cover - a full disk must not hide the real error
            echo(f"warning: could not write run_summary.json: {exc}")


def _final_metrics(trainer) -> dict:
    history = trainer.state.log_history
    losses = [h["loss"] for h in history if "loss" in h]
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    train_out = next((h for h in reversed(history) if "train_runtime" in h), {})
    return {
        "global_step": trainer.state.global_step,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "eval_loss": evals[-1] if evals else None,
        "train_runtime": train_out.get("train_runtime"),
        "train_loss": train_out.get("train_loss"),
        "num_input_tokens_seen": int(trainer.state.num_input_tokens_seen),
    }


def _save_outputs(run: Run, trainer, profile: dict | None) -> None:
    out = run.output_dir
    out.mkdir(parents=True, exist_ok=True)
    run.built.model.save_pretrained(str(out), safe_serialization=True)
    run.tokenizer.save_pretrained(str(out))
    atomic_write_json(out / "autotune_config.json", run.cfg.to_dict())
    if profile is not None:
        atomic_write_json(out / "profile.json", profile)
