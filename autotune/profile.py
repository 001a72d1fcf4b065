"""The solved profile: the one contract between `autotune solve` and `autotune train`.

solve writes it (atomically); train reads it, applies its choice over the config, and warns when
the hardware or the model it was solved for differ from the ones at hand. Importing this module
must not import torch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from autotune import __version__
from autotune.catalog import Architecture
from autotune.config import STRATEGIES, Config, build_config, load_config, merge_values, parse_set
from autotune.errors import UserError
from autotune.fsutil import atomic_write_json
from autotune.techniques import TECHNIQUES, as_config_values
from autotune.units import GiB

if TYPE_CHECKING:
    from autotune.solver import SolveRequest
    from autotune.trial import Trial

# 2: the choice records the step's techniques (fused_loss, offload_activations, embedding_on_cpu, packing).
SCHEMA_VERSION = 2
KIND = "autotune.profile"

# The choice keys that train applies over the config (they are config keys too).
CHOICE_KEYS = (
    "batch_size",
    "gradient_accumulation_steps",
    "effective_batch_size",
    "max_sequence_length",
    "lora_r",
    "lora_alpha",
    "target_modules",
    "quantization",
    "gradient_checkpointing",
    "optimizer",
    "eval_batch_size",
    *TECHNIQUES,
)


def architecture_hash(arch: Architecture) -> str:
    blob = json.dumps(dataclasses.asdict(arch), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def hardware_fingerprint(probe: dict | None, device: str) -> dict:
    from autotune.hardware import training_gpu

    host = (probe or {}).get("host", {})
    gpu = training_gpu(probe) if probe else None
    packages = host.get("packages", {})
    return {
        "device": device,
        "gpu_name": gpu["name"] if gpu else None,
        "memory_total_gb": gpu["memory_total_gb"] if gpu else None,
        "driver": (probe or {}).get("driver", {}).get("version"),
        "cuda": (probe or {}).get("driver", {}).get("cuda"),
        "torch_cuda_build": host.get("torch_cuda_build"),
        **{name: packages.get(name) for name in ("torch", "transformers", "peft", "bitsandbytes")},
    }


def new_profile(
    *,
    hardware: dict,
    model: dict,
    data: dict | None,
    constraints: dict,
    choice: dict,
    prediction: dict,
    measurement: dict,
    runner_up: dict | None,
    reason: str,
    trials: list[dict],
    config: dict | None = None,
) -> dict:
    missing = [k for k in CHOICE_KEYS if k not in choice]
    if missing:
        raise ValueError(f"profile choice lacks {missing}")
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": KIND,
        "autotune_version": __version__,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "hardware": hardware,
        "model": model,
        "data": data,
        "constraints": constraints,
        "choice": choice,
        "prediction": prediction,
        "measurement": measurement,
        "runner_up": runner_up,
        "reason": reason,
        "trials": trials,
        # The resolved config solve ran with: `train --profile P` without --config starts from it, so
        # the model, tokenizer and data it trains are the ones the profile was measured for.
        "config": config,
    }


def save_profile(profile: dict, path: str | Path) -> Path:
    return atomic_write_json(path, profile)


def load_profile(path: str | Path) -> dict:
    """Read and check a profile; a corrupt, foreign or older-schema file gets one clear error."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: profile not found; create one with `autotune solve`") from None
    except json.JSONDecodeError as exc:
        raise UserError(
            f"{path}:{exc.lineno}:{exc.colno}: the profile is corrupt ({exc.msg}); solve again with `autotune solve`"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read the profile ({exc})") from None
    if not isinstance(doc, dict) or doc.get("kind") != KIND:
        raise UserError(
            f'{path}: not an autotune profile (no "kind": "{KIND}"); give a file written by `autotune solve`'
        )
    version = doc.get("schema_version")
    if version != SCHEMA_VERSION:
        raise UserError(
            f"{path}: profile schema_version {version!r}, this autotune reads {SCHEMA_VERSION}; "
            "solve again with this version of autotune"
        )
    sections = {"hardware": dict, "model": dict, "constraints": dict, "measurement": dict, "trials": list}
    wrong = [k for k, kind in sections.items() if not isinstance(doc.get(k), kind)]
    if not isinstance(doc.get("config"), (dict, type(None))):
        wrong.append("config")
    if wrong:
        raise UserError(
            f"{path}: the profile is corrupt: {', '.join(repr(k) for k in wrong)} missing or of the "
            "wrong type; solve again with `autotune solve`"
        )
    constraints = doc["constraints"]
    world, strategy = constraints.get("world_size", 1), constraints.get("strategy", "ddp")
    if not (isinstance(world, int) and not isinstance(world, bool) and world >= 1) or strategy not in STRATEGIES[1:]:
        raise UserError(
            f"{path}: the profile is corrupt: constraints world_size {world!r} / strategy {strategy!r} (an integer "
            f">= 1 and one of {', '.join(STRATEGIES[1:])}); solve again with `autotune solve`"
        )
    choice = doc.get("choice")
    if not isinstance(choice, dict) or any(k not in choice for k in CHOICE_KEYS):
        raise UserError(
            f'{path}: the profile\'s "choice" is missing keys '
            f"{[k for k in CHOICE_KEYS if not isinstance(choice, dict) or k not in choice]}"
        )
    try:
        build_config({k: choice[k] for k in CHOICE_KEYS})
        if doc.get("config") is not None:
            build_config(doc["config"], f"{path} (its config)")
    except UserError as exc:
        raise UserError(f"{path}: the profile's choice is invalid: {exc}") from None
    return doc


def profile_config(profile: dict) -> Config:
    """The config solve ran with (for `train --profile` without --config); defaults if absent."""
    return build_config(profile.get("config") or {}, "profile config")


def apply_profile(cfg: Config, profile: dict) -> Config:
    """The config with the profile's solved fields winning, and its memory budget recorded."""
    values = cfg.to_dict()
    values.update({k: profile["choice"][k] for k in CHOICE_KEYS})
    budget = profile["constraints"].get("max_memory_gb")
    if budget is not None:
        values["max_memory_gb"] = budget
    return build_config(values, "config + profile")


def layered_config(
    config_path: str | None, sets=(), *, profile: dict | None = None, flags: dict | None = None
) -> tuple[Config, list[str]]:
    """The config a command runs with, and the warnings its layering raises. The one place train and solve
    merge their inputs, in this order (later wins):

    defaults < the config file (its base chain first; with a profile and no file, the config the profile
    was solved with) < the profile's choice < `--set` < the command's own flags (solve --model, --rank ...).
    """
    overrides = parse_set(sets)
    warnings: list[str] = []
    if profile is None:
        cfg = load_config(config_path, overrides)
    else:
        cfg = apply_profile(load_config(config_path) if config_path else profile_config(profile), profile)
        if overrides:
            # What the user types on this command line wins over the profile, and is said aloud.
            cfg = build_config(merge_values(cfg.to_dict(), overrides), "config + profile + --set")
            warnings += [
                f"--set {key} overrides the profile's solved {key}: the profile's memory figures no longer apply"
                for key in sorted(set(overrides) & set(CHOICE_KEYS))
            ]
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    if flags:
        cfg = build_config(merge_values(cfg.to_dict(), flags), "command-line options")
    return cfg, warnings


def _architecture_change(model: dict, arch: Architecture) -> str:
    """The fields in which the profile's recorded architecture and `arch` differ, as `field then -> now`."""
    then, now = model.get("architecture"), dataclasses.asdict(arch)
    if not isinstance(then, dict):
        return "architecture hash " + f"{model.get('architecture_hash')} -> {architecture_hash(arch)}"
    diffs = [f"{k} {then[k]} -> {now[k]}" for k in now if k in then and then[k] != now[k]]
    return ", ".join(diffs[:4]) or f"architecture hash {model.get('architecture_hash')} -> {architecture_hash(arch)}"


def model_mismatch(profile: dict, model_name: str, arch: Architecture) -> tuple[str, bool] | None:
    """How the model the profile was solved for differs from the one `model_name` builds, naming both, and
    whether the architecture differs (then the profile's memory figures do not apply); None when they agree."""
    model = profile.get("model", {})
    then = model.get("name")
    if model.get("architecture_hash") != architecture_hash(arch):
        change = _architecture_change(model, arch)
        if then == model_name:
            return (
                f"the profile was solved for model {then!r}, and {model_name!r} now has another architecture "
                f"({change}): its memory figures do not apply",
                True,
            )
        return (
            f"the profile was solved for model {then!r} but the config trains {model_name!r}, another architecture "
            f"({change}): its memory figures do not apply",
            True,
        )
    if then != model_name:
        return (
            f"the profile was solved for model {then!r} but the config trains {model_name!r} (the same "
            "architecture, so its memory figures still apply)",
            False,
        )
    return None


def mismatches(profile: dict, hardware_now: dict, model_name: str, arch: Architecture) -> list[str]:
    """What differs between where the profile was solved and where it is used (warnings, not errors:
    a profile solved on one 24 GB card is a fair start on another; `autotune train` refuses a profile of
    another architecture itself, through model_mismatch)."""
    out = []
    then = profile.get("hardware", {})
    for key in ("gpu_name", "memory_total_gb", "bitsandbytes", "torch"):
        if then.get(key) != hardware_now.get(key):
            out.append(f"profile was solved with {key}={then.get(key)!r}, this machine has {hardware_now.get(key)!r}")
    model = model_mismatch(profile, model_name, arch)
    if model is not None:
        out.append(model[0])
    return out


# ------------------------------------------------------------------------------ from a solve


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-") or "unknown"


def default_profile_path(
    gpu_name: str | None, model_name: str, budget_gb: float, *, world_size: int = 1, strategy: str = "ddp"
) -> Path:
    # Relative to the working directory: solved profiles belong to the user's project, not to autotune.
    ranks = f"__{world_size}x{strategy}" if world_size > 1 else ""
    name = f"{slug(gpu_name or 'cpu')}__{slug(model_name.split('/')[-1])}__{budget_gb:g}GB{ranks}.json"
    return Path("profiles") / "solved" / name


def _estimate_bytes(req: SolveRequest, trial: Trial, device_type: str) -> int | None:
    """The analytic estimate for the chosen shape, recorded beside the measurement it can be judged by."""
    from autotune.estimate import estimate_peak
    from autotune.solver import estimate_options

    options = estimate_options(req, device_type, trial.knobs)
    try:
        est = estimate_peak(req.ctx.architecture, batch=trial.batch, seq=trial.seq, rank=trial.rank, **options)
    except (ValueError, UserError):
        return None
    return est.peak_bytes


def profile_from_solve(
    req: SolveRequest, result: dict, *, hardware: dict, init: str, dtype: str | None, device_type: str
) -> dict:
    """The profile of a finished solve: its choice, what was measured and predicted, and every trial.

    `init` and `dtype` describe the model the trials ran on (trial.TrialRunner.init / .dtype)."""
    cfg, spec, best = req.ctx.cfg, req.ctx.spec, result["best"]
    choice = {
        "batch_size": best.batch,
        "gradient_accumulation_steps": result["accumulation"],
        "effective_batch_size": best.batch * result["accumulation"] * req.world_size,
        "max_sequence_length": best.seq,
        "lora_r": best.rank,
        "lora_alpha": cfg.lora_alpha * best.rank / cfg.lora_r,
        "target_modules": list(cfg.target_modules),
        "quantization": cfg.quantization,
        "gradient_checkpointing": cfg.gradient_checkpointing,
        "optimizer": cfg.optimizer,
        "eval_batch_size": result.get("eval_batch", best.batch),
        # The techniques the chosen trial ran with, as explicit on/off: train applies exactly them.
        **{name: getattr(cfg, name) for name in TECHNIQUES},
        **(as_config_values(best.knobs) if best.knobs else {}),
        "dtype": dtype,
    }
    runner_up = result["runner_up"]
    return new_profile(
        hardware=hardware,
        model={
            "name": cfg.model_name,
            "architecture_hash": architecture_hash(spec.architecture),
            "architecture": dataclasses.asdict(spec.architecture),
            "init": init,
        },
        data=req.data_stats,
        constraints={
            "max_memory_gb": result["budget_bytes"] / GiB,
            "margin": result["margin"],
            "objective": req.objective,
            "usable_bytes": result["usable_bytes"],
            # Every figure of the profile is one rank's of world_size processes sharing the model by `strategy`.
            "world_size": req.world_size,
            "strategy": req.strategy,
            "effective_batch_size": result["effective"],
            "max_trials": req.max_trials,
            "time_budget_s": req.time_budget_s,
        },
        choice=choice,
        prediction={"peak_bytes": best.predicted_bytes, "estimate_bytes": _estimate_bytes(req, best, device_type)},
        measurement={
            # "trials": measured steps; "estimate": no step could be measured here (FSDP), the estimate's peak.
            "source": "trials" if best.measured else "estimate",
            "per_rank": req.world_size > 1,
            "ddp_bucket_bytes": best.memory.get("ddp_bucket_bytes"),
            "peak_bytes": best.peak_bytes,
            "peak_fraction_of_budget": best.peak_bytes / result["budget_bytes"],
            "tokens_per_second": best.tokens_per_second,
            "step_seconds": best.step_seconds,
            "max_feasible_batch": {str(k): v for k, v in result["max_feasible_batch"].items()},
            "max_feasible_batch_by_techniques": {
                label: {str(k): v for k, v in by_rank.items()}
                for label, by_rank in result["max_feasible_batch_by_techniques"].items()
            },
        },
        runner_up=dataclasses.asdict(runner_up) if runner_up else None,
        reason=result["reason"],
        trials=[dataclasses.asdict(t) for t in result["trials"]],
        # What train starts from with --profile alone: the solve's config with the choice applied.
        config={**cfg.to_dict(), **{k: choice[k] for k in CHOICE_KEYS}},
    )
