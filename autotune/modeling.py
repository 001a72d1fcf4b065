"""Build the model that trains: base weights (real or random), quantization, LoRA, checkpointing.

One function, `build_model`, serves `autotune train` and every solver trial, so what the solver
measures is what training runs.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import torch

from autotune.catalog import ModelSpec, check_target_modules
from autotune.config import Config
from autotune.context import RunContext
from autotune.errors import UserError

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)


@dataclass
class BuiltModel:
    model: PeftModel
    spec: ModelSpec
    device: torch.device
    dtype: torch.dtype  # compute dtype
    quantization: str  # "4bit" | "8bit" | "none"
    lora_r: int
    lora_alpha: float
    target_modules: list[str]
    gradient_checkpointing: bool

    def parameter_counts(self) -> dict:
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.model.parameters())
        return {"trainable_parameters": trainable, "total_parameters": total}


def pick_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def compute_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    """bf16 where asked for and supported, else fp16 on CUDA; on the CPU bf16 or fp32."""
    if device.type == "cuda":
        if cfg.bf16 and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float16 if (cfg.fp16 or cfg.bf16) else torch.float32
    return torch.bfloat16 if cfg.bf16 else torch.float32


def quantization_config(quantization: str, dtype: torch.dtype):
    if quantization == "none":
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:  # pragma: no cover - depends on the machine
        raise UserError(
            f"quantization {quantization!r} needs bitsandbytes, which is not installed: "
            '`pip install bitsandbytes`, or set quantization to "none"'
        ) from None
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        # nf4 + double quantization: the QLoRA recipe (Dettmers et al. 2023), ~0.5 byte per weight.
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def _random_state_dict(hf_config, dtype: torch.dtype, seed: int, separate: bool = False) -> dict:
    """Random weights for every tensor of the architecture, without ever holding a full copy.

    Memory and speed do not depend on weight values, so all matrices are views into one pool of
    N(0, 0.02) values the size of the largest tensor: building Qwen3-14B this way needs ~1.5 GB of
    host memory instead of 28 GB, and loading goes through the same from_pretrained (and the same
    bitsandbytes quantization) as real weights.
    """
    from transformers import Qwen3ForCausalLM

    with torch.device("meta"):
        meta = Qwen3ForCausalLM(hf_config)
    shapes = {k: v.shape for k, v in meta.state_dict().items()}
    largest = max(s.numel() for s in shapes.values())
    gen = torch.Generator().manual_seed(seed)
    pool = torch.randn(largest, generator=gen, dtype=torch.float32).mul_(hf_config.initializer_range).to(dtype)
    ones = torch.ones(max(s.numel() for k, s in shapes.items() if "norm" in k), dtype=dtype)
    state = {k: (ones if "norm" in k else pool)[: s.numel()].view(s) for k, s in shapes.items()}
    if separate:
        # On the CPU from_pretrained keeps these views, so every weight would share one storage and a
        # memory meter would count the model once: give each its own (the GPU path copies anyway).
        state = {k: v.clone() for k, v in state.items()}
    return state


def load_base_model(
    spec: ModelSpec, *, init: str, quantization: str, dtype: torch.dtype, device: torch.device, seed: int = 42
) -> PreTrainedModel:
    """Real weights (hub id or local path; safetensors only, no remote code) or random init."""
    from transformers import AutoModelForCausalLM, Qwen3ForCausalLM

    qcfg = quantization_config(quantization, dtype)
    device_map = {"": device.index if device.type == "cuda" else "cpu"}
    common: dict = dict(quantization_config=qcfg, dtype=dtype, device_map=device_map, attn_implementation="sdpa")
    model: PreTrainedModel
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*kernels.*")
        if init == "random":
            hf_config = spec.architecture.to_hf_config(attn_implementation="sdpa")
            state = _random_state_dict(hf_config, dtype, seed, separate=device.type == "cpu")
            model = Qwen3ForCausalLM.from_pretrained(None, config=hf_config, state_dict=state, **common)
            # from_pretrained(None) records the name "None", which peft would later look up on the hub
            # when saving; an empty name marks a from-config model and skips that lookup.
            model.config._name_or_path = ""
            model.name_or_path = ""
        else:
            try:
                model = AutoModelForCausalLM.from_pretrained(
                    spec.source, use_safetensors=True, trust_remote_code=False, **common
                )
            except (OSError, ValueError) as exc:
                raise UserError(
                    f"cannot load weights for {spec.source!r}: {exc}. Give a local directory with config.json and "
                    "*.safetensors, make sure the hub is reachable (and HF_HUB_OFFLINE is not set), or set "
                    'init="random" to build the architecture with random weights.'
                ) from None
    model.config.use_cache = False  # the KV cache is useless in training and costs memory
    return model


def enable_checkpointing(model, kwargs: dict | None) -> None:
    """Gradient (activation) checkpointing across transformers versions: 5.24 renamed the method."""
    kwargs = dict(kwargs or {"use_reentrant": False})
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    # With reentrant checkpointing the frozen embeddings' output must require grad, or no gradient
    # flows into the checkpointed blocks; harmless otherwise.
    model.enable_input_require_grads()


def set_checkpointing(built: BuiltModel, on: bool, kwargs: dict | None = None) -> None:
    """Switch checkpointing of a built model on or off (the solver measures both, on one model)."""
    if built.gradient_checkpointing == on:
        return
    base = cast("PreTrainedModel", built.model.get_base_model())
    if on:
        enable_checkpointing(base, kwargs)
    elif hasattr(base, "activation_checkpointing_disable"):
        base.activation_checkpointing_disable()
    else:
        base.gradient_checkpointing_disable()
    built.gradient_checkpointing = on


def prepare_for_training(model, quantized: bool, checkpointing: bool, checkpointing_kwargs: dict | None) -> None:
    """Our k-bit preparation. peft's prepare_model_for_kbit_training also casts every non-quantized
    weight to fp32, which for Qwen3-8B's untied embeddings and lm_head costs an extra 2.5 GB; we
    keep them in the compute dtype (the adapters themselves stay fp32) and do the rest it does."""
    for p in model.parameters():
        p.requires_grad_(False)
    if checkpointing:
        enable_checkpointing(model, checkpointing_kwargs)
    if quantized:
        model.is_parallelizable = True
        model.model_parallel = True


def attach_lora(model, *, r: int, alpha: float, dropout: float, target_modules: list[str]):
    from peft import LoraConfig, get_peft_model

    targets = check_target_modules(target_modules)
    lora = LoraConfig(
        r=r,
        lora_alpha=alpha,  # type: ignore[arg-type]  # peft annotates int; the scale alpha / r takes any number
        lora_dropout=dropout,
        target_modules=list(targets),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def build_model(
    ctx: RunContext, *, init: str | None = None, lora_r: int | None = None, device: torch.device | None = None
) -> BuiltModel:
    """The model `autotune train` trains and a solver trial measures, from a run's config.

    `init` and `lora_r` override the config (the solver tries ranks on random weights).
    """
    quiet_libraries()
    cfg, spec = ctx.cfg, ctx.spec
    device = device or pick_device()
    dtype = compute_dtype(cfg, device)
    quantization = cfg.quantization
    if cfg.tf32 and device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    r = lora_r or cfg.lora_r
    base = load_base_model(
        spec, init=init or cfg.init, quantization=quantization, dtype=dtype, device=device, seed=cfg.seed
    )
    prepare_for_training(base, quantization != "none", cfg.gradient_checkpointing, cfg.gradient_checkpointing_kwargs)
    # LoRA A matrices are drawn from torch's global RNG (the Trainer seeds it only later, in its
    # __init__): seed it here, or two runs of one config start from different adapters.
    torch.manual_seed(cfg.seed)
    model = attach_lora(base, r=r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, target_modules=cfg.target_modules)
    return BuiltModel(
        model=model,
        spec=spec,
        device=device,
        dtype=dtype,
        quantization=quantization,
        lora_r=r,
        lora_alpha=cfg.lora_alpha,
        target_modules=list(cfg.target_modules),
        gradient_checkpointing=cfg.gradient_checkpointing,
    )


def quiet_libraries() -> None:
    """Silence known-harmless noise (bitsandbytes' optional CPU kernel hub lookup, tokenizer forks)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*gemm_4bit_forward.*")
    # transformers 5.24 renamed gradient to activation checkpointing; peft still asks the old name.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    # bitsandbytes' paged optimizers page only on CUDA; on the CPU (demo, tests) they run unpaged.
    warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU.*")
