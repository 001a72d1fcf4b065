"""The loss without the full logits: cross-entropy straight from the final hidden states and lm_head's weight.

The plain step computes logits for every token over Qwen3's 151,936-token vocabulary, upcasts them to fp32
and keeps the log-probabilities for backward: about 12 bytes per token and vocabulary entry (1.8 MB a token),
the peak of most Qwen3 LoRA steps. Here the logits of a chunk of tokens exist only while that chunk is
processed:

- On CUDA, liger-kernel's fused linear cross-entropy where it imports (triton kernels; gradients computed
  during forward).
- Everywhere else, `ChunkedLinearCrossEntropy`: an autograd.Function that keeps the hidden states (a
  reference), one fp32 log-sum-exp per token, and recomputes each chunk's logits in backward. Plain PyTorch,
  so the CPU tests, the CPU memory tracker and the estimate see exactly this path.

Both compute what transformers' `ForCausalLMLoss` computes: logits in the compute dtype upcast to fp32,
labels shifted left by one, -100 ignored, summed and divided by `num_items_in_batch` when the Trainer passes
it (its per-token normalisation under gradient accumulation), else the mean over labelled tokens.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import is_fake

from autotune.data.encoding import IGNORE_INDEX
from autotune.errors import UserError
from autotune.techniques import CHUNK_BYTES, ROW_BLOCK, chunk_tokens, fused_kernel
from autotune.techniques.int8_head import Int8Head


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype lm_head's matmul runs in: autocast's where autocast is on (as nn.Linear would), else the input's."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return hidden.dtype


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum over tokens of (logsumexp(h W^T) - (h W^T)[target]), for the tokens whose target is not ignored.

    Forward keeps `hidden` and `weight` (references, no copies), the targets and one fp32 log-sum-exp per
    token; backward recomputes each chunk's logits, turns them into softmax - onehot in place and multiplies
    back. A weight that requires grad (an unfrozen lm_head) gets its gradient too.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk, compute_dtype):
        valid = targets != IGNORE_INDEX
        safe = targets.clamp(min=0)  # an ignored target picks any column; `valid` zeroes its term
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(compute_dtype)  # no copy when lm_head is already in the compute dtype
            lse = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            for start in range(0, hidden.shape[0], chunk):
                end = min(start + chunk, hidden.shape[0])
                logits = (hidden[start:end].to(compute_dtype) @ w.t()).float()
                lse[start:end] = torch.logsumexp(logits, dim=-1)
                picked = logits.gather(1, safe[start:end, None]).squeeze(1)
                total += ((lse[start:end] - picked) * valid[start:end]).sum()
                del logits
        ctx.save_for_backward(hidden, weight, safe, valid, lse)
        ctx.chunk, ctx.compute_dtype = chunk, compute_dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        hidden, weight, safe, valid, lse = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dtype, chunk = ctx.compute_dtype, ctx.chunk
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            for start in range(0, hidden.shape[0], chunk):
                end = min(start + chunk, hidden.shape[0])
                h = hidden[start:end].to(dtype)
                grad = (h @ w.t()).float()
                grad.sub_(lse[start:end, None]).exp_()  # softmax, in place
                grad[torch.arange(end - start, device=grad.device), safe[start:end]] -= 1.0
                grad.mul_((valid[start:end] * grad_total.float())[:, None])
                grad_logits = grad.to(dtype)  # the plain graph casts the fp32 grad back to the logits' dtype
                del grad
                if grad_hidden is not None:
                    grad_hidden[start:end] = (grad_logits @ w).to(hidden.dtype)
                if grad_weight is not None:
                    grad_weight.addmm_(grad_logits.t().float(), h.float())
                del grad_logits, h
        return (
            grad_hidden,
            grad_weight.to(weight.dtype) if grad_weight is not None else None,
            None,
            None,
            None,
        )


class BlockedHeadCrossEntropy(torch.autograd.Function):
    """The same loss for a frozen head read a block of rows at a time (int8_head.Int8Head.rows): per chunk of
    tokens, the log-sum-exp runs over the vocabulary blocks online (a running max and sum), so neither the
    logits nor the table ever exist whole in the compute dtype. The head is frozen: only `hidden` gets a grad."""

    @staticmethod
    def forward(ctx, hidden, head, targets, chunk, block, compute_dtype):
        valid = targets != IGNORE_INDEX
        safe = targets.clamp(min=0)
        vocab = head.out_features
        with torch.autocast(hidden.device.type, enabled=False):
            lse = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            for start in range(0, hidden.shape[0], chunk):
                end = min(start + chunk, hidden.shape[0])
                h = hidden[start:end].to(compute_dtype)
                running = torch.full((end - start,), -math.inf, dtype=torch.float32, device=hidden.device)
                picked = torch.zeros(end - start, dtype=torch.float32, device=hidden.device)
                for v0 in range(0, vocab, block):
                    v1 = min(v0 + block, vocab)
                    logits = (h @ head.rows(v0, v1, compute_dtype).t()).float()
                    running = torch.logaddexp(running, torch.logsumexp(logits, dim=-1))
                    inside = (safe[start:end] >= v0) & (safe[start:end] < v1)
                    column = (safe[start:end] - v0).clamp(0, v1 - v0 - 1)
                    picked += logits.gather(1, column[:, None]).squeeze(1) * inside
                    del logits
                lse[start:end] = running
                total += ((running - picked) * valid[start:end]).sum()
        ctx.save_for_backward(hidden, safe, valid, lse)
        ctx.head, ctx.chunk, ctx.block, ctx.compute_dtype = head, chunk, block, compute_dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        hidden, safe, valid, lse = ctx.saved_tensors
        head, chunk, block, dtype = ctx.head, ctx.chunk, ctx.block, ctx.compute_dtype
        vocab = head.out_features
        grad_hidden = torch.zeros_like(hidden)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], chunk):
                end = min(start + chunk, hidden.shape[0])
                h = hidden[start:end].to(dtype)
                scale = (valid[start:end] * grad_total.float())[:, None]
                acc = torch.zeros((end - start, hidden.shape[1]), dtype=torch.float32, device=hidden.device)
                for v0 in range(0, vocab, block):
                    v1 = min(v0 + block, vocab)
                    rows = head.rows(v0, v1, dtype)
                    grad = (h @ rows.t()).float()
                    grad.sub_(lse[start:end, None]).exp_()
                    inside = (safe[start:end] >= v0) & (safe[start:end] < v1)
                    column = (safe[start:end] - v0).clamp(0, v1 - v0 - 1)
                    grad.scatter_add_(1, column[:, None], -inside.float()[:, None])
                    grad.mul_(scale)
                    acc += (grad.to(dtype) @ rows).float()
                    del grad, rows
                grad_hidden[start:end] = acc.to(hidden.dtype)
        return grad_hidden, None, None, None, None, None


@functools.cache
def _liger():
    """liger-kernel's functional fused loss. techniques.fused_kernel chose it (installed, on CUDA), and the estimate
    and the solver counted on it: a broken install is said, not silently swapped for the chunked loss."""
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError as exc:
        raise UserError(
            f"liger-kernel is installed but its fused loss does not import ({exc}): repair it (pip install -U "
            'liger-kernel), uninstall it to use the chunked PyTorch loss, or set fused_loss "off"'
        ) from None
    return liger_fused_linear_cross_entropy


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor | Int8Head,
    labels: torch.Tensor,
    *,
    num_items_in_batch: torch.Tensor | int | None = None,
    shift: bool = True,
    chunk: int | None = None,
) -> torch.Tensor:
    """The causal-LM loss of `hidden` (B, T, H) against lm_head's `weight` (V, H), or an 8-bit head read a block
    of rows at a time, and `labels` (B, T).

    `shift=True` takes labels as the model sees them (predict token t+1 at position t), as transformers' loss
    does; `shift=False` takes labels already shifted (a packing collator's). The reduction follows
    transformers: sum / num_items_in_batch when given, else the mean over labelled tokens.
    """
    if shift:
        labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = labels.reshape(-1).to(flat_hidden.device)
    labelled = targets != IGNORE_INDEX
    count = labelled.sum()
    # A traced step (fake tensors: estimate tests' traces of full-width models) has no values to select by.
    if not is_fake(targets) and 0 < int(count) < targets.numel():
        # Only the labelled tokens reach the head: an ignored one (a prompt's, the padding's) adds nothing to the
        # loss or to any gradient, and in supervised fine-tuning with the answers alone as labels it is often half
        # the tokens or more, while the head is most of a step's compute at Qwen3's 151,936-token vocabulary. (The
        # count is read once on the host: a CUDA sync per step, small beside the head's matmuls it saves.)
        flat_hidden, targets = flat_hidden[labelled], targets[labelled]
    if isinstance(weight, Int8Head):
        # A token chunk x vocabulary block of fp32 logits within the chunk budget, as for the full table.
        block = min(weight.out_features, ROW_BLOCK)
        chunk = chunk or max(1, CHUNK_BYTES // (4 * block))
        total = BlockedHeadCrossEntropy.apply(flat_hidden, weight, targets, chunk, block, _compute_dtype(flat_hidden))
    elif fused_kernel(flat_hidden.device.type) == "liger":
        liger = _liger()
        total = liger(flat_hidden, weight, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    else:
        chunk = chunk or chunk_tokens(weight.shape[0])
        total = ChunkedLinearCrossEntropy.apply(flat_hidden, weight, targets, chunk, _compute_dtype(flat_hidden))
    if num_items_in_batch is None:
        return total / count  # nan for no labelled token, as F.cross_entropy gives
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch
