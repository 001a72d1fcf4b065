"""The inference test: questions answered by the base model and the tuned one, side by side.

Two kinds of question: pairs the model was trained on (does it reproduce what it was taught? each with a
token-match rate against the reference) and held-out pairs (does it generalise?). With a real base model the
held-out answers are the interesting ones; with the demo's tiny random model only the trained ones can show
anything, and what they show is memorisation, which the report says.
"""

from __future__ import annotations

from pathlib import Path

import torch

from autotune.config import Config
from autotune.data.encoding import render_prompt
from autotune.fsutil import atomic_write_json, atomic_write_text
from autotune.run_files import INFERENCE_REPORT_JSON, INFERENCE_REPORT_MD


@torch.no_grad()
def generate_ids(model, tokenizer, prompt: str, max_new_tokens: int) -> list[int]:
    """Greedy answer token ids (up to, not including, the end-of-turn token)."""
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(model.device)
    out = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        use_cache=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    ids = out[0, inputs["input_ids"].shape[1] :].tolist()
    return ids[: ids.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in ids else ids


def token_match(answer_ids: list[int], reference_ids: list[int], max_new_tokens: int) -> float | None:
    """The share of the reference's first tokens (as many as the answer could have had) that the answer has at
    the same position: 1.0 reproduces the reference, a random model scores about 0."""
    reference = reference_ids[:max_new_tokens]
    if not reference:
        return None
    return sum(a == r for a, r in zip(answer_ids, reference)) / len(reference)


def _row(model, tokenizer, pair, cfg: Config, thinking: bool) -> dict:
    prompt = render_prompt(tokenizer, pair, cfg.system_prompt, thinking)
    reference = tokenizer(pair.answer, add_special_tokens=False)["input_ids"]
    with model.disable_adapter():
        base = generate_ids(model, tokenizer, prompt, cfg.inference_max_new_tokens)
    tuned = generate_ids(model, tokenizer, prompt, cfg.inference_max_new_tokens)
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True).strip()  # noqa: E731
    return {
        "question": pair.question,
        "reference": pair.answer,
        "base": decode(base),
        "tuned": decode(tuned),
        "base_token_match": token_match(base, reference, cfg.inference_max_new_tokens),
        "tuned_token_match": token_match(tuned, reference, cfg.inference_max_new_tokens),
        "source": pair.source,
        "line": pair.line,
    }


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return round(sum(values) / len(values), 4) if values else None


def run_inference_test(built, tokenizer, trained_pairs, held_out_pairs, cfg: Config, output_dir: str | Path) -> dict:
    """Greedy answers from base (adapter disabled) and tuned model with the training template, for up to
    `inference_samples` trained-on pairs and as many held-out ones. Answers are written whole."""
    model = built.model
    was_training = model.training
    model.eval()
    model.config.use_cache = True
    n = cfg.inference_samples
    try:
        trained = [_row(model, tokenizer, p, cfg, built.spec.thinking) for p in trained_pairs[:n]]
        held_out = [_row(model, tokenizer, p, cfg, built.spec.thinking) for p in held_out_pairs[:n]]
    finally:
        model.config.use_cache = False
        model.train(was_training)
    out = Path(output_dir)
    report = {
        "model": built.spec.name,
        "init": cfg.init,
        # How the base the answers come from was stored: both models run on it (the tuned one adds the adapter).
        "base_quantization": built.quantization,
        "experts_4bit": bool(getattr(built.knobs, "experts_4bit", False)),
        "max_new_tokens": cfg.inference_max_new_tokens,
        "greedy": True,
        "trained_token_match": {
            "base": _mean(r["base_token_match"] for r in trained),
            "tuned": _mean(r["tuned_token_match"] for r in trained),
        },
        "held_out_token_match": {
            "base": _mean(r["base_token_match"] for r in held_out),
            "tuned": _mean(r["tuned_token_match"] for r in held_out),
        },
        "trained_samples": trained,
        "samples": held_out,  # the held-out questions (the name earlier reports used)
    }
    atomic_write_json(out / INFERENCE_REPORT_JSON, report)
    atomic_write_text(out / INFERENCE_REPORT_MD, render_markdown(report))
    return {
        "json": str(out / INFERENCE_REPORT_JSON),
        "markdown": str(out / INFERENCE_REPORT_MD),
        "samples": len(held_out),
        "trained_samples": len(trained),
        "trained_token_match": report["trained_token_match"]["tuned"],
        "held_out_token_match": report["held_out_token_match"]["tuned"],
    }


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def _section(title: str, rows: list[dict], start: int) -> list[str]:
    lines = [f"## {title}", ""]
    if not rows:
        return lines + ["_(none)_", ""]
    for i, row in enumerate(rows, start):
        lines += [
            f"### {i}. {row['question']}",
            "",
            f"*{row['source']}, line {row['line']}*",
            "",
            "**Reference**",
            "",
            row["reference"],
            "",
            f"**Base model** (token match {_pct(row['base_token_match'])})",
            "",
            row["base"] or "_(empty)_",
            "",
            f"**Tuned model** (token match {_pct(row['tuned_token_match'])})",
            "",
            row["tuned"] or "_(empty)_",
            "",
        ]
    return lines


def render_markdown(report: dict) -> str:
    trained, held = report["trained_token_match"], report["held_out_token_match"]
    lines = [
        f"# Inference test: {report['model']}",
        "",
        f"Greedy decoding, at most {report['max_new_tokens']} new tokens. Token match: the share of the "
        "reference answer's first tokens that the answer reproduces at the same position.",
        "",
        "| questions | base model | tuned model |",
        "|---|---|---|",
        f"| trained on | {_pct(trained['base'])} | {_pct(trained['tuned'])} |",
        f"| held out | {_pct(held['base'])} | {_pct(held['tuned'])} |",
        "",
    ]
    stored = (
        [f"its projections in {report['base_quantization']}"]
        if report.get("base_quantization", "none") != "none"
        else []
    )
    if report.get("experts_4bit"):
        stored.append("its experts in NF4 (experts_4bit)")
    if stored:
        lines += [f"Both models ran on the quantized base the run trained with: {' and '.join(stored)}.", ""]
    if report.get("init") == "random":
        lines += [
            "The base model here has random weights: whatever the tuned model gets right on the questions it was "
            "trained on is memorisation by a tiny random model, not understanding, and its held-out answers are "
            "not expected to be right.",
            "",
        ]
    lines += _section("Questions it was trained on", report["trained_samples"], 1)
    lines += _section("Held-out questions", report["samples"], len(report["trained_samples"]) + 1)
    return "\n".join(lines)
