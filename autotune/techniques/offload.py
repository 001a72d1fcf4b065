"""Activation offloading: the input each gradient-checkpointed decoder layer keeps for backward lives in CPU
memory between the forward and the backward.

With checkpointing, a layer keeps only its input (batch x tokens x hidden, 36 x 4096 x 2 bytes a token on
Qwen3-8B) and recomputes the rest in backward; those inputs are the last activation memory that grows with
every layer. Here the function transformers calls to checkpoint a layer runs torch's non-reentrant
checkpoint inside `saved_tensors_hooks` (as torchtune's OffloadActivations and Unsloth's offloaded gradient
checkpointing do): under it, exactly the layer's positional inputs are saved in the outer graph, so exactly
those move. On CUDA the copy goes to pinned memory on a side stream, overlapping the next layer's compute,
and comes back on the compute stream when backward unpacks it.

On the CPU there is no second memory to move to: the copy is made under memory.host_memory, so the CPU memory
tracker, which stands in for the GPU, no longer counts what would leave the device.
"""

from __future__ import annotations

import functools

import torch
from torch.autograd.graph import saved_tensors_hooks
from torch.utils.checkpoint import checkpoint

from autotune.memory import host_empty, host_memory
from autotune.techniques import Place

WHAT = "an offloaded layer input (offload_activations)"


class _ToHost(saved_tensors_hooks):
    """pack: the device tensor -> a host copy; unpack: the copy back on the tensor's device."""

    def __init__(self) -> None:
        super().__init__(self._pack, self._unpack)

    @staticmethod
    def _pack(tensor: torch.Tensor):
        if tensor.device.type != "cuda":
            with host_memory():
                host = host_empty(tensor.shape, tensor.dtype, pinned=False, what=WHAT)
                return tensor.device, host.copy_(tensor.detach()), None
        stream = _side_stream(tensor.device)
        stream.wait_stream(torch.cuda.current_stream(tensor.device))  # the tensor is complete
        with torch.cuda.stream(stream):
            host = host_empty(tensor.shape, tensor.dtype, pinned=True, what=WHAT)
            host.copy_(tensor, non_blocking=True)
            done = torch.cuda.Event()
            done.record(stream)
        tensor.record_stream(stream)  # the allocator must not reuse it before the copy has read it
        return tensor.device, host, done

    @staticmethod
    def _unpack(packed) -> torch.Tensor:
        device, host, done = packed
        if done is None:
            return host
        torch.cuda.current_stream(device).wait_event(done)
        return host.to(device, non_blocking=True)


@functools.cache
def _side_stream(device: torch.device):
    return torch.cuda.Stream(device)


def offloading_checkpoint(function, *args, **checkpoint_kwargs):
    """torch.utils.checkpoint.checkpoint, with the inputs it saves kept in CPU memory."""
    with _ToHost():
        return checkpoint(function, *args, **checkpoint_kwargs)


def set_offload(model: torch.nn.Module, on: bool, place: Place) -> int:
    """Make every gradient-checkpointed decoder layer of `model` offload its saved input (or stop). Call after
    checkpointing is enabled: transformers installs its own checkpoint function when it enables it. Returns the
    number of layers switched."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    kwargs = dict(place.checkpointing_kwargs or {"use_reentrant": False})
    if kwargs.get("use_reentrant"):
        # Reentrant checkpointing saves through its own autograd.Function, out of the hooks' reach.
        raise ValueError("activation offloading needs non-reentrant checkpointing (use_reentrant false)")
    function = functools.partial(offloading_checkpoint if on else checkpoint, **kwargs)
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for layer in layers:
        setattr(layer, "_gradient_checkpointing_func", function)  # noqa: B010 - a module attribute, not a submodule
    return len(layers)
