"""Tests that notice what went unnoticed (issue 10, part 8).

The issue broke one behaviour at a time, 50 times; the suite caught 41. Each test here fails on one of the
nine it missed (each was checked against that break). Faked, where this machine cannot have the real
thing and said at the place: the CUDA allocator's figures (no GPU here).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers.faults import stop
from helpers.runs import PAIRS, QUIET, config_values, write_qa
from transformers import TrainerCallback

from autotune.config import build_config
from autotune.context import RunContext
from autotune.errors import UserError
from autotune.units import Budget, GiB, MiB

pytestmark = pytest.mark.filterwarnings("ignore:Could not find a config file:UserWarning")


# ------------------------------------------------------------------ the trial judges against the margin


def test_a_trial_fits_only_inside_the_budget_less_the_margin(autotune_cache):
    """A real trial (the CPU meter counts tensor bytes exactly) against three budgets around its peak."""
    from autotune.trial import TrialRunner

    cfg = build_config({"model_name": "tiny-qwen3", "quantization": "none", "bf16": False, "lora_r": 4})
    runner = TrialRunner(RunContext(cfg), Budget(2 * GiB, 0.05))
    try:
        peak = runner.measure(2, 32, 4).peak_bytes
        assert peak
        # Over the usable part, under the total: it ran (no OOM under the cap), and it does not fit.
        runner.set_budget(Budget(int(peak / 0.985), 0.05))
        inside_total = runner.measure(2, 32, 4)
        assert not inside_total.oom and inside_total.peak_bytes == peak
        assert runner.budget.usable_bytes < peak <= runner.budget.total_bytes
        assert not inside_total.fits
        # Under the usable part too: it fits.
        runner.set_budget(Budget(int(peak / 0.9), 0.05))
        assert runner.measure(2, 32, 4).fits
    finally:
        runner.release()


@pytest.mark.parametrize("margin", [0.05, 0.2])
def test_the_margin_is_taken_once_and_is_the_same_figure_in_solve_and_the_watchdog(margin):
    """A probed card with 23.5 GiB free: the budget is the free memory and its usable part is (1 - margin) of it
    (95% with the default margin, not 95% of 95%); the watchdog warns past that same line, with or without the
    profile that solve writes."""
    from autotune.solve.command import budget_for
    from autotune.units import DEFAULT_MARGIN
    from autotune.watchdog import limit_for

    cfg = build_config({"model_name": "tiny-qwen3"})
    probe = {"gpus": [{"index": 0, "name": "card", "memory_free_gb": 23.5, "memory_total_gb": 24.0, "error": None}]}
    budget, source = budget_for(None, cfg, False, probe, margin)
    assert (budget.total_bytes, budget.margin) == (int(23.5 * GiB), margin)
    assert budget.usable_bytes == int(23.5 * GiB * (1 - margin))
    assert "23.5 GiB free on GPU 0" in source
    profile = {"constraints": {"max_memory_gb": budget.gb, "margin": budget.margin}}
    assert limit_for(profile, None)[0] == budget.usable_bytes  # type: ignore[index]
    assert limit_for(None, 23.5)[0] == int(23.5 * GiB * (1 - DEFAULT_MARGIN))  # type: ignore[index]


# ---------------------------------------------------------------------- one rule for the effective batch


class _LinearTrials:
    """solver.Trials over a straight memory line: 100 MiB plus 1 MiB a token."""

    device_type = "cpu"

    def __init__(self, budget_gb: float):
        self.budget = Budget.from_gib(budget_gb)

    def measure(self, batch, seq, rank, *, knobs=None):
        from autotune.measurement import Trial

        peak = (100 + batch * seq) * MiB
        fits = peak <= self.budget.usable_bytes
        return Trial(batch, seq, rank, fits, False, peak, 0.0, 0.001, batch * seq / 0.001, knobs=knobs)


def test_an_effective_batch_the_ranks_cannot_share_is_refused_by_solve_as_by_train():
    """Effective 12 over 5 devices: no micro-batch x accumulation per device makes 12 (2 x 1 x 5 is 10, 2 x 2 x 5
    is 20). Solve refuses it as train does (one rule: batching.BatchPlan), instead of rounding either way."""
    from autotune.batching import BatchPlan
    from autotune.solve import SolveRequest, solve

    cfg = build_config(
        {"model_name": "tiny-qwen3", "batch_size": 4, "gradient_accumulation_steps": 3, "max_sequence_length": 64}
    )
    with pytest.raises(UserError, match="effective batch 12 cannot be split over 5 processes"):
        solve(SolveRequest(RunContext(cfg), seq=64, world_size=5, techniques=False), _LinearTrials(1.0))
    with pytest.raises(UserError, match="effective batch 12 cannot be split over 5 processes"):
        BatchPlan.largest(12, 5, 4)
    # Over 4 devices it splits: the largest micro-batch that fits and divides 3, the effective batch exact.
    result = solve(SolveRequest(RunContext(cfg), seq=64, world_size=4, techniques=False), _LinearTrials(1.0))
    assert (result.batches.micro, result.batches.accumulation, result.batches.effective) == (3, 1, 12)


# ------------------------------------------------------------------------- atomic writes stay atomic


def test_a_write_that_fails_midway_leaves_the_old_file_whole(tmp_path):
    from autotune.fsutil import atomic_write_text

    path = tmp_path / "profile.json"
    path.write_text('{"old": true}\n', encoding="utf-8")
    with pytest.raises(UnicodeEncodeError):
        atomic_write_text(path, '{"new": "' + "x" * 100_000 + '\ud800"}')  # a lone surrogate: fails while writing
    assert path.read_text(encoding="utf-8") == '{"old": true}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["profile.json"]  # no temp file left behind


def test_a_write_the_disk_cannot_hold_leaves_the_old_file_whole(small_disk):
    from autotune.fsutil import atomic_write_text

    disk = small_disk(4)
    path = disk / "run_summary.json"
    path.write_text("old and whole\n", encoding="utf-8")
    with pytest.raises(OSError, match="No space left"):
        atomic_write_text(path, "y" * (8 * MiB))
    assert path.read_text(encoding="utf-8") == "old and whole\n"
    assert [p.name for p in disk.iterdir()] == ["run_summary.json"]


_WRITER = """
import sys
from autotune.fsutil import atomic_write_text
path, n = sys.argv[1], 0
while True:  # alternate two whole documents until killed
    n += 1
    atomic_write_text(path, ("A" if n % 2 else "B") * (16 * 2**20) + "\\n")
    print(n, flush=True)
"""


def test_a_process_killed_while_writing_leaves_a_whole_file(tmp_path):
    """SIGKILL a process that does nothing but write 16 MiB files: whenever the kill lands, the file holds one
    whole document. (A plain open()+write is caught mid-write by almost any kill, the file then part A, part
    B or short.)"""
    path = tmp_path / "doc.txt"
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline()  # one document written: the next write is under way
            time.sleep(0.05)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
        finally:
            stop(proc)
        text = path.read_text(encoding="ascii")
        assert text in ("A" * (16 * 2**20) + "\n", "B" * (16 * 2**20) + "\n"), (len(text), text[:1], text[-2:])


# --------------------------------------------------------------------- the effective batch sets accumulation


def test_effective_batch_size_sets_the_accumulation(tmp_path):
    cfg = build_config({"batch_size": 4, "gradient_accumulation_steps": 1, "effective_batch_size": 32})
    assert cfg.gradient_accumulation_steps == 8  # not only effective_batch, which reads the key itself
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"batch_size": 2, "effective_batch_size": 12}), encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-m", "autotune.cli", "validate", str(path), "--json"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    resolved = json.loads(done.stdout)["config"]
    assert (resolved["batch_size"], resolved["gradient_accumulation_steps"]) == (2, 6)


# --------------------------------------------------------------------- the trial cache tells variants apart


def test_the_trial_cache_tells_checkpointing_on_and_off_apart():
    from autotune.measurement import Trial
    from autotune.solve.search import SearchLog
    from autotune.techniques import Knobs

    measured: list[tuple] = []

    def measure(batch, seq, rank):
        measured.append((batch, seq, rank))
        return Trial(batch, seq, rank, True, False, GiB, 0.0, 0.01, 100.0)

    log = SearchLog()
    log.variant = Knobs(checkpointing=True, fused_loss=True)
    first = log.trial(measure, 4, 64, 8)
    assert log.trial(measure, 4, 64, 8) is first and len(measured) == 1  # the same trial is measured once
    log.variant = Knobs(checkpointing=False, fused_loss=True)
    second = log.trial(measure, 4, 64, 8)
    assert second is not first and len(measured) == 2 and len(log.trials) == 2


# ------------------------------------------------------- training rows never longer than max_sequence_length


class _RowLengths(TrainerCallback):
    def __init__(self):
        self.lengths: list[int] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        def hook(module, args, kwargs):
            if module.training:
                self.lengths.append(kwargs["input_ids"].shape[1])

        model.register_forward_pre_hook(hook, with_kwargs=True)


def test_training_rows_are_never_padded_past_max_sequence_length(tmp_path, autotune_cache):
    """61 is not a multiple of 8: rounding rows up for tensor cores must stop at 61, the length the solver
    measured (packing off: a packed row is a micro-batch's samples end to end)."""
    from autotune.runner import train

    long_pairs = [(q, a + " Then more words follow, well past the end of the window." * 4) for q, a in PAIRS]
    cfg = build_config(
        config_values(
            tmp_path,
            data_dir=str(write_qa(tmp_path / "long", long_pairs)),
            max_sequence_length=61,
            packing="off",
            max_steps=3,
            eval_ratio=0.0,
        )
    )
    rows = _RowLengths()
    train(cfg, extra_callbacks=[rows], **QUIET)
    assert rows.lengths and max(rows.lengths) == 61  # truncated samples fill the window exactly


# ------------------------------------------------------------------- the CUDA meter's arithmetic (no GPU)


def test_the_cuda_meter_counts_reserved_memory_plus_the_context(monkeypatch):
    """Faked, as this machine has no GPU: the allocator's four figures. Reserved (cached blocks included) plus
    the CUDA context outside the allocator is what the card no longer has; allocated alone is less."""
    from autotune.memory import CudaMeter

    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda index=None: 5 * GiB)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda index=None: 3 * GiB)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda index=None: 4 * GiB)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda index=None: 2 * GiB)
    meter = CudaMeter(0, overhead_bytes=640 * MiB)
    assert meter.peak_bytes() == 5 * GiB + 640 * MiB

    fractions: list[float] = []
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, index=None: fractions.append(f))
    monkeypatch.setattr(meter, "total_bytes", lambda: 80 * GiB)
    meter.cap(16 * GiB)  # the allocator gets the budget less the context
    assert fractions == [pytest.approx((16 * GiB - 640 * MiB) / (80 * GiB))]


def test_a_user_error_is_the_only_way_a_bad_rank_reaches_the_user():
    """lora_r is bounded by the hidden size before anything allocates it (it crashed the allocator)."""
    with pytest.raises(UserError, match="more than tiny-qwen3's hidden size 64"):
        build_config({"model_name": "tiny-qwen3", "lora_r": 10**26})


# --------------------------------------------------------- advice that does not send the user in a circle


@pytest.mark.parametrize("overflow", ["drop", "truncate"])
def test_no_sample_fits_advises_truncate_only_where_it_is_not_already_set(tmp_path, autotune_cache, overflow):
    from autotune.data.prepare import prepare_data

    cfg = build_config(
        {
            "model_name": "tiny-qwen3",
            "tokenizer_name": "qwen3-offline",
            "data_dir": str(write_qa(tmp_path / "d", PAIRS)),
            "data_cache_dir": str(tmp_path / "cache"),
            "max_sequence_length": 32,
            "overflow": overflow,
            # A prompt that alone fills the window: no truncation of the answer can save a sample.
            "system_prompt": "Answer with the code word. " * 20,
            "eval_ratio": 0.0,
        }
    )
    with pytest.raises(UserError, match="no training sample fits") as caught:
        prepare_data(RunContext(cfg), echo=lambda m: None)
    assert ('overflow="truncate"' in str(caught.value)) == (overflow != "truncate")
