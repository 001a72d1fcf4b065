"""Tiled MLP: each decoder layer's MLP runs a chunk of tokens at a time, and keeps only its input for backward.

At long sequences a layer's MLP is the largest thing in the step: gate, up and their product are
intermediate-sized (3 x 12,288 bf16 values a token on Qwen3-8B, against 4,096 for the hidden state), and its
backward holds a burst of intermediate-sized gradients on top. The MLP is token-wise, so it can run on slices
of the sequence: forward computes each slice without a graph and keeps the input; backward recomputes one
slice at a time with a graph, and hands back its input gradient (and, for LoRA on gate/up/down, the adapters'
gradients, accumulated slice by slice). The idea is ALST's TiledMLP (DeepSpeed), here for the HF Qwen3 MLP.

Dropout inside the MLP (LoRA dropout on gate/up/down) is replayed exactly: the RNG state at the forward is
restored for the recompute, as torch.utils.checkpoint does. `set_tiled_mlp` switches it per model.
"""

from __future__ import annotations

import torch

from autotune.techniques import Place, tile_tokens


class _TiledMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mlp, tokens):
        ctx.mlp, ctx.tokens = mlp, tokens
        ctx.autocast = torch.is_autocast_enabled(x.device.type), torch.get_autocast_dtype(x.device.type)
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(x.device) if x.device.type == "cuda" else None
        ctx.save_for_backward(x)
        flat = x.reshape(-1, x.shape[-1])
        with torch.no_grad():
            out = torch.cat([mlp._plain_forward(part) for part in flat.split(tokens)])
        return out.reshape(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        flat, grad_flat = x.reshape(-1, x.shape[-1]), grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = torch.zeros_like(flat)
        devices = [x.device] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, x.device)
            enabled, dtype = ctx.autocast
            for start in range(0, flat.shape[0], ctx.tokens):
                part = flat[start : start + ctx.tokens].detach().requires_grad_(x.requires_grad)
                with torch.enable_grad(), torch.autocast(x.device.type, dtype=dtype, enabled=enabled):
                    out = ctx.mlp._plain_forward(part)
                torch.autograd.backward(out, grad_flat[start : start + ctx.tokens])
                if part.grad is not None:
                    grad_x[start : start + ctx.tokens] = part.grad
                del out, part
        return grad_x.reshape(x.shape), None, None


def _tiled_forward(self, x):
    if not torch.is_grad_enabled() or x.numel() == 0:
        return self._plain_forward(x)  # evaluation, generation: no graph to save memory from
    return _TiledMLP.apply(x, self, self._tile_tokens)


def set_tiled_mlp(model, on: bool, place: Place) -> int:
    """Tile (or stop tiling) the MLP of every decoder layer of `model` (a transformers Qwen3 or Qwen3.5/3.6 dense
    model). The MLP module stays where it is (its parameters keep their names, peft's adapters with them); only its
    forward is wrapped. Returns the number of MLPs switched."""
    from transformers.models.qwen3.modeling_qwen3 import Qwen3MLP
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5MLP

    switched = 0
    for module in model.modules():
        if not isinstance(module, (Qwen3MLP, Qwen3_5MLP)):
            continue
        tiled = "_plain_forward" in vars(module)
        if on and not tiled:
            # Instance attributes over the class's forward (setattr: nn.Module would type them as submodules).
            setattr(module, "_plain_forward", module.forward)  # noqa: B010
            setattr(module, "_tile_tokens", tile_tokens(module.intermediate_size, place.dtype_bytes))  # noqa: B010
            setattr(module, "forward", _tiled_forward.__get__(module))  # noqa: B010
            switched += 1
        elif not on and tiled:
            del module.forward, module._plain_forward, module._tile_tokens  # back to the class's forward
            switched += 1
    return switched
