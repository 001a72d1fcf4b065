"""`autotune solve`, end to end: probe, budget, data statistics, the strategy, the trials (or, for FSDP, the
estimate's plan), then the profile, written atomically."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from autotune.context import RunContext
from autotune.errors import UserError
from autotune.estimate import strategy_for
from autotune.kernels import delta_kernel
from autotune.solve.plan import NothingFits, SolveRequest, SolveResult, plan_from_estimate, request_seq, solve
from autotune.solve.record import default_profile_path, profile_from_solve
from autotune.techniques import liger_problem
from autotune.units import Budget

if TYPE_CHECKING:
    from autotune.trial import TrialRunner

Echo = Callable[[str], None]


def budget_for(
    flag_gb: float | None, cfg, budget_explicit: bool, probe_doc: dict, margin: float, gpus: int = 1
) -> tuple[Budget, str]:
    """The budget to solve within (per rank), and where it came from: the flag, else a max_memory_gb the user
    wrote, else the free memory of the smallest of the `gpus` GPUs the run will use (every rank must fit: the
    smallest card is the budget of all). The margin is the budget's, taken once (units.Budget.usable_bytes)."""
    from autotune.hardware import training_gpu

    if flag_gb is not None:
        return Budget.from_gib(flag_gb, margin), "--max-memory-gb"
    if budget_explicit and cfg.max_memory_gb is not None:
        return Budget.from_gib(cfg.max_memory_gb, margin), "the config's max_memory_gb"
    if gpus > 1:
        visible = [g for g in probe_doc.get("gpus") or [] if g.get("index") is not None and g["index"] < gpus]
        if len(visible) < gpus or any(g.get("error") or g.get("memory_free_gb") is None for g in visible):
            raise UserError(
                f"--gpus {gpus}, but this machine shows {len(visible)} usable GPU(s): give --max-memory-gb (the "
                "smallest card's memory) to plan for the machine the run will have"
            )
        gpu = min(visible, key=lambda g: g["memory_free_gb"])
    else:
        gpu = training_gpu(probe_doc)
        if gpu is None or gpu.get("error"):
            raise UserError("no GPU to measure a budget on: give --max-memory-gb (on a CPU it sets a simulated card)")
    free = gpu["memory_free_gb"]
    smallest = f", the smallest of GPUs 0-{gpus - 1}" if gpus > 1 else ""
    return Budget.from_gib(free, margin), f"the {free:.1f} GiB free on GPU {gpu['index']}{smallest}"


def choose_strategy(req: SolveRequest, budget: Budget, seq: int, device_type: str) -> tuple[str, str]:
    """The strategy the solve plans for (the request's, `auto` resolved by the estimate), and why."""
    from autotune.distributed import check_fsdp
    from autotune.techniques import check_strategy, resolve

    cfg = req.ctx.cfg
    asked = cfg.distributed_strategy
    if req.world_size == 1:
        return "ddp", "one process"  # nothing wraps or shards one process: every technique applies
    if asked == "auto":
        rank = max(req.ranks or [cfg.lora_r])
        shape = replace(req.shape(device_type, resolve(cfg, req.ctx.spec), seq=seq, rank=rank), strategy="ddp")
        strategy, why = strategy_for(shape, budget)
    else:
        strategy, why = asked, f"--strategy {asked}"
    if strategy == "fsdp":
        check_fsdp(cfg, "cuda")  # a plan for GPUs: on this machine or another
    check_strategy(cfg, strategy, req.world_size)  # what the config forces on that the strategy refuses
    return strategy, why


def check_writable(path: str | Path) -> None:
    """Fail before a long solve, not after it, when the profile cannot be written where asked."""
    parent = Path(path).resolve().parent
    probe_dir = next((p for p in (parent, *parent.parents) if p.exists()), None)
    if probe_dir is None or not probe_dir.is_dir() or not os.access(probe_dir, os.W_OK):
        raise UserError(f"--output {path}: cannot write there ({probe_dir} is not a writable folder)")


def data_stats_for(ctx: RunContext, *, required: bool, echo: Echo) -> dict | None:
    """Token-length statistics of the config's data folder; None (said aloud) when there is none and the user
    did not ask for one."""
    from autotune.data.prepare import data_length_stats

    data_dir = ctx.cfg.data_dir
    if not Path(data_dir).is_dir():
        if required:
            raise UserError(
                f"data folder {data_dir!r} does not exist: give --data DIR with your QA files, "
                "or --seq N to solve at a fixed sequence length"
            )
        echo(
            f"note: no data folder at {data_dir!r}: solving at the config's max_sequence_length "
            f"{ctx.cfg.max_sequence_length} (give --data DIR to size it from your data's p99)"
        )
        return None
    return data_length_stats(ctx)


def quantizations(req: SolveRequest, explicit: bool) -> tuple[str, ...]:
    """The base-weight precisions to try in order (the first that fits wins): the config's when the user wrote it,
    else the model's order (catalog.Architecture.quantization_order: bf16 first for the Qwen3.5/3.6 hybrids)."""
    if explicit:
        return (req.ctx.cfg.quantization,)
    return req.ctx.architecture.quantization_order


def _quantization_reason(req: SolveRequest, tried: list[str]) -> str:
    cfg = req.ctx.cfg
    if not tried:
        return (
            f"Quantization {cfg.quantization!r}: {cfg.model_name}'s first choice (bf16 LoRA for the Qwen3.5/3.6 "
            "hybrids, whose 4-bit quantization error is larger than usual); set quantization to choose another."
        )
    return (
        f"Quantization {cfg.quantization!r} because nothing fit before it ({'; '.join(tried)}); bf16 LoRA is "
        f"{cfg.model_name}'s first choice."
    )


def _solve_once(
    req: SolveRequest, budget: Budget, source: str, why: str, init: str, probe_doc: dict, device, echo: Echo
) -> tuple[SolveResult, TrialRunner | None, str, str | None]:
    """One solve at the request's config: FSDP's plan from the estimate, or the measured trials. Returns the
    result, the trial runner (None for a plan), the device type and the compute dtype the trials ran in."""
    import torch

    from autotune.modeling import compute_dtype
    from autotune.trial import TrialRunner

    cfg = req.ctx.cfg
    ranks = f", {req.world_size} ranks ({why})" if req.world_size > 1 else ""
    if req.strategy == "fsdp":
        echo(
            f"planning {cfg.model_name} ({cfg.quantization}) for FSDP over {req.world_size} GPUs within "
            f"{budget.describe()} per rank ({source}){ranks}: from the estimate, without trials"
        )
        result = plan_from_estimate(req, budget)
        # The plan is for GPUs (FSDP trains on nothing else): their compute dtype, this one's if it has one.
        planned = compute_dtype(cfg, device) if device.type == "cuda" else (torch.bfloat16 if cfg.bf16 else None)
        dtype: str | None = str(planned or (torch.float16 if cfg.fp16 else torch.float32)).removeprefix("torch.")
        echo("  " + result.best.describe(budget.total_bytes))
        return result, None, "cuda", dtype
    runner = TrialRunner(
        req.ctx,
        budget,
        init=init,
        device=device,
        world_size=req.world_size,
        host_ram_bytes=(probe_doc.get("host") or {}).get("ram_available_bytes"),
        samples=req.samples,
    )
    kernel = f", Gated DeltaNet on {delta_kernel(runner.device_type)}" if req.ctx.architecture.is_hybrid else ""
    echo(
        f"solving {cfg.model_name} ({cfg.quantization}{kernel}) on {runner.device_type} within {budget.describe()} "
        f"({source}), objective {req.objective}{ranks}"
    )
    try:
        result = solve(req, runner, on_trial=lambda t: echo("  " + t.describe(budget.total_bytes)))
    except NothingFits:
        runner.release()
        raise
    return result, runner, runner.device_type, runner.dtype


def run_solve(
    req: SolveRequest,
    *,
    max_memory_gb: float | None,
    budget_explicit: bool,
    quantization_explicit: bool,
    margin: float,
    data_required: bool,
    output: str | None,
    init: str,
    plot: bool,
    echo: Echo,
) -> tuple[dict, Path]:
    """`autotune solve`: probe, budget, data statistics, the trials, then the profile, written atomically
    (and its plot). Returns the profile and where it was written. `quantization_explicit`: the user wrote the
    config's quantization (else the model's order is tried, `quantizations`)."""
    from autotune.hardware import probe, training_gpu
    from autotune.modeling import pick_device
    from autotune.profile import hardware_fingerprint, save_profile
    from autotune.step import check_training_settings

    started = time.monotonic()
    cfg = req.ctx.cfg
    check_training_settings(cfg)
    req.share  # noqa: B018 - the effective batch splits over the ranks, or a UserError says why not
    probe_doc = probe(cfg.output_dir)
    budget, source = budget_for(max_memory_gb, cfg, budget_explicit, probe_doc, margin, gpus=req.world_size)
    if output:
        check_writable(output)
    if req.data_stats is None:
        req = replace(req, data_stats=data_stats_for(req.ctx, required=data_required, echo=echo))
    device = pick_device()
    if device.type == "cuda" and (liger := liger_problem()):
        echo(f"note: {liger}")
    strategy, why = choose_strategy(req, budget, request_seq(req)[0], device.type)
    req = replace(req, strategy=strategy)
    order, tried = quantizations(req, quantization_explicit), []
    for quantization in order:
        if quantization != cfg.quantization:
            cfg = replace(cfg, quantization=quantization)
            req = replace(req, ctx=RunContext(cfg))
        try:
            result, runner, device_type, dtype = _solve_once(req, budget, source, why, init, probe_doc, device, echo)
            break
        except NothingFits as exc:
            if quantization == order[-1]:
                raise
            tried.append(f"quantization {quantization!r}: {exc}")
            echo(f"note: nothing fits with quantization {quantization!r}; trying the next the model allows")
    profile = profile_from_solve(
        req,
        result,
        hardware=hardware_fingerprint(probe_doc, device_type),
        init=runner.init if runner else init,
        dtype=dtype,
        device_type=device_type,
    )
    profile["constraints"]["strategy_reason"] = why
    if len(order) > 1:
        profile["reason"] += " " + _quantization_reason(req, tried)
    profile["solve_seconds"] = round(time.monotonic() - started, 2)
    profile["model_build_seconds"] = round(runner.build_seconds, 2) if runner else 0.0
    if runner is not None:
        runner.release()
    gpu = training_gpu(probe_doc) if device_type == "cuda" else None
    path = (
        Path(output)
        if output
        else default_profile_path(
            gpu["name"] if gpu else None, cfg.model_name, budget.gb, world_size=req.world_size, strategy=strategy
        )
    )
    save_profile(profile, path)
    if plot:
        from autotune.plot import plot_profile

        echo(f"plot: {plot_profile(profile, str(path).removesuffix('.json') + '.png')}")
    return profile, path
