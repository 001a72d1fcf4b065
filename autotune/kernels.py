"""Which kernel computes a hybrid's Gated DeltaNet layers (Qwen3.5/3.6): told without importing them or torch.

transformers runs flash-linear-attention's chunked gated-delta kernel on CUDA where the `fla` package imports, and
its reference PyTorch rule everywhere else (torch_chunk_gated_delta_rule, in fp32 a chunk at a time). The two keep
very different memory for backward (the reference rule keeps every chunk's recurrent state and its fp32
intermediates; the kernel keeps q, k, v, the gates and one chunk-local matrix, recomputing the states in backward),
so the estimate charges the one the step will run, and the trial lines and the profile name it.
"""

from __future__ import annotations

import importlib.util

DELTA_KERNELS = ("fla", "reference")


def delta_kernel(device_type: str) -> str:
    """The gated-delta rule's implementation on a device: "fla" (flash-linear-attention) on CUDA where installed,
    else "reference" (transformers' PyTorch rule)."""
    if device_type == "cuda" and importlib.util.find_spec("fla") is not None:
        return "fla"
    return "reference"
