"""Tests for autotune.estimate: the arithmetic against real steps measured by the CPU tracker (tiny and
medium Qwen3 models, bf16/fp32/4-bit), against FakeTensor traces, and its own consistency."""

from __future__ import annotations

import math
import time
import warnings

import pytest
import torch

from autotune.catalog import CATALOG, TINY, Architecture
from autotune.estimate import (
    ALL_TARGETS,
    DEFAULT_TARGETS,
    Estimate,
    build_lora_model,
    calibrate_by_trace,
    enable_gradient_checkpointing,
    estimate_peak,
    largest_fitting,
    lora_param_tensors,
    measure_step,
    optimizer_state_bytes,
    weight_bytes,
)

GIB = 1024**3
COMPONENTS = ("weights", "lora_params", "lora_grads", "optimizer_state", "activations", "logits_and_loss",
              "temporaries", "cuda_overhead")


def arch(h, i, layers, heads, kv, head_dim, vocab, tie=False) -> Architecture:
    return Architecture(hidden_size=h, intermediate_size=i, num_hidden_layers=layers, num_attention_heads=heads,
                        num_key_value_heads=kv, head_dim=head_dim, vocab_size=vocab, tie_word_embeddings=tie,
                        max_position_embeddings=4096)


def cpu_estimate(a: Architecture, **kw) -> Estimate:
    """What CpuTrackedMeter should measure for `measure_step` with the same arguments (whose defaults
    differ: no quantization, torch AdamW, no autocast)."""
    kw.setdefault("quantization", "none")
    kw.setdefault("optimizer", "adamw_torch")
    kw.setdefault("autocast", False)
    return estimate_peak(a, device="cpu", **kw)


def relative_error(estimate: int, measured: int) -> float:
    return estimate / measured - 1


# --------------------------------------------------------------------------- against the real step (CPU)

# (architecture, batch, seq, rank, targets, dtype bytes, checkpointing, lora dropout, bf16 autocast)
REAL_STEP_CASES = [
    pytest.param(arch(64, 128, 2, 4, 2, 16, 8192, tie=True), 2, 64, 8, ALL_TARGETS, 4, False, 0.0, False,
                 id="h64-fp32"),
    pytest.param(arch(64, 128, 2, 4, 2, 16, 8192), 4, 128, 4, DEFAULT_TARGETS, 2, True, 0.0, False, id="h64-bf16-gc"),
    pytest.param(arch(128, 384, 3, 4, 2, 32, 8192), 1, 256, 16, ALL_TARGETS, 2, True, 0.1, True,
                 id="h128-bf16-gc-dropout-autocast"),
    pytest.param(arch(128, 384, 3, 8, 2, 16, 8192), 2, 128, 8, ("q_proj", "v_proj"), 2, False, 0.1, False,
                 id="h128-bf16-qv-dropout"),
    pytest.param(arch(256, 768, 4, 8, 4, 32, 16384), 4, 128, 4, DEFAULT_TARGETS, 2, False, 0.0, True,
                 id="h256-bf16-autocast"),
    pytest.param(arch(256, 768, 2, 8, 4, 32, 16384), 1, 512, 16, ALL_TARGETS, 4, True, 0.0, False, id="h256-fp32-gc"),
    # a small vocabulary moves the peak from the loss head into the last layer's backward
    pytest.param(arch(256, 768, 2, 8, 4, 32, 1000), 2, 256, 8, ALL_TARGETS, 4, True, 0.0, False,
                 id="h256-smallvocab-fp32-gc"),
    pytest.param(arch(256, 768, 2, 8, 4, 32, 1000), 2, 256, 8, ALL_TARGETS, 2, True, 0.1, True,
                 id="h256-smallvocab-bf16-gc-dropout-autocast"),
]


@pytest.mark.parametrize("a, batch, seq, rank, targets, dtype_bytes, gc, dropout, autocast", REAL_STEP_CASES)
def test_estimate_matches_the_tracked_real_step(a, batch, seq, rank, targets, dtype_bytes, gc, dropout, autocast):
    shape = dict(batch=batch, seq=seq, rank=rank, target_modules=targets, dtype_bytes=dtype_bytes,
                 gradient_checkpointing=gc, lora_dropout=dropout, autocast=autocast)
    measured = measure_step(a, **shape)
    predicted = cpu_estimate(a, **shape)
    error = relative_error(predicted.peak_bytes, measured["peak_bytes"])
    assert abs(error) < 0.10, f"estimate {predicted.peak_bytes} vs measured {measured['peak_bytes']}: {error:+.1%}"
    # the persistent part is exact: weights + adapters as the tracker counted them before the step
    assert predicted.components["weights"] + predicted.components["lora_params"] == measured["weights"]


@pytest.mark.parametrize("kbit_prepare", [False, True], ids=["autotune-prep", "peft-kbit-prep"])
def test_estimate_matches_a_4bit_qlora_step_on_cpu(kbit_prepare):
    """bitsandbytes 4-bit on the CPU: nf4 + double quantization, LoRA, 8-bit paged AdamW (unpaged on the
    CPU). peft's prepare_model_for_kbit_training upcasts embeddings, lm_head and norms to fp32 (and with
    them the hidden states); autotune's own preparation keeps them bf16."""
    pytest.importorskip("bitsandbytes")
    a = arch(128, 384, 2, 4, 2, 32, 8192)
    shape = dict(batch=2, seq=128, rank=8, target_modules=ALL_TARGETS, quantization="4bit",
                 gradient_checkpointing=True, dtype_bytes=2, optimizer="paged_adamw_8bit", lora_dropout=0.1,
                 kbit_prepare=kbit_prepare)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Paged optimizers are not supported on CPU"
        measured = measure_step(a, autocast=True, **shape)
    predicted = estimate_peak(a, device="cpu", autocast=True, **shape)
    error = relative_error(predicted.peak_bytes, measured["peak_bytes"])
    assert abs(error) < 0.15, f"estimate {predicted.peak_bytes} vs measured {measured['peak_bytes']}: {error:+.1%}"
    # packed weights + quantization state (+ fp32 embeddings with peft's preparation), exactly as loaded
    assert predicted.components["weights"] + predicted.components["lora_params"] == measured["weights"]


def test_estimate_matches_an_8bit_step_on_cpu():
    pytest.importorskip("bitsandbytes")
    a = arch(128, 384, 2, 4, 2, 32, 8192)
    shape = dict(batch=2, seq=128, rank=8, target_modules=DEFAULT_TARGETS, quantization="8bit",
                 gradient_checkpointing=True, dtype_bytes=2)
    measured = measure_step(a, **shape)
    predicted = cpu_estimate(a, **shape)
    error = relative_error(predicted.peak_bytes, measured["peak_bytes"])
    assert abs(error) < 0.15, f"{error:+.1%}"


def test_lora_parameter_count_matches_peft():
    a = arch(64, 128, 2, 4, 2, 16, 1024)
    model = build_lora_model(a, rank=8, target_modules=ALL_TARGETS, dtype_bytes=4, gradient_checkpointing=False)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(lora_param_tensors(a, 8, ALL_TARGETS)) == trainable == 16_384  # feasibility.md's tiny model


# --------------------------------------------------------------------------- against FakeTensor traces


def test_estimate_matches_a_fake_tensor_trace_of_a_real_size_model():
    """Qwen3-0.6B's widths (tied embeddings, 151936 vocabulary) with 4 of its 28 layers, bf16: traced
    without allocating, then predicted."""
    full = CATALOG["Qwen3-0.6B"].architecture
    a = Architecture(**{**full.__dict__, "num_hidden_layers": 4})
    shape = dict(batch=1, seq=256, rank=16, target_modules=DEFAULT_TARGETS, gradient_checkpointing=True)
    traced = calibrate_by_trace(a, **shape)
    predicted = cpu_estimate(a, dtype_bytes=2, **shape)
    assert abs(relative_error(predicted.peak_bytes, traced["peak_bytes"])) < 0.05
    assert predicted.components["weights"] + predicted.components["lora_params"] == traced["weights"]


def test_trace_agrees_with_the_real_step():
    a = arch(128, 384, 2, 4, 2, 32, 8192, tie=True)
    shape = dict(batch=2, seq=64, rank=8, target_modules=DEFAULT_TARGETS, gradient_checkpointing=False,
                 dtype_bytes=2)
    traced = calibrate_by_trace(a, **shape)
    real = measure_step(a, **shape)
    assert traced["weights"] == real["weights"]
    assert abs(traced["peak_bytes"] - real["peak_bytes"]) < 0.01 * real["peak_bytes"]


# --------------------------------------------------------------------------- the big models, fast


def test_qwen3_14b_at_16_gib_answers_fast_and_adds_up():
    arch14 = CATALOG["Qwen3-14B"].architecture
    start = time.perf_counter()
    est = estimate_peak(arch14, batch=1, seq=512, rank=16, target_modules=DEFAULT_TARGETS, quantization="4bit",
                        optimizer="paged_adamw_8bit")
    fit = largest_fitting(arch14, 16 * GIB, seq=512, rank=16, quantization="4bit")
    elapsed = time.perf_counter() - start
    assert elapsed < 2.0
    assert set(est.components) == set(COMPONENTS)
    assert all(value > 0 for value in est.components.values()), est.components
    assert sum(est.components.values()) == est.peak_bytes
    # 14B in nf4: ~6.3 GiB of packed weights and quantization state, 2.9 GiB of bf16 embeddings + lm_head
    assert 8.5 * GIB < est.components["weights"] < 10 * GIB
    # peft's prepare_model_for_kbit_training would make those two fp32: +2.9 GiB
    upcast = estimate_peak(arch14, batch=1, seq=512, rank=16, quantization="4bit", kbit_prepare=True)
    assert 11.5 * GIB < upcast.components["weights"] < 13 * GIB
    assert est.peak_bytes < 16 * GIB and fit["batch"] >= 1
    assert "peak" in est.table() and est.to_dict()["peak_bytes"] == est.peak_bytes


def test_estimate_is_monotonic_in_batch_and_seq():
    for a in (CATALOG["Qwen3-14B"].architecture, CATALOG[TINY].architecture, arch(256, 768, 2, 8, 4, 32, 1000)):
        for options in (dict(quantization="4bit"), dict(quantization="none", gradient_checkpointing=False)):
            by_batch = [estimate_peak(a, batch=b, seq=256, rank=8, **options).peak_bytes for b in range(1, 17)]
            by_seq = [estimate_peak(a, batch=2, seq=s, rank=8, **options).peak_bytes for s in range(64, 4096, 64)]
            assert by_batch == sorted(by_batch) and len(set(by_batch)) == len(by_batch)
            assert by_seq == sorted(by_seq) and len(set(by_seq)) == len(by_seq)


@pytest.mark.parametrize("name, budget_gib, seq", [("Qwen3-14B", 16, 512), ("Qwen3-14B", 16, 2048),
                                                    ("Qwen3-8B", 12, 1024), ("Qwen3-0.6B", 6, 1024),
                                                    ("Qwen3-32B", 80, 4096)])
def test_largest_fitting_is_consistent_with_estimate_peak(name, budget_gib, seq):
    a = CATALOG[name].architecture
    options = dict(rank=16, quantization="4bit", target_modules=DEFAULT_TARGETS)
    fit = largest_fitting(a, budget_gib * GIB, seq=seq, batch=2, margin=0.05, **options)
    limit = fit["limit_bytes"]
    assert limit == int(budget_gib * GIB * 0.95)

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
    fit = largest_fitting(a, 8 * GIB, seq=256, rank=16, quantization="none")
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
    assert optimizer_state_bytes([4095], "paged_adamw_8bit") == 8 * 4095          # small: fp32 state
    assert optimizer_state_bytes([4096], "paged_adamw_8bit") == 2 * (4096 + 16 * 4)  # uint8 + absmax
    assert optimizer_state_bytes([1 << 20], "sgd") == 0


def test_cuda_estimate_adds_the_overhead_and_cpu_does_not():
    a = CATALOG["Qwen3-4B"].architecture
    cuda = estimate_peak(a, batch=1, seq=256, rank=8)
    cpu = estimate_peak(a, batch=1, seq=256, rank=8, device="cpu")
    assert cpu.components["cuda_overhead"] == 0 < cuda.components["cuda_overhead"]
    assert estimate_peak(a, batch=1, seq=256, rank=8, cuda_overhead_bytes=123).components["cuda_overhead"] == 123


def test_bad_arguments_are_refused():
    a = CATALOG[TINY].architecture
    with pytest.raises(ValueError):
        estimate_peak(a, batch=0, seq=8, rank=8)
    with pytest.raises(ValueError):
        estimate_peak(a, batch=1, seq=8, rank=8, quantization="3bit")
    with pytest.raises(ValueError):
        estimate_peak(a, batch=1, seq=8, rank=8, target_modules=["lm_head"])


def test_checkpointing_shim_uses_the_current_api_without_warnings():
    a = arch(64, 128, 1, 4, 2, 16, 256)
    model = build_lora_model(a, rank=4, gradient_checkpointing=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        enable_gradient_checkpointing(model)
    assert model.get_base_model().model.gradient_checkpointing


# --------------------------------------------------------------------------- on a GPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("gc", [True, False])
def test_estimate_matches_a_real_cuda_step(gc):
    """bf16 LoRA on Qwen3-1.7B's architecture (random weights, bf16 autocast as the Trainer runs it): the
    estimate against peak reserved + the measured CUDA overhead."""
    a = CATALOG["Qwen3-1.7B"].architecture
    shape = dict(batch=2, seq=1024, rank=16, target_modules=DEFAULT_TARGETS, dtype_bytes=2,
                 gradient_checkpointing=gc, autocast=True)
    measured = measure_step(a, device="cuda", **shape)
    predicted = estimate_peak(a, quantization="none", optimizer="adamw_torch",
                              cuda_overhead_bytes=measured["overhead"], **shape)
    assert abs(relative_error(predicted.peak_bytes, measured["peak_bytes"])) < 0.10
    assert math.isfinite(measured["seconds"])
