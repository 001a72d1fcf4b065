"""How many trials the solver's micro-batch search needs, against two batch-size finders people use.

    python bench/solver_bench.py [--quick] [--json OUT]

One model (tiny-qwen3, no quantization, random init) at one fixed sequence length, one simulated cap on
the CPU (the CpuTrackedMeter raises a simulated OOM at the cap), and every trial the real training step
(TrialRunner.measure: the HF Trainer for two optimizer steps). Three strategies each run their own trials:

- ours:      autotune.solve.search.largest_batch (linear memory model from two trials, verify, bisect on a miss)
- lightning: Lightning's Tuner.scale_batch_size(mode="binsearch"): start at 2, double until a failure,
             then bisect between the last success and the failure (reimplemented here, not imported)
- accelerate: accelerate's find_executable_batch_size: start at 128, multiply by 0.9 (int) on each OOM
             until one runs

"Fits" is the same test for all three: the step ran and its peak is inside the budget less the 5% margin
(Lightning and accelerate know only "no OOM"; this is them run with the cap at the usable budget).
The true maximum is found by brute force over every batch from 1 up to the first that does not fit; it
reuses any batch some strategy (or the calibration) already measured, since a shape measures the same
peak every time (the tests check this), and measures the rest. Prints figures; asserts nothing.

--quick (under a minute on an idle 2-core machine) runs a shorter sequence and does not run accelerate's
ladder: on a deterministic, monotone memory curve its outcome is fixed by the true maximum (every rung
above it fails, the first rung at or below it fits), so its trial count and batch are replayed from the
brute-force results and its seconds are left out. The full run measures all three.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from autotune.units import DEFAULT_MARGIN, MiB  # noqa: E402  (after the path insert above)


def lightning_binsearch(fits, init_val: int = 2, max_trials: int = 25) -> int:
    """Lightning's `_run_binary_scaling`: double from init_val until a failure, then bisect."""
    low, high, size, count = 1, None, init_val, 0
    while True:
        if fits(size):
            count += 1
            if count > max_trials:
                return size
            low = size
            if high is not None:
                if high - low <= 1:
                    return low
                size = (high + low) // 2
            else:
                size *= 2
        else:
            high = size
            size = (high + low) // 2
            if high - low <= 1:
                return size


def _ladder(start: int):
    batch = start
    while batch > 0:
        yield batch
        batch = int(batch * 0.9)


def accelerate_backoff(fits, starting_batch_size: int = 128) -> int:
    """accelerate's `find_executable_batch_size`: x0.9 (int) after each OOM until one runs."""
    batch = starting_batch_size
    while batch > 0:
        if fits(batch):
            return batch
        batch = int(batch * 0.9)
    return 0


class Bench:
    """Real trials at one (seq, rank) under one cap; remembers the first result of each batch."""

    def __init__(self, runner, seq: int, rank: int):
        self.runner, self.seq, self.rank = runner, seq, rank
        self.cache = {}

    @property
    def usable(self) -> int:
        return self.runner.budget.usable_bytes

    def trial(self, batch: int):
        t = self.runner.measure(batch, self.seq, self.rank)
        self.cache.setdefault(batch, t)
        return t


def run_strategy(bench: Bench, name: str, search) -> dict:
    """`search(trial)` with trial(batch) -> Trial; every call is a fresh trial the strategy pays for."""
    tried = []

    def trial(batch: int):
        t = bench.trial(batch)
        tried.append([batch, t.fits])
        mark = "fits" if t.fits else ("OOM" if t.oom else "over margin")
        print(f"    {name:10s} batch {batch:4d}: {mark:11s} {t.seconds:5.1f}s", flush=True)
        return t

    start = time.perf_counter()
    found = search(trial)
    return {
        "strategy": name,
        "trials": len(tried),
        "seconds": round(time.perf_counter() - start, 2),
        "batch": found,
        "tried": tried,
    }


def strategies(bench: Bench) -> list:
    from autotune.solve.search import SearchLog, largest_batch

    def ours(trial):
        return largest_batch(lambda b, s, r: trial(b), SearchLog(), bench.seq, bench.rank, bench.usable)[0]

    return [
        ("ours", ours),
        ("lightning", lambda trial: lightning_binsearch(lambda b: trial(b).fits)),
        ("accelerate", lambda trial: accelerate_backoff(lambda b: trial(b).fits)),
    ]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--quick",
        action="store_true",
        help="Shorter sequence; accelerate's ladder replayed from the brute force, not run.",
    )
    ap.add_argument("--json", dest="json_out", help="Write the figures here as JSON.")
    ap.add_argument("--seq", type=int, help="Sequence length (default 32, --quick 16).")
    ap.add_argument("--target", type=int, default=20, help="Batch the cap is sized for (true max; default 20).")
    args = ap.parse_args(argv)
    seq = args.seq or (16 if args.quick else 32)

    import torch

    from autotune.config import load_config
    from autotune.context import RunContext
    from autotune.trial import TrialRunner
    from autotune.units import Budget, GiB

    t_start = time.perf_counter()
    load_start = round(os.getloadavg()[0], 2)  # the seconds are wall time: other work on the machine shows in them
    work = Path(tempfile.mkdtemp(prefix="solver_bench_"))
    cfg = load_config(
        REPO / "profiles" / "configs" / "demo.json",
        {"quantization": "none", "output_dir": str(work), "verify_environment": False},
    )
    runner = TrialRunner(RunContext(cfg), Budget(64 * GiB, DEFAULT_MARGIN))
    bench = Bench(runner, seq, cfg.lora_r)

    # Calibration (not counted for any strategy): batch 1 and 2 size the cap so that `target` fits and
    # target + 1 does not, half a batch step either side of the usable budget.
    one, two = bench.trial(1), bench.trial(2)
    step = two.peak_bytes - one.peak_bytes
    usable = int(one.peak_bytes + (args.target - 0.5) * step)
    budget = int(usable / (1 - DEFAULT_MARGIN))
    runner.set_budget(Budget(budget, DEFAULT_MARGIN))
    print(
        f"tiny-qwen3, quantization none, {runner.dtype}, seq {seq}, rank {cfg.lora_r}: batch 1 peaks at "
        f"{one.peak_bytes / MiB:.1f} MiB, +{step / MiB:.1f} MiB per sample; cap {budget / MiB:.1f} MiB, "
        f"usable {bench.usable / MiB:.1f} MiB (less {DEFAULT_MARGIN:.0%})",
        flush=True,
    )

    results = []
    for name, search in strategies(bench):
        if args.quick and name == "accelerate":
            continue
        print(f"  {name}:", flush=True)
        results.append(run_strategy(bench, name, search))

    # Brute force: every batch from 1 to the first that does not fit, reusing measured batches.
    reused, measured, t0 = 0, 0, time.perf_counter()
    true_max = 0
    for b in range(1, 4097):
        if b in bench.cache:
            reused += 1
            t = bench.cache[b]
        else:
            measured += 1
            t = bench.trial(b)
        if not t.fits:
            break
        true_max = b
    brute = {
        "trials": reused + measured,
        "reused": reused,
        "measured": measured,
        "seconds_measuring": round(time.perf_counter() - t0, 2),
    }
    if args.quick:  # replay accelerate's ladder on the brute-force answer (see the module docstring)
        ladder = [[b, b <= true_max] for b in _ladder(128) if b > true_max]
        ladder.append([next(b for b in _ladder(128) if b <= true_max), True])
        results.append(
            {
                "strategy": "accelerate",
                "trials": len(ladder),
                "seconds": None,
                "batch": ladder[-1][0],
                "tried": ladder,
                "replayed": True,
            }
        )

    for r in results:
        r["true_max"] = true_max
        r["within_1"] = true_max - 1 <= r["batch"] <= true_max
    by = {r["strategy"]: r for r in results}
    target = {
        "ours_trials": by["ours"]["trials"],
        "lightning_trials": by["lightning"]["trials"],
        "ratio": round(by["ours"]["trials"] / by["lightning"]["trials"], 3),
        "at_most_a_third": by["ours"]["trials"] * 3 <= by["lightning"]["trials"],
        "within_1": by["ours"]["within_1"],
    }

    print()
    print(f"{'strategy':12s} {'trials':>6s} {'seconds':>8s} {'batch found':>11s} {'true max':>8s}  within 1 of true")
    for r in results:
        secs = f"{r['seconds']:8.1f}" if r["seconds"] is not None else f"{'-':>8s}"
        print(
            f"{r['strategy']:12s} {r['trials']:6d} {secs} {r['batch']:11d} {r['true_max']:8d}  "
            f"{'yes' if r['within_1'] else 'NO'}" + ("  (replayed, not run: --quick)" if r.get("replayed") else "")
        )
    print(
        f"brute force  {brute['trials']:6d} trials to find the true max {true_max}: {brute['reused']} reused from "
        f"the runs above (and calibration), {brute['measured']} measured now ({brute['seconds_measuring']:.1f}s)"
    )
    print(
        f"target: ours <= 1/3 of Lightning's trials and within 1 of the true max: {target['ours_trials']} vs "
        f"{target['lightning_trials']} trials (ratio {target['ratio']:.2f}), "
        f"{'met' if target['at_most_a_third'] and target['within_1'] else 'NOT met'}"
    )
    total = round(time.perf_counter() - t_start, 1)
    print(
        f"total {total}s (1-minute load average {load_start} at the start, {os.getloadavg()[0]:.2f} at the end, "
        f"{os.cpu_count()} CPUs)"
    )

    doc = {
        "kind": "autotune.solver_bench",
        "quick": args.quick,
        "model": "tiny-qwen3",
        "quantization": "none",
        "dtype": runner.dtype,
        "seq": seq,
        "rank": cfg.lora_r,
        "margin": DEFAULT_MARGIN,
        "budget_bytes": budget,
        "usable_bytes": bench.usable,
        "peak_batch1_bytes": one.peak_bytes,
        "bytes_per_sample": step,
        "target_batch": args.target,
        "true_max": true_max,
        "brute_force": brute,
        "strategies": results,
        "target": target,
        "total_seconds": total,
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "device": "cpu (simulated cap)",
            "load_average_1min": [load_start, round(os.getloadavg()[0], 2)],
        },
    }
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
        print(f"figures: {args.json_out}")
    return doc


if __name__ == "__main__":
    main()
