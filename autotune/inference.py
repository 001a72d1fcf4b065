"""The inference test: held-out questions answered by the base model and the tuned one, side by side."""

from __future__ import annotations

from pathlib import Path

import torch

from autotune.config import Config
from autotune.data.encoding import render_prompt
from autotune.fsutil import atomic_write_json, atomic_write_text


@torch.no_grad()
def generate_answer(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(model.device)
    out = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        use_cache=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def run_inference_test(built, tokenizer, pairs, cfg: Config, output_dir: str | Path) -> dict:
    """Greedy answers from base (adapter disabled) and tuned model with the training template.

    Answers are written whole; nothing is cut for display.
    """
    model = built.model
    was_training = model.training
    model.eval()
    model.config.use_cache = True
    rows = []
    try:
        for pair in pairs[: cfg.inference_samples]:
            prompt = render_prompt(tokenizer, pair, cfg.system_prompt, built.spec.thinking)
            with model.disable_adapter():
                base = generate_answer(model, tokenizer, prompt, cfg.inference_max_new_tokens)
            tuned = generate_answer(model, tokenizer, prompt, cfg.inference_max_new_tokens)
            rows.append(
                {
                    "question": pair.question,
                    "reference": pair.answer,
                    "base": base,
                    "tuned": tuned,
                    "source": pair.source,
                    "line": pair.line,
                }
            )
    finally:
        model.config.use_cache = False
        model.train(was_training)
    out = Path(output_dir)
    report = {"model": built.spec.name, "max_new_tokens": cfg.inference_max_new_tokens, "greedy": True, "samples": rows}
    atomic_write_json(out / "inference_report.json", report)
    atomic_write_text(out / "inference_report.md", render_markdown(report))
    return {
        "json": str(out / "inference_report.json"),
        "markdown": str(out / "inference_report.md"),
        "samples": len(rows),
    }


def render_markdown(report: dict) -> str:
    lines = [
        f"# Inference test: {report['model']}",
        "",
        f"Greedy decoding, at most {report['max_new_tokens']} new tokens; held-out questions.",
        "",
    ]
    for i, row in enumerate(report["samples"], 1):
        lines += [
            f"## {i}. {row['question']}",
            "",
            f"*{row['source']}, line {row['line']}*",
            "",
            "**Reference**",
            "",
            row["reference"],
            "",
            "**Base model**",
            "",
            row["base"] or "_(empty)_",
            "",
            "**Tuned model**",
            "",
            row["tuned"] or "_(empty)_",
            "",
        ]
    return "\n".join(lines)
