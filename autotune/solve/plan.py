"""Planning a solve: the sequence to solve at, the technique combinations worth measuring, the objective's search,
and the choice with its reasons, as one typed `SolveResult`.

`solve` runs the searches (search.py) against a `Trials` runner; `plan_from_estimate` answers the same question
from the estimate alone, where no step can be measured here (FSDP's per-rank memory needs N processes on N GPUs).
Both return a SolveResult, which solve/record.py writes into the profile. No torch here either.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from autotune.batching import BatchPlan, divisors_up_to, share_of
from autotune.config import DEFAULT_MAX_TRIALS
from autotune.context import RunContext
from autotune.errors import UserError
from autotune.estimate import StepShape, estimate, fit, plan_techniques, shape_for
from autotune.measurement import Trial
from autotune.solve.search import (
    SearchLog,
    TrialBudgetExceeded,
    Trials,
    largest_batch,
    largest_divisor,
    largest_seq,
    measure_divisor,
)
from autotune.techniques import TECHNIQUES_TABLE, Knobs, open_values, resolve, valid_combinations
from autotune.units import Budget, GiB

# Technique combinations a throughput solve measures besides the config's own (the estimate ranks them).
MAX_VARIANTS = 2


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
    # Techniques left on "auto" that the search must keep off: those that keep memory on the host, once a trial
    # showed the host cannot hold them (solve).
    keep_off: frozenset[str] = frozenset()

    @property
    def share(self) -> int:
        """One rank's samples per optimizer step (a UserError when the ranks cannot share the batch equally)."""
        return share_of(self.ctx.cfg.effective_batch, self.world_size)

    @property
    def samples(self) -> int | None:
        """The dataset's rows (its data statistics' count), which the run holds in host memory; None: unknown."""
        count = (self.data_stats or {}).get("count")
        return count if isinstance(count, int) else None

    def shape(self, device_type: str, knobs: Knobs, *, seq: int, rank: int, batch: int = 1) -> StepShape:
        """The estimate's shape of one rank's step of this run."""
        return shape_for(
            self.ctx.cfg,
            self.ctx.architecture,
            batch=batch,
            seq=seq,
            rank=rank,
            device=device_type,
            knobs=knobs,
            world_size=self.world_size,
            strategy=self.strategy,
        )


@dataclass
class SolveResult:
    """A finished solve: the choice, the runner-up, why, and every trial (both solve paths return one)."""

    best: Trial
    runner_up: Trial | None
    batches: BatchPlan  # the chosen micro-batch x accumulation x ranks
    seq_reason: str
    eval_batch: int
    reason: str
    trials: list[Trial]
    budget: Budget
    # The largest fitting micro-batch per LoRA rank: with the config's techniques, and per combination tried.
    max_feasible_batch: dict[int, int] = field(default_factory=dict)
    max_feasible_batch_by_techniques: dict[str, dict[int, int]] = field(default_factory=dict)
    stopped: str | None = None  # why the search stopped early, if it did

    @property
    def seq(self) -> int:
        return self.best.seq


@dataclass
class _Found:
    """The largest fitting micro-batch per rank: with the config's techniques, and per combination tried."""

    batch: dict[int, int] = field(default_factory=dict)
    by_knobs: dict[str, dict[int, int]] = field(default_factory=dict)


# ----------------------------------------------------------------------- the sequence


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


def request_seq(req: SolveRequest) -> tuple[int, str]:
    """choose_seq for a request: its fixed sequence, else its data's p99, else the config's."""
    return choose_seq(
        req.data_stats,
        fixed=req.seq,
        fallback=req.ctx.cfg.max_sequence_length,
        max_position=req.ctx.architecture.max_position_embeddings,
    )


# ----------------------------------------------------------------------- which techniques to measure


def allowed_values(req: SolveRequest) -> dict[str, tuple[bool, ...]]:
    """The values each knob may take in this solve (techniques.open_values: the config's "auto" switches open,
    --checkpointing, the techniques the host cannot hold kept off)."""
    return open_values(req.ctx.cfg, req.ctx.spec, checkpointing=req.checkpointing, keep_off=req.keep_off)


def combinations(req: SolveRequest) -> list[Knobs]:
    """Every valid combination of the knobs the request leaves open: for this model, and for the strategy its
    ranks will run under (techniques.valid_combinations)."""
    return valid_combinations(
        allowed_values(req), req.ctx.spec, req.strategy, req.world_size, req.ctx.cfg.target_modules
    )


def lean_knobs(req: SolveRequest) -> Knobs:
    """Every technique that saves memory, where the request allows it: what max-seq and max-rank run with."""
    return max(combinations(req), key=Knobs.lean_key)


def _estimated_batch(req: SolveRequest, trials: Trials, knobs: Knobs, seq: int, rank: int, upper: int) -> int:
    """The largest micro-batch the estimate puts within the budget with these techniques (0: none)."""
    try:
        found = fit(req.shape(trials.device_type, knobs, seq=seq, rank=rank), trials.budget, max_batch=upper, max_seq=0)
    except (ValueError, UserError):  # the estimate only places and ranks trials; the measurements decide
        return 0
    return int(found["batch"] or 0)


def _fill(tokens: int) -> float:
    """How busy a micro-batch of `tokens` keeps a GPU, 0..1: small ones leave it waiting on launches and
    memory; beyond a few thousand tokens per step the matmuls are large enough."""
    return tokens / (tokens + 2048)


def _variants(req: SolveRequest, trials: Trials, seq: int, rank: int, base: Knobs) -> list[tuple[Knobs, int]]:
    """The other combinations worth measuring, best first: ranked by the speed prior times how well the
    estimated largest divisor micro-batch fills the device, and only those the estimate gives a micro-batch
    no slower combination already reaches (a slower one that fits no more cannot win)."""
    share, device = req.share, trials.device_type
    scored = []
    for knobs in combinations(req):
        if knobs == base:
            continue
        largest = _estimated_batch(req, trials, knobs, seq, rank, share)
        batch = divisors_up_to(share, largest)[-1] if largest else 0
        if batch:
            scored.append((knobs.speed(device) * _fill(batch * seq), batch, knobs))
    scored.sort(key=lambda s: (s[0], s[1]), reverse=True)
    kept: list[tuple[float, int, Knobs]] = []
    for score, batch, knobs in scored:
        prior = knobs.speed(device)
        if any(b >= batch and k.speed(device) >= prior for _, b, k in kept):
            continue  # dominated
        kept.append((score, batch, knobs))
    return [(knobs, batch) for _, batch, knobs in kept[:MAX_VARIANTS]]


# ----------------------------------------------------------------------- the searches, by objective


def _search_throughput(req: SolveRequest, trials: Trials, log: SearchLog, ranks: list[int], seq: int, found: _Found):
    """Per rank: the largest fitting micro-batch with the config's techniques (a linear memory model,
    verified), then the combinations the estimate ranks best, each by a bisection over the micro-batches
    that divide the effective batch, starting where the estimate puts it."""
    base = resolve(req.ctx.cfg, req.ctx.spec)
    if req.checkpointing != "auto":
        base = base.with_(checkpointing=req.checkpointing == "on", offload_activations=False)
    usable, share = trials.budget.usable_bytes, req.share
    for rank in ranks:
        measure = functools.partial(trials.measure, knobs=base)
        log.variant = base
        guess = max(2, _estimated_batch(req, trials, base, seq, rank, 4096) // 2)
        found.batch[rank], _ = largest_batch(measure, log, seq, rank, usable, first_guess=guess, upper=share)
        found.by_knobs.setdefault(base.describe(), {})[rank] = found.batch[rank]
        measure_divisor(measure, log, seq, rank, found.batch[rank], share)
    if not req.techniques:
        return
    rank = ranks[-1]
    for knobs, estimated in _variants(req, trials, seq, rank, base):
        log.variant = knobs
        measure = functools.partial(trials.measure, knobs=knobs)
        found.by_knobs[knobs.describe()] = {rank: largest_divisor(measure, log, seq, rank, share, estimated)}


def _search_max_seq(req: SolveRequest, trials: Trials, log: SearchLog, rank: int, seq: int, found: _Found):
    """The longest sequence at batch 1, with every technique that saves memory; the estimate places the
    first trials around its answer and a bisection finishes. Returns the sequence and why."""
    knobs = lean_knobs(req)
    log.variant = knobs
    max_pos = req.ctx.architecture.max_position_embeddings
    upper = min(max_pos, req.max_seq or max_pos)
    lo = min(seq, upper)
    try:
        shape = req.shape(trials.device_type, knobs, seq=lo, rank=rank)
        guess = fit(shape, trials.budget, max_batch=0, max_seq=upper)["seq"]
    except (ValueError, UserError):
        guess = None
    measure = functools.partial(trials.measure, knobs=knobs)
    longest = largest_seq(measure, log, rank, lo=lo, hi=upper, guess=guess)
    found.batch[rank] = 1 if longest else 0
    found.by_knobs[knobs.describe()] = {rank: found.batch[rank]}
    # Nothing fits: the error names the shortest sequence tried.
    return longest or lo, f"the longest sequence that fits at batch 1 with {knobs.describe()} (searched {lo}..{upper})"


def _search_max_rank(req: SolveRequest, trials: Trials, log: SearchLog, ranks: list[int], seq: int, found: _Found):
    """The highest rank that fits at batch 1, by bisection over the candidates (memory grows with the rank),
    with every technique that saves memory; then the largest micro-batch at that rank."""
    knobs = lean_knobs(req)
    log.variant = knobs
    measure = functools.partial(trials.measure, knobs=knobs)
    lo, hi = -1, len(ranks)  # ranks[lo] fits at batch 1 (or lo == -1); ranks[hi] does not (or hi == len)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if log.trial(measure, 1, seq, ranks[mid]).fits:
            lo = mid
        else:
            hi = mid
            found.batch[ranks[mid]] = 0
    if lo >= 0:
        rank = ranks[lo]
        found.batch[rank] = largest_batch(measure, log, seq, rank, trials.budget.usable_bytes, upper=req.share)[0]
        measure_divisor(measure, log, seq, rank, found.batch[rank], req.share)
    found.by_knobs[knobs.describe()] = dict(found.batch)


# ----------------------------------------------------------------------- the choice


def _candidates(req: SolveRequest, trials: list[Trial], seq: int) -> list[Trial]:
    """Fitting training trials whose micro-batch divides a rank's share of the effective batch (so the effective
    batch stays exact), ranked by the objective."""
    share = req.share
    fitting = [t for t in trials if t.fits and t.kind == "train" and share % t.batch == 0]
    if req.objective == "max-seq":
        return sorted(fitting, key=lambda t: (t.seq, t.tokens_per_second or 0), reverse=True)
    if req.objective == "max-rank":
        return sorted(fitting, key=lambda t: (t.rank, t.seq == seq, t.batch, t.tokens_per_second or 0), reverse=True)
    pool = [t for t in fitting if t.seq == seq] or fitting
    return sorted(pool, key=lambda t: (t.tokens_per_second or 0, t.batch), reverse=True)


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
        trial = log.trial(measure, 2 * best.batch, best.seq, best.rank)
    except TrialBudgetExceeded:
        return best.batch, f"Evaluation batch {best.batch}, the training micro-batch (no trial left to measure more)."
    if trial.fits:
        return trial.batch, f"Evaluation batch {trial.batch}: measured to fit after a training step."
    return best.batch, f"Evaluation batch {best.batch}: {trial.batch} measured over the budget."


def _reason(
    req: SolveRequest,
    best: Trial,
    runner_up: Trial | None,
    found: _Found,
    seq_reason: str,
    batches: BatchPlan,
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
        f"Chose batch {batches.micro} x accumulation {batches.accumulation} (effective {batches.effective}"
        f", asked {effective}) at rank {best.rank} for {objective}"
        + (f": {best.tokens_per_second:.0f} tokens/s" if best.tokens_per_second else "")
        + "."
    )
    if req.world_size > 1:
        parts.append(
            f"Per rank of {req.world_size} ({req.strategy.upper()}): accumulation = {effective} / ({batches.micro} x "
            f"{req.world_size})"
            + (
                "; each trial's peak includes DDP's gradient buckets, measured with a real DDP."
                if req.strategy == "ddp" and best.measured
                else "."
            )
        )
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


class NothingFits(UserError):
    """No trial of the solve fit in the budget (the message says what to change)."""


def _nothing_fits(req: SolveRequest, budget: Budget, seq: int, rank: int, trials: list[Trial], stopped: str | None):
    cfg = req.ctx.cfg
    peaks = [t.peak_bytes for t in trials if t.peak_bytes]
    smallest = f"{min(peaks) / GiB:.2f} GiB" if peaks else "unknown (every trial ran out of memory)"
    return NothingFits(
        f"nothing fits in {budget.describe()} for {cfg.model_name} at sequence {seq}, rank {rank}: "
        f"{len(trials)} trial(s), smallest peak {smallest}. Lower max_sequence_length or lora_r, "
        + ("" if cfg.quantization == "4bit" else 'use quantization "4bit", ')
        + "or a smaller model"
        + (f" ({stopped})" if stopped else "")
    )


# ----------------------------------------------------------------------- the two ways to solve


def _search(
    req: SolveRequest, trials: Trials, log: SearchLog, ranks: list[int], seq: int, seq_reason: str, found: _Found
) -> tuple[int, str]:
    """The objective's search; returns the sequence it settled on and why."""
    if req.objective == "max-seq":
        return _search_max_seq(req, trials, log, ranks[-1], seq, found)
    if req.objective == "max-rank":
        _search_max_rank(req, trials, log, ranks, seq, found)
    else:
        _search_throughput(req, trials, log, ranks, seq, found)
    return seq, seq_reason


def solve(req: SolveRequest, trials: Trials, *, on_trial: Callable[[Trial], None] | None = None) -> SolveResult:
    """Run the objective's search against `trials` (its budget, its measure)."""
    cfg = req.ctx.cfg
    log = SearchLog(
        max_trials=req.max_trials,
        on_trial=on_trial,
        deadline=time.monotonic() + req.time_budget_s if req.time_budget_s else None,
    )
    seq, seq_reason = request_seq(req)
    ranks = sorted(set(req.ranks or [cfg.lora_r]))
    found, stopped = _Found(), None
    try:
        seq, seq_reason = _search(req, trials, log, ranks, seq, seq_reason, found)
        if not _candidates(req, log.trials, seq) and any(t.over_host_ram for t in log.trials):
            # The host could not hold what a technique keeps there (offloaded inputs, a table): the same search
            # without the techniques that keep memory on the host (their rows' host terms).
            keep_off = frozenset(t.key for t in TECHNIQUES_TABLE if t.host and getattr(cfg, t.key) == "auto")
            if keep_off:
                req = replace(req, keep_off=keep_off)
                seq, seq_reason = _search(req, trials, log, ranks, *request_seq(req), found)
    except TrialBudgetExceeded as exc:
        stopped = str(exc)
    candidates = _candidates(req, log.trials, seq)
    if not candidates:
        raise _nothing_fits(req, trials.budget, seq, ranks[0], log.trials, stopped)
    best, runner_up = candidates[0], (candidates[1] if len(candidates) > 1 else None)
    batches = BatchPlan(best.batch, req.share // best.batch, req.world_size)
    eval_batch, eval_note = _plan_eval(trials, log, best)
    reason = _reason(req, best, runner_up, found, seq_reason, batches, stopped)
    return SolveResult(
        best=best,
        runner_up=runner_up,
        batches=batches,
        seq_reason=seq_reason,
        eval_batch=eval_batch,
        reason=" ".join(filter(None, [reason, eval_note])),
        trials=log.trials,
        budget=trials.budget,
        max_feasible_batch=found.batch,
        max_feasible_batch_by_techniques=found.by_knobs,
        stopped=stopped,
    )


def plan_from_estimate(req: SolveRequest, budget: Budget) -> SolveResult:
    """A solve without trials, for FSDP: its per-rank memory (1/N of the model, the gathered layers) exists only
    in N processes on N GPUs, which one solving process cannot run. The estimate's per-rank peak places the
    micro-batch (the largest divisor of each rank's share of the effective batch predicted to fit, on the safe
    side of its error band), and the profile says it was not measured."""
    cfg, arch, share = req.ctx.cfg, req.ctx.architecture, req.share
    max_pos = arch.max_position_embeddings
    seq, seq_reason = request_seq(req)
    ranks = sorted(set(req.ranks or [cfg.lora_r]))
    knobs = lean_knobs(req) if req.objective != "throughput" else resolve(cfg, req.ctx.spec)
    knobs = knobs.allowed_under("fsdp", req.world_size, cfg.target_modules)  # FSDP shards both tables already
    techniques_reason = ""
    if req.objective == "throughput":
        # The config's techniques where they fit, else what `autotune estimate` plans (one rule); max-seq and
        # max-rank run with the leanest already.
        planned, techniques_reason = plan_techniques(
            req.shape("cuda", knobs, seq=seq, rank=ranks[0]), budget, combinations(req)
        )
        knobs = planned.knobs
    fits: dict[int, int] = {}
    for rank in ranks:
        largest = fit(req.shape("cuda", knobs, seq=seq, rank=rank), budget, max_batch=share, max_seq=0)["batch"]
        fits[rank] = divisors_up_to(share, largest)[-1] if largest else 0
    fitting = [r for r in ranks if fits[r]]
    if req.objective == "max-seq":
        rank = ranks[-1]
        shape = req.shape("cuda", knobs, seq=seq, rank=rank)
        seq = fit(shape, budget, max_batch=0, max_seq=req.max_seq or max_pos)["seq"]
        batch = 1 if seq else 0
        seq_reason = f"the longest sequence the estimate fits at batch 1 with {knobs.describe()}"
    else:
        # max-rank: the highest rank that fits; throughput: the config's (lowest candidate) that fits.
        rank = (fitting[-1] if req.objective == "max-rank" else fitting[0]) if fitting else ranks[0]
        batch = fits[rank]
    if not batch or not seq:
        raise NothingFits(
            f"nothing fits in {budget.describe()} per rank for {cfg.model_name} with FSDP over {req.world_size} "
            f"processes at sequence {seq}, rank {rank} (the estimate's per-rank peak): lower max_sequence_length "
            "or lora_r, or use more GPUs"
        )
    est = estimate(replace(req.shape("cuda", knobs, seq=seq, rank=rank), batch=batch))
    note = f"estimate: FSDP's per-rank memory needs {req.world_size} processes on GPUs; not measured"
    best = Trial(
        batch, seq, rank, True, False, est.peak_bytes, 0.0, None, None, est.peak_bytes, note, knobs, measured=False
    )
    batches = BatchPlan(batch, share // batch, req.world_size)
    found = _Found(batch={rank: batch}, by_knobs={knobs.describe(): {rank: batch}})
    reason = _reason(req, best, None, found, seq_reason, batches, None)
    return SolveResult(
        best=best,
        runner_up=None,
        batches=batches,
        seq_reason=seq_reason,
        eval_batch=batch,
        reason=reason
        + (f" Techniques: {techniques_reason}." if techniques_reason else "")
        + f" FSDP per rank, from the estimate ({est.peak_gib:.2f} GiB at the {est.phase.replace('_', ' ')}): not"
        " measured; the first training steps are the measurement (the memory watchdog warns past it).",
        trials=[best],
        budget=budget,
        max_feasible_batch=found.batch,
        max_feasible_batch_by_techniques=found.by_knobs,
    )
