"""An MoE model's fused expert tensors stored in NF4, dequantized one routed expert at a time.

bitsandbytes quantizes the Linears of a model it loads in 4-bit; a Qwen3-MoE's experts are two 3-D parameters
(transformers' Qwen3MoeExperts: gate/up (experts, 2 x width, hidden) and down (experts, hidden, width)), which it
leaves in bf16: about 53 of Qwen3-30B-A3B's 57 GiB. This technique stores each expert's two matrices as
bitsandbytes NF4 (its quantize_4bit with double quantization, as its 4-bit loading stores the Linears: about 4.13
bits a weight), and runs the
experts a token is routed to through bitsandbytes' matmul_4bit, which dequantizes the expert's matrix for the
product and again for the backward (it keeps the packed bytes, not the dequantized matrix): the bf16 table never
exists on the device, one expert's matrix at a time does.

The adapters stay PEFT's. LoRA on the experts (lora_experts) is PEFT's ParamWrapper around the experts module,
whose forward folds its low-rank update into a whole copy of the fused tensor (W + B @ A) before the experts run.
Here the wrappers' forward hands the input straight to `Nf4Experts`, which reads their factors and adds each routed
expert's update as two thin products (x @ A_e^T @ B_e^T, scaled), what the folded tensor computes without building
it: the split LoRA of split_lora.py, whose forward it shares. The wrappers, their names and their saved adapter are PEFT's own, so the adapter a run saves loads with
`PeftModel.from_pretrained` on the bf16 model (and `autotune export --merge` folds it into the released tensors).

`set_experts_4bit` switches a built model in and out (modeling.apply_knobs): a solver trial measures both on one
build. Switching on frees the experts' full-precision tensors (a 30B-A3B's would not fit beside the NF4 ones on a
24 GB card, nor wait in host memory at 57 GiB); switching back dequantizes the NF4 values into them (what a trial
measures is the memory, which is the same). Real weights are loaded with the experts in host memory
(modeling.load_base_model, the row's host_table) and quantized onto the device an expert at a time.
"""

from __future__ import annotations

import torch
from torch import nn

from autotune.estimate.layers import NF4_BLOCK as BLOCK  # bitsandbytes' NF4 block: elements per absmax
from autotune.estimate.state import NESTED_BLOCK  # absmaxes per fp32 absmax with double quantization
from autotune.techniques import Place
from autotune.techniques.split_lora import (
    EXPERT_TENSORS,
    ThinFactorExperts,
    attach,
    experts_slots,
    wrappers_around,
)


class Nf4Table(nn.Module):
    """One fused expert tensor (experts, out, in) in NF4 with double quantization, the QLoRA recipe bitsandbytes'
    4-bit loading uses for the Linears: per expert, bitsandbytes' quantize_4bit of its (out, in) matrix (packed two
    values a byte; a 64-element block's absmax as one byte, itself quantized in blocks of 256 with an fp32 absmax
    and an offset), laid out expert after expert so that one expert's state is a slice of each buffer."""

    packed: torch.Tensor
    absmax: torch.Tensor
    absmax2: torch.Tensor
    offset: torch.Tensor
    code: torch.Tensor
    code2: torch.Tensor

    def __init__(self, weight: torch.Tensor, device: torch.device, dtype: torch.dtype):
        import bitsandbytes.functional as bnbf

        super().__init__()
        experts, out, inp = weight.shape
        if (out * inp) % BLOCK:
            raise ValueError(f"an expert's {out} x {inp} matrix is not a whole number of {BLOCK}-element blocks")
        self.experts, self.out_features, self.in_features, self.dtype = experts, out, inp, dtype
        self.blocks = out * inp // BLOCK
        self.blocks2 = -(-self.blocks // NESTED_BLOCK)
        buffers = {
            "packed": torch.empty(experts * out * inp // 2, dtype=torch.uint8, device=device),
            "absmax": torch.empty(experts * self.blocks, dtype=torch.uint8, device=device),
            "absmax2": torch.empty(experts * self.blocks2, dtype=torch.float32, device=device),
            "offset": torch.empty(experts, dtype=torch.float32, device=device),
        }
        state = None
        # One expert at a time, on the device: only that expert's matrix crosses from the host (or is copied).
        for e in range(experts):
            matrix = weight[e].to(device, dtype, copy=True)
            q, state = bnbf.quantize_4bit(matrix, blocksize=BLOCK, quant_type="nf4", compress_statistics=True)
            buffers["packed"][self._slice(e, out * inp // 2)] = q.view(-1)
            buffers["absmax"][self._slice(e, self.blocks)] = state.absmax
            buffers["absmax2"][self._slice(e, self.blocks2)] = state.state2.absmax
            buffers["offset"][e] = state.offset
            del matrix, q
        assert state is not None and state.state2 is not None
        buffers |= {"code": state.code, "code2": state.state2.code}
        # Buffers, so that .to() and the memory meters see them; not persistent: the adapter is what a run saves.
        for name, tensor in buffers.items():
            self.register_buffer(name, tensor, persistent=False)

    @staticmethod
    def _slice(e: int, per: int) -> slice:
        return slice(e * per, (e + 1) * per)

    def state(self, e: int):
        """Expert e's bitsandbytes QuantState (views of this table's buffers)."""
        import bitsandbytes.functional as bnbf

        nested = bnbf.QuantState(
            absmax=self.absmax2[self._slice(e, self.blocks2)],
            code=self.code2,
            blocksize=NESTED_BLOCK,
            dtype=torch.float32,
        )
        return bnbf.QuantState(
            absmax=self.absmax[self._slice(e, self.blocks)],
            shape=torch.Size((self.out_features, self.in_features)),
            code=self.code,
            blocksize=BLOCK,
            quant_type="nf4",
            dtype=self.dtype,
            offset=self.offset[e],
            state2=nested,
        )

    def expert_bytes(self, e: int) -> torch.Tensor:
        """Expert e's packed bytes, as bitsandbytes' Params4bit holds them ((n / 2, 1) uint8)."""
        return self.packed[self._slice(e, self.out_features * self.in_features // 2)].view(-1, 1)

    def matmul(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """x @ W_e^T through bitsandbytes' matmul_4bit: W_e dequantized for the product and again in backward."""
        import bitsandbytes as bnb

        return bnb.matmul_4bit(x, self.expert_bytes(e).t(), quant_state=self.state(e))

    def dequantized(self) -> torch.Tensor:
        """The whole table in its compute dtype (switching the technique off; the equality test's reference)."""
        import bitsandbytes.functional as bnbf

        return torch.stack([bnbf.dequantize_4bit(self.expert_bytes(e), self.state(e)) for e in range(self.experts)]).to(
            self.dtype
        )


class Nf4Experts(ThinFactorExperts, nn.Module):
    """An experts module (transformers' Qwen3MoeExperts and its Qwen3.5 twin) with its fused tensors in NF4: the
    split-LoRA forward (split_lora.ThinFactorExperts: transformers' eager loop over the experts hit, the adapters of
    PEFT's wrappers added per routed expert) with each expert's matrices through Nf4Table.matmul."""

    def __init__(self, experts: nn.Module, device: torch.device, dtype: torch.dtype):
        super().__init__()
        self.num_experts = int(experts.num_experts)  # type: ignore[arg-type]
        self.act_fn = experts.act_fn  # type: ignore[assignment]
        self.tables = nn.ModuleDict({name: Nf4Table(getattr(experts, name), device, dtype) for name in EXPERT_TENSORS})
        # The full-precision module this replaces, its tensors deleted once quantized: switching back sets them.
        # A plain attribute (a list): a registered one would be a second module tree in the model.
        self._original = [experts]
        self._wrappers = {}  # PEFT's ParamWrapper of each tensor (split_lora.attach)

    def _matmul(self, name: str, x: torch.Tensor, e: int) -> torch.Tensor:
        table: Nf4Table = self.tables[name]  # type: ignore[assignment]
        return table.matmul(x, e)


def set_experts_4bit(model: nn.Module, on: bool, place: Place) -> bool:
    """Swap every fused experts module of `model` (the transformers model inside peft's) for its NF4 form on
    `place.device`, or back. Returns whether anything changed."""
    changed = False
    dtype = _compute_dtype(model, place)
    for parent, attr, experts in list(experts_slots(model)):
        wrappers = wrappers_around(model, experts)
        if on and not isinstance(experts, Nf4Experts):
            nf4 = Nf4Experts(experts, place.device, dtype)
            for name in EXPERT_TENSORS:  # the full-precision tensors go (their storage freed); switching back
                delattr(experts, name)  # sets them again
            setattr(parent, attr, nf4)
            for wrapper in wrappers.values():
                _move_adapter(wrapper, place.device)
            attach(nf4, wrappers)
            changed = True
        elif not on and isinstance(experts, Nf4Experts):
            original = experts._original[0]
            for name in EXPERT_TENSORS:
                table: Nf4Table = experts.tables[name]  # type: ignore[assignment]
                setattr(original, name, nn.Parameter(table.dequantized().to(place.device), requires_grad=False))
            setattr(parent, attr, original)
            attach(original, wrappers)  # PEFT's folding again, or the split forward if it had one (split_lora.py)
            changed = True
    return changed


def _compute_dtype(model: nn.Module, place: Place) -> torch.dtype:
    """The dtype the experts compute in: the model's (its config's dtype), as its bf16 tensors did."""
    dtype = getattr(getattr(model, "config", None), "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    return torch.bfloat16 if place.dtype_bytes == 2 else torch.float32


def _move_adapter(wrapper: nn.Module, device: torch.device) -> None:
    """PEFT put the wrapper's adapter where the experts were loaded (on the host, where this technique loads them):
    the adapter trains on the device."""
    for name in ("lora_A", "lora_B"):
        for layer in getattr(wrapper, name).values():
            if layer.weight.device != device:
                layer.to(device)
