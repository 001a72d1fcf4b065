"""The search: which trials to run, given a way to run one. Pure: no model, no GPU, no torch.

As Lightning's batch-size tuner keeps its search apart from its trial, this module knows only a `measure(batch,
seq, rank) -> Trial` and a budget in bytes. A linear memory model fitted from two measured trials predicts the
largest micro-batch, one trial verifies it, and the search bisects only where the prediction misses.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from autotune.batching import divisors_up_to
from autotune.measurement import Trial
from autotune.techniques import Knobs
from autotune.units import Budget

Measure = Callable[[int, int, int], Trial]


class Trials(Protocol):
    """What a solve needs of a trial runner: trial.TrialRunner, or a synthetic memory curve in tests."""

    @property
    def budget(self) -> Budget: ...

    @property
    def device_type(self) -> str: ...

    def measure(self, batch: int, seq: int, rank: int, *, knobs: Knobs | None = None) -> Trial: ...


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
    """Every trial a solve ran, each shape measured once, within the trial and time budget."""

    trials: list[Trial] = field(default_factory=list)
    max_trials: int | None = None
    deadline: float | None = None
    on_trial: Callable[[Trial], None] | None = None
    variant: object = None  # what else distinguishes the shapes being searched now (the techniques, Knobs)
    _cache: dict = field(default_factory=dict)

    def trial(self, measure: Measure, batch: int, seq: int, rank: int, predicted: int | None = None) -> Trial:
        """The trial of this shape: measured now, or the one measured before."""
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
    one = log.trial(measure, 1, seq, rank)
    if not one.fits:
        return 0, None
    measured = {1: one}
    lo, hi = 1, None  # lo fits; hi, once known, does not
    batch, expected, predicted, misses = max(2, min(first_guess, upper)), None, None, 0
    model = None
    while lo < upper and (hi is None or hi - lo > 1):
        trial = log.trial(measure, batch, seq, rank, predicted)
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


def largest_divisor(measure: Measure, log: SearchLog, seq: int, rank: int, n: int, start: int) -> int:
    """The largest divisor of `n` whose trial fits, by bisection over the divisors from `start`; 0 if none."""
    options = divisors_up_to(n, n)
    lo, hi = -1, len(options)  # options[lo] fits (or lo == -1), options[hi] does not (or hi == len)
    i = options.index(start) if start in options else len(options) // 2
    while hi - lo > 1:
        if log.trial(measure, options[i], seq, rank).fits:
            lo = i
        else:
            hi = i
        i = (lo + hi) // 2 if hi - lo > 1 else i
        if hi - lo > 1 and lo >= 0 and hi == len(options):
            i = lo + 1  # the estimate may be low: step up one divisor at a time while nothing has failed
    return options[lo] if lo >= 0 else 0


def largest_seq(
    measure: Measure, log: SearchLog, rank: int, lo: int, hi: int, step: int = 64, guess: int | None = None
) -> int:
    """The longest sequence (a multiple of `step`) that fits at batch 1; 0 if `lo` does not.

    With a `guess` (the estimate's answer) the first trials bracket it, 10% either side, before the
    bisection: a good guess leaves a few steps instead of log2((hi - lo) / step)."""
    if guess is not None and lo < guess < hi:
        below, above = max(lo, int(guess * 0.9) // step * step), min(hi, -(-int(guess * 1.1) // step) * step)
        if log.trial(measure, 1, below, rank).fits:
            lo = below
            if below < above:
                if log.trial(measure, 1, above, rank).fits:
                    lo = above
                else:
                    hi = above
        else:
            hi = below
    if not log.trial(measure, 1, lo, rank).fits:
        return 0
    if log.trial(measure, 1, hi, rank).fits:
        return hi
    lo_u, hi_u = lo // step, -(-hi // step)  # hi_u * step >= hi: every multiple below hi stays a candidate
    while hi_u - lo_u > 1:
        mid = (lo_u + hi_u) // 2
        if log.trial(measure, 1, mid * step, rank).fits:
            lo_u = mid
        else:
            hi_u = mid
    return max(lo, lo_u * step)


def measure_divisor(measure: Measure, log: SearchLog, seq: int, rank: int, largest: int, share: int) -> None:
    """Measure the largest micro-batch up to `largest` that divides a rank's share of the effective batch (the
    search may not have), so the choice keeps micro-batch x accumulation exactly that share."""
    if largest > 0:
        log.trial(measure, divisors_up_to(share, largest)[-1], seq, rank)
