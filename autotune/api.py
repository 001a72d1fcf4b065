"""The Python API: the stages the command line runs, as functions with typed results.

    from autotune import probe, estimate, solve, train, export

Each takes what its command takes: a config (a file's path, a Config, or None for the defaults) and config keys as
keyword arguments, which win over the file and the profile as `--set` does; bad input raises the UserError the
command would print. `import autotune` stays cheap: the package's door (`autotune/__init__.py`) imports this module
only when one of these names is first asked for, and each function imports its stage (torch with it) when called.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autotune.config import DEFAULT_MAX_TRIALS, MAX_RANK_CANDIDATES, Config, build_config, load_config, merge_values
from autotune.errors import UserError
from autotune.units import DEFAULT_MARGIN

if TYPE_CHECKING:
    from autotune.estimate import Estimate
    from autotune.export import ExportResult

ConfigLike = str | os.PathLike | Config | None
Echo = Callable[[str], None]
# How keyword arguments are named in messages (a command line's are `--set`).
KEYWORDS = "keyword arguments"


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Estimated:
    """`estimate`'s answer: the step's peak by component, and `autotune estimate --json`'s whole report (each
    phase of the run, the host memory, and with a budget whether it fits and the largest shapes that do)."""

    step: Estimate
    report: dict[str, Any]

    @property
    def peak_gb(self) -> float:
        return self.report["peak_gb"]

    @property
    def fits(self) -> bool | None:
        """Whether the whole run fits the budget (its largest phase); None without a budget."""
        return self.report.get("fits")


@dataclass(frozen=True)
class Solved:
    """`solve`'s answer: the profile (profile.py, the contract `train` reads) and where it was written."""

    profile: dict[str, Any]
    path: Path

    @property
    def choice(self) -> dict[str, Any]:
        return self.profile["choice"]


@dataclass(frozen=True)
class Trained:
    """`train`'s answer: the run summary (also <output_dir>/run_summary.json) and what the inputs' layering said."""

    summary: dict[str, Any]
    notes: list[str]

    @property
    def status(self) -> str:
        """succeeded, or interrupted (after a Ctrl-C; resume with resume=True)."""
        return self.summary["status"]

    @property
    def output_dir(self) -> Path:
        return Path(self.summary["output_dir"])


def _config(config: ConfigLike, keys: dict[str, Any], notes: list[str], profile: dict | None = None) -> Config:
    """The config a stage runs with, layered as the command line layers it: defaults < the file (with a profile and
    no file, the config it was solved with) < the profile's choice < the keyword arguments."""
    from autotune.profile import apply_profile, profile_config

    if isinstance(config, Config):
        cfg = config
    elif config is None and profile is not None:
        cfg = profile_config(profile)
    else:
        cfg = load_config(config, notes=notes)
    if profile is not None:
        cfg = apply_profile(cfg, profile)
    if keys:
        cfg = build_config(merge_values(cfg.to_dict(), keys), KEYWORDS)
    return cfg


def probe(output_dir: str | os.PathLike = ".") -> dict[str, Any]:
    """`autotune probe --json`: every GPU (NVML) and the host, as one versioned document (keys `gpus`, `host`);
    free disk measured at `output_dir`."""
    from autotune.hardware import probe as run_probe

    return run_probe(str(output_dir))


def estimate(
    config: ConfigLike = None,
    *,
    margin: float = DEFAULT_MARGIN,
    device: str = "cuda",
    gpus: int = 1,
    host_ram_gb: float | None = None,
    **keys: Any,
) -> Estimated:
    """`autotune estimate`: the predicted peak of a step and of the whole run, without a GPU, for the config's shape
    (max_sequence_length, batch_size, lora_r, its techniques) within its max_memory_gb less `margin`; where the
    config's own techniques are predicted not to fit, those it leaves on "auto" planned as the command plans them
    (estimate.answer, its "techniques_reason")."""
    from autotune.context import RunContext
    from autotune.estimate import answer
    from autotune.hardware import available_ram_bytes
    from autotune.units import Budget, GiB

    if device not in ("cuda", "cpu"):
        raise UserError(f"device {device!r}: use cuda (a GPU's step, with its context) or cpu (the CPU tracker's)")
    cfg = _config(config, keys, [])
    budget = Budget.from_gib(cfg.max_memory_gb, margin) if cfg.max_memory_gb is not None else None
    host_ram = int(host_ram_gb * GiB) if host_ram_gb is not None else available_ram_bytes()
    step, doc, _ = answer(cfg, RunContext(cfg).spec, budget, device=device, gpus=gpus, host_ram_bytes=host_ram)
    return Estimated(step, doc)


def solve(
    config: ConfigLike = None,
    *,
    output: str | os.PathLike | None = None,
    objective: str = "throughput",
    margin: float = DEFAULT_MARGIN,
    seq: int | None = None,
    ranks: Sequence[int] | None = None,
    max_seq: int | None = None,
    max_trials: int = DEFAULT_MAX_TRIALS,
    time_budget: float | None = None,
    checkpointing: str = "auto",
    real_weights: bool = False,
    gpus: int = 1,
    plot: bool = False,
    echo: Echo = _stderr,
    **keys: Any,
) -> Solved:
    """`autotune solve`: measured trials choose micro-batch, accumulation, sequence length and LoRA rank (and the
    step's techniques) within the budget, keyword `max_memory_gb` (else the config's, else the probed free memory);
    the profile is written atomically to `output` (default profiles/solved/<gpu>__<model>__<budget>.json).
    `lora_r` as a keyword fixes the rank (the command's --rank), `ranks` gives the candidates; `seq` fixes the
    sequence instead of covering the data's p99. Each trial's line goes to `echo`."""
    from autotune.config import OBJECTIVES
    from autotune.memory import ensure_expandable_segments
    from autotune.techniques import SWITCHES

    if objective not in OBJECTIVES:
        raise UserError(f"objective {objective!r}: use one of {', '.join(OBJECTIVES)}")
    if checkpointing not in SWITCHES:
        raise UserError(f"checkpointing {checkpointing!r}: use one of {', '.join(SWITCHES)}")
    ensure_expandable_segments()  # before anything touches CUDA
    from autotune.config import explicit_keys, lora_rank_problem
    from autotune.context import RunContext
    from autotune.solve import SolveRequest, run_solve

    if checkpointing != "auto":
        keys = {**keys, "gradient_checkpointing": checkpointing == "on"}
    notes: list[str] = []
    cfg = _config(config, keys, notes)
    for note in notes:
        echo(f"note: {note}")
    explicit = set(keys) | (explicit_keys(config) if isinstance(config, (str, os.PathLike)) else set())
    ctx = RunContext(cfg)
    rank_list = sorted(set(ranks)) if ranks else None
    for r in rank_list or ():
        if problem := lora_rank_problem(r, ctx.spec):
            raise UserError(f"ranks: {problem}")
    if rank_list is None and "lora_r" in keys:
        rank_list = [cfg.lora_r]
    elif rank_list is None and objective == "max-rank":
        rank_list = list(MAX_RANK_CANDIDATES)
    request = SolveRequest(
        ctx=ctx,
        objective=objective,
        seq=seq,
        ranks=rank_list,
        max_seq=max_seq,
        max_trials=max_trials,
        time_budget_s=time_budget,
        checkpointing=checkpointing,
        world_size=gpus,
    )
    profile, path = run_solve(
        request,
        max_memory_gb=keys.get("max_memory_gb"),
        budget_explicit="max_memory_gb" in explicit,
        quantization_explicit="quantization" in explicit,
        margin=margin,
        data_required="data_dir" in explicit,
        output=None if output is None else str(output),
        init="pretrained" if real_weights else "random",
        plot=plot,
        echo=echo,
    )
    return Solved(profile, Path(path))


def train(
    config: ConfigLike = None,
    *,
    profile: str | os.PathLike | None = None,
    resume: bool = False,
    overwrite: bool = False,
    echo: Echo = _stderr,
    **keys: Any,
) -> Trained:
    """`autotune train`: LoRA/QLoRA on the HF Trainer, with `profile`'s solved choice over the config and the
    keyword arguments over both; the adapter, tokenizer, resolved config and run summary go to output_dir. One
    process: for several GPUs run the command under torchrun (README)."""
    from autotune.profile import load_profile
    from autotune.runner import train as run_training

    notes: list[str] = []
    solved = load_profile(Path(profile), notes) if profile is not None else None
    cfg = _config(config, keys, notes, solved)
    if solved is not None:
        from autotune.profile import CHOICE_KEYS

        notes += [
            f"{key} overrides the profile's solved {key}: the profile's memory figures no longer apply"
            for key in sorted(set(keys) & set(CHOICE_KEYS))
        ]
    for note in notes:
        echo(f"note: {note}")
    summary = run_training(cfg, profile=solved, resume=resume, overwrite=overwrite, echo=echo)
    return Trained(summary, notes)


def export(
    run_dir: str | os.PathLike,
    *,
    out: str | os.PathLike | None = None,
    merge: bool = False,
    dtype: str = "auto",
    overwrite: bool = False,
) -> ExportResult:
    """`autotune export`: a finished run as a clean adapter folder, or with merge=True a full model (base + LoRA
    merged on the CPU a layer at a time); default folder RUN_DIR/adapter or RUN_DIR/merged."""
    from autotune.export import export_run

    return export_run(run_dir, out, merge=merge, dtype=dtype, overwrite=overwrite)


__all__ = ["Estimated", "Solved", "Trained", "estimate", "export", "probe", "solve", "train"]
