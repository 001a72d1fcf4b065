"""An MoE model's expert adapters applied as two thin products per routed expert, never folded into the experts.

LoRA on the experts (lora_experts) is PEFT's ParamWrapper around transformers' fused experts module (Qwen3MoeExperts:
gate/up (experts, 2 x width, hidden), down (experts, hidden, width)). Its forward folds the low-rank update of every
expert into a whole copy of the fused tensor (W + B @ A, one baddbmm) before the experts run, which the experts'
matmuls keep for backward, and whose gradient backward builds as large: two to three copies of a layer's experts
beside the weights (4.5 GiB each for a Qwen3-235B-A22B layer in bf16, whatever the tokens).

Here the wrappers' forward hands the input straight to the experts module, whose forward is transformers' eager loop
over the experts hit, each routed expert's update added as its two thin factors (x @ A_e^T @ B_e^T, scaled): what
the folded tensor computes, without building it (Unsloth calls it split LoRA). The wrappers, their names and their
saved adapter stay PEFT's, so the adapter a run saves loads with `PeftModel.from_pretrained` and merges with PEFT's
merge (`autotune export --merge`).

`set_experts_split_lora` switches a built model in and out by swapping classes (modeling.apply_knobs; a solver
trial measures both on one build). The experts' tensors stay the module's parameters, so FSDP shards them as
before. The NF4 experts (experts_4bit.py) always apply the factors this way: their `Nf4Experts` is a
`ThinFactorExperts` whose expert matmul dequantizes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from autotune.techniques import Place

# The fused tensors of transformers' expert modules (Qwen3MoeExperts, Qwen3_5MoeExperts), as (experts, out, in).
EXPERT_TENSORS = ("gate_up_proj", "down_proj")


class ThinFactorExperts:
    """The forward of an experts module whose adapters are applied per routed expert: transformers' eager loop (the
    same call: hidden_states, top_k_index, top_k_weights), each expert's matrices through `_matmul`, and the LoRA
    update of PEFT's wrappers (attached by `_attach`) added as two thin products. A mixin: the bf16 experts take it
    by a class swap, the NF4 ones (experts_4bit.Nf4Experts) by inheritance."""

    num_experts: int
    act_fn: Callable[[torch.Tensor], torch.Tensor]
    _wrappers: dict[str, Any]  # peft's ParamWrappers by tensor name (typed loosely: peft is imported lazily)

    def _matmul(self, name: str, x: torch.Tensor, e: int) -> torch.Tensor:
        """x @ W_e^T for expert e of the fused tensor `name`: here its slice of the module's own parameter."""
        return nn.functional.linear(x, getattr(self, name)[e])

    def _lora(self, name: str) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """The tensor's adapter as (A: (experts, r, in), B: (experts, out, r), scaling), the layout of PEFT's
        ParamWrapper.get_delta_factors; None where no adapter is active."""
        wrapper = self._wrappers.get(name)
        if wrapper is None or wrapper.disable_adapters or wrapper.merged:
            return None
        active = [a for a in wrapper.active_adapters if a in wrapper.lora_A]
        if not active:
            return None
        if len(active) > 1:
            raise NotImplementedError("the experts' split LoRA applies one adapter at a time")
        adapter = active[0]
        weight_a, weight_b = wrapper.lora_A[adapter].weight, wrapper.lora_B[adapter].weight
        a = weight_a.reshape(self.num_experts, -1, weight_a.shape[-1])  # (experts, r, in)
        b = weight_b.reshape(weight_b.shape[0], -1, self.num_experts).permute(2, 0, 1)  # (experts, out, r)
        return a, b, wrapper.scaling[adapter]

    def _linear(self, name: str, x: torch.Tensor, e: int) -> torch.Tensor:
        out = self._matmul(name, x, e)
        lora = self._lora(name)
        if lora is not None:
            a, b, scaling = lora
            # PEFT's folded tensor W + scaling * B_e @ A_e, applied as its two thin factors.
            update = (x.to(a.dtype) @ a[e].t()) @ b[e].t()
            out = out + (update * scaling).to(out.dtype)
        return out

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        final = torch.zeros_like(hidden_states)
        with torch.no_grad():
            mask = nn.functional.one_hot(top_k_index, num_classes=self.num_experts).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for row in hit.tolist():
            e = row[0]
            top_k_pos, token_idx = torch.where(mask[e])
            current = hidden_states[token_idx]
            gate, up = self._linear("gate_up_proj", current, e).chunk(2, dim=-1)
            current = self._linear("down_proj", self.act_fn(gate) * up, e)
            current = current * top_k_weights[token_idx, top_k_pos, None]
            final.index_add_(0, token_idx, current.to(final.dtype))
        return final


def is_experts(module: nn.Module) -> bool:
    """transformers' fused experts module: both tensors as 3-D parameters."""
    return all(
        isinstance(getattr(module, n, None), nn.Parameter) and getattr(module, n).dim() == 3 for n in EXPERT_TENSORS
    )


def experts_slots(model: nn.Module) -> Iterator[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute, experts module) for every fused experts module of `model`, bare, split or NF4, wherever
    PEFT's wrappers put it (an innermost ParamWrapper's base_layer)."""
    for parent in list(model.modules()):
        for attr, child in list(parent.named_children()):
            if isinstance(child, ThinFactorExperts) or is_experts(child):
                yield parent, attr, child


def wrappers_around(model: nn.Module, experts: nn.Module) -> dict[str, Any]:
    """PEFT's ParamWrappers whose innermost base layer is `experts`, by the tensor each adapts."""
    from peft.tuners.lora.layer import ParamWrapper

    found: dict[str, Any] = {}
    for module in model.modules():
        if isinstance(module, ParamWrapper) and module.get_base_layer() is experts:
            found[module.parameter_name] = module
    return found


def attach(experts: nn.Module, wrappers: dict[str, Any]) -> None:
    """Hand a thin-factor experts module its wrappers, and make the wrappers pass their input on (or, for experts
    that fold, PEFT's own again). The one place the two agree: a wrapper that folded its update into experts that
    also apply the factors would add the update twice. A plain dict on the experts: the wrappers hold the experts
    module, it must not hold them as submodules."""
    thin = isinstance(experts, ThinFactorExperts)
    for wrapper in wrappers.values():
        (_defer if thin else _restore_peft)(wrapper)
    if thin:
        experts._wrappers = dict(wrappers)  # type: ignore[assignment]
    elif "_wrappers" in vars(experts):
        del experts._wrappers


class _FactorsOnly:
    """Marks a PEFT ParamWrapper whose base layer applies its factors per routed expert (ThinFactorExperts): its
    forward passes the input on."""


_DEFERRING: dict[type, type] = {}  # one subclass per PEFT class, not one per wrapper switched
_SPLIT: dict[type, type] = {}  # one split subclass per transformers experts class


def _defer(wrapper: nn.Module) -> None:
    cls = type(wrapper)
    if issubclass(cls, _FactorsOnly):
        return
    if cls not in _DEFERRING:
        _DEFERRING[cls] = type(f"Thin{cls.__name__}", (_FactorsOnly, cls), {"forward": _pass_through, "_peft": cls})
    wrapper.__class__ = _DEFERRING[cls]


def _pass_through(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return self.base_layer(x, *args, **kwargs)


def _restore_peft(wrapper: nn.Module) -> None:
    if isinstance(wrapper, _FactorsOnly):
        wrapper.__class__ = type(wrapper)._peft  # type: ignore[attr-defined]


def _split_class(cls: type) -> type:
    if cls not in _SPLIT:
        _SPLIT[cls] = type(f"Split{cls.__name__}", (ThinFactorExperts, cls), {"_bare": cls})
    return _SPLIT[cls]


def set_experts_split_lora(model: nn.Module, on: bool, place: Place) -> bool:
    """Swap every bf16 fused experts module of `model` (the transformers model inside peft's) that carries adapters
    to its split form, or back. NF4 experts (experts_4bit) are split whatever this says. Returns whether anything
    changed."""
    changed = False
    for _parent, _attr, experts in list(experts_slots(model)):
        wrappers = wrappers_around(model, experts)
        bare = getattr(type(experts), "_bare", None)
        if on and not isinstance(experts, ThinFactorExperts) and wrappers:
            if getattr(experts, "is_transposed", False):  # (experts, in, out): not the layout _matmul reads
                raise NotImplementedError(f"{type(experts).__name__} stores its experts transposed")
            experts.__class__ = _split_class(type(experts))
            changed = True
        elif not on and bare is not None:
            experts.__class__ = bare
            changed = True
        attach(experts, wrappers)
    return changed
