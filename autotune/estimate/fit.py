"""What fits: the estimate inverted (the largest micro-batch, the longest sequence), the strategy for several
ranks, and `autotune estimate`'s report."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import replace

from autotune.batching import BatchPlan
from autotune.catalog import Architecture, ModelSpec
from autotune.errors import UserError
from autotune.estimate.peak import Estimate, calibration, error_band, estimate
from autotune.estimate.run import load_terms, plan_run
from autotune.estimate.shape import StepShape, shape_for, shape_of
from autotune.techniques import Knobs, as_config_values, open_values, valid_combinations
from autotune.units import Budget, GiB


def safe_limit(budget: Budget, device: str) -> int:
    """The bytes a shape's estimate may reach and count as fitting: the budget's usable part (less its margin),
    and on a GPU kept to the safe side of the error band measured on the trials on record: where the estimate has
    come out as much as x% low, a shape fits only if its estimate does x% better."""
    limit = budget.usable_bytes
    band = error_band() if device != "cpu" else None
    if band and band[0] < 0:
        limit = int(limit * (1 + band[0]))
    return limit


def fit(shape: StepShape, budget: Budget, *, max_batch: int = 4096, max_seq: int | None = None) -> dict:
    """The biggest shapes like `shape` predicted to fit the budget (safe_limit), loading included: a model whose
    load phase is over the limit fits nothing (run.load_terms).

    "batch": the largest micro-batch at shape.seq; "seq": the longest sequence at shape.batch, capped at max_seq or
    the model's max_position_embeddings; 0 means not even the smallest fits (or, for a bound of 0, not asked). The peak grows with batch and seq, so
    a doubling search then bisection takes ~2 log2(limit) estimates (milliseconds)."""
    limit = safe_limit(budget, shape.device)
    # Loading does not grow with the batch or the sequence: a model that cannot load fits no shape (run.py).
    load = sum(load_terms(shape).values())

    def fits(batch: int, seq: int) -> bool:
        return load <= limit and estimate(replace(shape, batch=batch, seq=seq)).peak_bytes <= limit

    return {
        "batch": _largest(lambda b: fits(b, shape.seq), max_batch),
        "seq": _largest(
            lambda s: fits(shape.batch, s), shape.arch.max_position_embeddings if max_seq is None else max_seq
        ),
        "at_seq": shape.seq,
        "at_batch": shape.batch,
        "budget_bytes": budget.total_bytes,
        "limit_bytes": limit,
        "load_bytes": load,
        "margin": budget.margin,
    }


def largest_fitting(
    arch: Architecture,
    budget: Budget,
    *,
    seq: int | None = None,
    batch: int | None = None,
    rank: int,
    max_batch: int = 4096,
    max_seq: int | None = None,
    **options,
) -> dict:
    """fit() of the shape these keywords describe (shape.shape_of); "batch" is None when no `seq` is given, and the
    longest sequence is at micro-batch `batch` (default 1)."""
    shape = shape_of(arch, batch=batch or 1, seq=seq or 1, rank=rank, **options)
    found = fit(shape, budget, max_batch=max_batch if seq is not None else 0, max_seq=max_seq)
    found.update(batch=None if seq is None else found["batch"], at_seq=seq)
    return found


def _largest(fits: Callable[[int], bool], cap: int) -> int:
    """The largest n in [1, cap] with fits(n), for a monotone fits; 0 if fits(1) is False."""
    if cap < 1 or not fits(1):
        return 0
    lo = 1
    while lo < cap and fits(min(2 * lo, cap)):
        lo = min(2 * lo, cap)
    if lo == cap:
        return cap
    hi = min(2 * lo, cap)  # fits(lo) and not fits(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def strategy_for(shape: StepShape, budget: Budget) -> tuple[str, str]:
    """`--strategy auto` for shape.world_size ranks: DDP when a rank holds the whole model and one sample of
    shape.seq tokens within the budget (DDP communicates least: one gradient all-reduce per step), else FSDP (each
    rank holds 1/N of the model). Returns the strategy and why."""
    if shape.world_size <= 1:
        return "ddp", "one process: nothing to shard"
    ddp = estimate(replace(shape, batch=1, strategy="ddp"))
    seq = shape.seq
    if ddp.peak_bytes <= budget.usable_bytes:
        return "ddp", (
            f"auto: DDP, every rank holds the whole model (estimated {ddp.peak_gib:.2f} GiB per rank at batch 1 x "
            f"seq {seq}, within {budget.describe()})"
        )
    return "fsdp", (
        f"auto: FSDP, DDP would need {ddp.peak_gib:.2f} GiB per rank at batch 1 x seq {seq}, over "
        f"{budget.describe()}; FSDP shards the model over {shape.world_size} ranks"
    )


def pick_strategy(
    arch: Architecture, budget: Budget, *, world_size: int, seq: int, rank: int, **options
) -> tuple[str, str]:
    """strategy_for() of the shape these keywords describe."""
    return strategy_for(shape_of(arch, batch=1, seq=seq, rank=rank, world_size=world_size, **options), budget)


def plan_techniques(shape: StepShape, budget: Budget, candidates: Iterable[Knobs]) -> tuple[StepShape, str]:
    """The shape with the techniques its run needs to fit the budget (the whole run's peak within the usable
    budget, the verdict `autotune estimate` prints): its own knobs when they fit; else, of the candidate
    combinations (techniques.valid_combinations of what the config leaves on "auto"), the fastest that fits on the
    safe side of the error band (the rows' speed priors, as solve ranks what it measures first; of equally fast
    ones the fewest changes), and where none does, the leanest that fits at all (the most room within the error).
    Returns the shape and why it changed ("" when it did not, or when no candidate fits either: the report then
    says what does not fit)."""
    own = plan_run(shape).peak_bytes
    if own <= budget.usable_bytes:
        return shape, ""
    device = shape.device

    def changes(knobs: Knobs) -> int:
        return sum(a != b for a, b in zip(knobs.lean_key(), shape.knobs.lean_key(), strict=True))

    fitting = []
    for knobs in candidates:
        planned = replace(shape, knobs=knobs)
        peak = plan_run(planned).peak_bytes
        if planned.knobs != shape.knobs and peak <= budget.usable_bytes:
            fitting.append((peak, planned))
    if not fitting:
        return shape, ""
    limit = safe_limit(budget, shape.device)
    safe = [planned for peak, planned in fitting if peak <= limit]
    if safe:
        planned = min(safe, key=lambda p: (-p.knobs.speed(device), changes(p.knobs)))
        why = "the fastest combination predicted to fit, as solve would measure first"
    else:
        planned = min(fitting, key=lambda f: (f[0], -f[1].knobs.speed(device), changes(f[1].knobs)))[1]
        why = "the leanest combination, the one with the most room: none fits on the safe side of the error band"
    on = [t.key for t in planned.knobs.on() if not getattr(shape.knobs, t.key)]
    off = [t.key for t in shape.knobs.on() if not getattr(planned.knobs, t.key)]
    if planned.knobs.checkpointing != shape.knobs.checkpointing:
        (on if planned.knobs.checkpointing else off).append("gradient_checkpointing")
    switched = "; ".join(
        part for part in (f"on {', '.join(on)}" if on else "", f"off {', '.join(off)}" if off else "") if part
    )
    return planned, (
        f"the config's techniques are predicted not to fit ({own / GiB:.2f} GiB at micro-batch {shape.batch}): "
        f'"auto" switches {switched}, {why}'
    )


def _with_every_technique(shape: StepShape, budget: Budget, found: dict) -> dict | None:
    """What every memory technique the model and strategy take would buy over the shape's own: its answers and the
    config values that switch them on; None when they would buy nothing (the same largest batch and sequence, and
    the same verdict on the shape itself)."""
    lean = shape.knobs.leanest(
        arch=shape.arch, strategy=shape.strategy, world_size=shape.world_size, targets=shape.target_modules
    )
    if lean == shape.knobs:
        return None
    better = fit(replace(shape, knobs=lean), budget)
    plan = plan_run(replace(shape, knobs=lean))
    fits = plan.peak_bytes <= budget.usable_bytes
    if (better["batch"], better["seq"]) == (found["batch"], found["seq"]) and fits == found["fits"]:
        return None
    values: dict[str, str | bool] = {t.key: "on" for t in lean.on() if not getattr(shape.knobs, t.key)}
    if lean.checkpointing and not shape.knobs.checkpointing:
        values["gradient_checkpointing"] = True
    return {
        "set": values,
        "peak_bytes": plan.peak_bytes,
        "peak_gb": round(plan.peak_bytes / GiB, 3),
        "fits": fits,
        "largest_batch_at_seq": better["batch"],
        "largest_seq_at_batch": better["seq"],
    }


def report(
    model: str, shape: StepShape, budget: Budget | None = None, *, host_ram_bytes: int | None = None
) -> tuple[Estimate, dict]:
    """`autotune estimate`: the estimate of one shape of a run, and a JSON-able report of it: the step by
    component, then the whole run (each phase's peak, the host memory); with a budget, whether the run fits (its
    largest phase) and the largest batch and sequence predicted to fit; with `host_ram_bytes`, whether the host
    holds it. With world_size > 1 every figure is one rank's (`batch` its micro-batch, `budget` its card: the
    smallest)."""
    run = plan_run(shape)
    est = run.step
    doc = {
        "model": model,
        "world_size": shape.world_size,
        "strategy": shape.strategy,
        "per_rank": shape.world_size > 1,
        "shape": est.shape,
        "peak_bytes": est.peak_bytes,
        "peak_gb": round(est.peak_gib, 3),
        "phase": est.phase,
        "components_gb": {k: round(v / GiB, 3) for k, v in est.components.items()},
        "run": run.to_dict(),
        "phases_gb": {k: round(v / GiB, 3) for k, v in run.phases.items()},
        "host_gb": round(run.host_bytes / GiB, 3),
        "export_host_gb": round(run.export_host_bytes / GiB, 3),
        "techniques": as_config_values(shape.knobs),
    }
    if host_ram_bytes is not None:
        doc.update(host_ram_gb=round(host_ram_bytes / GiB, 3), host_fits=run.host_bytes <= host_ram_bytes)
    if budget is not None:
        found = fit(shape, budget)
        found["fits"] = run.peak_bytes <= budget.usable_bytes
        doc.update(
            max_memory_gb=budget.gb,
            margin=budget.margin,
            fits=found["fits"],
            largest_batch_at_seq=found["batch"],
            largest_seq_at_batch=found["seq"],
        )
        doc["with_every_technique"] = _with_every_technique(shape, budget, found)
    band = error_band() if shape.device != "cpu" else None
    if band:
        doc["error_band"] = {"low": band[0], "high": band[1], "trials": calibration().get("trials")}
    return est, doc


def answer(
    cfg,
    spec: ModelSpec,
    budget: Budget | None,
    *,
    device: str = "cuda",
    gpus: int = 1,
    host_ram_bytes: int | None = None,
    plan_batch: bool = False,
) -> tuple[Estimate, dict, StepShape]:
    """`autotune estimate`'s answer for a config (an autotune.config.Config), the command's and the Python API's
    alike: the shape of one rank's step, planned where the config leaves it open, then report() of it.

    With a budget: the strategy `auto` resolved (strategy_for), and the techniques left on "auto" planned where the
    config's own are predicted not to fit (plan_techniques: at the config's micro-batch, or with `plan_batch` at
    micro-batch 1); with `plan_batch` too, the config's micro-batch if it fits, else the largest that does (on the
    safe side of the error band), accumulation keeping the effective batch (the one batch plan, as solve does).
    Each choice made says why in the report ("strategy_reason", "techniques_reason", "batch_reason")."""
    shape = shape_for(
        cfg,
        spec.architecture,
        batch=cfg.batch_size,
        seq=cfg.max_sequence_length,
        rank=cfg.lora_r,
        device=device,
        world_size=gpus,
    )
    strategy, reasons = cfg.distributed_strategy, {}
    if strategy == "auto":
        strategy = "ddp"
        if budget is not None and gpus > 1:
            strategy, reasons["strategy_reason"] = strategy_for(shape, budget)
    shape = replace(shape, strategy=strategy)
    if budget is not None:
        allowed = open_values(cfg, spec, checkpointing="on" if cfg.gradient_checkpointing else "off")
        candidates = valid_combinations(allowed, spec, strategy, gpus, cfg.target_modules)
        planned, reasons["techniques_reason"] = plan_techniques(
            replace(shape, batch=1) if plan_batch else shape, budget, candidates
        )
        shape = replace(shape, knobs=planned.knobs)
    if budget is not None and plan_batch:
        largest = fit(shape, budget, max_batch=shape.batch)["batch"]
        if 0 < largest < shape.batch:
            try:
                plan = BatchPlan.largest(cfg.effective_batch, gpus, largest)
                micro, kept = plan.micro, plan.describe()
            except UserError:  # an effective batch the ranks cannot share: train says so; here, the largest
                micro, kept = largest, f"micro-batch {largest}"
            reasons["batch_reason"] = f"the config's micro-batch {shape.batch} is predicted not to fit: {kept}"
            shape = replace(shape, batch=micro)
    est, doc = report(spec.name, shape, budget, host_ram_bytes=host_ram_bytes)
    doc.update((key, why) for key, why in reasons.items() if why)
    return est, doc, shape
