"""bench/gpu_check.sh --rehearse runs every stage on the CPU (tiny model, simulated caps), so the
prepared GPU command is known to work before a GPU is available."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_rehearsal_runs_every_stage_and_writes_results(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh"), "--out", str(out), "--rehearse", "--quick", "--budget-s", "400"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**__import__("os").environ, "PYTHON": sys.executable},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((out / "results.json").read_text())
    assert doc["errors"] == [], doc["errors"]
    assert doc["meta"]["rehearse"] is True and doc["meta"]["finished"]
    stages = doc["stages"]
    assert isinstance(stages["probe"]["gpus"], list) and "nvml_error" in stages["probe"]
    assert list(out.glob("*-cpu-rehearsal.json")), "the run also writes bench/results/'s file name"
    (entry,) = stages["solve_train"]
    assert entry["choice"]["batch_size"] >= 1 and entry["trials"] >= 1
    assert entry["train"]["oom"] is False and 0 < entry["train"]["peak_fraction"] <= 1
    assert entry["estimate"]["peak_bytes"] > 0
    assert "guide" in stages["throughput"] and stages["throughput"]["autotune"]["tokens_per_second"] > 0
    assert stages["longest_seq"]["longest_seq"] >= 64
    assert stages["fixed_shape"][0]["tokens_per_second"] > 0
    assert (out / "probe.json").is_file() and (out / "gpu_check.log").is_file()
    assert "== summary" in proc.stdout
