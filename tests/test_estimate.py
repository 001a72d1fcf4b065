"""Tests for autotune.estimate: the arithmetic against THE training step, measured as a solver trial
measures it (trial.TrialRunner.measure: modeling.build_model and the training Trainer under
memory.CpuTrackedMeter) on tiny and medium Qwen3 models (fp32, bf16 autocast, 4-bit, 8-bit);
against FakeTensor traces of real-size models; and its own consistency."""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import pytest
import torch
from fake_trace import calibrate_by_trace

from autotune.catalog import CATALOG, PROJECTIONS, TINY, Architecture, resolve_model
from autotune.config import DEFAULT_TARGET_MODULES, build_config
from autotune.context import RunContext
from autotune.errors import UserError
from autotune.estimate import (
    COMPONENTS,
    Estimate,
    estimate_peak,
    largest_fitting,
    lora_param_tensors,
    optimizer_state_bytes,
    weight_bytes,
)
from autotune.modeling import build_model
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


def measure_real_step(name: str, workdir: Path, *, batch: int, seq: int, device: str = "cpu", **values) -> dict:
    """Peak bytes of the training step exactly as the solver measures it: trial.TrialRunner.measure (the
    model build, the meter counting the model, two optimizer steps of the training Trainer on full-length
    rows, the CUDA overhead re-measured after the first step), with no cap worth the name."""
    cfg = build_config({"model_name": name, "init": "random", "output_dir": str(workdir), **values})
    runner = TrialRunner(RunContext(cfg), Budget(2**50), device=torch.device(device))
    if runner.meter.device == "cuda":
        runner.meter.overhead_bytes  # noqa: B018 - measured before the model exists: context + cuBLAS only
    built = runner.model_for(cfg.lora_r)
    weights = runner.meter.current_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Paged optimizers are not supported on CPU", deprecations
        trial = runner.measure(batch, seq, cfg.lora_r)
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


def estimate_for(a: Architecture, measured: dict, *, batch: int, seq: int, device: str = "cpu", **values) -> Estimate:
    """estimate_peak with the options the real step has: bf16 autocast exactly when the model is bf16
    (the Trainer's mixed precision follows built.dtype), autotune's own k-bit preparation (no fp32
    upcast: kbit_prepare=False)."""
    bf16 = measured["dtype_bytes"] == 2
    return estimate_peak(
        a,
        batch=batch,
        seq=seq,
        rank=values["lora_r"],
        target_modules=values["target_modules"],
        quantization=values["quantization"],
        gradient_checkpointing=values["gradient_checkpointing"],
        dtype_bytes=measured["dtype_bytes"],
        optimizer=values["optimizer"],
        lora_dropout=values["lora_dropout"],
        autocast=bf16,
        kbit_prepare=False,
        device=device,
        cuda_overhead_bytes=measured["overhead"] if device != "cpu" else None,
    )


ATTN, MLP = DEFAULT_TARGETS, ("gate_proj", "up_proj", "down_proj")
H64 = arch(64, 128, 2, 4, 2, 16, 2048)
H128 = arch(128, 384, 3, 4, 2, 32, 4096)
H192 = arch(192, 768, 3, 6, 2, 32, 2048)
H256 = arch(256, 768, 4, 8, 4, 32, 4096)
# A 1000-entry vocabulary moves the peak from the loss head into the last layer's backward.
H256_SMALL_VOCAB = arch(256, 1024, 2, 8, 4, 32, 1000)


def case(a, batch, seq, rank, targets, quantization, bf16, gc, dropout, optimizer, id):
    return pytest.param(
        a,
        batch,
        seq,
        dict(
            lora_r=rank,
            lora_alpha=2 * rank,
            target_modules=list(targets),
            quantization=quantization,
            bf16=bf16,
            gradient_checkpointing=gc,
            lora_dropout=dropout,
            optimizer=optimizer,
        ),
        id=id,
    )


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
]


@pytest.mark.parametrize("a, batch, seq, values", REAL_STEP_CASES)
def test_estimate_matches_the_real_training_step(a, batch, seq, values, models_dir, tmp_path):
    if values["quantization"] != "none":
        pytest.importorskip("bitsandbytes")
    name = model_name(a, models_dir)
    measured = measure_real_step(name, tmp_path, batch=batch, seq=seq, **values)
    predicted = estimate_for(resolve_model(name).architecture, measured, batch=batch, seq=seq, **values)
    error = relative_error(predicted.peak_bytes, measured["peak_bytes"])
    assert abs(error) < 0.10, f"estimate {predicted.peak_bytes} vs measured {measured['peak_bytes']}: {error:+.1%}"
    # the persistent part is exact: weights (packed + quantization state for k-bit) + adapters, as counted
    assert predicted.components["weights"] + predicted.components["lora_params"] == measured["weights"]


def test_lora_parameter_count_matches_peft():
    cfg = build_config(
        {"model_name": TINY, "init": "random", "quantization": "none", "lora_r": 8, "target_modules": list(ALL_TARGETS)}
    )
    built = build_model(RunContext(cfg), device=torch.device("cpu"))
    trainable = built.parameter_counts()["trainable_parameters"]
    a = CATALOG[TINY].architecture
    assert sum(lora_param_tensors(a, 8, ALL_TARGETS)) == trainable == 16_384  # feasibility.md's tiny model


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


def test_trace_agrees_with_the_real_step(models_dir, tmp_path):
    """The trace's minimal loop stands in for the Trainer's step where the Trainer cannot run."""
    a = arch(128, 384, 2, 4, 2, 32, 8192, tie=True)
    values = dict(
        lora_r=8,
        lora_alpha=16,
        target_modules=list(DEFAULT_TARGETS),
        quantization="none",
        bf16=True,
        gradient_checkpointing=False,
        lora_dropout=0.0,
        optimizer="adamw_torch",
    )
    real = measure_real_step(model_name(a, models_dir), tmp_path, batch=2, seq=64, **values)
    traced = calibrate_by_trace(
        a, batch=2, seq=64, rank=8, target_modules=DEFAULT_TARGETS, gradient_checkpointing=False, dtype_bytes=2
    )
    assert traced["weights"] == real["weights"]
    assert abs(traced["peak_bytes"] - real["peak_bytes"]) < 0.01 * real["peak_bytes"]


# --------------------------------------------------------------------------- the big models, fast


def test_qwen3_14b_at_16_gib_answers_fast_and_adds_up():
    arch14 = CATALOG["Qwen3-14B"].architecture
    start = time.perf_counter()
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
    assert estimate_peak(a, batch=1, seq=256, rank=8, cuda_overhead_bytes=123).components["cuda_overhead"] == 123


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
    values = dict(
        lora_r=16,
        lora_alpha=32,
        target_modules=list(DEFAULT_TARGETS),
        quantization="none",
        bf16=True,
        gradient_checkpointing=gc,
        lora_dropout=0.0,
        optimizer="adamw_torch",
    )
    measured = measure_real_step("Qwen3-1.7B", tmp_path, batch=2, seq=1024, device="cuda", **values)
    predicted = estimate_for(a, measured, batch=2, seq=1024, device="cuda", **values)
    assert abs(relative_error(predicted.peak_bytes, measured["peak_bytes"])) < 0.10
