"""The one training step: the HF Trainer set up exactly as `autotune train` runs it.

A solver trial (trial.py) is this same Trainer run for a few optimizer steps on synthetic full-length rows,
so the optimizer, mixed precision, checkpointing and data path it measures are the ones training uses.
Nothing else in autotune writes a forward/backward/optimizer step.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from autotune.config import Config
from autotune.errors import UserError
from autotune.modeling import BuiltModel
from autotune.units import gib

# Optimizer arguments that TrainingArguments takes as fields of its own; the rest go to optim_args.
_OPTIM_FIELDS = {"eps": "adam_epsilon"}


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, rows: list[dict]):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


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
    fn: Callable = TYPE_TO_SCHEDULER_FUNCTION[SchedulerType(cfg.lr_scheduler_type)]  # type: ignore[assignment]
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
                logs["gpu_memory_reserved_gb"] = gib(torch.cuda.max_memory_reserved())
                logs["gpu_memory_allocated_gb"] = gib(torch.cuda.max_memory_allocated())
        super().log(logs, start_time)


class _ThroughputStart(TrainerCallback):
    """Starts the tokens/s clock when train() starts, from the tokens the state already counts: a
    resumed run (--resume, or after an OOM) restores num_input_tokens_seen from its checkpoint, and
    those tokens were not processed by this run."""

    def __init__(self, trainer: AutotuneTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._last_log = (time.perf_counter(), int(state.num_input_tokens_seen))


def forget_optimizer_overrides(model: torch.nn.Module) -> None:
    """Undo what the HF Trainer registered for this model in bitsandbytes' process-wide GlobalOptimManager.

    With an 8-bit bitsandbytes optimizer (paged_adamw_8bit, the default) the Trainer registers every
    nn.Embedding for 32-bit optimizer state, and nothing ever removes the entry: the module and its
    vocabulary x hidden weight outlive the model (1.16 GiB for Qwen3-8B). Every later model in the process
    (a solve over several ranks, the next benchmark stage) would be measured with it still resident.
    """
    try:
        from bitsandbytes.optim import GlobalOptimManager
    except ImportError:
        return
    manager = GlobalOptimManager.get_instance()
    ours = {id(m) for m in model.modules()}
    manager.module_weight_config_triple = [t for t in manager.module_weight_config_triple if id(t[0]) not in ours]


def release_trainer(trainer: Trainer, model: torch.nn.Module) -> None:
    """Drop what a finished (or failed) Trainer holds beyond the model, so the next run in this process
    starts from the model alone: optimizer state, scheduler, gradients, bitsandbytes' registry entries."""
    trainer.optimizer = None
    trainer.lr_scheduler = None
    model.zero_grad(set_to_none=True)
    forget_optimizer_overrides(model)


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
