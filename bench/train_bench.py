"""CPU training benchmark: tokens/s and peak tracked memory of the demo model, bf16 and 4-bit.

    python bench/train_bench.py [--steps 6] [--batch 4] [--seq 128] [--json OUT]

Measures the real training step through the solver's own trial (trial.TrialRunner.measure: the Trainer
`autotune train` uses) on the tiny model, under the CPU memory tracker with no cap. Figures, not asserts.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def run(quantization: str, steps: int, batch: int, seq: int) -> dict:
    from autotune.config import build_config
    from autotune.context import RunContext
    from autotune.trial import TrialRunner
    from autotune.units import Budget, GiB

    cfg = build_config(
        {
            "model_name": "tiny-qwen3",
            "init": "random",
            "quantization": quantization,
            "lora_r": 16,
            "lora_alpha": 32,
            "optimizer": "adamw_torch",
            "output_dir": "/tmp/autotune-bench",
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        }
    )
    # No cap worth the name: the figures are speed and the tracked peak, not whether it fits.
    runner = TrialRunner(RunContext(cfg), Budget(2**50))
    t = time.perf_counter()
    runner.model_for(cfg.lora_r)
    build_s = time.perf_counter() - t
    trial = runner.measure(batch, seq, cfg.lora_r, steps=steps)
    runner.release()
    return {
        "quantization": quantization,
        "batch": batch,
        "seq": seq,
        "steps": steps,
        "build_seconds": round(build_s, 2),
        "step_seconds": round(trial.step_seconds, 4),
        "tokens_per_second": round(trial.tokens_per_second, 1),
        "peak_tracked_gib": round(trial.peak_bytes / GiB, 4),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--json")
    args = ap.parse_args()
    rows = [run(q, args.steps, args.batch, args.seq) for q in ("none", "4bit")]
    print(f"{'weights':8} {'batch x seq':>12} {'step s':>8} {'tokens/s':>9} {'peak GiB':>9}")
    for r in rows:
        print(
            f"{r['quantization']:8} {r['batch']:>5} x {r['seq']:<5} {r['step_seconds']:>8.3f} "
            f"{r['tokens_per_second']:>9.1f} {r['peak_tracked_gib']:>9.4f}"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "kind": "train_bench",
                    "device": "cpu",
                    "cpu": platform.processor(),
                    "date": time.strftime("%Y-%m-%d"),
                    "rows": rows,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
