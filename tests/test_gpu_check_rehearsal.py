"""bench/gpu_check.sh --rehearse runs every stage on the CPU (tiny model, simulated caps), so the
prepared GPU command is known to work before a GPU is available."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_rehearsal_runs_every_stage_and_records_every_trial(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh"), "--out", str(out), "--rehearse", "--quick", "--budget-s", "900"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((out / "results.json").read_text())
    assert doc["errors"] == [], doc["errors"]
    assert doc["meta"]["rehearse"] is True and doc["meta"]["finished"]
    assert doc["meta"]["fused_loss_kernel"] == "chunked"  # no liger on a CPU
    stages = doc["stages"]
    assert isinstance(stages["probe"]["gpus"], list) and "nvml_error" in stages["probe"]
    assert list(out.glob("*-cpu-rehearsal.json")), "the run also writes bench/results/'s file name"
    (cap,) = stages["min_cap"]
    assert cap["resolved"] and 0 < cap["smallest_cap_gb"] <= 0.5
    assert stages["longest_seq"]["with_every_technique"] >= 64
    # A mixture of experts' step beside its estimate (the tiny Qwen3-MoE here), with NF4 and with bf16 experts.
    forms = sorted((m["experts_4bit"], m["experts_split_lora"]) for m in stages["moe"])
    assert forms == [(False, False), (False, True), (True, False)]  # bf16 folded, bf16 split, NF4
    for moe in stages["moe"]:
        assert moe["fits"] and moe["peak_bytes"] > 0 and abs(moe["estimate_bytes"] / moe["peak_bytes"] - 1) < 0.10
    (hybrid,) = stages["hybrid"]  # a Qwen3.5 hybrid's bf16 LoRA step (the tiny one here), its kernel named
    assert hybrid["fits"] and hybrid["delta_kernel"] == "reference"
    assert abs(hybrid["estimate_bytes"] / hybrid["peak_bytes"] - 1) < 0.10
    assert {"plain", "fused_loss"} <= set(stages["costs"]["runs"])
    real = stages["real_data"]
    assert real["preset"] == "hardware/16gb" and real["guide"]["max_sequence_length"] == 512  # the preset file's
    solved = real["solved"]
    assert solved["status"] == "succeeded" and solved["real_tokens_per_second"] > 0 and solved["checkpoints"]
    assert solved["tensorboard_files"] >= 1
    (entry,) = stages["solve_train"]
    assert entry["choice"]["batch_size"] >= 1 and entry["train"]["oom"] is False
    # Every trial of every stage, with what the estimate needs to predict it (bench/estimate_check.py).
    trials = doc["trials"]
    assert len(trials) >= 10 and {t["stage"] for t in trials} >= {
        "min_cap",
        "moe",
        "hybrid",
        "longest_seq",
        "costs",
        "solve",
    }
    assert all({"batch", "seq", "rank", "knobs", "quantization", "optimizer", "peak_bytes"} <= set(t) for t in trials)
    # And the whole run's plan beside what the device showed of it: the phases, the host memory, the load's peak.
    planned = [t for t in trials if t["knobs"]]
    assert planned and all({"planned_phases", "planned_host_bytes", "host_rss_bytes"} <= set(t) for t in planned)
    assert all(set(t["planned_phases"]) == {"load", "step", "eval", "save"} for t in planned)
    assert (out / "probe.json").is_file() and (out / "gpu_check.log").is_file()
    assert "== summary" in proc.stdout
