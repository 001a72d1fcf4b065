"""Hold `autotune estimate` to every GPU trial on record, and calibrate it honestly.

    python bench/estimate_check.py                      # the error tables
    python bench/estimate_check.py --write-calibration  # and refit autotune/calibration.json from them

Every result file of bench/gpu_check.py in bench/results/ (not the CPU rehearsals) gives checks: a shape, its
settings and techniques, and the peak it measured. Files written since 2026-12-01 list every trial with all of
that (`trials`); the 2026-11-27 record predates it, and `legacy_checks` reads its stages with the settings
gpu_check.py ran with then.

That record also carries a fault since fixed (step.forget_optimizer_overrides): with an 8-bit bitsandbytes
optimizer the Trainer registered each model's embedding table in a process-wide registry, so every model
built later in the same process was measured with the earlier models' tables still on the GPU. Its peaks are
judged raw and with those tables taken out (`stale_bytes`); calibration uses the latter.

Calibration: on a GPU the estimate adds, beyond the CUDA context (units.DEFAULT_CUDA_OVERHEAD_BYTES), one
constant that the trials show and the arithmetic does not (allocator rounding and reserve, workspaces): the
median residual. It is judged out of sample, leaving one model out at a time: the constant is fitted on the
other models' trials and the error measured on the left-out model's. The out-of-sample range is the error
band `autotune estimate` prints, and its largest-fit answers keep to the safe side of it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from autotune.catalog import resolve_model  # noqa: E402  (after the path insert above)
from autotune.config import DEFAULT_TARGET_MODULES  # noqa: E402
from autotune.estimate import CALIBRATION_PATH, StepShape, estimate  # noqa: E402
from autotune.fsutil import atomic_write_json  # noqa: E402
from autotune.techniques import Knobs, fused_kernel  # noqa: E402

RESULTS = ROOT / "bench" / "results"


@dataclass
class Check:
    source: str  # the result file
    kind: str  # the stage that measured it
    model: str
    batch: int
    seq: int
    rank: int
    peak_bytes: int
    knobs: dict = field(default_factory=lambda: {"checkpointing": True})
    quantization: str = "4bit"
    optimizer: str = "paged_adamw_8bit"
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    lora_dropout: float = 0.1
    bf16: bool = True
    stale_bytes: int = 0  # earlier models' tables still resident (the 2026-11-27 record's fault)

    def estimate(self, residual_bytes: int = 0) -> int:
        est = estimate(
            StepShape(
                resolve_model(self.model).architecture,
                batch=self.batch,
                seq=self.seq,
                rank=self.rank,
                target_modules=tuple(self.target_modules),
                quantization=self.quantization,
                knobs=Knobs.from_dict(self.knobs),
                fused_kernel=fused_kernel("cuda"),
                dtype_bytes=2 if self.bf16 else 4,
                optimizer=self.optimizer,
                lora_dropout=self.lora_dropout,
                device="cuda",
                calibrated=False,
            )
        )
        return est.peak_bytes + residual_bytes

    @property
    def clean_peak(self) -> int:
        return self.peak_bytes - self.stale_bytes


# ------------------------------------------------------------------------------------------- reading


def table_bytes(model: str) -> int:
    """An embedding table in bf16: what each earlier model left resident in the legacy record."""
    arch = resolve_model(model).architecture
    return arch.vocab_size * arch.hidden_size * 2


# The 2026-11-27 record's processes (meta.runs: three calls) and the models each built, in order: call 1 ran
# every stage (solve 0.6B and 4B, then throughput, longest sequence, fixed shapes); calls 2 and 3 solved
# Qwen3-8B and Qwen3-14B alone. A trial's stale tables are those of the models built before it in its call.
LEGACY_BUILD_ORDER = {
    "solve/Qwen3-0.6B": [],
    "solve/Qwen3-4B": ["Qwen3-0.6B"],
    "throughput": ["Qwen3-0.6B", "Qwen3-4B"],
    "longest_seq": ["Qwen3-0.6B", "Qwen3-4B", "Qwen3-4B-Thinking-2507"],
    "fixed/Qwen3-0.6B": ["Qwen3-0.6B", "Qwen3-4B", "Qwen3-4B-Thinking-2507", "Qwen3-8B"],
    "fixed/Qwen3-4B": ["Qwen3-0.6B", "Qwen3-4B", "Qwen3-4B-Thinking-2507", "Qwen3-8B", "Qwen3-0.6B"],
    "solve/Qwen3-8B": [],
    "solve/Qwen3-14B": [],
}


def _stale(key: str) -> int:
    return sum(table_bytes(m) for m in LEGACY_BUILD_ORDER[key])


def legacy_checks(doc: dict, source: str) -> list[Check]:
    """The 2026-11-27 record: its gpu_check ran every shape 4-bit, paged_adamw_8bit, bf16, LoRA on q/k/v/o
    with dropout 0.1 and r=16 (the longest-sequence stage r=32; the throughput stage r=6 on q/v/k/o), and none
    of today's techniques."""
    stages, out = doc["stages"], []
    for e in stages.get("solve_train", []):
        if "choice" not in e:
            continue
        c, key = e["choice"], f"solve/{e['model']}"
        knobs = {"checkpointing": c["gradient_checkpointing"]}
        for kind, peak in (("solve choice", e.get("solver_peak_bytes")), ("30 steps", e["train"].get("peak_bytes"))):
            if peak:
                out.append(
                    Check(
                        source,
                        kind,
                        e["model"],
                        c["batch_size"],
                        c["max_sequence_length"],
                        c["lora_r"],
                        peak,
                        knobs,
                        stale_bytes=_stale(key),
                    )
                )
    tp = stages.get("throughput") or {}
    for name in ("guide", "autotune"):
        run = tp.get(name) or {}
        if run.get("peak_bytes"):
            knobs = {"checkpointing": run.get("checkpointing", True)}
            out.append(
                Check(
                    source,
                    f"throughput {name}",
                    tp["model"],
                    run["batch"],
                    run["seq"],
                    6,
                    run["peak_bytes"],
                    knobs,
                    stale_bytes=_stale("throughput"),
                )
            )
    ls = stages.get("longest_seq") or {}
    for t in ls.get("trials", []):
        if t.get("peak_bytes"):
            out.append(
                Check(
                    source,
                    "longest sequence",
                    ls["model"],
                    t["batch"],
                    t["seq"],
                    t["rank"],
                    t["peak_bytes"],
                    {"checkpointing": t.get("checkpointing", True)},
                    stale_bytes=_stale("longest_seq"),
                )
            )
    for f in stages.get("fixed_shape", []):
        if f.get("peak_bytes"):
            out.append(
                Check(
                    source,
                    "fixed shape",
                    f["model"],
                    f["batch"],
                    f["seq"],
                    16,
                    f["peak_bytes"],
                    stale_bytes=_stale(f"fixed/{f['model']}"),
                )
            )
    return out


def recorded_checks(doc: dict, source: str) -> list[Check]:
    """A record that lists every trial with its settings (gpu_check.py since 2026-12-01)."""
    return [
        Check(
            source,
            t["stage"],
            t["model"],
            t["batch"],
            t["seq"],
            t["rank"],
            t["peak_bytes"],
            t["knobs"] or {},
            t["quantization"],
            t["optimizer"],
            tuple(t["target_modules"]),
            t["lora_dropout"],
            t["bf16"],
        )
        for t in doc["trials"]
        if t.get("peak_bytes") and t.get("device") == "cuda"
    ]


def load_checks(folder: Path = RESULTS) -> list[Check]:
    checks: list[Check] = []
    for path in sorted(folder.glob("*.json")):
        doc = json.loads(path.read_text())
        if "stages" not in doc or doc.get("meta", {}).get("rehearse"):
            continue
        checks += recorded_checks(doc, path.name) if "trials" in doc else legacy_checks(doc, path.name)
    return checks


# ------------------------------------------------------------------------------------------- judging


def errors(checks: list[Check], residual: int = 0, clean: bool = True) -> list[float]:
    return [c.estimate(residual) / (c.clean_peak if clean else c.peak_bytes) - 1 for c in checks]


def fit_residual(checks: list[Check]) -> int:
    """The constant the trials show beyond the arithmetic: the median of (clean peak - estimate)."""
    return int(statistics.median(c.clean_peak - c.estimate() for c in checks)) if checks else 0


def family(model: str) -> str:
    """Models that share an architecture count as one when one is left out (Qwen3-4B and its 2507 releases
    differ only in RoPE and context length): the label names them all."""
    a = resolve_model(model).architecture
    return f"{a.hidden_size}x{a.intermediate_size}x{a.num_hidden_layers}x{a.num_attention_heads}"


def leave_one_model_out(checks: list[Check]) -> dict[str, dict]:
    """Per architecture: the residual fitted on the other architectures' trials and the errors on this one's."""
    out = {}
    for fam in sorted({family(c.model) for c in checks}):
        train = [c for c in checks if family(c.model) != fam]
        test = [c for c in checks if family(c.model) == fam]
        residual = fit_residual(train)
        label = " / ".join(sorted({c.model for c in test}))
        out[label] = {"residual_bytes": residual, "errors": errors(test, residual), "checks": test}
    return out


def summary(values: list[float]) -> str:
    if not values:
        return "—"
    return f"{min(values):+.1%} … {max(values):+.1%} (median {statistics.median(values):+.1%})"


def report(checks: list[Check]) -> tuple[list[str], dict]:
    """Markdown tables and the calibration they support."""
    in_sample = fit_residual(checks)
    lomo = leave_one_model_out(checks)
    out_of_sample = [e for m in lomo.values() for e in m["errors"]]
    lines = [
        "## Estimate against every GPU trial on record (goal: within 10 % out of sample)",
        "",
        f"{len(checks)} trials. `raw`: today's estimate, uncalibrated, against the peak as measured. `clean`: "
        "against the peak less the embedding tables of earlier models the 2026-11-27 record held (a fault since "
        "fixed). `in sample`: plus the residual fitted on all trials "
        f"({in_sample / 2**20:+.0f} MiB). `out of sample`: plus the residual fitted on the other models' trials "
        "(leave one model out).",
        "",
        "| model (left out) | trials | raw | clean | in sample | out of sample | residual fitted without it |",
        "|---|---|---|---|---|---|---|",
    ]
    for model, m in lomo.items():
        mine = m["checks"]
        lines.append(
            f"| {model} | {len(mine)} | {summary(errors(mine, clean=False))} | {summary(errors(mine))} | "
            f"{summary(errors(mine, in_sample))} | {summary(m['errors'])} | {m['residual_bytes'] / 2**20:+.0f} MiB |"
        )
    lines += ["", "| kind of shape | trials | clean | out of sample |", "|---|---|---|---|"]
    held_out = {id(c): e for m in lomo.values() for c, e in zip(m["checks"], m["errors"])}
    for kind in sorted({c.kind for c in checks}):
        mine = [c for c in checks if c.kind == kind]
        oos = [held_out[id(c)] for c in mine]
        lines.append(f"| {kind} | {len(mine)} | {summary(errors(mine))} | {summary(oos)} |")
    calibration = {
        "residual_bytes": in_sample,
        "band": {"low": min(out_of_sample), "high": max(out_of_sample)} if out_of_sample else None,
        "trials": len(checks),
        "architectures": len(lomo),
        "method": "median residual; band: errors with the residual fitted leaving each model out",
        "sources": sorted({c.source for c in checks}),
    }
    return lines + [""], calibration


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--write-calibration", action="store_true", help=f"Rewrite {CALIBRATION_PATH.name}.")
    args = ap.parse_args(argv)
    checks = load_checks()
    lines, calibration = report(checks)
    print("\n".join(lines))
    print(json.dumps(calibration, indent=2))
    if args.write_calibration:
        atomic_write_json(CALIBRATION_PATH, calibration)
        print(f"wrote {CALIBRATION_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
