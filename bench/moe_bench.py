"""Qwen3-30B-A3B's widths on this machine: the estimate against the CPU tracker, and the estimate's answers for GPUs.

    python bench/moe_bench.py [--seqs 2048,4096] [--vocab 151936] [--layers 2] [--json OUT]

1. A full-width Qwen3-30B-A3B (hidden 2,048, 128 experts of width 768, 8 per token) with `--layers` of its 48
   layers: one QLoRA step (4-bit attention; fp32, as a CPU without AVX512-BF16 runs it fastest) with adapters on the
   experts, checkpointing and the fused loss, measured by trial.TrialRunner (the solver's own trial, the tracked
   meter) against estimate/'s prediction, at each sequence.
2. The estimate's answers (no GPU needed): Qwen3-30B-A3B at 2,048 tokens, rank 16, 4-bit, on a 24 GB card, and
   Qwen3-235B-A22B over 8 GPUs with FSDP at 4,096 tokens under 80 GB. Predictions; a GPU run measures them.

Figures, not asserts. A step at 4,096 tokens through Qwen3's full vocabulary takes minutes on two cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from autotune.units import GiB  # noqa: E402  (after the path insert above)

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def measured_against_estimate(layers: int, vocab: int, seqs: list[int]) -> list[dict]:
    import torch

    from autotune.catalog import CATALOG
    from autotune.config import build_config
    from autotune.context import RunContext
    from autotune.estimate import estimate, shape_for
    from autotune.trial import TrialRunner
    from autotune.units import Budget

    arch = dataclasses.replace(CATALOG["Qwen3-30B-A3B"].architecture, num_hidden_layers=layers, vocab_size=vocab)
    folder = Path(tempfile.mkdtemp(prefix="moe-bench-"))
    arch.to_hf_config().save_pretrained(folder)
    cfg = build_config(
        {
            "model_name": str(folder),
            "init": "random",
            "quantization": "4bit",
            "bf16": False,
            "lora_r": 16,
            "lora_dropout": 0.0,
            "target_modules": ATTENTION,
            "gradient_checkpointing": True,
            "fused_loss": "on",
            "output_dir": str(folder / "out"),
        }
    )
    runner = TrialRunner(RunContext(cfg), Budget(2**50), device=torch.device("cpu"))
    rows = []
    try:
        for seq in seqs:
            t = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                trial = runner.measure(1, seq, 16)
            shape = shape_for(cfg, arch, batch=1, seq=seq, rank=16, device="cpu", knobs=runner.knobs)
            predicted = estimate(shape)
            row = {
                "layers": layers,
                "vocab": vocab,
                "seq": seq,
                "measured_bytes": trial.peak_bytes,
                "estimate_bytes": predicted.peak_bytes,
                "estimate_phase": predicted.phase,
                "error": predicted.peak_bytes / trial.peak_bytes - 1 if trial.peak_bytes else None,
                "seconds": round(time.perf_counter() - t, 1),
            }
            rows.append(row)
            print(
                f"  30B-A3B x {layers} layers, vocab {vocab}, seq {seq}: tracked {trial.peak_bytes / GiB:.3f} GiB, "
                f"estimate {predicted.peak_bytes / GiB:.3f} ({row['error']:+.1%}, at the {predicted.phase}) "
                f"[{row['seconds']} s]",
                flush=True,
            )
    finally:
        runner.release()
    return rows


def gpu_answers() -> dict:
    from autotune.catalog import CATALOG
    from autotune.estimate import StepShape, estimate
    from autotune.techniques import Knobs

    knobs = Knobs(checkpointing=True, fused_loss=True)
    a3b = estimate(StepShape(CATALOG["Qwen3-30B-A3B"].architecture, 1, 2048, 16, knobs=knobs))
    a22b = estimate(
        StepShape(CATALOG["Qwen3-235B-A22B"].architecture, 1, 4096, 16, knobs=knobs, world_size=8, strategy="fsdp")
    )
    for label, e in (("Qwen3-30B-A3B, 4-bit attention, bf16 experts, seq 2048, r16", a3b),
                     ("Qwen3-235B-A22B, 8 GPUs FSDP, seq 4096, r16, per rank", a22b)):  # fmt: skip
        parts = ", ".join(f"{k} {v / GiB:.2f}" for k, v in e.components.items() if v)
        print(f"  {label}: {e.peak_bytes / GiB:.2f} GiB ({parts})")
    return {"30b_a3b_seq2048_r16": a3b.to_dict(), "235b_a22b_fsdp8_seq4096_r16": a22b.to_dict()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqs", default="2048,4096")
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    print("the estimate's answers for GPUs:")
    answers = gpu_answers()
    print("the CPU tracker against the estimate:")
    rows = measured_against_estimate(args.layers, args.vocab, [int(s) for s in args.seqs.split(",")])
    if args.json:
        import platform
        from datetime import date

        doc = {
            "kind": "moe_bench",
            "date": date.today().isoformat(),
            "cpu": platform.processor() or platform.machine(),
            "tracked": rows,
            "answers": answers,
        }
        args.json.write_text(json.dumps(doc, indent=2, default=str))


if __name__ == "__main__":
    main()
