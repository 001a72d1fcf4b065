"""What a step holds throughout: the base weights, the LoRA adapters, their gradients and the optimizer state,
and what one rank of several holds instead (DDP's buckets, FSDP's shards)."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

from autotune.catalog import Architecture, check_target_modules
from autotune.config import QUANTIZATIONS
from autotune.estimate.layers import NF4_BLOCK, layer_groups, layer_projections
from autotune.estimate.shape import StepShape

# bitsandbytes' 8-bit optimizers keep fp32 state for tensors smaller than this (min_8bit_size).
BNB_MIN_8BIT_SIZE = 4096
BNB_BLOCKWISE = 256  # elements per absmax of the 8-bit optimizer state
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

ROTARY_BUFFERS = 2  # inv_freq and original_inv_freq, fp32, head_dim / 2 each


# ------------------------------------------------------------------------------------------ weights


def lora_param_tensors(
    arch: Architecture, rank: int, target_modules: Sequence[str], experts: bool | None = None
) -> list[int]:
    """Element counts of every LoRA tensor (A: r x in, B: out x r), all layers; `experts`: an MoE model's experts
    carry adapters too (None: whenever it has experts, as lora_experts "auto")."""
    targets = check_target_modules(target_modules, arch)
    experts = arch.is_moe if experts is None else experts
    numels: list[int] = []
    for layer, count in layer_groups(arch):
        shapes = layer_projections(layer, arch)
        own = [n for t in targets if t in shapes for n in (rank * shapes[t][0], shapes[t][1] * rank)]
        own += [n for kind in layer for n in kind.lora_tensors(arch, rank, experts)]
        numels += own * count
    return numels


@functools.cache
def _projection_totals(arch: Architecture) -> tuple[list[int], int, int]:
    """Every projection's elements (all layers), their output widths summed, and the norms' elements."""
    numels: list[int] = []
    rows = norms = 0
    for layer, count in layer_groups(arch):
        shapes = layer_projections(layer, arch).values()
        numels += [i * o for i, o in shapes] * count
        rows += sum(o for _, o in shapes) * count
        norms += sum(kind.norm_elements(arch) for kind in layer) * count
    return numels, rows, norms


@functools.cache
def _unquantized_elements(arch: Architecture) -> int:
    """The layers' frozen weights that are no Linear (an MoE model's experts and routers), in the compute dtype."""
    return sum(kind.unquantized_elements(arch) * count for layer, count in layer_groups(arch) for kind in layer)


@functools.cache
def _expert_elements(arch: Architecture) -> tuple[int, ...]:
    """Every expert matrix's elements, all sparse layers (the fused tensors (experts, out, in) one expert at a
    time, as experts_4bit quantizes them)."""
    per_layer = [o * i for e, o, i in arch.expert_shapes().values() for _ in range(e)] if arch.is_moe else []
    return tuple(per_layer * _sparse_layers(arch))


def _sparse_layers(arch: Architecture) -> int:
    return sum(1 for n in range(arch.num_hidden_layers) if arch.is_sparse(n))


def expert_table_bytes(arch: Architecture, dtype_bytes: int) -> int:
    """An MoE model's experts, all sparse layers, at `dtype_bytes` an element."""
    return sum(_expert_elements(arch)) * dtype_bytes


def experts_nf4_bytes(arch: Architecture) -> int:
    """The experts as experts_4bit stores them: each expert matrix packed two values a byte, a byte per 64-element
    block's absmax, an fp32 absmax per 256 of those and an fp32 offset (double quantization, per expert); per fused
    tensor the two code books (16 and 256 fp32)."""
    tensors = len(arch.expert_shapes()) * _sparse_layers(arch)
    per_expert = (
        math.ceil(n / 2) + math.ceil(n / NF4_BLOCK) + math.ceil(n / NF4_BLOCK / NESTED_BLOCK) * 4 + 4
        for n in _expert_elements(arch)
    )
    return sum(per_expert) + tensors * (16 + 256) * 4


def _quantized_bytes(numels: Sequence[int], quantization: str, rows: int, dtype_bytes: int, double_quant: bool) -> int:
    """Bytes of the projection weights as stored.

    4-bit (bitsandbytes nf4): each projection is packed two values per byte, plus its quantization state: one
    absmax per 64-element block, fp32, or, with double quantization, one uint8 per block plus an fp32 absmax per
    256 blocks (plus code books and an offset per tensor, ~1 KiB). 8-bit (LLM.int8): one byte per element plus an
    fp32 scale per row (`rows`: their output widths, summed)."""
    if quantization == "none":
        return sum(numels) * dtype_bytes
    if quantization == "8bit":
        return sum(numels) + rows * 4
    if quantization != "4bit":
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    total = 0
    for n in numels:
        blocks = math.ceil(n / NF4_BLOCK)
        if double_quant:
            total += math.ceil(n / 2) + blocks + math.ceil(blocks / NESTED_BLOCK) * 4 + NESTED_STATE_CONSTANT
        else:
            total += math.ceil(n / 2) + blocks * 4 + NF4_CODE_BYTES
    return total


def weight_terms(s: StepShape) -> dict[str, int]:
    """The base model's weights on the device, by part. Embeddings, lm_head and norms are never quantized by
    bitsandbytes (`table_bytes`: the compute dtype, fp32 after peft's k-bit preparation). The host embedding
    keeps the input table off the device; the 8-bit head stores lm_head as int8 rows and an fp32 scale a row; the
    4-bit experts store an MoE model's experts in NF4."""
    arch = s.arch
    numels, rows, norms = _projection_totals(arch)
    table_bytes = s.table_bytes
    table = arch.vocab_size * arch.hidden_size
    if s.arch.tie_word_embeddings:
        lm_head = 0
    elif s.knobs.lm_head_8bit:
        lm_head = arch.vocab_size * (arch.hidden_size + 4)
    else:
        lm_head = table * table_bytes
    unquantized = _unquantized_elements(arch) * s.dtype_bytes
    if s.knobs.experts_4bit:  # the experts in NF4 (experts_4bit.py), the routers as they were
        unquantized += experts_nf4_bytes(arch) - sum(_expert_elements(arch)) * s.dtype_bytes
    return {
        "weights.layers": _quantized_bytes(numels, s.quantization, rows, s.dtype_bytes, s.double_quant)
        + norms * table_bytes
        + unquantized,
        "weights.embedding": 0 if s.knobs.embedding_on_cpu else table * table_bytes,
        "weights.lm_head": lm_head,
        # the final norm, and RoPE's inv_freq buffers (fp32)
        "weights.other": arch.hidden_size * table_bytes + ROTARY_BUFFERS * (arch.head_dim // 2) * 4,
    }


def weight_bytes(
    arch: Architecture, quantization: str, dtype_bytes: int, kbit_prepare: bool, double_quant: bool = True
) -> int:
    """Bytes of the base model's weights as loaded (no technique, no RoPE buffers)."""
    s = StepShape(
        arch, 1, 1, 1, quantization=quantization, dtype_bytes=dtype_bytes, kbit_prepare=kbit_prepare,
        double_quant=double_quant,
    )  # fmt: skip
    terms = weight_terms(s)
    return sum(terms.values()) - ROTARY_BUFFERS * (arch.head_dim // 2) * 4


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


def optimizer_step_temporaries(tensor_numels: Sequence[int], device: str, optimizer: str = "adamw_torch") -> int:
    """Extra bytes while the optimizer steps: torch's foreach implementation (CUDA default) materialises
    sqrt(exp_avg_sq) for all tensors at once; the per-tensor loop (CPU default) one tensor at a time; bitsandbytes'
    8-bit optimizers update each tensor in place with one kernel (counted as one tensor's fp32 scratch). An MoE
    model's expert adapters (600M elements for Qwen3-30B-A3B at rank 16) make the difference gigabytes."""
    if not tensor_numels:
        return 0
    one_at_a_time = device == "cpu" or _OPTIMIZER_STATE.get(optimizer.lower(), (8, 8)) is None
    return 4 * (max(tensor_numels) if one_at_a_time else sum(tensor_numels))


# ------------------------------------------------------------------------------------------ ranks


def per_rank_state(s: StepShape, lora_numels: Sequence[int]) -> dict[str, int]:
    """What one rank of `world_size` holds instead of one process's persistent state, as overrides of the
    estimate's terms (the activations and the loss head are per micro-batch, the same on every rank):

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
    if s.world_size <= 1:
        return {"distributed": 0}
    lora_bytes = 4 * sum(lora_numels)
    if s.strategy == "ddp":
        return {"distributed": lora_bytes}
    arch, n, dtype_bytes = s.arch, s.world_size, s.dtype_bytes
    numels = _projection_totals(arch)[0]
    L = arch.num_hidden_layers
    other_bytes = (arch.param_count() - sum(numels)) * s.table_bytes
    if s.quantization == "4bit":
        layer_data = sum(math.ceil(k / 2) for k in numels[: len(numels) // L])
    else:  # "none" (FSDP refuses 8-bit: distributed.check_fsdp)
        layer_data = sum(numels) // L * dtype_bytes
    # An MoE layer's experts and router (never quantized) are sharded and gathered with their layer.
    unquantized = _unquantized_elements(arch)
    other_bytes -= unquantized * s.table_bytes
    layer_data += unquantized // L * dtype_bytes
    stored = layer_data * L + other_bytes
    quant_state = weight_bytes(arch, s.quantization, dtype_bytes, s.kbit_prepare, s.double_quant) - stored
    buffers = ROTARY_BUFFERS * (arch.head_dim // 2) * 4  # on every rank
    layer_lora = lora_bytes // L
    # One layer whole, as FSDP2 gathers it: its stored weights, its norms, its adapters in the compute dtype.
    layer_full = layer_data + (2 * arch.head_dim + 2 * arch.hidden_size) * dtype_bytes + layer_lora // 2
    head_full = arch.vocab_size * arch.hidden_size * dtype_bytes
    gathered = max(2 * layer_full, head_full + layer_full) + layer_lora
    shard = [math.ceil(k / n) for k in lora_numels]
    return {
        **{name: 0 for name in ("weights.layers", "weights.embedding", "weights.lm_head", "weights.other")},
        "weights.sharded": math.ceil(stored / n) + quant_state + buffers,
        "lora.params": math.ceil(lora_bytes / n),
        "lora.grads": math.ceil(lora_bytes / n),
        "optimizer.state": optimizer_state_bytes(shard, s.optimizer),
        "distributed": gathered,
    }
