"""Peak-memory prediction for a Qwen3 LoRA/QLoRA training step, without a GPU.

`estimate_peak` is arithmetic over the architecture (microseconds), so the solver can place its first trials
and `autotune estimate --model Qwen3-14B --max-memory-gb 16` answers at once; `largest_fitting` inverts it.

The model follows what the installed transformers/peft/bitsandbytes allocate in THE training step (the HF
Trainer as `autotune train` runs it: bf16 autocast for a bf16 model, full-length rows as their own labels) on a
`modeling.build_model` model, read off their code and checked against that step measured tensor by tensor
with `memory.CpuTrackedMeter` through the solver's own trial, `trial.TrialRunner.measure`
(tests/test_estimate.py):

* Persistent: the base weights (nf4/int8 packed plus quantization state, the rest in the compute dtype),
  the LoRA adapters (fp32: peft upcasts adapters of a bf16 model), their grads, the optimizer state.
* Saved activations per token and layer (`layer_saved_bytes_per_token`). The frozen base Linears keep
  nothing; the RMSNorms and QK-norms keep an fp32 copy of their input; SDPA keeps q, k, v, its output and a
  logsumexp (no seq^2 term: flash/memory-efficient kernels with `is_causal`); the MLP keeps gate, up and
  silu(gate); each LoRA module keeps its input cast to fp32 (bf16 under autocast) and its rank-r hidden.
  With gradient checkpointing each layer keeps only its input and one layer is recomputed at a time.
* The loss head: transformers upcasts the logits to fp32; in `log_softmax_backward` the saved log-probs,
  their grad and the logits' grad are alive together: 12 bytes per token and vocabulary entry. With
  Qwen3's 151,936-entry vocabulary this is normally the peak of the whole step.
* The last layer's backward: its recompute, bursts of intermediate-sized grads in the MLP's backward, and
  the bf16 weight bitsandbytes dequantizes for a 4-bit matmul's backward; then the optimizer's temporaries.

Peak = persistent + the largest of those moments (+ `cuda_overhead` on a GPU). This module builds no model and
runs no step of its own; it imports neither torch nor transformers.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from autotune.catalog import Architecture, check_target_modules
from autotune.config import DEFAULT_TARGET_MODULES, QUANTIZATIONS
from autotune.techniques import CHUNK_BYTES, ROW_BLOCK, Knobs, chunk_tokens, resolve, tile_tokens
from autotune.units import DEFAULT_CUDA_OVERHEAD_BYTES, Budget, GiB

# bitsandbytes' 8-bit optimizers keep fp32 state for tensors smaller than this (min_8bit_size).
BNB_MIN_8BIT_SIZE = 4096
BNB_BLOCKWISE = 256  # elements per absmax of the 8-bit optimizer state
NF4_BLOCK = 64  # elements per absmax of a 4-bit weight
NESTED_BLOCK = 256  # absmaxes per second-level absmax with double quantization
NF4_CODE_BYTES = 16 * 4  # the nf4 code book (16 fp32), per quantized tensor
# Per tensor with double quantization: nf4 code book, fp32 offset, and the 256-entry fp32 code book of the
# 8-bit absmax quantization.
NESTED_STATE_CONSTANT = NF4_CODE_BYTES + 4 + 256 * 4

_OPTIMIZER_STATE = {
    # bytes of state per trainable element: (large tensors, small tensors); None -> 8-bit rules
    # (HF Trainer `optim` names; unknown names are treated as fp32 AdamW, the conservative choice)
    "adamw_torch": (8, 8),
    "adamw_torch_fused": (8, 8),
    "adamw_apex_fused": (8, 8),
    "adamw": (8, 8),
    "paged_adamw_32bit": (8, 8),
    "adamw_8bit": None,
    "adamw_bnb_8bit": None,
    "paged_adamw_8bit": None,
    "lion_8bit": None,
    "paged_lion_8bit": None,
    "lion_32bit": (4, 4),
    "paged_lion_32bit": (4, 4),
    "adafactor": (4, 4),
    "sgd": (0, 0),
    "adagrad": (4, 4),
    "rmsprop": (4, 4),
}


# The MLP's projections (the rest of catalog.PROJECTIONS are attention's): what the tiled MLP slices.
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")

# What the GPU trials on record show beyond the arithmetic, and how far off the estimate has been out of sample:
# written by bench/estimate_check.py --write-calibration from bench/results/, read here.
CALIBRATION_PATH = Path(__file__).with_name("calibration.json")


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


# The parts an estimate's peak is the sum of, in report order.
COMPONENTS = (
    "weights",
    "lora_params",
    "lora_grads",
    "optimizer_state",
    "activations",
    "logits_and_loss",
    "temporaries",
    "distributed",
    "cuda_overhead",
)


@dataclass
class Estimate:
    components: dict[str, int]
    peak_bytes: int
    shape: dict
    phase: str = "loss"  # the moment of the step that sets the peak: "loss", "layer_backward", "optimizer"

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / GiB

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------- parameters


def lora_param_tensors(arch: Architecture, rank: int, target_modules: Sequence[str]) -> list[int]:
    """Element counts of every LoRA tensor (A: r x in, B: out x r), all layers."""
    shapes = arch.projection_shapes()
    per_layer = [n for t in check_target_modules(target_modules) for n in (rank * shapes[t][0], shapes[t][1] * rank)]
    return per_layer * arch.num_hidden_layers


def _nonlinear_param_counts(arch: Architecture) -> tuple[int, int]:
    """(elements of all projection weights, elements of everything else: embeddings, lm_head, norms)."""
    linear = sum(i * o for i, o in arch.projection_shapes().values()) * arch.num_hidden_layers
    return linear, arch.param_count() - linear


def weight_bytes(
    arch: Architecture, quantization: str, dtype_bytes: int, kbit_prepare: bool, double_quant: bool = True
) -> int:
    """Bytes of the base model's weights.

    4-bit (bitsandbytes nf4): each projection is packed two values per byte, plus its quantization state:
    one absmax per 64-element block, fp32, or, with double quantization, one uint8 per block plus an fp32
    absmax per 256 blocks (plus code books and an offset per tensor, ~1 KiB). 8-bit (LLM.int8): one byte per
    element plus an fp32 scale per row. Embeddings, lm_head and norms are never quantized by
    bitsandbytes; `prepare_model_for_kbit_training` then upcasts them to fp32 (kbit_prepare).
    """
    linear, other = _nonlinear_param_counts(arch)
    numels = [i * o for i, o in arch.projection_shapes().values()] * arch.num_hidden_layers
    if quantization == "none":
        return (linear + other) * dtype_bytes
    other_bytes = other * (4 if kbit_prepare else dtype_bytes)
    if quantization == "8bit":
        rows = sum(o for _, o in arch.projection_shapes().values()) * arch.num_hidden_layers
        return linear + rows * 4 + other_bytes
    if quantization != "4bit":
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    total = other_bytes
    for n in numels:
        blocks = math.ceil(n / NF4_BLOCK)
        if double_quant:
            total += math.ceil(n / 2) + blocks + math.ceil(blocks / NESTED_BLOCK) * 4 + NESTED_STATE_CONSTANT
        else:
            total += math.ceil(n / 2) + blocks * 4 + NF4_CODE_BYTES
    return total


def optimizer_state_bytes(tensor_numels: Sequence[int], optimizer: str) -> int:
    """State the optimizer keeps for the trainable tensors. 8-bit bitsandbytes optimizers: one byte per
    element and state (two for Adam) plus an fp32 absmax per 256 elements, only for tensors of at least
    4096 elements; smaller tensors keep fp32 state."""
    name = optimizer.lower()
    rule = _OPTIMIZER_STATE.get(name, (8, 8))  # unknown names: assume AdamW-like fp32 state (conservative)
    if rule is not None:
        large, small = rule
        return sum(n * (large if n >= BNB_MIN_8BIT_SIZE else small) for n in tensor_numels)
    states = 1 if "lion" in name else 2
    total = 0
    for n in tensor_numels:
        if n >= BNB_MIN_8BIT_SIZE:
            total += states * (n + math.ceil(n / BNB_BLOCKWISE) * 4)
        else:
            total += states * 4 * n
    return total


# ------------------------------------------------------------------------------- activations


def layer_saved_bytes_per_token(
    arch: Architecture,
    *,
    rank: int,
    target_modules: Sequence[str],
    act_bytes: int,
    lora_dropout: float = 0.0,
    first_layer: bool = False,
    quantization: str = "none",
    dropout_mask_bytes: int = 1,
    autocast: bool = False,
) -> float:
    """Bytes autograd keeps per token for one decoder layer when nothing is checkpointed.

    `act_bytes` is the dtype of the hidden states (bf16: 2; fp32: 4, also for k-bit models after
    prepare_model_for_kbit_training, whose fp32 norms turn the residual stream fp32). The first layer's
    input RMSNorm keeps nothing when the embeddings do not require grad (no input-grad hook).
    """
    h, I = arch.hidden_size, arch.intermediate_size
    nh, nkv = arch.num_attention_heads, arch.num_key_value_heads
    q, kv = nh * arch.head_dim, nkv * arch.head_dim
    a = act_bytes
    norm = 4 * h + 4  # fp32 copy of the input + fp32 rsqrt per token
    total: float = norm * (1 if first_layer else 2)
    total += 4 * q + 4 * nh + 4 * kv + 4 * nkv  # q_norm / k_norm: fp32 input + rsqrt per head
    total += a * (2 * q + 2 * kv) + 4 * nh  # SDPA: q, k, v, output, logsumexp
    total += 3 * I * a  # MLP: gate, up, silu(gate)
    total += lora_saved_bytes_per_token(
        arch,
        rank=rank,
        target_modules=target_modules,
        act_bytes=a,
        lora_dropout=lora_dropout,
        dropout_mask_bytes=dropout_mask_bytes,
        first_layer=first_layer,
        autocast=autocast,
    )
    if quantization == "8bit":
        total += int8_saved_bytes_per_token(
            arch,
            target_modules=target_modules,
            act_bytes=a,
            lora_dropout=lora_dropout,
            first_layer=first_layer,
            autocast=autocast,
        )
    return total


def int8_saved_bytes_per_token(
    arch: Architecture,
    *,
    target_modules: Sequence[str],
    act_bytes: int,
    lora_dropout: float = 0.0,
    first_layer: bool = False,
    autocast: bool = False,
) -> float:
    """bitsandbytes' LLM.int8 matmul keeps its input for backward (`ctx.tensors`), even with frozen weights.
    Projections that share an input share the tensor, and so does a LoRA branch whose fp32 cast of that
    input was a no-op (fp32 activations, no dropout, no autocast). Nothing is kept where the input needs no
    grad (the first layer's q/k/v without checkpointing)."""
    q = arch.num_attention_heads * arch.head_dim
    groups = {
        "attn_in": (arch.hidden_size, ("q_proj", "k_proj", "v_proj")),
        "o_in": (q, ("o_proj",)),
        "mlp_in": (arch.hidden_size, ("gate_proj", "up_proj")),
        "down_in": (arch.intermediate_size, ("down_proj",)),
    }
    total = 0
    for name, (width, members) in groups.items():
        if first_layer and name == "attn_in":
            continue
        shared_with_lora = (
            act_bytes == 4 and lora_dropout == 0 and not autocast and any(m in target_modules for m in members)
        )
        if not shared_with_lora:
            total += act_bytes * width
    return total


def lora_saved_bytes_per_token(
    arch: Architecture,
    *,
    rank: int,
    target_modules: Sequence[str],
    act_bytes: int,
    lora_dropout: float = 0.0,
    dropout_mask_bytes: int = 1,
    first_layer: bool = False,
    autocast: bool = False,
) -> float:
    """What the LoRA branches keep per token: lora_A's fp32 input and lora_B's rank-r fp32 input.

    peft casts the module input to the adapter dtype (fp32) per module, so q, k and v each keep their own
    fp32 copy of the same hidden state when the activations are bf16; when they are already fp32 the cast is
    a no-op and the modules that share an input share one tensor. With dropout each module keeps its own
    dropped-out fp32 input plus the dropout mask: bool on CUDA (fused native_dropout), fp32 on the CPU
    (dropout there is input * noise); no mask where the input needs no grad (the first layer's q/k/v
    without checkpointing). Under bf16 autocast (the HF Trainer's mixed precision) lora_A's matmul keeps
    the bf16 cast of that fp32 input instead, one per module, and lora_B's input is bf16 too.
    """
    shapes = arch.projection_shapes()
    targets = check_target_modules(target_modules)
    if autocast:
        total = 0
        for t in targets:
            fan_in = shapes[t][0]
            needs_mask = lora_dropout > 0 and not (first_layer and t in ("q_proj", "k_proj", "v_proj"))
            total += (2 + (dropout_mask_bytes if needs_mask else 0)) * fan_in + 2 * rank
        return total
    total = 4 * rank * len(targets)
    shared_input = {
        "q_proj": "attn_in",
        "k_proj": "attn_in",
        "v_proj": "attn_in",
        "gate_proj": "mlp_in",
        "up_proj": "mlp_in",
    }
    seen: set[str] = set()
    for t in targets:
        fan_in = shapes[t][0]
        if lora_dropout > 0:
            needs_mask = not (first_layer and shared_input.get(t) == "attn_in")
            total += (4 + (dropout_mask_bytes if needs_mask else 0)) * fan_in
        elif act_bytes != 4:
            total += 4 * fan_in
        else:
            group = shared_input.get(t, t)
            if group not in seen:
                seen.add(group)
                total += 4 * fan_in
    return total


def mlp_backward_bytes_per_token(arch: Architecture, targets: Sequence[str], act_bytes: int, autocast: bool) -> float:
    """The largest burst of intermediate-sized grads in the MLP's backward, per token, net of the MLP's
    saved tensors already released at that moment (the layer's saved tensors are counted elsewhere).

    Candidates, in backward order:
    * a LoRA'd down_proj: the grad of its input comes back along both branches, the LoRA one in fp32
      (peft computes it in fp32) or, under autocast, bf16 cast up to fp32 and down again;
    * the act*up product: its grad and the grads of both factors, once down_proj's saved input is gone;
    * a LoRA'd gate/up without autocast: the grad arriving at the fp32 LoRA sum is upcast to fp32,
      scaled, and cast back for the base weight, while the other factor's grad waits; act and up are
      released by then.
    """
    I, a = arch.intermediate_size, act_bytes
    down_input = (2 if autocast else 4) * I if "down_proj" in targets else 0
    bursts = [3 * I * a - down_input]
    if "down_proj" in targets:
        bursts.append((2 + 4 + 2) * I if autocast else 4 * I + a * I)
    if not autocast and ("gate_proj" in targets or "up_proj" in targets):
        bursts.append(8 * I - down_input)
    return max(bursts)


# ------------------------------------------------------------------------------- the estimate


def options_for(cfg, device: str = "cuda", knobs: Knobs | None = None) -> dict:
    """estimate_peak's keyword arguments for a config (an autotune.config.Config) and the techniques a step
    runs with (default: the config's, `auto` resolved): the one mapping the CLI, the solver and the benchmarks
    share, so their estimates describe the same step."""
    if knobs is None:
        from autotune.catalog import resolve_model

        knobs = resolve(cfg, resolve_model(cfg.model_name))
    return dict(
        target_modules=cfg.target_modules,
        quantization=cfg.quantization,
        gradient_checkpointing=knobs.checkpointing,
        optimizer=cfg.optimizer,
        device=device,
        dtype_bytes=2 if (cfg.bf16 or cfg.fp16) else 4,
        lora_dropout=cfg.lora_dropout,
        fused_loss=knobs.fused_loss,
        fused_kernel=fused_kernel(device),
        offload_activations=knobs.offload_activations,
        embedding_on_cpu=knobs.embedding_on_cpu,
        lm_head_8bit=knobs.lm_head_8bit,
        tiled_mlp=knobs.tiled_mlp,
        packing=knobs.packing,
    )


def fused_kernel(device: str) -> str:
    """The fused loss's implementation on `device`, as techniques/fused_loss.kernel_for picks it, told without
    importing anything: liger-kernel on CUDA where it is installed, else the chunked PyTorch loss."""
    return "liger" if device != "cpu" and importlib.util.find_spec("liger_kernel") is not None else "chunked"


def estimate_peak(
    arch: Architecture,
    *,
    batch: int,
    seq: int,
    rank: int,
    target_modules: Sequence[str] = DEFAULT_TARGET_MODULES,
    quantization: str = "4bit",
    gradient_checkpointing: bool = True,
    dtype_bytes: int = 2,
    optimizer: str = "paged_adamw_8bit",
    device: str = "cuda",
    lora_dropout: float = 0.0,
    autocast: bool | None = None,
    kbit_prepare: bool = False,
    double_quant: bool = True,
    cuda_overhead_bytes: int | None = None,
    fused_loss: bool = False,
    fused_kernel: str = "chunked",
    offload_activations: bool = False,
    embedding_on_cpu: bool = False,
    lm_head_8bit: bool = False,
    tiled_mlp: bool = False,
    packing: bool = False,
    calibrated: bool = True,
    world_size: int = 1,
    strategy: str = "ddp",
) -> Estimate:
    """Predict the peak memory of a training step once the optimizer state exists (from the second on).

    quantization: "4bit" (nf4 QLoRA), "8bit" (LLM.int8) or "none" (weights in dtype_bytes).
    autocast: the forward runs under bf16/fp16 autocast, as the HF Trainer does with bf16=True (default:
        when dtype_bytes == 2). Only the LoRA branches change: they keep half-precision inputs.
    kbit_prepare: the k-bit model went through peft's prepare_model_for_kbit_training, which upcasts the
        weights bitsandbytes leaves alone (embeddings, lm_head, norms) to fp32, and with them the hidden
        states. autotune's own preparation (modeling.prepare_for_training) keeps them in the compute
        dtype, hence the default False. Ignored for quantization="none".
    device: "cuda" adds the CUDA context/workspace overhead (cuda_overhead_bytes, default
        DEFAULT_CUDA_OVERHEAD_BYTES); "cpu" predicts what CpuTrackedMeter measures.
    fused_loss, offload_activations, embedding_on_cpu, packing: the step's techniques (autotune/techniques/);
        fused_kernel: "chunked" or "liger" (options_for picks it for the device).
    calibrated: on a GPU, add the residual the GPU trials on record show beyond this arithmetic
        (calibration(); bench/estimate_check.py fits it and judges it out of sample).
    world_size, strategy: the peak of ONE rank of a run of world_size processes (`batch` is that rank's
        micro-batch); per_rank_state says what DDP and FSDP change.
    LoRA gradients are counted as resident throughout (they are, with gradient accumulation).
    """
    if batch < 1 or seq < 1 or rank < 1:
        raise ValueError(f"batch, seq and rank must be >= 1 (got {batch}, {seq}, {rank})")
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    targets = check_target_modules(target_modules)
    kbit_prepare = kbit_prepare and quantization != "none"
    if autocast is None:
        autocast = dtype_bytes == 2
    if world_size < 1 or strategy not in ("ddp", "fsdp"):
        raise ValueError(f"world_size must be >= 1 and strategy ddp or fsdp (got {world_size}, {strategy!r})")
    sharded = strategy == "fsdp" and world_size > 1
    if sharded:
        # Under FSDP each rank holds 1/N of both tables already, and the techniques that move them are refused
        # (distributed.check_fsdp).
        embedding_on_cpu = lm_head_8bit = False
    act = _ActivationModel(
        arch,
        batch=batch,
        seq=seq,
        rank=rank,
        targets=targets,
        quantization=quantization,
        gradient_checkpointing=gradient_checkpointing,
        act_bytes=4 if kbit_prepare else dtype_bytes,
        lora_dropout=lora_dropout,
        dropout_mask_bytes=4 if device == "cpu" else 1,
        autocast=autocast,
        fused_loss=fused_loss,
        fused_kernel=fused_kernel,
        offload_activations=offload_activations and gradient_checkpointing,
        lm_head_8bit=lm_head_8bit and fused_loss and not arch.tie_word_embeddings,
        tiled_mlp=tiled_mlp,
        packing=packing,
    )

    lora_numels = lora_param_tensors(arch, rank, targets)
    lora = 4 * sum(lora_numels)
    weights = weight_bytes(arch, quantization, dtype_bytes, kbit_prepare, double_quant)
    weights += 2 * (arch.head_dim // 2) * 4  # rotary inv_freq + original_inv_freq buffers (fp32)
    if embedding_on_cpu and not arch.tie_word_embeddings:
        # The input-embedding table in host memory (bitsandbytes never quantizes it: compute dtype).
        weights -= arch.vocab_size * arch.hidden_size * (4 if kbit_prepare else dtype_bytes)
    if act.lm_head_8bit:
        # int8_head: the lm_head table as int8 plus an fp32 scale per row, instead of the compute dtype.
        weights += arch.vocab_size * (arch.hidden_size + 4) - arch.vocab_size * arch.hidden_size * dtype_bytes

    saved, logits = act.saved(), act.loss_head()
    if device != "cpu" and dtype_bytes == 2 and not fused_loss:
        # Calibrated on an H200 (bench/results/2026-11-27-NVIDIA-H200.json): on CUDA the measured peak
        # grows by one more half-precision logits tensor per token than the CPU tracker sees (+0.30 MB per
        # token for Qwen3-0.6B, 8B and 14B alike): the autocast bf16 logits stay allocated through the
        # loss backward there.
        logits += 2 * batch * seq * arch.vocab_size
    candidates = {
        "loss": saved + logits,
        "layer_backward": act.layer_backward(),
        "optimizer": optimizer_step_temporaries(lora_numels, device),
    }
    phase = max(candidates, key=lambda k: candidates[k])
    if device == "cpu":
        overhead = 0
    else:
        overhead = DEFAULT_CUDA_OVERHEAD_BYTES if cuda_overhead_bytes is None else cuda_overhead_bytes
        if calibrated:
            overhead += calibration().get("residual_bytes", 0)
    parts = {
        "weights": weights,
        "lora_params": lora,
        "lora_grads": lora,
        "optimizer_state": optimizer_state_bytes(lora_numels, optimizer),
        "activations": saved,
        "logits_and_loss": logits,
        # whatever the winning moment holds beyond saved activations and the loss head, plus small fry
        "temporaries": act.misc() + max(0, candidates[phase] - saved - logits),
        "cuda_overhead": overhead,
    }
    parts.update(
        per_rank_state(
            arch,
            parts,
            lora_numels,
            world_size=world_size,
            strategy=strategy,
            quantization=quantization,
            dtype_bytes=dtype_bytes,
            kbit_prepare=kbit_prepare,
            double_quant=double_quant,
            optimizer=optimizer,
        )
    )
    components = {name: int(parts[name]) for name in COMPONENTS}
    shape = dict(
        batch=batch,
        seq=seq,
        rank=rank,
        quantization=quantization,
        gradient_checkpointing=gradient_checkpointing,
        target_modules=list(targets),
        dtype_bytes=dtype_bytes,
        optimizer=optimizer,
        device=device,
        lora_dropout=lora_dropout,
        autocast=autocast,
        kbit_prepare=kbit_prepare,
        fused_loss=fused_loss,
        fused_kernel=fused_kernel if fused_loss else None,
        offload_activations=offload_activations,
        embedding_on_cpu=embedding_on_cpu,
        lm_head_8bit=act.lm_head_8bit,
        tiled_mlp=tiled_mlp,
        packing=packing,
        world_size=world_size,
        strategy=strategy,
    )
    return Estimate(components=components, peak_bytes=sum(components.values()), shape=shape, phase=phase)


def per_rank_state(
    arch: Architecture,
    parts: dict,
    lora_numels: Sequence[int],
    *,
    world_size: int,
    strategy: str,
    quantization: str,
    dtype_bytes: int,
    kbit_prepare: bool,
    double_quant: bool,
    optimizer: str,
) -> dict:
    """What one rank of `world_size` holds instead of one process's persistent state, as overrides of the
    components (the activations and the loss head are per micro-batch, the same on every rank):

    * DDP (world_size > 1): everything a process holds, plus DDP's gradient buckets (`distributed`): with
      gradient_as_bucket_view off, the Trainer's default, a second copy of the trainable gradients, fp32 like
      the adapters (trial.py measures it with a real DDP: distributed.ddp_bucket_bytes).
    * FSDP2 (world_size > 1; accelerate shards each decoder layer as a unit, the embedding and the head as
      their own): 1/N of the stored weights (4-bit data stored as the compute dtype, bnb_4bit_quant_storage,
      and the embedding, lm_head and norms), of the adapters, their gradients and the optimizer state; each
      rank keeps the 4-bit quantization state whole (it is no parameter, so FSDP does not shard it). Beside the
      shards (`distributed`): the layers gathered whole, the one computing and the next (prefetched), or at the
      loss the head with one layer; and a layer's adapter gradients before their reduce-scatter.
    """
    if world_size <= 1:
        return {"distributed": 0}
    lora_bytes = 4 * sum(lora_numels)
    if strategy == "ddp":
        return {"distributed": lora_bytes}
    n = world_size
    linear, other = _nonlinear_param_counts(arch)
    other_bytes = other * (4 if kbit_prepare else dtype_bytes)
    numels = [i * o for i, o in arch.projection_shapes().values()]
    if quantization == "4bit":
        layer_data = sum(math.ceil(k / 2) for k in numels)
    else:  # "none" (FSDP refuses 8-bit: distributed.check_fsdp)
        layer_data = linear // arch.num_hidden_layers * dtype_bytes
    stored = layer_data * arch.num_hidden_layers + other_bytes
    quant_state = weight_bytes(arch, quantization, dtype_bytes, kbit_prepare, double_quant) - stored
    buffers = 2 * (arch.head_dim // 2) * 4  # rotary inv_freq + original_inv_freq, on every rank
    layer_lora = lora_bytes // arch.num_hidden_layers
    # One layer whole, as FSDP2 gathers it: its stored weights, its norms, its adapters in the compute dtype.
    layer_full = layer_data + (2 * arch.head_dim + 2 * arch.hidden_size) * dtype_bytes + layer_lora // 2
    head_full = arch.vocab_size * arch.hidden_size * dtype_bytes
    gathered = max(2 * layer_full, head_full + layer_full) + layer_lora
    shard = [math.ceil(k / n) for k in lora_numels]
    return {
        "weights": math.ceil(stored / n) + quant_state + buffers,
        "lora_params": math.ceil(lora_bytes / n),
        "lora_grads": math.ceil(lora_bytes / n),
        "optimizer_state": optimizer_state_bytes(shard, optimizer),
        "distributed": gathered,
    }


@dataclass
class _ActivationModel:
    """Bytes of the activations of one step's shape, moment by moment."""

    arch: Architecture
    batch: int
    seq: int
    rank: int
    targets: tuple[str, ...]
    quantization: str
    gradient_checkpointing: bool
    act_bytes: int
    lora_dropout: float
    dropout_mask_bytes: int
    autocast: bool
    fused_loss: bool = False
    fused_kernel: str = "chunked"  # "chunked" (techniques/fused_loss.py) or "liger"
    offload_activations: bool = False
    lm_head_8bit: bool = False
    tiled_mlp: bool = False
    packing: bool = False

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    @property
    def _matmul_bytes(self) -> int:
        """Bytes of lm_head's matmul output: the autocast dtype's, else the activations'."""
        return 2 if self.autocast else self.act_bytes

    @property
    def _mlp_targets(self) -> tuple[str, ...]:
        return tuple(t for t in self.targets if t in MLP_PROJECTIONS)

    def _layer(self, first: bool = False) -> float:
        if self.tiled_mlp:
            # The tiled MLP keeps only its input; its own activations (and its LoRA branches') exist a slice
            # at a time, in its backward.
            attention = tuple(t for t in self.targets if t not in MLP_PROJECTIONS)
            full = self._layer_with(attention or self.targets, first) - (0 if attention else self._lora_mlp())
            return full - 3 * self.arch.intermediate_size * self.act_bytes + self.arch.hidden_size * self.act_bytes
        return self._layer_with(self.targets, first)

    def _lora_mlp(self) -> float:
        mlp = self._mlp_targets
        if not mlp:
            return 0.0
        return lora_saved_bytes_per_token(
            self.arch,
            rank=self.rank,
            target_modules=mlp,
            act_bytes=self.act_bytes,
            lora_dropout=self.lora_dropout,
            dropout_mask_bytes=self.dropout_mask_bytes,
            autocast=self.autocast,
        )

    def _layer_with(self, targets: tuple[str, ...], first: bool) -> float:
        return layer_saved_bytes_per_token(
            self.arch,
            rank=self.rank,
            target_modules=targets,
            act_bytes=self.act_bytes,
            lora_dropout=self.lora_dropout,
            first_layer=first,
            quantization=self.quantization,
            dropout_mask_bytes=self.dropout_mask_bytes,
            autocast=self.autocast,
        )

    def _final_norm(self) -> int:
        return self.tokens * (4 * self.arch.hidden_size + 4)

    def saved(self) -> int:
        """Everything autograd holds when the forward ends (the loss head's log-probs excepted)."""
        arch, a, L = self.arch, self.act_bytes, self.arch.num_hidden_layers
        if not self.gradient_checkpointing:
            # Without the input-grad hook the first layer's input norm (and the k-bit inputs of q/k/v) keep
            # nothing: the frozen embeddings' output needs no grad.
            return int(self.tokens * (self._layer(first=True) + (L - 1) * self._layer()) + self._final_norm())
        # Each layer's input (the previous layer's output); offloaded, all but the one in use leave the device.
        kept = 1 if self.offload_activations else L
        saved = self.tokens * kept * a * arch.hidden_size
        if self.quantization == "8bit":
            # LLM.int8 keeps its inputs as ctx attributes, which checkpointing cannot drop: every layer keeps
            # one copy per distinct projection input.
            q = arch.num_attention_heads * arch.head_dim
            saved += self.tokens * L * a * (2 * arch.hidden_size + q + arch.intermediate_size)
        return saved + self._final_norm()

    def loss_head(self) -> int:
        """The cross entropy's backward (log_softmax_backward): transformers upcasts the logits to fp32; the
        saved log-probs, their grad and the logits' grad are alive at once: 3 x 4 bytes per token and
        vocabulary entry. The forward holds less (bf16 logits + fp32 logits + log-probs).

        An fp32 lm_head (peft's k-bit preparation) under autocast also keeps its bf16 cast of the weight
        for the backward (autocast caches casts of trainable weights only, so this one is a fresh copy)."""
        if self.fused_loss:
            return self._fused_head()
        head = 12 * self.tokens * self.arch.vocab_size
        if self.act_bytes == 4 and self.autocast and self.quantization != "none":
            head += 2 * self.arch.vocab_size * self.arch.hidden_size
        return head

    def _fused_head(self) -> int:
        """The fused loss (techniques/fused_loss.py): the logits of one chunk of tokens at a time. The chunked
        kernel holds a chunk's matmul output and its fp32 copy (forward), or its fp32 gradient and the
        compute-dtype cast of it (backward): 2 + 4 bytes per chunk token and vocabulary entry under bf16, 4 in
        fp32 (the upcast and the cast are no-ops). Beside
        it: the final hidden states it keeps, the gradient it fills for them, one fp32 log-sum-exp a token.
        liger's kernel sizes its chunks to about tokens x hidden elements and computes the hidden states'
        gradient during forward: the same terms at its own chunk."""
        arch, tokens = self.arch, self.tokens
        hidden = tokens * arch.hidden_size * self.act_bytes  # kept by the loss; its gradient, the same again
        per_entry = self._matmul_bytes + (4 if self._matmul_bytes != 4 else 0)  # an fp32 matmul needs no upcast
        if self.lm_head_8bit:
            # int8_head.Int8Head: a block of rows dequantized (and its int8 -> dtype cast) beside a chunk x block
            # of logits, and an fp32 accumulator of the chunk's hidden-state gradient.
            block = min(arch.vocab_size, ROW_BLOCK)
            chunk = min(tokens, max(1, CHUNK_BYTES // (4 * block)))
            rows = 2 * block * arch.hidden_size * self._matmul_bytes
            return per_entry * chunk * block + rows + 4 * chunk * arch.hidden_size + 2 * hidden + 4 * tokens
        if self.fused_kernel == "liger":
            per_chunk = -(-arch.vocab_size // arch.hidden_size)
            chunk = 1 << max(0, math.ceil(math.log2(max(1, -(-tokens // per_chunk)))))
        else:
            chunk = chunk_tokens(arch.vocab_size)
        chunk = min(tokens, chunk)
        return per_entry * chunk * arch.vocab_size + 2 * hidden + 4 * tokens

    def layer_backward(self) -> int:
        """The last decoder layer's backward: what every layer saved (under checkpointing, this layer's
        activations recomputed), the incoming hidden-state grad, and the largest burst of: grads inside
        the MLP's backward (`mlp_backward_bytes_per_token`), the LoRA'd down_proj's input copies during
        the recompute, or a k-bit weight's backward matmul (a dequantized copy of the biggest weight plus
        the intermediate-sized grad it produces)."""
        arch, a, tokens = self.arch, self.act_bytes, self.tokens
        h, I = arch.hidden_size, arch.intermediate_size
        if self.tiled_mlp:
            # One slice's MLP (its activations, its LoRA branches', its backward burst) beside the input
            # gradient the tiled MLP fills for the whole sequence.
            tile = min(tokens, tile_tokens(I, a))
            per_token = (
                3 * I * a + self._lora_mlp() + mlp_backward_bytes_per_token(arch, self.targets, a, self.autocast)
            )
            burst = tile * per_token + tokens * h * a
        else:
            burst = tokens * mlp_backward_bytes_per_token(arch, self.targets, a, self.autocast)
        # The attention's backward: each LoRA'd attention projection rebuilds its fp32 input copy for the
        # adapter's gradients, and the input norm's backward works in fp32 (two hidden-sized fp32 temporaries).
        # The MLP's burst is larger unless the MLP is tiled.
        attention_lora = sum(1 for t in self.targets if t not in MLP_PROJECTIONS)
        burst = max(burst, tokens * (4 * h * attention_lora + 8 * h))
        if self.gradient_checkpointing and "down_proj" in self.targets and not self.tiled_mlp:
            # The recompute reaching down_proj: its input, peft's fp32 copy of it, and (under autocast,
            # where only the bf16 cast is kept) the dropped-out fp32 copy, on top of what is recomputed;
            # the recomputed layer's residual, the MLP's input and down_proj's base output are alive too.
            fp32_copies = (4 if a != 4 else 0) + (4 if self.lora_dropout > 0 and self.autocast else 0)
            burst = max(burst, tokens * (I * (a + fp32_copies) + 3 * h * a))
        if self.quantization != "none":
            biggest = max(i * o for i, o in arch.projection_shapes().values())
            if self.quantization == "4bit":  # bf16 (compute dtype) weight + the fp32 absmax it was scaled by
                dequant = 2 * biggest + math.ceil(biggest / NF4_BLOCK) * 4
            else:  # the int8 weight times its row scales, in the input's dtype
                dequant = a * biggest
            burst = max(burst, dequant + I * a * (min(tokens, tile_tokens(I, a)) if self.tiled_mlp else tokens))
        held: float = self.saved() - self._final_norm()
        if self.gradient_checkpointing:
            # fp32 hidden states: the input norm's fp32 "copy" is the checkpointed input itself. LLM.int8's
            # inputs are not recomputed into the original graph: `saved` already holds them for every layer
            # (the recompute's own copies die with its graph, stopped early once the saved tensors are back).
            recomputed: float = self._layer() - (4 * h if a == 4 else 0)
            if self.quantization == "8bit":
                recomputed -= int8_saved_bytes_per_token(
                    arch,
                    target_modules=self.targets,
                    act_bytes=a,
                    lora_dropout=self.lora_dropout,
                    autocast=self.autocast,
                )
            held += tokens * recomputed
        return int(held + tokens * h * a + burst)

    def misc(self) -> int:
        """RoPE cos/sin (shared by all layers) and the int64 input ids and shifted labels; packed, the
        attention mask sdpa gets for the one row of batch x seq tokens (a boolean tokens x tokens). A row of
        one sample has no boundary for transformers to find (masking_utils.find_packed_sequence_indices), so
        sdpa runs causal without a mask, as unpacked: batch 1, the long-sequence case, pays no mask."""
        rope = 2 * self.seq * self.arch.head_dim * self.act_bytes
        if self.packing:
            mask = self.tokens**2 if self.batch > 1 else 0
            return rope * self.batch + 3 * 8 * self.tokens + mask  # positions run over the whole row
        return rope + 2 * 8 * self.tokens


def optimizer_step_temporaries(tensor_numels: Sequence[int], device: str) -> int:
    """Extra bytes while the optimizer steps: the foreach implementation (CUDA default) materialises
    sqrt(exp_avg_sq) for all tensors at once; the per-tensor loop (CPU default) one tensor at a time."""
    if not tensor_numels:
        return 0
    return 4 * (sum(tensor_numels) if device != "cpu" else max(tensor_numels))


# ------------------------------------------------------------------------------- the report


def report(
    ctx,
    *,
    batch: int,
    seq: int,
    rank: int,
    device: str,
    budget: Budget | None = None,
    world_size: int = 1,
    strategy: str = "ddp",
) -> tuple[Estimate, dict]:
    """`autotune estimate`: the estimate of one shape of a run (a context.RunContext), and a JSON-able
    report of it; with a budget, whether it fits and the largest batch and sequence predicted to fit. With
    world_size > 1 every figure is one rank's (`batch` its micro-batch, `budget` its card: the smallest)."""
    arch, cfg = ctx.architecture, ctx.cfg
    options = {**options_for(cfg, device), "world_size": world_size, "strategy": strategy}
    est = estimate_peak(arch, batch=batch, seq=seq, rank=rank, **options)
    doc = {
        "model": ctx.spec.name,
        "world_size": world_size,
        "strategy": strategy,
        "per_rank": world_size > 1,
        "shape": est.shape,
        "peak_bytes": est.peak_bytes,
        "peak_gb": round(est.peak_gib, 3),
        "phase": est.phase,
        "components_gb": {k: round(v / GiB, 3) for k, v in est.components.items()},
    }
    if budget is not None:
        fit = largest_fitting(
            arch, budget, seq=seq, batch=batch, rank=rank, max_seq=arch.max_position_embeddings, **options
        )
        doc.update(
            max_memory_gb=budget.gb,
            margin=budget.margin,
            fits=est.peak_bytes <= budget.usable_bytes,
            largest_batch_at_seq=fit["batch"],
            largest_seq_at_batch=fit["seq"],
        )
    band = error_band() if device != "cpu" else None
    if band:
        doc["error_band"] = {"low": band[0], "high": band[1], "trials": calibration().get("trials")}
    return est, doc


# ------------------------------------------------------------------------------- what fits


def largest_fitting(
    arch: Architecture,
    budget: Budget,
    *,
    seq: int | None = None,
    batch: int | None = None,
    rank: int,
    max_batch: int = 4096,
    max_seq: int | None = None,
    **options,
) -> dict:
    """The biggest shapes predicted to fit the budget's usable part (the total less the margin).

    Returns "batch": the largest micro-batch at sequence length `seq` (None when no seq is given), and
    "seq": the longest sequence at micro-batch `batch` (default 1), capped at max_seq or the model's
    max_position_embeddings; 0 means not even the smallest shape fits. "at_seq"/"at_batch" echo the
    fixed side. `options` go to estimate_peak (quantization, target_modules, device, ...). The peak grows
    with batch and seq, so a doubling search then bisection takes ~2 log2(limit) estimates (milliseconds).

    On a GPU the answers keep to the safe side of the error band measured on the trials on record: where the
    estimate has come out as much as x% low, a shape counts as fitting only if its estimate does x% better.
    """
    limit = budget.usable_bytes
    band = error_band() if options.get("device", "cuda") != "cpu" else None
    if band and band[0] < 0:
        limit = int(limit * (1 + band[0]))

    def fits(b: int, s: int) -> bool:
        return estimate_peak(arch, batch=b, seq=s, rank=rank, **options).peak_bytes <= limit

    at_batch = batch or 1
    seq_cap = max_seq or arch.max_position_embeddings
    return {
        "batch": None if seq is None else _largest(lambda b: fits(b, seq), max_batch),
        "seq": _largest(lambda s: fits(at_batch, s), seq_cap),
        "at_seq": seq,
        "at_batch": at_batch,
        "budget_bytes": budget.total_bytes,
        "limit_bytes": limit,
        "margin": budget.margin,
    }


def _largest(fits, cap: int) -> int:
    """The largest n in [1, cap] with fits(n), for a monotone fits; 0 if fits(1) is False."""
    if cap < 1 or not fits(1):
        return 0
    lo = 1
    while lo < cap and fits(min(2 * lo, cap)):
        lo = min(2 * lo, cap)
    if lo == cap:
        return cap
    hi = min(2 * lo, cap)  # fits(lo) and not fits(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def pick_strategy(
    arch: Architecture, budget: Budget, *, world_size: int, seq: int, rank: int, **options
) -> tuple[str, str]:
    """`--strategy auto`: DDP when a rank holds the whole model and one sample of `seq` tokens within the budget
    (DDP communicates least: one gradient all-reduce per step), else FSDP (each rank holds 1/N of the model).
    Returns the strategy and why."""
    if world_size <= 1:
        return "ddp", "one process: nothing to shard"
    ddp = estimate_peak(arch, batch=1, seq=seq, rank=rank, world_size=world_size, strategy="ddp", **options)
    if ddp.peak_bytes <= budget.usable_bytes:
        return "ddp", (
            f"auto: DDP, every rank holds the whole model (estimated {ddp.peak_gib:.2f} GiB per rank at batch 1 x "
            f"seq {seq}, within {budget.describe()})"
        )
    return "fsdp", (
        f"auto: FSDP, DDP would need {ddp.peak_gib:.2f} GiB per rank at batch 1 x seq {seq}, over "
        f"{budget.describe()}; FSDP shards the model over {world_size} ranks"
    )
