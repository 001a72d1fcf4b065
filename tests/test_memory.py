"""Tests for autotune.memory: the CPU storage tracker exactly, the CUDA meter's pure parts everywhere and
its real behaviour where a GPU exists."""

from __future__ import annotations

import os

import psutil
import pytest
import torch

from autotune.memory import (
    CpuTrackedMeter,
    CudaMeter,
    MemoryMeter,
    SimulatedOOM,
    allocator_fraction,
    ensure_expandable_segments,
    make_meter,
    merge_alloc_conf,
    module_tensors,
    overhead_from_device_usage,
)
from autotune.units import DEFAULT_CUDA_OVERHEAD_BYTES

MIB = 1024**2
GIB = 1024**3
F32 = 4

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _mlp(width: int = 256, hidden: int = 1024) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(width, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, width))


# ------------------------------------------------------------------------------ the CPU tracker: counting


def test_known_allocations_give_exact_peak_and_current():
    meter = CpuTrackedMeter()
    with meter:
        a = torch.empty(1000)
        b = torch.empty(2000)
        c = torch.empty(3000)
        assert meter.current_bytes() == 6000 * F32
        del b
        d = torch.empty(500)
    assert meter.current_bytes() == (1000 + 3000 + 500) * F32
    assert meter.peak_bytes() == 6000 * F32
    del a, c, d
    assert meter.current_bytes() == 0  # freed outside the region still counts down
    meter.reset_peak()
    assert meter.peak_bytes() == 0


def test_views_and_inplace_ops_share_their_base_storage():
    meter = CpuTrackedMeter()
    with meter:
        a = torch.zeros(100, 10)
        views = [a.view(1000), a[10:], a.t(), a.unsqueeze(0).expand(3, 100, 10), a.reshape(10, 100)]
        a.add_(1)
        a[0].mul_(2)
    assert meter.current_bytes() == 1000 * F32
    del a
    assert meter.current_bytes() == 1000 * F32  # the views keep the storage alive
    del views
    assert meter.current_bytes() == 0


def test_resize_in_place_is_followed():
    meter = CpuTrackedMeter()
    with meter:
        x = torch.empty(10)
        x.resize_(1000)
    assert meter.current_bytes() == 1000 * F32
    del x
    assert meter.current_bytes() == 0


def test_saved_tensors_of_autograd_are_counted_until_backward_frees_them():
    meter = CpuTrackedMeter()
    x = torch.randn(1000, requires_grad=True)
    meter.track_existing(x)
    with meter:
        y = x.exp()  # exp saves its output for backward
        loss = y.sum()
        del y  # the graph still holds it
        assert meter.current_bytes() == 2000 * F32 + 4
        loss.backward()  # backward releases saved tensors and creates x.grad
    del loss
    assert meter.current_bytes() == 2000 * F32  # x and x.grad


def test_track_existing_counts_shared_parameters_once():
    emb = torch.nn.Embedding(100, 16)
    head = torch.nn.Linear(16, 100, bias=False)
    head.weight = emb.weight  # tied, as in small Qwen3 models
    model = torch.nn.ModuleDict({"emb": emb, "head": head})
    meter = CpuTrackedMeter()
    assert meter.track_existing(model) == 100 * 16 * F32
    assert meter.track_existing(model) == 0  # registering again adds nothing
    assert meter.peak_bytes() == 100 * 16 * F32


def test_module_tensors_includes_quantization_state_attributes():
    class Params4bit(torch.nn.Parameter):  # the shape of bitsandbytes' attributes, without bitsandbytes
        pass

    class State:
        def __init__(self):
            self.absmax = torch.zeros(8, dtype=torch.uint8)
            self.code = torch.zeros(16)
            self.state2 = None

    weight = Params4bit(torch.zeros(64, 1, dtype=torch.uint8), requires_grad=False)
    weight.quant_state = State()
    weight.quant_state.state2 = State()
    layer = torch.nn.Module()
    layer.weight = weight
    assert len(module_tensors(layer)) == 1 + 2 + 2
    meter = CpuTrackedMeter()
    assert meter.track_existing(layer) == 64 + 2 * (8 + 16 * F32)


def test_nested_regions_keep_tracking():
    meter = CpuTrackedMeter()
    with meter:
        with meter:
            a = torch.empty(10)
        b = torch.empty(10)  # still inside the outer region
    c = torch.empty(10)  # outside: not seen
    assert meter.current_bytes() == 20 * F32
    del a, b, c


def test_fake_tensors_are_counted_although_they_have_no_address():
    from torch._subclasses.fake_tensor import FakeTensorMode

    meter = CpuTrackedMeter()
    with FakeTensorMode():
        with meter:
            a = torch.empty(1000)
            b = torch.empty(1000)  # a second storage at "address" 0 must not merge with the first
            c = a @ a
        assert meter.current_bytes() == 2000 * F32 + 4
        del a, b, c
    assert meter.current_bytes() == 0


# ------------------------------------------------------------------------------ OOMs


def test_cap_raises_simulated_oom_that_torch_handlers_catch():
    meter = CpuTrackedMeter()
    meter.cap(1 * MIB)
    with pytest.raises(torch.OutOfMemoryError) as info, meter:
        torch.empty(2 * MIB // F32)
    assert isinstance(info.value, SimulatedOOM)
    meter.cleanup()
    assert meter.current_bytes() == 0


def test_cap_checks_registered_tensors_too():
    meter = CpuTrackedMeter()
    meter.cap(1000)
    with pytest.raises(SimulatedOOM):
        meter.track_existing(torch.empty(1000))


def _failing_trial(meter: CpuTrackedMeter, model: torch.nn.Module, rows: int) -> None:
    with meter:
        x = torch.randn(rows, 256)
        loss = model(x).square().mean()
        loss.backward()


def test_oom_inside_forward_backward_returns_to_baseline_after_cleanup():
    model = _mlp()
    meter = CpuTrackedMeter()
    meter.track_existing(model)
    baseline = meter.current_bytes()
    meter.cap(baseline + 8 * MIB)  # 4096 x 1024 fp32 hidden activations (16 MiB) do not fit
    with pytest.raises(torch.OutOfMemoryError):
        _failing_trial(meter, model, 4096)
    meter.cleanup()
    model.zero_grad(set_to_none=True)
    assert meter.current_bytes() == baseline
    # and a trial that fits still runs and leaves only the grads behind
    meter.cap(None)
    _failing_trial(meter, model, 8)
    assert meter.current_bytes() == 2 * baseline


def test_twenty_failures_in_a_row_leak_nothing():
    """The solver's pattern: trial after trial over the cap; tracked bytes and process RSS must come back."""
    model = _mlp()
    meter = CpuTrackedMeter()
    meter.track_existing(model)
    baseline = meter.current_bytes()
    meter.cap(baseline + 8 * MIB)
    process = psutil.Process()
    rss_after_first = None
    growth = []
    for trial in range(20):
        with pytest.raises(torch.OutOfMemoryError):
            _failing_trial(meter, model, 4096 + 64 * trial)  # vary the shape as the solver does
        meter.cleanup()
        model.zero_grad(set_to_none=True)
        assert meter.current_bytes() == baseline, f"trial {trial} leaked tracked bytes"
        rss = process.memory_info().rss
        rss_after_first = rss_after_first or rss
        growth.append(rss - rss_after_first)
    assert max(growth) < 50 * MIB, f"RSS grew by {max(growth) / MIB:.1f} MiB over 20 failed trials"


# ------------------------------------------------------------------------------ the CUDA meter, no GPU needed


def test_allocator_fraction_leaves_room_for_the_overhead():
    assert allocator_fraction(16 * GIB, GIB // 2, 80 * GIB) == pytest.approx(15.5 / 80)
    assert allocator_fraction(GIB // 4, GIB // 2, 80 * GIB) == 0.0  # budget below the overhead
    assert allocator_fraction(200 * GIB, GIB // 2, 80 * GIB) == 1.0  # budget above the card
    with pytest.raises(ValueError):
        allocator_fraction(GIB, 0, 0)


def test_merge_alloc_conf_keeps_other_settings():
    assert merge_alloc_conf(None) == "expandable_segments:True"
    assert merge_alloc_conf("max_split_size_mb:128") == "max_split_size_mb:128,expandable_segments:True"
    assert (
        merge_alloc_conf("expandable_segments:False,garbage_collection_threshold:0.6")
        == "garbage_collection_threshold:0.6,expandable_segments:True"
    )


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.is_initialized(), reason="CUDA already initialised")
def test_ensure_expandable_segments_sets_the_allocator_config(monkeypatch):
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:64")
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    assert ensure_expandable_segments() is True
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:64,expandable_segments:True"


def test_make_meter_picks_the_meter():
    assert isinstance(make_meter("cpu"), CpuTrackedMeter)
    meter = make_meter("cuda:1")
    assert isinstance(meter, CudaMeter) and meter.index == 1 and meter.device == "cuda"
    assert isinstance(meter, MemoryMeter)
    with pytest.raises(ValueError):
        make_meter("tpu")


def test_overhead_from_device_usage_refuses_other_processes_memory():
    assert overhead_from_device_usage(80 * GIB, 80 * GIB - 600 * MIB, 100 * MIB) == 500 * MIB
    assert overhead_from_device_usage(80 * GIB, 40 * GIB, 100 * MIB) is None  # someone else's 40 GB
    assert overhead_from_device_usage(80 * GIB, 80 * GIB, 100 * MIB) is None  # inconsistent reading


def test_cuda_meter_overhead_can_be_given_and_the_estimate_uses_the_meters_default():
    from autotune.catalog import CATALOG
    from autotune.estimate import estimate_peak

    assert CudaMeter(0, overhead_bytes=123).overhead_bytes == 123
    est = estimate_peak(CATALOG["Qwen3-0.6B"].architecture, batch=1, seq=64, rank=8, device="cuda", calibrated=False)
    assert est.components["cuda_overhead"] == DEFAULT_CUDA_OVERHEAD_BYTES


# ------------------------------------------------------------------------------ the CUDA meter on a GPU


@needs_cuda
def test_cuda_overhead_is_measured_and_plausible():
    meter = CudaMeter(0)
    assert 50 * MIB < meter.overhead_bytes < 4 * GIB
    meter.reset_peak()
    x = torch.empty(256 * MIB, dtype=torch.uint8, device="cuda")
    assert meter.peak_bytes() >= 256 * MIB + meter.overhead_bytes
    assert meter.current_bytes() >= 256 * MIB
    del x
    meter.cleanup()


@needs_cuda
def test_cuda_cap_raises_oom_and_cleanup_returns_to_baseline():
    meter = CudaMeter(0)
    model = _mlp().cuda()
    meter.cleanup()
    baseline = meter.current_bytes()
    meter.cap(meter.overhead_bytes + torch.cuda.memory_reserved() + 64 * MIB)
    try:
        for trial in range(20):
            with pytest.raises(torch.OutOfMemoryError) as info, meter:
                x = torch.randn(65536 + 1024 * trial, 256, device="cuda")
                model(x).square().mean().backward()
            assert isinstance(info.value, torch.OutOfMemoryError)
            del info
            meter.cleanup()
            model.zero_grad(set_to_none=True)
            assert meter.current_bytes() == baseline, f"trial {trial} leaked"
    finally:
        meter.cap(None)
