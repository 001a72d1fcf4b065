"""What `autotune export` wrote, run: the merged model's logits beside those of the base with the adapter (PEFT's
own loading) and of the base alone, on one row of token ids."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch


def random_base(cfg) -> Callable[[], torch.nn.Module]:
    """A builder of the run's base model as training built it from random weights (same architecture and seed)."""
    from autotune.export import read_run
    from autotune.modeling import load_base_model

    run = read_run(cfg.output_dir)

    def build() -> torch.nn.Module:
        return load_base_model(
            run.spec, init="random", quantization="none", dtype=torch.float32, device=torch.device("cpu"), seed=cfg.seed
        ).eval()

    return build


def exported_logits(cfg, out: Path, base: Callable[[], torch.nn.Module]) -> dict:
    """Export the run merged and as an adapter into `out`; the logits of the base alone (`plain`), of the base with
    the adapter (`tuned`) and of the merged model (`folded`), and the merged model's folder (`merged`)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from autotune.export import export_run

    merged = export_run(cfg.output_dir, out / "merged", merge=True)
    adapter = export_run(cfg.output_dir, out / "adapter")
    ids = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = base()(ids).logits
        tuned = PeftModel.from_pretrained(base(), str(adapter.out)).eval()(ids).logits
        folded = AutoModelForCausalLM.from_pretrained(str(merged.out), dtype=torch.float32).eval()(ids).logits
    return {"plain": plain, "tuned": tuned, "folded": folded, "merged": merged.out, "notes": merged.notes}
