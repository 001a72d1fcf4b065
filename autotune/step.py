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
from transformers.trainer_utils import unwrap_peft_model

from autotune.checkpoint import save_checkpoint
from autotune.config import Config
from autotune.distributed import save_checkpoint_collectively, strategy_arguments
from autotune.errors import UserError
from autotune.evaluation import evaluate_with_oom_recovery
from autotune.modeling import BuiltModel
from autotune.techniques.fused_loss import linear_cross_entropy
from autotune.techniques.int8_head import Int8Head
from autotune.trackers import check_report_to, trainer_report_to
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
    check_report_to(cfg)  # an unknown or uninstalled tracker


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
    # Under torchrun: DDP's or FSDP's arguments (one process: none).
    ranks = strategy_arguments(cfg.distributed_strategy, on_cpu, built.spec.architecture.decoder_layer_class)
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
        prediction_loss_only=True,  # evaluation reports the loss; it never needs the logits kept
        eval_steps=cfg.save_every_n_steps,
        # The config's trackers, passed through; TensorBoard is attached by runner.py, in the config's folder.
        # A run that does not log (a solver trial) reports nowhere.
        report_to=trainer_report_to(cfg) if log else "none",
        disable_tqdm=not progress,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=not on_cpu,
        # Packed rows have no padding (and no attention mask to count it by): every token is real.
        include_num_input_tokens_seen="all" if built.knobs.packing else "non_padding",
        **ranks,
    )


class AutotuneTrainer(Trainer):
    """The HF Trainer plus the fused loss (techniques/fused_loss.py) when `fused_loss` is on, and throughput and
    memory in every log record (TensorBoard and JSONL see them)."""

    fused_loss = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._aux_losses = []
        self._last_log = (time.perf_counter(), 0)
        self.add_callback(_ThroughputStart(self))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """With the fused loss, the model runs without labels and keeps no logits (`logits_to_keep` empty); a
        forward hook on the decoder hands over its final hidden states, and the loss comes from them and
        lm_head's weight. Going through model(...) keeps what wraps it (accelerate's autocast, peft, DDP).
        A mixture-of-experts model's loss includes its router's load-balancing loss times the model's
        coefficient, as transformers adds it; the auxiliary loss is also logged on its own (`aux_loss`)."""
        if not self.fused_loss or "labels" not in inputs:
            loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
        else:
            base = unwrap_peft_model(self.accelerator.unwrap_model(model))
            loss, outputs = fused_causal_lm_loss(model, base, inputs, num_items_in_batch)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes  # as the base class: the DDP mean undoes it
        aux = getattr(outputs, "aux_loss", None)
        if isinstance(aux, torch.Tensor) and model.training:
            self._aux_losses.append(aux.detach())
        return (loss, outputs) if return_outputs else loss

    _aux_losses: list

    def log(self, logs: dict, start_time: float | None = None) -> None:
        if "loss" in logs and self._aux_losses:  # the router's auxiliary loss since the last record
            logs["aux_loss"] = round(torch.stack(self._aux_losses).float().mean().item(), 6)
            self._aux_losses.clear()
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

    # name -> JSON document written into every checkpoint (autotune train: the config, for --resume's checks)
    checkpoint_files: dict | None = None

    def _save_checkpoint(self, model, trial) -> None:
        # Staged then renamed (a checkpoint-N folder is always whole), free space checked first, a full disk a
        # UserError naming the last good checkpoint: checkpoint.py. The Trainer's own code writes the files.
        # Under torchrun every rank writes its part of a save into one staging folder (distributed.py).
        save = save_checkpoint_collectively if self.args.world_size > 1 else save_checkpoint
        save(self, super()._save_checkpoint, model, trial, self.checkpoint_files or {})

    # An evaluation OOM on one of several ranks: set for the runner, which has every rank restart with a smaller
    # evaluation batch (trainer._restart_for_oom); the other ranks wait in evaluation's gather meanwhile.
    oom_in_evaluation = False

    def evaluate(self, *args, **kwargs) -> dict:
        if self.args.world_size > 1:
            try:
                return super().evaluate(*args, **kwargs)
            except torch.OutOfMemoryError:
                self.oom_in_evaluation = True
                raise
        # An evaluation OOM halves the evaluation batch, never the training micro-batch: evaluation.py.
        return evaluate_with_oom_recovery(self, super().evaluate, *args, **kwargs)


def fused_causal_lm_loss(model, base, inputs: dict, num_items_in_batch=None):
    """The causal-LM loss of `model` (the PeftModel, or what wraps it) on `inputs`, through the fused loss:
    `base` (the Qwen3ForCausalLM inside) runs without labels and keeps no logits (`logits_to_keep` empty); a
    forward hook on its decoder hands over the final hidden states, and the loss comes from them and lm_head
    (its weight, or the 8-bit head). Returns (loss, the model's outputs)."""
    inputs = dict(inputs)
    labels = inputs.pop("labels")
    captured: dict = {}
    hook = base.model.register_forward_hook(lambda module, args, out: captured.update(h=out.last_hidden_state))
    try:
        outputs = model(
            **inputs, use_cache=False, logits_to_keep=torch.empty(0, dtype=torch.long, device=labels.device)
        )
    finally:
        hook.remove()
    head = base.lm_head if isinstance(base.lm_head, Int8Head) else base.lm_head.weight
    loss = linear_cross_entropy(captured.pop("h"), head, labels, num_items_in_batch=num_items_in_batch)
    aux = getattr(outputs, "aux_loss", None)
    if aux is not None:  # what transformers adds when it computes the loss itself (Qwen3MoeForCausalLM.forward)
        loss = loss + base.router_aux_loss_coef * aux.to(loss.device)
    return loss, outputs


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
    trainer = AutotuneTrainer(
        model=built.model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=collator,
        callbacks=callbacks or [],
        processing_class=tokenizer,
    )
    trainer.fused_loss = built.knobs.fused_loss
    return trainer
