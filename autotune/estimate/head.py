"""The model's ends: the final norm, the loss head (lm_head and the cross entropy), and the step's inputs."""

from __future__ import annotations

import math

from autotune.estimate.shape import StepShape
from autotune.techniques import CHUNK_BYTES, ROW_BLOCK, chunk_tokens


def final_norm_saved(s: StepShape) -> int:
    """The final RMSNorm's fp32 copy of its input and fp32 rsqrt, kept for backward."""
    return s.tokens * (4 * s.arch.hidden_size + 4)


def loss_head(s: StepShape) -> int:
    """The cross entropy's backward (log_softmax_backward): transformers upcasts the logits to fp32; the saved
    log-probs, their grad and the logits' grad are alive at once: 3 x 4 bytes per token and vocabulary entry.
    With Qwen3's 151,936-entry vocabulary this is normally the peak of the whole step. The forward holds less
    (bf16 logits + fp32 logits + log-probs).

    An fp32 lm_head (peft's k-bit preparation) under autocast also keeps its bf16 cast of the weight for the
    backward (autocast caches casts of trainable weights only, so this one is a fresh copy)."""
    if s.knobs.fused_loss:
        return _fused_head(s)
    head = 12 * s.tokens * s.arch.vocab_size
    if s.act_bytes == 4 and s.autocast and s.quantization != "none":
        head += 2 * s.arch.vocab_size * s.arch.hidden_size
    return head


def _fused_head(s: StepShape) -> int:
    """The fused loss (techniques/fused_loss.py): the logits of one chunk of tokens at a time. The chunked kernel
    holds a chunk's matmul output and its fp32 copy (forward), or its fp32 gradient and the compute-dtype cast of
    it (backward): 2 + 4 bytes per chunk token and vocabulary entry under bf16, 4 in fp32 (the upcast and the
    cast are no-ops). Beside it: the final hidden states it keeps, the gradient it fills for them, one fp32
    log-sum-exp a token. liger's kernel sizes its chunks to about tokens x hidden elements and computes the hidden
    states' gradient during forward: the same terms at its own chunk."""
    arch, tokens = s.arch, s.tokens
    hidden = tokens * arch.hidden_size * s.act_bytes  # kept by the loss; its gradient, the same again
    per_entry = s.matmul_bytes + (4 if s.matmul_bytes != 4 else 0)  # an fp32 matmul needs no upcast
    if s.knobs.lm_head_8bit:
        # int8_head.Int8Head: a block of rows dequantized (and its int8 -> dtype cast) beside a chunk x block of
        # logits, and an fp32 accumulator of the chunk's hidden-state gradient.
        block = min(arch.vocab_size, ROW_BLOCK)
        chunk = min(tokens, max(1, CHUNK_BYTES // (4 * block)))
        rows = 2 * block * arch.hidden_size * s.matmul_bytes
        return per_entry * chunk * block + rows + 4 * chunk * arch.hidden_size + 2 * hidden + 4 * tokens
    if s.fused_kernel == "liger":
        per_chunk = -(-arch.vocab_size // arch.hidden_size)
        chunk = 1 << max(0, math.ceil(math.log2(max(1, -(-tokens // per_chunk)))))
    else:
        chunk = chunk_tokens(arch.vocab_size)
    chunk = min(tokens, chunk)
    return per_entry * chunk * arch.vocab_size + 2 * hidden + 4 * tokens


def cuda_logits(s: StepShape) -> int:
    """Calibrated on an H200 (bench/results/2026-11-27-NVIDIA-H200.json): on CUDA the measured peak grows by one
    more half-precision logits tensor per token than the CPU tracker sees (+0.30 MB per token for Qwen3-0.6B, 8B
    and 14B alike): the autocast bf16 logits stay allocated through the loss backward there."""
    if s.device != "cpu" and s.dtype_bytes == 2 and not s.knobs.fused_loss:
        return 2 * s.tokens * s.arch.vocab_size
    return 0


def step_inputs(s: StepShape) -> int:
    """RoPE cos/sin (shared by all layers) and the int64 input ids and shifted labels; packed, the attention mask
    sdpa gets for the one row of batch x seq tokens (a boolean tokens x tokens). A row of one sample has no
    boundary for transformers to find (masking_utils.find_packed_sequence_indices), so sdpa runs causal without a
    mask, as unpacked: batch 1, the long-sequence case, pays no mask."""
    rope = 2 * s.seq * s.arch.head_dim * s.act_bytes
    if s.knobs.packing:
        mask = s.tokens**2 if s.batch > 1 else 0
        return rope * s.batch + 3 * 8 * s.tokens + mask  # positions run over the whole row
    return rope + 2 * 8 * s.tokens
