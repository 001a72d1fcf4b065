"""`autotune solve`: choose micro-batch, accumulation, sequence length and LoRA rank by measured trials.

The search decides which trials to run; trial.py runs them (as Lightning's batch-size tuner keeps its search
apart from its trial). A linear memory model fitted from two measured trials predicts the largest
micro-batch, one trial verifies it, and the search bisects only where the prediction misses. It knows
nothing of models or GPUs, only of a `Trials` object: a budget and a `measure(batch, seq, rank)`.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import torch

from autotune import techniques
from autotune.config import DEFAULT_MAX_TRIALS, Config
from autotune.context import RunContext
from autotune.errors import UserError
from autotune.techniques import Knobs
from autotune.techniques.fused_loss import kernel_for
from autotune.trial import Trial
from autotune.units import DEFAULT_MARGIN, Budget, GiB

Measure = Callable[[int, int, int], Trial]


class Trials(Protocol):
    """What the search needs of a trial runner: trial.TrialRunner, or a synthetic memory curve in tests."""

    @property
    def budget(self) -> Budget: ...

    @property
    def device_type(self) -> str: ...

    def measure(self, batch: int, seq: int, rank: int, *, knobs: Knobs | None = None) -> Trial: ...


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
    variant: object = None  # what else distinguishes the shapes being searched now (the techniques, Knobs)
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


def largest_seq(
    measure: Measure, log: SearchLog, rank: int, lo: int, hi: int, step: int = 64, guess: int | None = None
) -> int:
    """The longest sequence (a multiple of `step`) that fits at batch 1; 0 if `lo` does not.

    With a `guess` (the estimate's answer) the first trials bracket it, 10% either side, before the
    bisection: a good guess leaves a few steps instead of log2((hi - lo) / step)."""
    if guess is not None and lo < guess < hi:
        below, above = max(lo, int(guess * 0.9) // step * step), min(hi, -(-int(guess * 1.1) // step) * step)
        if log.run(measure, 1, below, rank).fits:
            lo = below
            if below < above:
                if log.run(measure, 1, above, rank).fits:
                    lo = above
                else:
                    hi = above
        else:
            hi = below
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

# Technique combinations a throughput solve measures besides the config's own (the estimate ranks them).
MAX_VARIANTS = 2

# Throughput priors, only to order the candidates before anything is measured (the measured tokens/s
# decides): what each technique costs a step relative to not using it. Checkpointing recomputes a forward
# (~1/3 more compute); offloading waits on a PCIe copy now and then; the host embedding gathers on the CPU;
# the chunked loss recomputes the lm_head matmul in backward (liger's kernel does not).
SPEED_PRIOR = {
    "checkpointing": 0.75,
    "offload_activations": 0.9,
    "embedding_on_cpu": 0.97,
    "lm_head_8bit": 0.97,
    "tiled_mlp": 0.9,
    "fused_loss": 0.95,
}


@dataclass
class SolveRequest:
    ctx: RunContext
    objective: str = "throughput"  # throughput | max-seq | max-rank
    seq: int | None = None  # fixed sequence length
    ranks: list[int] | None = None  # candidates; None: the config's lora_r
    max_trials: int | None = DEFAULT_MAX_TRIALS
    time_budget_s: float | None = None
    world_size: int = 1  # processes the run will have: every trial is one rank's step
    strategy: str = "ddp"  # how those ranks share the model (resolved: never "auto")
    data_stats: dict | None = None
    max_seq: int | None = None  # upper bound for max-seq
    # Gradient checkpointing: "auto" lets the search turn it off where that is faster; "on"/"off" force it.
    checkpointing: str = "auto"
    # Measure the technique combinations the config leaves on "auto" (False: the config's knobs only).
    techniques: bool = True


@dataclass
class _Found:
    """The largest fitting micro-batch per rank: with the config's techniques, and per combination tried."""

    batch: dict[int, int] = field(default_factory=dict)
    by_knobs: dict[str, dict[int, int]] = field(default_factory=dict)


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
            _search_max_rank(req, trials, log, ranks, seq, per_device_effective, found)
        else:
            _search_throughput(req, trials, log, ranks, seq, per_device_effective, found)
    except TrialBudgetExceeded as exc:
        stopped = str(exc)
    if not any(t.fits for t in log.trials):
        raise _nothing_fits(req, trials.budget, seq, ranks[0], log.trials, stopped)
    candidates = _candidates(req, log.trials, seq, per_device_effective)
    best, runner_up = candidates[0], (candidates[1] if len(candidates) > 1 else None)
    accumulation = math.ceil(cfg.effective_batch / (best.batch * req.world_size))
    eval_batch, eval_note = _plan_eval(trials, log, best)
    return {
        "best": best,
        "runner_up": runner_up,
        "accumulation": accumulation,
        "effective": cfg.effective_batch,
        "max_feasible_batch": found.batch,
        "max_feasible_batch_by_techniques": found.by_knobs,
        "trials": log.trials,
        "seq": best.seq,
        "seq_reason": seq_reason,
        "eval_batch": eval_batch,
        "reason": " ".join(
            filter(None, [_reason(req, best, runner_up, found, seq_reason, accumulation, stopped), eval_note])
        ),
        "stopped": stopped,
        "budget_bytes": trials.budget.total_bytes,
        "usable_bytes": trials.budget.usable_bytes,
        "margin": trials.budget.margin,
    }


def _plan_eval(trials: Trials, log: SearchLog, best: Trial) -> tuple[int, str]:
    """The evaluation batch: twice the training micro-batch where one evaluation step of it, after a training
    step, fits under the cap (evaluation keeps no activations for backward, so it usually does); else the
    training micro-batch, which fits by construction (a forward alone needs less than a training step)."""
    measure_eval = getattr(trials, "measure_eval", None)
    if measure_eval is None or best.kind != "train":
        return best.batch, ""
    log.variant = ("eval", best.knobs, best.batch)

    def measure(batch: int, seq: int, rank: int) -> Trial:
        return measure_eval(batch, seq, rank, train_batch=best.batch, knobs=best.knobs)

    try:
        trial = log.run(measure, 2 * best.batch, best.seq, best.rank)
    except TrialBudgetExceeded:
        return best.batch, f"Evaluation batch {best.batch}, the training micro-batch (no trial left to measure more)."
    if trial.fits:
        return trial.batch, f"Evaluation batch {trial.batch}: measured to fit after a training step."
    return best.batch, f"Evaluation batch {best.batch}: {trial.batch} measured over the budget."


# ----------------------------------------------------------------------- which techniques to measure


def _allowed(req: SolveRequest) -> dict[str, tuple[bool, ...]]:
    """The values each knob may take: a config switch on "auto" leaves both open, "on"/"off" fixes it; so
    does --checkpointing. Packing is not searched: a trial's rows are all full length, so it cannot show
    packing's gain (no padding to drop) and only its cost; the config's choice (auto: on) stands."""
    cfg, default = req.ctx.cfg, techniques.resolve(req.ctx.cfg, req.ctx.spec)
    allowed: dict[str, tuple[bool, ...]] = {"packing": (default.packing,)}
    for name in techniques.TECHNIQUES:
        if name != "packing":
            allowed[name] = (False, True) if getattr(cfg, name) == "auto" else (getattr(default, name),)
    allowed["checkpointing"] = {"auto": (False, True), "on": (True,), "off": (False,)}[req.checkpointing]
    return allowed


def _combinations(req: SolveRequest) -> list[Knobs]:
    """Every valid combination of the knobs the request leaves open."""
    allowed = _allowed(req)
    names = list(allowed)
    out = []
    for values in itertools.product(*(allowed[n] for n in names)):
        knobs = Knobs(**dict(zip(names, values)))
        if techniques.valid(knobs, req.ctx.spec):
            out.append(knobs)
    return out


def lean_knobs(req: SolveRequest) -> Knobs:
    """Every technique that saves memory, where the request allows it: what max-seq and max-rank run with."""
    options = _combinations(req)
    return max(
        options,
        key=lambda k: (
            k.checkpointing,
            k.fused_loss,
            k.offload_activations,
            k.embedding_on_cpu,
            k.lm_head_8bit,
            k.tiled_mlp,
        ),
    )


def speed_prior(knobs: Knobs, device_type: str) -> float:
    """The step's relative speed with these techniques (1.0: none of them), from SPEED_PRIOR."""
    prior = 1.0
    for name, cost in SPEED_PRIOR.items():
        if getattr(knobs, name) and not (name == "fused_loss" and kernel_for(torch.device(device_type)) == "liger"):
            prior *= cost
    return prior


def estimate_options(req: SolveRequest, device_type: str, knobs: Knobs | None) -> dict:
    """estimate_peak's options for one rank of the request's run with these techniques."""
    from autotune.estimate import options_for

    return {**options_for(req.ctx.cfg, device_type, knobs), "world_size": req.world_size, "strategy": req.strategy}


def _estimated_batch(req: SolveRequest, trials: Trials, knobs: Knobs, seq: int, rank: int, upper: int) -> int:
    """The largest micro-batch the estimate puts within the budget with these techniques (0: none)."""
    from autotune.estimate import largest_fitting

    try:
        fit = largest_fitting(
            req.ctx.architecture,
            trials.budget,
            seq=seq,
            rank=rank,
            max_batch=upper,
            **estimate_options(req, trials.device_type, knobs),
        )
    except (ValueError, UserError):  # the estimate only places and ranks trials; the measurements decide
        return 0
    return int(fit.get("batch") or 0)


def _variants(req: SolveRequest, trials: Trials, seq: int, rank: int, per_device_effective: int, base: Knobs):
    """The other combinations worth measuring, best first: ranked by the speed prior times how well the
    estimated largest divisor micro-batch fills the device, and only those the estimate gives a micro-batch
    no slower combination already reaches (a slower one that fits no more cannot win)."""
    scored = []
    for knobs in _combinations(req):
        if knobs == base:
            continue
        largest = _estimated_batch(req, trials, knobs, seq, rank, per_device_effective)
        batch = divisors_up_to(per_device_effective, largest)[-1] if largest else 0
        if batch:
            scored.append((speed_prior(knobs, trials.device_type) * _fill(batch * seq), batch, knobs))
    scored.sort(key=lambda s: (s[0], s[1]), reverse=True)
    kept: list[tuple[float, int, Knobs]] = []
    for score, batch, knobs in scored:
        prior = speed_prior(knobs, trials.device_type)
        if any(b >= batch and speed_prior(k, trials.device_type) >= prior for _, b, k in kept):
            continue  # dominated
        kept.append((score, batch, knobs))
    return [(knobs, batch) for _, batch, knobs in kept[:MAX_VARIANTS]]


def _fill(tokens: int) -> float:
    """How busy a micro-batch of `tokens` keeps a GPU, 0..1: small ones leave it waiting on launches and
    memory; beyond a few thousand tokens per step the matmuls are large enough."""
    return tokens / (tokens + 2048)


# ----------------------------------------------------------------------- the searches


def _search_throughput(
    req: SolveRequest,
    trials: Trials,
    log: SearchLog,
    ranks: list[int],
    seq: int,
    per_device_effective: int,
    found: _Found,
) -> None:
    """Per rank: the largest fitting micro-batch with the config's techniques (a linear memory model,
    verified), then the combinations the estimate ranks best, each by a bisection over the micro-batches
    that divide the effective batch, starting where the estimate puts it."""
    base = techniques.resolve(req.ctx.cfg, req.ctx.spec)
    if req.checkpointing != "auto":
        base = base.with_(checkpointing=req.checkpointing == "on", offload_activations=False)
    usable = trials.budget.usable_bytes
    for rank in ranks:
        measure = functools.partial(trials.measure, knobs=base)
        log.variant = base
        guess = max(2, _estimated_batch(req, trials, base, seq, rank, 4096) // 2)
        found.batch[rank], _ = largest_batch(
            measure, log, seq, rank, usable, first_guess=guess, upper=per_device_effective
        )
        found.by_knobs.setdefault(base.describe(), {})[rank] = found.batch[rank]
        _measure_divisor(measure, log, seq, rank, found.batch[rank], per_device_effective)
    if not req.techniques:
        return
    rank = ranks[-1]
    for knobs, estimated in _variants(req, trials, seq, rank, per_device_effective, base):
        log.variant = knobs
        measure = functools.partial(trials.measure, knobs=knobs)
        found.by_knobs[knobs.describe()] = {
            rank: _largest_divisor(measure, log, seq, rank, per_device_effective, estimated)
        }


def _largest_divisor(measure: Measure, log: SearchLog, seq: int, rank: int, n: int, start: int) -> int:
    """The largest divisor of `n` whose trial fits, by bisection over the divisors from `start`; 0 if none."""
    options = divisors_up_to(n, n)
    lo, hi = -1, len(options)  # options[lo] fits (or lo == -1), options[hi] does not (or hi == len)
    i = options.index(start) if start in options else len(options) // 2
    while hi - lo > 1:
        if log.run(measure, options[i], seq, rank).fits:
            lo = i
        else:
            hi = i
        i = (lo + hi) // 2 if hi - lo > 1 else i
        if hi - lo > 1 and lo >= 0 and hi == len(options):
            i = lo + 1  # the estimate may be low: step up one divisor at a time while nothing has failed
    return options[lo] if lo >= 0 else 0


def _search_max_seq(
    req: SolveRequest, trials: Trials, log: SearchLog, rank: int, seq: int, found: _Found
) -> tuple[int, str]:
    """The longest sequence at batch 1, with every technique that saves memory; the estimate places the
    first trials around its answer and a bisection finishes."""
    from autotune.estimate import largest_fitting

    knobs = lean_knobs(req)
    log.variant = knobs
    max_pos = req.ctx.architecture.max_position_embeddings
    upper = min(max_pos, req.max_seq or max_pos)
    lo = min(seq, upper)
    try:
        guess = largest_fitting(
            req.ctx.architecture,
            trials.budget,
            rank=rank,
            max_seq=upper,
            **estimate_options(req, trials.device_type, knobs),
        )["seq"]
    except (ValueError, UserError):
        guess = None
    measure = functools.partial(trials.measure, knobs=knobs)
    longest = largest_seq(measure, log, rank, lo=lo, hi=upper, guess=guess)
    found.batch[rank] = 1 if longest else 0
    found.by_knobs[knobs.describe()] = {rank: found.batch[rank]}
    # Nothing fits: the error names the shortest sequence tried.
    return longest or lo, f"the longest sequence that fits at batch 1 with {knobs.describe()} (searched {lo}..{upper})"


def _search_max_rank(
    req: SolveRequest,
    trials: Trials,
    log: SearchLog,
    ranks: list[int],
    seq: int,
    per_device_effective: int,
    found: _Found,
) -> None:
    """The highest rank that fits at batch 1, by bisection over the candidates (memory grows with the rank),
    with every technique that saves memory; then the largest micro-batch at that rank."""
    knobs = lean_knobs(req)
    log.variant = knobs
    measure = functools.partial(trials.measure, knobs=knobs)
    lo, hi = -1, len(ranks)  # ranks[lo] fits at batch 1 (or lo == -1); ranks[hi] does not (or hi == len)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if log.run(measure, 1, seq, ranks[mid]).fits:
            lo = mid
        else:
            hi = mid
            found.batch[ranks[mid]] = 0
    if lo >= 0:
        rank = ranks[lo]
        found.batch[rank] = largest_batch(
            measure, log, seq, rank, trials.budget.usable_bytes, upper=per_device_effective
        )[0]
        _measure_divisor(measure, log, seq, rank, found.batch[rank], per_device_effective)
    found.by_knobs[knobs.describe()] = dict(found.batch)


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


def _smallest_peak(trials: list[Trial]) -> str:
    peaks = [t.peak_bytes for t in trials if t.peak_bytes]
    return f"{min(peaks) / GiB:.2f} GiB" if peaks else "unknown (every trial ran out of memory)"


def _candidates(req: SolveRequest, trials: list[Trial], seq: int, per_device_effective: int) -> list[Trial]:
    """Fitting training trials ranked by the objective. For throughput only micro-batches that divide the
    effective batch qualify, so accumulation x batch is exactly the effective batch."""
    fitting = [t for t in trials if t.fits and t.kind == "train"]
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
    others = {label: b for label, b in found.by_knobs.items() if b != found.batch}
    for label, by_rank in others.items():
        parts.append(
            f"With {label}: " + ", ".join(f"rank {r} up to batch {b}" for r, b in sorted(by_rank.items())) + "."
        )
    if best.knobs is not None:
        why = "the fastest combination measured" if len(found.by_knobs) > 1 else "the config's"
        parts.append(f"Techniques: {best.knobs.describe()}, {why}.")
    objective = {
        "throughput": "the highest measured tokens/s",
        "max-seq": "the longest sequence",
        "max-rank": "the highest rank",
    }[req.objective]
    if not best.measured:
        objective = "the largest micro-batch the estimate puts within the budget"
    parts.append(
        f"Chose batch {best.batch} x accumulation {accumulation} (effective {best.batch * accumulation * req.world_size}"
        f", asked {effective}) at rank {best.rank} for {objective}"
        + (f": {best.tokens_per_second:.0f} tokens/s" if best.tokens_per_second else "")
        + "."
    )
    if req.world_size > 1:
        parts.append(
            f"Per rank of {req.world_size} ({req.strategy.upper()}): accumulation = {effective} / ({best.batch} x "
            f"{req.world_size})"
            + (
                "; each trial's peak includes DDP's gradient buckets, measured with a real DDP."
                if req.strategy == "ddp" and best.measured
                else "."
            )
        )
    if best.batch * accumulation * req.world_size != effective:
        parts.append(f"No fitting micro-batch divides {effective}, so the effective batch rounds up.")
    if runner_up is not None:
        with_ = f" with {runner_up.knobs.describe()}" if runner_up.knobs else ""
        parts.append(
            f"Runner-up: batch {runner_up.batch} at rank {runner_up.rank}, seq {runner_up.seq}{with_}"
            + (f" ({runner_up.tokens_per_second:.0f} tokens/s)" if runner_up.tokens_per_second else "")
            + "."
        )
    if stopped:
        parts.append(f"Search stopped early: {stopped}; the choice is the best measured so far.")
    return " ".join(parts)


# ------------------------------------------------------------------------ the command, end to end


def budget_for(
    flag_gb: float | None, cfg: Config, budget_explicit: bool, probe_doc: dict, margin: float, gpus: int = 1
) -> tuple[Budget, str]:
    """The budget to solve within (per rank), and where it came from: the flag, else a max_memory_gb the user
    wrote, else the free memory less the margin of the smallest of the `gpus` GPUs the run will use (every
    rank must fit: the smallest card is the budget of all)."""
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
    gb = round(free * (1 - DEFAULT_MARGIN), 2)
    smallest = f", the smallest of GPUs 0-{gpus - 1}" if gpus > 1 else ""
    return Budget.from_gib(gb, margin), (
        f"the {free:.1f} GiB free on GPU {gpu['index']}{smallest}, less {DEFAULT_MARGIN:.0%}"
    )


def choose_strategy(req: SolveRequest, budget: Budget, seq: int, device_type: str) -> tuple[str, str]:
    """The strategy the solve plans for (the request's, `auto` resolved by the estimate), and why."""
    from autotune.distributed import check_fsdp
    from autotune.estimate import options_for, pick_strategy

    asked = req.ctx.cfg.distributed_strategy
    if req.world_size == 1:
        return "ddp", "one process"
    if asked == "auto":
        rank = max(req.ranks or [req.ctx.cfg.lora_r])
        options = options_for(req.ctx.cfg, device_type)
        strategy, why = pick_strategy(
            req.ctx.architecture, budget, world_size=req.world_size, seq=seq, rank=rank, **options
        )
    else:
        strategy, why = asked, f"--strategy {asked}"
    if strategy == "fsdp":
        check_fsdp(req.ctx.cfg, "cuda")  # a plan for GPUs: on this machine or another
    return strategy, why


def plan_from_estimate(req: SolveRequest, budget: Budget) -> dict:
    """A solve without trials, for FSDP: its per-rank memory (1/N of the model, the gathered layers) exists only
    in N processes on N GPUs, which one solving process cannot run. The estimate's per-rank peak places the
    micro-batch (the largest divisor of each rank's share of the effective batch predicted to fit, on the safe
    side of its error band), and the profile says it was not measured."""
    from autotune.estimate import estimate_peak, largest_fitting

    cfg = req.ctx.cfg
    arch = req.ctx.architecture
    max_pos = arch.max_position_embeddings
    seq, seq_reason = choose_seq(req.data_stats, fixed=req.seq, fallback=cfg.max_sequence_length, max_position=max_pos)
    ranks = sorted(set(req.ranks or [cfg.lora_r]))
    per_rank = max(1, cfg.effective_batch // req.world_size)
    knobs = lean_knobs(req) if req.objective != "throughput" else techniques.resolve(cfg, req.ctx.spec)
    knobs = knobs.with_(embedding_on_cpu=False, lm_head_8bit=False)  # FSDP shards both tables already
    options = estimate_options(req, "cuda", knobs)
    fits: dict[int, int] = {}
    for rank in ranks:
        largest = largest_fitting(arch, budget, seq=seq, rank=rank, max_batch=per_rank, **options)["batch"] or 0
        fits[rank] = divisors_up_to(per_rank, largest)[-1] if largest else 0
    fitting = [r for r in ranks if fits[r]]
    if req.objective == "max-seq":
        rank = ranks[-1]
        seq = largest_fitting(arch, budget, batch=1, rank=rank, max_seq=req.max_seq or max_pos, **options)["seq"]
        batch = 1 if seq else 0
        seq_reason = f"the longest sequence the estimate fits at batch 1 with {knobs.describe()}"
    else:
        # max-rank: the highest rank that fits; throughput: the config's (lowest candidate) that fits.
        rank = (fitting[-1] if req.objective == "max-rank" else fitting[0]) if fitting else ranks[0]
        batch = fits[rank]
    if not batch or not seq:
        raise UserError(
            f"nothing fits in {budget.describe()} per rank for {cfg.model_name} with FSDP over {req.world_size} "
            f"processes at sequence {seq}, rank {rank} (the estimate's per-rank peak): lower max_sequence_length "
            "or lora_r, or use more GPUs"
        )
    est = estimate_peak(arch, batch=batch, seq=seq, rank=rank, **options)
    note = f"estimate: FSDP's per-rank memory needs {req.world_size} processes on GPUs; not measured"
    best = Trial(batch, seq, rank, True, False, est.peak_bytes, 0.0, None, None, est.peak_bytes, note, knobs)
    best.measured = False
    accumulation = math.ceil(cfg.effective_batch / (batch * req.world_size))
    found = _Found(batch={rank: batch}, by_knobs={knobs.describe(): {rank: batch}})
    reason = _reason(req, best, None, found, seq_reason, accumulation, None)
    return {
        "best": best,
        "runner_up": None,
        "accumulation": accumulation,
        "effective": cfg.effective_batch,
        "max_feasible_batch": found.batch,
        "max_feasible_batch_by_techniques": found.by_knobs,
        "trials": [best],
        "seq": seq,
        "seq_reason": seq_reason,
        "eval_batch": batch,
        "reason": reason
        + f" FSDP per rank, from the estimate ({est.peak_gib:.2f} GiB at the {est.phase.replace('_', ' ')}): not"
        " measured; the first training steps are the measurement (the memory watchdog warns past it).",
        "stopped": None,
        "budget_bytes": budget.total_bytes,
        "usable_bytes": budget.usable_bytes,
        "margin": budget.margin,
    }


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
    from autotune.distributed import rank_batches
    from autotune.hardware import probe, training_gpu
    from autotune.modeling import compute_dtype, pick_device
    from autotune.profile import default_profile_path, hardware_fingerprint, profile_from_solve, save_profile
    from autotune.step import check_training_settings
    from autotune.trial import TrialRunner

    started = time.monotonic()
    cfg = req.ctx.cfg
    check_training_settings(cfg)
    rank_batches(cfg.batch_size, cfg.effective_batch, req.world_size)  # the effective batch splits over the ranks
    probe_doc = probe(cfg.output_dir)
    budget, source = budget_for(max_memory_gb, cfg, budget_explicit, probe_doc, margin, gpus=req.world_size)
    if output:
        check_writable(output)
    if req.data_stats is None:
        req = replace(req, data_stats=data_stats_for(req.ctx, required=data_required, echo=echo))
    device = pick_device()
    seq = choose_seq(
        req.data_stats,
        fixed=req.seq,
        fallback=cfg.max_sequence_length,
        max_position=req.ctx.architecture.max_position_embeddings,
    )[0]
    strategy, why = choose_strategy(req, budget, seq, device.type)
    req = replace(req, strategy=strategy)
    ranks = f", {req.world_size} ranks ({why})" if req.world_size > 1 else ""
    runner = None
    if strategy == "fsdp":
        echo(
            f"planning {cfg.model_name} ({cfg.quantization}) for FSDP over {req.world_size} GPUs within "
            f"{budget.describe()} per rank ({source}){ranks}: from the estimate, without trials"
        )
        result = plan_from_estimate(req, budget)
        # The plan is for GPUs (FSDP trains on nothing else): their compute dtype, this one's if it has one.
        planned = compute_dtype(cfg, device) if device.type == "cuda" else (torch.bfloat16 if cfg.bf16 else None)
        device_type = "cuda"
        dtype: str | None = str(planned or (torch.float16 if cfg.fp16 else torch.float32)).removeprefix("torch.")
        echo("  " + result["best"].describe(budget.total_bytes))
    else:
        runner = TrialRunner(req.ctx, budget, init=init, device=device, world_size=req.world_size)
        echo(
            f"solving {cfg.model_name} ({cfg.quantization}) on {runner.device_type} within {budget.describe()} "
            f"({source}), objective {req.objective}{ranks}"
        )
        result = solve(req, runner, on_trial=lambda t: echo("  " + t.describe(budget.total_bytes)))
        device_type, dtype = runner.device_type, runner.dtype
    profile = profile_from_solve(
        req,
        result,
        hardware=hardware_fingerprint(probe_doc, device_type),
        init=runner.init if runner else init,
        dtype=dtype,
        device_type=device_type,
    )
    profile["constraints"]["strategy_reason"] = why
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
