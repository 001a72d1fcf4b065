"""The profile document a finished solve writes: its choice, what was measured and predicted, and every trial
(profile.py holds the contract it must meet: the schema, and how train reads it)."""

from __future__ import annotations

import re
from pathlib import Path

from autotune.errors import UserError
from autotune.estimate import RunPlan, plan_run
from autotune.kernels import delta_kernel
from autotune.measurement import Trial
from autotune.profile import CHOICE_KEYS, architecture_hash, new_profile
from autotune.solve.plan import SolveRequest, SolveResult
from autotune.techniques import TECHNIQUES, as_config_values


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-") or "unknown"


def default_profile_path(
    gpu_name: str | None, model_name: str, budget_gb: float, *, world_size: int = 1, strategy: str = "ddp"
) -> Path:
    # Relative to the working directory: solved profiles belong to the user's project, not to autotune.
    ranks = f"__{world_size}x{strategy}" if world_size > 1 else ""
    name = f"{slug(gpu_name or 'cpu')}__{slug(model_name.split('/')[-1])}__{budget_gb:g}GB{ranks}.json"
    return Path("profiles") / "solved" / name


def _run_plan(req: SolveRequest, trial: Trial, eval_batch: int, device_type: str) -> RunPlan | None:
    """The estimate's plan of the whole run at the chosen shape (estimate/run.py), recorded beside the measurement
    its step can be judged by."""
    if trial.knobs is None:
        return None
    try:
        shape = req.shape(device_type, trial.knobs, batch=trial.batch, seq=trial.seq, rank=trial.rank)
    except (ValueError, UserError):
        return None
    return plan_run(shape, eval_batch=eval_batch, samples=req.samples)


def profile_from_solve(
    req: SolveRequest, result: SolveResult, *, hardware: dict, init: str, dtype: str | None, device_type: str
) -> dict:
    """The profile of a finished solve. `init` and `dtype` describe the model the trials ran on
    (trial.TrialRunner.init / .dtype)."""
    cfg, spec, best, budget = req.ctx.cfg, req.ctx.spec, result.best, result.budget
    choice = {
        "batch_size": result.batches.micro,
        "gradient_accumulation_steps": result.batches.accumulation,
        "effective_batch_size": result.batches.effective,
        "max_sequence_length": best.seq,
        "lora_r": best.rank,
        "lora_alpha": cfg.lora_alpha * best.rank / cfg.lora_r,
        "target_modules": list(cfg.target_modules),
        "quantization": cfg.quantization,
        "gradient_checkpointing": cfg.gradient_checkpointing,
        "optimizer": cfg.optimizer,
        "eval_batch_size": result.eval_batch,
        # The techniques the chosen trial ran with, as explicit on/off: train applies exactly them.
        **{name: getattr(cfg, name) for name in TECHNIQUES},
        **(as_config_values(best.knobs) if best.knobs else {}),
        "dtype": dtype,
    }
    runner_up = result.runner_up
    plan = _run_plan(req, best, result.eval_batch, device_type)
    return new_profile(
        hardware=hardware,
        model={
            "name": cfg.model_name,
            "architecture_hash": architecture_hash(spec.architecture),
            "architecture": spec.architecture.facts(),
            "init": init,
            # A hybrid's Gated DeltaNet layers ran on this kernel (kernels.delta_kernel): what the trials measured.
            **({"delta_kernel": delta_kernel(device_type)} if spec.architecture.is_hybrid else {}),
        },
        data=req.data_stats,
        constraints={
            "max_memory_gb": budget.gb,
            "margin": budget.margin,
            "objective": req.objective,
            "usable_bytes": budget.usable_bytes,
            # Every figure of the profile is one rank's of world_size processes sharing the model by `strategy`.
            "world_size": req.world_size,
            "strategy": req.strategy,
            "effective_batch_size": cfg.effective_batch,
            "max_trials": req.max_trials,
            "time_budget_s": req.time_budget_s,
        },
        choice=choice,
        prediction={
            "peak_bytes": best.predicted_bytes,
            "estimate_bytes": plan.step.peak_bytes if plan else None,
            # Each phase's peak on the device (load, step, evaluation, checkpoint) and the host memory, estimated.
            "run": plan.to_dict() if plan else None,
        },
        measurement={
            # "trials": measured steps; "estimate": no step could be measured here (FSDP), the estimate's peak.
            "source": "trials" if best.measured else "estimate",
            "per_rank": req.world_size > 1,
            "ddp_bucket_bytes": best.memory.get("ddp_bucket_bytes"),
            "peak_bytes": best.peak_bytes,
            "peak_fraction_of_budget": (best.peak_bytes or 0) / budget.total_bytes,
            "tokens_per_second": best.tokens_per_second,
            "step_seconds": best.step_seconds,
            "max_feasible_batch": {str(k): v for k, v in result.max_feasible_batch.items()},
            "max_feasible_batch_by_techniques": {
                label: {str(k): v for k, v in by_rank.items()}
                for label, by_rank in result.max_feasible_batch_by_techniques.items()
            },
        },
        runner_up=runner_up.to_dict() if runner_up else None,
        reason=result.reason,
        trials=[t.to_dict() for t in result.trials],
        # What train starts from with --profile alone: the solve's config with the choice applied.
        config={**cfg.to_dict(), **{k: choice[k] for k in CHOICE_KEYS}},
    )
