"""The decoder layer's kinds: what each keeps for backward and what its backward holds at its busiest.

A decoder layer is a sequence of kinds (Qwen3's dense layer: full attention, then a dense MLP), each behind its
RMSNorm; `decoder_layers` lists them per layer. A new architecture (a mixture-of-experts MLP, a linear-attention
block) is a new kind here, not a branch in the arithmetic around it.

Figures follow what the installed transformers/peft/bitsandbytes allocate, read off their code and checked
against the real step (tests/test_estimate.py): the frozen base Linears keep nothing; the RMSNorms and QK-norms
keep an fp32 copy of their input; SDPA keeps q, k, v, its output and a logsumexp (no seq^2 term: flash and
memory-efficient kernels with `is_causal`); the MLP keeps gate, up and silu(gate); each LoRA module keeps its
input cast to fp32 (bf16 under autocast) and its rank-r hidden; LLM.int8 keeps its inputs.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Protocol

from autotune.catalog import ATTENTION_PROJECTIONS, LINEAR_ATTENTION_PROJECTIONS, MLP_PROJECTIONS, Architecture
from autotune.estimate.shape import StepShape
from autotune.techniques import tile_tokens

NF4_BLOCK = 64  # elements per absmax of a 4-bit weight

# transformers' reference gated-delta rule (torch_chunk_gated_delta_rule) works on chunks of this many tokens, a
# row padded up to a whole number of them.
DELTA_CHUNK = 64


class LayerKind(Protocol):
    """One part of a decoder layer with memory of its own."""

    def projections(self, arch: Architecture) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of its linear layers: what LoRA can target, what quantization packs."""
        ...

    def norm_elements(self, arch: Architecture) -> int:
        """Elements of its norms' weights (never quantized)."""
        ...

    def unquantized_elements(self, arch: Architecture) -> int:
        """Elements of its other frozen weights, stored in the compute dtype: bitsandbytes quantizes Linears only
        (an MoE layer's fused experts and its router)."""
        ...

    def lora_tensors(self, arch: Architecture, s_rank: int, experts: bool) -> list[int]:
        """Element counts of the LoRA tensors it holds beyond those of its projections (the experts' adapters)."""
        ...

    def saved_fixed(self, s: StepShape) -> float:
        """Bytes it keeps for backward that do not grow with the tokens (the experts' weights with their LoRA
        update folded in: PEFT builds them whole for every forward)."""
        ...

    def saved(self, s: StepShape, *, first: bool) -> float:
        """Bytes per token it keeps for backward when nothing is checkpointed. `first`: the first layer, whose
        input needs no grad (the frozen embeddings' output) unless checkpointing's input-grad hook asks."""
        ...

    def kept_through_checkpointing(self, s: StepShape) -> float:
        """Bytes per token it keeps even when its layer is checkpointed (tensors stored outside autograd's saved
        tensors, which checkpointing cannot drop)."""
        ...

    def int8_inputs(self, s: StepShape, targets: Sequence[str], *, first: bool = False) -> float:
        """Bytes per token of the inputs LLM.int8's matmuls keep (0 unless quantization is 8bit)."""
        ...

    def bursts(self, s: StepShape, biggest_weight: int) -> list[float]:
        """Candidate transients of its backward, in bytes, beside what the layers saved (the largest counts)."""
        ...


# ------------------------------------------------------------------------------------------ LoRA


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
    targets = tuple(target_modules)
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
        # a DeltaNet block's input projections read the normed hidden state as attention's do
        **dict.fromkeys(LINEAR_ATTENTION_PROJECTIONS[:4], "attn_in"),
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


def _lora_saved(s: StepShape, targets: Sequence[str], first: bool = False) -> float:
    if not targets:
        return 0.0
    return lora_saved_bytes_per_token(
        s.arch,
        rank=s.rank,
        target_modules=targets,
        act_bytes=s.act_bytes,
        lora_dropout=s.lora_dropout,
        dropout_mask_bytes=s.dropout_mask_bytes,
        first_layer=first,
        autocast=bool(s.autocast),
    )


def _int8_groups(s: StepShape, groups: dict, targets: Sequence[str], first: bool) -> float:
    """bitsandbytes' LLM.int8 matmul keeps its input for backward (`ctx.tensors`), even with frozen weights.
    Projections that share an input share the tensor, and so does a LoRA branch whose fp32 cast of that input
    was a no-op (fp32 activations, no dropout, no autocast). Nothing is kept where the input needs no grad (the
    first layer's q/k/v without checkpointing)."""
    if s.quantization != "8bit":
        return 0.0
    total = 0
    for name, (width, members) in groups.items():
        if first and name == "attn_in":
            continue
        shared_with_lora = (
            s.act_bytes == 4 and s.lora_dropout == 0 and not s.autocast and any(m in targets for m in members)
        )
        if not shared_with_lora:
            total += s.act_bytes * width
    return total


def _norm_bytes_per_token(arch: Architecture) -> int:
    """An RMSNorm's fp32 copy of its input and its fp32 rsqrt, per token."""
    return 4 * arch.hidden_size + 4


# ------------------------------------------------------------------------------------------ kinds


class _Linears:
    """A kind whose weights are Linears (projections and norms) and nothing else: its PROJECTIONS, by name."""

    PROJECTIONS: tuple[str, ...] = ()

    def projections(self, arch: Architecture) -> dict[str, tuple[int, int]]:
        shapes = arch.projection_shapes()
        return {p: shapes[p] for p in self.PROJECTIONS}

    def _targets(self, s: StepShape) -> tuple[str, ...]:
        """Its projections that carry adapters."""
        return tuple(t for t in s.target_modules if t in self.PROJECTIONS)

    def unquantized_elements(self, arch: Architecture) -> int:
        return 0

    def lora_tensors(self, arch: Architecture, s_rank: int, experts: bool) -> list[int]:
        return []

    def saved_fixed(self, s: StepShape) -> float:
        return 0.0


class FullAttention(_Linears):
    """Qwen3's attention behind its input RMSNorm: q/k/v/o, per-head QK-norms, RoPE, SDPA."""

    PROJECTIONS = ATTENTION_PROJECTIONS

    def norm_elements(self, arch: Architecture) -> int:
        return 2 * arch.head_dim + arch.hidden_size  # q_norm, k_norm, input_layernorm

    def _groups(self, arch: Architecture) -> dict:
        q = arch.num_attention_heads * arch.head_dim
        return {"attn_in": (arch.hidden_size, ("q_proj", "k_proj", "v_proj")), "o_in": (q, ("o_proj",))}

    def saved(self, s: StepShape, *, first: bool) -> float:
        arch, a = s.arch, s.act_bytes
        nh, nkv = arch.num_attention_heads, arch.num_key_value_heads
        q, kv = nh * arch.head_dim, nkv * arch.head_dim
        total: float = 0 if first else _norm_bytes_per_token(arch)  # the first layer's input norm: no grad needed
        total += 4 * q + 4 * nh + 4 * kv + 4 * nkv  # q_norm / k_norm: fp32 input + rsqrt per head
        total += a * (2 * q + 2 * kv) + 4 * nh  # SDPA: q, k, v, output, logsumexp
        total += _lora_saved(s, self._targets(s), first)
        return total + self.int8_inputs(s, s.target_modules, first=first)

    def kept_through_checkpointing(self, s: StepShape) -> float:
        if s.quantization != "8bit":
            return 0.0
        return s.act_bytes * (s.arch.hidden_size + s.arch.num_attention_heads * s.arch.head_dim)

    def int8_inputs(self, s: StepShape, targets: Sequence[str], *, first: bool = False) -> float:
        return _int8_groups(s, self._groups(s.arch), targets, first)

    def bursts(self, s: StepShape, biggest_weight: int) -> list[float]:
        """Each LoRA'd attention projection rebuilds its fp32 input copy for the adapter's gradients, and the input
        norm's backward works in fp32 (two hidden-sized fp32 temporaries)."""
        h = s.arch.hidden_size
        return [s.tokens * (4 * h * len(self._targets(s)) + 8 * h)]


class GatedAttention(FullAttention):
    """Qwen3.5/3.6's full attention (transformers' Qwen3_5Attention): Qwen3's, with q_proj twice as wide, its second
    half a gate on the attention's output (sigmoid(gate) * output before o_proj), RoPE on a quarter of each head."""

    def saved(self, s: StepShape, *, first: bool) -> float:
        # The gate's sigmoid and the output made contiguous for the product, both kept by it.
        q = s.arch.num_attention_heads * s.arch.head_dim
        return super().saved(s, first=first) + 2 * q * s.act_bytes


class LinearAttention(_Linears):
    """A Qwen3.5/3.6 Gated DeltaNet block behind its input RMSNorm (transformers' Qwen3_5GatedDeltaNet), on
    transformers' reference path (torch_chunk_gated_delta_rule and the causal convolution in PyTorch): q/k/v through
    one projection and a depthwise causal convolution with SiLU, a gate z, per-head write strength b (sigmoid) and
    decay a (softplus), the chunked delta rule in fp32 (queries and keys L2-normed, repeated to the value heads; the
    within-chunk decays, the triangular systems and their solutions per chunk of DELTA_CHUNK tokens; a recurrent
    state of key x value width per value head after every chunk, which the scan keeps for backward), then the gated
    RMSNorm and out_proj. flash-linear-attention's kernels, where installed on a GPU, keep less: this is the bound."""

    PROJECTIONS = LINEAR_ATTENTION_PROJECTIONS

    def norm_elements(self, arch: Architecture) -> int:
        return arch.hidden_size + arch.linear_value_head_dim  # input_layernorm, the gated norm

    def unquantized_elements(self, arch: Architecture) -> int:
        return (
            arch.linear_conv_width * arch.linear_conv_kernel_dim + 2 * arch.linear_num_value_heads
        )  # conv1d, A_log and dt_bias

    def _groups(self, arch: Architecture) -> dict:
        return {
            "attn_in": (arch.hidden_size, self.PROJECTIONS[:4]),
            "out_in": (arch.linear_value_width, ("out_proj",)),
        }

    @staticmethod
    def _padded(s: StepShape) -> float:
        """A row's tokens padded to whole chunks, per token of the row."""
        return math.ceil(s.seq / DELTA_CHUNK) * DELTA_CHUNK / s.seq

    def saved(self, s: StepShape, *, first: bool) -> float:
        arch, a = s.arch, s.act_bytes
        nv = arch.linear_num_value_heads
        value = arch.linear_value_width
        total: float = 0 if first else _norm_bytes_per_token(arch)
        total += 2 * arch.linear_conv_width * a  # the convolution's input, SiLU's input
        total += 4 * value + 4 * 4 * nv  # the gate z in fp32 (the gated norm's SiLU); beta, softplus in and out, decay
        total += self._rule_saved(s) * self._padded(s)
        # The gated norm: its fp32 input and rsqrt, the normed values and SiLU(z) it multiplies.
        total += 4 * value + 4 * nv + value * a + 4 * value
        total += _lora_saved(s, self._targets(s), first)
        return total + self.int8_inputs(s, s.target_modules, first=first)

    @staticmethod
    def _rule_saved(s: StepShape) -> float:
        """Bytes per (chunk-padded) token the gated-delta rule keeps for backward."""
        arch, a = s.arch, s.act_bytes
        nv, chunk = arch.linear_num_value_heads, DELTA_CHUNK
        value = arch.linear_value_width
        if s.delta_kernel == "fla":
            # flash-linear-attention's ChunkGatedDeltaRuleFunction: q and k (their key heads, L2-normed) with their
            # fp32 rstd, v, the fp32 decay, beta and the chunk-local WY matrix A; the states are recomputed.
            k_heads = arch.linear_num_key_heads
            return 2 * arch.linear_key_width * a + 8 * k_heads + value * a + 4 * nv + nv * a + nv * chunk * a
        key = nv * arch.linear_key_head_dim  # queries and keys repeated to the value heads
        # In fp32: q and k before and after their L2 norm (and its scale), k * beta, its decayed copy's solution, the
        # decayed q and k of the scan; v, v * beta's solution, and each chunk's new values; the within-chunk decay
        # matrix, the k.k and q.k products before and after it (chunk entries a head); then the recurrent state
        # entering every chunk, which the scan's matmuls keep.
        rule = 4 * (8 * key + 3 * value + 5 * nv * chunk + 8 * nv)
        return rule + 4 * nv * arch.linear_key_head_dim * arch.linear_value_head_dim / chunk

    def kept_through_checkpointing(self, s: StepShape) -> float:
        if s.quantization != "8bit":
            return 0.0
        return s.act_bytes * (s.arch.hidden_size + s.arch.linear_value_width)

    def int8_inputs(self, s: StepShape, targets: Sequence[str], *, first: bool = False) -> float:
        return _int8_groups(s, self._groups(s.arch), targets, first)

    def bursts(self, s: StepShape, biggest_weight: int) -> list[float]:
        """The rule's backward, beside what it saved: the reference rule's gradients of its per-chunk fp32 tensors
        alive at once; the kernel's recomputed states and their gradients (one of each per chunk), the new values,
        w and u and the gradients of q, k, v."""
        arch, a = s.arch, s.act_bytes
        nv, value = arch.linear_num_value_heads, arch.linear_value_width
        key = nv * arch.linear_key_head_dim
        if s.delta_kernel == "fla":
            states = 2 * nv * arch.linear_key_head_dim * arch.linear_value_head_dim * a / DELTA_CHUNK
            per_token = states + (3 * value + 2 * key + 2 * arch.linear_key_width) * a
        else:
            per_token = 4 * (4 * key + 2 * value + 3 * nv * DELTA_CHUNK)
        return [s.tokens * per_token * self._padded(s)]


class DenseMlp(_Linears):
    """Qwen3's SwiGLU MLP behind its post-attention RMSNorm: gate, up, down; tiled a slice of tokens at a time when
    the tiled MLP is on (techniques/tiled_mlp.py)."""

    PROJECTIONS = MLP_PROJECTIONS

    def norm_elements(self, arch: Architecture) -> int:
        return arch.hidden_size  # post_attention_layernorm

    def _groups(self, arch: Architecture) -> dict:
        return {
            "mlp_in": (arch.hidden_size, ("gate_proj", "up_proj")),
            "down_in": (arch.intermediate_size, ("down_proj",)),
        }

    def _tile(self, s: StepShape) -> int:
        return min(s.tokens, tile_tokens(s.arch.intermediate_size, s.act_bytes))

    def saved(self, s: StepShape, *, first: bool) -> float:
        arch, a = s.arch, s.act_bytes
        total: float = _norm_bytes_per_token(arch)
        if s.knobs.tiled_mlp:
            # The tiled MLP keeps only its input; its own activations (and its LoRA branches') exist a slice at a
            # time, in its backward. (Its LLM.int8 inputs stay counted as if no MLP projection had an adapter
            # where attention has some: no real 8-bit step with the tiled MLP has been measured.)
            attention = tuple(t for t in s.target_modules if t not in self.PROJECTIONS)
            return total + arch.hidden_size * a + self.int8_inputs(s, attention or s.target_modules)
        total += 3 * arch.intermediate_size * a  # gate, up, silu(gate)
        total += _lora_saved(s, self._targets(s))
        return total + self.int8_inputs(s, s.target_modules)

    def kept_through_checkpointing(self, s: StepShape) -> float:
        if s.quantization != "8bit":
            return 0.0
        return s.act_bytes * (s.arch.hidden_size + s.arch.intermediate_size)

    def int8_inputs(self, s: StepShape, targets: Sequence[str], *, first: bool = False) -> float:
        return _int8_groups(s, self._groups(s.arch), targets, first)

    def bursts(self, s: StepShape, biggest_weight: int) -> list[float]:
        arch, a, tokens = s.arch, s.act_bytes, s.tokens
        h, I = arch.hidden_size, arch.intermediate_size
        targets = s.target_modules
        per_token = mlp_backward_bytes_per_token(arch, targets, a, bool(s.autocast))
        if s.knobs.tiled_mlp:
            # One slice's MLP (its activations, its LoRA branches', its backward burst) beside the input gradient
            # the tiled MLP fills for the whole sequence.
            burst = self._tile(s) * (3 * I * a + _lora_saved(s, self._targets(s)) + per_token) + tokens * h * a
        else:
            burst = tokens * per_token
        out = [burst]
        if s.knobs.checkpointing and "down_proj" in targets and not s.knobs.tiled_mlp:
            # The recompute reaching down_proj: its input, peft's fp32 copy of it, and (under autocast, where only
            # the bf16 cast is kept) the dropped-out fp32 copy, on top of what is recomputed; the recomputed
            # layer's residual, the MLP's input and down_proj's base output are alive too.
            fp32_copies = (4 if a != 4 else 0) + (4 if s.lora_dropout > 0 and s.autocast else 0)
            out.append(tokens * (I * (a + fp32_copies) + 3 * h * a))
        if s.quantization != "none":
            # A k-bit weight's backward matmul: a dequantized copy of the biggest weight and the intermediate-sized
            # gradient it produces.
            if s.quantization == "4bit":  # bf16 (compute dtype) weight + the fp32 absmax it was scaled by
                dequant = 2 * biggest_weight + math.ceil(biggest_weight / NF4_BLOCK) * 4
            else:  # the int8 weight times its row scales, in the input's dtype
                dequant = a * biggest_weight
            out.append(dequant + I * a * (self._tile(s) if s.knobs.tiled_mlp else tokens))
        return out


class MoeMlp:
    """Qwen3-MoE's sparse MLP behind its post-attention RMSNorm (transformers' Qwen3MoeSparseMoeBlock): a router
    (a frozen hidden x experts weight, a softmax in fp32, the top k), then `num_experts` SwiGLU experts stored as
    two fused tensors (gate/up and down, never quantized by bitsandbytes), each token's rows gathered, sorted by
    expert and run through grouped matmuls (k routed rows a token), weighted and summed back.

    With adapters on the experts (StepShape.lora_experts) PEFT folds each tensor's low-rank update into a whole
    copy of it every forward (W + B @ A, one baddbmm), which the grouped matmul keeps for backward: a copy of the
    layer's experts per layer, whatever the tokens, and in backward the gradient of that copy, as large.
    The router's load-balancing loss (output_router_logits) keeps a softmax of its logits per layer.

    With the split LoRA (knobs.experts_split_lora, and always with the 4-bit experts) the adapters are applied as two
    thin products per routed expert: no folded copy, no gradient of one; their rank-wide middles are kept. With the
    4-bit experts (knobs.experts_4bit) the experts are NF4 (their bytes: state.weight_terms), each routed expert's
    matrix dequantized for its product and again for its backward (bitsandbytes' matmul_4bit keeps the packed
    bytes): one expert's dequantized matrix at a time."""

    PROJECTIONS: tuple[str, ...] = ()

    def projections(self, arch: Architecture) -> dict[str, tuple[int, int]]:
        return {}  # the experts are tensors, not Linears: nothing for bitsandbytes or target_modules

    def norm_elements(self, arch: Architecture) -> int:
        return arch.hidden_size  # post_attention_layernorm

    def unquantized_elements(self, arch: Architecture) -> int:
        experts = sum(e * o * i for e, o, i in arch.expert_shapes().values())
        return experts + arch.num_experts * arch.hidden_size  # + the router

    def lora_tensors(self, arch: Architecture, s_rank: int, experts: bool) -> list[int]:
        if not experts:
            return []
        # PEFT's ParamWrapper: lora_A (r x experts, in), lora_B (out, r x experts) per fused tensor.
        return [n for e, o, i in arch.expert_shapes().values() for n in (s_rank * e * i, o * s_rank * e)]

    def _routed(self, arch: Architecture) -> int:
        return arch.num_experts_per_tok

    def saved(self, s: StepShape, *, first: bool) -> float:
        arch, a, k = s.arch, s.act_bytes, self._routed(s.arch)
        h, i, e = arch.hidden_size, arch.moe_intermediate_size, arch.num_experts
        total: float = _norm_bytes_per_token(arch)
        total += 4 * e + 8 * k + 4 * k  # the router's fp32 softmax, its top-k indices and weights
        # Per routed row: gate/up's output, silu(gate), down's output (kept by the weighting), the sort's
        # permutation and the row's weight; with adapters on the experts the grouped matmuls also keep their inputs
        # (the gathered row, the product down takes) for the gradient of their weights.
        total += k * ((h + 3 * i) * a + 8 + 8 + a)
        if s.lora_experts:
            total += k * (h + i) * a
            if _split(s):  # the thin products' rank-wide middles, kept for lora_B's gradient
                total += k * 2 * s.rank * a
        total += e * a + 8 * k  # the load-balancing loss: its softmax of the router logits, its top-k indices
        return total

    def kept_through_checkpointing(self, s: StepShape) -> float:
        return 0.0

    def int8_inputs(self, s: StepShape, targets: Sequence[str], *, first: bool = False) -> float:
        return 0.0

    def saved_fixed(self, s: StepShape) -> float:
        if not s.lora_experts or _split(s):
            return 0.0
        return sum(e * o * i for e, o, i in s.arch.expert_shapes().values()) * s.dtype_bytes

    def bursts(self, s: StepShape, biggest_weight: int) -> list[float]:
        arch, a, k, tokens = s.arch, s.act_bytes, self._routed(s.arch), s.tokens
        h, i = arch.hidden_size, arch.moe_intermediate_size
        # The gradients of the routed rows: gate/up's output and the product's factors, beside down's input grad.
        out: list[float] = [tokens * k * (4 * i + h) * a]
        largest = max(o * i for _, o, i in arch.expert_shapes().values())
        if s.knobs.experts_4bit:
            # One routed expert's matrix dequantized for its input's gradient, beside that gradient.
            out.append(largest * s.dtype_bytes)
        elif s.lora_experts and not _split(s):
            # The gradient of the folded copy of the largest expert tensor, twice: the grouped matmul's, for the
            # transposed weight it multiplied by, and its transpose made contiguous for the adapters' gradients.
            out.append(2 * max(e * o * i for e, o, i in arch.expert_shapes().values()) * s.dtype_bytes)
        return out


def _split(s: StepShape) -> bool:
    """Whether the experts' adapters are applied as thin products (split_lora.py), never folded into the experts."""
    return s.knobs.experts_split_lora or s.knobs.experts_4bit


class SharedExpert(DenseMlp):
    """A hybrid MoE's shared expert beside its routed ones (transformers' Qwen3_5MoeSparseMoeBlock): a dense SwiGLU
    MLP of width intermediate_size (catalog: the shared expert's), scaled by a sigmoid gate (a hidden x 1 Linear) and
    added to the experts' output. It reads the experts' normed input (their kind counts that norm)."""

    def projections(self, arch: Architecture) -> dict[str, tuple[int, int]]:
        return super().projections(arch) | {"shared_expert_gate": (arch.hidden_size, 1)}

    def norm_elements(self, arch: Architecture) -> int:
        return 0

    def saved(self, s: StepShape, *, first: bool) -> float:
        # Its MLP less the norm (MoeMlp's), plus the gate's sigmoid and the expert's output its product keeps.
        return super().saved(s, first=first) - _norm_bytes_per_token(s.arch) + s.act_bytes * (s.arch.hidden_size + 1)


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


# ------------------------------------------------------------------------------------------ layers


Layer = tuple[LayerKind, ...]


@functools.cache
def decoder_layers(arch: Architecture) -> tuple[Layer, ...]:
    """The kinds of every decoder layer, in order: attention (a hybrid's gated attention, or its Gated DeltaNet
    block), then a dense MLP or (an MoE model's sparse layers) the experts."""
    attention = GatedAttention() if arch.is_hybrid else FullAttention()
    # A hybrid's sparse layer has a shared expert beside the routed ones.
    sparse_mlp: tuple[LayerKind, ...] = (MoeMlp(), SharedExpert()) if arch.is_hybrid else (MoeMlp(),)
    layers: dict[tuple[bool, bool], Layer] = {
        (linear, sparse): (LinearAttention() if linear else attention, *(sparse_mlp if sparse else (DenseMlp(),)))
        for linear in (False, True)
        for sparse in (False, True)
    }
    return tuple(layers[arch.is_linear(n), arch.is_sparse(n)] for n in range(arch.num_hidden_layers))


@functools.cache
def layer_groups(arch: Architecture) -> tuple[tuple[Layer, int], ...]:
    """The distinct layers and how many of each (most models repeat one layer), in order of first appearance:
    sums over the layers take each distinct one once."""
    counts: dict[int, list] = {}
    for layer in decoder_layers(arch):
        counts.setdefault(id(layer), [layer, 0])[1] += 1
    return tuple((layer, n) for layer, n in counts.values())


@functools.cache
def layer_projections(layer: Layer, arch: Architecture) -> dict[str, tuple[int, int]]:
    return {name: shape for kind in layer for name, shape in kind.projections(arch).items()}


def layer_saved(layer: Sequence[LayerKind], s: StepShape, *, first: bool = False) -> float:
    """Bytes per token one layer keeps for backward when nothing is checkpointed."""
    return sum(kind.saved(s, first=first) for kind in layer)


def layer_backward(layer: Sequence[LayerKind], s: StepShape) -> float:
    """The layer's own share of the moment its backward is busiest: under checkpointing its activations recomputed
    (less what `kept_through_checkpointing` already holds, and the input norm's fp32 "copy", which for fp32 hidden
    states is the checkpointed input itself), the incoming hidden-state grad, and the largest burst of its kinds."""
    arch, tokens = s.arch, s.tokens
    biggest = max((i * o for i, o in layer_projections(layer, arch).values()), default=0)
    burst = max(b for kind in layer for b in kind.bursts(s, biggest))
    own = 0.0
    if s.knobs.checkpointing:
        own += sum(kind.saved_fixed(s) for kind in layer)
        recomputed = layer_saved(layer, s) - (4 * arch.hidden_size if s.act_bytes == 4 else 0)
        # LLM.int8's inputs are not recomputed into the original graph: the layers already hold them (the
        # recompute's own copies die with its graph, stopped early once the saved tensors are back).
        recomputed -= sum(kind.int8_inputs(s, s.target_modules) for kind in layer)
        own = tokens * recomputed
    return own + tokens * arch.hidden_size * s.act_bytes + burst
