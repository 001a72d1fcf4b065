"""What autotune's own machinery costs, printed as figures (speed targets live here, never as timed asserts in
tests):

- the CPU memory tracker (memory.CpuTrackedMeter) on a tiny Qwen3 LoRA step: tracked / untracked step time
  (target: under 2x, so a CPU solve stays quick);
- the estimate: one Qwen3-14B estimate and one largest_fitting (target: milliseconds; `autotune estimate` and
  the solver's ranking call it often);
- `import autotune.hardware` plus a probe, in a fresh process (target: under a second; no torch);
- the demo's CPU step with glibc's default treatment of large allocations and with freed host memory kept for
  reuse (memory.reuse_freed_host_memory).

    python bench/overhead_bench.py [--json OUT]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def tracker_ratio(repeats: int = 10) -> dict:
    import autotune.quiet  # noqa: F401  (before peft imports bitsandbytes: see quiet.py)

    # isort: split
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen3ForCausalLM

    from autotune.catalog import TINY, resolve_model
    from autotune.memory import CpuTrackedMeter

    torch.manual_seed(0)
    # tiny-qwen3's architecture (the catalog's) with a 1k vocabulary: the tracker's cost per op, not the head's
    arch = dataclasses.replace(resolve_model(TINY).architecture, vocab_size=1024)
    config = arch.to_hf_config()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(Qwen3ForCausalLM(config), LoraConfig(r=8, target_modules=targets))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    x = torch.randint(0, 1024, (4, 256))
    meter = CpuTrackedMeter()
    meter.track_existing(model)

    def step():
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    plain, tracked = [], []
    for _ in range(repeats):  # interleaved, best of several: the machine may be shared
        t = time.perf_counter()
        step()
        plain.append(time.perf_counter() - t)
        with meter:
            t = time.perf_counter()
            step()
            tracked.append(time.perf_counter() - t)
    return {"plain_ms": min(plain) * 1e3, "tracked_ms": min(tracked) * 1e3, "ratio": min(tracked) / min(plain)}


def demo_step(steps: int = 20) -> dict:
    """tokens/s of the demo's step (tiny-qwen3, 4-bit, batch 4 x 48 tokens, no checkpointing, packed) with glibc's
    default treatment of large allocations (a mapping each, unmapped at free), then with freed host memory kept
    for reuse (memory.reuse_freed_host_memory, what autotune does when the CPU trains)."""
    import resource
    import warnings

    from autotune.config import load_config
    from autotune.context import RunContext
    from autotune.memory import _glibc, reuse_freed_host_memory
    from autotune.techniques import Knobs
    from autotune.trial import TrialRunner
    from autotune.units import Budget

    warnings.simplefilter("ignore")
    cfg = load_config(ROOT / "profiles" / "configs" / "demo.json", {"data_dir": str(ROOT / "data" / "raw")})
    runner = TrialRunner(RunContext(cfg), Budget(2**40))
    knobs = Knobs(checkpointing=False, packing=True)
    runner.model_for(cfg.lora_r)  # built first: the build itself switches the reuse on
    out = {}
    libc = _glibc()
    for name in ("glibc_default", "reused"):
        if name == "glibc_default" and libc is not None:
            libc.mallopt(-4, 65536)  # M_MMAP_MAX: glibc's default
            libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD: glibc's default
        elif name == "reused":
            reuse_freed_host_memory()
        runner.measure(4, 48, cfg.lora_r, knobs=knobs, steps=2)  # warm
        before = resource.getrusage(resource.RUSAGE_SELF)
        trial = runner.measure(4, 48, cfg.lora_r, knobs=knobs, steps=steps)
        after = resource.getrusage(resource.RUSAGE_SELF)
        out[name] = {
            "tokens_per_second": trial.tokens_per_second,
            "page_faults_per_step": (after.ru_minflt - before.ru_minflt) / steps,
            "system_seconds_per_step": (after.ru_stime - before.ru_stime) / steps,
        }
    runner.release()
    return out


def estimate_latency(repeats: int = 20) -> dict:
    from autotune.catalog import resolve_model
    from autotune.estimate import estimate_peak, largest_fitting
    from autotune.units import Budget

    arch = resolve_model("Qwen3-14B").architecture
    t = time.perf_counter()
    for _ in range(repeats):
        estimate_peak(arch, batch=1, seq=512, rank=16)
    one = (time.perf_counter() - t) / repeats
    t = time.perf_counter()
    largest_fitting(arch, Budget.from_gib(16), seq=512, rank=16)
    return {"estimate_ms": one * 1e3, "largest_fitting_ms": (time.perf_counter() - t) * 1e3}


def probe_import_seconds() -> float:
    code = (
        "import time; t = time.perf_counter(); import autotune.hardware as h; h.probe(); print(time.perf_counter() - t)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    return float(out.stdout)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, help="Also write the figures here.")
    args = ap.parse_args(argv)
    doc = {
        "kind": "autotune.overhead_bench",
        "tracker": tracker_ratio(),
        "demo_step": demo_step(),
        "estimate": estimate_latency(),
        "probe_import_seconds": probe_import_seconds(),
    }
    t, e = doc["tracker"], doc["estimate"]
    print(f"CPU tracker: {t['tracked_ms']:.1f} ms tracked vs {t['plain_ms']:.1f} ms ({t['ratio']:.2f}x; target < 2x)")
    print(
        f"estimate: {e['estimate_ms']:.2f} ms per Qwen3-14B estimate, {e['largest_fitting_ms']:.1f} ms per largest_fitting"
    )
    print(f"import autotune.hardware + probe: {doc['probe_import_seconds']:.2f} s (target < 1 s)")
    for name, d in doc["demo_step"].items():
        print(
            f"demo step, {name.replace('_', ' ')}: {d['tokens_per_second']:.0f} tokens/s, "
            f"{d['page_faults_per_step']:.0f} page faults and {d['system_seconds_per_step']:.3f} s in the kernel a step"
        )
    if args.json:
        args.json.write_text(json.dumps(doc, indent=2), encoding="utf-8")
    return doc


if __name__ == "__main__":
    main()
