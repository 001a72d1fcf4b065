"""`autotune solve`: choose micro-batch, accumulation, sequence length and LoRA rank by measured trials.

Two parts, kept apart (as Lightning's batch-size tuner keeps its search apart from its trial):
- `TrialRunner` runs one trial: the training step of step.py, for two optimizer steps at a
  worst-case shape, under a memory meter capped at the budget. It knows nothing of search.
- `search` decides which trials to run: a linear memory model fitted from two measured trials
  predicts the largest micro-batch, one trial verifies it, and it bisects only where the prediction
  misses. It knows nothing of models or GPUs, only of a `measure(batch, seq, rank)` function.
"""

from __future__ import annotations

import math
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from autotune.config import Config
from autotune.errors import UserError

GiB = 2**30
TRIAL_STEPS = 2  # the second optimizer step is the first to hold the optimizer state


@dataclass
class Trial:
    batch: int
    seq: int
    rank: int
    fits: bool  # ran, and its peak is inside the usable budget (budget less margin)
    oom: bool  # the step ran out of memory under the cap
    peak_bytes: int | None
    seconds: float  # wall time of the whole trial
    step_seconds: float | None  # the last optimizer step
    tokens_per_second: float | None
    predicted_bytes: int | None = None
    note: str = ""
    checkpointing: bool | None = None  # gradient checkpointing in this trial (None: as configured)

    def describe(self, budget: int) -> str:
        peak = f"{self.peak_bytes / GiB:7.3f} GiB ({self.peak_bytes / budget:5.1%})" if self.peak_bytes else "      -"
        verdict = "fits" if self.fits else ("OOM" if self.oom else "over margin")
        speed = f"{self.tokens_per_second:9.0f} tok/s" if self.tokens_per_second else ""
        ckpt = {True: " ckpt", False: " no-ckpt", None: ""}[self.checkpointing]
        return (
            f"batch {self.batch:4d} x seq {self.seq:6d}  r={self.rank:<4d}{ckpt} peak {peak}  {verdict:11s} "
            f"{self.seconds:6.1f}s {speed}"
        )


Measure = Callable[[int, int, int], Trial]


# ------------------------------------------------------------------------------ the search


@dataclass
class LinearMemoryModel:
    """peak ~ fixed + per_token * batch * seq, for one rank and sequence length."""

    fixed: float
    per_token: float

    @classmethod
    def fit(cls, a: Trial, b: Trial) -> LinearMemoryModel:
        ta, tb = a.batch * a.seq, b.batch * b.seq
        slope = (b.peak_bytes - a.peak_bytes) / (tb - ta) if tb != ta else 0.0
        slope = max(slope, 1.0)
        return cls(a.peak_bytes - slope * ta, slope)

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
                and nxt is not None
                and nxt <= batch
                and slack is not None
                and abs(trial.peak_bytes - predicted) <= slack
                and model.predict(batch + 1, seq) > usable + slack
            ):
                return batch, model  # measured where predicted, and batch+1 is clearly over
            missed = trial.fits != expected or (trial.fits and nxt is not None and nxt > batch)
            misses = misses + 1 if missed else 0
        limit = upper if hi is None else hi - 1
        if nxt is None or misses >= 2:  # no usable model, or it keeps missing: halve the gap (or double)
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
    a = measured[lo]
    b = measured.get(hi) if hi is not None else None
    if b is None or b.peak_bytes is None:
        below = [k for k, t in measured.items() if k < lo and t.peak_bytes is not None]
        if not below:
            return None
        a, b = measured[max(below)], a
    if b.peak_bytes <= a.peak_bytes:
        return None
    return LinearMemoryModel.fit(a, b)


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


# ------------------------------------------------------------------------------- the runner


class TrialRunner:
    """Builds the training model once per rank and measures trials on it under a capped meter."""

    def __init__(self, cfg: Config, budget_bytes: int, *, meter=None, init: str = "random", echo=print):
        from autotune.memory import make_meter
        from autotune.modeling import pick_device, quiet_libraries

        quiet_libraries()
        self.cfg = cfg
        self.budget = budget_bytes
        self.device = pick_device()
        self.meter = meter or make_meter(self.device.type)
        self.init = init
        self.echo = echo
        self._built = None
        self._rank = None
        self.build_seconds = 0.0
        self._overhead_remeasured = False
        # Trials save nothing, but the Trainer wants an output folder: keep it out of the user's tree.
        self.workdir = tempfile.mkdtemp(prefix="autotune-solve-")

    def _model_for(self, rank: int):
        if self._rank == rank:
            return self._built
        from autotune.modeling import build_model

        self._built = None
        self.meter.cleanup()
        t = time.perf_counter()
        self._built = build_model(self.cfg, init=self.init, lora_r=rank, device=self.device)
        self.build_seconds += time.perf_counter() - t
        self._rank = rank
        if self.meter.device == "cpu":
            self.meter.track_existing(self._built.model)
        return self._built

    def measure(
        self, batch: int, seq: int, rank: int, usable: int, checkpointing: bool | None = None, steps: int = TRIAL_STEPS
    ) -> Trial:
        """`steps` optimizer steps (>= 2) at batch x seq under the cap; the step time is the mean of the
        steps after the first (the first builds the optimizer state)."""
        import torch

        from autotune.data.encoding import CausalLMCollator
        from autotune.modeling import set_checkpointing
        from autotune.step import run_trial_steps

        built = self._model_for(rank)
        want = self.cfg.gradient_checkpointing if checkpointing is None else checkpointing
        set_checkpointing(built, want, self.cfg.gradient_checkpointing_kwargs)
        collator = CausalLMCollator(pad_token_id=0, pad_to_length=seq)
        t = time.perf_counter()
        peak, seconds, oom, note = None, None, False, ""
        self.meter.cap(self.budget)
        self.meter.reset_peak()
        try:
            with self.meter:
                seconds = run_trial_steps(
                    built, self.cfg, batch_size=batch, seq_len=seq, steps=steps, workdir=self.workdir, collator=collator
                )
            peak = self.meter.peak_bytes()
        except torch.OutOfMemoryError as exc:
            oom, note = True, str(exc).splitlines()[0][:300]
        finally:
            self.meter.cap(None)
            built.model.zero_grad(set_to_none=True)
            self.meter.cleanup()
        if seconds and not self._overhead_remeasured and hasattr(self.meter, "remeasure_overhead"):
            # The first real step loads kernels and library workspaces lazily: the CUDA context grows.
            # Measure it again once, and count the grown figure in this and every later peak.
            before = self.meter.overhead_bytes
            self._overhead_remeasured = True
            peak += self.meter.remeasure_overhead() - before
        steady = (seconds[1:] or seconds) if seconds else None
        step_s = sum(steady) / len(steady) if steady else None
        fits = not oom and peak is not None and peak <= usable
        return Trial(
            batch,
            seq,
            rank,
            fits,
            oom,
            peak,
            time.perf_counter() - t,
            step_s,
            (batch * seq / step_s) if step_s else None,
            note=note,
            checkpointing=want,
        )


# -------------------------------------------------------------------------------- the solve


@dataclass
class SolveRequest:
    cfg: Config
    budget_gb: float
    margin: float = 0.05
    objective: str = "throughput"  # throughput | max-seq | max-rank
    seq: int | None = None  # fixed sequence length
    ranks: list[int] | None = None  # candidates; None: the config's lora_r
    max_trials: int | None = None
    time_budget_s: float | None = None
    world_size: int = 1
    data_stats: dict | None = None
    max_seq: int | None = None  # upper bound for max-seq
    # Throughput only: also search without gradient checkpointing (faster when it fits). Needs a
    # measure that takes `checkpointing=`; TrialRunner.measure does.
    try_without_checkpointing: bool = False


def solve(req: SolveRequest, measure: Callable[[int, int, int, int], Trial], *, on_trial=None) -> dict:
    """Run the search; returns the choice, the runner-up, the reason and every trial.

    `measure(batch, seq, rank, usable_bytes)` runs one trial (TrialRunner.measure in real use).
    """
    cfg = req.cfg
    budget = int(req.budget_gb * GiB)
    usable = int(budget * (1 - req.margin))
    log = SearchLog(
        max_trials=req.max_trials,
        on_trial=on_trial,
        deadline=time.monotonic() + req.time_budget_s if req.time_budget_s else None,
    )
    m: Measure = lambda b, s, r: measure(b, s, r, usable)  # noqa: E731
    from autotune.catalog import resolve_model

    max_pos = resolve_model(cfg.model_name).architecture.max_position_embeddings
    seq, seq_reason = choose_seq(req.data_stats, fixed=req.seq, fallback=cfg.max_sequence_length, max_position=max_pos)
    ranks = sorted(set(req.ranks or [cfg.lora_r]))
    effective = cfg.effective_batch
    per_device_effective = max(1, effective // req.world_size)
    found: dict[int, int] = {}
    found_without_checkpointing: dict[int, int] = {}
    stopped = None
    try:
        if req.objective == "max-seq":
            rank = ranks[-1]
            upper = min(max_pos, req.max_seq or max_pos)
            lo = min(seq, upper)
            longest = largest_seq(m, log, rank, lo=lo, hi=upper)
            seq_reason = f"the longest sequence that fits at batch 1 (searched {lo}..{upper})"
            seq = longest or lo  # nothing fits: the error below names the shortest sequence tried
            found[rank] = 1 if longest else 0
        elif req.objective == "max-rank":
            for rank in ranks:
                b = largest_batch(m, log, seq, rank, usable, first_guess=2)[0]
                found[rank] = b
                if b == 0:
                    break
                _measure_divisor(m, log, seq, rank, b, per_device_effective)
        else:
            for rank in ranks:
                # Nothing above the per-device effective batch can be chosen, so nothing above it is tried.
                found[rank], _ = largest_batch(
                    m, log, seq, rank, usable, first_guess=_first_guess(req, seq, rank), upper=per_device_effective
                )
                _measure_divisor(m, log, seq, rank, found[rank], per_device_effective)
            if req.try_without_checkpointing and cfg.gradient_checkpointing:
                # Checkpointing trades ~a third more compute for activation memory; where the memory
                # allows a useful batch without it, that is usually the faster run. Measure, don't assume.
                log.variant = "no-checkpointing"
                m_off: Measure = lambda b, s, r: measure(b, s, r, usable, checkpointing=False)  # noqa: E731
                for rank in ranks:
                    found_without_checkpointing[rank], _ = largest_batch(
                        m_off, log, seq, rank, usable, upper=per_device_effective
                    )
                    _measure_divisor(m_off, log, seq, rank, found_without_checkpointing[rank], per_device_effective)
    except TrialBudgetExceeded as exc:
        stopped = str(exc)
    fitting = [t for t in log.trials if t.fits]
    if not fitting:
        raise UserError(
            f"nothing fits in {req.budget_gb} GiB (less a {req.margin:.0%} margin) for {cfg.model_name} at "
            f"sequence {seq}, rank {ranks[0]}: {len(log.trials)} trial(s), smallest peak "
            f"{_smallest_peak(log.trials)}. Lower max_sequence_length or lora_r, "
            + ("" if cfg.quantization == "4bit" else 'use quantization "4bit", ')
            + "or a smaller model"
            + (f" ({stopped})" if stopped else "")
        )
    candidates = _candidates(req, log.trials, found, seq, per_device_effective)
    best, runner_up = candidates[0], (candidates[1] if len(candidates) > 1 else None)
    accumulation = math.ceil(effective / (best.batch * req.world_size))
    reason = _reason(
        req, best, runner_up, found, seq_reason, effective, accumulation, stopped, found_without_checkpointing
    )
    return {
        "best": best,
        "runner_up": runner_up,
        "accumulation": accumulation,
        "effective": effective,
        "max_feasible_batch": found,
        "max_feasible_batch_without_checkpointing": found_without_checkpointing,
        "trials": log.trials,
        "seq": best.seq,
        "seq_reason": seq_reason,
        "reason": reason,
        "stopped": stopped,
        "budget_bytes": budget,
        "usable_bytes": usable,
    }


def _measure_divisor(
    measure: Measure, log: SearchLog, seq: int, rank: int, largest: int, per_device_effective: int
) -> None:
    """Measure the largest micro-batch up to `largest` that divides the effective batch (the search may not
    have), so the choice can keep accumulation x micro-batch exactly the effective batch."""
    if largest > 0:
        log.run(measure, divisors_up_to(per_device_effective, largest)[-1], seq, rank)


def _first_guess(req: SolveRequest, seq: int, rank: int) -> int:
    """Where the second trial goes: half the batch the analytic estimate predicts, so the fitted
    line spans a wide range (a short lever arm magnifies measurement noise)."""
    try:
        from autotune.catalog import resolve_model
        from autotune.estimate import largest_fitting, options_for
        from autotune.modeling import pick_device

        cfg = req.cfg
        arch = resolve_model(cfg.model_name).architecture
        pred = largest_fitting(
            arch,
            int(req.budget_gb * GiB),
            seq=seq,
            rank=rank,
            margin=req.margin,
            **options_for(cfg, pick_device().type),
        )
        batch = int(pred.get("batch") or 0)
        return max(2, batch // 2)
    except Exception:  # the estimate only places a trial; the measurements decide
        return 2


def _smallest_peak(trials: list[Trial]) -> str:
    peaks = [t.peak_bytes for t in trials if t.peak_bytes]
    return f"{min(peaks) / GiB:.2f} GiB" if peaks else "unknown (every trial ran out of memory)"


def _candidates(
    req: SolveRequest, trials: list[Trial], found: dict, seq: int, per_device_effective: int
) -> list[Trial]:
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
    req,
    best: Trial,
    runner_up: Trial | None,
    found: dict,
    seq_reason: str,
    effective: int,
    accumulation: int,
    stopped: str | None,
    found_without_checkpointing: dict | None = None,
) -> str:
    parts = [f"sequence {best.seq}: {seq_reason}."]
    for rank, b in sorted(found.items()):
        parts.append(f"rank {rank}: the largest micro-batch that fits is {b}.")
    for rank, b in sorted((found_without_checkpointing or {}).items()):
        parts.append(f"rank {rank} without gradient checkpointing: {b}.")
    if best.checkpointing is not None and found_without_checkpointing:
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


def _estimate_bytes(cfg: Config, trial: Trial, runner: TrialRunner | None) -> int | None:
    """The analytic estimate for the chosen shape, recorded beside the measurement it can be judged by."""
    try:
        from autotune.catalog import resolve_model
        from autotune.estimate import estimate_peak, options_for

        options = options_for(cfg, runner.device.type if runner else "cuda", trial.checkpointing)
        return estimate_peak(
            resolve_model(cfg.model_name).architecture, batch=trial.batch, seq=trial.seq, rank=trial.rank, **options
        ).peak_bytes
    except (ValueError, UserError):
        return None


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-") or "unknown"


def default_profile_path(gpu_name: str | None, model_name: str, budget_gb: float) -> Path:
    # Relative to the working directory: solved profiles belong to the user's project, not to autotune.
    return (
        Path("profiles")
        / "solved"
        / f"{slug(gpu_name or 'cpu')}__{slug(model_name.split('/')[-1])}__{budget_gb:g}GB.json"
    )


def build_profile(req: SolveRequest, result: dict, *, hardware: dict, runner: TrialRunner | None) -> dict:
    from autotune.catalog import resolve_model
    from autotune.profile import architecture_hash, new_profile

    cfg, best = req.cfg, result["best"]
    spec = resolve_model(cfg.model_name)
    choice = {
        "batch_size": best.batch,
        "gradient_accumulation_steps": result["accumulation"],
        "effective_batch_size": best.batch * result["accumulation"] * req.world_size,
        "max_sequence_length": best.seq,
        "lora_r": best.rank,
        "lora_alpha": cfg.lora_alpha * best.rank / cfg.lora_r,
        "target_modules": list(cfg.target_modules),
        "quantization": cfg.quantization,
        "gradient_checkpointing": cfg.gradient_checkpointing if best.checkpointing is None else best.checkpointing,
        "optimizer": cfg.optimizer,
        "dtype": str(runner._built.dtype).removeprefix("torch.") if runner and runner._built else None,
    }
    ru = result["runner_up"]
    return new_profile(
        hardware=hardware,
        model={
            "name": cfg.model_name,
            "architecture_hash": architecture_hash(spec.architecture),
            "architecture": asdict(spec.architecture),
            "init": runner.init if runner else "random",
        },
        data=req.data_stats,
        constraints={
            "max_memory_gb": req.budget_gb,
            "margin": req.margin,
            "objective": req.objective,
            "usable_bytes": result["usable_bytes"],
            "world_size": req.world_size,
            "effective_batch_size": result["effective"],
            "max_trials": req.max_trials,
            "time_budget_s": req.time_budget_s,
        },
        choice=choice,
        prediction={"peak_bytes": best.predicted_bytes, "estimate_bytes": _estimate_bytes(cfg, best, runner)},
        measurement={
            "peak_bytes": best.peak_bytes,
            "peak_fraction_of_budget": best.peak_bytes / result["budget_bytes"],
            "tokens_per_second": best.tokens_per_second,
            "step_seconds": best.step_seconds,
            "max_feasible_batch": {str(k): v for k, v in result["max_feasible_batch"].items()},
            "max_feasible_batch_without_checkpointing": {
                str(k): v for k, v in result.get("max_feasible_batch_without_checkpointing", {}).items()
            },
        },
        runner_up=asdict(ru) if ru else None,
        reason=result["reason"],
        trials=[asdict(t) for t in result["trials"]],
        config={
            **cfg.to_dict(),
            **{
                k: choice[k]
                for k in (
                    "batch_size",
                    "gradient_accumulation_steps",
                    "effective_batch_size",
                    "max_sequence_length",
                    "lora_r",
                    "lora_alpha",
                    "gradient_checkpointing",
                )
            },
        },
    )
