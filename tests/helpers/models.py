"""What tests do to a built model to make a comparison able to fail."""

from __future__ import annotations

import torch


def randomise_lora_b(model: torch.nn.Module, seed: int = 0, std: float = 0.02) -> None:
    """LoRA's B starts at zero, so at initialisation every lora_A gradient is zero on both sides of a comparison,
    which then proves nothing about A. Draw B from a seeded normal instead: every build of one config gets the same
    values (parameters come in one order), and A's gradients are non-zero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float32).to(param.dtype) * std)


def assert_lora_a_gradients_nonzero(grads: dict[str, torch.Tensor]) -> None:
    """Every lora_A gradient carries a signal (LoRA's B was not left at zero)."""
    a = {name: g for name, g in grads.items() if "lora_A" in name}
    assert a and all(bool(g.abs().sum() > 0) for g in a.values()), [n for n, g in a.items() if not g.abs().sum()]
