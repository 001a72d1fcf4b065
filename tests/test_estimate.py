"""Tests for autotune.estimate: the arithmetic against THE training step, measured as a solver trial
measures it (trial.TrialRunner.measure: modeling.build_model and the training Trainer under
memory.CpuTrackedMeter) on tiny and medium Qwen3 models (fp32, bf16 autocast, 4-bit, 8-bit);
against FakeTensor traces of real-size models; and its own consistency."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from helpers.fake_trace import calibrate_by_trace

from autotune.catalog import CATALOG, PROJECTIONS, TINY, Architecture, resolve_model
from autotune.config import DEFAULT_TARGET_MODULES, build_config
from autotune.context import RunContext
from autotune.errors import UserError
from autotune.estimate import (
    COMPONENTS,
    Estimate,
    StepShape,
    calibration,
    error_band,
    estimate,
    estimate_peak,
    largest_fitting,
    lora_param_tensors,
    optimizer_state_bytes,
    pick_strategy,
    weight_bytes,
)
from autotune.estimate.state import expert_table_bytes
from autotune.modeling import apply_knobs, build_model
from autotune.techniques import Knobs
from autotune.trial import TrialRunner
from autotune.units import Budget

GIB = 1024**3
ALL_TARGETS, DEFAULT_TARGETS = PROJECTIONS, DEFAULT_TARGET_MODULES


def arch(h, i, layers, heads, kv, head_dim, vocab, tie=False) -> Architecture:
    return Architecture(
        hidden_size=h,
        intermediate_size=i,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=head_dim,
        vocab_size=vocab,
        tie_word_embeddings=tie,
        max_position_embeddings=4096,
    )


def relative_error(estimate: int, measured: int) -> float:
    return estimate / measured - 1


# --------------------------------------------------------------------------- against the real step


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("estimate-models")


def model_name(a: Architecture | str, root: Path) -> str:
    """A catalog name as is; an Architecture as a local model folder holding only its config.json (init
    "random" needs no weights), which resolve_model reads back into the same Architecture."""
    if isinstance(a, str):
        return a
    folder = root / (
        f"h{a.hidden_size}-i{a.intermediate_size}-l{a.num_hidden_layers}-n{a.num_attention_heads}"
        f"-kv{a.num_key_value_heads}-d{a.head_dim}-v{a.vocab_size}-t{int(a.tie_word_embeddings)}"
    )
    if not (folder / "config.json").is_file():
        a.to_hf_config().save_pretrained(folder)
    assert resolve_model(str(folder)).architecture == a
    return str(folder)


def measure_real_step(
    name: str, workdir: Path, *, batch: int, seq: int, device: str = "cpu", knobs: Knobs | None = None, **values
) -> dict:
    """Peak bytes of the training step exactly as the solver measures it: trial.TrialRunner.measure (the
    model build, the meter counting the model, two optimizer steps of the training Trainer on full-length
    rows, the CUDA overhead re-measured after the first step), with no cap worth the name."""
    cfg = build_config({"model_name": name, "init": "random", "output_dir": str(workdir), **values})
    runner = TrialRunner(RunContext(cfg), Budget(2**50), device=torch.device(device))
    if runner.meter.device == "cuda":
        runner.meter.overhead_bytes  # noqa: B018 - measured before the model exists: context + cuBLAS only
    knobs = knobs or plain(values["gradient_checkpointing"])
    built = runner.model_for(cfg.lora_r)
    apply_knobs(built, knobs)  # as measure will: the weights counted are those the step runs with
    if hasattr(runner.meter, "track_existing"):
        runner.meter.track_existing(built.model)  # as measure does: tables a technique made (the 8-bit head's)
    weights = runner.meter.current_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Paged optimizers are not supported on CPU", deprecations
        trial = runner.measure(batch, seq, cfg.lora_r, knobs=knobs)
    assert not trial.oom, trial.note
    result = {
        "peak_bytes": trial.peak_bytes,
        "weights": weights,
        "dtype_bytes": built.dtype.itemsize,
        "overhead": getattr(runner.meter, "overhead_bytes", 0),
    }
    del built
    runner.release()
    return result


def plain(checkpointing: bool) -> Knobs:
    """The step without any of the techniques (the loss over the full logits, padded rows)."""
    return Knobs(checkpointing=checkpointing, fused_loss=False)


def estimate_for(
    a: Architecture,
    measured: dict,
    *,
    batch: int,
    seq: int,
    device: str = "cpu",
    knobs: Knobs | None = None,
    **values,
) -> Estimate:
    """estimate_peak with the options the real step has: bf16 autocast exactly when the model is bf16
    (the Trainer's mixed precision follows built.dtype), autotune's own k-bit preparation (no fp32
    upcast: kbit_prepare=False), and the same techniques."""
    bf16 = measured["dtype_bytes"] == 2
    shape = StepShape(
        a,
        batch=batch,
        seq=seq,
        rank=values["lora_r"],
        target_modules=tuple(values["target_modules"]),
        quantization=values["quantization"],
        knobs=knobs or plain(values["gradient_checkpointing"]),  # every knob the step ran with, as one object
        dtype_bytes=measured["dtype_bytes"],
        optimizer=values["optimizer"],
        lora_dropout=values["lora_dropout"],
        autocast=bf16,
        kbit_prepare=False,
        device=device,
        cuda_overhead_bytes=measured["overhead"] if device != "cpu" else None,
    )
    return estimate(shape)


ATTN, MLP = DEFAULT_TARGETS, ("gate_proj", "up_proj", "down_proj")
H64 = arch(64, 128, 2, 4, 2, 16, 2048)
# tiny-qwen3's shape with a 16k vocabulary: bf16 autocast with the fused loss, where a bf16 matmul over Qwen3's
# 151,936 entries on a CPU without AVX512-BF16 (torch's reference GEMM) would take most of a minute a step.
H64_16K = arch(64, 128, 2, 4, 2, 16, 16384, tie=True)
H128 = arch(128, 384, 3, 4, 2, 32, 4096)
H192 = arch(192, 768, 3, 6, 2, 32, 2048)
H256 = arch(256, 768, 4, 8, 4, 32, 4096)
# Untied, with Qwen3's real vocabulary: the input-embedding table can live on the host. Its cases run in fp32:
# on a CPU without AVX512-BF16 a bf16 matmul takes torch's reference GEMM, ~50x slower than fp32 (one step of
# 1,024 tokens through this head: minutes); the H64_16K cases cover bf16 autocast with the techniques.
H256_UNTIED = arch(256, 768, 4, 8, 4, 32, 151936)
# A 1000-entry vocabulary moves the peak from the loss head into the last layer's backward.
H256_SMALL_VOCAB = arch(256, 1024, 2, 8, 4, 32, 1000)


def step_values(rank, targets, quantization, bf16, gc, dropout, optimizer) -> dict:
    """The config values of one measured step (alpha twice the rank)."""
    return dict(
        lora_r=rank,
        lora_alpha=2 * rank,
        target_modules=list(targets),
        quantization=quantization,
        bf16=bf16,
        gradient_checkpointing=gc,
        lora_dropout=dropout,
        optimizer=optimizer,
    )


def case(a, batch, seq, rank, targets, quantization, bf16, gc, dropout, optimizer, id, knobs=None):
    values = step_values(rank, targets, quantization, bf16, gc, dropout, optimizer)
    return pytest.param(a, batch, seq, knobs or plain(gc), values, id=id)


REAL_STEP_CASES = [
    # tiny-qwen3: Qwen3's real 151,936-entry vocabulary, so the loss head sets the peak
    case(TINY, 2, 64, 8, ALL_TARGETS, "none", False, False, 0.0, "adamw_torch", "tiny-fp32"),
    case(TINY, 1, 128, 16, ALL_TARGETS, "none", True, True, 0.1, "paged_adamw_8bit", "tiny-bf16-gc-dropout-8bitadam"),
    case(TINY, 2, 64, 8, ATTN, "4bit", True, True, 0.1, "paged_adamw_8bit", "tiny-4bit-qlora"),
    # small custom architectures
    case(
        arch(64, 128, 2, 4, 2, 16, 2048, tie=True),
        2,
        64,
        8,
        ALL_TARGETS,
        "none",
        False,
        False,
        0.0,
        "adamw_torch",
        "h64-tied-fp32",
    ),
    case(H64, 4, 128, 4, ATTN, "none", True, True, 0.0, "adamw_torch", "h64-bf16-gc"),
    case(H128, 1, 256, 16, ALL_TARGETS, "none", True, True, 0.1, "adamw_torch", "h128-bf16-gc-dropout"),
    case(
        arch(128, 384, 3, 8, 2, 16, 4096),
        2,
        128,
        8,
        ("q_proj", "v_proj"),
        "none",
        False,
        False,
        0.1,
        "adamw_torch",
        "h128-fp32-qv-dropout",
    ),
    case(H192, 2, 384, 32, MLP, "none", True, True, 0.05, "adamw_torch", "h192-bf16-gc-mlp-r32"),
    case(H256, 4, 128, 4, ATTN, "none", True, False, 0.0, "adamw_torch", "h256-bf16"),
    case(
        H256_SMALL_VOCAB,
        4,
        256,
        8,
        ALL_TARGETS,
        "none",
        True,
        True,
        0.1,
        "adamw_torch",
        "h256-smallvocab-bf16-gc-dropout",
    ),
    case(H256_SMALL_VOCAB, 4, 256, 8, ALL_TARGETS, "none", False, True, 0.0, "adamw_torch", "h256-smallvocab-fp32-gc"),
    case(
        H256_SMALL_VOCAB,
        2,
        256,
        8,
        ALL_TARGETS,
        "none",
        True,
        True,
        0.0,
        "paged_adamw_8bit",
        "h256-smallvocab-bf16-gc-8bitadam",
    ),
    # k-bit: bitsandbytes on the CPU (nf4 + double quantization; LLM.int8)
    case(H128, 2, 128, 8, ALL_TARGETS, "4bit", True, True, 0.1, "paged_adamw_8bit", "h128-4bit-qlora"),
    case(H128, 2, 128, 8, ALL_TARGETS, "4bit", True, False, 0.0, "adamw_torch", "h128-4bit-no-gc"),
    case(
        H256_SMALL_VOCAB,
        4,
        256,
        8,
        ALL_TARGETS,
        "4bit",
        True,
        True,
        0.1,
        "paged_adamw_8bit",
        "h256-smallvocab-4bit-qlora",
    ),
    case(H128, 2, 128, 8, ATTN, "8bit", True, True, 0.0, "adamw_torch", "h128-8bit-gc"),
    case(
        H256_SMALL_VOCAB,
        4,
        256,
        8,
        ALL_TARGETS,
        "8bit",
        True,
        True,
        0.1,
        "adamw_torch",
        "h256-smallvocab-8bit-gc-dropout",
    ),
    case(
        H256_SMALL_VOCAB,
        2,
        256,
        8,
        ALL_TARGETS,
        "8bit",
        True,
        False,
        0.1,
        "adamw_torch",
        "h256-smallvocab-8bit-dropout",
    ),
    # the techniques (autotune/techniques/), alone and together
    case(
        H64_16K,
        2,
        256,
        8,
        ALL_TARGETS,
        "none",
        True,
        True,
        0.1,
        "adamw_torch",
        "h64-16k-bf16-fused",
        knobs=Knobs(fused_loss=True),
    ),
    case(
        TINY,
        1,
        1024,
        8,
        ALL_TARGETS,
        "none",
        False,
        True,
        0.0,
        "adamw_torch",
        "tiny-fp32-fused-long",
        knobs=Knobs(fused_loss=True),
    ),
    case(
        H64_16K,
        4,
        128,
        8,
        ATTN,
        "4bit",
        True,
        True,
        0.1,
        "paged_adamw_8bit",
        "h64-16k-4bit-fused-packed",
        knobs=Knobs(fused_loss=True, packing=True),
    ),
    case(
        H256_UNTIED,
        2,
        512,
        8,
        ATTN,
        "none",
        False,
        True,
        0.0,
        "adamw_torch",
        "h256-untied-fp32-every-technique",
        knobs=Knobs(fused_loss=True, offload_activations=True, embedding_on_cpu=True, packing=True),
    ),
    case(
        H256_UNTIED,
        4,
        256,
        8,
        ALL_TARGETS,
        "4bit",
        False,
        True,
        0.1,
        "paged_adamw_8bit",
        "h256-untied-fp32-4bit-host-table",
        knobs=Knobs(fused_loss=True, embedding_on_cpu=True),
    ),
    case(
        H256_UNTIED,
        2,
        512,
        8,
        ATTN,
        "none",
        False,
        True,
        0.0,
        "adamw_torch",
        "h256-untied-fp32-offload",
        knobs=Knobs(fused_loss=True, offload_activations=True),
    ),
    case(
        H128,
        2,
        256,
        8,
        ATTN,
        "8bit",
        True,
        True,
        0.0,
        "adamw_torch",
        "h128-8bit-fused-packed",
        knobs=Knobs(fused_loss=True, packing=True),
    ),
    case(
        H256_UNTIED,
        4,
        256,
        8,
        ATTN,
        "none",
        False,
        False,
        0.0,
        "adamw_torch",
        "h256-untied-fp32-no-ckpt-fused",
        knobs=Knobs(checkpointing=False, fused_loss=True),
    ),
    case(
        H256_UNTIED,
        1,
        1024,
        8,
        ALL_TARGETS,
        "none",
        False,
        True,
        0.0,
        "adamw_torch",
        "h256-untied-fp32-tiled-mlp",
        knobs=Knobs(fused_loss=True, tiled_mlp=True),
    ),
    case(
        H256_UNTIED,
        2,
        256,
        8,
        ATTN,
        "none",
        False,
        True,
        0.0,
        "adamw_torch",
        "h256-untied-fp32-int8-head",
        knobs=Knobs(fused_loss=True, lm_head_8bit=True),
    ),
]


@pytest.mark.parametrize("a, batch, seq, knobs, values", REAL_STEP_CASES)
def test_estimate_matches_the_real_training_step(a, batch, seq, knobs, values, models_dir, tmp_path):
    if values["quantization"] != "none":
        pytest.importorskip("bitsandbytes")
    name = model_name(a, models_dir)
    measured = measure_real_step(name, tmp_path, batch=batch, seq=seq, knobs=knobs, **values)
    predicted = estimate_for(resolve_model(name).architecture, measured, batch=batch, seq=seq, knobs=knobs, **values)
    error = relative_error(predicted.peak_bytes, measured["peak_bytes"])
    assert abs(error) < 0.10, f"estimate {predicted.peak_bytes} vs measured {measured['peak_bytes']}: {error:+.1%}"
    # the persistent part is exact: weights (packed + quantization state for k-bit) + adapters, as counted
    assert predicted.components["weights"] + predicted.components["lora_params"] == measured["weights"]


def test_a_packed_row_of_one_sample_builds_no_mask(models_dir, tmp_path):
    """Packing at batch 1 costs nothing: transformers finds no sample boundary in the row
    (masking_utils.find_packed_sequence_indices) and sdpa runs causal without a mask, so the estimate's
    longest-sequence answers must not pay for a tokens x tokens mask that never exists (at 4096 tokens it
    would be 16 MiB, most of this small model's step)."""
    a, seq = H64, 4096
    values = step_values(8, ATTN, "none", False, True, 0.0, "adamw_torch")
    name = model_name(a, models_dir)
    packed, padded = Knobs(fused_loss=True, packing=True), Knobs(fused_loss=True, packing=False)
    measured = measure_real_step(name, tmp_path / "packed", batch=1, seq=seq, knobs=packed, **values)
    unpacked = measure_real_step(name, tmp_path / "padded", batch=1, seq=seq, knobs=padded, **values)
    assert abs(measured["peak_bytes"] - unpacked["peak_bytes"]) < seq * seq / 4  # no mask was built
    predicted = estimate_for(resolve_model(name).architecture, measured, batch=1, seq=seq, knobs=packed, **values)
    error = relative_error(predicted.peak_bytes, measured["peak_bytes"])
    assert abs(error) < 0.10, f"estimate {predicted.peak_bytes} vs measured {measured['peak_bytes']}: {error:+.1%}"


def test_lora_parameter_count_matches_peft():
    cfg = build_config(
        {"model_name": TINY, "init": "random", "quantization": "none", "lora_r": 8, "target_modules": list(ALL_TARGETS)}
    )
    built = build_model(RunContext(cfg), device=torch.device("cpu"))
    trainable = built.parameter_counts()["trainable_parameters"]
    a = CATALOG[TINY].architecture
    assert sum(lora_param_tensors(a, 8, ALL_TARGETS)) == trainable == 16_384  # feasibility.md's tiny model


# --------------------------------------------------------------------------- the experts (Qwen3-MoE)

MOE = Architecture(
    256, 512, 2, 4, num_key_value_heads=2, head_dim=64, vocab_size=4096,
    num_experts=16, num_experts_per_tok=4, moe_intermediate_size=128,
)  # fmt: skip
# Qwen3-30B-A3B's widths (hidden 2,048, experts of width 768, 8 per token) with 16 of its 128 experts, 2 of its 48
# layers and a 16k vocabulary, at 256 tokens: a real step of the full widths in seconds on two cores.
# bench/moe_bench.py measures the full 128 experts and vocabulary at 2,048 and 4,096 tokens.
A3B_WIDTHS = Architecture(
    **{**CATALOG["Qwen3-30B-A3B"].architecture.__dict__, "num_hidden_layers": 2, "num_experts": 16, "vocab_size": 16384}
)


def _moe_case(a, seq, gc, experts, quantization="none", id="", nf4=False, split=False):
    values = step_values(8, ("q_proj", "v_proj"), quantization, False, gc, 0.0, "adamw_torch")
    switches = {"experts_4bit": "on" if nf4 else "off", "experts_split_lora": "on" if split else "off"}
    return pytest.param(a, seq, gc, experts, {**values, **switches}, id=id)


@pytest.mark.parametrize(
    "a,seq,gc,experts,values",
    [
        _moe_case(MOE, 256, False, True, id="experts-lora"),
        _moe_case(MOE, 256, False, False, id="experts-frozen"),
        _moe_case(MOE, 128, True, True, id="experts-lora-gc"),
        _moe_case(MOE, 256, True, False, id="experts-frozen-gc"),
        _moe_case(A3B_WIDTHS, 256, True, True, "4bit", id="30b-a3b-widths-4bit-gc"),
        _moe_case(A3B_WIDTHS, 256, True, True, "4bit", id="30b-a3b-widths-nf4-experts-gc", nf4=True),
        _moe_case(MOE, 256, False, True, id="nf4-experts-lora", nf4=True),
        _moe_case(MOE, 256, False, True, id="split-lora", split=True),
        _moe_case(A3B_WIDTHS, 256, True, True, "4bit", id="30b-a3b-widths-split-lora-gc", split=True),
    ],
)
def test_the_estimate_matches_the_real_step_of_an_moe_model(models_dir, tmp_path, a, seq, gc, experts, values):
    """The sparse layers' kind (estimate/layers.py MoeMlp) against the tracked real step: the router, the routed rows
    through the grouped matmuls, and with adapters on the experts PEFT's whole folded copy of each expert tensor per
    layer and its gradient; within 10% (measured here: -1.6% to +6.2%; the 30B-A3B widths +0.6%)."""
    values = {**values, "lora_experts": "on" if experts else "off"}
    nf4 = values["experts_4bit"] == "on"
    knobs = plain(gc).with_(experts_4bit=nf4, experts_split_lora=values["experts_split_lora"] == "on")
    real = measure_real_step(
        model_name(a, models_dir), tmp_path, batch=2 if a is MOE else 1, seq=seq, knobs=knobs, **values
    )
    shape = StepShape(
        a,
        batch=2 if a is MOE else 1,
        seq=seq,
        rank=8,
        target_modules=("q_proj", "v_proj"),
        quantization=values["quantization"],
        knobs=knobs,
        dtype_bytes=4,
        optimizer="adamw_torch",
        device="cpu",
        autocast=False,
        lora_experts=experts,
    )
    predicted = estimate(shape)
    assert (
        predicted.terms["weights.layers"]
        + predicted.terms["weights.other"]
        + predicted.terms["weights.embedding"]
        + predicted.terms["weights.lm_head"]
        + predicted.terms["lora.params"]
        == real["weights"]
    )
    error = relative_error(predicted.peak_bytes, real["peak_bytes"])
    assert abs(error) < 0.10, f"estimate {predicted.peak_bytes / GIB:.3f} vs real {real['peak_bytes'] / GIB:.3f} GiB"
    if knobs.experts_split_lora and a is A3B_WIDTHS:
        # Split, the step holds no folded copy of a layer's experts (PEFT's path keeps one per layer, and builds its
        # gradient): beyond the weights, less than one layer's fp32 expert tensors.
        assert real["peak_bytes"] - real["weights"] < expert_table_bytes(a, 4) / a.num_hidden_layers
    if nf4 and a is A3B_WIDTHS:
        # The 4-bit experts hold no full-precision copy of the expert table (PEFT's path folds one per layer, and
        # its gradient): beyond the stored weights the step holds less than a quarter of the fp32 table.
        assert real["peak_bytes"] - real["weights"] < expert_table_bytes(a, 4) / 4


def test_the_moe_estimate_says_what_unsloth_measured():
    """Qwen3-30B-A3B's LoRA at 2,048 tokens, rank 16, with the experts in bf16 (bitsandbytes quantizes only the
    attention): in the 60-70 GiB Unsloth reports (63 GB) for a 16-bit LoRA; the experts' weights alone are over 50."""
    a3b = CATALOG["Qwen3-30B-A3B"].architecture
    est = estimate(StepShape(a3b, 1, 2048, 16, knobs=Knobs(fused_loss=True)))
    assert 60 * GIB < est.peak_bytes < 70 * GIB
    assert est.terms["weights.layers"] > 50 * GIB
    lora = lora_param_tensors(a3b, 16, DEFAULT_TARGET_MODULES)  # the experts' adapters: r x experts x (in + out)
    assert sum(lora) == 48 * (
        sum(16 * i + o * 16 for i, o in (v for k, v in a3b.projection_shapes().items() if k in DEFAULT_TARGET_MODULES))
        + 16 * 128 * (2048 + 2 * 768)
        + 16 * 128 * (768 + 2048)
    )
    without = estimate(StepShape(a3b, 1, 2048, 16, knobs=Knobs(fused_loss=True), lora_experts=False))
    assert without.peak_bytes < est.peak_bytes - 4 * GIB  # the experts' adapters, their state and folded copies
    # The split LoRA (auto's default) drops the folded copy and its gradient: still the range Unsloth measured with
    # its own split-LoRA kernels.
    split = estimate(StepShape(a3b, 1, 2048, 16, knobs=Knobs(fused_loss=True, experts_split_lora=True)))
    assert 60 * GIB < split.peak_bytes < est.peak_bytes - GIB


# --------------------------------------------------------------------------- against FakeTensor traces


def test_estimate_matches_a_fake_tensor_trace_of_a_real_size_model():
    """Qwen3-0.6B's widths (tied embeddings, 151936 vocabulary) with 4 of its 28 layers, bf16 under
    autocast: traced without allocating, then predicted."""
    full = CATALOG["Qwen3-0.6B"].architecture
    a = Architecture(**{**full.__dict__, "num_hidden_layers": 4})
    shape = dict(batch=1, seq=256, rank=16, target_modules=DEFAULT_TARGETS, gradient_checkpointing=True)
    traced = calibrate_by_trace(a, **shape)
    predicted = estimate_peak(
        a, quantization="none", optimizer="adamw_torch", device="cpu", dtype_bytes=2, autocast=True, **shape
    )
    assert abs(relative_error(predicted.peak_bytes, traced["peak_bytes"])) < 0.05
    assert predicted.components["weights"] + predicted.components["lora_params"] == traced["weights"]


EIGHT_B_TWO_LAYERS = Architecture(**{**CATALOG["Qwen3-8B"].architecture.__dict__, "num_hidden_layers": 2})


@pytest.mark.parametrize(
    "knobs",
    [
        Knobs(fused_loss=True),
        Knobs(fused_loss=True, offload_activations=True),
        Knobs(fused_loss=True, embedding_on_cpu=True),
        Knobs(fused_loss=True, lm_head_8bit=True),
        Knobs(fused_loss=True, tiled_mlp=True),
        Knobs(fused_loss=True, offload_activations=True, embedding_on_cpu=True, lm_head_8bit=True, tiled_mlp=True),
        Knobs(checkpointing=False, fused_loss=True),
    ],
    ids=lambda k: k.describe(),
)
def test_estimate_matches_a_trace_of_full_width_8b_at_8k_tokens(knobs):
    """Qwen3-8B's widths (untied, hidden 4096, 151,936-token vocabulary) with 2 of its 36 layers at 8,192
    tokens, bf16 under autocast, with each technique: the evidence, without a GPU, for the long-context
    figures (a 16 GB card)."""
    shape = dict(batch=1, seq=8192, rank=32, target_modules=DEFAULT_TARGETS)
    traced = calibrate_by_trace(EIGHT_B_TWO_LAYERS, knobs=knobs, **shape)
    predicted = estimate_peak(
        EIGHT_B_TWO_LAYERS,
        quantization="none",
        optimizer="adamw_torch",
        device="cpu",
        dtype_bytes=2,
        autocast=True,
        gradient_checkpointing=knobs.checkpointing,
        fused_loss=knobs.fused_loss,
        offload_activations=knobs.offload_activations,
        embedding_on_cpu=knobs.embedding_on_cpu,
        lm_head_8bit=knobs.lm_head_8bit,
        tiled_mlp=knobs.tiled_mlp,
        **shape,
    )
    error = relative_error(predicted.peak_bytes, traced["peak_bytes"])
    assert abs(error) < 0.10, (
        f"estimate {predicted.peak_bytes / GIB:.3f} vs traced {traced['peak_bytes'] / GIB:.3f} GiB"
    )
    print(f"8B x 2 layers @ 8k, {knobs.describe()}: traced {traced['peak_bytes'] / GIB:.3f} GiB, {error:+.1%}")


def test_trace_agrees_with_the_real_step(models_dir, tmp_path):
    """The trace's minimal loop stands in for the Trainer's step where the Trainer cannot run."""
    a = arch(128, 384, 2, 4, 2, 32, 8192, tie=True)
    values = step_values(8, DEFAULT_TARGETS, "none", True, False, 0.0, "adamw_torch")
    real = measure_real_step(model_name(a, models_dir), tmp_path, batch=2, seq=64, **values)
    traced = calibrate_by_trace(
        a, batch=2, seq=64, rank=8, target_modules=DEFAULT_TARGETS, gradient_checkpointing=False, dtype_bytes=2
    )
    assert traced["weights"] == real["weights"]
    assert abs(traced["peak_bytes"] - real["peak_bytes"]) < 0.01 * real["peak_bytes"]


# --------------------------------------------------------------------------- the big models


def test_qwen3_14b_at_16_gib_adds_up():
    """(How fast the estimate answers is bench/overhead_bench.py's to print, not a test's to time.)"""
    arch14 = CATALOG["Qwen3-14B"].architecture
    est = estimate_peak(
        arch14,
        batch=1,
        seq=512,
        rank=16,
        target_modules=DEFAULT_TARGETS,
        quantization="4bit",
        optimizer="paged_adamw_8bit",
    )
    fit = largest_fitting(arch14, Budget(16 * GIB), seq=512, rank=16, quantization="4bit")
    assert set(est.components) == set(COMPONENTS)
    # every part but the distributed one (one process: no DDP buckets, no gathered FSDP layers)
    assert est.components["distributed"] == 0
    assert all(value > 0 for name, value in est.components.items() if name != "distributed"), est.components
    assert sum(est.components.values()) == est.peak_bytes
    # 14B in nf4: ~6.3 GiB of packed weights and quantization state, 2.9 GiB of bf16 embeddings + lm_head
    assert 8.5 * GIB < est.components["weights"] < 10 * GIB
    # peft's prepare_model_for_kbit_training would make those two fp32: +2.9 GiB
    upcast = estimate_peak(arch14, batch=1, seq=512, rank=16, quantization="4bit", kbit_prepare=True)
    assert 11.5 * GIB < upcast.components["weights"] < 13 * GIB
    assert est.peak_bytes < 16 * GIB and fit["batch"] >= 1
    assert est.to_dict()["peak_bytes"] == est.peak_bytes == sum(est.components.values())


def test_estimate_is_monotonic_in_batch_and_seq():
    for a in (CATALOG["Qwen3-14B"].architecture, CATALOG[TINY].architecture, arch(256, 768, 2, 8, 4, 32, 1000)):
        for options in (dict(quantization="4bit"), dict(quantization="none", gradient_checkpointing=False)):
            by_batch = [estimate_peak(a, batch=b, seq=256, rank=8, **options).peak_bytes for b in range(1, 17)]
            by_seq = [estimate_peak(a, batch=2, seq=s, rank=8, **options).peak_bytes for s in range(64, 4096, 64)]
            assert by_batch == sorted(by_batch) and len(set(by_batch)) == len(by_batch)
            assert by_seq == sorted(by_seq) and len(set(by_seq)) == len(by_seq)


@pytest.mark.parametrize(
    "name, budget_gib, seq",
    [
        ("Qwen3-14B", 16, 512),
        ("Qwen3-14B", 16, 2048),
        ("Qwen3-8B", 12, 1024),
        ("Qwen3-0.6B", 6, 1024),
        ("Qwen3-32B", 80, 4096),
    ],
)
def test_largest_fitting_is_consistent_with_estimate_peak(name, budget_gib, seq):
    a = CATALOG[name].architecture
    options = dict(rank=16, quantization="4bit", target_modules=DEFAULT_TARGETS)
    fit = largest_fitting(a, Budget(budget_gib * GIB, 0.05), seq=seq, batch=2, **options)
    limit = fit["limit_bytes"]
    # On a GPU the limit keeps to the safe side of the error band on record (estimate.error_band).
    band = error_band()
    usable = int(budget_gib * GIB * 0.95)
    assert limit == (int(usable * (1 + band[0])) if band and band[0] < 0 else usable)

    def fits(batch, s):
        return estimate_peak(a, batch=batch, seq=s, **options).peak_bytes <= limit

    b, s = fit["batch"], fit["seq"]
    assert (fit["at_seq"], fit["at_batch"]) == (seq, 2)
    assert b == 0 or fits(b, seq)
    assert not fits(b + 1, seq)
    assert s == 0 or fits(2, s)
    if s < a.max_position_embeddings:
        assert not fits(2, s + 1)


def test_largest_fitting_reports_nothing_fits():
    a = CATALOG["Qwen3-32B"].architecture
    fit = largest_fitting(a, Budget(8 * GIB), seq=256, rank=16, quantization="none")
    assert fit["batch"] == 0 and fit["seq"] == 0


# --------------------------------------------------------------------------- the pieces


def test_weight_bytes_by_quantization():
    a = CATALOG["Qwen3-8B"].architecture
    n = a.param_count()
    assert weight_bytes(a, "none", 2, kbit_prepare=False) == 2 * n
    q4 = weight_bytes(a, "4bit", 2, kbit_prepare=False)
    q8 = weight_bytes(a, "8bit", 2, kbit_prepare=False)
    assert q4 < q8 < 2 * n
    # k-bit preparation upcasts what bitsandbytes leaves alone (embeddings, lm_head, norms) to fp32
    embeddings = 2 * a.vocab_size * a.hidden_size
    assert weight_bytes(a, "4bit", 2, kbit_prepare=True) - q4 == pytest.approx(2 * embeddings, rel=0.01)


def test_optimizer_state_follows_bitsandbytes_min_size():
    assert optimizer_state_bytes([4096], "adamw_torch") == 8 * 4096
    assert optimizer_state_bytes([4095], "paged_adamw_8bit") == 8 * 4095  # small: fp32 state
    assert optimizer_state_bytes([4096], "paged_adamw_8bit") == 2 * (4096 + 16 * 4)  # uint8 + absmax
    assert optimizer_state_bytes([1 << 20], "sgd") == 0


def test_cuda_estimate_adds_the_overhead_and_cpu_does_not():
    a = CATALOG["Qwen3-4B"].architecture
    cuda = estimate_peak(a, batch=1, seq=256, rank=8)
    cpu = estimate_peak(a, batch=1, seq=256, rank=8, device="cpu")
    assert cpu.components["cuda_overhead"] == 0 < cuda.components["cuda_overhead"]
    given = estimate_peak(a, batch=1, seq=256, rank=8, cuda_overhead_bytes=123, calibrated=False)
    assert given.components["cuda_overhead"] == 123
    # calibrated (the default): plus the residual the GPU trials on record show beyond the arithmetic
    residual = calibration().get("residual_bytes", 0)
    assert (
        estimate_peak(a, batch=1, seq=256, rank=8, cuda_overhead_bytes=123).components["cuda_overhead"]
        == 123 + residual
    )


def test_bad_arguments_are_refused():
    a = CATALOG[TINY].architecture
    with pytest.raises(ValueError):
        estimate_peak(a, batch=0, seq=8, rank=8)
    with pytest.raises(ValueError):
        estimate_peak(a, batch=1, seq=8, rank=8, quantization="3bit")
    with pytest.raises(UserError, match="lm_head"):
        estimate_peak(a, batch=1, seq=8, rank=8, target_modules=["lm_head"])


# --------------------------------------------------------------------------- on a GPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("gc", [True, False])
def test_estimate_matches_a_real_cuda_step(gc, models_dir, tmp_path):
    """bf16 LoRA on Qwen3-1.7B's architecture (random weights): the real training step as a solver trial
    measures it (peak reserved + the measured CUDA overhead) against the estimate."""
    a = CATALOG["Qwen3-1.7B"].architecture
    values = step_values(16, DEFAULT_TARGETS, "none", True, gc, 0.0, "adamw_torch")
    measured = measure_real_step("Qwen3-1.7B", tmp_path, batch=2, seq=1024, device="cuda", **values)
    predicted = estimate_for(a, measured, batch=2, seq=1024, device="cuda", **values)
    assert abs(relative_error(predicted.peak_bytes, measured["peak_bytes"])) < 0.10


# ------------------------------------------------------------------------------ one rank of several


def _per_rank(name: str, world_size: int, strategy: str, **kw) -> Estimate:
    options = dict(batch=1, seq=2048, rank=16, fused_loss=True, packing=True, world_size=world_size, strategy=strategy)
    return estimate_peak(CATALOG[name].architecture, **{**options, **kw})


def test_a_ddp_rank_holds_one_process_plus_its_gradient_buckets():
    one, rank = _per_rank("Qwen3-8B", 1, "ddp"), _per_rank("Qwen3-8B", 2, "ddp")
    buckets = 4 * sum(lora_param_tensors(CATALOG["Qwen3-8B"].architecture, 16, DEFAULT_TARGET_MODULES))
    assert rank.components["distributed"] == buckets == rank.components["lora_grads"]  # a copy of the fp32 grads
    assert {k: v for k, v in rank.components.items() if k != "distributed"} == {
        k: v for k, v in one.components.items() if k != "distributed"
    }
    assert one.components["distributed"] == 0  # one process: no DDP wrapper (accelerate wraps only for >1)
    assert _per_rank("Qwen3-8B", 4, "ddp").peak_bytes == rank.peak_bytes  # DDP's rank does not shrink with N


def test_fsdp_shards_the_persistent_state_and_keeps_the_per_sample_part():
    two, four = _per_rank("Qwen3-32B", 2, "fsdp"), _per_rank("Qwen3-32B", 4, "fsdp")
    single = _per_rank("Qwen3-32B", 1, "ddp")
    # Per micro-batch: the same on every rank whatever N.
    for part in ("activations", "logits_and_loss", "temporaries", "cuda_overhead"):
        assert two.components[part] == four.components[part] == single.components[part], part
    # The sharded state halves from 2 to 4 ranks (to the byte, but for the rounding of each shard and the
    # replicated 4-bit quantization state, which is no parameter FSDP can shard).
    for part in ("lora_params", "lora_grads"):
        assert abs(2 * four.components[part] - two.components[part]) <= 2, part
    replicated = 2 * four.components["weights"] - two.components["weights"]
    # the quantization state: one uint8 absmax per 64 weights (+ the nested fp32 ones), ~3% of the whole model
    assert 0.02 < replicated / single.components["weights"] < 0.04
    # The gathered layers (and head) do not shrink with N: a layer is whole while it computes.
    assert two.components["distributed"] == four.components["distributed"] > 0
    assert four.peak_bytes < two.peak_bytes < single.peak_bytes


def test_qwen3_32b_per_rank_with_fsdp_on_2x24_and_4x16_gb():
    arch = CATALOG["Qwen3-32B"].architecture
    options = dict(rank=16, fused_loss=True, packing=True)
    for gpus, gib in ((2, 24), (4, 16)):
        budget = Budget(gib * GIB, 0.05)
        fsdp = largest_fitting(arch, budget, seq=2048, world_size=gpus, strategy="fsdp", **options)
        ddp = largest_fitting(arch, budget, seq=2048, world_size=gpus, strategy="ddp", **options)
        assert fsdp["batch"] >= 1, (gpus, gib)  # 32B trains per rank with FSDP on both
        assert fsdp["batch"] > ddp["batch"]  # and fits more per rank than with the whole model on each
    # On 16 GB cards a whole 4-bit 32B does not fit at all: the case FSDP exists for; auto picks it there.
    assert (
        largest_fitting(arch, Budget(16 * GIB, 0.05), seq=2048, world_size=4, strategy="ddp", **options)["batch"] == 0
    )
    assert pick_strategy(arch, Budget(16 * GIB, 0.05), world_size=4, seq=2048, **options)[0] == "fsdp"
    assert pick_strategy(arch, Budget(48 * GIB, 0.05), world_size=2, seq=2048, **options)[0] == "ddp"
    with pytest.raises(ValueError):
        estimate_peak(arch, batch=1, seq=8, rank=1, world_size=2, strategy="zero3")
