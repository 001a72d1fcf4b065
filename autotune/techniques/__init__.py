"""The memory techniques of the training step, each with an on/off switch (`Knobs`).

One file per technique; each is applied in one place (the model build for the model-level ones, the step for
the loss and the batches) from the switches the config or the solved profile carries, and each has a test
showing it computes what the plain step computes:

- fused_loss.py: the loss without the full logits (liger-kernel on CUDA, chunked PyTorch everywhere).
- offload.py: gradient-checkpointed layer inputs kept in CPU memory between forward and backward.
- host_embedding.py: the frozen input-embedding table of an untied model kept in CPU memory.
- int8_head.py: the frozen lm_head of an untied model in 8-bit, read a block of rows at a time by the fused loss.
- tiled_mlp.py: each layer's MLP a slice of tokens at a time, keeping only its input for backward.
- packing.py: padding-free packing, a micro-batch's samples in one row with attention blocked at boundaries.

Gradient checkpointing is a knob too (it predates this package; modeling.py switches it).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

from autotune.catalog import ModelSpec
from autotune.config import Config
from autotune.errors import UserError

# The fused loss's chunk: bytes of fp32 logits one chunk may take (chunk tokens x vocabulary x 4). 256 MiB is
# about 440 tokens of Qwen3's vocabulary; the backward holds one such buffer and its cast. Smaller chunks only
# add kernel launches. (Here, not in fused_loss.py, so the estimate reads it without importing torch.)
CHUNK_BYTES = 256 * 2**20


def chunk_tokens(vocab_size: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Tokens per chunk: as many as keep one chunk's fp32 logits within `chunk_bytes` (at least 1)."""
    return max(1, chunk_bytes // (4 * vocab_size))


def tile_tokens(intermediate_size: int, dtype_bytes: int) -> int:
    """The tiled MLP's slice (tiled_mlp.py): as many tokens as keep a slice's intermediate-sized activations
    (gate, up, their product, and as many again in backward) within the fused loss's chunk budget."""
    return max(1, CHUNK_BYTES // (6 * intermediate_size * dtype_bytes))


# The 8-bit lm_head's rows dequantized at once (int8_head.py): a block of this many rows in the compute dtype is
# the transient, and the fused loss's vocabulary block.
ROW_BLOCK = 16384

# What `auto` means without a solved profile: the techniques that cost (almost) no speed are on.
AUTO_DEFAULTS = {
    "fused_loss": True,
    "offload_activations": False,
    "embedding_on_cpu": False,
    "lm_head_8bit": False,
    "tiled_mlp": False,
    "packing": True,
}
TECHNIQUES = tuple(AUTO_DEFAULTS)  # the config keys, one per technique


@dataclass(frozen=True)
class Knobs:
    """Which techniques a step runs with: what a trial measures, a profile records and training applies."""

    checkpointing: bool = True
    fused_loss: bool = True
    offload_activations: bool = False
    embedding_on_cpu: bool = False
    lm_head_8bit: bool = False
    tiled_mlp: bool = False
    packing: bool = False

    def with_(self, **changes: bool) -> Knobs:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, bool]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> Knobs:
        return cls(**{f.name: bool(values[f.name]) for f in fields(cls) if f.name in values})

    def describe(self) -> str:
        """A short label for trial lines and reasons: "ckpt+fused+offload", "no-ckpt+packed"."""
        names = {
            "fused_loss": "fused",
            "offload_activations": "offload",
            "embedding_on_cpu": "emb-cpu",
            "lm_head_8bit": "int8-head",
            "tiled_mlp": "tiled-mlp",
            "packing": "packed",
        }
        on = [label for name, label in names.items() if getattr(self, name)]
        return "+".join(["ckpt" if self.checkpointing else "no-ckpt", *on])


def resolve(cfg: Config, spec: ModelSpec) -> Knobs:
    """The switches a config asks for, `auto` resolved to the technique's default (a solved profile writes
    explicit on/off values, so `auto` here means no profile decided). A switch that cannot apply to this
    model or config is a UserError naming it."""
    values = {name: _switch(getattr(cfg, name), AUTO_DEFAULTS[name]) for name in TECHNIQUES}
    knobs = Knobs(checkpointing=cfg.gradient_checkpointing, **values)
    check(knobs, spec)
    return knobs


def check(knobs: Knobs, spec: ModelSpec) -> None:
    if knobs.offload_activations and not knobs.checkpointing:
        raise UserError(
            'offload_activations "on" needs gradient_checkpointing: it moves the inputs each checkpointed layer '
            'keeps. Set gradient_checkpointing true, or offload_activations "auto"/"off"'
        )
    if knobs.embedding_on_cpu and spec.architecture.tie_word_embeddings:
        raise UserError(
            f'embedding_on_cpu "on": {spec.name} ties its input embeddings to lm_head, which the loss needs on the '
            'GPU; only untied models (Qwen3-8B, 14B, 32B) can keep the table in CPU memory. Set it "auto" or "off"'
        )
    if knobs.lm_head_8bit and spec.architecture.tie_word_embeddings:
        raise UserError(
            f'lm_head_8bit "on": {spec.name} ties lm_head to its input embeddings, which lookups need whole; only '
            'untied models (Qwen3-8B, 14B, 32B) can keep lm_head in 8-bit. Set it "auto" or "off"'
        )
    if knobs.lm_head_8bit and not knobs.fused_loss:
        raise UserError(
            'lm_head_8bit "on" needs fused_loss: the fused loss reads the 8-bit table a block at a time, the plain '
            'loss would rebuild it whole. Set fused_loss "on" or "auto", or lm_head_8bit "off"'
        )


def valid(knobs: Knobs, spec: ModelSpec) -> bool:
    """Whether `check` would accept these knobs for this model."""
    try:
        check(knobs, spec)
    except UserError:
        return False
    return True


def _switch(value: str, default: bool) -> bool:
    return default if value == "auto" else value == "on"


def as_config_values(knobs: Knobs) -> dict:
    """The switches as config values ("on"/"off", and gradient_checkpointing), as a profile records them."""
    values: dict = {name: "on" if getattr(knobs, name) else "off" for name in TECHNIQUES}
    values["gradient_checkpointing"] = knobs.checkpointing
    return values
