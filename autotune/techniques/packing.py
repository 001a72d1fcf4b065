"""Padding-free packing: a micro-batch's samples are concatenated into one row, with no padding at all.

Rows padded to the longest sample of a micro-batch spend compute and activation memory on pad tokens: real
QA data is short and uneven (the guide's data: p50 about 50 tokens, p99 about 90). Packed, a micro-batch of
`batch_size` samples is one row of exactly their tokens; transformers' own `DataCollatorWithFlattening`
writes it (position ids restarting at 0 per sample, the first label of each sample ignored so no sample
predicts from the one before), and transformers' mask builder sees the restarting positions and blocks
attention at sample boundaries (for sdpa, eager and flex attention alike; the model must run with
use_cache=False, which modeling.build_model sets). A micro-batch still holds `batch_size` samples, so the
effective batch keeps counting samples and stays exactly what was asked.

What it costs: sdpa gets an explicit (1, 1, T, T) boolean mask for the packed row (T = the micro-batch's
tokens), where an unpacked causal batch needs none; the estimate counts it. A row of one sample (batch 1) has
no boundary to block, so transformers builds no mask and sdpa runs causal: packing costs nothing there.
"""

from __future__ import annotations

from transformers import DataCollatorWithFlattening

from autotune.data.encoding import IGNORE_INDEX, CausalLMCollator


def collator_for(packing: bool, pad_token_id: int, *, max_length: int, pad_to_length: int | None = None):
    """The step's collator: packed rows, or rows right-padded (to the longest sample, rounded up to a multiple
    of 8 for tensor cores but never past max_length; or to exactly `pad_to_length`, a trial's worst case)."""
    if packing:
        return DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)
    if pad_to_length is not None:
        return CausalLMCollator(pad_token_id, pad_to_length=pad_to_length)
    return CausalLMCollator(pad_token_id, pad_to_multiple_of=8 if max_length % 8 == 0 else None)
