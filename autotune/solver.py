"""`autotune solve`: choose micro-batch, accumulation, sequence length and LoRA rank by measured trials.

The search decides which trials to run; trial.py runs them (as Lightning's batch-size tuner keeps its search
apart from its trial). A linear memory model fitted from two measured trials predicts the largest
micro-batch, one trial verifies it, and the search bisects only where the prediction misses. It knows
nothing of models or GPUs, only of a `Trials` object: a budget and a `measure(batch, seq, rank)`.
"""

from __future__ import annotations

import functools
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

from autotune.config import Config
from autotune.context import RunContext
from autotune.errors import UserError
from autotune.trial import Trial
from autotune.units import DEFAULT_MARGIN, Budget, GiB

Measure = Callable[[int, int, int], Trial]


class Trials(Protocol):
    """What the search needs of a trial runner: trial.TrialRunner, or a synthetic memory curve in tests."""

    @property
    def budget(self) -> Budget: ...

    @property
    def device_type(self) -> str: ...

    def measure(self, batch: int, seq: int, rank: int, *, checkpointing: bool | None = None) -> Trial: ...


# ------------------------------------------------------------------------------ the search


@dataclass
class LinearMemoryModel:
    """peak ~ fixed + per_token * batch * seq, for one rank and sequence length."""

    fixed: float
    per_token: float

    @classmethod
    def through(cls, a: tuple[int, int], b: tuple[int, int]) -> LinearMemoryModel:
        """The line through two (tokens per micro-batch, peak bytes) points, rising at least a byte a token."""
        (ta, pa), (tb, pb) = a, b
        slope = max((pb - pa) / (tb - ta) if tb != ta else 0.0, 1.0)
        return cls(pa - slope * ta, slope)

    def predict(self, batch: int, seq: int) -> int:
        return int(self.fixed + self.per_token * batch * seq)

    def largest_batch(self, seq: int, usable: int) -> int:
        return max(0, math.floor((usable - self.fixed) / (self.per_token * seq)))


class TrialBudgetExceeded(Exception):
    """The search ran out of trials or time; it keeps what it measured."""


@dataclass
class SearchLog:
    trials: list[Trial] = field(default_factory=list)
    max_trials: int | None = None
    deadline: float | None = None
    on_trial: Callable[[Trial], None] | None = None
    variant: object = None  # what else distinguishes the shapes being searched now (e.g. checkpointing)
    _cache: dict = field(default_factory=dict)

    def run(self, measure: Measure, batch: int, seq: int, rank: int, predicted: int | None = None) -> Trial:
        key = (batch, seq, rank, self.variant)
        if key in self._cache:
            return self._cache[key]
        if self.max_trials is not None and len(self.trials) >= self.max_trials:
            raise TrialBudgetExceeded(f"--max-trials {self.max_trials} reached")
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise TrialBudgetExceeded("--time-budget reached")
        trial = measure(batch, seq, rank)
        trial.predicted_bytes = predicted
        self.trials.append(trial)
        self._cache[key] = trial
        if self.on_trial:
            self.on_trial(trial)
        return trial


# Peaks of one shape repeat within this fraction of the usable budget (the CPU meter counts bytes exactly;
# CUDA's allocator rounds to pages of a few MiB). A prediction confirmed this closely is trusted one batch on.
NOISE_TOLERANCE = 0.005


def largest_batch(
    measure: Measure,
    log: SearchLog,
    seq: int,
    rank: int,
    usable: int,
    *,
    first_guess: int = 2,
    upper: int = 4096,
    tolerance: float | None = NOISE_TOLERANCE,
) -> tuple[int, LinearMemoryModel | None]:
    """The largest micro-batch in 1..upper at (seq, rank) whose measured peak fits `usable` bytes; 0 if none does.

    Batch 1 and `first_guess` fit the memory model; the next trial goes where the model puts the largest
    fitting batch (refitted after every trial to the two measured trials nearest the boundary). A prediction
    that fits, measures within `tolerance` x usable of what was predicted and puts batch+1 over the budget by
    more than that is taken as is; otherwise batch+1 is measured too (`tolerance=None`: always). After two
    misses in a row (a nonlinearity) one bisection step (doubling while nothing has failed) follows, so the
    search stays logarithmic however wrong the model is. Nothing above `upper` is ever tried.
    """
    upper = max(1, upper)
    one = log.run(measure, 1, seq, rank)
    if not one.fits:
        return 0, None
    measured = {1: one}
    lo, hi = 1, None  # lo fits; hi, once known, does not
    batch, expected, predicted, misses = max(2, min(first_guess, upper)), None, None, 0
    model = None
    while lo < upper and (hi is None or hi - lo > 1):
        trial = log.run(measure, batch, seq, rank, predicted)
        measured[batch] = trial
        if trial.fits:
            lo = batch
        else:
            hi = batch
        model = _local_model(measured, lo, hi)
        nxt = model.largest_batch(seq, usable) if model else None
        if expected is not None:  # this trial tested a prediction
            slack = None if tolerance is None else tolerance * usable
            if (
                trial.fits
                and trial.peak_bytes is not None
                and model is not None
                and nxt is not None
                and nxt <= batch
                and slack is not None
                and abs(trial.peak_bytes - (predicted or 0)) <= slack
                and model.predict(batch + 1, seq) > usable + slack
            ):
                return batch, model  # measured where predicted, and batch+1 is clearly over
            missed = trial.fits != expected or (trial.fits and nxt is not None and nxt > batch)
            misses = misses + 1 if missed else 0
        limit = upper if hi is None else hi - 1
        if model is None or nxt is None or misses >= 2:  # no usable model, or it keeps missing: bisect
            batch = (lo + hi) // 2 if hi is not None else min(upper, 2 * lo)
            expected, predicted, misses = None, None, 0
        else:
            batch = min(max(nxt, lo + 1), limit)
            expected, predicted = nxt >= batch, model.predict(batch, seq)
    return lo, model


def _local_model(measured: dict[int, Trial], lo: int, hi: int | None) -> LinearMemoryModel | None:
    """The line through the measured peaks nearest the boundary: lo's and hi's (when hi ran with a peak,
    over the margin but under the cap), else lo's and the nearest fitting batch below it. None when there
    is no second point or the peak does not grow with the batch (the model would predict no limit)."""
    points = {k: (t.batch * t.seq, t.peak_bytes) for k, t in measured.items() if t.peak_bytes is not None}
    a = points.get(lo)
    b = points.get(hi) if hi is not None else None
    if a is None:
        return None
    if b is None:
        below = [k for k in points if k < lo]
        if not below:
            return None
        a, b = points[max(below)], a
    if b[1] <= a[1]:
        return None
    return LinearMemoryModel.through(a, b)


def divisors_up_to(n: int, limit: int) -> list[int]:
    return [d for d in range(1, min(n, limit) + 1) if n % d == 0]


def largest_seq(measure: Measure, log: SearchLog, rank: int, lo: int, hi: int, step: int = 64) -> int:
    """The longest sequence (a multiple of `step`) that fits at batch 1; 0 if `lo` does not."""
    if not log.run(measure, 1, lo, rank).fits:
        return 0
    if log.run(measure, 1, hi, rank).fits:
        return hi
    lo_u, hi_u = lo // step, -(-hi // step)  # hi_u * step >= hi: every multiple below hi stays a candidate
    while hi_u - lo_u > 1:
        mid = (lo_u + hi_u) // 2
        if log.run(measure, 1, mid * step, rank).fits:
            lo_u = mid
        else:
            hi_u = mid
    return max(lo, lo_u * step)


# ----------------------------------------------------------------------- choosing the sequence


def choose_seq(
    stats: dict | None,
    *,
    fixed: int | None,
    fallback: int,
    max_position: int,
    multiple: int = 8,
    percentile: str = "p99",
) -> tuple[int, str]:
    """The sequence length to solve at, and why."""
    clamp = f", clamped to the model's max_position_embeddings {max_position}"
    if fixed:
        return min(fixed, max_position), f"fixed at {fixed} by the user" + (clamp if fixed > max_position else "")
    if stats and stats.get("count"):
        need = stats["total"][percentile]
        rounded = max(multiple, -(-need // multiple) * multiple)
        return min(max_position, rounded), (
            f"covers the data's {percentile} length of {need} tokens (max {stats['total']['max']}, "
            f"{stats['count']} samples), rounded up to a multiple of {multiple}"
            + (clamp if rounded > max_position else "")
        )
    return min(fallback, max_position), (
        f"no data statistics: the config's max_sequence_length {fallback}" + (clamp if fallback > max_position else "")
    )


# -------------------------------------------------------------------------------- the solve


@dataclass
class SolveRequest:
    ctx: RunContext
    objective: str = "throughput"  # throughput | max-seq | max-rank
    seq: int | None = None  # fixed sequence length
    ranks: list[int] | None = None  # candidates; None: the config's lora_r
    max_trials: int | None = None
    time_budget_s: float | None = None
    world_size: int = 1
    data_stats: dict | None = None
    max_seq: int | None = None  # upper bound for max-seq
    # Throughput only: also search without gradient checkpointing (faster when it fits).
    try_without_checkpointing: bool = False


@dataclass
class _Found:
    """The largest fitting micro-batch per rank, with and without gradient checkpointing."""

    batch: dict[int, int] = field(default_factory=dict)
    without_checkpointing: dict[int, int] = field(default_factory=dict)


def solve(req: SolveRequest, trials: Trials, *, on_trial: Callable[[Trial], None] | None = None) -> dict:
    """Run the search against `trials` (its budget, its measure); returns the choice, the runner-up, the
    reason and every trial."""
    cfg = req.ctx.cfg
    log = SearchLog(
        max_trials=req.max_trials,
        on_trial=on_trial,
        deadline=time.monotonic() + req.time_budget_s if req.time_budget_s else None,
    )
    max_pos = req.ctx.architecture.max_position_embeddings
    seq, seq_reason = choose_seq(req.data_stats, fixed=req.seq, fallback=cfg.max_sequence_length, max_position=max_pos)
    ranks = sorted(set(req.ranks or [cfg.lora_r]))
    per_device_effective = max(1, cfg.effective_batch // req.world_size)
    found, stopped = _Found(), None
    try:
        if req.objective == "max-seq":
            seq, seq_reason = _search_max_seq(req, trials, log, ranks[-1], seq, found)
        elif req.objective == "max-rank":
            _search_max_rank(trials, log, ranks, seq, per_device_effective, found)
        else:
            _search_throughput(req, trials, log, ranks, seq, per_device_effective, found)
    except TrialBudgetExceeded as exc:
        stopped = str(exc)
    if not any(t.fits for t in log.trials):
        raise _nothing_fits(req, trials.budget, seq, ranks[0], log.trials, stopped)
    candidates = _candidates(req, log.trials, seq, per_device_effective)
    best, runner_up = candidates[0], (candidates[1] if len(candidates) > 1 else None)
    accumulation = math.ceil(cfg.effective_batch / (best.batch * req.world_size))
    return {
        "best": best,
        "runner_up": runner_up,
        "accumulation": accumulation,
        "effective": cfg.effective_batch,
        "max_feasible_batch": found.batch,
        "max_feasible_batch_without_checkpointing": found.without_checkpointing,
        "trials": log.trials,
        "seq": best.seq,
        "seq_reason": seq_reason,
        "reason": _reason(req, best, runner_up, found, seq_reason, accumulation, stopped),
        "stopped": stopped,
        "budget_bytes": trials.budget.total_bytes,
        "usable_bytes": trials.budget.usable_bytes,
        "margin": trials.budget.margin,
    }


def _search_max_seq(
    req: SolveRequest, trials: Trials, log: SearchLog, rank: int, seq: int, found: _Found
) -> tuple[int, str]:
    max_pos = req.ctx.architecture.max_position_embeddings
    upper = min(max_pos, req.max_seq or max_pos)
    lo = min(seq, upper)
    longest = largest_seq(trials.measure, log, rank, lo=lo, hi=upper)
    found.batch[rank] = 1 if longest else 0
    # Nothing fits: the error names the shortest sequence tried.
    return longest or lo, f"the longest sequence that fits at batch 1 (searched {lo}..{upper})"


def _search_max_rank(
    trials: Trials, log: SearchLog, ranks: list[int], seq: int, per_device_effective: int, found: _Found
) -> None:
    for rank in ranks:
        b = largest_batch(trials.measure, log, seq, rank, trials.budget.usable_bytes, first_guess=2)[0]
        found.batch[rank] = b
        if b == 0:
            break
        _measure_divisor(trials.measure, log, seq, rank, b, per_device_effective)


def _search_throughput(
    req: SolveRequest,
    trials: Trials,
    log: SearchLog,
    ranks: list[int],
    seq: int,
    per_device_effective: int,
    found: _Found,
) -> None:
    usable = trials.budget.usable_bytes
    for rank in ranks:
        # Nothing above the per-device effective batch can be chosen, so nothing above it is tried.
        guess = _first_guess(req, trials, seq, rank)
        found.batch[rank], _ = largest_batch(
            trials.measure, log, seq, rank, usable, first_guess=guess, upper=per_device_effective
        )
        _measure_divisor(trials.measure, log, seq, rank, found.batch[rank], per_device_effective)
    if not (req.try_without_checkpointing and req.ctx.cfg.gradient_checkpointing):
        return
    # Checkpointing trades ~a third more compute for activation memory; where the memory allows a useful
    # batch without it, that is usually the faster run. Measure, don't assume.
    log.variant = "no-checkpointing"
    measure_off: Measure = functools.partial(trials.measure, checkpointing=False)
    for rank in ranks:
        found.without_checkpointing[rank], _ = largest_batch(
            measure_off, log, seq, rank, usable, upper=per_device_effective
        )
        _measure_divisor(measure_off, log, seq, rank, found.without_checkpointing[rank], per_device_effective)


def _nothing_fits(
    req: SolveRequest, budget: Budget, seq: int, rank: int, trials: list[Trial], stopped: str | None
) -> UserError:
    cfg = req.ctx.cfg
    return UserError(
        f"nothing fits in {budget.describe()} for {cfg.model_name} at sequence {seq}, rank {rank}: "
        f"{len(trials)} trial(s), smallest peak {_smallest_peak(trials)}. Lower max_sequence_length or lora_r, "
        + ("" if cfg.quantization == "4bit" else 'use quantization "4bit", ')
        + "or a smaller model"
        + (f" ({stopped})" if stopped else "")
    )


def _measure_divisor(
    measure: Measure, log: SearchLog, seq: int, rank: int, largest: int, per_device_effective: int
) -> None:
    """Measure the largest micro-batch up to `largest` that divides the effective batch (the search may not
    have), so the choice can keep accumulation x micro-batch exactly the effective batch."""
    if largest > 0:
        log.run(measure, divisors_up_to(per_device_effective, largest)[-1], seq, rank)


def _first_guess(req: SolveRequest, trials: Trials, seq: int, rank: int) -> int:
    """Where the second trial goes: half the batch the analytic estimate predicts, so the fitted
    line spans a wide range (a short lever arm magnifies measurement noise)."""
    from autotune.estimate import largest_fitting, options_for

    try:
        pred = largest_fitting(
            req.ctx.architecture,
            trials.budget,
            seq=seq,
            rank=rank,
            **options_for(req.ctx.cfg, trials.device_type),
        )
    except (ValueError, UserError):  # the estimate only places a trial; the measurements decide
        return 2
    return max(2, int(pred.get("batch") or 0) // 2)


def _smallest_peak(trials: list[Trial]) -> str:
    peaks = [t.peak_bytes for t in trials if t.peak_bytes]
    return f"{min(peaks) / GiB:.2f} GiB" if peaks else "unknown (every trial ran out of memory)"


def _candidates(req: SolveRequest, trials: list[Trial], seq: int, per_device_effective: int) -> list[Trial]:
    """Fitting trials ranked by the objective. For throughput only micro-batches that divide the
    effective batch qualify, so accumulation x batch is exactly the effective batch."""
    fitting = [t for t in trials if t.fits]
    if req.objective == "max-seq":
        return sorted(fitting, key=lambda t: (t.seq, t.tokens_per_second or 0), reverse=True)
    if req.objective == "max-rank":
        return sorted(
            fitting,
            key=lambda t: (
                t.rank,
                t.seq == seq,
                per_device_effective % t.batch == 0,
                t.batch,
                t.tokens_per_second or 0,
            ),
            reverse=True,
        )
    exact = [t for t in fitting if per_device_effective % t.batch == 0 and t.seq == seq]
    pool = exact or fitting
    return sorted(pool, key=lambda t: (t.tokens_per_second or 0, t.batch), reverse=True)


def _reason(
    req: SolveRequest,
    best: Trial,
    runner_up: Trial | None,
    found: _Found,
    seq_reason: str,
    accumulation: int,
    stopped: str | None,
) -> str:
    effective = req.ctx.cfg.effective_batch
    parts = [f"sequence {best.seq}: {seq_reason}."]
    for rank, b in sorted(found.batch.items()):
        parts.append(f"rank {rank}: the largest micro-batch that fits is {b}.")
    for rank, b in sorted(found.without_checkpointing.items()):
        parts.append(f"rank {rank} without gradient checkpointing: {b}.")
    if best.checkpointing is not None and found.without_checkpointing:
        parts.append(
            f"Gradient checkpointing {'on' if best.checkpointing else 'off'}: the faster of the two as measured."
        )
    objective = {
        "throughput": "the highest measured tokens/s",
        "max-seq": "the longest sequence",
        "max-rank": "the highest rank",
    }[req.objective]
    parts.append(
        f"Chose batch {best.batch} x accumulation {accumulation} (effective {best.batch * accumulation * req.world_size}"
        f", asked {effective}) at rank {best.rank} for {objective}"
        + (f": {best.tokens_per_second:.0f} tokens/s" if best.tokens_per_second else "")
        + "."
    )
    if best.batch * accumulation * req.world_size != effective:
        parts.append(f"No fitting micro-batch divides {effective}, so the effective batch rounds up.")
    if runner_up is not None:
        ckpt = {True: ", checkpointing on", False: ", checkpointing off", None: ""}[runner_up.checkpointing]
        parts.append(
            f"Runner-up: batch {runner_up.batch} at rank {runner_up.rank}, seq {runner_up.seq}{ckpt}"
            + (f" ({runner_up.tokens_per_second:.0f} tokens/s)" if runner_up.tokens_per_second else "")
            + "."
        )
    if stopped:
        parts.append(f"Search stopped early: {stopped}; the choice is the best measured so far.")
    return " ".join(parts)


# ------------------------------------------------------------------------ the command, end to end


def budget_for(
    flag_gb: float | None, cfg: Config, budget_explicit: bool, probe_doc: dict, margin: float
) -> tuple[Budget, str]:
    """The budget to solve within, and where it came from: the flag, else a max_memory_gb the user wrote,
    else the training GPU's free memory less the margin."""
    from autotune.hardware import training_gpu

    if flag_gb is not None:
        return Budget.from_gib(flag_gb, margin), "--max-memory-gb"
    if budget_explicit and cfg.max_memory_gb is not None:
        return Budget.from_gib(cfg.max_memory_gb, margin), "the config's max_memory_gb"
    gpu = training_gpu(probe_doc)
    if gpu is None or gpu.get("error"):
        raise UserError("no GPU to measure a budget on: give --max-memory-gb (on a CPU it sets a simulated card)")
    free = gpu["memory_free_gb"]
    gb = round(free * (1 - DEFAULT_MARGIN), 2)
    return Budget.from_gib(gb, margin), f"the {free:.1f} GiB free on GPU {gpu['index']} less {DEFAULT_MARGIN:.0%}"


def check_writable(path: str | Path) -> None:
    """Fail before a long solve, not after it, when the profile cannot be written where asked."""
    parent = Path(path).resolve().parent
    probe_dir = next((p for p in (parent, *parent.parents) if p.exists()), None)
    if probe_dir is None or not probe_dir.is_dir() or not os.access(probe_dir, os.W_OK):
        raise UserError(f"--output {path}: cannot write there ({probe_dir} is not a writable folder)")


def data_stats_for(ctx: RunContext, *, required: bool, echo: Callable[[str], None]) -> dict | None:
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


def run(
    req: SolveRequest,
    *,
    max_memory_gb: float | None,
    budget_explicit: bool,
    margin: float,
    data_required: bool,
    output: str | None,
    init: str,
    plot: bool,
    echo: Callable[[str], None],
) -> tuple[dict, Path]:
    """`autotune solve`: probe, budget, data statistics, the trials, then the profile, written atomically
    (and its plot). Returns the profile and where it was written."""
    from autotune.hardware import probe, training_gpu
    from autotune.profile import default_profile_path, hardware_fingerprint, profile_from_solve, save_profile
    from autotune.step import check_training_settings
    from autotune.trial import TrialRunner

    started = time.monotonic()
    cfg = req.ctx.cfg
    check_training_settings(cfg)
    probe_doc = probe(cfg.output_dir)
    budget, source = budget_for(max_memory_gb, cfg, budget_explicit, probe_doc, margin)
    if output:
        check_writable(output)
    if req.data_stats is None:
        req = replace(req, data_stats=data_stats_for(req.ctx, required=data_required, echo=echo))
    runner = TrialRunner(req.ctx, budget, init=init)
    echo(
        f"solving {cfg.model_name} ({cfg.quantization}) on {runner.device_type} within {budget.describe()} "
        f"({source}), objective {req.objective}"
    )
    result = solve(req, runner, on_trial=lambda t: echo("  " + t.describe(budget.total_bytes)))
    profile = profile_from_solve(
        req,
        result,
        hardware=hardware_fingerprint(probe_doc, runner.device_type),
        init=runner.init,
        dtype=runner.dtype,
        device_type=runner.device_type,
    )
    profile["solve_seconds"] = round(time.monotonic() - started, 2)
    profile["model_build_seconds"] = round(runner.build_seconds, 2)
    runner.release()
    gpu = training_gpu(probe_doc) if runner.device_type == "cuda" else None
    path = Path(output) if output else default_profile_path(gpu["name"] if gpu else None, cfg.model_name, budget.gb)
    save_profile(profile, path)
    if plot:
        from autotune.plot import plot_profile

        echo(f"plot: {plot_profile(profile, str(path).removesuffix('.json') + '.png')}")
    return profile, path
