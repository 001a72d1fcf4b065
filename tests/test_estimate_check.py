"""bench/estimate_check.py holds the estimate to every GPU trial on record; autotune/calibration.json is what it
fitted, and `autotune estimate` states the band and keeps its largest-fit answers on the safe side of it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from autotune.catalog import resolve_model
from autotune.cli import main
from autotune.estimate import CALIBRATION_PATH, calibration, error_band, estimate_peak, largest_fitting
from autotune.units import Budget, GiB

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import estimate_check  # noqa: E402  (bench/ on the path above)


def test_every_gpu_trial_on_record_is_a_check():
    checks = estimate_check.load_checks()
    # The 2026-11-27 H200 record: 13 solve choices and their 30-step runs, 2 throughput runs, 3 longest-sequence
    # trials with a peak, 2 fixed shapes.
    assert len(checks) >= 33 and {c.model for c in checks} >= {"Qwen3-0.6B", "Qwen3-4B", "Qwen3-8B", "Qwen3-14B"}
    assert all(c.peak_bytes > c.stale_bytes >= 0 for c in checks)
    stale = {c.kind: c.stale_bytes for c in checks}
    # The longest-sequence stage ran as the 4th model of its process: three stale tables (0.6B, 4B, 4B-2507).
    assert stale["longest sequence"] == sum(
        estimate_check.table_bytes(m) for m in ("Qwen3-0.6B", "Qwen3-4B", "Qwen3-4B-Thinking-2507")
    )


def test_the_calibration_on_disk_is_what_the_trials_on_record_give():
    """Adding a result file without refitting (python bench/estimate_check.py --write-calibration) fails here."""
    _, fitted = estimate_check.report(estimate_check.load_checks())
    assert json.loads(CALIBRATION_PATH.read_text()) == json.loads(json.dumps(fitted))


def test_out_of_sample_the_estimate_is_within_ten_percent_of_every_clean_peak():
    lomo = estimate_check.leave_one_model_out(estimate_check.load_checks())
    worst = max(abs(e) for m in lomo.values() for e in m["errors"])
    assert worst < 0.10, worst
    # The residual each held-out fit finds is the same few hundred MiB: a constant of the platform, not of a model.
    residuals = [m["residual_bytes"] for m in lomo.values()]
    assert max(residuals) - min(residuals) < 256 * 2**20


def test_largest_fitting_keeps_to_the_safe_side_of_the_band():
    low, high = error_band()
    assert low < 0 < high
    arch = resolve_model("Qwen3-8B").architecture
    budget = Budget.from_gib(16)
    options = dict(rank=16, quantization="4bit", device="cuda", fused_loss=True)
    fit = largest_fitting(arch, budget, seq=512, **options)
    biggest = estimate_peak(arch, batch=fit["batch"], seq=512, **options).peak_bytes
    after = estimate_peak(arch, batch=fit["batch"] + 1, seq=512, **options).peak_bytes
    assert biggest <= budget.usable_bytes * (1 + low) < after
    # On the CPU the estimate is held to the tracker exactly: no band there.
    cpu = largest_fitting(arch, budget, seq=512, **{**options, "device": "cpu"})
    assert cpu["batch"] > fit["batch"]


def test_estimate_prints_its_band(capsys):
    main(["estimate", "--model", "Qwen3-8B", "--max-memory-gb", "16"])
    out = capsys.readouterr().out
    low, high = error_band()
    assert f"expected error {low:+.1%} to {high:+.1%} (out of sample, on {calibration()['trials']} GPU trials" in out
    assert "predicted to fit on the safe side of that error" in out


def test_the_cuda_estimate_adds_the_calibrated_residual_and_the_cpu_one_does_not():
    arch = resolve_model("Qwen3-4B").architecture
    cuda = estimate_peak(arch, batch=1, seq=256, rank=8)
    raw = estimate_peak(arch, batch=1, seq=256, rank=8, calibrated=False)
    assert cuda.peak_bytes - raw.peak_bytes == calibration()["residual_bytes"] > 0.1 * GiB
    cpu = estimate_peak(arch, batch=1, seq=256, rank=8, device="cpu")
    assert cpu.components["cuda_overhead"] == 0
