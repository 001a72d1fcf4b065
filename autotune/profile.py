"""The solved profile: the one contract between `autotune solve` and `autotune train`.

solve writes it (atomically); train reads it, applies its choice over the config, and warns when
the hardware or the model it was solved for differ from the ones at hand. Importing this module
must not import torch.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from autotune import __version__
from autotune.catalog import Architecture, check_target_modules
from autotune.config import STRATEGIES, Config, build_config, load_config, merge_values, parse_set, value_is
from autotune.errors import UserError
from autotune.fsutil import atomic_write_json
from autotune.techniques import TECHNIQUES

# 2: the choice records the step's techniques, one key per row of the techniques table; the profile lists the
# techniques its writer knew ("techniques"). A technique added since is not in an older profile's choice: it loads
# with that technique off (as its trials ran), and says so.
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
    blob = json.dumps(arch.facts(), sort_keys=True).encode()
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


# The choice keys every profile of this schema has; the techniques may be missing from an older one.
REQUIRED_CHOICE_KEYS = tuple(k for k in CHOICE_KEYS if k not in TECHNIQUES)


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
        "techniques": list(TECHNIQUES),
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


def load_profile(path: str | Path, notes: list[str] | None = None) -> dict:
    """Read and check a profile; a corrupt, foreign, older- or newer-schema file gets one clear error. A technique
    the profile predates is filled in as "off" (its trials ran without it), with a line appended to `notes`."""
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
    if not isinstance(version, int) or isinstance(version, bool) or version < SCHEMA_VERSION:
        raise UserError(
            f"{path}: profile schema_version {version!r}, this autotune reads {SCHEMA_VERSION}; "
            "solve again with this version of autotune"
        )
    if version > SCHEMA_VERSION:
        raise UserError(
            f"{path}: profile schema_version {version}, written by a newer autotune "
            f"({doc.get('autotune_version')!r}) than this one ({__version__}, schema {SCHEMA_VERSION}): upgrade "
            "autotune, or solve again with this one"
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
    wrong = _wrong_fields(doc)
    if wrong:
        raise UserError(f"{path}: the profile is corrupt: {'; '.join(wrong[:4])}; solve again with `autotune solve`")
    choice = doc.get("choice")
    if not isinstance(choice, dict) or any(k not in choice for k in REQUIRED_CHOICE_KEYS):
        raise UserError(
            f'{path}: the profile\'s "choice" is missing keys '
            f"{[k for k in REQUIRED_CHOICE_KEYS if not isinstance(choice, dict) or k not in choice]}"
        )
    _fill_missing_techniques(doc, path, notes)
    try:
        # The targets are the recorded model's layers (a hybrid's DeltaNet projections), the rest the config's.
        build_config({k: choice[k] for k in CHOICE_KEYS if k != "target_modules"})
        facts = doc["model"].get("architecture")
        check_target_modules(choice["target_modules"], Architecture.from_facts(facts) if facts else None)
        if doc.get("config") is not None:
            build_config(doc["config"], f"{path} (its config)")
    except UserError as exc:
        raise UserError(f"{path}: the profile's choice is invalid: {exc}") from None
    return doc


def _is(kind: str) -> Callable[[Any], bool]:
    return lambda value: value_is(kind, value)


# The fields the readers of a profile use (train's watchdog and batch plan, `profiles plot`, the trial table), and
# what each must be: a profile that parses but breaks one of these is refused on load, not a traceback later.
_FIELD_RULES: dict[tuple[str, str], tuple[Callable[[Any], bool], str]] = {
    ("constraints", "max_memory_gb"): (_is("float>0"), "a positive number"),
    ("constraints", "margin"): (lambda v: value_is("ratio", v) and v <= 0.5, "a number from 0 to 0.5"),
    ("constraints", "usable_bytes"): (_is("int>=0"), "a byte count"),
    ("measurement", "peak_bytes"): (_is("int>=0?"), "a byte count or null"),
}
_TRIAL_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "batch": (_is("int>=1"), "a positive integer"),
    "seq": (_is("int>=1"), "a positive integer"),
    "rank": (_is("int>=1"), "a positive integer"),
    "fits": (_is("bool"), "true or false"),
    "oom": (_is("bool"), "true or false"),
    "peak_bytes": (_is("int>=0?"), "a byte count or null"),
}


def _wrong_fields(doc: dict) -> list[str]:
    """Each field of _FIELD_RULES and of every trial that is missing or of the wrong kind, said as `where: what`."""
    wrong = []
    for (section, key), (ok, kind) in _FIELD_RULES.items():
        if key not in doc[section] and key != "max_memory_gb":
            continue  # written by every solve of this schema; absent in a hand-made one the readers default
        if not ok(doc[section].get(key)):
            wrong.append(f"{section}.{key} is {doc[section].get(key)!r}, not {kind}")
    for i, trial in enumerate(doc["trials"]):
        if not isinstance(trial, dict):
            wrong.append(f"trials[{i}] is not an object")
            continue
        for key, (ok, kind) in _TRIAL_RULES.items():
            if not ok(trial.get(key)):
                wrong.append(f"trials[{i}].{key} is {trial.get(key)!r}, not {kind}")
    return wrong


def _fill_missing_techniques(doc: dict, path: Path, notes: list[str] | None) -> None:
    """The techniques the profile's writer did not know, switched off in its choice (and its config): its trials
    ran without them, so that is what its memory figures describe."""
    missing = [k for k in TECHNIQUES if k not in doc["choice"]]
    known = doc.get("techniques")
    lost = [k for k in missing if isinstance(known, list) and k in known]
    if lost:
        raise UserError(
            f'{path}: the profile\'s "choice" is missing keys {lost}, which its writer knew; solve again with '
            "`autotune solve`"
        )
    for key in missing:
        doc["choice"][key] = "off"
        if isinstance(doc.get("config"), dict):
            doc["config"].setdefault(key, "off")
    if missing and notes is not None:
        notes.append(
            f"{path} was solved by autotune {doc.get('autotune_version', '?')}, before {', '.join(missing)} "
            f"existed: {'they are' if len(missing) > 1 else 'it is'} off, as its trials ran (solve again to measure "
            f"{'them' if len(missing) > 1 else 'it'})"
        )


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
    """The config a command runs with, and the warnings and notes its layering raises. The one place train and solve
    merge their inputs, in this order (later wins):

    defaults < the config file (its base chain first; with a profile and no file, the config the profile
    was solved with) < the profile's choice < `--set` < the command's own flags (solve --model, --rank ...).
    """
    overrides = parse_set(sets)
    warnings: list[str] = []  # and the notes of the peers' keys the file spells its way (config.from_peers)
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    if profile is None:
        # The flags are the last layer: checked with the --set values, so that a value that depends on the model
        # (target_modules all-linear, a hybrid's projections) is read for the model the flags name.
        return load_config(config_path, {**overrides, **flags}, notes=warnings), warnings
    cfg = apply_profile(load_config(config_path, notes=warnings) if config_path else profile_config(profile), profile)
    if overrides:
        # What the user types on this command line wins over the profile, and is said aloud.
        cfg = build_config(merge_values(cfg.to_dict(), overrides), "config + profile + --set")
        warnings += [
            f"--set {key} overrides the profile's solved {key}: the profile's memory figures no longer apply"
            for key in sorted(set(overrides) & set(CHOICE_KEYS))
        ]
    if flags:
        cfg = build_config(merge_values(cfg.to_dict(), flags), "command-line options")
    return cfg, warnings


def _architecture_change(model: dict, arch: Architecture) -> str:
    """The fields in which the profile's recorded architecture and `arch` differ, as `field then -> now`."""
    then, now = model.get("architecture"), arch.facts()
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
