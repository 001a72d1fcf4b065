"""The one training step: the HF Trainer set up exactly as `autotune train` runs it.

A solver trial is this same Trainer run for a few optimizer steps on synthetic full-length rows, so
the optimizer, mixed precision, checkpointing and data path it measures are the ones training uses.
Nothing else in autotune writes a forward/backward/optimizer step.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

from autotune.config import Config
from autotune.errors import UserError
from autotune.modeling import BuiltModel

# Optimizer arguments that TrainingArguments takes as fields of its own; the rest go to optim_args.
_OPTIM_FIELDS = {"eps": "adam_epsilon"}


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, rows: list[dict]):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def synthetic_rows(n: int, seq_len: int, vocab_size: int, seed: int = 0) -> ListDataset:
    """Worst-case rows for a trial: every row full length, every token labelled."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (n, seq_len), generator=gen)
    return ListDataset([{"input_ids": row.tolist(), "labels": row.tolist()} for row in ids])


def _warmup(ratio: float) -> dict:
    """transformers 5.x dropped warmup_ratio for warmup_steps (a float < 1 is a ratio); older
    releases (the GPU image has 5.17) may still have it."""
    if "warmup_ratio" in TrainingArguments.__dataclass_fields__:
        return {"warmup_ratio": ratio}
    return {"warmup_steps": min(ratio, 0.999)}


_CHECKPOINT_KWARGS = {"use_reentrant", "preserve_rng_state", "determinism_check", "debug", "context_fn"}


def check_training_settings(cfg: Config) -> None:
    """Names and kwargs the Trainer would only reject mid-run, checked up front as a UserError."""
    import inspect

    from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames

    names = [o.value for o in OptimizerNames]
    if cfg.optimizer not in names:
        raise UserError(f"optimizer {cfg.optimizer!r} is not an HF Trainer optimizer; use one of: {', '.join(names)}")
    schedulers = [t.value for t in SchedulerType]
    if cfg.lr_scheduler_type not in schedulers:
        raise UserError(f"lr_scheduler_type {cfg.lr_scheduler_type!r} is unknown; use one of: {', '.join(schedulers)}")
    fn = TYPE_TO_SCHEDULER_FUNCTION[SchedulerType(cfg.lr_scheduler_type)]
    allowed = set(inspect.signature(fn).parameters) - {"optimizer", "num_warmup_steps", "num_training_steps"}
    unknown = set(cfg.lr_scheduler_kwargs) - allowed
    if unknown:
        raise UserError(
            f"lr_scheduler_kwargs {sorted(unknown)} are not arguments of the {cfg.lr_scheduler_type!r} "
            f"schedule; it takes {sorted(allowed) or 'none'}"
        )
    unknown = set(cfg.gradient_checkpointing_kwargs) - _CHECKPOINT_KWARGS
    if unknown:
        raise UserError(
            f"gradient_checkpointing_kwargs {sorted(unknown)} unknown; allowed: {sorted(_CHECKPOINT_KWARGS)}"
        )
    optimizer_arguments(cfg)  # raises a UserError for malformed betas / eps


def optimizer_arguments(cfg: Config) -> dict:
    kwargs = dict(cfg.optimizer_kwargs)
    out: dict = {"optim": cfg.optimizer}
    betas = kwargs.pop("betas", None)
    try:
        if betas is not None:
            if not isinstance(betas, (list, tuple)) or len(betas) != 2:
                raise TypeError
            out["adam_beta1"], out["adam_beta2"] = float(betas[0]), float(betas[1])
        for key, field_name in _OPTIM_FIELDS.items():
            if key in kwargs:
                out[field_name] = float(kwargs.pop(key))
    except (TypeError, ValueError):
        raise UserError(
            f"optimizer_kwargs {cfg.optimizer_kwargs!r}: betas must be two numbers, e.g. [0.9, 0.999], and eps a number"
        ) from None
    if kwargs:
        out["optim_args"] = ",".join(f"{k}={v}" for k, v in kwargs.items())
    return out


def training_arguments(
    cfg: Config,
    built: BuiltModel,
    output_dir: str | Path,
    *,
    max_steps: int | None = None,
    batch_size: int | None = None,
    accumulation: int | None = None,
    evaluate: bool = True,
    save: bool = True,
    log: bool = True,
    progress: bool = True,
) -> TrainingArguments:
    """TrainingArguments from the config; the solver overrides batch, accumulation and steps only."""
    on_cpu = built.device.type == "cpu"
    steps = max_steps if max_steps is not None else (cfg.max_steps or -1)
    return TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=batch_size or cfg.batch_size,
        per_device_eval_batch_size=batch_size or cfg.batch_size,
        gradient_accumulation_steps=accumulation or cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.num_epochs,
        max_steps=steps,
        **_warmup(cfg.warmup_ratio),
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        lr_scheduler_type=cfg.lr_scheduler_type,
        lr_scheduler_kwargs=dict(cfg.lr_scheduler_kwargs),
        **optimizer_arguments(cfg),
        bf16=built.dtype == torch.bfloat16,
        fp16=built.dtype == torch.float16,
        use_cpu=on_cpu,
        # Checkpointing is switched on by modeling.build_model (once, the same way for trials and
        # training), so the Trainer's own gradient_checkpointing flag stays at its default (off).
        seed=cfg.seed,
        data_seed=cfg.seed,
        logging_strategy="steps" if log else "no",
        logging_steps=cfg.log_every_n_steps,
        save_strategy="steps" if save else "no",
        save_steps=cfg.save_every_n_steps,
        save_total_limit=cfg.save_total_limit,
        eval_strategy="steps" if evaluate else "no",
        eval_steps=cfg.save_every_n_steps,
        report_to="none",  # TensorBoard is attached explicitly (see trainer.py), where the config says
        disable_tqdm=not progress,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=not on_cpu,
        include_num_input_tokens_seen="non_padding",
    )


class AutotuneTrainer(Trainer):
    """The HF Trainer plus throughput and memory in every log record (TensorBoard and JSONL see them)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._last_log = (time.perf_counter(), 0)
        self.add_callback(_ThroughputStart(self))

    def log(self, logs: dict, start_time: float | None = None) -> None:
        if "loss" in logs:  # a training record, not an eval one
            now, seen = time.perf_counter(), int(self.state.num_input_tokens_seen)
            then, seen_then = self._last_log
            if now > then and seen > seen_then:
                logs["tokens_per_second"] = round((seen - seen_then) / (now - then), 2)
            self._last_log = (now, seen)
            if torch.cuda.is_available():
                logs["gpu_memory_reserved_gb"] = round(torch.cuda.max_memory_reserved() / 2**30, 3)
                logs["gpu_memory_allocated_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        super().log(logs, start_time)


class _ThroughputStart(TrainerCallback):
    """Starts the tokens/s clock when train() starts, from the tokens the state already counts: a
    resumed run (--resume, or after an OOM) restores num_input_tokens_seen from its checkpoint, and
    those tokens were not processed by this run."""

    def __init__(self, trainer: AutotuneTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._last_log = (time.perf_counter(), int(state.num_input_tokens_seen))


def make_trainer(
    built: BuiltModel,
    args: TrainingArguments,
    train_dataset,
    *,
    collator,
    eval_dataset=None,
    callbacks: list[TrainerCallback] | None = None,
    tokenizer=None,
) -> AutotuneTrainer:
    return AutotuneTrainer(
        model=built.model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=collator,
        callbacks=callbacks or [],
        processing_class=tokenizer,
    )


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step (CUDA-synchronised, so the time is the GPU's, not the launch's)."""

    def __init__(self):
        self.seconds: list[float] = []
        self._t0 = 0.0

    def _sync(self):
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_step_begin(self, args, state, control, **kwargs):
        self._sync()
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self._sync()
        self.seconds.append(time.perf_counter() - self._t0)


def run_trial_steps(
    built: BuiltModel,
    cfg: Config,
    *,
    batch_size: int,
    seq_len: int,
    steps: int,
    workdir: str | Path,
    collator,
    callbacks: list[TrainerCallback] | None = None,
) -> list[float]:
    """Run `steps` optimizer steps of the training Trainer on full-length synthetic rows.

    Returns each step's seconds. The second and later steps hold the optimizer state, so the peak of
    a run of >= 2 steps is the peak of training. Raises torch.OutOfMemoryError when it does not fit.
    """
    timer = StepTimer()
    args = training_arguments(
        cfg,
        built,
        workdir,
        max_steps=steps,
        batch_size=batch_size,
        accumulation=1,
        evaluate=False,
        save=False,
        log=False,
        progress=False,
    )
    data = synthetic_rows(batch_size * steps, seq_len, built.spec.architecture.vocab_size, seed=cfg.seed)
    trainer = make_trainer(built, args, data, collator=collator, callbacks=[timer, *(callbacks or [])])
    trainer.remove_callback(PrinterCallback)  # a trial prints its own one-line summary
    try:
        trainer.train()
    finally:
        # Drop the optimizer state and the trainer's references so the next trial starts from the
        # same baseline (the model, and its LoRA weights, are reused).
        trainer.optimizer = None
        trainer.lr_scheduler = None
        built.model.zero_grad(set_to_none=True)
        del trainer
    return timer.seconds
