"""Every GPU claim of autotune, measured in one prepared run (see bench/gpu_check.sh).

Stages run in order of value; each writes its results into --out as soon as it has them (a run cut short still
returns data), and every trial of every stage is recorded with its whole shape, techniques and the parts of
its peak (`trials`), so that bench/estimate_check.py can hold the estimate to all of them:

- min_cap (b): the smallest cap (0.25 GB steps) at which Qwen3-0.6B/4B/8B/14B train at sequence 512,
  batch 1, with every technique that saves memory.
- longest_seq (a): the longest Qwen3-8B r=32 batch-1 sequence under a 16 GB cap (1k granularity, up to
  64k), with every technique, and with each one off in turn.
- costs (c): tokens/s of each technique against the plain step at one shape (Qwen3-8B, no cap).
- real_data (d, e): on the shipped sample data at a 16 GB cap, the guide's 16 GB preset (loaded from
  profiles/hardware/16gb.json), a profile solved without the techniques and one solved with them, each
  trained by `autotune train` itself; real (unpadded) tokens/s. The solved profile's run goes 100 steps with
  TensorBoard, checkpoints and an injected OOM, so the runner has GPU evidence.
- solve: solves of Qwen3-0.6B/4B/8B/14B under 8/12/16/24 GB caps, each choice run for up to 30 steps.
- ddp (f): multi-GPU on the one GPU there is: `autotune solve --gpus 2 --strategy ddp` (each trial one rank's
  step, DDP's gradient buckets measured with a real DDP in a one-process NCCL group), then `autotune train
  --nproc 1` of that profile under torchrun (the rank's GPU from LOCAL_RANK, the accumulation re-derived for
  one process). accelerate wraps no DDP around a single GPU process, so the gradient all-reduce, FSDP's shards
  and NVLink remain unmeasured: they need two GPUs.

Models are built from architecture with random weights (memory and speed do not depend on their values).
`--rehearse` runs every stage on the CPU with the tiny model and small simulated caps.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # tests/helpers/faults.py: the injected OOM of the runner stage

import psutil  # noqa: E402

from autotune.errors import UserError  # noqa: E402  (after the path inserts above)
from autotune.units import Budget, GiB  # noqa: E402

# The guide's 16 GB tier, loaded from its preset file (never copied here): the real-data stage's baseline.
GUIDE_PRESET = "hardware/16gb"
STAGES = ("probe", "min_cap", "moe", "hybrid", "longseq", "costs", "real_data", "solve", "ddp")


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Results:
    """results.json rewritten atomically after every change."""

    def __init__(self, out: Path, meta: dict):
        self.out = out
        self.doc: dict = {"meta": meta, "stages": {}, "trials": [], "errors": []}
        self.save()

    def put(self, stage: str, value) -> None:
        self.doc["stages"][stage] = value
        self.save()

    def append(self, stage: str, value) -> None:
        self.doc["stages"].setdefault(stage, []).append(value)
        self.save()

    def trial(self, stage: str, runner, trial) -> dict:
        """Record one measured trial with everything the estimate needs to predict it."""
        cfg = runner.cfg
        record = {
            "stage": stage,
            "model": cfg.model_name,
            "batch": trial.batch,
            "seq": trial.seq,
            "rank": trial.rank,
            "knobs": trial.knobs.to_dict() if trial.knobs else None,
            "quantization": cfg.quantization,
            "optimizer": cfg.optimizer,
            "target_modules": list(cfg.target_modules),
            "lora_dropout": cfg.lora_dropout,
            "bf16": cfg.bf16,
            "dtype": runner.dtype,
            "device": runner.device_type,
            "budget_bytes": runner.budget.total_bytes,
            "peak_bytes": trial.peak_bytes,
            "memory": trial.memory,
            "fits": trial.fits,
            "oom": trial.oom,
            "step_seconds": trial.step_seconds,
            "tokens_per_second": trial.tokens_per_second,
            "kind": trial.kind,
        }
        # The whole run's plan against what this device shows of it (issue 19): the load phase's measured peak
        # (the latest build's), the host's resident memory now, and the estimate's phases and host memory.
        if trial.knobs is not None:
            plan = runner.run_plan(trial.batch, trial.seq, trial.rank, trial.knobs)
            record.update(
                planned_phases=plan.phases,
                planned_host_bytes=plan.host_bytes,
                planned_host=plan.host,
                load_peak_bytes=runner.load_peak_bytes,
                host_rss_bytes=psutil.Process().memory_info().rss,
            )
        self.doc["trials"].append(record)
        self.save()
        return record

    def error(self, stage: str, exc: BaseException) -> None:
        self.doc["errors"].append(
            {"stage": stage, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
        )
        self.save()

    def save(self) -> None:
        tmp = self.out / ".results.json.tmp"
        tmp.write_text(json.dumps(self.doc, indent=2, default=str))
        tmp.replace(self.out / "results.json")


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


class Plan:
    def __init__(self, rehearse: bool, deadline: float, quick: bool = False):
        self.rehearse, self.deadline = rehearse, deadline
        self.data_dir = str(ROOT / "data" / "raw")
        if rehearse:
            tiny = "tiny-qwen3"
            self.min_cap_models, self.min_cap_seq, self.cap_step, self.cap_ceiling = [tiny], 128, 0.01, 0.5
            self.longseq_model, self.longseq_cap, self.longseq_max, self.longseq_step = tiny, 0.35, 1024, 64
            self.costs_model, self.costs_shape, self.costs_steps = tiny, (2, 128), 3
            self.real_model, self.real_cap, self.guide_steps, self.real_steps, self.oom_at = tiny, 0.35, 4, 8, 5
            self.solve_models, self.solve_caps, self.solve_seq, self.train_steps = [tiny], [0.25, 0.35], None, 3
            self.max_trials, self.longseq_variants = 12, 5
            self.real_runs: tuple[str, ...] = ("solved_without_techniques", "solved")
            if quick:  # the test suite's rehearsal: every stage once, at the smallest size
                self.real_runs = ("solved",)
                self.solve_caps, self.train_steps, self.longseq_max, self.solve_seq = [0.35], 2, 256, 64
                # The solved run: a checkpoint every step, the injected OOM before the last one (resumed from the
                # checkpoint before it at half the batch), then the end.
                self.guide_steps, self.real_steps, self.oom_at = 2, 4, 3
                self.costs_shape, self.costs_steps = (1, 64), 2
                self.cap_step, self.max_trials, self.longseq_variants = 0.05, 4, 2
        else:
            self.min_cap_models = ["Qwen3-0.6B", "Qwen3-4B", "Qwen3-8B", "Qwen3-14B"]
            self.min_cap_seq, self.cap_step, self.cap_ceiling = 512, 0.25, 24.0
            self.longseq_model, self.longseq_cap, self.longseq_max, self.longseq_step = "Qwen3-8B", 16.0, 65536, 1024
            self.costs_model, self.costs_shape, self.costs_steps = "Qwen3-8B", (2, 1024), 4
            self.real_model, self.real_cap, self.guide_steps, self.real_steps, self.oom_at = (
                "Qwen3-4B-Thinking-2507",
                16.0,
                20,
                100,
                60,
            )
            self.solve_models, self.solve_caps, self.solve_seq = (
                ["Qwen3-0.6B", "Qwen3-8B", "Qwen3-14B"],
                [8.0, 16.0],
                512,
            )
            self.train_steps, self.max_trials, self.longseq_variants = 30, 12, 6
            self.real_runs = ("solved_without_techniques", "solved")
        # The moe stage: Qwen3-30B-A3B's widths with 2 of its 48 layers (the rehearsal: the tiny Qwen3-MoE), a
        # cap and the sequences a step is measured at, adapters on the experts.
        self.moe_model, self.moe_layers, self.moe_cap, self.moe_seqs = (
            ("tiny-qwen3-moe", None, 1.0, [64]) if rehearse else ("Qwen3-30B-A3B", 2, 40.0, [2048, 4096])
        )
        # The hybrid stage: Qwen3.5-9B's widths with 4 of its 32 layers (three Gated DeltaNet, one gated attention;
        # the rehearsal: the tiny Qwen3.5), a cap and the sequences a bf16 LoRA step is measured at.
        self.hybrid_model, self.hybrid_layers, self.hybrid_cap, self.hybrid_seqs = (
            ("tiny-qwen3.5", None, 1.0, [64]) if rehearse else ("Qwen3.5-9B", 4, 40.0, [2048, 4096])
        )
        # The ddp stage: a model, a per-rank cap and the steps its 1-process torchrun trains.
        self.ddp_model, self.ddp_cap, self.ddp_seq, self.ddp_steps = (
            ("tiny-qwen3", 0.35, 64, 4) if rehearse else ("Qwen3-0.6B", 8.0, 512, 20)
        )
        if rehearse and quick:  # two steps: a checkpoint, then the end
            self.ddp_steps = 2

    def left(self) -> float:
        return self.deadline - time.monotonic()


def base_config(model: str, rehearse: bool, **extra):
    from autotune.config import build_config

    scratch = tempfile.mkdtemp(prefix="autotune-gpu-check-")  # nothing lands in the working tree
    values = dict(
        model_name=model,
        init="random",
        quantization="4bit",
        data_dir=str(ROOT / "data" / "raw"),
        output_dir=f"{scratch}/run",
        log_dir=f"{scratch}/logs",
        data_cache_dir=f"{scratch}/cache",
        verify_environment=False,
        enable_tensorboard=False,
        enable_inference_test=False,
        effective_batch_size=64,
        batch_size=1,
        gradient_accumulation_steps=64,
        lora_r=16,
        lora_alpha=32,
        optimizer="paged_adamw_8bit",
        tokenizer_name="qwen3-offline",  # the device has no network: Qwen3's tokenizer built offline
        structured_logging={"enabled": False},
    )
    if rehearse:
        # fp32 on the CPU: without AVX512-BF16 a bf16 matmul takes torch's reference GEMM, ~50x slower than
        # fp32, and the rehearsal checks that every stage runs and records, not bf16 speed.
        values.update(effective_batch_size=8, gradient_accumulation_steps=8, bf16=False)
    values.update(extra)
    return build_config(values, "gpu_check")


def runner_for(cfg, cap_gb: float):
    """The solver's own trial runner (trial.TrialRunner) for a config, capped at `cap_gb`."""
    from autotune.context import RunContext
    from autotune.trial import TrialRunner

    return TrialRunner(RunContext(cfg), Budget.from_gib(cap_gb))


def lean(runner):
    """Every technique that saves memory that this model and config allow (what max-seq runs with)."""
    from autotune.solve.plan import SolveRequest, lean_knobs

    return lean_knobs(SolveRequest(runner.ctx, checkpointing="on"))


def solved_profile(req, result, runner) -> dict:
    """The profile `autotune solve` would write for a solve on `runner` (solve.record.profile_from_solve)."""
    from autotune.solve.record import profile_from_solve

    return profile_from_solve(
        req,
        result,
        hardware={"device": runner.device_type},
        init=runner.init,
        dtype=runner.dtype,
        device_type=runner.device_type,
    )


def plain(checkpointing: bool = True):
    from autotune.techniques import Knobs

    return Knobs(checkpointing=checkpointing, fused_loss=False)


def shape_of_run(runner, knobs, *, batch: int = 1, seq: int = 1, rank: int):
    """The estimate's shape of a step of the runner's config with these knobs (estimate.shape_for)."""
    from autotune.estimate import shape_for

    return shape_for(
        runner.cfg, runner.ctx.architecture, batch=batch, seq=seq, rank=rank, device=runner.device_type, knobs=knobs
    )


def estimated_seq(runner, knobs, rank: int, upper: int) -> int | None:
    from autotune.estimate import fit

    try:
        found = fit(shape_of_run(runner, knobs, rank=rank), runner.budget, max_batch=0, max_seq=upper)
    except (ValueError, UserError):
        return None
    return found["seq"] or None


# ------------------------------------------------------------------------------------------- stages


def stage_min_cap(plan: Plan, results: Results) -> None:
    """b: the smallest cap at which each model trains at the plan's sequence, batch 1, every memory technique
    on: a bisection over caps in cap_step steps, started where the estimate puts the answer."""
    from autotune.estimate import estimate

    for model in plan.min_cap_models:
        if plan.left() < 60:
            results.append("min_cap", {"model": model, "skipped": "out of time"})
            continue
        runner = runner_for(base_config(model, plan.rehearse), plan.cap_ceiling)
        knobs = lean(runner)
        # Built with them, as `autotune train` would build it: the tables they keep on the host load there, so the
        # load's measured peak (each trial's load_peak_bytes) checks the plan's load phase for the smallest card.
        runner.knobs = knobs
        step, seq, rank = plan.cap_step, plan.min_cap_seq, runner.cfg.lora_r
        est = estimate(shape_of_run(runner, knobs, seq=seq, rank=rank)).peak_bytes
        lo, hi = 0, math.ceil(plan.cap_ceiling / step)  # lo * step does not fit (assumed), hi * step does
        k = min(hi, max(1, math.ceil(est / (1 - runner.budget.margin) / GiB / step)))
        while hi - lo > 1 and plan.left() > 30:
            runner.set_budget(Budget.from_gib(k * step))
            trial = runner.measure(1, seq, rank, knobs=knobs)
            results.trial("min_cap", runner, trial)
            lo, hi = (lo, k) if trial.fits else (k, hi)
            k = (lo + hi) // 2
        results.append(
            "min_cap",
            {
                "model": model,
                "seq": seq,
                "rank": rank,
                "knobs": knobs.to_dict(),
                "smallest_cap_gb": round(hi * step, 3),
                "estimate_bytes": est,
                "load_peak_bytes": runner.load_peak_bytes,
                "resolved": hi - lo <= 1,
            },
        )
        print(f"  {model}: trains at seq {seq}, batch 1 under {hi * step:g} GB ({knobs.describe()})", flush=True)
        runner.release()


def widths_model(model: str, layers: int | None, prefix: str) -> str:
    """`model` as the stage steps it: the catalog name, or (a model the card cannot hold) a folder holding its
    architecture with its first `layers` layers (their kinds, for a hybrid), built from random weights."""
    import dataclasses

    from autotune.catalog import resolve_model

    if layers is None:
        return model
    full = resolve_model(model).architecture
    arch = dataclasses.replace(full, num_hidden_layers=layers, layer_types=full.layer_types[:layers])
    folder = Path(tempfile.mkdtemp(prefix=f"autotune-gpu-check-{prefix}-"))
    arch.to_hf_config().save_pretrained(folder)
    return str(folder)


def measure_widths(
    plan: Plan, results: Results, stage: str, spec: tuple, knobs_on: dict, label: str = "", **config
) -> None:
    """A step of one model's widths at each of its sequences (`spec`: model, layers, cap, sequences), with these
    knobs on: the measured peak and tokens/s against the estimate, one record per sequence in `stage`."""
    from autotune.estimate import estimate

    name, layers, cap, seqs = spec
    runner = runner_for(base_config(widths_model(name, layers, stage), plan.rehearse, **config), cap)
    knobs = runner.knobs.with_(**knobs_on)
    runner.knobs = knobs
    for seq in seqs:
        if plan.left() < 60:
            results.append(stage, {"seq": seq, "skipped": "out of time"})
            continue
        trial = runner.measure(1, seq, runner.cfg.lora_r, knobs=knobs)
        record = results.trial(stage, runner, trial)
        est = estimate(shape_of_run(runner, knobs, seq=seq, rank=runner.cfg.lora_r)).peak_bytes
        row = {"model": name, "layers": layers, "seq": seq}
        if runner.ctx.spec.architecture.is_moe:
            row["experts_4bit"] = knobs.experts_4bit
            row["experts_split_lora"] = knobs.experts_split_lora
        if label:
            row["delta_kernel"] = label
        row |= {
            "peak_bytes": trial.peak_bytes,
            "estimate_bytes": est,
            "tokens_per_second": trial.tokens_per_second,
            "fits": trial.fits,
            "load_peak_bytes": record.get("load_peak_bytes"),
        }
        results.append(stage, row)
        print(
            f"  {name} x {layers or 'all'} layers{f' ({label})' if label else ''}, seq {seq}: peak "
            f"{(trial.peak_bytes or 0) / GiB:.2f} GiB (estimate {est / GiB:.2f}), {trial.tokens_per_second or 0:.0f} tok/s",
            flush=True,
        )
    runner.release()


def stage_moe(plan: Plan, results: Results) -> None:
    """A mixture of experts: a step of Qwen3-30B-A3B's widths (128 experts of width 768, 8 per token; 2 of its
    layers, built from the architecture) with adapters on attention and on every expert, checkpointing and the
    fused loss, at each of the plan's sequences: the measured peak and tokens/s against the estimate's sparse-layer
    kind (the CPU tracker agrees within 1% at 2,048 tokens; bench/moe_bench.py). Three times: the experts in NF4
    (experts_4bit, what a QLoRA of the model runs by default), in bf16 with the split LoRA (experts_split_lora, a
    bf16 LoRA's default) and in bf16 folded by PEFT (grouped matmuls: what the split LoRA's eager loop costs in
    tokens/s); the row's experts_4bit and experts_split_lora say which."""
    spec = (plan.moe_model, plan.moe_layers, plan.moe_cap, plan.moe_seqs)
    attention = ["q_proj", "k_proj", "v_proj", "o_proj"]
    for nf4, split in ((True, False), (False, True), (False, False)):
        knobs = dict(checkpointing=True, fused_loss=True, experts_4bit=nf4, experts_split_lora=split)
        measure_widths(plan, results, "moe", spec, knobs, lora_dropout=0.0, target_modules=attention)


def stage_hybrid(plan: Plan, results: Results) -> None:
    """A Qwen3.5 hybrid: a bf16 LoRA step of Qwen3.5-9B's widths (4 of its layers: three Gated DeltaNet, one gated
    attention; built from the architecture) with adapters on every projection of both kinds, checkpointing and the
    fused loss, at each of the plan's sequences: the measured peak and tokens/s against the estimate (the CPU tracker
    agrees within 1% at 2,048 tokens; bench/hybrid_bench.py), on the gated-delta kernel this machine has
    (kernels.delta_kernel: flash-linear-attention where its wheel was carried, else transformers' reference rule),
    named in the record. Packing stays off (the layers carry state)."""
    import torch

    from autotune.catalog import resolve_model
    from autotune.kernels import delta_kernel

    spec = (plan.hybrid_model, plan.hybrid_layers, plan.hybrid_cap, plan.hybrid_seqs)
    targets = list(resolve_model(plan.hybrid_model).architecture.projection_names)
    kernel = delta_kernel("cuda" if torch.cuda.is_available() else "cpu")
    knobs = dict(checkpointing=True, fused_loss=True, packing=False)
    config = dict(lora_dropout=0.0, quantization="none", target_modules=targets, tokenizer_name=None)
    measure_widths(plan, results, "hybrid", spec, knobs, kernel, **config)


def stage_longest_seq(plan: Plan, results: Results) -> None:
    """a: the longest Qwen3-8B r=32 batch-1 sequence under a 16 GB cap, every technique on, then each off."""
    from autotune.solve.search import SearchLog, TrialBudgetExceeded, largest_seq
    from autotune.techniques import TECHNIQUES_TABLE

    cfg = base_config(plan.longseq_model, plan.rehearse, lora_r=32, lora_alpha=64)
    runner = runner_for(cfg, plan.longseq_cap)
    step, all_on = plan.longseq_step, lean(runner)
    out: dict = {
        "model": plan.longseq_model,
        "cap_gb": plan.longseq_cap,
        "rank": 32,
        "granularity": step,
        "with_every_technique": None,
        "without": {},
        "knobs": all_on.to_dict(),
    }
    variants = [("all", all_on)]
    for name in (*(t.key for t in TECHNIQUES_TABLE if t.searched), "checkpointing"):
        if getattr(all_on, name):
            # Turning one off turns off what needs it (the table's rules: offloading needs checkpointing, the int8
            # head the fused loss).
            needing = {t.key: False for t in TECHNIQUES_TABLE if any(n.knob == name for n in t.needs)}
            variants.append((name, all_on.with_(**{name: False}, **needing)))
    for name, knobs in variants[: plan.longseq_variants]:
        if plan.left() < 45:
            break
        # Every technique on: searched to the granularity. Each one off: a few trials around the estimate
        # (what each technique is worth, not the exact figure).
        log = SearchLog(
            deadline=time.monotonic() + max(30, plan.left() / 2 - 15),
            max_trials=None if name == "all" else 4,
            on_trial=lambda t: results.trial("longest_seq", runner, t),
        )
        guess = estimated_seq(runner, knobs, 32, plan.longseq_max)
        measure = lambda b, s, r, k=knobs: runner.measure(b, s, r, knobs=k)  # noqa: E731
        try:
            seq, bound = largest_seq(measure, log, 32, lo=step, hi=plan.longseq_max, step=step, guess=guess), "exact"
        except TrialBudgetExceeded:  # cut short (trials or time): the longest measured to fit, a lower bound
            seq, bound = max((t.seq for t in log.trials if t.fits), default=0), "at least"
        out.setdefault("bound", {})[name] = bound
        if name == "all":
            out["with_every_technique"] = seq
        else:
            out["without"][name] = seq
        out.setdefault("estimate", {})[name] = guess
        results.put("longest_seq", out)
        print(f"  longest {plan.longseq_model} r=32 seq, {knobs.describe()}: {seq} (estimate {guess})", flush=True)
    runner.release()


def stage_costs(plan: Plan, results: Results) -> None:
    """c: tokens/s of each technique against the plain step at one shape, no cap."""
    cfg = base_config(plan.costs_model, plan.rehearse)
    runner = runner_for(cfg, 10**6)
    batch, seq = plan.costs_shape
    base = plain()
    fused = base.with_(fused_loss=True)
    variants = {
        "plain": base,
        "fused_loss": fused,
        "fused+offload": fused.with_(offload_activations=True),
        "fused+packing": fused.with_(packing=True),
        "fused, no checkpointing": fused.with_(checkpointing=False),
    }
    if not runner.ctx.architecture.tie_word_embeddings:
        variants["fused+embedding_on_cpu"] = fused.with_(embedding_on_cpu=True)
        variants["fused+lm_head_8bit"] = fused.with_(lm_head_8bit=True)
    out: dict = {"model": plan.costs_model, "batch": batch, "seq": seq, "rank": cfg.lora_r, "runs": {}}
    for name, knobs in variants.items():
        if plan.left() < 30:
            break
        trial = runner.measure(batch, seq, cfg.lora_r, knobs=knobs, steps=plan.costs_steps)
        results.trial("costs", runner, trial)
        out["runs"][name] = {
            "tokens_per_second": trial.tokens_per_second,
            "peak_bytes": trial.peak_bytes,
            "oom": trial.oom,
        }
        results.put("costs", out)
    ref = out["runs"].get("plain", {}).get("tokens_per_second")
    for run in out["runs"].values():
        if ref and run.get("tokens_per_second"):
            run["relative_to_plain"] = run["tokens_per_second"] / ref
    results.put("costs", out)
    runner.release()


def _train(cfg, cap_gb: float, *, profile=None, callbacks=()) -> dict:
    """`autotune train` itself (trainer.train) under a cap: the memory meter capped around the whole run, as
    a card of that size would be. Real tokens/s: the tokens the Trainer counted (padding excluded)."""
    from autotune.memory import make_meter
    from autotune.modeling import pick_device
    from autotune.runner import train

    meter = make_meter(pick_device().type)
    meter.cap(Budget.from_gib(cap_gb).total_bytes)
    meter.reset_peak()
    try:
        with meter:
            summary = train(cfg, profile=profile, extra_callbacks=tuple(callbacks), echo=lambda m: None)
    finally:
        meter.cap(None)
    final = summary.get("final") or {}
    runtime, tokens = final.get("train_runtime"), final.get("num_input_tokens_seen")
    out = {
        "status": summary["status"],
        "steps": final.get("global_step"),
        "peak_bytes": meter.peak_bytes(),
        "oom_recoveries": summary.get("oom_recoveries"),
        "train_runtime": runtime,
        "tokens_seen": tokens,
        "real_tokens_per_second": tokens / runtime if runtime and tokens else None,
        "batch_size": cfg.batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "max_sequence_length": cfg.max_sequence_length,
        "lora_r": cfg.lora_r,
    }
    meter.cleanup()
    return out


def stage_real_data(plan: Plan, results: Results, stats: dict | None) -> None:
    """d, e: the shipped sample data at one cap: the guide's 16 GB preset, a profile solved without the
    techniques (yesterday's solver), and one solved with them, each trained by the runner; the last one for
    plan.real_steps steps with TensorBoard, checkpoints every quarter and an injected OOM."""
    from helpers.faults import InjectOOM

    from autotune.config import load_config, preset_path
    from autotune.profile import apply_profile
    from autotune.solve import SolveRequest, solve
    from autotune.techniques import TECHNIQUES_TABLE

    preset = load_config(preset_path(GUIDE_PRESET))
    techniques_off = {t.key: "off" for t in TECHNIQUES_TABLE}  # yesterday's step: none of the techniques
    keep = (
        "batch_size",
        "gradient_accumulation_steps",
        "max_sequence_length",
        "lora_r",
        "lora_alpha",
        "lora_dropout",
        "target_modules",
        "quantization",
        "optimizer",
        "gradient_checkpointing",
    )
    shape = {k: getattr(preset, k) for k in keep}
    if plan.rehearse:  # the preset's micro-batch and sequence, but not 64 samples a step on two CPU cores
        shape["gradient_accumulation_steps"] = 2
    guide = base_config(
        plan.real_model,
        plan.rehearse,
        effective_batch_size=None,
        **shape,
        **techniques_off,
        max_steps=plan.guide_steps,
        eval_ratio=0.0,
        save_every_n_steps=10**6,
    )
    out: dict = {
        "model": plan.real_model,
        "cap_gb": plan.real_cap,
        "preset": GUIDE_PRESET,
        "data": stats,
        "guide": _train(guide, plan.real_cap),
    }
    results.put("real_data", out)
    for name, extra in (("solved_without_techniques", techniques_off), ("solved", {})):
        if name not in plan.real_runs:
            continue
        if plan.left() < 60:
            out[name] = {"skipped": "out of time"}
            break
        cfg = base_config(plan.real_model, plan.rehearse, **extra)
        runner = runner_for(cfg, plan.real_cap)
        req = SolveRequest(
            ctx=runner.ctx,
            data_stats=stats,
            time_budget_s=max(20, min(90, plan.left() / 3)),
            max_trials=plan.max_trials,
        )
        record = lambda t, r=runner, n=name: results.trial(f"real_data/{n}", r, t)  # noqa: E731
        result = solve(req, runner, on_trial=record)
        profile = solved_profile(req, result, runner)
        runner.release()
        steps = plan.real_steps if name == "solved" else plan.guide_steps
        run_cfg = apply_profile(
            replace(
                cfg,
                max_steps=steps,
                eval_ratio=0.0,
                enable_tensorboard=name == "solved",
                save_every_n_steps=max(1, steps // 4),
            ),
            profile,
        )
        # An OOM mid-run (injected: the cap holds) shows the recovery on the device, where a smaller batch exists.
        inject = name == "solved" and run_cfg.batch_size > 1
        callbacks = [InjectOOM([plan.oom_at])] if inject else []
        run = _train(run_cfg, plan.real_cap, profile=profile, callbacks=callbacks)
        run["injected_oom_at"] = plan.oom_at if inject else None
        run["choice"], run["reason"] = profile["choice"], profile["reason"]
        if name == "solved":
            out_dir = Path(run_cfg.output_dir)
            run["checkpoints"] = sorted(p.name for p in (out_dir / "checkpoints").glob("checkpoint-*"))
            run["tensorboard_files"] = len(list(Path(run_cfg.log_dir).rglob("events.out.tfevents*")))
        out[name] = run
        ours, base = run.get("real_tokens_per_second"), out["guide"].get("real_tokens_per_second")
        if ours and base:
            run["speedup_vs_guide"] = ours / base
        results.put("real_data", out)
    solved, before = out.get("solved") or {}, out.get("solved_without_techniques") or {}
    if solved.get("real_tokens_per_second") and before.get("real_tokens_per_second"):
        solved["speedup_vs_solved_without_techniques"] = (
            solved["real_tokens_per_second"] / before["real_tokens_per_second"]
        )
    results.put("real_data", out)


def stage_solve(plan: Plan, results: Results, stats: dict | None) -> None:
    """The solve grid: per model one build, per cap a solve (every trial recorded), then the choice for up to
    train_steps steps under the same cap, and the estimate of the choice."""
    from autotune.estimate import estimate
    from autotune.solve import SolveRequest, solve

    for model in plan.solve_models:
        if plan.left() < 60:
            results.append("solve_train", {"model": model, "skipped": "out of time"})
            continue
        runner = runner_for(base_config(model, plan.rehearse), plan.solve_caps[-1])
        t0 = time.perf_counter()
        runner.model_for(runner.cfg.lora_r)
        build_s = round(time.perf_counter() - t0, 1)
        for cap in plan.solve_caps:
            if plan.left() < 45:
                break
            runner.set_budget(Budget.from_gib(cap))
            entry: dict = {"model": model, "cap_gb": cap, "build_seconds": build_s}
            req = SolveRequest(
                ctx=runner.ctx,
                data_stats=stats,
                seq=plan.solve_seq,
                max_trials=plan.max_trials,
                time_budget_s=max(20, min(120, plan.left() / 2)),
            )
            t = time.perf_counter()
            try:
                result = solve(req, runner, on_trial=lambda tr, r=runner: results.trial("solve", r, tr))
            except UserError as exc:  # nothing fits: a finding, not a failure of the run
                entry.update(error=f"UserError: {str(exc)[:500]}", solve_seconds=round(time.perf_counter() - t, 1))
                results.append("solve_train", entry)
                continue
            entry["solve_seconds"] = round(time.perf_counter() - t, 1)
            profile = solved_profile(req, result, runner)
            best, choice = result.best, profile["choice"]
            entry.update(choice=choice, trials=len(result.trials), reason=profile["reason"])
            steps = max(3, min(plan.train_steps, int(25 / (best.step_seconds or 1.0))))
            run = runner.measure(best.batch, best.seq, best.rank, knobs=best.knobs, steps=steps)
            results.trial("solve/run", runner, run)
            entry["train"] = {
                "steps": steps,
                "oom": run.oom,
                "peak_bytes": run.peak_bytes,
                "peak_fraction": run.peak_bytes / runner.budget.total_bytes if run.peak_bytes else None,
                "tokens_per_second": run.tokens_per_second,
            }
            est = estimate(shape_of_run(runner, best.knobs, batch=best.batch, seq=best.seq, rank=best.rank))
            entry["estimate"] = {"peak_bytes": est.peak_bytes, "components": est.components}
            if run.peak_bytes:
                entry["estimate"]["error"] = est.peak_bytes / run.peak_bytes - 1
            results.append("solve_train", entry)
            print(f"  {model} @ {cap} GB: batch {best.batch} x seq {best.seq}, {best.knobs.describe()}", flush=True)
        runner.release()


def stage_ddp(plan: Plan, results: Results) -> None:
    """f: `autotune solve --gpus 2 --strategy ddp` and `autotune train --nproc 1` of its profile, as a user runs
    them (real processes: the second under torchrun)."""
    from autotune.estimate import estimate, shape_for
    from autotune.profile import load_profile

    scratch = Path(tempfile.mkdtemp(prefix="autotune-gpu-check-ddp-"))
    cfg = base_config(
        plan.ddp_model,
        plan.rehearse,
        output_dir=str(scratch / "run"),
        log_dir=str(scratch / "logs"),
        max_steps=plan.ddp_steps,
        save_every_n_steps=max(1, plan.ddp_steps // 2),
        eval_ratio=0.0,
        structured_logging={"enabled": True, "log_file": str(scratch / "logs" / "run.jsonl")},
    )
    config = scratch / "config.json"
    config.write_text(json.dumps(cfg.to_dict()), encoding="utf-8")
    profile_path = scratch / "profile.json"
    cli = [sys.executable, "-m", "autotune.cli"]
    solve = subprocess.run(
        [
            *cli,
            "solve",
            "--config",
            str(config),
            "--gpus",
            "2",
            "--strategy",
            "ddp",
            "--max-memory-gb",
            str(plan.ddp_cap),
            "--seq",
            str(plan.ddp_seq),
            "--max-trials",
            str(plan.max_trials),
            "--output",
            str(profile_path),
        ],
        capture_output=True,
        text=True,
        timeout=max(60, plan.left() / 2),
    )
    out: dict = {"model": plan.ddp_model, "cap_gb": plan.ddp_cap, "solve_returncode": solve.returncode}
    results.put("ddp", out)
    if solve.returncode != 0:
        raise RuntimeError(f"solve --gpus 2 failed: {solve.stderr[-2000:]}")
    profile = load_profile(profile_path)
    choice = profile["choice"]
    arch_cfg = base_config(plan.ddp_model, plan.rehearse)
    from autotune.context import RunContext

    estimated = estimate(
        shape_for(
            arch_cfg,
            RunContext(arch_cfg).architecture,
            batch=choice["batch_size"],
            seq=choice["max_sequence_length"],
            rank=choice["lora_r"],
            device="cpu" if plan.rehearse else "cuda",
            world_size=2,
            strategy="ddp",
        )
    )
    out.update(
        constraints={k: profile["constraints"].get(k) for k in ("world_size", "strategy", "strategy_reason")},
        choice={k: choice[k] for k in ("batch_size", "gradient_accumulation_steps", "effective_batch_size")},
        peak_bytes=profile["measurement"]["peak_bytes"],
        ddp_bucket_bytes=profile["measurement"]["ddp_bucket_bytes"],
        estimated_bucket_bytes=estimated.components["distributed"],
        trials=len(profile["trials"]),
    )
    results.put("ddp", out)
    train = subprocess.run(
        [*cli, "train", "--config", str(config), "--profile", str(profile_path), "--nproc", "1"],
        capture_output=True,
        text=True,
        timeout=max(60, plan.left() - 10),
    )
    summary_path = Path(cfg.output_dir) / "run_summary.json"
    summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.is_file() else {}
    out["train"] = {
        "returncode": train.returncode,
        "status": summary.get("status"),
        "steps": (summary.get("final") or {}).get("global_step"),
        "device": (summary.get("model") or {}).get("device"),
        "rederived": [line for line in train.stderr.splitlines() if "re-derived" in line],
        "checkpoints": sorted(p.name for p in (Path(cfg.output_dir) / "checkpoints").glob("checkpoint-*")),
        "stderr_tail": train.stderr[-1500:] if train.returncode else None,
    }
    results.put("ddp", out)
    if train.returncode != 0:
        raise RuntimeError(f"train --nproc 1 failed: {train.stderr[-2000:]}")


# ------------------------------------------------------------------------------------------- the run


def freeze_imported_objects() -> None:
    """The training stack imported now, then every object alive (modules, classes: never garbage) moved out of the
    cycle collector's sight (gc.freeze). memory.free_memory collects around every trial and run; walking the ~500k
    objects of torch, transformers and peft cost ~0.4 s of CPU each time, dozens of times a run. The models the
    stages build come later and are collected as before."""
    import gc

    import autotune.runner
    import autotune.trial  # noqa: F401

    gc.collect()
    gc.freeze()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--rehearse", action="store_true")
    ap.add_argument("--budget-s", type=float, default=450, help="Stop starting new work after this many seconds.")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"Comma-separated, from: {', '.join(STAGES)}.")
    ap.add_argument("--quick", action="store_true", help="With --rehearse: the smallest run of every stage (tests).")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plan = Plan(args.rehearse, time.monotonic() + args.budget_s, quick=args.quick)
    from autotune.memory import ensure_expandable_segments

    ensure_expandable_segments()
    from autotune.context import RunContext
    from autotune.data.prepare import data_length_stats
    from autotune.hardware import probe, render_table, training_gpu
    from autotune.techniques import fused_kernel

    freeze_imported_objects()
    probe_doc = probe(".")
    gpu = training_gpu(probe_doc)
    import torch

    meta = {
        "date": now(),
        "commit": git_commit(),
        "rehearse": args.rehearse,
        "card": gpu["name"] if gpu else "cpu",
        "driver": probe_doc.get("driver"),
        "packages": probe_doc["host"]["packages"],
        "torch_cuda_build": probe_doc["host"].get("torch_cuda_build"),
        "fused_loss_kernel": fused_kernel("cuda" if torch.cuda.is_available() else "cpu"),
    }
    results = Results(out, meta)
    stages = args.stages.split(",")
    if "probe" in stages:
        (out / "probe.json").write_text(json.dumps(probe_doc, indent=2))
        print(render_table(probe_doc), flush=True)
        results.put("probe", {"gpus": probe_doc["gpus"], "nvml_error": probe_doc["nvml_error"]})
    # The shipped sample data through the offline tokenizer (the GPU machine has no network).
    stats = data_length_stats(RunContext(base_config(plan.real_model, plan.rehearse)))
    results.put("data_stats", stats)
    for name, fn in [
        ("min_cap", lambda: stage_min_cap(plan, results)),
        ("moe", lambda: stage_moe(plan, results)),
        ("hybrid", lambda: stage_hybrid(plan, results)),
        ("longseq", lambda: stage_longest_seq(plan, results)),
        ("costs", lambda: stage_costs(plan, results)),
        ("real_data", lambda: stage_real_data(plan, results, stats)),
        ("solve", lambda: stage_solve(plan, results, stats)),
        ("ddp", lambda: stage_ddp(plan, results)),
    ]:
        if name not in stages:
            continue
        if plan.left() < 20:
            results.error(name, TimeoutError("out of time before the stage"))
            continue
        print(f"== stage {name} ({plan.left():.0f}s left)", flush=True)
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - one failed stage must not cost the GPU run the others
            traceback.print_exc()
            results.error(name, exc)
    results.doc["meta"]["finished"] = now()
    results.save()
    # The name bench/results/ expects, so a run's file can be committed as it is.
    card = "".join(c if c.isalnum() or c in ".-" else "-" for c in meta["card"])
    (out / f"{meta['date'][:10]}-{card}{'-rehearsal' if args.rehearse else ''}.json").write_text(
        json.dumps(results.doc, indent=2, default=str)
    )
    print_summary(results.doc)
    return 1 if results.doc["errors"] else 0


def print_summary(doc: dict) -> None:
    stages = doc["stages"]
    print(
        "\n== summary",
        doc["meta"]["card"],
        doc["meta"]["date"],
        doc["meta"]["commit"],
        f"fused loss: {doc['meta'].get('fused_loss_kernel')}",
    )
    for m in stages.get("moe", []):
        if "peak_bytes" in m:
            print(
                f"moe {m['model']} x {m['layers'] or 'all'} layers, seq {m['seq']}"
                f"{' (nf4 experts)' if m.get('experts_4bit') else ' (split)' if m.get('experts_split_lora') else ''}: "
                f"{(m['peak_bytes'] or 0) / GiB:.2f} "
                f"GiB (estimate {m['estimate_bytes'] / GiB:.2f}), {m['tokens_per_second'] or 0:.0f} tok/s"
            )
    for m in stages.get("hybrid", []):
        if "peak_bytes" in m:
            print(
                f"hybrid {m['model']} x {m['layers'] or 'all'} layers ({m['delta_kernel']}), seq {m['seq']}: "
                f"{(m['peak_bytes'] or 0) / GiB:.2f} GiB (estimate {m['estimate_bytes'] / GiB:.2f}), "
                f"{m['tokens_per_second'] or 0:.0f} tok/s"
            )
    for m in stages.get("min_cap", []):
        print(f"min cap {m['model']}: {m.get('smallest_cap_gb', m.get('skipped'))} GB at seq {m.get('seq')}, batch 1")
    ls = stages.get("longest_seq") or {}
    if ls:
        print(
            f"longest seq {ls['model']} r=32 batch 1 @ {ls['cap_gb']} GB: {ls['with_every_technique']} tokens; "
            f"without each: {ls['without']}"
        )
    costs = stages.get("costs") or {}
    for name, run in costs.get("runs", {}).items():
        rel = f" ({run['relative_to_plain']:.2f}x plain)" if run.get("relative_to_plain") else ""
        print(
            f"cost {name}: {run.get('tokens_per_second') or 0:.0f} tok/s{rel}, peak {(run.get('peak_bytes') or 0) / GiB:.2f} GiB"
        )
    real = stages.get("real_data") or {}
    for name in ("guide", "solved_without_techniques", "solved"):
        run = real.get(name) or {}
        if run.get("real_tokens_per_second"):
            print(
                f"real data {name}: {run['real_tokens_per_second']:.0f} real tok/s, {run.get('steps')} steps, "
                f"OOM recoveries {len(run.get('oom_recoveries') or [])}"
            )
    for key in ("speedup_vs_guide", "speedup_vs_solved_without_techniques"):
        if (real.get("solved") or {}).get(key):
            print(f"real data {key}: {real['solved'][key]:.2f}x")
    for e in stages.get("solve_train", []):
        c, tr = e.get("choice") or {}, e.get("train") or {}
        print(
            f"solve {e['model']} @ {e.get('cap_gb')} GB: batch {c.get('batch_size', '-')} x seq "
            f"{c.get('max_sequence_length', '-')}, peak/budget {tr.get('peak_fraction') or 0:.3f}, "
            f"OOM {tr.get('oom')}" + (f"  error: {e['error'][:80]}" if e.get("error") else "")
        )
    ddp = stages.get("ddp") or {}
    if ddp.get("trials"):
        tr = ddp.get("train") or {}
        print(
            f"ddp {ddp['model']}: solve --gpus 2 chose batch {ddp['choice']['batch_size']}, per-rank peak "
            f"{(ddp.get('peak_bytes') or 0) / GiB:.3f} GiB incl. buckets {ddp.get('ddp_bucket_bytes')} B (estimate "
            f"{ddp.get('estimated_bucket_bytes')} B); train --nproc 1: {tr.get('status')} on {tr.get('device')}, "
            f"{tr.get('steps')} steps"
        )
    print(f"{len(doc['trials'])} trials recorded")
    if doc["errors"]:
        print(f"{len(doc['errors'])} stage error(s): " + "; ".join(e["error"][:120] for e in doc["errors"]))


if __name__ == "__main__":
    sys.exit(main())
