"""The frozen input-embedding table kept in CPU memory: only the rows a batch looks up move to the GPU.

For the untied Qwen3 models (8B, 14B, 32B) the input embedding is a table of its own, 151,936 x hidden in the
compute dtype (1.2 GiB on 8B, 1.5 GiB on 14B), frozen under LoRA and read only by a row lookup. Keeping it on
the host costs one gather there and a batch x tokens x hidden copy to the GPU per forward. (A tied model's
table is also lm_head's weight, which the loss needs on the GPU: techniques.check refuses it.)

`HostEmbedding` replaces the model's `embed_tokens` module; `set_host_embedding` switches it in and out, so a
solver trial can measure both on one model build. Install it before checkpointing's input-grad hook is
registered (modeling does): the hook binds to the module object.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from autotune.memory import HOST_TENSOR, host_empty, host_memory
from autotune.techniques import Place


class HostEmbedding(nn.Module):
    """A frozen nn.Embedding whose table stays in host memory; forward gathers the rows there and sends only
    them to `device`. It ignores .to()/.cuda() so that nothing moves the table back by accident."""

    def __init__(self, embedding: nn.Embedding, device: torch.device):
        super().__init__()
        self.original = [embedding]  # in a list: not a submodule, so its parameters are not counted twice
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        self.padding_idx = embedding.padding_idx
        # A Parameter under the same name keeps the state_dict key ("...embed_tokens.weight"). A table the build
        # loaded on the host (modeling.load_base_model) is used where it is; one on the device is copied, as host
        # memory (on the CPU too, where the tracked meter stands in for the device), so the device's can go.
        weight = embedding.weight.detach()
        if getattr(embedding.weight, HOST_TENSOR, False):
            table = weight
        else:
            with host_memory():
                table = weight.to("cpu", copy=True)
        self.weight = nn.Parameter(table, requires_grad=False)
        setattr(self.weight, HOST_TENSOR, True)
        self.device = torch.device(device)

    def _apply(self, fn, recurse=True):
        return self  # the table stays where it is

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(input_ids.to("cpu"), self.weight, self.padding_idx)
        if self.device.type == "cuda":
            # Pinned, the copy below runs asynchronously.
            pinned = host_empty(rows.shape, rows.dtype, pinned=True, what="the looked-up rows (embedding_on_cpu)")
            rows = pinned.copy_(rows)
        return rows.to(self.device, non_blocking=True)


def set_host_embedding(model, on: bool, place: Place) -> bool:
    """Put `model`'s (a transformers PreTrainedModel) input-embedding table in host memory, or back on
    `place.device`. Returns whether anything changed."""
    device = place.device
    current = model.get_input_embeddings()
    if on == isinstance(current, HostEmbedding):
        return False
    if on:
        replacement: nn.Module = HostEmbedding(current, device)
        current.weight = None  # the device table goes; the host table is a tensor of its own
    else:
        replacement = current.original[0]
        replacement.weight = nn.Parameter(current.weight.detach().to(device, copy=True), requires_grad=False)
    # Checkpointing's input-grad hook is bound to the module object: move it to the new one.
    hooked = bool(getattr(model, "_require_grads_hooks", None))
    if hooked:
        model.disable_input_require_grads()
    model.set_input_embeddings(replacement)
    if hooked:
        model.enable_input_require_grads()
    return True
