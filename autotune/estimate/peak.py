"""A step's peak memory as a sum of named terms, and the moment that sets it.

The terms (`Estimate.terms`), by part of the model:

* weights.layers / weights.embedding / weights.lm_head / weights.other: the base weights on the device
  (state.weight_terms); weights.sharded instead under FSDP;
* lora.params, lora.grads (fp32: peft upcasts adapters of a bf16 model; resident throughout with gradient
  accumulation), optimizer.state;
* layers.saved: what every decoder layer keeps for backward (layers.py: its kinds), with the final norm;
* head.loss: the loss head's backward (head.py); calibration.cuda_logits: what CUDA holds beyond it;
* layers.backward: the last decoder layer's backward, beside what the layers saved;
* optimizer.step: the optimizer's temporaries; misc.inputs: RoPE, ids and labels, packing's mask;
* distributed: DDP's buckets or FSDP's gathered layers; cuda.overhead: the context, plus the calibrated residual.

The peak is the persistent terms plus the largest of three moments (the loss, the last layer's backward, the
optimizer's step) plus the inputs; `Estimate.components` groups the terms as `autotune estimate` reports them.
This package builds no model and runs no step; it imports neither torch nor transformers.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from autotune.catalog import Architecture
from autotune.estimate.head import cuda_logits, final_norm_saved, loss_head, step_inputs
from autotune.estimate.layers import (
    Layer,
    decoder_layers,
    layer_backward,
    layer_groups,
    layer_projections,
    layer_saved,
)
from autotune.estimate.shape import StepShape, shape_of
from autotune.estimate.state import (
    lora_param_tensors,
    optimizer_state_bytes,
    optimizer_step_temporaries,
    per_rank_state,
    weight_terms,
)
from autotune.units import DEFAULT_CUDA_OVERHEAD_BYTES, GiB

# What the GPU trials on record show beyond the arithmetic, and how far off the estimate has been out of sample:
# written by bench/estimate_check.py --write-calibration from bench/results/, read here.
CALIBRATION_PATH = Path(__file__).resolve().parent.parent / "calibration.json"


@functools.cache
def calibration() -> dict:
    """{"residual_bytes": int, "band": {"low": float, "high": float} | None, "trials": int, ...}; an empty
    calibration (no residual, no band) where the file is missing."""
    try:
        return json.loads(CALIBRATION_PATH.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"residual_bytes": 0, "band": None, "trials": 0}


def error_band() -> tuple[float, float] | None:
    """The estimate's out-of-sample error range on the GPU trials on record (estimate / measured - 1)."""
    band = calibration().get("band")
    return (band["low"], band["high"]) if band else None


# The parts an estimate's peak is the sum of, in report order, and the terms each groups.
COMPONENT_TERMS = {
    "weights": ("weights.layers", "weights.embedding", "weights.lm_head", "weights.other", "weights.sharded"),
    "lora_params": ("lora.params",),
    "lora_grads": ("lora.grads",),
    "optimizer_state": ("optimizer.state",),
    "activations": ("layers.saved",),
    "logits_and_loss": ("head.loss", "calibration.cuda_logits"),
    # misc.inputs, and whatever the winning moment holds beyond the saved activations and the loss head
    "temporaries": ("misc.inputs",),
    "distributed": ("distributed",),
    "cuda_overhead": ("cuda.overhead",),
}
COMPONENTS = tuple(COMPONENT_TERMS)
PHASES = ("loss", "layer_backward", "optimizer")


@dataclass
class Estimate:
    components: dict[str, int]
    peak_bytes: int
    shape: dict
    phase: str = "loss"  # the moment of the step that sets the peak: one of PHASES
    terms: dict[str, int] = field(default_factory=dict)

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / GiB

    def to_dict(self) -> dict:
        return asdict(self)


def first_trained_layer(s: StepShape) -> int:
    """The first decoder layer with adapters. Without checkpointing (whose input-grad hook makes the embeddings'
    output need grad) nothing before it needs grad, so autograd keeps nothing there and no backward runs through
    it: a hybrid with adapters on attention only starts at its first gated-attention layer."""
    if s.knobs.checkpointing:
        return 0
    for n, layer in enumerate(decoder_layers(s.arch)):
        if any(t in layer_projections(layer, s.arch) for t in s.target_modules):
            return n
        if s.lora_experts and s.arch.is_sparse(n):
            return n
    return 0


def trained_layers(s: StepShape) -> list[Layer]:
    """The distinct layers a backward runs through (from first_trained_layer on)."""
    layers = decoder_layers(s.arch)[first_trained_layer(s) :]
    return list({id(layer): layer for layer in layers}.values())


def _layers_saved(s: StepShape) -> int:
    """Everything autograd holds when the forward ends (the loss head's log-probs excepted)."""
    groups = layer_groups(s.arch)
    if not s.knobs.checkpointing:
        # The first trained layer's input norm (and the k-bit inputs of q/k/v) keep nothing: its input, the
        # frozen embeddings' output or a frozen layer's, needs no grad; the layers before it keep nothing at all.
        layers, start = decoder_layers(s.arch), first_trained_layer(s)
        per_token = layer_saved(layers[start], s, first=True)
        per_token += sum(layer_saved(layer, s) for layer in layers[start + 1 :])
        fixed = sum(kind.saved_fixed(s) for layer in layers[start:] for kind in layer)
        return int(s.tokens * per_token + fixed + final_norm_saved(s))
    # Each layer's input (the previous layer's output); offloaded, all but the one in use leave the device.
    kept = 1 if s.knobs.offload_activations else s.arch.num_hidden_layers
    saved: float = s.tokens * kept * s.act_bytes * s.arch.hidden_size
    saved += s.tokens * sum(count * kind.kept_through_checkpointing(s) for layer, count in groups for kind in layer)
    return int(saved + final_norm_saved(s))


def estimate(s: StepShape) -> Estimate:
    """Predict the peak memory of a training step once the optimizer state exists (from the second on)."""
    lora_numels = lora_param_tensors(s.arch, s.rank, s.target_modules, s.lora_experts)
    lora = 4 * sum(lora_numels)
    saved = _layers_saved(s)
    terms: dict[str, int] = {
        **weight_terms(s),
        "weights.sharded": 0,
        "lora.params": lora,
        "lora.grads": lora,
        "optimizer.state": optimizer_state_bytes(lora_numels, s.optimizer),
        "layers.saved": saved,
        "head.loss": loss_head(s),
        "calibration.cuda_logits": cuda_logits(s),
        # The last decoder layer's backward, beside everything the layers saved (the final norm's input is gone).
        "layers.backward": int(
            saved - final_norm_saved(s) + max(layer_backward(layer, s) for layer in trained_layers(s))
        ),
        "optimizer.step": optimizer_step_temporaries(lora_numels, s.device, s.optimizer),
        "misc.inputs": step_inputs(s),
        "cuda.overhead": overhead_bytes(s),
    }
    terms.update(per_rank_state(s, lora_numels))
    logits = terms["head.loss"] + terms["calibration.cuda_logits"]
    moments = {"loss": saved + logits, "layer_backward": terms["layers.backward"], "optimizer": terms["optimizer.step"]}
    phase = max(moments, key=lambda k: moments[k])
    components = {name: sum(terms.get(t, 0) for t in parts) for name, parts in COMPONENT_TERMS.items()}
    components["temporaries"] += max(0, moments[phase] - saved - logits)
    return Estimate(
        components=components, peak_bytes=sum(components.values()), shape=s.describe(), phase=phase, terms=terms
    )


def overhead_bytes(s: StepShape) -> int:
    """The CUDA context and library workspaces (0 on the CPU), plus on a GPU the residual the trials on record show
    beyond this arithmetic (calibration(); bench/estimate_check.py fits it and judges it out of sample)."""
    if s.device == "cpu":
        return 0
    overhead = DEFAULT_CUDA_OVERHEAD_BYTES if s.cuda_overhead_bytes is None else s.cuda_overhead_bytes
    if s.calibrated:
        overhead += calibration().get("residual_bytes", 0)
    return overhead


def estimate_peak(arch: Architecture, **values) -> Estimate:
    """estimate() of the shape these keywords describe (shape.shape_of: StepShape's fields, the knobs by name)."""
    return estimate(shape_of(arch, **values))
