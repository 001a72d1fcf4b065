"""Qwen3-30B-A3B's widths on this machine: the estimate against the CPU tracker, and the estimate's answers for GPUs.

    python bench/moe_bench.py [--seqs 2048,4096] [--vocab 151936] [--layers 2] [--json OUT]

1. A full-width Qwen3-30B-A3B (hidden 2,048, 128 experts of width 768, 8 per token) with `--layers` of its 48
   layers: one QLoRA step (4-bit attention; fp32, as a CPU without AVX512-BF16 runs it fastest) with adapters on the
   experts, checkpointing and the fused loss, measured by trial.TrialRunner (the solver's own trial, the tracked
   meter) against estimate/'s prediction, at each sequence.
2. The estimate's answers (no GPU needed): Qwen3-30B-A3B at 2,048 tokens, rank 16, 4-bit, on a 24 GB card, and
   Qwen3-235B-A22B over 8 GPUs with FSDP at 4,096 tokens under 80 GB, the experts' adapters folded by PEFT or split. Predictions; a GPU run measures them.

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


# The experts' forms a run can take: NF4 (experts_4bit, always split), bf16 split (experts_split_lora), bf16 folded
# by PEFT (both off).
EXPERTS = {"nf4": ("on", "off"), "split": ("off", "on"), "folded": ("off", "off")}


def measured_against_estimate(layers: int, vocab: int, seqs: list[int], experts: str) -> list[dict]:
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
            "experts_4bit": EXPERTS[experts][0],
            "experts_split_lora": EXPERTS[experts][1],
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
                "experts": experts,
                "experts_4bit": experts == "nf4",
                "measured_bytes": trial.peak_bytes,
                "estimate_bytes": predicted.peak_bytes,
                "estimate_phase": predicted.phase,
                "error": predicted.peak_bytes / trial.peak_bytes - 1 if trial.peak_bytes else None,
                "seconds": round(time.perf_counter() - t, 1),
            }
            rows.append(row)
            print(
                f"  30B-A3B x {layers} layers, vocab {vocab}, {experts} experts, seq {seq}: tracked {trial.peak_bytes / GiB:.3f} GiB, "
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
    a3b_arch = CATALOG["Qwen3-30B-A3B"].architecture
    a3b = estimate(StepShape(a3b_arch, 1, 2048, 16, knobs=knobs))
    split = estimate(StepShape(a3b_arch, 1, 2048, 16, knobs=knobs.with_(experts_split_lora=True)))
    nf4 = estimate(StepShape(a3b_arch, 1, 2048, 16, knobs=knobs.with_(experts_4bit=True)))
    lean = knobs.with_(experts_4bit=True, embedding_on_cpu=True, lm_head_8bit=True)
    nf4_lean = estimate(StepShape(a3b_arch, 1, 2048, 16, knobs=lean))
    # What `autotune estimate ... --rank 16 --max-memory-gb 24 --set experts_4bit=on` plans (estimate.plan_techniques:
    # no combination fits on the safe side of the error band, so the leanest).
    nf4_every = estimate(StepShape(a3b_arch, 1, 2048, 16, knobs=lean.with_(offload_activations=True)))
    a22b_arch = CATALOG["Qwen3-235B-A22B"].architecture
    a22b = estimate(StepShape(a22b_arch, 1, 4096, 16, knobs=knobs, world_size=8, strategy="fsdp"))
    a22b_split = estimate(
        StepShape(a22b_arch, 1, 4096, 16, knobs=knobs.with_(experts_split_lora=True), world_size=8, strategy="fsdp")
    )
    for label, e in (("Qwen3-30B-A3B, 4-bit attention, bf16 experts folded by PEFT, seq 2048, r16", a3b),
                     ("Qwen3-30B-A3B, 4-bit attention, bf16 experts, split LoRA, seq 2048, r16", split),
                     ("Qwen3-30B-A3B, NF4 experts, seq 2048, r16", nf4),
                     ("Qwen3-30B-A3B, NF4 experts, host embedding, 8-bit head, seq 2048, r16", nf4_lean),
                     ("Qwen3-30B-A3B, NF4 experts, every technique (offload too), seq 2048, r16", nf4_every),
                     ("Qwen3-235B-A22B, 8 GPUs FSDP, seq 4096, r16, folded by PEFT, per rank", a22b),
                     ("Qwen3-235B-A22B, 8 GPUs FSDP, seq 4096, r16, split LoRA, per rank", a22b_split)):  # fmt: skip
        parts = ", ".join(f"{k} {v / GiB:.2f}" for k, v in e.components.items() if v)
        print(f"  {label}: {e.peak_bytes / GiB:.2f} GiB ({parts})")
    return {
        "30b_a3b_seq2048_r16": a3b.to_dict(),
        "30b_a3b_split_seq2048_r16": split.to_dict(),
        "30b_a3b_nf4_experts_seq2048_r16": nf4.to_dict(),
        "30b_a3b_nf4_experts_lean_seq2048_r16": nf4_lean.to_dict(),
        "30b_a3b_nf4_experts_every_technique_seq2048_r16": nf4_every.to_dict(),
        "235b_a22b_fsdp8_seq4096_r16": a22b.to_dict(),
        "235b_a22b_split_fsdp8_seq4096_r16": a22b_split.to_dict(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqs", default="2048,4096")
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument(
        "--experts", default="nf4,split,folded", help=f"the experts' forms to track: {', '.join(EXPERTS)}, or none"
    )
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    print("the estimate's answers for GPUs:")
    answers = gpu_answers()
    print("the CPU tracker against the estimate:")
    seqs = [int(s) for s in args.seqs.split(",")]
    rows = [
        row
        for kind in args.experts.split(",")
        if kind != "none"  # --experts none: the estimate's answers alone (seconds, no tracked steps)
        for row in measured_against_estimate(args.layers, args.vocab, seqs, kind)
    ]
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
