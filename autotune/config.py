"""The typed run configuration: every key of the original guide, inheritance, validation, presets.

A config file is JSON, or YAML when it is named *.yaml / *.yml (same schema, inheritance and messages). It may
name a `base_config` (a path relative to the file, or a preset name from
profiles/) and put its own values at top level or under `overrides`; chains are followed and cycles
reported. Every error of a file is collected and reported at once, as a UserError (exit code 2).
Importing this module must not import torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeGuard

from autotune import peers
from autotune.batching import BatchPlan
from autotune.catalog import (
    ALL_LINEAR,
    ATTENTION_PROJECTIONS,
    PROJECTIONS,
    ModelSpec,
    check_target_modules,
    lora_on_experts,
    resolve_model,
    resolve_targets,
)
from autotune.errors import UserError, brief
from autotune.techniques import SWITCHES, TECHNIQUES_TABLE


def _profiles_dir() -> Path:
    """Presets: $AUTOTUNE_PROFILES, else profiles/ of the source tree (editable install), else the copy a
    wheel installs under <prefix>/share/autotune/profiles."""
    import sys

    if os.environ.get("AUTOTUNE_PROFILES"):
        return Path(os.environ["AUTOTUNE_PROFILES"])
    source = Path(__file__).resolve().parent.parent / "profiles"
    installed = Path(sys.prefix) / "share" / "autotune" / "profiles"
    return source if source.is_dir() or not installed.is_dir() else installed


PROFILES_DIR = _profiles_dir()
PRESET_KINDS = ("hardware", "models", "strategies", "lora", "configs")

# The allowed values of the keys that take a choice: modules that branch on them import these.
QUANTIZATIONS = ("4bit", "8bit", "none")
INIT_MODES = ("pretrained", "random")
MARKDOWN_FORMATS = ("simple_qa", "header_qa")
# Tables, read through the `datasets` library (each name is also its packaged builder's name).
TABLE_FORMATS = ("parquet", "arrow", "csv")
DATA_FORMATS = ("auto", *MARKDOWN_FORMATS, "jsonl", "json", *TABLE_FORMATS)
# Reasoning traces of the data (reasoning_content, or a <think> block opening an answer): trained inside the
# model's think block, or dropped (the sample then trains the empty think block, like one without a trace).
REASONING_TRACES = ("train", "drop")
# Other reasoning-trace markers opening an answer (<|begin_of_thought|>...<|end_of_thought|>, <reasoning>...</reasoning>):
# mapped into the think block (`think`), or left in the answer as written (`text`).
REASONING_MARKERS = ("think", "text")
OVERFLOW_POLICIES = ("truncate", "drop")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
# `autotune solve --objective`, and the ranks `--objective max-rank` tries when none are given.
OBJECTIVES = ("throughput", "max-seq", "max-rank")
MAX_RANK_CANDIDATES = (4, 8, 16, 32, 64)
# The trials a solve runs at most unless --max-trials says otherwise: the search, the technique combinations
# the estimate says could matter, and the evaluation step.
DEFAULT_MAX_TRIALS = 12
# How the ranks of a multi-process run (torchrun) share the work: `ddp` (every rank holds the whole quantized model
# and trains on its shard of the data), `fsdp` (parameters, gradients and optimizer state sharded across the
# ranks: a model that does not fit one card), `auto` (the solved profile's, else ddp; solve picks by the estimate).
STRATEGIES = ("auto", "ddp", "fsdp")
# `autotune export --dtype`: auto keeps the dtype the run trained in (the adapter as saved, without --merge).
EXPORT_DTYPES = ("auto", "bf16", "fp16", "fp32")
# The guide's LoRA targets: the attention projections.
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")


def _choice(values: tuple[str, ...]) -> str:
    return "choice:" + "|".join(values)


# The HF Trainer's names, as transformers 5.24 has them (training_args.OptimizerNames, trainer_utils.SchedulerType,
# integrations.INTEGRATION_TO_CALLBACK): `autotune validate` checks the config's names against these copies without
# importing transformers (which loads torch), and a test holds them to the installed transformers. `autotune train`
# checks against transformers itself (step.check_training_settings).
OPTIMIZERS = (
    "adamw_torch",
    "adamw_torch_fused",
    "adamw_torch_xla",
    "adamw_torch_npu_fused",
    "adafactor",
    "adamw_anyprecision",
    "adamw_torch_4bit",
    "adamw_torch_8bit",
    "ademamix",
    "sgd",
    "adagrad",
    "adamw_bnb_8bit",
    "adamw_8bit",
    "ademamix_8bit",
    "lion_8bit",
    "lion_32bit",
    "paged_adamw_32bit",
    "paged_adamw_8bit",
    "paged_ademamix_32bit",
    "paged_ademamix_8bit",
    "paged_lion_32bit",
    "paged_lion_8bit",
    "rmsprop",
    "rmsprop_bnb",
    "rmsprop_bnb_8bit",
    "rmsprop_bnb_32bit",
    "galore_adamw",
    "galore_adamw_8bit",
    "galore_adafactor",
    "galore_adamw_layerwise",
    "galore_adamw_8bit_layerwise",
    "galore_adafactor_layerwise",
    "lomo",
    "adalomo",
    "grokadamw",
    "schedule_free_radam",
    "schedule_free_adamw",
    "schedule_free_sgd",
    "apollo_adamw",
    "apollo_adamw_layerwise",
    "stable_adamw",
)
SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "reduce_lr_on_plateau",
    "cosine_with_min_lr",
    "cosine_warmup_with_min_lr",
    "warmup_stable_decay",
    "greedy",
)
TRACKERS = (
    "azure_ml",
    "clearml",
    "codecarbon",
    "comet_ml",
    "dagshub",
    "dvclive",
    "flyte",
    "kubeflow",
    "mlflow",
    "neptune",
    "swanlab",
    "tensorboard",
    "trackio",
    "wandb",
)
NO_TRACKER = "none"  # the Trainer's report_to for none


# Per key: (documentation, constraint). The constraint is checked by value_is.
# Kinds: "int>=1", "float>0", "ratio" (0..1), "bool", "str", "str?", "list[str]", "dict", "choice:a|b".


def _key(default: Any, doc: str, kind: str) -> Any:
    """A config field: its default (a fresh copy per Config), its documentation and its constraint."""

    def fresh() -> Any:
        return json.loads(json.dumps(default))

    return field(default_factory=fresh, metadata={"doc": doc, "kind": kind})


@dataclass
class StructuredLogging:
    enabled: bool = _key(True, "Write the JSONL training log.", "bool")
    log_file: str = _key(
        "./logs/structured/training.jsonl", "Path of the JSONL log (relative to the working directory).", "str"
    )
    log_level: str = _key("INFO", "Lowest level written.", _choice(LOG_LEVELS))
    include_memory_stats: bool = _key(True, "Add process RAM and GPU memory to each metrics record.", "bool")
    include_model_stats: bool = _key(True, "Log trainable and total parameter counts.", "bool")


def with_technique_switches(cls):
    """One auto|on|off key per row of the techniques table, documented by the row, after the keys written out:
    a new technique's row is its config key (solve measures it, the profile records it)."""
    for technique in TECHNIQUES_TABLE:
        cls.__annotations__[technique.key] = "str"
        setattr(cls, technique.key, _key("auto", technique.config_doc(), _choice(SWITCHES)))
    return cls


@dataclass
@with_technique_switches
class Config:
    # --- model and output ---
    model_name: str = _key(
        "Qwen/Qwen3-4B-Thinking-2507",
        "Qwen3 short name (Qwen3-14B), hub id, or local directory with config.json.",
        "str",
    )
    tokenizer_name: str | None = _key(
        None,
        "Tokenizer to use; null: the model's own. `qwen3-offline` builds Qwen3's tokenizer without network.",
        "str?",
    )
    init: str = _key(
        "pretrained",
        "`pretrained` loads real weights; `random` builds the architecture with random weights (demo, tests, solver trials).",
        _choice(INIT_MODES),
    )
    output_dir: str = _key(
        "./qwen3-finetuned", "Where the adapter, tokenizer, resolved config and run summary go.", "str"
    )
    max_memory_gb: float | None = _key(
        13.0,
        "GPU memory budget in GiB; solve fits inside it, validate checks it. null: probed free memory less a margin.",
        "float>0?",
    )
    quantization: str = _key(
        "4bit", "Base weights: `4bit` (nf4 + double quant, QLoRA), `8bit`, or `none`.", _choice(QUANTIZATIONS)
    )
    # --- batch and schedule ---
    batch_size: int = _key(4, "Per-device micro-batch.", "int>=1")
    gradient_accumulation_steps: int = _key(16, "Micro-batches per optimizer step.", "int>=1")
    effective_batch_size: int | None = _key(
        None,
        "Samples per optimizer step; when set, gradient_accumulation_steps = effective_batch_size / batch_size (solve keeps it fixed); null: batch_size x gradient_accumulation_steps.",
        "int>=1?",
    )
    learning_rate: float = _key(5e-5, "Peak learning rate.", "float>0")
    num_epochs: float = _key(100, "Epochs over the training split (ignored when max_steps is set).", "float>0")
    max_steps: int | None = _key(None, "Stop after this many optimizer steps; null: run num_epochs.", "int>=1?")
    max_sequence_length: int = _key(
        256, "Tokens per sample (prompt + answer); longer samples follow `overflow`.", "int>=8"
    )
    warmup_ratio: float = _key(0.1, "Fraction of steps spent warming up the learning rate.", "ratio")
    weight_decay: float = _key(0.01, "AdamW weight decay.", "float>=0")
    max_grad_norm: float = _key(1.0, "Gradient clipping norm (0 disables).", "float>=0")
    seed: int = _key(42, "Seed for init, shuffling and the train/eval split.", "int>=0")
    # --- LoRA ---
    lora_r: int = _key(6, "LoRA rank.", "int>=1")
    lora_alpha: float = _key(12, "LoRA scaling numerator (scale = alpha / r).", "float>0")
    lora_dropout: float = _key(
        0.1,
        "Dropout on the LoRA path (unset: 0 where adapters sit on an MoE model's experts, which take none).",
        "ratio",
    )
    target_modules: list[str] = _key(list(DEFAULT_TARGET_MODULES), "Linear layers that get adapters.", "list[str]")
    lora_experts: str = _key(
        "auto",
        "Mixture-of-experts models (Qwen3-30B-A3B, 235B-A22B): adapters on every expert's fused gate/up and down "
        "tensors too (PEFT's target_parameters), the router frozen. auto: on for those models; a dense model has none.",
        _choice(SWITCHES),
    )
    # --- data ---
    data_dir: str = _key(
        "data/raw",
        "Folder of *.md QA files (README.md skipped), *.jsonl, *.json, *.parquet, *.arrow or *.csv.",
        "str",
    )
    data_format: str = _key("auto", "`auto` detects per file; or force one format.", _choice(DATA_FORMATS))
    data_encoding: str | None = _key(
        None,
        "The text encoding of the data files; null: a BOM or UTF-8, else a legacy Chinese, Korean or Japanese "
        "encoding where only one reads as its script (two plausible readings are an error asking for this key).",
        "str?",
    )
    dataset_name: str | None = _key(
        None,
        "A Hugging Face hub dataset id (org/name) read through `datasets` instead of data_dir; needs the hub, or "
        "the dataset in the local cache when offline.",
        "str?",
    )
    dataset_split: str = _key("train", "The split of dataset_name to read.", "str")
    reasoning_traces: str = _key(
        "train",
        "Reasoning traces in the data (reasoning_content, or a <think> block opening an answer): `train` them "
        "inside the model's think block, or `drop` them (the empty think block is trained instead).",
        _choice(REASONING_TRACES),
    )
    reasoning_markers: str = _key(
        "think",
        "Other reasoning-trace markers opening an answer (<|begin_of_thought|>...<|end_of_thought|>, "
        "<reasoning>...</reasoning>): `think` maps the trace into the model's think block (then reasoning_traces "
        "applies; a <|begin_of_solution|> wrapper around the answer is removed), `text` leaves them in the answer "
        "as written.",
        _choice(REASONING_MARKERS),
    )
    question_prefix: str = _key("Q", "Question marker in markdown (Q1:).", "str")
    answer_prefix: str = _key("A", "Answer marker in markdown (A1:).", "str")
    separator: str = _key(":", "Marker separator; a full-width colon is always accepted too.", "str")
    question_pattern: str | None = _key(None, "Regex that starts a question line; overrides prefix/separator.", "str?")
    answer_pattern: str | None = _key(None, "Regex that starts an answer line; overrides prefix/separator.", "str?")
    eval_ratio: float = _key(0.1, "Share of pairs held out for evaluation and the inference test.", "ratio")
    system_prompt: str | None = _key(None, "Optional system message in every sample.", "str?")
    overflow: str = _key(
        "truncate",
        "A sample longer than max_sequence_length: `truncate` its answer (end-of-turn kept) or `drop` it.",
        _choice(OVERFLOW_POLICIES),
    )
    data_cache_dir: str = _key("data/processed", "Where the tokenized dataset is cached.", "str")
    # --- logging and checkpoints ---
    log_dir: str = _key("./logs", "Run logs.", "str")
    enable_tensorboard: bool = _key(True, "Write TensorBoard event files.", "bool")
    tensorboard_log_dir: str | None = _key(
        None,
        "TensorBoard folder (each run writes into a subfolder named by its run_id); null: <log_dir>/tensorboard.",
        "str?",
    )
    report_to: list[str] = _key(
        ["tensorboard"],
        "Trackers the HF Trainer reports to (its report_to): tensorboard (into tensorboard_log_dir; "
        "enable_tensorboard: false leaves it out), wandb, mlflow or any other integration transformers has, when "
        'its package is installed; ["none"] for none. The JSONL log is written either way.',
        "list[str]",
    )
    log_every_n_steps: int = _key(10, "Optimizer steps between metric records.", "int>=1")
    save_every_n_steps: int = _key(100, "Optimizer steps between checkpoints.", "int>=1")
    save_total_limit: int = _key(3, "Checkpoints kept (oldest deleted).", "int>=1")
    structured_logging: StructuredLogging = field(
        default_factory=StructuredLogging, metadata={"doc": "JSONL log settings (nested object).", "kind": "nested"}
    )
    # --- after training ---
    enable_inference_test: bool = _key(
        True, "Answer trained-on and held-out questions with base and tuned model; write a report.", "bool"
    )
    inference_samples: int = _key(5, "Questions of each kind in the inference test (trained-on, held-out).", "int>=1")
    inference_max_new_tokens: int = _key(128, "Generation length in the inference test.", "int>=1")
    # --- environment ---
    verify_environment: bool = _key(
        True, "Run the hardware validation before training; stop on a hard problem.", "bool"
    )
    auto_install_deps: bool = _key(
        False,
        "Offer to install missing packages: prints the command and asks on a TTY; never installs silently.",
        "bool",
    )
    # --- precision, memory, optimizer ---
    gradient_checkpointing: bool = _key(True, "Recompute activations in backward to save memory.", "bool")
    gradient_checkpointing_kwargs: dict = _key({"use_reentrant": False}, "Passed to gradient checkpointing.", "dict")
    fp16: bool = _key(False, "fp16 mixed precision (GPUs without bf16).", "bool")
    bf16: bool = _key(True, "bf16 mixed precision (Ampere and newer).", "bool")
    tf32: bool = _key(True, "TF32 matmuls on Ampere and newer.", "bool")
    optimizer: str = _key(
        "paged_adamw_8bit", "Any HF Trainer optimizer name (adamw_torch, paged_adamw_8bit, ...).", "str"
    )
    optimizer_kwargs: dict = _key({}, "Extra optimizer arguments (betas, eps, ...).", "dict")
    lr_scheduler_type: str = _key("cosine", "HF scheduler name.", "str")
    lr_scheduler_kwargs: dict = _key({}, "Extra scheduler arguments.", "dict")
    max_oom_retries: int = _key(
        4,
        "Times a training OOM may halve the micro-batch (accumulation doubles) before giving up. Under torchrun an "
        "OOM on one rank restarts every rank with the smaller micro-batch; `train --nproc` gives torchrun this many "
        "restarts.",
        "int>=0",
    )
    distributed_strategy: str = _key(
        "auto",
        "Under torchrun (or `autotune train --nproc N`): `ddp` (each rank holds the whole model and trains on its "
        "shard of the data), `fsdp` (weights, gradients and optimizer state sharded across the ranks; GPUs only), or "
        "`auto` (the solved profile's strategy, else ddp). One process ignores it.",
        _choice(STRATEGIES),
    )
    eval_batch_size: int | None = _key(
        None,
        "Per-device evaluation batch; null: batch_size. An evaluation OOM halves it and never the training micro-batch.",
        "int>=1?",
    )
    # --- the memory techniques of the step: one key per row of autotune/techniques (with_technique_switches) ---

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def effective_batch(self) -> int:
        return self.effective_batch_size or self.batch_size * self.gradient_accumulation_steps


KEY_DOCS = {f.name: (f.metadata["doc"], f.metadata["kind"]) for f in fields(Config)}
NESTED = {"structured_logging": StructuredLogging}
INHERITANCE_KEYS = ("base_config", "overrides")
# Config files with these suffixes are YAML (same schema, inheritance and messages); any other is JSON.
YAML_SUFFIXES = (".yaml", ".yml")


# ----------------------------------------------------------------------------------- loading


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise UserError(f"{path}: config file not found") from None
    except (OSError, ValueError) as exc:  # ValueError: undecodable bytes, a NUL byte in the name
        raise UserError(f"{path}: cannot read it ({exc})") from None


def _duplicate_key(path: Path, text: str, key: str, lines: tuple[int, ...] = ()) -> UserError:
    """A key given twice in one mapping: both places named (JSON and YAML would silently keep the last)."""
    if not lines:  # JSON's parser does not say where: the lines that spell the key
        spelled = re.compile(r'"' + re.escape(key) + r'"\s*:')
        lines = tuple(n for n, line in enumerate(text.splitlines(), 1) if spelled.search(line))[:2]
    where = " and ".join(f"line {n}" for n in lines) if lines else "twice"
    shown = key if len(key) <= 80 else key[:77] + "..."
    return UserError(f"{path}: key {shown!r} is given twice ({where}); keep one")


def read_json(path: Path) -> Any:
    """Parse a JSON file; malformed JSON is reported with file, line and column, a key given twice with both lines."""
    text = _read_text(path)

    def pairs(items: list[tuple[str, Any]]) -> dict:
        seen: dict[str, Any] = {}
        for key, value in items:
            if key in seen:
                raise _duplicate_key(path, text, key)
            seen[key] = value
        return seen

    try:
        return json.loads(text, object_pairs_hook=pairs)
    except json.JSONDecodeError as exc:
        raise UserError(
            f"{path}:{exc.lineno}:{exc.colno}: malformed JSON: {exc.msg}. "
            "Only JSON is accepted in a .json file (no comments or trailing commas; a .yaml config may have them)."
        ) from None
    except (ValueError, RecursionError) as exc:  # an integer too long to convert, nesting too deep
        raise UserError(f"{path}: unreadable JSON: {exc}") from None


def read_yaml(path: Path) -> Any:
    """Parse a YAML file (safe loading: plain data only); a syntax error is reported with file, line and column."""
    import yaml  # only YAML configs pay for it

    text = _read_text(path)

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen: dict = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if isinstance(key, str) and key in seen:
                    raise _duplicate_key(path, text, key, (seen[key], key_node.start_mark.line + 1))
                seen[key] = key_node.start_mark.line + 1
            return super().construct_mapping(node, deep=deep)

    # PyYAML follows YAML 1.1, where 5e-5 (no dot) is a string and on/off/yes/no are booleans; JSON and YAML 1.2
    # read 5e-5 as a number and on/off as words, so that a YAML config means what its JSON twin means (the
    # technique switches are "on"/"off": `fused_loss: on` is that word, not true).
    bool_tag = "tag:yaml.org,2002:bool"
    Loader.yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag != bool_tag]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    Loader.add_implicit_resolver(bool_tag, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
        list("-+0123456789"),
    )
    try:
        return yaml.load(text, Loader=Loader)  # a SafeLoader: plain data, never Python objects
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = " ".join(str(part) for part in (exc.context, exc.problem) if part)
        raise UserError(f"{where}: malformed YAML: {problem}.") from None
    except (yaml.YAMLError, ValueError, RecursionError) as exc:
        raise UserError(f"{path}: unreadable YAML: {exc}") from None


def read_config_file(path: Path) -> Any:
    """A config file's document: YAML for *.yaml / *.yml, JSON otherwise."""
    return read_yaml(path) if path.suffix.lower() in YAML_SUFFIXES else read_json(path)


def preset_path(name: str) -> Path | None:
    """A preset by name: `kind/name` (hardware/16gb) or a bare name when unique."""
    candidates = []
    if "/" in name:
        candidates.append(PROFILES_DIR / f"{name}.json")
    else:
        candidates += [PROFILES_DIR / kind / f"{name}.json" for kind in PRESET_KINDS]
    found = [p for p in candidates if _is_file(p)]
    return found[0] if found else None


def _is_file(path: Path) -> bool:
    """Path.is_file that says False for names the OS rejects (too long, NUL byte) instead of raising."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def list_presets() -> list[dict]:
    out = []
    for kind in PRESET_KINDS:
        for p in sorted((PROFILES_DIR / kind).glob("*.json")):
            doc = read_json(p)
            out.append(
                {
                    "name": f"{kind}/{p.stem}",
                    "kind": kind,
                    "path": str(p),
                    "description": doc.get("description", "") if isinstance(doc, dict) else "",
                }
            )
    return out


def _resolve_base(ref: str, referrer: Path) -> Path:
    as_path = referrer.parent / ref
    if _is_file(as_path):
        return as_path.resolve()
    preset = preset_path(ref.removesuffix(".json"))
    if preset is not None:
        return preset.resolve()
    raise UserError(
        f"{referrer}: base_config {ref!r} is neither a file (looked at {as_path}) nor a preset name. "
        "Run `autotune profiles list` for presets."
    )


def _layers(path: Path, chain: tuple[Path, ...] = ()) -> list[tuple[Path, dict]]:
    """The file and its base chain, base first. Each layer is (file, flat values); a file gives two
    layers, its top-level keys then its `overrides`, so each is checked and nested objects merge."""
    try:
        path = path.resolve()
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: not a usable file name ({exc})") from None
    if path in chain:
        cycle = " -> ".join(str(p) for p in (*chain, path))
        raise UserError(f"base_config cycle: {cycle}. Remove one base_config link.")
    doc = read_config_file(path)
    if not isinstance(doc, dict):
        shape = "YAML mapping" if path.suffix.lower() in YAML_SUFFIXES else "JSON object"
        raise UserError(f"{path}: a config must be a {shape}, got {type(doc).__name__}")
    values = {k: v for k, v in doc.items() if k not in INHERITANCE_KEYS and k != "description"}
    overrides = doc.get("overrides", {})
    if not isinstance(overrides, dict):
        raise UserError(f"{path}: key 'overrides' must be an object of config keys, got {brief(overrides)}")
    layers: list[tuple[Path, dict]] = []
    base = doc.get("base_config")
    if base is not None:
        if not isinstance(base, str):
            raise UserError(f"{path}: key 'base_config' must be a path or preset name (a string), got {brief(base)}")
        layers = _layers(_resolve_base(base, path), (*chain, path))
    return layers + [(path, values), (path, overrides)]


# ----------------------------------------------------------------------------------- checking


def _describe(kind: str) -> str:
    if kind.startswith("choice:"):
        return "one of " + ", ".join(repr(c) for c in kind[7:].split("|"))
    opt = kind.endswith("?")
    base = kind.rstrip("?")
    text = {
        "int>=1": "an integer >= 1",
        "int>=0": "an integer >= 0",
        "int>=8": "an integer >= 8",
        "float>0": "a number > 0",
        "float>=0": "a number >= 0",
        "ratio": "a number from 0 to 1",
        "bool": "true or false",
        "str": "a string",
        "list[str]": "a list of strings",
        "dict": "a JSON object",
    }[base]
    return text + (" or null" if opt else "")


def value_is(kind: str, value: Any) -> bool:
    """Whether `value` is of the config's value kind `kind` ("int>=1", "float>0", "ratio", "bool", ... ; a
    trailing "?" admits null): the one check of a config's values, which the profile's fields are held to too."""
    if kind.endswith("?"):
        if value is None:
            return True
        kind = kind[:-1]
    if kind.startswith("choice:"):
        return value in kind[7:].split("|")
    if kind == "bool":
        return isinstance(value, bool)
    if kind.startswith("int"):
        return isinstance(value, int) and not isinstance(value, bool) and value >= int(kind[5:])
    if kind in ("float>0", "float>=0", "ratio"):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value != value:
            return False
        return {"float>0": value > 0, "float>=0": value >= 0, "ratio": 0 <= value <= 1}[kind] and value != float("inf")
    if kind == "str":
        return isinstance(value, str)
    if kind == "list[str]":
        return isinstance(value, list) and bool(value) and all(isinstance(v, str) and v for v in value)
    if kind == "dict":
        return isinstance(value, dict)
    raise AssertionError(kind)


def _closest(key, known) -> str:
    """The did-you-mean of an unknown key: the peers' table's (peers.py: `lora_target` is target_modules, not the
    lora_r its spelling is nearest), else the known key spelled most alike."""
    if not isinstance(key, str) or len(key) > 100:  # no config key is that long; difflib would take its time
        return ""
    if known is KEY_DOCS and (hint := peers.hint(key)):
        return hint
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def normalize_values(values: dict) -> dict:
    """Values in the one form the checks and the run take, where a config may write them otherwise: `report_to` as
    one name (`report_to: none`), `target_modules` as "all-linear" (every projection, catalog.resolve_targets: the
    resolved config lists them), a true/false key as on/off (YAML 1.1's words for them, which autotune's YAML reads as
    words) and an auto/on/off switch as true/false."""
    out = dict(values)
    if isinstance(out.get("report_to"), str):
        out["report_to"] = [out["report_to"]]
    if out.get("target_modules") == ALL_LINEAR:
        out["target_modules"] = [ALL_LINEAR]  # spelled out for the model once the layers are merged (_finish)
    for key, value in out.items():
        kind = KEY_DOCS.get(key, ("", ""))[1] if isinstance(key, str) else ""
        if kind == "bool" and value in ("on", "off"):
            out[key] = value == "on"
        elif kind == _choice(SWITCHES) and isinstance(value, bool):
            out[key] = "on" if value else "off"
    return out


def from_peers(values: dict, where: str, notes: list[str], errors: list[str]) -> dict:
    """One layer of a config file with the peers' keys (TRL's, LLaMA-Factory's, axolotl's: peers.py) in autotune's
    terms: each one read said in `notes`, each one autotune cannot honour (and two keys that disagree) in `errors`."""
    found = peers.translate(values, KEY_DOCS)
    notes += [f"{where}: {note}" for note in found.notes]
    errors += [f"{where}: {item}; `autotune convert` leaves it out" for item in found.left_out]
    errors += [f"{where}: {conflict}" for conflict in found.conflicts]
    return found.values


def trainer_name_problems(cfg: Config) -> list[str]:
    """The config's HF Trainer names that transformers does not have (optimizer, lr_scheduler_type, report_to), each
    with the nearest name: what `autotune train` would refuse, said by `autotune validate` without loading torch."""
    problems = []
    for key, name, known in (
        ("optimizer", cfg.optimizer, OPTIMIZERS),
        ("lr_scheduler_type", cfg.lr_scheduler_type, SCHEDULERS),
    ):
        if name not in known:
            problems.append(
                f"key {key!r}: {name!r} is not an HF Trainer name{_closest(name, known)}; use one of {', '.join(known)}"
            )
    trackers = (*TRACKERS, NO_TRACKER)
    for name in dict.fromkeys(cfg.report_to):
        if name not in trackers:
            problems.append(
                f"key 'report_to': {name!r} is not a tracker the HF Trainer knows{_closest(name, trackers)}; use any of "
                f'{", ".join(TRACKERS)}, or "none"'
            )
    if NO_TRACKER in cfg.report_to and len(set(cfg.report_to)) > 1:
        problems.append(
            f'key \'report_to\': {cfg.report_to!r}: "none" cannot go with trackers; give "none" or trackers'
        )
    return problems


def check_values(values: dict, where: str, errors: list[str]) -> None:
    """Append one message per unknown key or bad value; never raises."""
    for key, value in values.items():
        if key in NESTED:
            if not isinstance(value, dict):
                errors.append(f"{where}: key {key!r}: value {brief(value)} is not allowed: must be a JSON object")
                continue
            sub = {f.name: f.metadata["kind"] for f in fields(NESTED[key])}
            for k, v in value.items():
                if k not in sub:
                    errors.append(f"{where}: unknown key {brief(f'{key}.{k}')}{_closest(k, sub)}")
                elif not value_is(sub[k], v):
                    errors.append(
                        f"{where}: key '{key}.{k}': value {brief(v)} is not allowed: must be {_describe(sub[k])}"
                    )
            continue
        if key not in KEY_DOCS:
            errors.append(f"{where}: unknown key {brief(key)}{_closest(key, KEY_DOCS)}")
            continue
        kind = KEY_DOCS[key][1]
        if not value_is(kind, value):
            errors.append(f"{where}: key {key!r}: value {brief(value)} is not allowed: must be {_describe(kind)}")


# The most tokens one micro-batch may hold (batch_size x max_sequence_length): PyTorch indexes many kernels'
# elements with 32-bit integers, and no GPU holds the activations of more.
MAX_MICRO_BATCH_TOKENS = 2**31 - 1


def _int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def lora_rank_problem(r: int, spec: ModelSpec) -> str | None:
    """Why LoRA rank `r` makes no sense for this model (None when it does): the config's `lora_r` and
    `solve --ranks` are held to the same bound."""
    hidden = spec.architecture.hidden_size
    if r <= hidden:
        return None
    return (
        f"{r} is more than {spec.name}'s hidden size {hidden}: a LoRA update of a layer that wide has rank at most "
        f"{hidden}, so a larger rank only costs memory; use at most {hidden} (8 to 64 is usual)"
    )


def _check_sizes(values: dict, spec: ModelSpec, errors: list[str]) -> None:
    """Sizes the model bounds, checked before anything tries to allocate them."""
    arch, name = spec.architecture, spec.name
    r = values.get("lora_r")
    if _int(r) and (problem := lora_rank_problem(r, spec)):
        errors.append(f"key 'lora_r': {problem}")
    for key in ("max_sequence_length", "inference_max_new_tokens"):
        n = values.get(key)
        if _int(n) and n > arch.max_position_embeddings:
            errors.append(
                f"key {key!r}: {n} is more than the {arch.max_position_embeddings} positions {name} supports; "
                f"use at most {arch.max_position_embeddings}"
            )
    _check_expert_lora(values, spec, errors)
    batch, seq = values.get("batch_size"), values.get("max_sequence_length")
    if _int(batch) and _int(seq) and batch * seq > MAX_MICRO_BATCH_TOKENS:
        errors.append(
            f"key 'batch_size': {batch} rows of {seq} tokens is more than one micro-batch can hold "
            f"({MAX_MICRO_BATCH_TOKENS:,} tokens); use a smaller batch_size and raise gradient_accumulation_steps"
        )


def _check_expert_lora(values: dict, spec: ModelSpec, errors: list[str]) -> None:
    """LoRA on an MoE model: its targets attention projections (its MLPs are experts), and adapters on the experts
    need a model that has them and no dropout (PEFT's adapters on parameters, which the fused expert tensors are,
    refuse it)."""
    targets = values.get("target_modules")
    # (A hybrid MoE's gate/up/down are its shared expert's Linears, which LoRA targets as a dense MLP's.)
    if spec.architecture.is_moe and not spec.architecture.is_hybrid and isinstance(targets, list):
        mlp = [t for t in targets if isinstance(t, str) and t in PROJECTIONS and t not in ATTENTION_PROJECTIONS]
        if mlp:
            errors.append(
                f"key 'target_modules': {mlp} are not Linear layers of {spec.name}, whose MLPs are experts (fused "
                f"tensors, which get adapters through lora_experts); target attention: {', '.join(ATTENTION_PROJECTIONS)}"
            )
    switch = values.get("lora_experts")
    if switch not in SWITCHES:
        return
    try:
        experts = lora_on_experts(switch, spec.architecture, spec.name)
    except UserError as exc:
        errors.append(f"key 'lora_experts': {exc}")
        return
    dropout = values.get("lora_dropout")
    if experts and isinstance(dropout, (int, float)) and dropout > 0:
        why = "auto: on for mixture-of-experts models" if switch == "auto" else "on"
        errors.append(
            f"key 'lora_dropout': {dropout} with adapters on {spec.name}'s experts (lora_experts {why}): PEFT's "
            'adapters on the fused expert tensors take no dropout. Set lora_dropout 0, or lora_experts "off" '
            "(adapters on attention only)"
        )


def _check_consistency(values: dict, errors: list[str]) -> None:
    """Checks across keys, on the merged values (run even when some values are bad, so that every
    error of a file is reported at once)."""
    spec = None
    if isinstance(values.get("model_name"), str):
        try:
            spec = resolve_model(values["model_name"])
            _check_sizes(values, spec, errors)
        except UserError as exc:
            errors.append(f"key 'model_name': {exc}")
    targets = values.get("target_modules")
    if isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets):
        try:
            check_target_modules(targets, spec.architecture if spec else None)
        except UserError as exc:
            errors.append(f"key 'target_modules': {exc}")
    if values.get("fp16") is True and values.get("bf16") is True:
        errors.append("keys 'fp16' and 'bf16' are both true: choose one mixed precision (bf16 on Ampere and newer)")
    if (
        isinstance(values.get("eval_ratio"), (int, float))
        and not isinstance(values["eval_ratio"], bool)
        and values["eval_ratio"] >= 1
    ):
        errors.append(f"key 'eval_ratio': {values['eval_ratio']!r} would leave nothing to train on: must be below 1")
    eff, batch = values.get("effective_batch_size"), values.get("batch_size")
    if isinstance(eff, int) and isinstance(batch, int) and batch > 0 and eff % batch:
        errors.append(
            f"key 'effective_batch_size': {eff} is not a multiple of batch_size {batch}: "
            "the effective batch would silently change"
        )


def merge_values(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        if k in NESTED and isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = {**out[k], **v}
        else:
            out[k] = v
    return out


def build_config(values: dict, where: str = "config") -> Config:
    """A Config from flat values over the defaults; every problem reported in one UserError."""
    errors: list[str] = []
    values = normalize_values(values)
    check_values(values, where, errors)
    return _finish(values, where, errors)


def _finish(values: dict, where: str, errors: list[str]) -> Config:
    full = merge_values(Config().to_dict(), values)
    _spell_out_targets(full)
    _expert_dropout_default(values, full)
    consistency: list[str] = []
    _check_consistency(full, consistency)
    errors = errors + [f"{where}: {e}" for e in consistency]
    if errors:
        raise UserError("\n".join(dict.fromkeys(errors)))
    if full["effective_batch_size"] is not None:
        # The effective batch, when given, is the contract: accumulation follows from it (checked above to divide).
        full["gradient_accumulation_steps"] = BatchPlan.largest(
            full["effective_batch_size"], 1, full["batch_size"]
        ).accumulation
    full["structured_logging"] = StructuredLogging(**full["structured_logging"])
    return Config(**full)


def _expert_dropout_default(given: dict, full: dict) -> None:
    """lora_dropout's default is 0 where the adapters sit on an MoE model's experts, which take no dropout (PEFT's
    adapters on parameters): a user who never set it gets a run, not a refusal of a value they did not write. A
    value they wrote stays theirs (_check_expert_lora refuses one above 0)."""
    if (
        "lora_dropout" in given
        or not isinstance(full.get("model_name"), str)
        or full.get("lora_experts") not in SWITCHES
    ):
        return
    try:
        spec = resolve_model(full["model_name"])
        experts = lora_on_experts(full["lora_experts"], spec.architecture, spec.name)
    except UserError:
        return  # the consistency checks say what is wrong
    if experts:
        full["lora_dropout"] = 0.0


def _spell_out_targets(full: dict) -> None:
    """ "all-linear" as the model's own projections (catalog.resolve_targets; a model that does not resolve, which
    the consistency checks report, as a Qwen3 model's)."""
    targets = full.get("target_modules")
    if not isinstance(targets, list) or ALL_LINEAR not in targets:
        return
    try:
        arch = resolve_model(full["model_name"]).architecture if isinstance(full.get("model_name"), str) else None
    except UserError:
        arch = None
    full["target_modules"] = resolve_targets(targets, arch)


def parse_set(assignments: list[str] | tuple[str, ...]) -> dict:
    """`--set key=value` pairs, typed by the schema: JSON where it parses, else a plain string."""
    values: dict = {}
    for item in assignments:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"--set {item!r}: expected key=value, e.g. --set batch_size=2")
        try:
            value = json.loads(raw)
        except (ValueError, RecursionError):  # not JSON (or an integer too long, nesting too deep)
            value = raw
        outer, _, inner = key.partition(".")
        nested = bool(inner) and outer in NESTED
        if nested:
            kind = next((f.metadata["kind"] for f in fields(NESTED[outer]) if f.name == inner), "")
        else:
            kind = KEY_DOCS.get(key, ("", ""))[1]
        textual = kind.rstrip("?") == "str" or kind.startswith("choice:")
        if textual and not isinstance(value, str) and not (value is None and kind.endswith("?")):
            value = raw  # `--set model_name=123` means the string "123"
        if nested:
            target = values.setdefault(outer, {})
            if not isinstance(target, dict):
                raise UserError(f"--set {item!r}: {outer} was set to {target!r} before, which is not an object")
            target[inner] = value
        elif key in NESTED and isinstance(value, dict) and isinstance(values.get(key), dict):
            values[key] = {**values[key], **value}  # like a config layer: nested keys merge
        else:
            values[key] = value
    return values


def load_config(
    path: str | os.PathLike | None = None,
    overrides: dict | None = None,
    *,
    notes: list[str] | None = None,
    overrides_from: str = "--set",
) -> Config:
    """Defaults < base chain < the file < CLI overrides. All errors of all layers reported together. A file may use
    the peers' keys (from_peers): each one read is appended to `notes`. Overrides take autotune's names
    (`overrides_from` names them in messages)."""
    errors: list[str] = []
    merged: dict = {}
    if path is not None:
        for layer_path, values in _layers(Path(path)):
            values = normalize_values(from_peers(values, str(layer_path), notes if notes is not None else [], errors))
            check_values(values, str(layer_path), errors)
            merged = merge_values(merged, values)
    if overrides:
        overrides = normalize_values(overrides)
        check_values(overrides, overrides_from, errors)
        merged = merge_values(merged, overrides)
    # Values were checked per layer, so each message names the file that holds the bad value.
    return _finish(merged, str(path) if path else "config", errors)


def explicit_keys(path: str | os.PathLike | None, sets=()) -> set[str]:
    """Keys a user actually wrote (in the file, its base chain, or --set), as opposed to defaults."""
    keys: set[str] = set(parse_set(sets)) if sets else set()
    if path is not None:
        for layer_path, values in _layers(Path(path)):
            keys.update(from_peers(values, str(layer_path), [], []))
    return keys


def config_reference_markdown() -> str:
    """The config-key table for the README, generated from the schema so it cannot drift."""
    rows = ["| key | default | allowed | meaning |", "|---|---|---|---|"]
    defaults = Config().to_dict()
    for f in fields(Config):
        if f.name in NESTED:
            for sf in fields(NESTED[f.name]):
                rows.append(
                    f"| `{f.name}.{sf.name}` | `{json.dumps(defaults[f.name][sf.name])}` | "
                    f"{_describe(sf.metadata['kind'])} | {sf.metadata['doc']} |"
                )
            continue
        rows.append(
            f"| `{f.name}` | `{json.dumps(defaults[f.name])}` | {_describe(f.metadata['kind'])} | {f.metadata['doc']} |"
        )
    return "\n".join(rows)


# ----------------------------------------------------------------------------------- the peers' files


def convert_peer_file(path: str | os.PathLike, tool: str | None = None) -> peers.Conversion:
    """`autotune convert`: a TRL, LLaMA-Factory or axolotl config file as autotune's values (peers.convert), checked
    as a config is; `tool` (peers.TOOLS) when its keys do not tell."""
    path = Path(path)
    doc = read_config_file(path)
    if not isinstance(doc, dict):
        raise UserError(f"{path}: a config must be a mapping of keys, got {type(doc).__name__}")
    if tool is None:
        tool = peers.detect(doc)
    if tool is None:
        if all(key in KEY_DOCS or key in (*INHERITANCE_KEYS, "description") for key in doc):
            raise UserError(f"{path}: already an autotune config (every key is autotune's): `autotune validate` it")
        raise UserError(
            f"{path}: cannot tell which tool wrote it from its keys; say it with --from ({', '.join(peers.TOOL_NAMES)})"
        )
    conversion = peers.convert(doc, tool, KEY_DOCS)
    conversion.values = normalize_values(conversion.values)  # as the run reads them: report_to a list, packing on/off
    _spell_out_targets(conversion.values)  # the file lists the layers of the model it names
    build_config(conversion.values, f"{path} as converted from {tool}'s keys")
    return conversion


def config_text(values: dict, path: str | os.PathLike | None = None) -> str:
    """A config document as a file holds it: YAML for a *.yaml / *.yml path, JSON otherwise."""
    if path is not None and Path(path).suffix.lower() in YAML_SUFFIXES:
        import yaml

        return yaml.safe_dump(values, sort_keys=False, allow_unicode=True, width=120)
    return json.dumps(values, indent=2, ensure_ascii=False) + "\n"
