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

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from autotune.catalog import Architecture, check_target_modules
from autotune.config import DEFAULT_TARGET_MODULES, QUANTIZATIONS
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


# The parts an estimate's peak is the sum of, in report order.
COMPONENTS = (
    "weights",
    "lora_params",
    "lora_grads",
    "optimizer_state",
    "activations",
    "logits_and_loss",
    "temporaries",
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


def options_for(cfg, device: str = "cuda", gradient_checkpointing: bool | None = None) -> dict:
    """estimate_peak's keyword arguments for a config (an autotune.config.Config): the one mapping the
    CLI, the solver and the benchmarks share, so their estimates describe the same step."""
    return dict(
        target_modules=cfg.target_modules,
        quantization=cfg.quantization,
        gradient_checkpointing=cfg.gradient_checkpointing if gradient_checkpointing is None else gradient_checkpointing,
        optimizer=cfg.optimizer,
        device=device,
        dtype_bytes=2 if (cfg.bf16 or cfg.fp16) else 4,
        lora_dropout=cfg.lora_dropout,
    )


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
    )

    lora_numels = lora_param_tensors(arch, rank, targets)
    lora = 4 * sum(lora_numels)
    weights = weight_bytes(arch, quantization, dtype_bytes, kbit_prepare, double_quant)
    weights += 2 * (arch.head_dim // 2) * 4  # rotary inv_freq + original_inv_freq buffers (fp32)

    saved, logits = act.saved(), act.loss_head()
    if device != "cpu" and dtype_bytes == 2:
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
    )
    return Estimate(components=components, peak_bytes=sum(components.values()), shape=shape, phase=phase)


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

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    def _layer(self, first: bool = False) -> float:
        return layer_saved_bytes_per_token(
            self.arch,
            rank=self.rank,
            target_modules=self.targets,
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
        saved = self.tokens * L * a * arch.hidden_size  # each layer's input (the previous layer's output)
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
        head = 12 * self.tokens * self.arch.vocab_size
        if self.act_bytes == 4 and self.autocast and self.quantization != "none":
            head += 2 * self.arch.vocab_size * self.arch.hidden_size
        return head

    def layer_backward(self) -> int:
        """The last decoder layer's backward: what every layer saved (under checkpointing, this layer's
        activations recomputed), the incoming hidden-state grad, and the largest burst of: grads inside
        the MLP's backward (`mlp_backward_bytes_per_token`), the LoRA'd down_proj's input copies during
        the recompute, or a k-bit weight's backward matmul (a dequantized copy of the biggest weight plus
        the intermediate-sized grad it produces)."""
        arch, a, tokens = self.arch, self.act_bytes, self.tokens
        h, I = arch.hidden_size, arch.intermediate_size
        burst = tokens * mlp_backward_bytes_per_token(arch, self.targets, a, self.autocast)
        if self.gradient_checkpointing and "down_proj" in self.targets:
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
            burst = max(burst, dequant + I * a * tokens)
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
        """RoPE cos/sin (shared by all layers) and the int64 input ids and shifted labels."""
        return 2 * self.seq * self.arch.head_dim * self.act_bytes + 2 * 8 * self.tokens


def optimizer_step_temporaries(tensor_numels: Sequence[int], device: str) -> int:
    """Extra bytes while the optimizer steps: the foreach implementation (CUDA default) materialises
    sqrt(exp_avg_sq) for all tensors at once; the per-tensor loop (CPU default) one tensor at a time."""
    if not tensor_numels:
        return 0
    return 4 * (sum(tensor_numels) if device != "cpu" else max(tensor_numels))


# ------------------------------------------------------------------------------- the report


def report(ctx, *, batch: int, seq: int, rank: int, device: str, budget: Budget | None = None) -> tuple[Estimate, dict]:
    """`autotune estimate`: the estimate of one shape of a run (a context.RunContext), and a JSON-able
    report of it; with a budget, whether it fits and the largest batch and sequence predicted to fit."""
    arch, cfg = ctx.architecture, ctx.cfg
    options = options_for(cfg, device)
    est = estimate_peak(arch, batch=batch, seq=seq, rank=rank, **options)
    doc = {
        "model": ctx.spec.name,
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
    """
    limit = budget.usable_bytes

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
