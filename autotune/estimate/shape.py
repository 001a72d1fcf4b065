"""The one object the estimate takes: a training step's shape (model, micro-batch, precision, techniques, ranks).

Everything the arithmetic needs to know of a step is here and nowhere else; the layer kinds, the loss head and
the persistent state read it. `shape_for` builds it from a config, the one mapping the CLI, the solver and the
benchmarks share, so their estimates describe the same step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from autotune.catalog import Architecture, check_target_modules, lora_on_experts
from autotune.config import DEFAULT_TARGET_MODULES, QUANTIZATIONS
from autotune.kernels import DELTA_KERNELS, delta_kernel
from autotune.techniques import KNOBS, TECHNIQUES_TABLE, Knobs, fused_kernel

STRATEGY_NAMES = ("ddp", "fsdp")


@dataclass(frozen=True)
class StepShape:
    """One step of a LoRA/QLoRA training run, as the estimate sees it.

    quantization: "4bit" (nf4 QLoRA), "8bit" (LLM.int8) or "none" (weights in dtype_bytes).
    autocast: the forward runs under bf16/fp16 autocast, as the HF Trainer does with bf16=True (None: when
        dtype_bytes == 2). Only the LoRA branches change: they keep half-precision inputs.
    kbit_prepare: the k-bit model went through peft's prepare_model_for_kbit_training, which upcasts the weights
        bitsandbytes leaves alone (embeddings, lm_head, norms) to fp32, and with them the hidden states.
        autotune's own preparation (modeling.prepare_for_training) keeps them in the compute dtype, hence the
        default False. Ignored for quantization="none".
    device: "cuda" adds the CUDA context/workspace overhead (cuda_overhead_bytes, default
        units.DEFAULT_CUDA_OVERHEAD_BYTES); "cpu" predicts what memory.CpuTrackedMeter measures.
    knobs: checkpointing and the techniques (autotune/techniques); a technique whose rules do not hold for this
        model or strategy (it needs another knob, tied embeddings, FSDP) counts as off. fused_kernel: "chunked" or
        "liger" (shape_for picks the device's).
    calibrated: on a GPU, add the residual the GPU trials on record show beyond this arithmetic.
    world_size, strategy: the peak of ONE rank of a run of world_size processes (`batch` is that rank's
        micro-batch).
    """

    arch: Architecture
    batch: int
    seq: int
    rank: int
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    quantization: str = "4bit"
    dtype_bytes: int = 2
    optimizer: str = "paged_adamw_8bit"
    device: str = "cuda"
    lora_dropout: float = 0.0
    autocast: bool | None = None
    kbit_prepare: bool = False
    double_quant: bool = True
    knobs: Knobs = field(default_factory=Knobs)
    fused_kernel: str = "chunked"
    world_size: int = 1
    strategy: str = "ddp"
    cuda_overhead_bytes: int | None = None
    calibrated: bool = True
    lora_experts: bool | None = None  # adapters on an MoE model's experts (None: on for an MoE model)
    delta_kernel: str = "reference"  # a hybrid's gated-delta rule: "fla" or "reference" (kernels.delta_kernel)

    def __post_init__(self) -> None:
        if self.batch < 1 or self.seq < 1 or self.rank < 1:
            raise ValueError(f"batch, seq and rank must be >= 1 (got {self.batch}, {self.seq}, {self.rank})")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}")
        if self.delta_kernel not in DELTA_KERNELS:
            raise ValueError(f"delta_kernel must be one of {DELTA_KERNELS}, got {self.delta_kernel!r}")
        if self.world_size < 1 or self.strategy not in STRATEGY_NAMES:
            raise ValueError(
                f"world_size must be >= 1 and strategy ddp or fsdp (got {self.world_size}, {self.strategy!r})"
            )
        settle = {
            "target_modules": check_target_modules(self.target_modules, self.arch),
            "kbit_prepare": self.kbit_prepare and self.quantization != "none",
            "autocast": self.dtype_bytes == 2 if self.autocast is None else self.autocast,
            "knobs": self._applicable(self.knobs),
            "lora_experts": self.arch.is_moe and self.lora_experts is not False,
        }
        for name, value in settle.items():
            object.__setattr__(self, name, value)

    def _applicable(self, knobs: Knobs) -> Knobs:
        """The knobs that take effect (Knobs.applicable): what the strategy refuses is off (under FSDP the tables stay
        where FSDP shards them), and a technique whose rules fail (another knob off, tied embeddings) does nothing.
        techniques.check and check_strategy refuse such knobs where a run is configured; the estimate answers for
        any shape."""
        return knobs.applicable(
            arch=self.arch, strategy=self.strategy, world_size=self.world_size, targets=self.target_modules
        )

    # ------------------------------------------------------------------ derived

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    @property
    def act_bytes(self) -> int:
        """The hidden states' width: fp32 after peft's k-bit preparation (fp32 norms), else the compute dtype."""
        return 4 if self.kbit_prepare else self.dtype_bytes

    @property
    def matmul_bytes(self) -> int:
        """Bytes of a matmul's output: the autocast dtype's, else the activations'."""
        return 2 if self.autocast else self.act_bytes

    @property
    def dropout_mask_bytes(self) -> int:
        """bool on CUDA (fused native_dropout), fp32 on the CPU (dropout there is input * noise)."""
        return 4 if self.device == "cpu" else 1

    @property
    def sharded(self) -> bool:
        return self.strategy == "fsdp" and self.world_size > 1

    @property
    def table_bytes(self) -> int:
        """Bytes per element of the tables and norms bitsandbytes never quantizes."""
        return 4 if self.kbit_prepare else self.dtype_bytes

    def describe(self) -> dict[str, Any]:
        """The shape as the estimate's report records it."""
        return dict(
            batch=self.batch,
            seq=self.seq,
            rank=self.rank,
            quantization=self.quantization,
            gradient_checkpointing=self.knobs.checkpointing,
            target_modules=list(self.target_modules),
            dtype_bytes=self.dtype_bytes,
            optimizer=self.optimizer,
            device=self.device,
            lora_dropout=self.lora_dropout,
            autocast=self.autocast,
            kbit_prepare=self.kbit_prepare,
            **{t.key: getattr(self.knobs, t.key) for t in TECHNIQUES_TABLE},
            fused_kernel=self.fused_kernel if self.knobs.fused_loss else None,
            world_size=self.world_size,
            strategy=self.strategy,
            **({"lora_experts": self.lora_experts} if self.arch.is_moe else {}),
            **({"delta_kernel": self.delta_kernel} if self.arch.is_hybrid else {}),
        )


def shape_of(arch: Architecture, *, gradient_checkpointing: bool = True, **values: Any) -> StepShape:
    """A StepShape from keywords: the knobs by name (gradient_checkpointing, fused_loss, tiled_mlp, ...), the rest
    as StepShape's fields."""
    switches = {name: values.pop(name) for name in KNOBS[1:] if name in values}
    knobs = Knobs(checkpointing=gradient_checkpointing, **switches)
    if "target_modules" in values:
        values["target_modules"] = tuple(values["target_modules"])
    return StepShape(arch, knobs=knobs, **values)


def shape_for(
    cfg,
    arch: Architecture,
    *,
    batch: int,
    seq: int,
    rank: int,
    device: str = "cuda",
    knobs: Knobs | None = None,
    world_size: int = 1,
    strategy: str = "ddp",
) -> StepShape:
    """The shape of one step of a config (an autotune.config.Config) with these techniques (default: the
    config's, `auto` resolved), as one rank of `world_size` sharing the model by `strategy`."""
    if knobs is None:
        from autotune.catalog import resolve_model
        from autotune.techniques import resolve

        knobs = resolve(cfg, resolve_model(cfg.model_name))
    return StepShape(
        arch,
        batch=batch,
        seq=seq,
        rank=rank,
        target_modules=tuple(cfg.target_modules),
        quantization=cfg.quantization,
        optimizer=cfg.optimizer,
        device=device,
        dtype_bytes=2 if (cfg.bf16 or cfg.fp16) else 4,
        lora_dropout=cfg.lora_dropout,
        knobs=knobs,
        lora_experts=lora_on_experts(cfg.lora_experts, arch, cfg.model_name),
        fused_kernel=fused_kernel(device),
        delta_kernel=delta_kernel(device),
        world_size=world_size,
        strategy=strategy,
    )
