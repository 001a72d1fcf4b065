"""Qwen3.5-9B's widths on this machine: the estimate against the CPU tracker, and the estimate's answers for GPUs.

    python bench/hybrid_bench.py [--seqs 2048,4096] [--vocab 16384] [--layers 4] [--json OUT]

1. A full-width Qwen3.5-9B (hidden 4,096; Gated DeltaNet with 16 key and 32 value heads of 128; gated attention
   with 16 heads of 256; MLP 12,288) with `--layers` of its 32 layers (4: three DeltaNet layers and one attention
   layer): one LoRA step (fp32, as a CPU without AVX512-BF16 runs it fastest; transformers' reference gated-delta
   rule) with adapters on every projection of both kinds, checkpointing on and off, measured by trial.TrialRunner
   (the solver's own trial, the tracked meter) against estimate/'s prediction, at each sequence. The vocabulary is
   cut (default 16,384) to keep the head's matmul from taking the minutes: the layers are what is measured.
2. The estimate's answers (no GPU needed): bf16 LoRA r16 at 2,048 tokens of every dense Qwen3.5 size, on a GPU with
   flash-linear-attention's kernel and with the reference rule, beside Unsloth's figures.

Figures, not asserts.
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

# Unsloth's Qwen3.5 fine-tuning guide: bf16 LoRA's memory (GB) at 2,048 tokens.
UNSLOTH_GB = {"Qwen3.5-0.8B": 3, "Qwen3.5-2B": 5, "Qwen3.5-4B": 10, "Qwen3.5-9B": 22, "Qwen3.5-27B": 56}


def measured_against_estimate(layers: int, vocab: int, seqs: list[int], checkpointing: list[bool]) -> list[dict]:
    import torch

    from autotune.catalog import CATALOG
    from autotune.config import build_config
    from autotune.context import RunContext
    from autotune.estimate import estimate, shape_for
    from autotune.techniques import Knobs
    from autotune.trial import TrialRunner
    from autotune.units import Budget

    nine = CATALOG["Qwen3.5-9B"].architecture
    arch = dataclasses.replace(nine, num_hidden_layers=layers, vocab_size=vocab, layer_types=nine.layer_types[:layers])
    folder = Path(tempfile.mkdtemp(prefix="hybrid-bench-"))
    arch.to_hf_config().save_pretrained(folder)
    rows = []
    for gc in checkpointing:
        cfg = build_config(
            {
                "model_name": str(folder),
                "init": "random",
                "quantization": "none",
                "bf16": False,
                "lora_r": 16,
                "lora_dropout": 0.0,
                "target_modules": list(arch.projection_names),
                "gradient_checkpointing": gc,
                "fused_loss": "on",
                "output_dir": str(folder / "out"),
            }
        )
        runner = TrialRunner(RunContext(cfg), Budget(2**50), device=torch.device("cpu"))
        knobs = Knobs(checkpointing=gc, fused_loss=True)
        try:
            for seq in seqs:
                t = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    trial = runner.measure(1, seq, 16, knobs=knobs)
                shape = shape_for(cfg, arch, batch=1, seq=seq, rank=16, device="cpu", knobs=knobs)
                predicted = estimate(shape)
                row = {
                    "layers": layers,
                    "vocab": vocab,
                    "seq": seq,
                    "checkpointing": gc,
                    "measured_bytes": trial.peak_bytes,
                    "estimate_bytes": predicted.peak_bytes,
                    "estimate_phase": predicted.phase,
                    "error": predicted.peak_bytes / trial.peak_bytes - 1 if trial.peak_bytes else None,
                    "seconds": round(time.perf_counter() - t, 1),
                }
                rows.append(row)
                print(
                    f"  Qwen3.5-9B x {layers} layers, vocab {vocab}, seq {seq}, checkpointing {'on' if gc else 'off'}: "
                    f"tracked {trial.peak_bytes / GiB:.3f} GiB, estimate {predicted.peak_bytes / GiB:.3f} "
                    f"({row['error']:+.1%}, at the {predicted.phase}) [{row['seconds']} s]",
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
    answers = {}
    for name, unsloth in UNSLOTH_GB.items():
        a = CATALOG[name].architecture
        per_kernel = {
            kernel: estimate(StepShape(a, 1, 2048, 16, quantization="none", knobs=knobs, delta_kernel=kernel))
            for kernel in ("fla", "reference")
        }
        fla = per_kernel["fla"]
        parts = ", ".join(f"{k} {v / GiB:.2f}" for k, v in fla.components.items() if v)
        print(
            f"  {name}, bf16 LoRA r16, seq 2048: {fla.peak_bytes / GiB:.2f} GiB with flash-linear-attention "
            f"({per_kernel['reference'].peak_bytes / GiB:.2f} with the reference rule); Unsloth {unsloth} GB ({parts})"
        )
        answers[name] = {"unsloth_gb": unsloth, **{k: e.to_dict() for k, e in per_kernel.items()}}
    return answers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqs", default="2048,4096")
    ap.add_argument("--vocab", type=int, default=16384)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--checkpointing", default="on,off", help="on, off or both (on,off)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    print("the estimate's answers for GPUs:")
    answers = gpu_answers()
    print("the CPU tracker against the estimate:")
    gcs = [v == "on" for v in args.checkpointing.split(",")]
    rows = measured_against_estimate(args.layers, args.vocab, [int(s) for s in args.seqs.split(",")], gcs)
    if args.json:
        import platform
        from datetime import date

        doc = {
            "kind": "hybrid_bench",
            "date": date.today().isoformat(),
            "cpu": platform.processor() or platform.machine(),
            "tracked": rows,
            "answers": answers,
        }
        args.json.write_text(json.dumps(doc, indent=2, default=str))


if __name__ == "__main__":
    main()
