"""Regenerate bench/RESULTS.md (and bench/results/chart.png) from every file in bench/results/.

    python bench/make_results.py

GPU runs are the results.json of bench/gpu_check.sh, saved as bench/results/<date>-<card>.json; CPU
figures are the --json output of bench/train_bench.py, bench/solver_bench.py, bench/techniques_bench.py and
bench/distributed_bench.py (their `kind`). Tables newest first, one per goal.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # estimate_check.py beside this file
RESULTS = HERE / "results"
GiB = 2**30


def load() -> tuple[list[dict], list[dict]]:
    gpu, cpu = [], []
    for path in sorted(RESULTS.glob("*.json")):
        doc = json.loads(path.read_text())
        doc["_file"] = path.name
        (gpu if "stages" in doc else cpu).append(doc)
    key = lambda d: d.get("meta", {}).get("date") or d.get("date") or ""  # noqa: E731
    return sorted(gpu, key=key, reverse=True), sorted(cpu, key=key, reverse=True)


def _experts_form(row: dict) -> str:
    """A tracked MoE row's experts: NF4, bf16 split, or bf16 folded by PEFT (records before the split LoRA say only
    whether they were NF4; their bf16 experts were folded)."""
    form = row.get("experts") or ("nf4" if row.get("experts_4bit") else "folded")
    return {"nf4": "NF4", "split": "bf16, split LoRA", "folded": "bf16, folded by PEFT"}[form]


def _columns(header: str) -> list[str]:
    """A markdown table's header row and its separator, which must have as many cells."""
    return [header, "|---" * (header.count("|") - 1) + "|"]


def _run_label(doc: dict) -> str:
    m = doc["meta"]
    return f"{m['date'][:10]} {m['card']}{' (CPU rehearsal)' if m.get('rehearse') else ''} @ {m.get('commit')}"


def gpu_tables(gpu: list[dict]) -> list[str]:
    out = [
        "## Peak ÷ budget and OOMs of the solved profiles (goal 0.90–0.98, no OOM)",
        "",
        *_columns(
            "| run | model | cap GB | batch | acc | seq | r | steps | peak ÷ budget | OOM | tokens/s | solve s | trials |"
        ),
    ]
    est = [
        "## Estimate against measured peak (goal ≤ 10 %)",
        "",
        "`at run` is the estimate the run computed; `current` is today's estimate (autotune/estimate/) evaluated offline against the "
        "same measured peak (where the run calibrated it, that is in-sample).",
        "",
        *_columns(
            "| run | model | cap GB | batch x seq | measured GiB | estimated at run | error | current estimate | error |"
        ),
    ]
    for doc in gpu:
        for e in doc["stages"].get("solve_train", []):
            c, tr = e.get("choice") or {}, e.get("train") or {}
            if e.get("error"):
                out.append(
                    f"| {_run_label(doc)} | {e['model']} | {e['cap_gb']:g} | — | — | — | — | — | — | — | — | "
                    f"{e.get('solve_seconds', '—')} | {e['error'][:90]} |"
                )
                continue
            frac = f"{tr['peak_fraction']:.3f}" if tr.get("peak_fraction") else "—"
            tps = f"{tr['tokens_per_second']:.0f}" if tr.get("tokens_per_second") else "—"
            out.append(
                f"| {_run_label(doc)} | {e['model']} | {e['cap_gb']:g} | {c['batch_size']} | "
                f"{c['gradient_accumulation_steps']} | {c['max_sequence_length']} | {c['lora_r']} | "
                f"{tr.get('steps', '—')} | {frac} | {'yes' if tr.get('oom') else 'no'} | {tps} | "
                f"{e.get('solve_seconds')} | {e.get('trials')} |"
            )
            x, now = e.get("estimate") or {}, e.get("estimate_current") or {}
            if x.get("peak_bytes") and tr.get("peak_bytes"):
                cur = f"{now['peak_bytes'] / GiB:.2f} | {now['error']:+.1%}" if now.get("peak_bytes") else "— | —"
                est.append(
                    f"| {_run_label(doc)} | {e['model']} | {e['cap_gb']:g} | {c['batch_size']} x "
                    f"{c['max_sequence_length']} | {tr['peak_bytes'] / GiB:.2f} | {x['peak_bytes'] / GiB:.2f} | "
                    f"{x['error']:+.1%} | {cur} |"
                )
    tp = [
        "## Throughput: the guide's 16 GB preset against autotune's profile (goal 2x)",
        "",
        "The baseline is the guide's 16 GB tier as `profiles/hardware/16gb.json` holds it (batch 4 x accumulation 16, "
        "sequence 512, r 8); the 2026-11-27 row measured another shape and is no evidence for that goal.",
        "",
        *_columns(
            "| run | model | baseline | cap GB | seq | baseline tokens/s | autotune batch | autotune tokens/s | speedup |"
        ),
    ]
    ls = [
        "## Longest sequence, Qwen3-8B QLoRA r=32, batch 1, 16 GB cap",
        "",
        "(Unsloth reports 40,724 tokens for Llama-3.1-8B at 16 GB; plain HF with FlashAttention-2, 2,551.)",
        "",
        *_columns("| run | model | longest sequence | granularity |"),
    ]
    fx = [
        "## Fixed shape, 4-bit, no cap (training issue)",
        "",
        *_columns("| run | model | batch x seq | steps | tokens/s | peak GiB |"),
    ]
    for doc in gpu:
        t = doc["stages"].get("throughput") or {}
        if t.get("guide"):
            g, a = t["guide"], t.get("autotune") or {}
            gt = "OOM" if g.get("oom") else f"{g.get('tokens_per_second', 0):.0f}"
            at = f"{a['tokens_per_second']:.0f}" if a.get("tokens_per_second") else "—"
            sp = f"{t['speedup']:.2f}x" if t.get("speedup") else "—"
            # Runs before the preset was loaded from its file measured a hand-copied shape, not the preset.
            base = f"`profiles/{t['preset']}.json`" if t.get("preset") else "batch 4, r 6 (not the 16 GB preset)"
            tp.append(
                f"| {_run_label(doc)} | {t['model']} | {base} | {t['cap_gb']:g} | {t['seq']} | {gt} | "
                f"{a.get('choice_batch', '—')} | {at} | {sp} |"
            )
        s = doc["stages"].get("longest_seq") or {}
        if "longest_seq" in s:
            ls.append(f"| {_run_label(doc)} | {s['model']} | {s['longest_seq']} | {s['granularity']} |")
        for f in doc["stages"].get("fixed_shape", []):
            tps = f"{f['tokens_per_second']:.0f}" if f.get("tokens_per_second") else ("OOM" if f.get("oom") else "—")
            pk = f"{f['peak_bytes'] / GiB:.2f}" if f.get("peak_bytes") else "—"
            fx.append(f"| {_run_label(doc)} | {f['model']} | {f['batch']} x {f['seq']} | {f['steps']} | {tps} | {pk} |")
    sw = [
        "## Solve wall time (goal ≤ 120 s for Qwen3-14B)",
        "",
        *_columns("| run | model | cap GB | model build s | solve s |"),
    ]
    for doc in gpu:
        for e in doc["stages"].get("solve_train", []):
            sw.append(
                f"| {_run_label(doc)} | {e['model']} | {e['cap_gb']:g} | {e.get('build_seconds')} | {e.get('solve_seconds')} |"
            )
    return out + [""] + est + [""] + tp + [""] + ls + [""] + fx + [""] + sw + [""]


def technique_tables(gpu: list[dict]) -> list[str]:
    """The memory techniques' GPU figures (gpu_check.py since 2026-12-01: min_cap, longest_seq, costs,
    real_data), newest first; the targets are the issue's (Unsloth's published figures)."""
    runs = [d for d in gpu if "min_cap" in d["stages"] or "costs" in d["stages"] or "real_data" in d["stages"]]
    if not runs:
        return [
            "## Memory techniques on a GPU",
            "",
            "No GPU run with the techniques yet: bench/gpu_check.sh measures the smallest caps, the longest "
            "sequence, each technique's cost and the real-data speedup the next time a GPU is available. Until "
            "then the CPU figures and the estimate's predictions below are the evidence.",
            "",
        ]
    out = [
        "## Smallest cap at sequence 512, batch 1, every technique (targets: 14B 8.5 GB, 8B 6 GB)",
        "",
        *_columns("| run | model | smallest cap GB | techniques |"),
    ]
    for d in runs:
        for m in d["stages"].get("min_cap", []):
            knobs = ", ".join(k for k, v in (m.get("knobs") or {}).items() if v)
            out.append(f"| {_run_label(d)} | {m['model']} | {m.get('smallest_cap_gb', m.get('skipped'))} | {knobs} |")
    out += [
        "",
        "## Longest Qwen3-8B r=32 batch-1 sequence under 16 GB (target 40,000; Unsloth 40,724)",
        "",
        *_columns("| run | every technique | without each (a few trials: a bound) | estimate |"),
    ]
    for d in runs:
        ls = d["stages"].get("longest_seq") or {}
        if ls:
            out.append(
                f"| {_run_label(d)} | {ls.get('with_every_technique')} | {ls.get('without')} | "
                f"{(ls.get('estimate') or {}).get('all')} |"
            )
    out += [
        "",
        "## What each technique costs (tokens/s against the plain step, one shape, no cap)",
        "",
        *_columns("| run | shape | technique | tokens/s | x plain | peak GiB |"),
    ]
    for d in runs:
        c = d["stages"].get("costs") or {}
        for name, r in (c.get("runs") or {}).items():
            rel = f"{r['relative_to_plain']:.2f}" if r.get("relative_to_plain") else "—"
            out.append(
                f"| {_run_label(d)} | {c['model']} {c['batch']} x {c['seq']} | {name} | "
                f"{r.get('tokens_per_second') or 0:.0f} | {rel} | {(r.get('peak_bytes') or 0) / GiB:.2f} |"
            )
    out += [
        "",
        "## Real data (the shipped sample), real tokens/s at one cap (target: 2x the preset and 2x yesterday's solver)",
        "",
        *_columns("| run | run of | steps | real tokens/s | OOM recoveries | speedup |"),
    ]
    for d in runs:
        rd = d["stages"].get("real_data") or {}
        for name in ("guide", "solved_without_techniques", "solved"):
            r = rd.get(name) or {}
            sp = ", ".join(f"{k.removeprefix('speedup_')} {v:.2f}x" for k, v in r.items() if k.startswith("speedup"))
            out.append(
                f"| {_run_label(d)} | {name} | {r.get('steps')} | {r.get('real_tokens_per_second') or 0:.0f} | "
                f"{len(r.get('oom_recoveries') or [])} | {sp or '—'} |"
            )
    return out + [""]


def estimate_tables() -> list[str]:
    """bench/estimate_check.py: the estimate against every GPU trial on record, in and out of sample."""
    import estimate_check

    lines, _ = estimate_check.report(estimate_check.load_checks(RESULTS))
    return lines


def cpu_tables(cpu: list[dict]) -> list[str]:
    out = ["## CPU figures", ""]
    for doc in cpu:
        if doc.get("kind") == "train_bench":
            out += [
                f"### Training benchmark, CPU ({doc['date']}, {doc.get('cpu') or 'cpu'})",
                "",
                *_columns("| weights | batch x seq | step s | tokens/s | peak tracked GiB |"),
            ]
            out += [
                f"| {r['quantization']} | {r['batch']} x {r['seq']} | {r['step_seconds']} | {r['tokens_per_second']} | "
                f"{r['peak_tracked_gib']} |"
                for r in doc["rows"]
            ]
            out.append("")
        elif doc.get("kind") == "techniques_bench":
            f, r, g = doc["fused_loss"], doc["regret"], doc["gpu_predictions"]
            out += [
                f"### Memory techniques, CPU ({doc['date']}, {doc.get('cpu') or 'cpu'}; `bench/techniques_bench.py`)",
                "",
                f"- Fused loss, tiny Qwen3 at {f['seq']} tokens: tracked peak {f['plain']['peak_bytes'] / 2**20:.0f} MiB "
                f"plain, {f['fused']['peak_bytes'] / 2**20:.0f} MiB fused: {f['drop_bytes'] / 2**20:.0f} MiB less "
                f"(one fp32 logits tensor is {f['logits_term_bytes'] / 2**20:.0f} MiB).",
                f"- Solver regret at a {r['cap_gb']} GB simulated cap, seq {r['seq']}, effective batch "
                f"{r['effective_batch']}: its choice (batch {r['solver']['batch']}, {r['solver']['knobs']}, "
                f"{r['solver']['trials']} trials) {r['solver']['tokens_per_second']:.0f} tokens/s against the best of a "
                f"{r['grid']['trials']}-trial brute-force grid (batch {r['grid']['best_batch']}, "
                f"{r['grid']['best_knobs']}) {r['grid']['tokens_per_second']:.0f}: regret {r['regret']:.1%} "
                "(target 5%).",
                f"- The estimate's answers for the GPU targets, every technique on, on the safe side of its error band "
                f"[{g['error_band'][0]:+.1%}, {g['error_band'][1]:+.1%}]: Qwen3-8B r=32 longest batch-1 sequence at 16 GB "
                f"{g['qwen3_8b_r32_longest_seq_at_16gb']} (target 40,000); smallest cap at sequence 512: Qwen3-14B "
                f"{g['qwen3_14b_smallest_cap_gb_at_512']} GB (target 8.5), Qwen3-8B {g['qwen3_8b_smallest_cap_gb_at_512']} "
                "GB (target 6). Predictions, not measurements.",
                "",
            ]
        elif doc.get("kind") == "moe_bench":
            answers = doc["answers"]
            out += [
                f"### Mixture of experts, CPU ({doc['date']}; `bench/moe_bench.py`: Qwen3-30B-A3B's widths with 2 of its "
                "48 layers, Qwen3's vocabulary, QLoRA with adapters on every expert, checkpointing and the fused loss)",
                "",
                *_columns("| experts | seq | tracked GiB | estimate GiB | error | at |"),
            ]
            if not doc["tracked"]:  # --experts none: the estimate's answers alone, nothing tracked
                out[-4:] = [
                    f"### Mixture of experts, the estimate's answers ({doc['date']}; `bench/moe_bench.py --experts none`)"
                ]
            out += [
                f"| {_experts_form(r)} | {r['seq']} | {r['measured_bytes'] / 2**30:.3f} | {r['estimate_bytes'] / 2**30:.3f} | "
                f"{r['error']:+.1%} | {r['estimate_phase']} |"
                for r in doc["tracked"]
            ]
            out.append("")
            for key, label in (
                (
                    "30b_a3b_seq2048_r16",
                    "Qwen3-30B-A3B, 4-bit attention and bf16 experts folded by PEFT, seq 2048, r 16, one GPU",
                ),
                (
                    "30b_a3b_split_seq2048_r16",
                    "Qwen3-30B-A3B, 4-bit attention and bf16 experts, split LoRA, seq 2048, r 16, one GPU",
                ),
                ("30b_a3b_nf4_experts_seq2048_r16", "Qwen3-30B-A3B, 4-bit attention and NF4 experts, seq 2048, r 16"),
                (
                    "30b_a3b_nf4_experts_lean_seq2048_r16",
                    "Qwen3-30B-A3B, NF4 experts, host embedding and 8-bit head, seq 2048, r 16",
                ),
                (
                    "30b_a3b_nf4_experts_every_technique_seq2048_r16",
                    "Qwen3-30B-A3B, NF4 experts, activation offload, host embedding and 8-bit head (what `autotune "
                    "estimate --max-memory-gb 24 --set experts_4bit=on` plans at r 16), seq 2048, r 16",
                ),
                (
                    "235b_a22b_fsdp8_seq4096_r16",
                    "Qwen3-235B-A22B over 8 GPUs (FSDP), seq 4096, r 16, folded by PEFT, per rank",
                ),
                (
                    "235b_a22b_split_fsdp8_seq4096_r16",
                    "Qwen3-235B-A22B over 8 GPUs (FSDP), seq 4096, r 16, split LoRA, per rank",
                ),
            ):
                if key not in answers:  # a record from before the row existed
                    continue
                e = answers[key]
                parts = ", ".join(f"{k} {v / 2**30:.2f}" for k, v in e["components"].items() if v)
                out.append(f"- The estimate, {label}: {e['peak_bytes'] / 2**30:.2f} GiB ({parts}). A prediction.")
            out.append("")
        elif doc.get("kind") == "hybrid_bench":
            out += [
                f"### Qwen3.5 hybrid, CPU ({doc['date']}; `bench/hybrid_bench.py`: Qwen3.5-9B's widths with 4 of its 32 "
                "layers (three Gated DeltaNet, one gated attention), a 16,384-token vocabulary, fp32 LoRA r16 on every "
                "projection, the fused loss, transformers' reference gated-delta rule)",
                "",
                *_columns("| seq | checkpointing | tracked GiB | estimate GiB | error | at |"),
            ]
            out += [
                f"| {r['seq']} | {'on' if r['checkpointing'] else 'off'} | {r['measured_bytes'] / 2**30:.3f} | "
                f"{r['estimate_bytes'] / 2**30:.3f} | {r['error']:+.1%} | {r['estimate_phase']} |"
                for r in doc["tracked"]
            ]
            out += [
                "",
                "The estimate's answers for bf16 LoRA r16 at 2,048 tokens on a GPU (predictions; the kernel's figures "
                "are read off flash-linear-attention's saved tensors, not measured):",
                "",
                *_columns("| model | with flash-linear-attention GiB | with the reference rule GiB | Unsloth GB |"),
            ]
            out += [
                f"| {name} | {a['fla']['peak_bytes'] / 2**30:.2f} | {a['reference']['peak_bytes'] / 2**30:.2f} | "
                f"{a['unsloth_gb']} |"
                for name, a in doc["answers"].items()
            ]
            out.append("")
        elif doc.get("kind") == "distributed_bench":
            shape = doc["shape"]
            out += [
                f"### DDP over gloo, CPU ({doc['date']}; `bench/distributed_bench.py`; tiny Qwen3 {shape['quantization']}, "
                f"micro-batch {shape['batch']} x {shape['seq']} per rank, {shape['steps']} steps)",
                "",
                "Two processes share this machine's two cores, and gloo's all-reduce crosses memory: what one more rank "
                "costs per rank and what the solver plans for it, not GPU scaling (unmeasured).",
                "",
                *_columns(
                    "| processes | rank | tracked peak MiB | solver's per-rank trial MiB | estimate MiB | tokens/s rank | tokens/s total |"
                ),
            ]
            out += [
                f"| {run['processes']} | {r['rank']} | {r['peak_bytes'] / 2**20:.2f} | "
                f"{run['planned']['trial_peak_bytes'] / 2**20:.2f} | {run['planned']['estimate_bytes'] / 2**20:.2f} | "
                f"{r['tokens_per_second']:.0f} | {run['tokens_per_second_total']:.0f} |"
                for run in doc["runs"]
                for r in run["ranks"]
            ]
            out.append("")
        elif doc.get("kind") in ("solver_bench", "autotune.solver_bench"):
            out += [
                f"### Solver benchmark, CPU ({doc.get('date') or doc['_file'][:10]}; {doc.get('model')}, seq "
                f"{doc.get('seq')}, rank {doc.get('rank')}, simulated cap {doc.get('budget_bytes', 0) / 2**20:.0f} MiB)",
                "",
                "Target: at most a third of Lightning's trials, within one of the true maximum.",
                "",
                *_columns("| strategy | trials | seconds | batch found | true max | within 1 |"),
            ]
            out += [
                f"| {r['strategy']} | {r['trials']} | {r['seconds']} | {r['batch']} | {r['true_max']} | "
                f"{'yes' if r['within_1'] else 'no'} |"
                for r in doc["strategies"]
            ]
            out.append("")
    return out


def chart(gpu: list[dict]) -> Path | None:
    rows = [
        (doc, e)
        for doc in gpu
        if not doc["meta"].get("rehearse")
        for e in doc["stages"].get("solve_train", [])
        if (e.get("train") or {}).get("peak_fraction")
    ]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    models = sorted({e["model"] for _, e in rows})
    for m in models:
        pts = sorted(
            (e["cap_gb"], e["train"]["peak_fraction"], e["train"].get("tokens_per_second") or 0)
            for _, e in rows
            if e["model"] == m
        )
        a1.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=m)
        a2.plot([p[0] for p in pts], [p[2] for p in pts], "o-", label=m)
    a1.axhspan(0.90, 0.98, color="green", alpha=0.12, label="goal 0.90–0.98")
    a1.set(xlabel="cap (GB)", ylabel="measured peak ÷ budget", title="Peak ÷ budget of solved profiles")
    a2.set(xlabel="cap (GB)", ylabel="tokens/s", title="Training throughput at the solved profile")
    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.tight_layout()
    path = RESULTS / "chart.png"
    fig.savefig(path)
    return path


def main() -> int:
    gpu, cpu = load()
    lines = [
        "# Benchmark results",
        "",
        "Generated by `python bench/make_results.py` from `bench/results/*.json`; do not edit by hand.",
        "",
        "GPU figures come from `bench/gpu_check.sh --out DIR` (caps simulated with "
        "`torch.cuda.set_per_process_memory_fraction` on a bigger card); rows marked CPU rehearsal run the same "
        "stages on the tiny model with simulated caps.",
        "",
    ]
    real = [d for d in gpu if not d["meta"].get("rehearse")]
    if not real:
        lines += ["**No GPU run collected yet.**", ""]
    for d in gpu:
        m = d["meta"]
        pk = m.get("packages") or {}
        lines += [
            f"- **{_run_label(d)}** (`{d['_file']}`): torch {pk.get('torch')}, transformers {pk.get('transformers')}, "
            f"peft {pk.get('peft')}, bitsandbytes {pk.get('bitsandbytes')}, driver "
            f"{(m.get('driver') or {}).get('version')}. {m.get('note', '')}"
        ]
        lines += [f"  - {f}" for f in m.get("findings", [])]
        lines += [f"  - **Correction** {c}" for c in m.get("corrections", [])]
    lines.append("")
    png = chart(gpu)
    if png:
        lines += [f"![peak ÷ budget and tokens/s]({png.relative_to(HERE)})", ""]
    lines += gpu_tables(gpu) + technique_tables(gpu) + estimate_tables() + cpu_tables(cpu)
    (HERE / "RESULTS.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {HERE / 'RESULTS.md'} from {len(gpu)} GPU and {len(cpu)} CPU result files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
