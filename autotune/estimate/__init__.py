"""Peak-memory prediction for a Qwen3 LoRA/QLoRA training step, without a GPU.

`estimate(shape)` is arithmetic over the architecture (microseconds), so the solver can place its first trials
and `autotune estimate --model Qwen3-14B --max-memory-gb 16` answers at once; `fit` inverts it.

The model follows what the installed transformers/peft/bitsandbytes allocate in THE training step (the HF Trainer
as `autotune train` runs it: bf16 autocast for a bf16 model, full-length rows as their own labels) on a
`modeling.build_model` model, read off their code and checked against that step measured tensor by tensor with
`memory.CpuTrackedMeter` through the solver's own trial, `trial.TrialRunner.measure` (tests/test_estimate.py).

- shape.py: the one object an estimate takes (StepShape), and the config's shape (shape_for);
- layers.py: the decoder layer's kinds (full attention, dense MLP), what each keeps and what its backward holds;
- head.py: the final norm, the loss head, the step's inputs;
- state.py: weights, adapters, optimizer state, and one rank's share under DDP/FSDP;
- peak.py: the named terms summed, the moment that sets the peak, the calibration;
- run.py: the whole run: each phase's peak (load, step, evaluation, checkpoint) and the host memory;
- fit.py: what fits (largest micro-batch, longest sequence), the strategy, `autotune estimate`'s report.
"""

from autotune.estimate.fit import (
    answer,
    fit,
    largest_fitting,
    pick_strategy,
    plan_techniques,
    report,
    safe_limit,
    strategy_for,
)
from autotune.estimate.peak import (
    CALIBRATION_PATH,
    COMPONENTS,
    Estimate,
    calibration,
    error_band,
    estimate,
    estimate_peak,
)
from autotune.estimate.run import GPU_PHASES, RunPlan, plan_run
from autotune.estimate.shape import StepShape, shape_for, shape_of
from autotune.estimate.state import lora_param_tensors, optimizer_state_bytes, weight_bytes

__all__ = [
    "CALIBRATION_PATH",
    "COMPONENTS",
    "GPU_PHASES",
    "Estimate",
    "RunPlan",
    "StepShape",
    "answer",
    "calibration",
    "error_band",
    "estimate",
    "estimate_peak",
    "fit",
    "largest_fitting",
    "lora_param_tensors",
    "optimizer_state_bytes",
    "pick_strategy",
    "plan_run",
    "plan_techniques",
    "report",
    "safe_limit",
    "shape_for",
    "shape_of",
    "strategy_for",
    "weight_bytes",
]
