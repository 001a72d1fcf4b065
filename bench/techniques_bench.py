"""What the step's memory techniques buy, measured on this machine, and what the estimate predicts for GPUs.

    python bench/techniques_bench.py [--quick] [--json OUT]

1. The fused loss at a long sequence: the tiny Qwen3 (Qwen3's 151,936-token vocabulary) at 4,096 tokens, the
   plain step against the fused one, tracked peak on the CPU (trial.TrialRunner, the solver's own trial).
2. The solver's regret: its choice's tokens/s against the best of a brute-force grid over the same knobs
   (every technique combination the config leaves open x every micro-batch that divides the effective batch),
   at the same simulated cap. Both are measured the same way; the choice and the grid's winner are measured
   again with more steps, so timing noise on a busy CPU does not decide.
3. The estimate's answers for the GPU targets (no GPU needed): the longest Qwen3-8B r=32 batch-1 sequence
   under 16 GB, and the smallest caps at which Qwen3-14B and Qwen3-8B train at sequence 512, with every
   technique on. These are predictions; bench/gpu_check.py measures them where a GPU is available.

Figures, not asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from autotune.units import DEFAULT_MARGIN, GiB, MiB  # noqa: E402  (after the path insert above)


def tiny_config(**values):
    from autotune.config import build_config

    base = {
        "model_name": "tiny-qwen3",
        "init": "random",
        "quantization": "4bit",
        "tokenizer_name": "qwen3-offline",
        "optimizer": "paged_adamw_8bit",
        "lora_r": 8,
        "lora_alpha": 16,
        "output_dir": "/tmp/autotune-techniques-bench",
        "verify_environment": False,
    }
    return build_config({**base, **values})


def fused_at_long_sequence(seq: int) -> dict:
    from autotune.context import RunContext
    from autotune.techniques import Knobs
    from autotune.trial import TrialRunner
    from autotune.units import Budget

    cfg = tiny_config()
    runner = TrialRunner(RunContext(cfg), Budget(2**50))
    out = {"model": "tiny-qwen3", "seq": seq, "batch": 1}
    for name, knobs in (("plain", Knobs(fused_loss=False)), ("fused", Knobs(fused_loss=True))):
        trial = runner.measure(1, seq, cfg.lora_r, knobs=knobs)
        out[name] = {"peak_bytes": trial.peak_bytes, "tokens_per_second": trial.tokens_per_second}
    runner.release()
    vocab = runner.ctx.architecture.vocab_size
    out["logits_term_bytes"] = 4 * seq * vocab  # one fp32 logits tensor
    out["drop_bytes"] = out["plain"]["peak_bytes"] - out["fused"]["peak_bytes"]
    return out


def regret(cap_gb: float, seq: int, effective: int, steps: int) -> dict:
    """The solver's choice against the best of every (technique combination x divisor micro-batch)."""
    from autotune.batching import divisors_up_to
    from autotune.context import RunContext
    from autotune.solve import SolveRequest, solve
    from autotune.solve.plan import combinations
    from autotune.trial import TrialRunner
    from autotune.units import Budget

    cfg = tiny_config(effective_batch_size=effective, batch_size=1, gradient_accumulation_steps=effective)
    ctx = RunContext(cfg)
    runner = TrialRunner(ctx, Budget.from_gib(cap_gb))
    req = SolveRequest(ctx, seq=seq)
    t0 = time.perf_counter()
    result = solve(req, runner)
    solve_s = time.perf_counter() - t0
    best = result.best
    grid = []
    for knobs in combinations(req):
        for batch in divisors_up_to(effective, effective):
            trial = runner.measure(batch, seq, cfg.lora_r, knobs=knobs)
            grid.append(trial)
            if not trial.fits:
                break  # memory grows with the batch: nothing larger fits
    fitting = [t for t in grid if t.fits]
    winner = max(fitting, key=lambda t: t.tokens_per_second or 0)
    # Measured again, longer, one after the other: the comparison that decides.
    again = {
        "solver": runner.measure(best.batch, seq, cfg.lora_r, knobs=best.knobs, steps=steps),
        "grid": runner.measure(winner.batch, seq, cfg.lora_r, knobs=winner.knobs, steps=steps),
    }
    runner.release()
    ours, top = again["solver"].tokens_per_second, again["grid"].tokens_per_second
    return {
        "cap_gb": cap_gb,
        "seq": seq,
        "effective_batch": effective,
        "solver": {
            "batch": best.batch,
            "knobs": best.knobs.describe(),
            "trials": len(result.trials),
            "seconds": round(solve_s, 1),
            "tokens_per_second": ours,
        },
        "grid": {
            "trials": len(grid),
            "best_batch": winner.batch,
            "best_knobs": winner.knobs.describe(),
            "tokens_per_second": top,
        },
        "regret": max(0.0, 1 - ours / top) if ours and top else None,
    }


def gpu_predictions() -> dict:
    """The estimate's answers for the GPU targets, every technique on (calibrated on the GPU trials on record)."""
    from autotune.catalog import resolve_model
    from autotune.estimate import error_band, estimate_peak, largest_fitting
    from autotune.units import Budget

    every = dict(
        quantization="4bit",
        optimizer="paged_adamw_8bit",
        device="cuda",
        dtype_bytes=2,
        lora_dropout=0.1,
        gradient_checkpointing=True,
        fused_loss=True,
        offload_activations=True,
        embedding_on_cpu=True,
        lm_head_8bit=True,
        tiled_mlp=True,
    )
    eight, fourteen = resolve_model("Qwen3-8B").architecture, resolve_model("Qwen3-14B").architecture
    longest = largest_fitting(eight, Budget.from_gib(16), rank=32, max_seq=65536, **every)["seq"]

    def smallest_cap(arch) -> float:
        peak = estimate_peak(arch, batch=1, seq=512, rank=16, **every).peak_bytes
        band = error_band()
        safe = peak / (1 + band[0]) if band and band[0] < 0 else peak
        return round(safe / (1 - DEFAULT_MARGIN) / GiB, 2)

    return {
        "qwen3_8b_r32_longest_seq_at_16gb": longest,
        "qwen3_14b_smallest_cap_gb_at_512": smallest_cap(fourteen),
        "qwen3_8b_smallest_cap_gb_at_512": smallest_cap(eight),
        "error_band": error_band(),
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="Shorter sequence and a smaller grid (tests).")
    ap.add_argument("--json", dest="json_out", help="Write the figures here as JSON.")
    args = ap.parse_args(argv)
    doc = {
        "kind": "techniques_bench",
        "device": "cpu",
        "cpu": platform.processor(),
        "date": time.strftime("%Y-%m-%d"),
        "load_start": round(os.getloadavg()[0], 2),
    }
    doc["fused_loss"] = fused_at_long_sequence(512 if args.quick else 4096)
    f = doc["fused_loss"]
    print(
        f"fused loss, tiny-qwen3 at {f['seq']} tokens: plain {f['plain']['peak_bytes'] / MiB:.0f} MiB, fused "
        f"{f['fused']['peak_bytes'] / MiB:.0f} MiB: {f['drop_bytes'] / MiB:.0f} MiB less (one fp32 logits tensor: "
        f"{f['logits_term_bytes'] / MiB:.0f} MiB)",
        flush=True,
    )
    doc["regret"] = regret(0.3, 64, 8 if args.quick else 16, 3 if args.quick else 6)
    r = doc["regret"]
    print(
        f"solver: batch {r['solver']['batch']} {r['solver']['knobs']} in {r['solver']['trials']} trials, "
        f"{r['solver']['tokens_per_second']:.0f} tok/s; grid of {r['grid']['trials']}: batch {r['grid']['best_batch']} "
        f"{r['grid']['best_knobs']}, {r['grid']['tokens_per_second']:.0f} tok/s; regret {r['regret']:.1%}",
        flush=True,
    )
    doc["gpu_predictions"] = gpu_predictions()
    print(f"estimate (GPU, every technique): {json.dumps(doc['gpu_predictions'])}", flush=True)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(doc, indent=2))
    return doc


if __name__ == "__main__":
    main()
