"""Build the model that trains: base weights (real or random), quantization, LoRA, checkpointing.

One function, `build_model`, serves `autotune train` and every solver trial, so what the solver
measures is what training runs.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import torch

from autotune import quiet, techniques
from autotune.catalog import Architecture, ModelSpec, check_target_modules, expert_lora_targets, lora_on_experts
from autotune.config import Config
from autotune.context import RunContext
from autotune.errors import UserError
from autotune.memory import HOST_TENSOR, reuse_freed_host_memory
from autotune.techniques import Knobs, Place

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
    knobs: Knobs  # the techniques the model and its step run with (apply_knobs switches them)

    def parameter_counts(self) -> dict:
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.model.parameters())
        return {"trainable_parameters": trainable, "total_parameters": total}


def pick_device() -> torch.device:
    """This process's device: under torchrun the GPU of its LOCAL_RANK (distributed.rank_device)."""
    from autotune.distributed import rank_device

    return rank_device()


def compute_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    """bf16 where asked for and supported, else fp16 on CUDA; on the CPU bf16 or fp32."""
    if device.type == "cuda":
        if cfg.bf16 and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float16 if (cfg.fp16 or cfg.bf16) else torch.float32
    return torch.bfloat16 if cfg.bf16 else torch.float32


def quantization_config(quantization: str, dtype: torch.dtype, *, sharded: bool = False, host_modules: bool = False):
    """bitsandbytes' config for `quantization`. `sharded` (FSDP): the packed 4-bit weights are stored as
    `dtype` elements (bnb_4bit_quant_storage), so that every parameter FSDP flattens into a shard has one
    dtype (the FSDP-QLoRA recipe of peft and bitsandbytes); the bytes are the same, only their element type.
    `host_modules`: the device map puts modules on the CPU (a frozen table a technique keeps there), which
    transformers allows a bitsandbytes model only with llm_int8_enable_fp32_cpu_offload; those modules are tables,
    never quantized anyway."""
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
        storage = {"bnb_4bit_quant_storage": dtype} if sharded else {}
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            llm_int8_enable_fp32_cpu_offload=host_modules,
            **storage,
        )
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_enable_fp32_cpu_offload=host_modules)


# A model with at most this many weights is small enough to train from random weights (the demo's tiny-qwen3):
# it gets an initialisation it can learn from instead of the shared pool (_learnable_state_dict).
LEARNABLE_INIT_MAX_ELEMENTS = 64 * 2**20
# The tied embedding's std times sqrt(hidden_size): the std of the logits of a random hidden state (the final
# norm makes every hidden state sqrt(hidden_size) long). A hidden state aligned with one token's embedding then
# lifts that token EMBEDDING_LOGIT_SPREAD * sqrt(hidden_size) above an average one (24 on tiny-qwen3), so the
# loss can fall far; at HF's std of 0.02 it could lift it barely a nat, and the loss could not fall at all.
# The price: an untrained model's loss starts about SPREAD**2 / 2 = 4.5 nats above ln(vocabulary size).
EMBEDDING_LOGIT_SPREAD = 3.0


def _learnable_state_dict(shapes: dict, hf_config, dtype: torch.dtype, seed: int) -> dict:
    """Random weights a small model can learn from: every tensor drawn on its own (no weights shared between
    layers or projections), each linear layer at std 1/sqrt(fan_in) so that every layer passes its input on at
    its scale (and a LoRA update anywhere reaches the output), the embedding (tied to lm_head) at
    EMBEDDING_LOGIT_SPREAD / sqrt(hidden_size), norms at identity (a hybrid's RMSNorms store their weight less one:
    catalog.Architecture.norm_weight_offset; its DeltaNet blocks' gated norm does not)."""
    gen = torch.Generator().manual_seed(seed)
    embedding_std = EMBEDDING_LOGIT_SPREAD / hf_config.hidden_size**0.5
    offset = Architecture.from_hf_config(hf_config.to_dict()).norm_weight_offset
    state, embedding = {}, None
    for name, shape in shapes.items():
        if "norm" in name:
            identity = 1.0 if name.endswith("linear_attn.norm.weight") else 1.0 - offset
            state[name] = torch.full(shape, identity, dtype=dtype)
        elif "embed_tokens" in name or "lm_head" in name:
            if embedding is None:  # tied: one table for both names
                embedding = torch.randn(shape, generator=gen).mul_(embedding_std).to(dtype)
                state[name] = embedding
            else:
                # Untied: the same values in a table of its own, as a real untied model holds two (the memory
                # meter and the estimate count both).
                state[name] = embedding if hf_config.tie_word_embeddings else embedding.clone()
        else:
            state[name] = torch.randn(shape, generator=gen).mul_(shape[-1] ** -0.5).to(dtype)
    return state


def _random_state_dict(hf_config, dtype: torch.dtype, seed: int, separate: bool = False) -> dict:
    """Random weights for every tensor of the architecture, without ever holding a full copy.

    Memory and speed do not depend on weight values, so all matrices are views into one pool of
    N(0, 0.02) values the size of the largest tensor: building Qwen3-14B this way needs ~1.5 GB of
    host memory instead of 28 GB, and loading goes through the same from_pretrained (and the same
    bitsandbytes quantization) as real weights. A model small enough to be trained from random weights
    gets weights it can learn from instead (_learnable_state_dict).
    """
    with torch.device("meta"):
        meta = _causal_lm_class(hf_config)(hf_config)
    shapes = {k: v.shape for k, v in meta.state_dict().items()}
    if sum(s.numel() for s in shapes.values()) <= LEARNABLE_INIT_MAX_ELEMENTS:
        return _learnable_state_dict(shapes, hf_config, dtype, seed)
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


def _causal_lm_class(hf_config) -> type[PreTrainedModel]:
    """The causal-LM class transformers builds for `hf_config` (Qwen3ForCausalLM, Qwen3MoeForCausalLM)."""
    from transformers import AutoModelForCausalLM

    return cast("type[PreTrainedModel]", AutoModelForCausalLM._model_mapping[type(hf_config)])


def table_modules(hf_config) -> dict[str, list[str]]:
    """Where the model class transformers builds for `hf_config` keeps its frozen tables, by the keys of
    techniques.Technique.host_table: "input" the input embedding's module, "output" lm_head's, "experts" every
    fused experts module (an MoE model's). Read off the model built on the meta device, so nothing is allocated."""
    from autotune.techniques.split_lora import is_experts

    with torch.device("meta"):
        meta = _causal_lm_class(hf_config)(hf_config)
    names = {id(module): name for name, module in meta.named_modules()}
    experts = [name for name, module in meta.named_modules() if is_experts(module)]
    return {
        "input": [names[id(meta.get_input_embeddings())]],
        "output": [names[id(meta.get_output_embeddings())]],
        "experts": experts,
    }


def _map_value(device: torch.device) -> int | str:
    """`device` as a device map names it: a GPU by its index, the CPU as "cpu"."""
    return (device.index or 0) if device.type == "cuda" else "cpu"


def load_device_map(device: torch.device, host_modules: Sequence[str]) -> dict:
    """from_pretrained's device map: everything on `device`, except on a GPU the modules kept on the host."""
    return {"": _map_value(device), **dict.fromkeys(host_modules if device.type == "cuda" else (), "cpu")}


def undo_dispatch(model: PreTrainedModel, device: torch.device) -> None:
    """Take off what accelerate's dispatch_model put on a model whose device map names the CPU: the hooks that
    would copy a CPU module's weights to the GPU at every forward (accelerate's offload, with the weights moved to
    the meta device meanwhile). Removing them puts the weights back where they were loaded, on the host, where our
    techniques (HostEmbedding, Int8Head) use them. The recorded map then says one device, as the model trains: the
    Trainer's accelerate refuses to train a k-bit model whose map names the CPU (offload it does not support)."""
    from accelerate.hooks import remove_hook_from_module

    remove_hook_from_module(model, recurse=True)
    left = [name for name, p in model.named_parameters() if p.device.type == "meta"]
    if left:  # a bug of ours or a change of accelerate's, not the user's: say which weights
        raise RuntimeError(f"weights left on the meta device after undoing accelerate's dispatch: {left[:3]}")
    model.hf_device_map = {"": _map_value(device)}  # type: ignore[assignment]


def _mark_on_host(model: PreTrainedModel, host_modules: Sequence[str]) -> None:
    """Mark the weights of the modules loaded on the host as host memory (memory.HOST_TENSOR): the techniques then
    use them where they are, and on the CPU the tracked meter, which stands in for the device, leaves them out."""
    for name in host_modules:
        for param in model.get_submodule(name).parameters():
            setattr(param, HOST_TENSOR, True)


def load_base_model(
    spec: ModelSpec,
    *,
    init: str,
    quantization: str,
    dtype: torch.dtype,
    device: torch.device,
    seed: int = 42,
    sharded: bool = False,
    host_tables: Sequence[str] = (),
) -> PreTrainedModel:
    """Real weights (hub id or local path; safetensors only, no remote code) or random init. `sharded`: the model
    will be sharded by FSDP (quantization_config). `host_tables` ("input", "output", "experts"; techniques.
    host_tables): the frozen tables that the techniques keep in host memory or quantize from there, loaded there and
    never on the device, so that loading does not hold more than training (a 6 GB card that trains Qwen3-8B with both tables off the device could not
    load it otherwise)."""
    from transformers import AutoModelForCausalLM

    hf_config = spec.architecture.to_hf_config(attn_implementation="sdpa")
    names = table_modules(hf_config) if host_tables else {}
    host_modules = [module for t in host_tables for module in names[t]]
    device_map = load_device_map(device, host_modules)
    dispatched = len(set(device_map.values())) > 1
    qcfg = quantization_config(quantization, dtype, sharded=sharded, host_modules=dispatched)
    common: dict = dict(quantization_config=qcfg, dtype=dtype, device_map=device_map, attn_implementation="sdpa")
    model: PreTrainedModel
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*kernels.*")
        if init == "random":
            state = _random_state_dict(hf_config, dtype, seed, separate=device.type == "cpu")
            model = _causal_lm_class(hf_config).from_pretrained(None, config=hf_config, state_dict=state, **common)
            # from_pretrained(None) records the name "None", which peft would later look up on the hub
            # when saving; an empty name marks a from-config model and skips that lookup.
            model.config._name_or_path = ""
            model.name_or_path = ""
        else:
            from autotune import hub

            # A hub id on a machine whose hub does not answer: the local cache only, at once (hub.py), instead
            # of a minute of retries; a local folder never touches the network.
            local_only, why = (True, None) if spec.local_path else hub.local_only()
            try:
                model = AutoModelForCausalLM.from_pretrained(
                    spec.source, use_safetensors=True, trust_remote_code=False, local_files_only=local_only, **common
                )
            except (OSError, ValueError) as exc:
                if why is not None:
                    raise hub.not_cached_error("model", spec.source, why) from None
                raise UserError(
                    f"cannot load weights for {spec.source!r}: {exc}. Give a local directory with config.json and "
                    "*.safetensors, make sure the hub is reachable (and HF_HUB_OFFLINE is not set), or set "
                    'init="random" to build the architecture with random weights.'
                ) from None
    if dispatched:
        undo_dispatch(model, device)
    _mark_on_host(model, host_modules)
    model.config.use_cache = False  # the KV cache is useless in training and costs memory
    if spec.architecture.is_moe:
        # The router's load-balancing loss joins the training loss (with the model's router_aux_loss_coef), as the
        # model was pre-trained: without it LoRA on the experts may tilt the routing toward a few of them.
        model.config.output_router_logits = True
    if quantization == "4bit":
        keep_4bit_layout(model)
    return model


def keep_4bit_layout(model) -> None:
    """Stop bitsandbytes (0.50) from repacking 4-bit weights on a CPU with AVX512-BF16.

    There, the first forward in eval mode without grad (the Trainer's evaluation, the inference test)
    rewrites each Linear4bit in place into a CPU layout whose block scales (absmax) are rounded to bf16,
    and the next state_dict() (every checkpoint: peft takes the adapter out of the full state dict)
    converts it back, re-quantizing those scales with a new offset. Both steps are lossy: the frozen base
    weights change by up to ~3e-3 relative, so a run's losses would depend on when it evaluated and saved,
    and a resumed run (fresh base weights) would drift from the run it resumes. Training never uses that
    layout, so keeping the original one costs only CPU evaluation speed; CUDA never takes this path."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


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


def _set_checkpointing(base: PreTrainedModel, on: bool, kwargs: dict | None) -> None:
    if on:
        enable_checkpointing(base, kwargs)
    elif hasattr(base, "activation_checkpointing_disable"):
        base.activation_checkpointing_disable()
    else:
        base.gradient_checkpointing_disable()


def apply_knobs(built: BuiltModel, knobs: Knobs, checkpointing_kwargs: dict | None = None) -> None:
    """Switch a built model's checkpointing and model-level techniques to `knobs`; the step-level ones (fused
    loss, packing) go with it to the step. One model build serves every combination a solve measures."""
    techniques.check(knobs, built.spec)
    base = cast("PreTrainedModel", built.model.get_base_model())
    if knobs.checkpointing != built.knobs.checkpointing:
        _set_checkpointing(base, knobs.checkpointing, checkpointing_kwargs)
    switch_techniques(base, knobs, Place(built.device, built.dtype.itemsize, checkpointing_kwargs))
    built.knobs = knobs


def switch_techniques(base: PreTrainedModel, knobs: Knobs, place: Place) -> None:
    """Every model-level row of the techniques table switched to `knobs` on `base` (the transformers model inside
    peft's), in table order. Checkpointing must be set first: enabling it installs transformers' own checkpoint
    function, which activation offloading then wraps."""
    for technique in techniques.model_level():
        switch = techniques.switch_function(technique)
        assert switch is not None  # model_level() yields only rows that have one
        switch(base, getattr(knobs, technique.key), place)


def prepare_for_training(model, quantized: bool, checkpointing: bool, checkpointing_kwargs: dict | None) -> None:
    """Our k-bit preparation. peft's prepare_model_for_kbit_training also casts every non-quantized
    weight to fp32, which for Qwen3-8B's untied embeddings and lm_head costs an extra 2.5 GB; we
    keep them in the compute dtype (the adapters themselves stay fp32) and do the rest it does.
    (build_model leaves checkpointing to apply_knobs; tests/fake_trace.py asks for it here.)"""
    for p in model.parameters():
        p.requires_grad_(False)
    if checkpointing:
        enable_checkpointing(model, checkpointing_kwargs)
    if quantized:
        model.is_parallelizable = True
        model.model_parallel = True


def attach_lora(
    model,
    *,
    r: int,
    alpha: float,
    dropout: float,
    target_modules: list[str],
    target_parameters: Sequence[str] = (),
    arch: Architecture | None = None,
):
    """peft's LoRA on the `target_modules` Linears, and on the `target_parameters` tensors (an MoE model's fused
    experts: peft adds each expert's low-rank update to the stack, catalog.expert_lora_targets)."""
    from peft import LoraConfig, get_peft_model

    targets = check_target_modules(target_modules, arch)
    lora = LoraConfig(
        r=r,
        lora_alpha=alpha,  # type: ignore[arg-type]  # peft annotates int; the scale alpha / r takes any number
        lora_dropout=dropout,
        target_modules=list(targets),
        target_parameters=list(target_parameters) or None,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def build_model(
    ctx: RunContext,
    *,
    init: str | None = None,
    lora_r: int | None = None,
    device: torch.device | None = None,
    knobs: Knobs | None = None,
    after_load: Callable[[PreTrainedModel], AbstractContextManager] | None = None,
) -> BuiltModel:
    """The model `autotune train` trains and a solver trial measures, from a run's config.

    `init`, `lora_r` and `knobs` override the config (the solver tries ranks and techniques on random weights).
    `after_load(base)`: a context the rest of the build (adapters, techniques) runs in, entered once the base model
    has loaded (the CPU's tracked meter counts the loaded weights there, then what the build adds; trial.py).
    """
    quiet_libraries()
    cfg, spec = ctx.cfg, ctx.spec
    knobs = knobs or techniques.resolve(cfg, spec)
    device = device or pick_device()
    if device.type == "cpu":
        reuse_freed_host_memory()  # the CPU trains: its allocator is the step's (memory.py)
    dtype = compute_dtype(cfg, device)
    quantization = cfg.quantization
    if cfg.tf32 and device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    r = lora_r or cfg.lora_r
    techniques.check(knobs, spec)  # before loading: the tables a technique keeps on the host load there
    base = load_base_model(
        spec,
        init=init or cfg.init,
        quantization=quantization,
        dtype=dtype,
        device=device,
        seed=cfg.seed,
        sharded=cfg.distributed_strategy == "fsdp",
        host_tables=techniques.host_tables(knobs),
    )
    with after_load(base) if after_load else nullcontext():
        prepare_for_training(base, quantization != "none", False, None)
        # LoRA A matrices are drawn from torch's global RNG (the Trainer seeds it only later, in its
        # __init__): seed it here, or two runs of one config start from different adapters.
        torch.manual_seed(cfg.seed)
        experts = lora_on_experts(cfg.lora_experts, spec.architecture, spec.name)
        model = attach_lora(
            base,
            r=r,
            alpha=cfg.lora_alpha,
            dropout=cfg.lora_dropout,
            target_modules=cfg.target_modules,
            target_parameters=expert_lora_targets(spec.architecture) if experts else (),
            arch=spec.architecture,
        )
        built = BuiltModel(
            model=model,
            spec=spec,
            device=device,
            dtype=dtype,
            quantization=quantization,
            lora_r=r,
            lora_alpha=cfg.lora_alpha,
            target_modules=list(cfg.target_modules),
            knobs=Knobs(checkpointing=False, fused_loss=False),  # what the bare model does; apply_knobs sets them
        )
        apply_knobs(built, knobs, cfg.gradient_checkpointing_kwargs)
    return built


def quiet_libraries() -> None:
    """Silence known-harmless noise (bitsandbytes' optional CPU kernel hub lookup, tokenizer forks)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet.install()  # bitsandbytes' `pip install kernels` hint, that one message only (quiet.py)
    # transformers 5.24 renamed gradient to activation checkpointing; peft still asks the old name.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    # bitsandbytes' paged optimizers page only on CUDA; on the CPU (demo, tests) they run unpaged.
    warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU.*")
