"""The peers' spellings: what the keys of TRL's, LLaMA-Factory's and axolotl's SFT configs mean in autotune's terms.

One table (SPELLINGS), one row per key a peer writes that autotune spells otherwise, or that autotune has no key for:
the row turns the peer's value into autotune's keys, says that the value needs no key (it is what autotune does
anyway, or it only tunes the peer's own machinery), or says why it cannot be carried over. A config file may use
these keys (config.py reads them through `translate`, each with a note naming autotune's key); `--set` takes
autotune's names, and an unknown key's hint comes from this table before any guess by spelling.
`autotune convert` turns a whole peer file into an autotune config (`convert`): the keys, and the peer's own defaults
for what the file leaves unset where they differ from autotune's (DEFAULTS).

Plain data and small functions: importing this module imports nothing heavy.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

from autotune.catalog import ALL_LINEAR

TRL, LLAMA_FACTORY, AXOLOTL = "TRL", "LLaMA-Factory", "axolotl"
TOOLS = (TRL, LLAMA_FACTORY, AXOLOTL)


class NotCarried(Exception):
    """A peer's value autotune cannot honour: the message says why and what to do instead."""


# What a row makes of a value: autotune's keys and values ({} when the value needs none), or NotCarried.
Translate = Callable[[Any], dict[str, Any]]


@dataclass(frozen=True)
class Spelling:
    key: str
    tools: tuple[str, ...]  # who writes it
    translate: Translate
    names: tuple[str, ...] = ()  # autotune's keys it becomes, for did-you-mean hints and the README
    why: str = ""  # for a key that needs no autotune key: why (said in the note), or why it is refused
    refused: bool = False  # no value but an empty one is carried over

    @property
    def whose(self) -> str:
        return "/".join(self.tools) + "'s"


def _is_empty(value: Any) -> bool:
    return value is None or value == "" or value == [] or value == {}


def _same(name: str, convert: Callable[[Any], Any] = lambda v: v) -> Translate:
    return lambda value: {name: convert(value)}


def _when_true(values: dict[str, Any]) -> Translate:
    """A switch: true sets `values`, false says nothing."""
    return lambda value: dict(values) if value is True else {}


def _implied(*accepted: Any, otherwise: str) -> Translate:
    """A value that is what autotune does anyway (needs no key); any other is not carried, for `otherwise`."""

    def translate(value: Any) -> dict[str, Any]:
        if value in accepted or _is_empty(value):
            return {}
        raise NotCarried(otherwise)

    return translate


def _ignored(value: Any) -> dict[str, Any]:
    """A key that only tunes the peer's own machinery (workers, kernels, timeouts): nothing to carry."""
    return {}


def _not_carried(reason: str) -> Translate:
    """A key autotune has no equivalent for; empty or false, it says nothing."""

    def translate(value: Any) -> dict[str, Any]:
        if _is_empty(value) or value is False:
            return {}
        raise NotCarried(reason)

    return translate


def _steps(name: str, what: str) -> Translate:
    """A step count; the HF Trainer also takes a float below 1 as a share of the run, which autotune does not."""

    def translate(value: Any) -> dict[str, Any]:
        if isinstance(value, float) and 0 < value < 1:
            raise NotCarried(f"{value} is a share of the run's steps; autotune counts {what} in steps: set {name}")
        return {name: int(value) if isinstance(value, float) and value.is_integer() else value}

    return translate


def _eval_share(value: Any) -> dict[str, Any]:
    """val_size / val_set_size: a share of the data (autotune's eval_ratio), or in LLaMA-Factory a count."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        raise NotCarried(f"{value} samples held out: autotune holds out a share of the data, eval_ratio (0 to 1)")
    return {"eval_ratio": value}


def _targets(value: Any) -> dict[str, Any]:
    """LoRA targets: a list, "all-linear", LLaMA-Factory's "all" or its comma-separated names."""
    if value == "all":
        value = ALL_LINEAR
    if isinstance(value, str) and value != ALL_LINEAR:
        value = [name.strip() for name in value.split(",") if name.strip()]
    return {"target_modules": [ALL_LINEAR] if value == ALL_LINEAR else value}


def _quantization_bits(value: Any) -> dict[str, Any]:
    if value in (4, 8):
        return {"quantization": f"{value}bit"}
    if _is_empty(value):
        return {}
    raise NotCarried(f"{value}-bit: autotune quantizes the base weights to 4 or 8 bits (bitsandbytes) or not at all")


def _adapter(value: Any) -> dict[str, Any]:
    if value == "qlora":
        return {"quantization": "4bit"}
    if value == "lora" or _is_empty(value):
        return {}
    raise NotCarried(f"{value!r}: autotune trains LoRA adapters (on a 4-bit base: QLoRA) only")


def _dtype(value: Any) -> dict[str, Any]:
    """TRL's model dtype: the mixed precision autotune trains in."""
    precision = {"bfloat16": (True, False), "float16": (False, True), "float32": (False, False)}
    if isinstance(value, str) and value in precision:
        bf16, fp16 = precision[value]
        return {"bf16": bf16, "fp16": fp16}
    if value == "auto" or _is_empty(value):
        return {}
    raise NotCarried(f"{value!r}: autotune trains in bfloat16, float16 or float32 (bf16, fp16)")


def _warmup_steps(value: Any) -> dict[str, Any]:
    if value == 0:
        return {"warmup_ratio": 0.0}
    if _is_empty(value):
        return {}
    raise NotCarried(f"{value} steps: autotune warms up for a share of the steps, warmup_ratio (0 to 1)")


def _datasets(value: Any) -> dict[str, Any]:
    """axolotl's (and TRL's mixture) `datasets`: one hub dataset is autotune's dataset_name (and its split)."""
    if _is_empty(value):
        return {}
    entries = value if isinstance(value, list) else [value]
    paths = [e.get("path") for e in entries if isinstance(e, dict)]
    one = paths[0] if len(entries) == 1 and len(paths) == 1 else None
    if isinstance(one, str) and one.count("/") == 1 and not one.startswith((".", "/", "~")):
        out = {"dataset_name": one}
        if isinstance(entries[0].get("split"), str):
            out["dataset_split"] = entries[0]["split"]
        return out
    raise NotCarried(
        f"{len(entries)} dataset entries ({', '.join(str(p) for p in paths) or 'no path'}): autotune reads one folder "
        "(data_dir) or one hub dataset (dataset_name), and finds each record's format itself"
    )


def _packing(value: Any) -> dict[str, Any]:
    return {"packing": "on" if value else "off"} if isinstance(value, bool) else {}


_SDPA = "autotune's step runs PyTorch's SDPA attention"
_WORKERS = "how many processes prepare or load the data; autotune's own choice"
_EVAL = "autotune evaluates at each checkpoint (save_every_n_steps) on the eval_ratio it holds out"
_LF_DATA = (
    "LLaMA-Factory's dataset names are entries of its dataset_info.json: point data_dir at the data files, or "
    "dataset_name at a hub dataset"
)
_FSDP = "autotune shards with PyTorch FSDP2 itself: set distributed_strategy fsdp (one unit per decoder layer)"


def _refused(key: str, tools: tuple[str, ...], reason: str, names: tuple[str, ...] = ()) -> Spelling:
    """A key autotune has no equivalent for: any value but an empty or false one is left out, for `reason`."""
    return Spelling(key, tools, _not_carried(reason), names, why=reason, refused=True)


def _rows() -> list[Spelling]:
    rows = [
        # --- the model
        Spelling("model_name_or_path", (TRL, LLAMA_FACTORY), _same("model_name"), ("model_name",)),
        Spelling("base_model", (AXOLOTL,), _same("model_name"), ("model_name",)),
        Spelling("tokenizer_config", (AXOLOTL,), _same("tokenizer_name"), ("tokenizer_name",)),
        Spelling("dtype", (TRL,), _dtype, ("bf16", "fp16")),
        Spelling("torch_dtype", (TRL,), _dtype, ("bf16", "fp16")),
        # --- LoRA and quantization
        Spelling("lora_rank", (LLAMA_FACTORY,), _same("lora_r"), ("lora_r",)),
        Spelling("lora_target", (LLAMA_FACTORY,), _targets, ("target_modules",)),
        Spelling("lora_target_modules", (TRL, AXOLOTL), _targets, ("target_modules",)),
        Spelling(
            "lora_target_linear",
            (AXOLOTL,),
            _when_true({"target_modules": [ALL_LINEAR]}),
            ("target_modules",),
        ),
        Spelling("load_in_4bit", (TRL, AXOLOTL), _when_true({"quantization": "4bit"}), ("quantization",)),
        Spelling("load_in_8bit", (TRL, AXOLOTL), _when_true({"quantization": "8bit"}), ("quantization",)),
        Spelling("quantization_bit", (LLAMA_FACTORY,), _quantization_bits, ("quantization",)),
        Spelling("adapter", (AXOLOTL,), _adapter, ("quantization",)),
        Spelling(
            "finetuning_type",
            (LLAMA_FACTORY,),
            _implied("lora", otherwise="autotune trains LoRA adapters only"),
            why="autotune trains LoRA adapters",
        ),
        Spelling(
            "stage",
            (LLAMA_FACTORY,),
            _implied("sft", otherwise="autotune does supervised fine-tuning (sft) only"),
            why="autotune does supervised fine-tuning",
        ),
        Spelling(
            "do_train",
            (LLAMA_FACTORY,),
            _implied(True, otherwise="autotune's config is for training"),
            why="autotune's config is for training",
        ),
        Spelling(
            "use_peft",
            (TRL,),
            _implied(True, otherwise="without use_peft TRL trains every weight; autotune trains LoRA adapters only"),
            why="autotune trains LoRA adapters",
        ),
        Spelling(
            "lora_task_type",
            (TRL,),
            _implied("CAUSAL_LM", otherwise="autotune trains causal language models"),
            why="autotune trains causal language models",
        ),
        Spelling(
            "quantization_method",
            (LLAMA_FACTORY,),
            _implied("bnb", "bitsandbytes", otherwise="autotune quantizes with bitsandbytes only"),
            why="autotune quantizes with bitsandbytes",
        ),
        Spelling(
            "bnb_4bit_quant_type",
            (TRL,),
            _implied("nf4", otherwise="autotune's 4-bit weights are nf4"),
            why="autotune's 4-bit weights are nf4",
        ),
        Spelling(
            "quantization_type",
            (LLAMA_FACTORY,),
            _implied("nf4", otherwise="autotune's 4-bit weights are nf4"),
            why="autotune's 4-bit weights are nf4",
        ),
        Spelling("use_bnb_nested_quant", (TRL,), _ignored, why="autotune's 4-bit weights are always double-quantized"),
        Spelling(
            "double_quantization",
            (LLAMA_FACTORY,),
            _ignored,
            why="autotune's 4-bit weights are always double-quantized",
        ),
        Spelling(
            "lora_fan_in_fan_out",
            (AXOLOTL,),
            _implied(False, otherwise="Qwen3's projections are plain Linear layers"),
            why="Qwen3's projections are plain Linear layers",
        ),
        _refused(
            "lora_model_dir",
            (AXOLOTL,),
            "an adapter to start from: autotune starts a new one (`autotune train --resume` goes on)",
        ),
        _refused(
            "adapter_name_or_path",
            (LLAMA_FACTORY,),
            "an adapter to start from: autotune starts a new one (`autotune train --resume` goes on)",
        ),
        # --- data
        Spelling("cutoff_len", (LLAMA_FACTORY,), _same("max_sequence_length"), ("max_sequence_length",)),
        Spelling("sequence_len", (AXOLOTL,), _same("max_sequence_length"), ("max_sequence_length",)),
        Spelling("max_length", (TRL,), _same("max_sequence_length"), ("max_sequence_length",)),
        Spelling("max_seq_length", (TRL,), _same("max_sequence_length"), ("max_sequence_length",)),
        _refused("dataset", (LLAMA_FACTORY,), _LF_DATA, ("data_dir", "dataset_name")),
        _refused("dataset_dir", (LLAMA_FACTORY,), _LF_DATA, ("data_dir",)),
        Spelling("datasets", (AXOLOTL, TRL), _datasets, ("dataset_name", "data_dir")),
        Spelling("dataset_train_split", (TRL,), _same("dataset_split"), ("dataset_split",)),
        Spelling("dataset_prepared_path", (AXOLOTL,), _same("data_cache_dir"), ("data_cache_dir",)),
        Spelling("val_size", (LLAMA_FACTORY,), _eval_share, ("eval_ratio",)),
        Spelling("val_set_size", (AXOLOTL,), _eval_share, ("eval_ratio",)),
        Spelling(
            "template",
            (LLAMA_FACTORY,),
            _implied("qwen3", "qwen3_nothink", otherwise="autotune renders the model's own chat template (Qwen3's)"),
            why="autotune renders Qwen3's own chat template",
        ),
        Spelling(
            "chat_template",
            (AXOLOTL,),
            _implied(
                "qwen3", "tokenizer_default", otherwise="autotune renders the model's own chat template (Qwen3's)"
            ),
            why="autotune renders Qwen3's own chat template",
        ),
        Spelling(
            "eos_token",
            (TRL,),
            _implied("<|im_end|>", otherwise="autotune ends each turn with Qwen3's <|im_end|>"),
            why="autotune ends each turn with Qwen3's <|im_end|>",
        ),
        Spelling(
            "train_on_inputs",
            (AXOLOTL,),
            _implied(False, otherwise="autotune's loss is on the assistant's tokens only"),
            why="autotune's loss is on the assistant's tokens only",
        ),
        Spelling(
            "completion_only_loss",
            (TRL,),
            _implied(True, otherwise="autotune's loss is on the assistant's tokens only"),
            why="autotune's loss is on the assistant's tokens only",
        ),
        Spelling(
            "assistant_only_loss",
            (TRL,),
            _implied(True, otherwise="autotune's loss is on the assistant's tokens only"),
            why="autotune's loss is on the assistant's tokens only",
        ),
        Spelling("sample_packing", (AXOLOTL,), _packing, ("packing",)),
        _refused("max_samples", (LLAMA_FACTORY,), "autotune trains on every sample of the data it is given"),
        _refused("dataset_config", (TRL,), "a hub dataset's configuration: autotune reads its default"),
        # --- schedule and batch
        Spelling("per_device_train_batch_size", (TRL, LLAMA_FACTORY), _same("batch_size"), ("batch_size",)),
        Spelling("micro_batch_size", (AXOLOTL,), _same("batch_size"), ("batch_size",)),
        Spelling("per_device_eval_batch_size", (TRL, LLAMA_FACTORY), _same("eval_batch_size"), ("eval_batch_size",)),
        Spelling("num_train_epochs", (TRL, LLAMA_FACTORY), _same("num_epochs"), ("num_epochs",)),
        Spelling("optim", (TRL, LLAMA_FACTORY), _same("optimizer"), ("optimizer",)),
        Spelling("lr_scheduler", (AXOLOTL,), _same("lr_scheduler_type"), ("lr_scheduler_type",)),
        Spelling("warmup_steps", (TRL, LLAMA_FACTORY, AXOLOTL), _warmup_steps, ("warmup_ratio",)),
        Spelling(
            "activation_offloading", (TRL, AXOLOTL), _when_true({"offload_activations": "on"}), ("offload_activations",)
        ),
        Spelling("use_liger_kernel", (TRL,), _when_true({"fused_loss": "on"}), ("fused_loss",)),
        Spelling("enable_liger_kernel", (LLAMA_FACTORY,), _when_true({"fused_loss": "on"}), ("fused_loss",)),
        Spelling("cut_cross_entropy", (AXOLOTL,), _when_true({"fused_loss": "on"}), ("fused_loss",)),
        Spelling("liger_fused_linear_cross_entropy", (AXOLOTL,), _when_true({"fused_loss": "on"}), ("fused_loss",)),
        # --- checkpoints, logging, the run
        Spelling(
            "save_steps",
            (TRL, LLAMA_FACTORY, AXOLOTL),
            _steps("save_every_n_steps", "checkpoints"),
            ("save_every_n_steps",),
        ),
        Spelling(
            "logging_steps",
            (TRL, LLAMA_FACTORY, AXOLOTL),
            _steps("log_every_n_steps", "logging"),
            ("log_every_n_steps",),
        ),
        Spelling("logging_dir", (TRL, LLAMA_FACTORY), _same("tensorboard_log_dir"), ("tensorboard_log_dir",)),
        Spelling("wandb_project", (AXOLOTL,), _when_project, ("report_to",)),
        Spelling(
            "resume_from_checkpoint",
            (TRL, LLAMA_FACTORY, AXOLOTL),
            _ignored,
            why="autotune resumes on the command line: `autotune train --resume` (the newest checkpoint in output_dir)",
        ),
        Spelling(
            "overwrite_output_dir",
            (TRL, LLAMA_FACTORY),
            _ignored,
            why="autotune replaces an earlier run on the command line only: `autotune train --overwrite`",
        ),
        _refused(
            "saves_per_epoch",
            (AXOLOTL,),
            "autotune saves every save_every_n_steps optimizer steps: set that",
            ("save_every_n_steps",),
        ),
        Spelling(
            "save_strategy",
            (TRL, LLAMA_FACTORY, AXOLOTL),
            _implied("steps", otherwise="autotune saves every save_every_n_steps optimizer steps: set that"),
            ("save_every_n_steps",),
            why="autotune saves every save_every_n_steps optimizer steps",
        ),
        _refused(
            "push_to_hub",
            (TRL, LLAMA_FACTORY, AXOLOTL),
            "autotune never uploads: `autotune export` the run, then push that folder",
        ),
        _refused("deepspeed", (TRL, LLAMA_FACTORY, AXOLOTL), _FSDP, ("distributed_strategy",)),
        _refused("fsdp", (TRL, LLAMA_FACTORY, AXOLOTL), _FSDP, ("distributed_strategy",)),
        _refused("fsdp_config", (TRL, LLAMA_FACTORY, AXOLOTL), _FSDP, ("distributed_strategy",)),
        _refused("fsdp_version", (AXOLOTL,), _FSDP, ("distributed_strategy",)),
        _refused("special_tokens", (AXOLOTL,), "autotune keeps Qwen3's tokenizer and its special tokens as they are"),
        _refused("tokens", (AXOLOTL,), "autotune keeps Qwen3's tokenizer as it is"),
        Spelling("plugins", (AXOLOTL,), _plugins, ("fused_loss",)),
        _refused("early_stopping_patience", (AXOLOTL,), "autotune trains max_steps or num_epochs"),
        _refused("neftune_noise_alpha", (TRL, LLAMA_FACTORY, AXOLOTL), "autotune adds no noise to embeddings"),
        _refused("use_dora", (TRL, LLAMA_FACTORY), "autotune trains plain LoRA (no DoRA)", ("lora_r",)),
        _refused("peft_use_dora", (AXOLOTL,), "autotune trains plain LoRA (no DoRA)", ("lora_r",)),
        _refused("use_rslora", (TRL, LLAMA_FACTORY), "autotune scales LoRA by lora_alpha / lora_r", ("lora_alpha",)),
        _refused("peft_use_rslora", (AXOLOTL,), "autotune scales LoRA by lora_alpha / lora_r", ("lora_alpha",)),
        _refused(
            "lora_modules_to_save",
            (TRL, AXOLOTL),
            "autotune trains LoRA adapters only, no whole modules",
        ),
        _refused("additional_target", (LLAMA_FACTORY,), "autotune trains LoRA adapters only, no whole modules"),
    ]
    # Keys that tune only the peer's machinery: nothing to carry, one reason each.
    ignored = {
        _SDPA: (
            ("attn_implementation", (TRL,)),
            ("flash_attn", (LLAMA_FACTORY,)),
            ("flash_attention", (AXOLOTL,)),
            ("sdp_attention", (AXOLOTL,)),
            ("xformers_attention", (AXOLOTL,)),
            ("fused_attn_kernel", (AXOLOTL,)),
        ),
        _WORKERS: (
            ("preprocessing_num_workers", (LLAMA_FACTORY,)),
            ("dataloader_num_workers", (TRL, LLAMA_FACTORY, AXOLOTL)),
            ("dataset_processes", (AXOLOTL,)),
            ("dataset_num_proc", (TRL,)),
        ),
        _EVAL: (
            ("eval_strategy", (TRL, LLAMA_FACTORY, AXOLOTL)),
            ("eval_steps", (TRL, LLAMA_FACTORY, AXOLOTL)),
            ("evals_per_epoch", (AXOLOTL,)),
            ("do_eval", (TRL, LLAMA_FACTORY)),
            ("eval_sample_packing", (AXOLOTL,)),
            ("dataset_test_split", (TRL,)),
        ),
        "axolotl's Triton LoRA kernels; autotune's step runs PEFT's LoRA layers": (
            ("lora_mlp_kernel", (AXOLOTL,)),
            ("lora_qkv_kernel", (AXOLOTL,)),
            ("lora_o_kernel", (AXOLOTL,)),
        ),
        "autotune never runs a model's own code (Qwen3 needs none)": (("trust_remote_code", (TRL, LLAMA_FACTORY)),),
        "autotune reads the model's own config.json": (
            ("base_model_config", (AXOLOTL,)),
            ("model_type", (AXOLOTL,)),
            ("tokenizer_type", (AXOLOTL,)),
        ),
        "autotune checks every key of its config always": (("strict", (AXOLOTL,)),),
        "autotune caches the tokenized data in data_cache_dir itself": (("overwrite_cache", (LLAMA_FACTORY,)),),
        "autotune logs to TensorBoard and its JSONL log; `autotune profiles plot` draws a solved profile": (
            ("plot_loss", (LLAMA_FACTORY,)),
        ),
        "autotune's checkpoints keep the optimizer state, so that a resume is exact": (
            ("save_only_model", (TRL, LLAMA_FACTORY, AXOLOTL)),
        ),
        "torchrun's and NCCL's own settings": (("ddp_timeout", (TRL, LLAMA_FACTORY)), ("local_rank", (AXOLOTL,))),
        "autotune pads each micro-batch to its longest row, or packs it": (
            ("pad_to_sequence_len", (AXOLOTL,)),
            ("group_by_length", (TRL, AXOLOTL)),
        ),
        "the peer's own naming and uploading": (
            ("run_name", (TRL, LLAMA_FACTORY)),
            ("hub_model_id", (TRL, LLAMA_FACTORY, AXOLOTL)),
            ("hub_strategy", (TRL, AXOLOTL)),
        ),
        "wandb reads its own environment (WANDB_ENTITY, WANDB_NAME, ...)": tuple(
            (f"wandb_{name}", (AXOLOTL,)) for name in ("entity", "watch", "name", "log_model", "run_id", "mode")
        ),
        "`autotune solve` measures the batch that fits": (("auto_find_batch_size", (TRL, LLAMA_FACTORY)),),
        "autotune's step is not compiled": (("torch_compile", (TRL, AXOLOTL)),),
        "the peer's debug output": (("debug", (AXOLOTL,)), ("save_first_step", (AXOLOTL,))),
        "set these in the shell": (("env", (TRL,)),),
    }
    for why, keys in ignored.items():
        rows += [Spelling(key, tools, _ignored, why=why) for key, tools in keys]
    return rows


def _when_project(value: Any) -> dict[str, Any]:
    """axolotl reports to wandb when a project is named (wandb takes the name from WANDB_PROJECT)."""
    return {} if _is_empty(value) else {"report_to": ["wandb"]}


# axolotl's plugins that are autotune's fused loss (the logits never exist whole).
_FUSED_LOSS_PLUGINS = (
    "axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin",
    "axolotl.integrations.liger.LigerPlugin",
)


def _plugins(value: Any) -> dict[str, Any]:
    if _is_empty(value):
        return {}
    names = value if isinstance(value, list) else [value]
    other = [name for name in names if name not in _FUSED_LOSS_PLUGINS]
    if other:
        raise NotCarried(f"{other}: autotune has no plugins (its fused loss, fused_loss, is cut cross-entropy's idea)")
    return {"fused_loss": "on"}


SPELLINGS: dict[str, Spelling] = {row.key: row for row in _rows()}

# Values of autotune's own keys that only a peer writes, and what they mean: axolotl's `bf16: auto` (bf16 where the GPU
# has it), its `gradient_checkpointing: offload` (with the saved layer inputs in CPU memory), the HF Trainer's
# `max_steps: -1` (not set).
_PEER_VALUES: dict[tuple[str, Any], tuple[str, dict[str, Any], str]] = {
    ("bf16", "auto"): (f"{AXOLOTL}'s", {"bf16": True}, "`autotune validate --hardware` checks that the GPU has bf16"),
    ("gradient_checkpointing", "offload"): (
        f"{AXOLOTL}'s",
        {"gradient_checkpointing": True, "offload_activations": "on"},
        "checkpointing with the layer inputs in CPU memory",
    ),
    ("max_steps", -1): ("the HF Trainer's", {}, "-1 is its 'not set': num_epochs decides"),
}


@dataclass
class Translation:
    """A peer's values in autotune's keys, and what happened to each peer key."""

    values: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # each peer key read, and as what
    left_out: list[str] = field(default_factory=list)  # each peer key not carried over, and why
    conflicts: list[str] = field(default_factory=list)  # two keys setting one autotune key to two values
    read: dict[str, str] = field(default_factory=dict)  # autotune key -> the peer key it came from


def _show(values: dict[str, Any]) -> str:
    import json

    return ", ".join(f"{k} {json.dumps(v)}" for k, v in values.items())


def translate(values: dict, own_keys: Collection[str]) -> Translation:
    """`values` (one layer of a config file) in autotune's keys. A key of autotune's own passes as it is (but for the
    peer-only values of _PEER_VALUES); a peer's key becomes autotune's keys with a note, or is left out with the
    reason; an unknown key passes on for the config to report."""
    out = Translation()
    for key, value in values.items():
        if not isinstance(key, str):
            out.values[key] = value
            continue
        peer_value = _PEER_VALUES.get((key, value)) if isinstance(value, (str, int)) else None
        if peer_value is not None:
            whose, became, why = peer_value
            out.notes.append(
                f"key {key!r} {value!r} ({whose}): " + (f"read as {_show(became)}; " if became else "") + why
            )
            _merge(out, key, became)
            continue
        row = SPELLINGS.get(key)
        if key in own_keys or row is None:
            _merge(out, key, {key: value})
            continue
        try:
            became = row.translate(value)
        except NotCarried as exc:
            out.left_out.append(f"key {key!r} ({row.whose}): {exc}")
            continue
        if became:
            out.notes.append(f"key {key!r} ({row.whose}): read as {_show(became)}")
        elif not _is_empty(value) and value is not False:  # an empty or false value says nothing: no note
            out.notes.append(f"key {key!r} ({row.whose}): nothing to set: {_reason(row)}")
        _merge(out, key, became)
    return out


def _merge(out: Translation, key: str, became: dict[str, Any]) -> None:
    """Add one key's translation; two keys that set one autotune key must agree (LoRA targets add up, as axolotl's
    lora_target_linear and lora_target_modules do)."""
    for name, value in became.items():
        if name not in out.values:
            out.values[name], out.read[name] = value, key
            continue
        before = out.values[name]
        if name == "target_modules" and isinstance(before, list) and isinstance(value, list):
            out.values[name] = list(dict.fromkeys(before + value))
        elif before != value:
            out.conflicts.append(
                f"keys {out.read[name]!r} and {key!r} both set {name}, to {before!r} and {value!r}: keep one"
            )


def hint(key: str) -> str | None:
    """The did-you-mean of a key the table knows, to follow "unknown key K": autotune's name for it, or what autotune
    does instead."""
    row = SPELLINGS.get(key)
    if row is None:
        return None
    if row.names:
        return f" (did you mean {row.names[0]!r}?), {row.whose} name for it"
    return f" ({row.whose} key: {_reason(row)})"


def _reason(row: Spelling) -> str:
    """Why a row that names no autotune key has none: its note, or the reason it refuses any value."""
    if row.why:
        return row.why
    try:
        row.translate("?")
    except NotCarried as exc:
        return str(exc)
    return "autotune has no key for it"


# ----------------------------------------------------------------------------------- a whole file


# The peer's own defaults for what its file leaves unset, where autotune's differ (so that a converted config trains
# what the peer would have): (autotune key, value, the peer's key). TRL: SFTConfig and ModelConfig over the HF
# TrainingArguments; LLaMA-Factory: its FinetuningArguments and DataArguments over the same; axolotl: its config schema.
# A callable value is computed from the converted values (LLaMA-Factory's lora_alpha is twice the rank).
DEFAULTS: dict[str, tuple[tuple[str, Any, str], ...]] = {
    TRL: (
        ("quantization", "none", "load_in_4bit"),
        ("num_epochs", 3.0, "num_train_epochs"),
        ("learning_rate", 2e-5, "learning_rate"),
        ("max_sequence_length", 1024, "max_length"),
        ("batch_size", 8, "per_device_train_batch_size"),
        ("gradient_accumulation_steps", 1, "gradient_accumulation_steps"),
        ("lora_r", 16, "lora_r"),
        ("lora_alpha", 32, "lora_alpha"),
        ("lora_dropout", 0.05, "lora_dropout"),
        ("target_modules", ["q_proj", "v_proj"], "lora_target_modules (PEFT's default for Qwen3)"),
        ("lr_scheduler_type", "linear", "lr_scheduler_type"),
        ("warmup_ratio", 0.0, "warmup_ratio"),
        ("weight_decay", 0.0, "weight_decay"),
    ),
    LLAMA_FACTORY: (
        ("quantization", "none", "quantization_bit"),
        ("num_epochs", 3.0, "num_train_epochs"),
        ("max_sequence_length", 2048, "cutoff_len"),
        ("batch_size", 8, "per_device_train_batch_size"),
        ("gradient_accumulation_steps", 1, "gradient_accumulation_steps"),
        ("lora_r", 8, "lora_rank"),
        ("lora_alpha", lambda values: 2 * values["lora_r"], "lora_alpha (twice lora_rank)"),
        ("lora_dropout", 0.0, "lora_dropout"),
        ("target_modules", [ALL_LINEAR], "lora_target (all)"),
        ("lr_scheduler_type", "linear", "lr_scheduler_type"),
        ("warmup_ratio", 0.0, "warmup_ratio"),
        ("weight_decay", 0.0, "weight_decay"),
    ),
    AXOLOTL: (
        ("quantization", "none", "load_in_4bit"),
        ("num_epochs", 1.0, "num_epochs"),
        ("max_sequence_length", 512, "sequence_len"),
        ("batch_size", 1, "micro_batch_size"),
        ("gradient_accumulation_steps", 1, "gradient_accumulation_steps"),
        ("lora_dropout", 0.0, "lora_dropout"),
        ("gradient_checkpointing", False, "gradient_checkpointing"),
        ("lr_scheduler_type", "cosine", "lr_scheduler"),
        ("weight_decay", 0.0, "weight_decay"),
    ),
}

# Keys of autotune's own that tell a peer's file apart (TRL names its hub dataset as autotune does).
_SIGNALS: dict[str, tuple[str, ...]] = {
    "dataset_name": (TRL,),
    "packing": (TRL, LLAMA_FACTORY),
    "lr_scheduler_type": (TRL, LLAMA_FACTORY),
    "num_epochs": (AXOLOTL,),
    "eval_batch_size": (AXOLOTL,),
}
# Accepted by `convert --from`.
TOOL_NAMES = {"trl": TRL, "llama-factory": LLAMA_FACTORY, "axolotl": AXOLOTL}


def detect(doc: dict) -> str | None:
    """Which peer wrote `doc`: the tool whose keys it holds most of (a key two tools write counts half to each);
    None when no peer key is there or two tools tie."""
    score = dict.fromkeys(TOOLS, 0.0)
    for key in doc:
        row = SPELLINGS.get(key)
        tools = row.tools if row is not None else _SIGNALS.get(key, ())
        for tool in tools:
            score[tool] += 1 / len(tools)
    best = max(score.values())
    winners = [tool for tool in TOOLS if score[tool] == best]
    return winners[0] if best > 0 and len(winners) == 1 else None


@dataclass
class Conversion:
    """`autotune convert`'s answer: the peer, autotune's values, and what happened to the file's keys."""

    tool: str
    values: dict[str, Any]
    notes: list[str]
    left_out: list[str]


def convert(doc: dict, tool: str, own_keys: Collection[str]) -> Conversion:
    """A peer's whole config in autotune's keys: `translate`, then the peer's defaults for what it left unset
    (DEFAULTS), each said. Two keys that disagree are a UserError."""
    from autotune.errors import UserError

    out = translate(doc, own_keys)
    if out.conflicts:
        raise UserError("; ".join(out.conflicts))
    values, notes = dict(out.values), list(out.notes)
    for name, default, peer_key in DEFAULTS[tool]:
        if name in values:
            continue
        values[name] = default(values) if callable(default) else default
        notes.append(
            f"{name} {_show({'': values[name]}).strip()}: {tool}'s default {peer_key}, which the file leaves unset"
        )
    return Conversion(tool, values, notes, out.left_out)


def reference_markdown() -> str:
    """The README's table of the peers' keys, from SPELLINGS (so the two cannot drift)."""
    rows = ["| key | written by | in autotune |", "|---|---|---|"]
    for row in sorted(SPELLINGS.values(), key=lambda r: r.key):
        if row.refused:
            meaning = "not carried over: " + row.why
        elif row.names:
            meaning = ", ".join(f"`{name}`" for name in row.names)
        else:
            meaning = "nothing to set: " + _reason(row)
        rows.append(f"| `{row.key}` | {', '.join(row.tools)} | {meaning} |")
    return "\n".join(rows)
