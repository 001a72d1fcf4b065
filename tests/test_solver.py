"""`autotune solve`: the search against brute force, the real trial on the CPU, leaks, profiles, CLI.

Part 1 drives the search with synthetic memory curves (no model, milliseconds): every answer is compared
with brute force over every batch size. Part 2 runs the real trial.TrialRunner on the tiny
Qwen3 under a simulated cap, and the CLI end to end.
"""

from __future__ import annotations

import inspect
import itertools
import json
import math
from pathlib import Path

import pytest
from helpers import REPO
from helpers.cli import run_cli
from hypothesis import given, settings
from hypothesis import strategies as st

from autotune import hardware
from autotune.config import build_config, load_config
from autotune.context import RunContext
from autotune.errors import UserError
from autotune.measurement import Trial
from autotune.profile import load_profile, save_profile
from autotune.solve import SolveRequest, solve
from autotune.solve.plan import choose_seq
from autotune.solve.search import SearchLog, TrialBudgetExceeded, largest_batch, largest_seq
from autotune.techniques import Knobs
from autotune.units import Budget, GiB

DEMO = REPO / "profiles" / "configs" / "demo.json"
MiB = 2**20


# ------------------------------------------------------------------------------ synthetic trials


def synthetic(peak_fn, *, cap=None, speed=None):
    """measure(batch, seq, rank, usable) from a memory function: a peak over `cap` is an OOM (no peak, as
    a real OOM gives none), one over `usable` ran but is over the margin."""
    calls = []

    def measure(batch, seq, rank, usable):
        calls.append((batch, seq, rank))
        peak = int(peak_fn(batch, seq, rank))
        if cap is not None and peak > cap:
            return Trial(
                batch,
                seq,
                rank,
                fits=False,
                oom=True,
                peak_bytes=None,
                seconds=0.0,
                step_seconds=None,
                tokens_per_second=None,
            )
        tps = speed(batch, seq, rank) if speed else float(batch * seq)
        return Trial(
            batch,
            seq,
            rank,
            fits=peak <= usable,
            oom=False,
            peak_bytes=peak,
            seconds=0.0,
            step_seconds=batch * seq / tps,
            tokens_per_second=tps,
        )

    measure.calls = calls
    return measure


class SyntheticTrials:
    """A solver.Trials over a synthetic `measure(batch, seq, rank, usable[, knobs=])`: the budget is the only
    thing a real runner adds. A memory curve that takes no knobs is the same for every technique."""

    device_type = "cpu"

    def __init__(self, measure, budget_gb: float):
        self.fn, self.budget = measure, Budget.from_gib(budget_gb)

    def measure(self, batch, seq, rank, *, knobs=None):
        if "knobs" in inspect.signature(self.fn).parameters:
            return self.fn(batch, seq, rank, self.budget.usable_bytes, knobs=knobs)
        trial = self.fn(batch, seq, rank, self.budget.usable_bytes)
        trial.knobs = knobs
        return trial


def request(cfg, **kw) -> SolveRequest:
    return SolveRequest(RunContext(cfg), **kw)


def search(peak_fn, usable, *, cap=None, upper=4096, first_guess=2, seq=64, rank=8, **kw):
    """(answer, trials, batches tried) of largest_batch."""
    m = synthetic(peak_fn, cap=cap)
    log = SearchLog()
    got, _ = largest_batch(
        lambda b, s, r: m(b, s, r, usable), log, seq, rank, usable, first_guess=first_guess, upper=upper, **kw
    )
    return got, log.trials, [c[0] for c in m.calls]


def brute_force(peak_fn, usable, *, cap=None, upper=4096, seq=64, rank=8) -> int:
    """The largest batch b <= upper such that every batch 1..b fits: every batch measured in turn."""
    m = synthetic(peak_fn, cap=cap)
    best = 0
    for b in range(1, upper + 1):
        if not m(b, seq, rank, usable).fits:
            break
        best = b
    return best


def memory(kind: str, a: float, k: float, seq: int = 64):
    """peak(batch) = a + k*batch*seq, plus one kind of deviation from the line."""
    step = k * seq

    def peak(b, s=seq, r=8):
        base = a + k * b * s
        if kind == "jump_after_2":  # invisible to trials 1 and 2: the prediction misses high
            return base + (3.5 * step if b >= 3 else 0)
        if kind == "jump_at_2":  # seen as a steep slope: the prediction misses low
            return base + (3.5 * step if b >= 2 else 0)
        if kind == "concave":
            return a + k * s * b**0.85
        if kind == "convex":
            return base + 0.01 * step * b * b
        return base

    return peak


USABLE_X = [0.5, 1.0, 1.5, 2.2, 3.0, 7.9, 18.4, 29.5, 63.5, 500.1]  # usable = a + k*seq*x: x < 1 fits nothing
A_VALUES = [0, 1e6, 3e8]
K_VALUES = [1, 37.5, 1e4]
UPPERS = [1, 2, 5, 4096]
KINDS = ["linear", "noisy", "jump_after_2", "jump_at_2", "concave", "convex"]


def _peak_fn(kind, a, k, usable):
    if kind != "noisy":
        return memory(kind, a, k)
    return jittered(a, k, 64, 0.001, usable)


def jittered(a, k, seq, fraction, usable):
    """A line plus deterministic jitter of up to `fraction` of the usable budget (the solver trusts a
    prediction within 0.5%), and under half a batch step so the peak still grows with the batch."""
    amplitude = min(fraction * usable, 0.45 * k * seq)
    return lambda b, s=seq, r=8: a + k * b * s + ((b * 7919) % 101) / 100 * amplitude


@pytest.mark.parametrize("kind", KINDS)
def test_largest_batch_equals_brute_force(kind):
    worst = 0
    for a, k, x, cap_factor, upper in itertools.product(A_VALUES, K_VALUES, USABLE_X, [None, 1.0, 1.03], UPPERS):
        usable = int(a + k * 64 * x)
        fn = _peak_fn(kind, a, k, usable)
        cap = None if cap_factor is None else usable * cap_factor
        got, trials, tried = search(fn, usable, cap=cap, upper=upper)
        want = brute_force(fn, usable, cap=cap, upper=upper)
        case = dict(kind=kind, a=a, k=k, x=x, cap=cap_factor, upper=upper, tried=tried)
        assert got == want, case
        assert max(tried) <= upper and len(tried) == len(set(tried)), case  # never above upper, never twice
        if want == 0:
            assert tried == [1], case
        bound = {"linear": 4, "noisy": 6}.get(kind, 2 * math.ceil(math.log2(want + 2)) + 4)
        assert len(trials) <= bound, case
        worst = max(worst, len(trials))
    print(f"{kind}: at most {worst} trials")


@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    a=st.floats(0, 1e9),
    k=st.floats(1, 1e5),
    seq=st.sampled_from([16, 64, 512, 4096]),
    x=st.floats(0.2, 300),
    jitter=st.floats(0, 0.001),
    cap_factor=st.sampled_from([None, 1.0, 1.01, 1.2]),
    upper=st.integers(1, 4096),
    first_guess=st.integers(1, 200),
    tolerance=st.sampled_from([0.005, None]),
)
def test_largest_batch_property(a, k, seq, x, jitter, cap_factor, upper, first_guess, tolerance):
    usable = int(a + k * seq * x)
    fn = jittered(a, k, seq, jitter, usable)
    cap = None if cap_factor is None else usable * cap_factor
    got, trials, tried = search(fn, usable, cap=cap, upper=upper, first_guess=first_guess, seq=seq, tolerance=tolerance)
    assert got == brute_force(fn, usable, cap=cap, upper=upper, seq=seq)
    assert max(tried) <= upper and len(tried) == len(set(tried))
    if first_guess <= 2 and jitter == 0:
        assert len(trials) <= 4


@pytest.mark.parametrize("a,k,typical", [(1e8, 1e6, 3), (5e8, 3000.0, 4)], ids=["step-large", "step-in-noise"])
def test_linear_search_uses_three_or_four_trials(a, k, typical):
    """Batch 1, batch 2, the prediction; batch+1 as well when one batch step is within the noise tolerance
    (0.5% of usable: "step-in-noise", 0.04%), or always with tolerance=None."""
    counts = {}
    for target in range(2, 60):
        fn = memory("linear", a, k)
        usable = int(a + k * 64 * (target + 0.5))
        got, trials, tried = search(fn, usable, cap=usable * 1.02)
        assert got == target and tried[:3] == [1, 2, max(target, 3)]  # at 2 the model is checked at 3
        counts[target] = len(trials)
        got, trials, tried = search(fn, usable, cap=usable * 1.02, tolerance=None)
        assert got == target and tried == sorted({1, 2, target, target + 1})
    assert set(counts.values()) <= {3, 4}
    mean = sum(counts.values()) / len(counts)
    assert round(mean) == typical
    print(f"linear, true max 2..59: {mean:.2f} trials on average, {max(counts.values())} at most")


def test_nothing_fits_is_one_trial():
    got, _trials, tried = search(memory("linear", 1e9, 1.0), usable=10**8)
    assert (got, tried) == (0, [1])


def test_everything_up_to_upper_fits():
    got, _, tried = search(memory("linear", 0, 1.0), usable=10**12, upper=6)
    assert got == 6 and max(tried) == 6
    got, _, tried = search(memory("linear", 0, 1.0), usable=10**12, upper=1)
    assert got == 1 and tried == [1]


def test_oom_without_peak_bisects():
    """The second trial runs out of memory (no peak, so no slope): the search bisects below it."""
    fn = memory("linear", 1e6, 1000.0)
    usable = int(1e6 + 1000 * 64 * 11.5)
    got, trials, tried = search(fn, usable, cap=usable, first_guess=40)
    assert got == 11 and tried[:2] == [1, 40] and trials[1].oom and trials[1].peak_bytes is None


def test_prediction_misses_high_then_recovers():
    fn = memory("jump_after_2", 1e6, 1000.0)
    usable = int(1e6 + 1000 * 64 * 20.5)
    got, trials, _ = search(fn, usable, cap=usable * 1.01)
    assert got == brute_force(fn, usable, cap=usable * 1.01) == 17
    missed_high = [t for t in trials if t.predicted_bytes is not None and not t.fits]
    assert missed_high and missed_high[0].batch == 20


def test_prediction_misses_low_then_recovers():
    fn = memory("jump_at_2", 1e6, 1000.0)
    usable = int(1e6 + 1000 * 64 * 20.5)
    got, trials, tried = search(fn, usable, cap=usable * 1.01)
    assert got == brute_force(fn, usable, cap=usable * 1.01) == 17
    # The steep first slope predicts too low; the prediction fits and the search goes on above it.
    first_prediction = next(t for t in trials if t.predicted_bytes is not None)
    assert first_prediction.fits and first_prediction.batch < 17 and max(tried) >= 17


def test_search_log_caps_trials_and_time():
    m = synthetic(memory("linear", 0, 1.0))
    log = SearchLog(max_trials=2)
    log.trial(lambda b, s, r: m(b, s, r, 10**9), 1, 64, 8)
    log.trial(lambda b, s, r: m(b, s, r, 10**9), 2, 64, 8)
    assert log.trial(lambda b, s, r: m(b, s, r, 10**9), 1, 64, 8) is log.trials[0]  # cached: no new trial
    with pytest.raises(TrialBudgetExceeded, match="--max-trials 2"):
        log.trial(lambda b, s, r: m(b, s, r, 10**9), 3, 64, 8)
    with pytest.raises(TrialBudgetExceeded, match="--time-budget"):
        SearchLog(deadline=0.0).trial(lambda b, s, r: m(b, s, r, 10**9), 1, 64, 8)


# ------------------------------------------------------------------------------ sequence length


@pytest.mark.parametrize(
    "lo,hi,step", [(32, 4096, 64), (96, 1000, 64), (100, 100, 64), (96, 1024, 8), (8, 130, 64), (64, 128, 64)]
)
def test_largest_seq_equals_brute_force(lo, hi, step):
    for a, k, q in [(1e6, 5e4, 0.0), (1e6, 5e4, 30.0), (5e7, 1e3, 0.0)]:
        fn = lambda b, s, r: a + k * b * s + q * s * s  # noqa: E731, B023 - used within this iteration
        for usable in sorted({int(fn(1, s, 8)) + d for s in (lo, (lo + hi) // 2, hi, 300, 960) for d in (-1, 0, 1)}):
            m = synthetic(fn)
            got = largest_seq(lambda b, s, r: m(b, s, r, usable), SearchLog(), 8, lo, hi, step)  # noqa: B023
            candidates = sorted({lo, hi, *range(step * (lo // step + 1), hi, step)})
            want = 0
            for s in candidates:  # brute force: every candidate length, shortest first
                if fn(1, s, 8) > usable:
                    break
                want = s
            assert got == want, dict(lo=lo, hi=hi, step=step, usable=usable, a=a, k=k, q=q)
            assert all(b == 1 for b, _, _ in m.calls)


def test_choose_seq():
    stats = {"count": 40, "total": {"p50": 50, "p90": 80, "p95": 85, "p99": 90, "max": 97}}
    seq, why = choose_seq(stats, fixed=None, fallback=256, max_position=4096)
    assert seq == 96 and "p99 length of 90" in why and "40 samples" in why
    assert (
        choose_seq({**stats, "total": {**stats["total"], "p99": 96}}, fixed=None, fallback=256, max_position=4096)[0]
        == 96
    )
    assert (
        choose_seq({**stats, "total": {**stats["total"], "p99": 3}}, fixed=None, fallback=256, max_position=4096)[0]
        == 8
    )
    assert choose_seq(stats, fixed=None, fallback=256, max_position=4096, percentile="p95")[0] == 88
    seq, why = choose_seq(
        {**stats, "total": {**stats["total"], "p99": 5000}}, fixed=None, fallback=256, max_position=4096
    )
    assert seq == 4096 and "clamped" in why
    assert choose_seq(stats, fixed=37, fallback=256, max_position=4096) == (37, "fixed at 37 by the user")
    seq, why = choose_seq(stats, fixed=9000, fallback=256, max_position=4096)
    assert seq == 4096 and "clamped" in why
    for empty in (None, {"count": 0, "total": {}}):
        seq, why = choose_seq(empty, fixed=None, fallback=256, max_position=4096)
        assert seq == 256 and "max_sequence_length 256" in why
    assert choose_seq(None, fixed=None, fallback=8192, max_position=4096)[0] == 4096


# ------------------------------------------------------------------------------ solve (synthetic)


def tiny_cfg(**values):
    return build_config(
        {
            "model_name": "tiny-qwen3",
            "batch_size": 4,
            "gradient_accumulation_steps": 4,
            "lora_r": 8,
            "max_sequence_length": 64,
            **values,
        }
    )


def per_token(mib_fixed=100.0, mib_per_token=1.0, mib_per_rank=0.0):
    return lambda b, s, r: (mib_fixed + mib_per_token * b * s + mib_per_rank * r) * MiB


def speed(b, s, r):  # tokens/s rises with the batch, as it does on a GPU
    return 1000.0 * b * s / (b + 2)


def test_solve_keeps_the_effective_batch_with_the_largest_fitting_divisor():
    # 1 GiB less 5%: 972.8 MiB; peak 100 + 64*b MiB, so 13 fits; 8 is the largest divisor of 16 that fits.
    m = synthetic(per_token(), speed=speed)
    shown = []
    result = solve(request(tiny_cfg(), seq=64), SyntheticTrials(m, 1.0), on_trial=shown.append)
    best = result.best
    assert result.max_feasible_batch == {8: 13}
    assert (best.batch, result.batches.accumulation, best.seq, best.rank) == (8, 2, 64, 8)
    assert best.batch * result.batches.accumulation == result.batches.effective == 16
    assert shown == result.trials and result.stopped is None
    fitting = [t for t in result.trials if t.fits and 16 % t.batch == 0]
    assert best.tokens_per_second == max(t.tokens_per_second for t in fitting)
    assert "batch 8 x accumulation 2 (effective 16, asked 16)" in result.reason
    print(f"synthetic solve: {len(result.trials)} trials: {[t.batch for t in result.trials]}")


def test_solve_never_changes_the_effective_batch():
    # effective 13 (prime) and 12 fits: only batch 1 divides it, so 1 x 13, not 12 x 2 = 24.
    usable_12 = per_token(mib_per_token=(972.8 - 100) / (12.5 * 64))
    result = solve(
        request(tiny_cfg(batch_size=1, gradient_accumulation_steps=13), seq=64),
        SyntheticTrials(synthetic(usable_12, speed=speed), 1.0),
    )
    assert result.max_feasible_batch == {8: 12}
    assert (result.best.batch, result.batches.accumulation) == (1, 13)


def test_solve_world_size_divides_the_effective_batch():
    result = solve(request(tiny_cfg(), seq=64, world_size=2), SyntheticTrials(synthetic(per_token(), speed=speed), 1.0))
    assert (result.best.batch, result.batches.accumulation) == (8, 1)  # 8 per device x 2 devices = 16


def test_solve_uses_the_data_p99_and_the_config_rank():
    stats = {"count": 40, "total": {"p50": 50, "p90": 80, "p95": 85, "p99": 90, "max": 97}}
    result = solve(request(tiny_cfg(), data_stats=stats), SyntheticTrials(synthetic(per_token(), speed=speed), 1.0))
    assert {(t.seq, t.rank) for t in result.trials} == {(96, 8)}
    assert result.seq == 96 and "p99" in result.seq_reason


def test_solve_max_trials_keeps_the_best_so_far():
    result = solve(request(tiny_cfg(), seq=64, max_trials=2), SyntheticTrials(synthetic(per_token(), speed=speed), 1.0))
    trials = result.trials
    assert len(trials) == 2 and "--max-trials 2" in result.stopped
    # Where trial 2 goes depends on the analytic estimate; the choice is the best of the two measured.
    best = max((t for t in trials if t.fits and 16 % t.batch == 0), key=lambda t: t.tokens_per_second)
    assert result.best is best and result.batches.accumulation == 16 // best.batch
    assert "Search stopped early" in result.reason


def test_solve_time_budget_keeps_the_best_so_far():
    import time

    inner = synthetic(per_token(), speed=speed)

    def slow(*args):
        time.sleep(0.6)
        return inner(*args)

    result = solve(request(tiny_cfg(), seq=64, time_budget_s=1.0), SyntheticTrials(slow, 1.0))
    assert 1 <= len(result.trials) <= 2 and "--time-budget" in result.stopped
    assert result.best.fits


def test_solve_nothing_fits_says_what_to_do():
    with pytest.raises(UserError) as err:
        solve(request(tiny_cfg(), seq=64), SyntheticTrials(synthetic(per_token(), speed=speed), 0.05))
    msg = str(err.value)
    assert "nothing fits in 0.05 GiB" in msg and "sequence 64" in msg and "smallest peak 0.16 GiB" in msg
    assert "max_sequence_length" in msg and "\n" not in msg
    # 4-bit is suggested only to a config that is not already 4-bit.
    assert ("quantization" in msg) == (tiny_cfg().quantization != "4bit")
    unquantized = build_config({**tiny_cfg().to_dict(), "quantization": "none"})
    with pytest.raises(UserError, match='use quantization "4bit"'):
        solve(request(unquantized, seq=64), SyntheticTrials(synthetic(per_token(), speed=speed), 0.05))


def test_solve_max_rank_picks_the_highest_rank_that_fits():
    # 14 MiB per rank: at batch 1 rank 64 needs 100 + 64 + 896 MiB > 972.8 usable; rank 32 fits up to batch 6.
    m = synthetic(per_token(mib_per_rank=14.0), speed=speed)
    result = solve(request(tiny_cfg(), seq=64, objective="max-rank", ranks=[4, 8, 16, 32, 64]), SyntheticTrials(m, 1.0))
    found = result.max_feasible_batch
    assert found[64] == 0 and found[32] > 0
    assert result.best.rank == 32
    assert 16 % result.best.batch == 0 and result.best.batch * result.batches.accumulation == 16
    # brute force at rank 32: the largest divisor of 16 that fits
    assert result.best.batch == max(b for b in (1, 2, 4, 8, 16) if (100 + 64 * b + 14 * 32) <= 972.8)


def test_solve_max_seq_picks_the_longest_sequence():
    fn = per_token(mib_per_token=0.5)
    usable = int(1.0 * GiB * 0.95)
    result = solve(request(tiny_cfg(), seq=64, objective="max-seq", max_seq=4096), SyntheticTrials(synthetic(fn), 1.0))
    want = max(s for s in range(64, 4097, 64) if fn(1, s, 8) <= usable)
    assert result.best.seq == result.seq == want == 1728
    assert (result.best.batch, result.batches.accumulation) == (1, 16)


# ------------------------------------------------------------------------------ the real trial (CPU)

BUDGET_GB = 0.141  # tiny-qwen3 (demo config) at seq 32, fp32, r=64, fused + packed: ~40 MB + ~19 MB a sample -> 5 fit,
# the usable budget (0.134 GiB) halfway between batch 5 (0.125 GiB) and batch 6 (0.143): no measurement near its edge
SEQ = 32

QA = "\n\n".join(f"Q{i}: What is item {i}?\nA{i}: Item {i} is a short answer number {i}." for i in range(1, 13))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("solver")
    (root / "data").mkdir()
    (root / "data" / "qa.md").write_text("# Items\n\n" + QA + "\n", encoding="utf-8")
    return root


def _dirs(root: Path, name: str) -> dict:
    return {
        "output_dir": str(root / name),
        "data_dir": str(root / "data"),
        "data_cache_dir": str(root / "cache"),
        "log_dir": str(root / name / "logs"),
        "structured_logging": {"log_file": str(root / name / "log.jsonl")},
        "enable_tensorboard": False,
        "enable_inference_test": False,
        "verify_environment": False,
    }


@pytest.fixture(scope="module")
def real_cfg(workdir):
    # An effective batch of 16: the solver searches micro-batches up to it, so the true maximum (about 5
    # under BUDGET_GB) is inside its range, as it is in a real solve.
    return load_config(
        DEMO, {"quantization": "none", "batch_size": 4, "gradient_accumulation_steps": 4, **_dirs(workdir, "solve")}
    )


@pytest.fixture(scope="module")
def solved(real_cfg):
    from autotune.trial import TrialRunner

    runner = TrialRunner(RunContext(real_cfg), Budget.from_gib(BUDGET_GB))
    # The config's techniques only: this solve is held against a brute force over one memory curve.
    req = request(real_cfg, seq=SEQ, checkpointing="on", techniques=False)
    shown = []
    result = solve(req, runner, on_trial=shown.append)
    # The brute force over the same memory curve, right after the solve on the same runner: under pytest-xdist
    # another test of this module may run in this process before the test that compares them, and what it leaves
    # in the process (a trained run's lazily built state) would move the brute force's peaks, not the solve's.
    brute = {}
    for b in itertools.count(1):  # every batch size from 1 to the first that does not fit
        brute[b] = runner.measure(b, SEQ, real_cfg.lora_r)
        if not brute[b].fits:
            break
    return req, result, runner, shown, brute


def profile_of(req, result, runner, hardware=None) -> dict:
    from autotune.solve.record import profile_from_solve

    return profile_from_solve(
        req,
        result,
        hardware=hardware or {"device": "cpu"},
        init=runner.init if runner else "random",
        dtype=runner.dtype if runner else None,
        device_type="cpu",
    )


def test_real_solve_equals_brute_force(solved):
    req, result, runner, shown, brute = solved
    rank, usable, budget = req.ctx.cfg.lora_r, result.budget.usable_bytes, result.budget.total_bytes
    true_max = max(b for b, t in brute.items() if t.fits)
    assert 3 <= true_max <= 6, "the cap no longer sizes this test as intended"
    assert result.max_feasible_batch == {rank: true_max}
    # A shape measures the same peak every time: the trials before did not leave memory behind. Training trials
    # only: the evaluation trial at the same batch is a different step (no backward), whose peak may differ.
    for t in result.trials:
        if t.kind == "train" and t.batch in brute and t.peak_bytes is not None:
            assert abs(t.peak_bytes - brute[t.batch].peak_bytes) <= 64 * 1024
    best = result.best
    assert best.fits and best.peak_bytes <= usable <= budget
    assert best.batch * result.batches.accumulation == req.ctx.cfg.effective_batch
    # Four training trials (two to fit the line, the predicted maximum, the divisor of the effective
    # batch) and one for the evaluation batch.
    assert shown == result.trials and [t.kind for t in result.trials].count("train") <= 4
    profile = profile_of(req, result, runner)
    assert len(profile["trials"]) == len(result.trials)
    assert profile["measurement"]["peak_bytes"] == best.peak_bytes <= profile["constraints"]["usable_bytes"]
    print(
        f"real solve: true max {true_max}, solver {len(result.trials)} trials "
        f"{[t.batch for t in result.trials]}, brute force {len(brute)} trials"
    )


def test_twenty_failing_trials_leave_nothing_behind(real_cfg):
    import psutil

    from autotune.trial import TrialRunner

    runner = TrialRunner(RunContext(real_cfg), Budget(4 * GiB))
    rank, seq = real_cfg.lora_r, 16
    ok = runner.measure(1, seq, rank)  # fits; loads everything a trial imports
    assert ok.fits
    baseline = runner.meter.current_bytes()
    rss = psutil.Process().memory_info().rss
    for i in range(20):
        # Alternate an OOM at the first activation with one at the peak of the step (gradients, optimizer
        # state and the autograd graph alive).
        runner.set_budget(Budget(baseline + MiB if i % 2 == 0 else ok.peak_bytes - MiB))
        t = runner.measure(1, seq, rank)
        assert t.oom and not t.fits and t.peak_bytes is None
        assert abs(runner.meter.current_bytes() - baseline) <= 4096, f"trial {i}"
    grown = psutil.Process().memory_info().rss - rss
    assert grown < 100 * MiB, f"RSS grew {grown / MiB:.0f} MiB over 20 failed trials"
    runner.set_budget(Budget(4 * GiB))
    again = runner.measure(1, seq, rank)
    assert again.fits and abs(again.peak_bytes - ok.peak_bytes) <= 4096
    print(f"20 failed trials: meter back to {baseline} bytes each time, RSS {grown / MiB:+.1f} MiB")


def test_a_model_the_runner_let_go_is_really_gone(real_cfg):
    """With an 8-bit bitsandbytes optimizer the HF Trainer registers the embeddings in bitsandbytes'
    process-wide GlobalOptimManager; unless the trial takes them out again, a rank change (or the next
    benchmark stage) measures with the old model's vocabulary x hidden table still resident."""
    import gc
    import weakref
    from dataclasses import replace

    from autotune.trial import TrialRunner

    cfg = replace(real_cfg, optimizer="paged_adamw_8bit")
    runner = TrialRunner(RunContext(cfg), Budget(4 * GiB))
    first = runner.measure(1, 16, 8)
    table = weakref.ref(runner.model_for(8).model.get_base_model().get_input_embeddings().weight)
    second = runner.measure(1, 16, 16)  # another rank: a new model
    gc.collect()
    assert table() is None, "the rank-8 model's embedding table outlived it"
    lora_growth = 2 * 4 * sum(p.numel() for p in runner.model_for(16).model.parameters() if p.requires_grad) / 2
    assert second.peak_bytes - first.peak_bytes < 4 * lora_growth  # the new rank's adapters, not a second table
    runner.release()


# ------------------------------------------------------------------------------ profile and train


@pytest.fixture(scope="module")
def profile_path(solved, workdir):
    from autotune.profile import hardware_fingerprint

    req, result, runner, _, _ = solved
    profile = profile_of(req, result, runner, hardware_fingerprint(None, "cpu"))
    return profile, save_profile(profile, workdir / "solved.json")


@pytest.fixture(scope="module")
def train_config(workdir):
    path = workdir / "train.json"
    path.write_text(
        json.dumps({"base_config": str(DEMO), "quantization": "none", "max_steps": 2, **_dirs(workdir, "train")}),
        encoding="utf-8",
    )
    return path


def test_profile_round_trip(profile_path):
    profile, path = profile_path
    assert load_profile(path) == profile


def test_train_with_profile_runs_inside_the_cap(profile_path, train_config, workdir, capsys):
    from autotune.memory import CpuTrackedMeter

    profile, path = profile_path
    budget = int(profile["constraints"]["max_memory_gb"] * GiB)
    meter = CpuTrackedMeter()  # everything training allocates, model included, under the solved budget
    meter.cap(budget)
    with meter:
        code, _out, err = run_cli(capsys, "train", "--profile", path, "--config", train_config)
    meter.cap(None)
    assert code == 0, err
    used = json.loads((workdir / "train" / "autotune_config.json").read_text())
    choice = profile["choice"]
    assert (used["batch_size"], used["gradient_accumulation_steps"], used["max_sequence_length"]) == (
        choice["batch_size"],
        choice["gradient_accumulation_steps"],
        SEQ,
    )
    summary = json.loads((workdir / "train" / "run_summary.json").read_text())
    assert summary["status"] == "succeeded" and summary["oom_recoveries"] == []
    assert summary["final"]["global_step"] == 2
    assert meter.peak_bytes() <= budget
    print(
        f"train with the profile: batch {choice['batch_size']}, peak {meter.peak_bytes() / MiB:.1f} MiB "
        f"of {budget / MiB:.1f} MiB (trial measured {profile['measurement']['peak_bytes'] / MiB:.1f} MiB)"
    )


def _corrupt(profile: dict, how: str) -> str:
    doc = json.loads(json.dumps(profile))
    if how == "bad json":
        return json.dumps(doc)[:-20]
    if how == "wrong kind":
        doc["kind"] = "autotune.probe"
    elif how == "older schema":
        doc["schema_version"] = 0
    elif how == "missing choice keys":
        del doc["choice"]["batch_size"], doc["choice"]["lora_r"]
    elif how == "not an object":
        doc = [doc]
    elif how == "margin a string":
        doc["constraints"]["margin"] = "0.05"
    elif how == "budget null":
        doc["constraints"]["max_memory_gb"] = None
    elif how == "peak a string":
        doc["measurement"]["peak_bytes"] = "12 GB"
    elif how == "trial without keys":
        doc["trials"].append({"batch": 2})
    return json.dumps(doc)


@pytest.mark.parametrize(
    "how,message",
    [
        ("bad json", "the profile is corrupt"),
        ("wrong kind", "not an autotune profile"),
        ("older schema", "schema_version 0"),
        ("missing choice keys", "missing keys ['batch_size', 'lora_r']"),
        ("not an object", "not an autotune profile"),
        # Profiles that parse but hold a wrong kind of value where train and `profiles plot` read one: tracebacks.
        ("margin a string", "constraints.margin is '0.05', not a number from 0 to 0.5"),
        ("budget null", "constraints.max_memory_gb is None, not a positive number"),
        ("peak a string", "measurement.peak_bytes is '12 GB', not a byte count or null"),
        ("trial without keys", "seq is None, not a positive integer"),
    ],
)
def test_train_rejects_a_corrupt_profile(profile_path, train_config, tmp_path, capsys, how, message):
    bad = tmp_path / "bad.json"
    bad.write_text(_corrupt(profile_path[0], how), encoding="utf-8")
    code, out, err = run_cli(capsys, "train", "--profile", bad, "--config", train_config)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and message in err and str(bad) in err
    assert "Traceback" not in err and err.count("\n") == 1
    if how.startswith(("margin", "budget", "peak", "trial")):
        code, out, err = run_cli(capsys, "profiles", "plot", bad)
        assert code == 2 and message in err and "Traceback" not in err


# ------------------------------------------------------------------------------ CLI


@pytest.fixture
def clean_alloc_env(monkeypatch):
    """`autotune solve` sets PYTORCH_CUDA_ALLOC_CONF in its process; put it back for the tests after."""
    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        monkeypatch.delenv(name, raising=False)


def test_cli_solve_writes_profile_and_plot(workdir, tmp_path, capsys, monkeypatch, clean_alloc_env):
    monkeypatch.chdir(tmp_path)
    out_json = tmp_path / "p.json"
    code, out, err = run_cli(
        capsys,
        "solve",
        "--model",
        "tiny-qwen3",
        "--max-memory-gb",
        BUDGET_GB,
        "--seq",
        SEQ,
        "--output",
        out_json,
        "--plot",
        "--set",
        "quantization=none",
        "--set",
        "bf16=false",  # fp32: a bf16 matmul on a CPU without AVX512-BF16 takes torch's ~50x slower reference GEMM
        "--set",
        f"data_dir={workdir / 'data'}",
        "--set",
        f"output_dir={tmp_path / 'out'}",
    )
    assert code == 0, err
    profile = load_profile(out_json)
    assert profile["choice"]["max_sequence_length"] == SEQ and profile["choice"]["quantization"] == "none"
    assert profile["measurement"]["peak_bytes"] <= profile["constraints"]["usable_bytes"]
    assert profile["data"]["count"] == 12  # the data statistics are recorded, though --seq fixed the length
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    trial_lines = [line for line in err.splitlines() if line.startswith("  batch ")]
    assert len(trial_lines) == len(profile["trials"])  # each trial shown as it ran
    assert f"choice: batch_size {profile['choice']['batch_size']}" in out and str(out_json) in out


def test_cli_solve_unknown_model_exits_2(capsys, clean_alloc_env):
    code, _out, err = run_cli(capsys, "solve", "--model", "Qwen3-7B", "--max-memory-gb", "8")
    assert code == 2 and "Qwen3-8B" in err and "Traceback" not in err


def test_cli_solve_ranks_past_the_hidden_size_exit_2_before_any_trial(capsys, tmp_path, clean_alloc_env):
    hidden = RunContext(build_config({"model_name": "tiny-qwen3"})).architecture.hidden_size
    argv = ["solve", "--model", "tiny-qwen3", "--max-memory-gb", "1", "--objective", "max-rank"]
    code, _out, err = run_cli(capsys, *argv, "--ranks", f"8,{hidden * 2}", "--output", tmp_path / "p.json")
    assert code == 2 and f"--ranks: {hidden * 2} is more than" in err and "Traceback" not in err
    assert "  batch " not in err and not (tmp_path / "p.json").exists()  # refused before measuring or writing


def test_cli_solve_without_budget_or_gpu_exits_2(capsys, monkeypatch, tmp_path, clean_alloc_env):
    monkeypatch.setattr(hardware, "probe", lambda output_dir=".", nvml=None: {"gpus": [], "host": {}})
    code, _out, err = run_cli(capsys, "solve", "--model", "tiny-qwen3", "--set", f"output_dir={tmp_path}")
    assert code == 2 and "--max-memory-gb" in err and "Traceback" not in err and err.count("\n") == 1


def test_throughput_measures_the_techniques_the_estimate_ranks_and_keeps_the_faster():
    """Checkpointing and the other techniques are knobs: without checkpointing the step is faster but needs
    more memory. The solver measures the combinations the estimate ranks best (here: off, on the tiny model
    everything is estimated to fit) and the choice and the profile carry whichever measured faster."""
    cfg = build_config(
        {
            "model_name": "tiny-qwen3",
            "effective_batch_size": 16,
            "batch_size": 1,
            "gradient_accumulation_steps": 16,
            "gradient_checkpointing": True,
        }
    )
    usable_cap = 10 * GiB

    def measure(batch, seq, rank, usable, knobs=None):
        ckpt = knobs.checkpointing
        peak = int((1 + batch * (0.4 if ckpt else 1.1)) * GiB)  # no checkpointing: ~3x the activations
        fits = peak <= usable
        speed = 1000 * batch * (1.0 if ckpt else 1.3)
        return Trial(batch, seq, rank, fits, False, peak, 0.01, 0.01, speed if fits else None, knobs=knobs)

    req = request(cfg, seq=64)
    result = solve(req, SyntheticTrials(measure, usable_cap / GiB))
    usable = result.budget.usable_bytes
    # The search stops at the effective batch (16): nothing above it could be chosen.
    assert result.max_feasible_batch[cfg.lora_r] == min(
        16, max(b for b in range(1, 64) if (1 + b * 0.4) * GiB <= usable)
    )
    by_techniques = result.max_feasible_batch_by_techniques
    # The estimate ranks "no checkpointing, no fused loss" fastest of the rest; every slower combination that
    # fits no larger batch is not measured.
    assert list(by_techniques) == ["ckpt+fused+packed", "no-ckpt+packed"]
    assert by_techniques["no-ckpt+packed"][cfg.lora_r] == max(
        b for b in (1, 2, 4, 8, 16) if (1 + b * 1.1) * GiB <= usable
    )
    assert len(result.trials) <= 12
    best = result.best
    # With checkpointing the largest divisor of 16 that fits is 16 (16000 tok/s); without, 4 (5200 tok/s).
    assert best.checkpointing is True and best.batch == 16
    assert f"With no-ckpt+packed: rank {cfg.lora_r} up to batch 4." in result.reason

    # Make the un-checkpointed run much faster: now it wins, and the profile says so.
    def fast_off(batch, seq, rank, usable, knobs=None):
        t = measure(batch, seq, rank, usable, knobs)
        if t.checkpointing is False and t.fits:
            t.tokens_per_second *= 5  # 4 x 1300 x 5 = 26000 > 16000
        return t

    result = solve(req, SyntheticTrials(fast_off, usable_cap / GiB))
    assert result.best.checkpointing is False
    profile = profile_of(req, result, None)
    choice = profile["choice"]
    assert choice["gradient_checkpointing"] is False and choice["fused_loss"] == "off" and choice["packing"] == "on"
    assert choice["batch_size"] * choice["gradient_accumulation_steps"] == 16
    assert load_profile(save_profile(profile, Path(req.ctx.cfg.output_dir) / "p.json"))["choice"] == choice


def test_a_config_that_fixes_the_techniques_gets_them_measured_and_nothing_else():
    cfg = build_config(
        {
            "model_name": "tiny-qwen3",
            "effective_batch_size": 16,
            "batch_size": 1,
            "fused_loss": "on",
            "offload_activations": "off",
            "embedding_on_cpu": "off",
            "lm_head_8bit": "off",
            "tiled_mlp": "off",
            "packing": "off",
        }
    )
    m = synthetic(per_token(), speed=speed)
    result = solve(request(cfg, seq=64, checkpointing="on"), SyntheticTrials(m, 1.0))
    assert {t.knobs for t in result.trials} == {Knobs(checkpointing=True, fused_loss=True)}
