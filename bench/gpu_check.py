"""Every GPU claim of autotune, measured in one prepared run (see bench/gpu_check.sh).

Stages run in order of value and each writes its result into --out as soon as it has it (a run cut
short still returns data): probe; solve Qwen3-0.6B/4B/8B/14B (random init, 4-bit) under simulated
8/12/16/24 GB caps; 30 training steps with each solved profile under the same cap (peak / budget,
OOMs); estimate error against the measured peak; the guide's 16 GB preset against autotune's profile
(tokens/s); the longest Qwen3-8B r=32 sequence at batch 1 under 16 GB; solve wall time.

`--rehearse` runs every stage on the CPU with the tiny model and small simulated caps.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from autotune.errors import UserError
from autotune.units import Budget, GiB

# The guide's 16 GB tier, loaded from its preset file (never copied here): the throughput stage's baseline.
GUIDE_PRESET = "hardware/16gb"


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Results:
    """results.json rewritten atomically after every stage."""

    def __init__(self, out: Path, meta: dict):
        self.out = out
        self.doc = {"meta": meta, "stages": {}, "errors": []}
        self.save()

    def put(self, stage: str, value) -> None:
        self.doc["stages"][stage] = value
        self.save()

    def append(self, stage: str, value) -> None:
        self.doc["stages"].setdefault(stage, []).append(value)
        self.save()

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
        return (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        return None


class Plan:
    def __init__(self, rehearse: bool, deadline: float, quick: bool = False):
        self.rehearse = rehearse
        self.deadline = deadline
        if rehearse:
            self.models = ["tiny-qwen3"]
            self.caps = [0.25, 0.35]
            self.train_steps = 3
            self.throughput_model, self.throughput_cap = "tiny-qwen3", 0.35
            self.longseq_model, self.longseq_cap, self.longseq_max = "tiny-qwen3", 0.35, 1024
            self.fixed_models, self.fixed_shape = ["tiny-qwen3"], (2, 64)
            self.data_dir = "data/raw"
            self.solve_seq = None  # the data's p99
            self.reserve_s = 0
            self.train_step_budget_s = 60
            if quick:  # the test suite's rehearsal: every stage once, at the smallest size
                self.caps, self.train_steps, self.longseq_max = [0.35], 2, 256
        else:
            self.models = ["Qwen3-0.6B", "Qwen3-4B", "Qwen3-8B", "Qwen3-14B"]
            self.caps = [8.0, 12.0, 16.0, 24.0]
            self.train_steps = 30
            self.throughput_model, self.throughput_cap = "Qwen3-4B-Thinking-2507", 16.0
            self.longseq_model, self.longseq_cap, self.longseq_max = "Qwen3-8B", 16.0, 65536
            self.fixed_models, self.fixed_shape = ["Qwen3-0.6B", "Qwen3-4B"], (4, 512)
            self.data_dir = "data/raw"
            self.solve_seq = 512
            # Time kept back from the solve stage for throughput, longest-sequence and fixed-shape.
            self.reserve_s = 150
            self.train_step_budget_s = 25

    def left(self) -> float:
        return self.deadline - time.monotonic()


def base_config(model: str, rehearse: bool, **extra):
    from autotune.config import build_config

    values = dict(
        model_name=model,
        init="random",
        quantization="4bit",
        data_dir="data/raw",
        output_dir="/tmp/autotune-gpu-check",
        verify_environment=False,
        enable_tensorboard=False,
        enable_inference_test=False,
        effective_batch_size=64,
        batch_size=1,
        gradient_accumulation_steps=64,
        lora_r=16,
        lora_alpha=32,
        optimizer="paged_adamw_8bit",
        structured_logging={"enabled": False},
    )
    if rehearse:
        values.update(tokenizer_name="qwen3-offline", effective_batch_size=8, gradient_accumulation_steps=8)
    values.update(extra)
    return build_config(values, "gpu_check")


def runner_for(cfg, cap_gb: float):
    """The solver's own trial runner (trial.TrialRunner) for a config, capped at `cap_gb`."""
    from autotune.context import RunContext
    from autotune.trial import TrialRunner

    return TrialRunner(RunContext(cfg), Budget.from_gib(cap_gb))


def measure_steps(runner, batch: int, seq: int, steps: int, *, rank: int | None = None, checkpointing=None) -> dict:
    """`steps` optimizer steps of the solver's trial (the training step) under the runner's cap:
    peak, OOM, tokens/s, with the shape's settings so the estimate can be judged against it later."""
    rank = rank or runner.cfg.lora_r
    trial = runner.measure(batch, seq, rank, checkpointing=checkpointing, steps=steps)
    budget = runner.budget.total_bytes
    out = {
        "batch": batch,
        "seq": seq,
        "rank": rank,
        "steps": steps,
        "checkpointing": trial.checkpointing,
        "oom": trial.oom,
        "seconds": trial.seconds,
        "peak_fraction": trial.peak_bytes / budget if trial.peak_bytes else None,
    }
    if trial.oom:
        out["error"] = trial.note
    else:
        out.update(
            peak_bytes=trial.peak_bytes,
            step_seconds=trial.step_seconds,
            tokens_per_second=trial.tokens_per_second,
        )
    return out


def estimate_for(cfg, batch: int, seq: int, device: str) -> dict | None:
    from autotune.catalog import resolve_model
    from autotune.estimate import estimate_peak, options_for

    est = estimate_peak(
        resolve_model(cfg.model_name).architecture, batch=batch, seq=seq, rank=cfg.lora_r, **options_for(cfg, device)
    )
    return {"peak_bytes": est.peak_bytes, "components": est.components}


def stage_solve_and_train(plan: Plan, results: Results, stats: dict | None) -> None:
    """b, c, d, g: per model one build, then per cap a solve, 30 steps at the choice, the estimate."""
    for model in plan.models:
        if plan.left() < plan.reserve_s + 30:
            results.append("skipped", f"{model}: out of time")
            continue
        cfg = base_config(model, plan.rehearse)
        t0 = time.perf_counter()
        runner = runner_for(cfg, plan.caps[-1])
        runner.model_for(cfg.lora_r)
        build_s = time.perf_counter() - t0
        for cap in plan.caps:
            if plan.left() < plan.reserve_s:
                results.append("skipped", f"{model} @ {cap} GB: out of time")
                continue
            runner.set_budget(Budget.from_gib(cap))
            try:
                entry = solve_and_train_one(plan, runner, cap, build_s, stats)
            except Exception as exc:  # noqa: BLE001 - one failed solve must not cost the run the other caps
                entry = {"model": model, "cap_gb": cap, "error": f"{type(exc).__name__}: {str(exc)[:500]}"}
            results.append("solve_train", entry)
        runner.release()


def solve_and_train_one(plan: Plan, runner, cap: float, build_s: float, stats: dict | None) -> dict:
    """One model at one cap: the solve, then the choice run for up to 30 steps, then the estimate."""
    from autotune.profile import profile_from_solve
    from autotune.solver import SolveRequest, solve

    cfg = runner.cfg
    # On the GPU the solve runs at a fixed, representative sequence (the guide's 16 GB tier uses
    # 512); the p99 path is exercised by the rehearsal and the tests.
    req = SolveRequest(
        ctx=runner.ctx,
        data_stats=stats,
        seq=plan.solve_seq,
        time_budget_s=min(120, max(20, plan.left() - plan.reserve_s)),
    )
    entry = {"model": cfg.model_name, "cap_gb": cap, "build_seconds": round(build_s, 1)}
    t = time.perf_counter()
    try:
        result = solve(
            req, runner, on_trial=lambda tr: print("   ", tr.describe(runner.budget.total_bytes), flush=True)
        )
    except UserError as exc:  # nothing fits: a finding, not a failure of the run
        entry.update(error=f"UserError: {str(exc)[:500]}", solve_seconds=round(time.perf_counter() - t, 1))
        return entry
    entry["solve_seconds"] = round(time.perf_counter() - t, 1)
    profile = profile_from_solve(
        req,
        result,
        hardware={"device": runner.device_type},
        init=runner.init,
        dtype=runner.dtype,
        device_type=runner.device_type,
    )
    entry.update(
        choice=profile["choice"],
        trials=len(profile["trials"]),
        trial_shapes=profile["trials"],
        solver_peak_bytes=profile["measurement"]["peak_bytes"],
        solver_tokens_per_second=profile["measurement"]["tokens_per_second"],
        reason=profile["reason"],
    )
    choice = profile["choice"]
    # 30 steps where a step is quick; fewer (>= 5) where 30 would eat the run's budget.
    step_s = profile["measurement"]["step_seconds"] or 1.0
    steps = max(5, min(plan.train_steps, int(plan.train_step_budget_s / step_s)))
    run = measure_steps(
        runner,
        choice["batch_size"],
        choice["max_sequence_length"],
        steps,
        rank=choice["lora_r"],
        checkpointing=choice["gradient_checkpointing"],
    )
    entry["train"] = run
    est = estimate_for(
        replace(cfg, lora_r=choice["lora_r"]), choice["batch_size"], choice["max_sequence_length"], runner.device_type
    )
    if est and run.get("peak_bytes"):
        est["error"] = (est["peak_bytes"] - run["peak_bytes"]) / run["peak_bytes"]
    entry["estimate"] = est
    print(f"  {cfg.model_name} @ {cap} GB: {json.dumps({'choice': choice}, default=str)[:300]}", flush=True)
    return entry


def stage_fixed_shape(plan: Plan, results: Results) -> None:
    """The training issue's figures: fixed batch x seq, 30 steps, tokens/s and peak, no cap."""
    batch, seq = plan.fixed_shape
    for model in plan.fixed_models:
        if plan.left() < 60:
            return
        runner = runner_for(base_config(model, plan.rehearse), 10**6)
        run = measure_steps(runner, batch, seq, plan.train_steps)
        run["model"] = model
        results.append("fixed_shape", run)
        runner.release()


def guide_preset_config(plan: Plan):
    """The guide's 16 GB preset from profiles/, with gpu_check's own settings (random init, no outputs)."""
    from autotune.config import load_config, preset_path

    preset = load_config(preset_path(GUIDE_PRESET))
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
    model = plan.throughput_model or preset.model_name
    return preset, base_config(model, plan.rehearse, effective_batch_size=None, **{k: getattr(preset, k) for k in keep})


def stage_throughput(plan: Plan, results: Results) -> None:
    """e: the guide's 16 GB preset (profiles/hardware/16gb.json) against autotune's solved profile, same cap,
    same sequence and rank."""
    from autotune.solver import SolveRequest, solve

    if plan.left() < 90:
        results.put("throughput", {"skipped": "out of time"})
        return
    preset, cfg = guide_preset_config(plan)
    seq = 64 if plan.rehearse else cfg.max_sequence_length
    runner = runner_for(cfg, plan.throughput_cap)
    steps = max(3, plan.train_steps // 3)
    guide = measure_steps(runner, cfg.batch_size, seq, steps)
    out = {
        "model": cfg.model_name,
        "preset": GUIDE_PRESET,
        "preset_shape": {
            "batch_size": preset.batch_size,
            "max_sequence_length": preset.max_sequence_length,
            "lora_r": preset.lora_r,
            "lora_alpha": preset.lora_alpha,
        },
        "cap_gb": plan.throughput_cap,
        "seq": seq,
        "guide": guide,
    }
    results.put("throughput", out)
    req = SolveRequest(ctx=runner.ctx, seq=seq, time_budget_s=min(90, plan.left() - 30), try_without_checkpointing=True)
    result = solve(req, runner)
    best = result["best"]
    ours = measure_steps(runner, best.batch, seq, steps, checkpointing=best.checkpointing)
    out["autotune"] = {
        **ours,
        "choice_batch": best.batch,
        "accumulation": result["accumulation"],
        "solve_trials": len(result["trials"]),
    }
    if guide.get("tokens_per_second") and ours.get("tokens_per_second"):
        out["speedup"] = ours["tokens_per_second"] / guide["tokens_per_second"]
    results.put("throughput", out)
    runner.release()


def stage_longest_seq(plan: Plan, results: Results) -> None:
    """f: the longest sequence Qwen3-8B QLoRA r=32 trains at batch 1 under a 16 GB cap."""
    from autotune.solver import SearchLog, largest_seq

    if plan.left() < 60:
        results.put("longest_seq", {"skipped": "out of time"})
        return
    cfg = base_config(plan.longseq_model, plan.rehearse, lora_r=32, lora_alpha=64)
    runner = runner_for(cfg, plan.longseq_cap)
    log = SearchLog(deadline=time.monotonic() + max(30, plan.left() - 20))
    step = 64 if plan.rehearse else 1024
    seq = largest_seq(runner.measure, log, 32, lo=step, hi=plan.longseq_max, step=step)
    results.put(
        "longest_seq",
        {
            "model": plan.longseq_model,
            "cap_gb": plan.longseq_cap,
            "rank": 32,
            "longest_seq": seq,
            "granularity": step,
            "trials": [asdict(t) for t in log.trials],
        },
    )
    runner.release()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--rehearse", action="store_true")
    ap.add_argument("--budget-s", type=float, default=450, help="Stop starting new work after this many seconds.")
    ap.add_argument("--stages", default="probe,solve,throughput,longseq,fixed")
    ap.add_argument("--models", help="Comma-separated models for the solve stage (default: all four, smallest first).")
    ap.add_argument("--quick", action="store_true", help="With --rehearse: one cap, two steps (the test suite's run).")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plan = Plan(args.rehearse, time.monotonic() + args.budget_s, quick=args.quick)
    if args.models:
        plan.models = args.models.split(",")
    if not {"throughput", "longseq", "fixed"} & set(args.stages.split(",")):
        plan.reserve_s = 0  # nothing after the solve stage to keep time for
    from autotune.memory import ensure_expandable_segments

    ensure_expandable_segments()
    from autotune.hardware import probe, render_table, training_gpu

    probe_doc = probe(".")
    gpu = training_gpu(probe_doc)
    meta = {
        "date": now(),
        "commit": git_commit(),
        "rehearse": args.rehearse,
        "card": gpu["name"] if gpu else "cpu",
        "driver": probe_doc.get("driver"),
        "packages": probe_doc["host"]["packages"],
        "torch_cuda_build": probe_doc["host"].get("torch_cuda_build"),
    }
    results = Results(out, meta)
    stages = args.stages.split(",")
    if "probe" in stages:
        (out / "probe.json").write_text(json.dumps(probe_doc, indent=2))
        print(render_table(probe_doc), flush=True)
        results.put("probe", {"gpus": probe_doc["gpus"], "nvml_error": probe_doc["nvml_error"]})
    from autotune.context import RunContext
    from autotune.data.prepare import data_length_stats

    # The shipped sample data through the offline tokenizer (the GPU machine has no network).
    stats = data_length_stats(RunContext(base_config(plan.models[0], plan.rehearse, tokenizer_name="qwen3-offline")))
    results.put("data_stats", stats)
    for name, fn in [
        ("solve", lambda: stage_solve_and_train(plan, results, stats)),
        ("throughput", lambda: stage_throughput(plan, results)),
        ("longseq", lambda: stage_longest_seq(plan, results)),
        ("fixed", lambda: stage_fixed_shape(plan, results)),
    ]:
        if name not in stages:
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
    print("\n== summary", doc["meta"]["card"], doc["meta"]["date"], doc["meta"]["commit"])
    print(
        f"{'model':24} {'cap':>5} {'batch':>5} {'acc':>4} {'seq':>6} {'r':>3} {'peak/budget':>11} {'OOM':>4} "
        f"{'tok/s':>9} {'est.err':>8} {'solve s':>8}"
    )
    for e in doc["stages"].get("solve_train", []):
        c, tr, est = e.get("choice") or {}, e.get("train") or {}, e.get("estimate") or {}
        frac = f"{tr['peak_fraction']:.3f}" if tr.get("peak_fraction") else "-"
        err = f"{est['error']:+.1%}" if est.get("error") is not None else "-"
        tps = f"{tr['tokens_per_second']:.0f}" if tr.get("tokens_per_second") else "-"
        print(
            f"{e['model']:24} {e['cap_gb']:>5g} {c.get('batch_size', '-'):>5} {c.get('gradient_accumulation_steps', '-'):>4} "
            f"{c.get('max_sequence_length', '-'):>6} {c.get('lora_r', '-'):>3} {frac:>11} "
            f"{('yes' if tr.get('oom') else 'no') if tr else '-':>4} {tps:>9} {err:>8} {e.get('solve_seconds', '-'):>8}"
            + (f"  error: {e['error'][:80]}" if e.get("error") else "")
        )
    tp = doc["stages"].get("throughput") or {}
    if tp.get("guide", {}).get("oom"):
        print(
            f"throughput {tp['model']} @ {tp['cap_gb']} GB: the guide's preset runs out of memory; autotune "
            f"{(tp.get('autotune') or {}).get('tokens_per_second') or 0:.0f} tok/s"
        )
    if tp.get("speedup"):
        print(
            f"throughput {tp['model']} @ {tp['cap_gb']} GB seq {tp['seq']}: guide {tp['guide'].get('tokens_per_second', 0):.0f} "
            f"tok/s, autotune {tp['autotune'].get('tokens_per_second', 0):.0f} tok/s (batch {tp['autotune']['choice_batch']}), "
            f"speedup {tp['speedup']:.2f}x"
        )
    ls = doc["stages"].get("longest_seq") or {}
    if ls.get("longest_seq") is not None:
        print(f"longest seq {ls['model']} r=32 batch 1 @ {ls['cap_gb']} GB: {ls['longest_seq']} tokens")
    for f in doc["stages"].get("fixed_shape", []):
        print(
            f"fixed shape {f['model']} batch {f['batch']} x seq {f['seq']}: "
            f"{f.get('tokens_per_second', 0) or 0:.0f} tok/s, peak {(f.get('peak_bytes') or 0) / GiB:.2f} GiB"
        )
    if doc["errors"]:
        print(f"{len(doc['errors'])} stage error(s): " + "; ".join(e["error"][:120] for e in doc["errors"]))


if __name__ == "__main__":
    sys.exit(main())
