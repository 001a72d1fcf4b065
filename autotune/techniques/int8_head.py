"""The frozen lm_head in 8-bit: vocabulary x hidden int8 with one fp32 scale per row, half the bf16 table.

lm_head is frozen under LoRA and, with the fused loss, read only a slice at a time: the loss dequantizes
one block of rows at a time (`rows`), so the full table never exists in the compute dtype. bitsandbytes'
Linear8bitLt would not do here: its backward rebuilds the whole bf16 weight, at the peak of the step.
Row-wise symmetric int8 (scale = max |row| / 127) keeps each logit within half a quantization step of every
weight; the loss it gives is held to the bf16 loss in tests/test_techniques.py (the tolerance is stated there).

For untied models only (Qwen3-8B/14B/32B): a tied table is also the input embedding, and techniques.check
refuses the switch there. `set_int8_head` switches it in and out; the bf16 table waits in host memory while the
int8 one is in use, so a solver trial can measure both on one model build.
"""

from __future__ import annotations

import torch
from torch import nn

from autotune.memory import HOST_TENSOR, host_memory
from autotune.techniques import QUANTIZE_ROWS, ROW_BLOCK, Place


class Int8Head(nn.Module):
    """lm_head as int8 rows and fp32 row scales. `rows(start, end, dtype)` dequantizes a block; forward (used
    outside the fused loss: generation, evaluation with logits) goes block by block too."""

    qweight: torch.Tensor
    scale: torch.Tensor

    def __init__(self, linear: nn.Linear, device: torch.device):
        super().__init__()
        weight = linear.weight.detach()
        on_host = getattr(linear.weight, HOST_TENSOR, False)  # loaded on the host (modeling.load_base_model)
        qweight = torch.empty(weight.shape, dtype=torch.int8, device=device)
        scale = torch.empty(weight.shape[0], dtype=torch.float32, device=device)
        # A block of rows at a time, on the device: the fp32 copies exist for one block, not for the whole table
        # (QUANTIZE_ROWS), and from a table on the host only that block crosses to the device.
        for start in range(0, weight.shape[0], QUANTIZE_ROWS):
            rows = weight[start : start + QUANTIZE_ROWS].to(device, torch.float32, copy=True)  # divided in place
            block = rows.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / 127
            scale[start : start + QUANTIZE_ROWS] = block
            qweight[start : start + QUANTIZE_ROWS] = torch.round(rows.div_(block[:, None]))
            del rows
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        # The compute-dtype table, kept to switch back: host memory, not the device's (used as it is where it was
        # loaded there).
        if on_host:
            self.original_weight = weight
        else:
            with host_memory():
                self.original_weight = weight.to("cpu", copy=True)
        self.out_features, self.in_features = weight.shape

    def rows(self, start: int, end: int, dtype: torch.dtype) -> torch.Tensor:
        return self.qweight[start:end].to(dtype) * self.scale[start:end, None].to(dtype)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if hidden.numel() == 0:
            # The fused loss asks for no logits (logits_to_keep empty): dequantizing the rows for an empty
            # product would leave every block saved in the graph for a backward that never needs them.
            return hidden.new_zeros(*hidden.shape[:-1], self.out_features)
        dtype = (
            torch.get_autocast_dtype(hidden.device.type)
            if torch.is_autocast_enabled(hidden.device.type)
            else hidden.dtype
        )
        blocks = [
            hidden.to(dtype) @ self.rows(start, min(start + ROW_BLOCK, self.out_features), dtype).t()
            for start in range(0, self.out_features, ROW_BLOCK)
        ]
        return torch.cat(blocks, dim=-1)


def set_int8_head(model, on: bool, place: Place) -> bool:
    """Swap `model`'s (a transformers PreTrainedModel) lm_head for its int8 form, or back (on `place.device`).
    Returns whether anything changed."""
    current = model.get_output_embeddings()
    if on == isinstance(current, Int8Head):
        return False
    if on:
        head: nn.Module = Int8Head(current, place.device)
        current.weight = None  # the compute-dtype table goes; its host copy stays with the int8 head
    else:
        head = nn.Linear(current.in_features, current.out_features, bias=False, device="meta")
        head.weight = nn.Parameter(current.original_weight.to(place.device, copy=True), requires_grad=False)
    model.set_output_embeddings(head)
    return True
