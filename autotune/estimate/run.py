"""The whole run, not only its step: the peak of each phase on the device, and the host memory the run holds.

A run that fits its step can still fail around it. `plan_run(shape)` answers for each phase, as one rank's bytes:

* load: the model as `modeling.build_model` builds it. from_pretrained puts every weight on the device except the
  tables a technique keeps on the host (the host embedding's table, the compute-dtype lm_head the 8-bit head is
  quantized from: loaded there, never on the device), and bitsandbytes quantizes each projection after it lands
  (`load.quantize`: the largest in the compute dtype, one at a time); the LoRA adapters are attached; then the
  switches run: the 8-bit head is quantized a block of rows at a time on the device (its int8 rows and fp32 scales
  are the step's `weights.lm_head`; `load.lm_head_8bit`: one block in fp32 and its absolute values). Under FSDP each
  rank loads its shard (accelerate's cpu_ram_efficient_loading).
* step: the training step (peak.estimate), the phase that normally decides.
* eval: a forward without gradients at the evaluation batch, beside the weights, adapters and optimizer state
  (the Trainer has set the gradients to None by then).
* save: a checkpoint: the persistent state and a contiguous copy of the largest adapter tensor on its way to the
  host.

And the host (`host`): the process (torch, transformers, the CUDA context's host side), a tensor staged on its
way to the device while loading, the tables the techniques keep there (the host embedding; the 8-bit head keeps
the table it replaced, to switch back; the 4-bit experts' full-precision experts while they are quantized), the offloaded layer inputs (pinned on CUDA: torch's caching host
allocator rounds each block up to a power of two and keeps it for the next step), the host embedding's pinned
rows, a checkpoint's copy of the adapters and optimizer state, the dataset. `autotune export` runs on the CPU:
`export_host` is its own figure.

Each technique's row names the load and host terms it changes (Technique.load, Technique.host); tests/
test_techniques_table.py holds the plan to them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from autotune.estimate.head import cuda_logits, loss_head, step_inputs
from autotune.estimate.layers import layer_groups, layer_projections
from autotune.estimate.peak import Estimate, estimate, overhead_bytes
from autotune.estimate.shape import StepShape
from autotune.estimate.state import expert_table_bytes, lora_param_tensors, weight_terms
from autotune.techniques import QUANTIZE_ROWS
from autotune.units import GiB

# The process before any weight: torch, transformers, peft and bitsandbytes imported (0.47 GiB resident, measured
# with psutil on a CPU after importing autotune.runner), and on CUDA the host side of the context and its libraries
# (cuBLAS, cuDNN), taken as another GiB until bench/gpu_check.sh measures it (each trial's `host_rss_bytes`).
PROCESS_HOST_BYTES = {"cpu": GiB // 2, "cuda": 3 * GiB // 2}
# A merged export holds one layer of the base and one output shard at a time (export.py).
EXPORT_SHARD_BYTES = 2 * GiB
# Bytes per token of a prepared dataset row held in memory: input ids, labels and attention mask, int64 each.
DATASET_BYTES_PER_TOKEN = 3 * 8

# The phases of a run on the device, and their names in what autotune prints.
GPU_PHASES = {"load": "load", "step": "step", "eval": "evaluation", "save": "checkpoint"}


def pinned_block(nbytes: int) -> int:
    """What torch's caching host allocator takes for a pinned block of `nbytes`: the next power of two."""
    return 1 << max(0, (nbytes - 1).bit_length()) if nbytes > 0 else 0


@dataclass
class RunPlan:
    """One rank's run: the device's peak in each phase (GPU_PHASES) and the host memory the run holds."""

    phases: dict[str, int]  # bytes at each phase's peak, on the device
    phase_terms: dict[str, dict[str, int]]  # what each phase's bytes are made of
    host: dict[str, int]  # the host's terms while training
    export_host_bytes: int  # `autotune export --merge`, on the CPU
    step: Estimate = field(repr=False)

    @property
    def peak_bytes(self) -> int:
        """The run's peak on the device: the largest phase."""
        return max(self.phases.values())

    @property
    def phase(self) -> str:
        return max(self.phases, key=lambda k: self.phases[k])

    @property
    def host_bytes(self) -> int:
        return sum(self.host.values())

    def to_dict(self) -> dict:
        doc = asdict(self)
        doc.pop("step")
        doc.update(peak_bytes=self.peak_bytes, phase=self.phase, host_bytes=self.host_bytes)
        return doc


def load_terms(s: StepShape) -> dict[str, int]:
    """The device while `build_model` loads and switches the model (the module docstring, `load`)."""
    lora = 4 * sum(lora_param_tensors(s.arch, s.rank, s.target_modules, s.lora_experts))
    if s.sharded:
        step = estimate(s).terms
        weights = {"weights.sharded": step["weights.sharded"]}
        lora = step["lora.params"]
    else:
        weights = weight_terms(s)  # the tables on the host never reach the device
    largest = max(i * o for layer, _ in layer_groups(s.arch) for i, o in layer_projections(layer, s.arch).values())
    # int8_head.Int8Head, while it quantizes a block of rows: their fp32 copy and its absolute values.
    int8_head = 2 * 4 * QUANTIZE_ROWS * s.arch.hidden_size if s.knobs.lm_head_8bit else 0
    # experts_4bit.Nf4Table, while it quantizes an expert: its matrix copied to the device in the compute dtype, and
    # bitsandbytes' packed bytes and block statistics of it.
    expert = max((o * i for _, o, i in s.arch.expert_shapes().values()), default=0) if s.arch.is_moe else 0
    return {
        **weights,
        "lora.params": lora,
        "load.quantize": largest * s.dtype_bytes if s.quantization != "none" and not s.sharded else 0,
        "load.lm_head_8bit": int8_head,
        "load.experts_4bit": expert * (s.dtype_bytes + 1) if s.knobs.experts_4bit else 0,
        "cuda.overhead": overhead_bytes(s),
    }


def _persistent(terms: dict[str, int], *, grads: bool) -> dict[str, int]:
    keep = ("weights.", "lora.params", "optimizer.state", "distributed", "cuda.overhead")
    picked = {k: v for k, v in terms.items() if k.startswith(keep)}
    if grads:
        picked["lora.grads"] = terms["lora.grads"]
    return picked


def eval_terms(s: StepShape, step: Estimate, eval_batch: int) -> dict[str, int]:
    """The device during an evaluation forward at `eval_batch` (no gradients, nothing saved for backward)."""
    e = replace(s, batch=eval_batch)
    # loss_head counts the cross entropy's backward too: an evaluation holds less (its forward's logits and
    # log-probs), so this keeps to the safe side.
    return {
        **_persistent(step.terms, grads=False),
        "head.loss": loss_head(e),
        "calibration.cuda_logits": cuda_logits(e),
        "misc.inputs": step_inputs(e),
    }


def save_terms(s: StepShape, step: Estimate) -> dict[str, int]:
    """The device while a checkpoint is written: the persistent state, and a contiguous copy of an adapter tensor."""
    return {
        **_persistent(step.terms, grads=False),
        "save.staging": 4 * max(lora_param_tensors(s.arch, s.rank, s.target_modules, s.lora_experts)),
    }


def host_terms(s: StepShape, step: Estimate, *, samples: int | None = None) -> dict[str, int]:
    """The host while the run trains (the module docstring, `host`)."""
    arch = s.arch
    table = arch.vocab_size * arch.hidden_size * s.table_bytes
    on_cuda = s.device != "cpu"
    layer_input = s.tokens * arch.hidden_size * s.act_bytes
    offloaded = s.knobs.offload_activations and s.knobs.checkpointing
    if offloaded:
        block = pinned_block(layer_input) if on_cuda else layer_input
        offload = arch.num_hidden_layers * block
    else:
        offload = 0
    rows = s.tokens * arch.hidden_size * s.dtype_bytes
    lora_numels = lora_param_tensors(s.arch, s.rank, s.target_modules, s.lora_experts)
    return {
        "host.process": PROCESS_HOST_BYTES["cuda" if on_cuda else "cpu"],
        # from_pretrained reads each tensor before it moves to the device: at most the largest, a table.
        "host.load_staging": table,
        "host.embedding": table if s.knobs.embedding_on_cpu else 0,
        "host.lm_head_copy": table if s.knobs.lm_head_8bit else 0,
        "host.offload": offload,
        # The experts in the compute dtype, loaded on the host for experts_4bit to quantize onto the device, freed
        # as it does: the host's peak while the model loads (counted with the rest, to the safe side).
        "host.experts": expert_table_bytes(arch, s.dtype_bytes) if s.knobs.experts_4bit else 0,
        "host.embedding_rows": (pinned_block(rows) if on_cuda else 0) if s.knobs.embedding_on_cpu else 0,
        "host.checkpoint": 4 * sum(lora_numels) + step.terms["optimizer.state"],
        "host.dataset": (samples or 0) * s.seq * DATASET_BYTES_PER_TOKEN,
    }


def export_host_bytes(s: StepShape) -> int:
    """`autotune export --merge`: the process, one decoder layer of the base in the compute dtype with its adapters
    merged, one output shard, and the adapter itself."""
    layer = max(sum(i * o for i, o in layer_projections(layer, s.arch).values()) for layer, _ in layer_groups(s.arch))
    lora = 4 * sum(lora_param_tensors(s.arch, s.rank, s.target_modules, s.lora_experts))
    return PROCESS_HOST_BYTES["cpu"] + 2 * layer * s.dtype_bytes + EXPORT_SHARD_BYTES + lora


def plan_run(s: StepShape, *, eval_batch: int | None = None, samples: int | None = None) -> RunPlan:
    """The whole run of the step `s`: each phase's peak on the device, and the host memory. `eval_batch`: the
    evaluation's micro-batch (default: the step's); `samples`: the dataset's rows, where known."""
    step = estimate(s)
    terms = {
        "load": load_terms(s),
        "step": step.components,
        "eval": eval_terms(s, step, eval_batch or s.batch),
        "save": save_terms(s, step),
    }
    phases = {name: sum(parts.values()) for name, parts in terms.items()}
    return RunPlan(
        phases=phases,
        phase_terms=terms,
        host=host_terms(s, step, samples=samples),
        export_host_bytes=export_host_bytes(s),
        step=step,
    )
