"""Per-rank peak and tokens/s of the training step in 1 and 2 processes (DDP over gloo) on the CPU.

    python bench/distributed_bench.py [--steps 6] [--batch 2] [--seq 128] [--quantization 4bit] [--json OUT]

Each process count is a real torchrun launch: every rank builds the model (modeling.build_model) and runs the
training Trainer of step.py (accelerate wraps it in DDP for 2 processes) on full-length synthetic rows, under
the CPU memory tracker (memory.CpuTrackedMeter, no cap) around the whole Trainer, DDP's buckets included.
Beside it, what the solver would have planned for that rank: trial.TrialRunner with world_size=N (one process's
step plus DDP's buckets measured with a real DDP) and the estimate's per-rank peak.

On a CPU accelerate wraps even a one-process torchrun run in DDP (its MULTI_CPU state; on one GPU it does not),
so the 1-process rank holds DDP's buckets too, which the solver's world_size=1 trial leaves out.

Measured (bench/results/2026-12-01-cpu-distributed.json; 2 cores, 4-bit, micro-batch 2 x 128): each rank's
tracked peak 241.94 MiB with 1 and 2 processes; the solver's per-rank trial 241.94 MiB for 2 (241.81 for 1,
no buckets), the estimate 242.06; 547 tokens/s on 1 process, 1091 on 2 (545 per rank).

The figures say what one more rank costs and gives on this machine's cores, not what GPUs do: two processes
here share two CPU cores (one thread each; the 1-process run gets one thread too, so each rank has the same
core), and gloo's all-reduce crosses memory, not NVLink or a network. Multi-GPU scaling is unmeasured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _config(args, output_dir: str):
    from autotune.config import build_config

    return build_config(
        {
            "model_name": "tiny-qwen3",
            "init": "random",
            "tokenizer_name": "qwen3-offline",
            "quantization": args.quantization,
            "bf16": args.quantization != "none",
            "lora_r": 16,
            "lora_alpha": 32,
            "lora_dropout": 0.0,
            "optimizer": "adamw_torch",
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            "output_dir": output_dir,
            "distributed_strategy": "ddp",
        }
    )


def worker(args) -> None:
    """One rank (run by torchrun): the training step for args.steps optimizer steps under the tracker."""
    import torch
    from transformers import PrinterCallback

    from autotune import distributed
    from autotune.context import RunContext
    from autotune.memory import CpuTrackedMeter
    from autotune.modeling import build_model
    from autotune.step import make_trainer, release_trainer, training_arguments
    from autotune.techniques.packing import collator_for
    from autotune.trial import StepTimer, synthetic_rows

    w = distributed.world()
    scratch = tempfile.mkdtemp(prefix="autotune-dist-bench-")
    cfg = _config(args, scratch)
    device = torch.device("cpu")
    distributed.join(device)
    built = build_model(RunContext(cfg), device=device)
    meter = CpuTrackedMeter()
    meter.track_existing(built.model)
    meter.reset_peak()
    targs = training_arguments(
        cfg,
        built,
        scratch,
        max_steps=args.steps,
        batch_size=args.batch,
        accumulation=1,
        evaluate=False,
        save=False,
        log=False,
        progress=False,
    )
    # Every rank its own rows (the sampler shards them): batch x steps x world rows in all.
    data = synthetic_rows(args.batch * args.steps * w.size, args.seq, built.spec.architecture.vocab_size, seed=1)
    collator = collator_for(built.knobs.packing, 0, max_length=args.seq, pad_to_length=args.seq)
    timer = StepTimer()
    trainer = make_trainer(built, targs, data, collator=collator, callbacks=[timer])
    trainer.remove_callback(PrinterCallback)
    with meter:
        trainer.train()
    wrapped = type(trainer.model_wrapped).__name__
    release_trainer(trainer, built.model)
    steady = timer.seconds[1:] or timer.seconds
    step_s = sum(steady) / len(steady)
    doc = {
        "rank": w.rank,
        "world_size": w.size,
        "wrapper": wrapped,
        "peak_bytes": meter.peak_bytes(),
        "step_seconds": step_s,
        "tokens_per_second": args.batch * args.seq / step_s,  # this rank's
    }
    Path(args.worker_out).mkdir(parents=True, exist_ok=True)
    (Path(args.worker_out) / f"rank{w.rank}.json").write_text(json.dumps(doc), encoding="utf-8")


def planned(args, world_size: int) -> dict:
    """What `autotune solve --gpus N` measures and predicts for one rank of this shape."""
    import torch

    from autotune.context import RunContext
    from autotune.estimate import estimate, shape_for
    from autotune.trial import TrialRunner
    from autotune.units import Budget

    cfg = _config(args, tempfile.mkdtemp(prefix="autotune-dist-bench-"))
    runner = TrialRunner(RunContext(cfg), Budget(2**50), device=torch.device("cpu"), world_size=world_size)
    trial = runner.measure(args.batch, args.seq, cfg.lora_r)
    shape = shape_for(
        cfg, runner.ctx.architecture, batch=args.batch, seq=args.seq, rank=cfg.lora_r, device="cpu",
        world_size=world_size, strategy="ddp",
    )  # fmt: skip
    est = estimate(shape)
    runner.release()
    return {
        "trial_peak_bytes": trial.peak_bytes,
        "ddp_bucket_bytes": runner.bucket_bytes or trial.memory.get("ddp_bucket_bytes"),
        "estimate_bytes": est.peak_bytes,
    }


def launch(args, nproc: int) -> dict:
    out = Path(tempfile.mkdtemp(prefix="autotune-dist-bench-out-"))
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        __file__,
        "--worker-out",
        str(out),
        *(
            f"--{k}={v}"
            for k, v in (
                ("steps", args.steps),
                ("batch", args.batch),
                ("seq", args.seq),
                ("quantization", args.quantization),
            )
        ),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise SystemExit(f"{nproc}-process run failed:\n{proc.stderr[-4000:]}")
    ranks = [json.loads((out / f"rank{r}.json").read_text(encoding="utf-8")) for r in range(nproc)]
    return {
        "processes": nproc,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "ranks": ranks,
        "tokens_per_second_total": sum(r["tokens_per_second"] for r in ranks),
        "planned": planned(args, nproc),
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--quantization", choices=("4bit", "none"), default="4bit")
    ap.add_argument("--json", help="Write the figures here too.")
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker_out:
        worker(args)
        return 0
    runs = [launch(args, n) for n in (1, 2)]
    print(
        f"tiny-qwen3 {args.quantization}, r=16 all projections, micro-batch {args.batch} x seq {args.seq} per rank, "
        f"{args.steps} steps, CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), gloo"
    )
    print(
        f"{'procs':>5} {'wrapper':>24} {'rank peak MiB':>14} {'solver trial MiB':>17} {'estimate MiB':>13} {'tok/s rank':>11} {'tok/s total':>12}"
    )
    for run in runs:
        plan = run["planned"]
        for r in run["ranks"]:
            print(
                f"{run['processes']:>5} {r['wrapper']:>24} {r['peak_bytes'] / 2**20:>14.2f} "
                f"{plan['trial_peak_bytes'] / 2**20:>17.2f} {plan['estimate_bytes'] / 2**20:>13.2f} "
                f"{r['tokens_per_second']:>11.0f} {run['tokens_per_second_total']:>12.0f}"
            )
    if args.json:
        doc = {
            "kind": "distributed_bench",
            "date": time.strftime("%Y-%m-%d"),
            "shape": vars(args) | {"worker_out": None},
            "runs": runs,
            "machine": platform.platform(),
        }
        Path(args.json).write_text(json.dumps(doc, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
