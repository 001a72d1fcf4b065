"""Tests for autotune.preflight: the config checked against a (handmade) probe, and dependency installs."""

from __future__ import annotations

import shlex
import sys
from types import SimpleNamespace

import pytest

from autotune import preflight
from autotune.config import Config
from autotune.errors import UserError
from autotune.preflight import Finding, check_hardware, ensure_dependencies, install_command


def gpu(**kw) -> dict:
    base = {
        "index": 0,
        "name": "NVIDIA GeForce RTX 4080",
        "memory_total_gb": 15.99,
        "memory_free_gb": 15.2,
        "bf16_supported": True,
        "compute_capability": "8.9",
        "error": None,
    }
    return {**base, **kw}


def probe(*gpus, disk=500.0, nvml_error=None) -> dict:
    return {"gpus": list(gpus), "host": {"disk_free_gb": disk, "disk_path": "/work"}, "nvml_error": nvml_error}


def levels(findings) -> list[str]:
    return [f.level for f in findings]


def only(findings, level) -> list[str]:
    return [f.message for f in findings if f.level == level]


# ------------------------------------------------------------------------------ check_hardware


def test_fits():
    found = check_hardware(Config(max_memory_gb=13.0), probe(gpu()))
    assert levels(found) == ["ok"]
    assert "13.0 fits GPU 0" in found[0].message and "15.2 of 16.0 GiB free" in found[0].message
    assert all(isinstance(f, Finding) for f in found)


def test_budget_above_total_is_an_error_with_the_fix():
    found = check_hardware(Config(max_memory_gb=24.0), probe(gpu()))
    (msg,) = only(found, "error")
    assert "max_memory_gb 24.0 exceeds GPU 0 (NVIDIA GeForce RTX 4080) total of 16.0 GiB" in msg
    assert "set max_memory_gb <= 16.0 (the margin is kept inside it)" in msg  # the margin is taken once, by solve


def test_budget_above_free_is_a_warning():
    found = check_hardware(Config(max_memory_gb=14.0), probe(gpu(memory_free_gb=10.0)))
    assert levels(found) == ["warning"]
    assert "exceeds the 10.0 GiB free on GPU 0" in found[0].message
    assert "max_memory_gb <= 10.0 (the margin is kept inside it)" in found[0].message


def test_no_budget_checks_nothing_about_memory():
    assert check_hardware(Config(max_memory_gb=None), probe(gpu())) == []


def test_bf16_without_support_is_an_error():
    turing = gpu(name="Tesla T4", bf16_supported=False, compute_capability="7.5", memory_total_gb=15.0)
    found = check_hardware(Config(max_memory_gb=10.0), probe(turing))
    (msg,) = only(found, "error")
    assert "bf16 is on but Tesla T4 (compute capability 7.5) has no bf16" in msg
    assert "bf16=false, fp16=true" in msg
    fixed = check_hardware(Config(max_memory_gb=10.0, bf16=False, fp16=True), probe(turing))
    assert only(fixed, "error") == []


def test_low_disk_is_an_error():
    found = check_hardware(Config(max_memory_gb=4.0), probe(gpu(), disk=0.5))
    (msg,) = only(found, "error")
    assert "only 0.5 GiB free at /work" in msg and "output_dir" in msg
    assert only(check_hardware(Config(max_memory_gb=4.0), probe(gpu(), disk=2.0)), "error") == []


def test_unknown_disk_is_not_an_error():
    doc = probe(gpu())
    doc["host"] = {"disk_free_gb": None, "disk_path": None}
    assert only(check_hardware(Config(max_memory_gb=4.0), doc), "error") == []
    del doc["host"]
    assert only(check_hardware(Config(max_memory_gb=4.0), doc), "error") == []


def test_no_gpu_is_a_warning_naming_the_reason():
    found = check_hardware(Config(), probe(nvml_error="NVML Shared Library Not Found"))
    assert levels(found) == ["warning"]
    assert "NVML Shared Library Not Found" in found[0].message and "CPU" in found[0].message
    assert "no GPU visible" in check_hardware(Config(), {"gpus": [], "host": {}})[0].message


def test_the_gpu_checked_is_cuda_device_0():
    small = gpu(index=0, memory_total_gb=12.0, memory_free_gb=11.0)
    big = gpu(index=1, name="NVIDIA A100", memory_total_gb=80.0, memory_free_gb=79.0)
    for order in ((small, big), (big, small)):
        found = check_hardware(Config(max_memory_gb=40.0), probe(*order))
        (msg,) = only(found, "error")
        assert "GPU 0" in msg and "total of 12.0 GiB" in msg


def test_an_unreadable_gpu_0_is_a_warning_not_a_pass_on_another_gpu():
    broken = gpu(
        index=0,
        name=None,
        error="memory: Unknown Error",
        memory_total_gb=None,
        memory_free_gb=None,
        bf16_supported=None,
        compute_capability=None,
    )
    healthy = gpu(index=1, name="NVIDIA A100", memory_total_gb=80.0, memory_free_gb=79.0)
    found = check_hardware(Config(max_memory_gb=40.0), probe(broken, healthy))
    assert levels(found) == ["warning"]
    assert "GPU 0" in found[0].message and "memory: Unknown Error" in found[0].message
    assert "not checked" in found[0].message


def test_several_problems_at_once():
    old = gpu(
        name="Tesla T4", bf16_supported=False, compute_capability="7.5", memory_total_gb=15.0, memory_free_gb=14.0
    )
    found = check_hardware(Config(max_memory_gb=20.0), probe(old, disk=0.1))
    assert len(only(found, "error")) == 3


def test_against_the_real_probe_of_this_machine(tmp_path):
    from autotune.hardware import probe as real_probe

    doc = real_probe(tmp_path)
    found = check_hardware(Config(), doc)
    if not doc["gpus"]:
        assert found[0].level == "warning"
    assert all(f.level in ("ok", "warning", "error") for f in found)


# --------------------------------------------------------------------------------- dependencies


class Recorder:
    def __init__(self, answer="y", returncode=0):
        self.answer, self.returncode = answer, returncode
        self.prompts: list[str] = []
        self.commands: list[list[str]] = []

    def ask(self, prompt):
        self.prompts.append(prompt)
        if isinstance(self.answer, BaseException):
            raise self.answer
        return self.answer

    def run(self, cmd):
        self.commands.append(cmd)
        return SimpleNamespace(returncode=self.returncode)


@pytest.fixture
def missing(monkeypatch):
    monkeypatch.setattr(preflight, "missing_packages", lambda: ["peft", "bitsandbytes"])
    return " ".join(shlex.quote(c) for c in install_command(["peft", "bitsandbytes"]))


def test_install_command_uses_this_interpreter():
    assert install_command(["peft", "nvidia-ml-py"]) == [sys.executable, "-m", "pip", "install", "peft", "nvidia-ml-py"]


def test_missing_packages_maps_modules_to_package_names(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name in ("pynvml", "peft") else real(name, *a)
    )
    assert preflight.missing_packages() == ["peft", "nvidia-ml-py"]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    assert preflight.missing_packages() == []


def test_nothing_missing_does_nothing(monkeypatch):
    monkeypatch.setattr(preflight, "missing_packages", lambda: [])
    rec = Recorder()
    for auto in (False, True):
        ensure_dependencies(auto, isatty=True, ask=rec.ask, run=rec.run)
    assert rec.prompts == [] and rec.commands == []


def test_missing_without_auto_install_is_an_error_showing_the_command(missing):
    rec = Recorder()
    with pytest.raises(UserError) as info:
        ensure_dependencies(False, isatty=True, ask=rec.ask, run=rec.run)
    assert "missing packages: peft, bitsandbytes" in str(info.value)
    assert missing in str(info.value)
    assert rec.prompts == [] and rec.commands == []


def test_auto_install_without_a_terminal_refuses(missing):
    rec = Recorder()
    with pytest.raises(UserError) as info:
        ensure_dependencies(True, isatty=False, ask=rec.ask, run=rec.run)
    assert "no terminal to ask on" in str(info.value) and missing in str(info.value)
    assert rec.prompts == [] and rec.commands == []


def test_auto_install_uses_stdin_isatty_by_default(missing, monkeypatch):
    monkeypatch.setattr(sys, "stdin", SimpleNamespace(isatty=lambda: False))
    rec = Recorder()
    with pytest.raises(UserError, match="no terminal"):
        ensure_dependencies(True, ask=rec.ask, run=rec.run)
    assert rec.commands == []
    monkeypatch.setattr(sys, "stdin", SimpleNamespace(isatty=lambda: True))
    ensure_dependencies(True, ask=rec.ask, run=rec.run)
    assert len(rec.commands) == 1


@pytest.mark.parametrize("answer", ["y", "Y", "yes", " YES \n"])
def test_auto_install_on_a_terminal_asks_then_runs_the_exact_command(missing, answer):
    rec = Recorder(answer)
    ensure_dependencies(True, isatty=True, ask=rec.ask, run=rec.run)
    assert len(rec.prompts) == 1 and missing in rec.prompts[0] and "[y/N]" in rec.prompts[0]
    assert rec.commands == [install_command(["peft", "bitsandbytes"])]


@pytest.mark.parametrize("answer", ["", "n", "no", "maybe", EOFError()])
def test_auto_install_declined_installs_nothing(missing, answer):
    rec = Recorder(answer)
    with pytest.raises(UserError) as info:
        ensure_dependencies(True, isatty=True, ask=rec.ask, run=rec.run)
    assert "not installed" in str(info.value) and missing in str(info.value)
    assert rec.commands == []


def test_failed_install_is_an_error(missing):
    rec = Recorder("y", returncode=1)
    with pytest.raises(UserError) as info:
        ensure_dependencies(True, isatty=True, ask=rec.ask, run=rec.run)
    assert "the install failed" in str(info.value) and missing in str(info.value)
    assert len(rec.commands) == 1
