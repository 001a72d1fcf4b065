"""`autotune export`: a finished run as a folder the ecosystem loads.

* Adapter (default): the LoRA adapter alone (adapter_config.json + adapter_model.safetensors) with the tokenizer
  and its chat template, pointed at its base model, so `PeftModel.from_pretrained` and vLLM's LoRA serving load it.
  Nothing else of the run dir (checkpoints, logs, reports) comes along.
* Merged (`merge=True`): base weights + LoRA deltas as one model: sharded safetensors (with an index past one
  shard), config.json, generation_config.json, tokenizer and chat template. `AutoModelForCausalLM` loads it and
  vLLM serves it.

The merge runs on the CPU one group of tensors (one decoder layer) at a time: base shards are read lazily
(`safetensors.safe_open` maps them), each LoRA delta `scale * B @ A` is added in fp32, and an output shard is
written as soon as its tensors are done, so memory stays near one layer plus one output shard and the GPU is
never touched. peft's merge_and_unload would hold the whole model in memory instead.

A QLoRA adapter is merged into the base's original (unquantized) weights, the usual practice: the merged model
differs from the 4-bit model it trained with by the quantization error of the base, not by the adapter.

Everything is written into a temporary folder beside the destination and renamed into place at the end: an
interrupted export leaves no half-written folder.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from autotune.catalog import ModelSpec, resolve_model
from autotune.checkpoint import read_summary, require_finished
from autotune.config import EXPORT_DTYPES, Config, load_config
from autotune.errors import UserError
from autotune.fsutil import apply_umask, atomic_write_json, fsync_dir
from autotune.run_files import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    CONFIG_FILE,
    EXPORT_MANIFEST,
    check_export_destination,
    default_export_dir,
    require_run_files,
)

# An output shard is held in memory until it is written: this bounds the merge's memory (plus one layer).
MAX_SHARD_BYTES = 2 * 1024**3

TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# What llama.cpp's converters call each dtype (--outtype).
GGUF_OUTTYPES = {"bf16": "bf16", "fp16": "f16", "fp32": "f32"}

# peft saves `base_model.model.<module>.lora_A.weight`; the base weight is `<module>.weight`.
_LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")
_LAYER = re.compile(r"\.layers\.(\d+)\.")


class Progress(Protocol):
    def update(self, n_steps: int) -> None: ...


ProgressFactory = Callable[[int, str], AbstractContextManager[Progress]]


class _NoProgress:
    def update(self, n_steps: int) -> None:
        pass


def no_progress(length: int, label: str) -> AbstractContextManager[Progress]:
    return nullcontext(_NoProgress())


@dataclass
class ExportResult:
    out: Path
    merged: bool
    dtype: str
    files: list[str]
    base: str  # what the adapter applies to: hub id, local folder, or a description of a random-init base
    gguf_command: str | None  # llama.cpp's converter, when the export can be converted
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------
# The run


@dataclass
class FinishedRun:
    path: Path
    cfg: Config
    spec: ModelSpec
    train_dtype: str  # "bf16" | "fp16" | "fp32": what the base weights were in during training
    adapter_config: dict


def read_run(run_dir: str | os.PathLike) -> FinishedRun:
    """A finished `autotune train` output_dir; a UserError saying what is missing otherwise."""
    path = require_run_files(run_dir)
    require_finished(path)
    cfg = load_config(path / CONFIG_FILE)
    adapter_config = _read_json(path / ADAPTER_CONFIG)
    _check_adapter_config(adapter_config, path / ADAPTER_CONFIG)
    return FinishedRun(path, cfg, resolve_model(cfg.model_name), _train_dtype(path, cfg), adapter_config)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot read it as JSON ({exc}). Fix: re-run `autotune train`.") from None


def _check_adapter_config(doc: Any, where: Path) -> None:
    """What the merge below implements: plain LoRA on linear layers (no DoRA, no extra trained modules)."""
    if not isinstance(doc, dict) or doc.get("peft_type") != "LORA":
        raise UserError(
            f"{where}: not a LoRA adapter config (peft_type {doc.get('peft_type') if isinstance(doc, dict) else doc!r})"
        )
    unsupported = {
        "use_dora": bool(doc.get("use_dora")),
        "modules_to_save": bool(doc.get("modules_to_save")),
        "bias": doc.get("bias", "none") != "none",
        "fan_in_fan_out": bool(doc.get("fan_in_fan_out")),
    }
    found = [k for k, v in unsupported.items() if v]
    if found:
        raise UserError(
            f"{where}: the adapter uses {', '.join(found)}, which `autotune export --merge` does not merge. "
            "Fix: export without --merge and let peft apply it."
        )


def _train_dtype(path: Path, cfg: Config) -> str:
    """The dtype training held the base weights in: the run summary says; else what the config asked for."""
    recorded = _recorded_model(path).get("dtype")
    if recorded is not None:
        by_name = {str(v): k for k, v in TORCH_DTYPES.items()}
        if recorded in by_name:
            return by_name[recorded]
    return "bf16" if cfg.bf16 else "fp16" if cfg.fp16 else "fp32"


def base_description(run: FinishedRun) -> str:
    if run.cfg.init == "random":
        return f"{run.spec.name} with random weights (seed {run.cfg.seed})"
    return run.spec.source


# --------------------------------------------------------------------------------------------------
# Base weights, read lazily


class _BaseWeights(Protocol):
    def names(self) -> list[str]: ...
    def numel(self, name: str) -> int: ...
    def get(self, name: str) -> torch.Tensor: ...


class _SafetensorsWeights:
    """A model folder's safetensors shards, opened lazily (memory-mapped); a tensor is read when asked for."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = _read_json(index).get("weight_map", {})
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in folder.glob("*.safetensors"))
        if not files:
            raise UserError(
                f"{folder}: no *.safetensors weights. Fix: point model_name at a folder with safetensors weights "
                "(autotune never loads pickled .bin files)."
            )
        self._where: dict[str, Any] = {}
        for name in files:
            handle = safe_open(str(folder / name), framework="pt", device="cpu")
            for key in handle.keys():  # noqa: SIM118 - safe_open has keys(), not iteration
                self._where[key] = handle

    def names(self) -> list[str]:
        return list(self._where)

    def numel(self, name: str) -> int:
        return _prod(self._where[name].get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        return self._where[name].get_tensor(name)


class _StateDictWeights:
    def __init__(self, state: dict[str, torch.Tensor]):
        self.state = state

    def names(self) -> list[str]:
        return list(self.state)

    def numel(self, name: str) -> int:
        return self.state[name].numel()

    def get(self, name: str) -> torch.Tensor:
        return self.state[name]


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _base_folder(spec: ModelSpec) -> Path:
    """The base model's files on disk: its local folder, or its hub snapshot (the HF cache first; the hub only
    when it can be reached, as training itself fetched it)."""
    if spec.local_path:
        return Path(spec.local_path)
    from huggingface_hub import snapshot_download

    from autotune import hub

    local, why = hub.local_only()
    try:
        return Path(
            snapshot_download(
                spec.source,
                allow_patterns=["*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json"],
                local_files_only=local,
            )
        )
    except Exception as exc:  # noqa: BLE001 - huggingface_hub raises many types (offline, not found, HTTP)
        if local:
            raise hub.not_cached_error("base model", spec.source, why or "the hub is not used") from None
        raise UserError(
            f"cannot get the base weights of {spec.source!r} ({type(exc).__name__}: {exc}). Fix: check the hub id "
            "and your access to it, or set model_name to a local folder holding the base model."
        ) from None


def _base_weights(run: FinishedRun):
    """(weights, hf_config, generation config or None) of the run's base model."""
    from transformers import AutoConfig, GenerationConfig

    if run.cfg.init == "random":
        from autotune.modeling import _random_state_dict

        hf_config = run.spec.architecture.to_hf_config()
        # The same values training built (same architecture, seed and dtype): views into one random pool.
        state = _random_state_dict(hf_config, TORCH_DTYPES[run.train_dtype], run.cfg.seed)
        return _StateDictWeights(state), hf_config, None
    folder = _base_folder(run.spec)
    hf_config = AutoConfig.from_pretrained(str(folder), trust_remote_code=False, local_files_only=True)
    generation = None
    if (folder / "generation_config.json").is_file():
        generation = GenerationConfig.from_pretrained(str(folder), local_files_only=True)
    weights: _BaseWeights = _SafetensorsWeights(folder)
    if run.spec.architecture.is_hybrid and getattr(hf_config, "text_config", None) is not None:
        # A Qwen3.5/3.6 release is a vision-language checkpoint; the run trained its language model, which is what
        # the merged model is (catalog.TEXT_ONLY_NOTE).
        hf_config, weights = hf_config.text_config, _LanguageModelWeights(weights)
    return weights, hf_config, generation


class _LanguageModelWeights:
    """A unified vision-language checkpoint's language model under the names its causal LM has (transformers'
    Qwen3_5ForCausalLM: `model.language_model.X` is `model.X`; lm_head as it is); the vision tower and the
    multi-token-prediction layer are left out."""

    PREFIX, TEXT = "model.language_model.", "model."

    def __init__(self, inner: _BaseWeights):
        self.inner = inner
        self._source = {
            (self.TEXT + n.removeprefix(self.PREFIX) if n.startswith(self.PREFIX) else n): n
            for n in inner.names()
            if n.startswith(self.PREFIX) or n == "lm_head.weight"
        }

    def names(self) -> list[str]:
        return list(self._source)

    def numel(self, name: str) -> int:
        return self.inner.numel(self._source[name])

    def get(self, name: str) -> torch.Tensor:
        return self.inner.get(self._source[name])


# --------------------------------------------------------------------------------------------------
# LoRA deltas


@dataclass
class _Lora:
    A: torch.Tensor  # (r, in); an expert stack's: (r x experts, in)
    B: torch.Tensor  # (out, r); an expert stack's: (out, r x experts)
    scale: float
    experts: int = 0  # an MoE layer's fused expert tensor (experts, out, in): PEFT's ParamWrapper factors

    def delta(self) -> torch.Tensor:
        if not self.experts:
            return (self.B.float() @ self.A.float()) * self.scale
        # PEFT's ParamWrapper.get_delta_weight for an (experts, out, in) parameter: expert e's update is
        # B[:, :, e] @ A[e] with A read as (experts, r, in) and B as (out, r, experts).
        a = self.A.float().reshape(self.experts, -1, self.A.shape[-1])
        b = self.B.float().reshape(self.B.shape[0], -1, self.experts)
        return torch.einsum("ore,eri->eoi", b, a) * self.scale


def _pattern_value(patterns: dict | None, module: str, default):
    """peft's rank_pattern / alpha_pattern: the first key that the module name ends with (or matches)."""
    for key, value in (patterns or {}).items():
        if module == key or module.endswith("." + key) or re.fullmatch(key, module):
            return value
    return default


def _lora_deltas(run: FinishedRun) -> dict[str, _Lora]:
    """Base weight name -> its LoRA factors and scale (lora_alpha / r, or / sqrt(r) with rsLoRA, as peft does)."""
    from safetensors.torch import load_file

    tensors = load_file(str(run.path / ADAPTER_WEIGHTS))
    doc = run.adapter_config
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        m = _LORA_KEY.match(key)
        if m is None:
            raise UserError(
                f"{run.path / ADAPTER_WEIGHTS}: tensor {key!r} is not a LoRA factor; `--merge` merges plain LoRA "
                "only. Fix: export without --merge."
            )
        pairs.setdefault(m["module"], {})[m["which"]] = tensor
    out = {}
    experts = run.spec.architecture.num_experts
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise UserError(f"{run.path / ADAPTER_WEIGHTS}: {module} has lora_A or lora_B but not both")
        r = _pattern_value(doc.get("rank_pattern"), module, doc["r"])
        alpha = _pattern_value(doc.get("alpha_pattern"), module, doc["lora_alpha"])
        scale = alpha / (r**0.5) if doc.get("use_rslora") else alpha / r
        parameter = _target_parameter(module, ab, doc.get("target_parameters") or [], run.spec)
        if parameter is None:
            out[f"{module}.weight"] = _Lora(ab["A"], ab["B"], float(scale))
        else:
            out[parameter] = _Lora(ab["A"], ab["B"], float(scale), experts=experts)
    return out


def _target_parameter(module: str, ab: dict[str, torch.Tensor], targets: list[str], spec: ModelSpec) -> str | None:
    """The base tensor a PEFT ParamWrapper's factors belong to (None: a plain LoRA Linear). PEFT wraps the experts
    module once per target parameter, each wrapper around the last (`.base_layer` in the saved names), in an order
    its saved config does not pin down: the factors' shapes tell the tensors apart (A: (r x experts, in), B: (out,
    r x experts); Qwen3-MoE's gate/up is (2 x width, hidden), its down (hidden, width), never the same)."""
    owner = module
    while owner.endswith(".base_layer"):
        owner = owner.removesuffix(".base_layer")
    mine = [t.rsplit(".", 1)[1] for t in targets if owner.endswith("." + t.rsplit(".", 1)[0])]
    if not mine:
        return None
    shapes = spec.architecture.expert_shapes()
    found = [name for name in mine if name in shapes and shapes[name][1:] == (ab["B"].shape[0], ab["A"].shape[1])]
    if len(found) != 1:
        raise UserError(
            f"{module}: adapter factors {tuple(ab['A'].shape)} and {tuple(ab['B'].shape)} match none of "
            f"{spec.name}'s expert tensors {shapes}: the run's model_name does not name the model it was trained on"
        )
    return f"{owner}.{found[0]}"


# --------------------------------------------------------------------------------------------------
# Writing


def _ordered(names: list[str]) -> list[list[str]]:
    """Tensor names in groups, in model order: embeddings, then one group per decoder layer, then the rest."""
    groups: dict[tuple, list[str]] = {}
    for name in names:
        m = _LAYER.search(name)
        if m:
            key: tuple = (1, int(m[1]))
        elif "embed" in name:
            key = (0, 0)
        else:
            key = (2, 0)
        groups.setdefault(key, []).append(name)
    return [sorted(groups[k]) for k in sorted(groups)]


def _shard_plan(groups: list[list[str]], size: Callable[[str], int], max_bytes: int) -> list[list[str]]:
    """Consecutive tensors packed into shards of at most max_bytes (a bigger tensor gets a shard of its own)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name in (n for g in groups for n in g):
        n = size(name)
        if shards[-1] and used + n > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += n
    return shards


def _shard_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def _merge_weights(
    weights: _BaseWeights,
    deltas: dict[str, _Lora],
    dtype: torch.dtype,
    tmp: Path,
    *,
    tied: bool,
    max_shard_bytes: int,
    progress: ProgressFactory,
) -> list[str]:
    from safetensors.torch import save_file

    names = [n for n in weights.names() if not (tied and n == "lm_head.weight")]
    missing = sorted(set(deltas) - set(names))
    if missing:
        raise UserError(
            f"the adapter targets {missing[0]} (and {len(missing) - 1} more), which the base model does not have: "
            "the run's model_name does not name the model it was trained on"
        )
    groups = _ordered(names)
    itemsize = torch.empty((), dtype=dtype).element_size()
    plan = _shard_plan(groups, lambda n: weights.numel(n) * itemsize, max_shard_bytes)
    files = _shard_names(len(plan))
    shard_of = {name: i for i, shard in enumerate(plan) for name in shard}
    pending: dict[int, dict[str, torch.Tensor]] = {}
    weight_map: dict[str, str] = {}
    total = 0
    with progress(len(groups), "merging layers") as bar:
        for group in groups:
            for name in group:
                tensor = weights.get(name)
                if name in deltas:
                    lora = deltas[name]
                    delta = lora.delta()
                    if delta.shape != tensor.shape:
                        raise UserError(
                            f"the adapter's delta for {name} is {tuple(delta.shape)} but the base weight is "
                            f"{tuple(tensor.shape)}: the run's model_name does not name the model it was trained on"
                        )
                    tensor = tensor.float() + delta
                # A copy of its own: base tensors may be views into one pool, which safetensors refuses to save.
                out = tensor.to(dtype).clone().contiguous()
                shard = shard_of[name]
                pending.setdefault(shard, {})[name] = out
                weight_map[name] = files[shard]
                total += out.numel() * itemsize
                if len(pending[shard]) == len(plan[shard]):
                    save_file(pending.pop(shard), str(tmp / files[shard]), metadata={"format": "pt"})
            bar.update(1)
    if len(files) > 1:
        atomic_write_json(
            tmp / "model.safetensors.index.json",
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
        )
    return files


def _generation_config(hf_config, tokenizer, base_generation):
    """The base model's generation config when it has one; else stop at the end of a turn."""
    from transformers import GenerationConfig

    from autotune.data.encoding import end_of_turn_id

    if base_generation is not None:
        return base_generation
    eos = [end_of_turn_id(tokenizer)]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos.append(tokenizer.eos_token_id)
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id not in eos:
        eos.append(tokenizer.pad_token_id)  # Qwen's <|endoftext|>, as Qwen3's own generation config lists it
    return GenerationConfig(eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)


def _save_tokenizer(run: FinishedRun, tmp: Path, notes: list[str]):
    from autotune.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(run.path))
    tokenizer.save_pretrained(str(tmp))
    if not tokenizer.chat_template:
        notes.append("the run's tokenizer has no chat template: servers will need one given explicitly")
    return tokenizer


def _export_adapter(run: FinishedRun, tmp: Path, dtype: str, notes: list[str]) -> tuple[list[str], str]:
    """(files, dtype written): dtype "auto" keeps the adapter as training saved it (peft keeps it in fp32)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(run.path / ADAPTER_WEIGHTS))
    if dtype == "auto":
        by_dtype = {v: k for k, v in TORCH_DTYPES.items()}
        dtype = by_dtype.get(next(iter(tensors.values())).dtype, "auto") if tensors else "auto"
    else:
        tensors = {k: v.to(TORCH_DTYPES[dtype]) for k, v in tensors.items()}
    save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    doc = dict(run.adapter_config)
    doc["inference_mode"] = True
    if run.cfg.init == "random":
        # No hub id or folder holds a random-init base: only autotune can rebuild it.
        doc["base_model_name_or_path"] = ""
        notes.append(
            f"the base is {base_description(run)}, which no hub id names: load it with `--merge` instead, "
            "or rebuild it with autotune.modeling.load_base_model"
        )
    else:
        doc["base_model_name_or_path"] = run.spec.source
    atomic_write_json(tmp / ADAPTER_CONFIG, doc)
    _save_tokenizer(run, tmp, notes)
    return [ADAPTER_WEIGHTS, ADAPTER_CONFIG], dtype


def _export_merged(
    run: FinishedRun, tmp: Path, dtype: str, max_shard_bytes: int, progress: ProgressFactory, notes: list[str]
) -> list[str]:
    weights, hf_config, base_generation = _base_weights(run)
    deltas = _lora_deltas(run)
    torch_dtype = TORCH_DTYPES[dtype]
    tied = bool(getattr(hf_config, "tie_word_embeddings", False))
    files = _merge_weights(
        weights, deltas, torch_dtype, tmp, tied=tied, max_shard_bytes=max_shard_bytes, progress=progress
    )
    # vLLM picks its implementation by this name.
    hf_config.architectures = [run.spec.architecture.causal_lm_class]
    hf_config.use_cache = True
    hf_config.dtype = torch_dtype
    for attr in ("_name_or_path", "name_or_path"):
        if hasattr(hf_config, attr):
            setattr(hf_config, attr, "")
    hf_config.save_pretrained(str(tmp))
    tokenizer = _save_tokenizer(run, tmp, notes)
    _generation_config(hf_config, tokenizer, base_generation).save_pretrained(str(tmp))
    if run.cfg.quantization != "none":
        notes.append(
            f"the run trained a {run.cfg.quantization} (QLoRA) base: the adapter is merged into the unquantized "
            "base weights, as is usual"
        )
    if _trained_nf4_experts(run):
        notes.append(
            "the run trained on experts stored in NF4 (experts_4bit): the experts' adapters are merged into the "
            "unquantized expert tensors"
        )
    return files


def _trained_nf4_experts(run: FinishedRun) -> bool:
    """Whether the run's experts were NF4 (experts_4bit): its summary says so (runner._build)."""
    return _recorded_model(run.path).get("experts_4bit") is True


def _recorded_model(path: Path) -> dict:
    """The run summary's record of the model it trained (runner._build); empty where there is none to read."""
    model = (read_summary(path) or {}).get("model")
    return model if isinstance(model, dict) else {}


# --------------------------------------------------------------------------------------------------
# The command


@dataclass
class _Staging:
    """A temporary folder beside `out` that becomes `out` on commit, or disappears."""

    out: Path
    tmp: Path = field(init=False)

    def __post_init__(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self._remove_dead_exports()
        prefix = f".{self.out.name}.{os.getpid()}."
        self.tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=self.out.parent))

    def _remove_dead_exports(self) -> None:
        """A staging folder an export killed mid-way left beside `out` (named with its pid): removed once that
        process is gone, so killed exports do not pile up hidden copies of a model."""
        for path in self.out.parent.glob(f".{glob.escape(self.out.name)}.*.tmp"):
            pid = path.name[len(self.out.name) + 2 :].split(".", 1)[0]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(path, ignore_errors=True)

    def commit(self) -> None:
        # mkdtemp is owner-only and safetensors writes 0600: the export gets the modes the umask gives new files.
        apply_umask(self.tmp)
        old = None
        if self.out.exists():
            old = self.out.with_name(f".{self.out.name}.{os.getpid()}.old")
            os.replace(self.out, old)
        os.replace(self.tmp, self.out)
        fsync_dir(self.out.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def discard(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True


def gguf_command(out: Path, dtype: str, run: FinishedRun, merged: bool) -> str | None:
    """llama.cpp's converter for this export: no maintained package on PyPI converts an HF folder to GGUF by
    itself (the `gguf` package only reads and writes the file format), so the command is printed, not run."""
    outtype = GGUF_OUTTYPES.get(dtype, "auto")
    if merged:
        return f"python convert_hf_to_gguf.py {out} --outfile {out}.gguf --outtype {outtype}"
    if run.cfg.init == "random":
        return None
    base = f"--base {run.spec.local_path}" if run.spec.local_path else f"--base-model-id {run.spec.source}"
    return f"python convert_lora_to_gguf.py {out} {base} --outfile {out}.gguf --outtype {outtype}"


def export_run(
    run_dir: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    merge: bool = False,
    dtype: str = "auto",
    overwrite: bool = False,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    progress: ProgressFactory = no_progress,
) -> ExportResult:
    """Export a finished run (see the module docstring). dtype "auto": the dtype the run trained in."""
    if dtype not in EXPORT_DTYPES:
        raise UserError(f"--dtype {dtype!r}: use one of {', '.join(EXPORT_DTYPES)}")
    run = read_run(run_dir)
    target = Path(out) if out is not None else default_export_dir(run_dir, merge)
    check_export_destination(target, run.path, overwrite)
    resolved = run.train_dtype if dtype == "auto" and merge else dtype
    notes: list[str] = []
    staging = _Staging(target)
    try:
        if merge:
            files = _export_merged(run, staging.tmp, resolved, max_shard_bytes, progress, notes)
        else:
            files, resolved = _export_adapter(run, staging.tmp, resolved, notes)
        base = base_description(run)
        written = sorted(p.name for p in staging.tmp.iterdir())
        atomic_write_json(
            staging.tmp / EXPORT_MANIFEST,
            {
                "files": written,  # what --overwrite may replace later, and nothing else (run_files.check_export_destination)
                "run": str(run.path.resolve()),
                "merged": merge,
                "dtype": resolved,
                "base": base,
                "model_name": run.cfg.model_name,
                "init": run.cfg.init,
                "seed": run.cfg.seed,
                "lora_r": run.adapter_config.get("r"),
                "lora_alpha": run.adapter_config.get("lora_alpha"),
            },
        )
        staging.commit()
    except BaseException:
        staging.discard()
        raise
    return ExportResult(
        out=target,
        merged=merge,
        dtype=resolved,
        files=files,
        base=base,
        gguf_command=gguf_command(target, resolved, run, merge),
        notes=notes,
    )
