"""Shared fixtures. Kept small: anything specific to one test module lives in that module."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported anywhere


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# Under pytest-xdist each worker's torch (and the CLI processes and torchrun ranks it starts, which inherit this)
# computes on its share of the cores: a worker per core, each with every core's threads, would oversubscribe them.
# Before torch is imported: it reads these once.
if workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0")):
    for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_name, str(max(1, _cores() // workers)))

import pytest  # noqa: E402

from autotune.memory import reuse_freed_host_memory  # noqa: E402

# The tests train on the CPU, as autotune does there (modeling.build_model): freed host memory kept for reuse, so
# that a step does not fault its logits in again page by page (memory.reuse_freed_host_memory). Here for the
# tests that build a model without build_model.
reuse_freed_host_memory()


# What one worker can take at once: a training test's model, its trainer and the CLI processes it starts.
WORKER_HOST_MEMORY_BYTES = 4 * 2**30


# The longest modules (seconds, a worker each on two AVX2 cores), handed to the xdist workers first and longest
# first, so that no worker is left running one of them alone at the end: xdist's own order (pyproject.toml turns it
# off) is by number of tests, which put the one-test GPU-check rehearsal last. The rest follow in collection order.
LONGEST_MODULES = (
    "test_runs.py",  # ~340 s: the demo, runs as real processes
    "test_distributed.py",  # ~270 s: torchrun processes
    "test_estimate.py",  # ~250 s: real steps of ~40 shapes
    "test_train.py",  # ~230 s: the resume tests' killed processes
    "test_hybrid.py",  # ~200 s: the Qwen3.5 hybrids on the reference gated-delta rule, the solve, the VL checkpoint
    "test_techniques.py",  # ~90 s
    "test_gpu_check_rehearsal.py",  # ~90 s: one test
    "test_solver.py",  # ~70 s
)


def pytest_collection_modifyitems(session, config, items) -> None:
    """Under xdist (each worker collects, and the collections must agree): the longest modules first, each module's
    tests in their own order (a stable sort)."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    first = {name: i for i, name in enumerate(LONGEST_MODULES)}
    items.sort(key=lambda item: first.get(item.path.name, len(first)))


def pytest_collection_finish(session) -> None:
    """The training stack imported once, then every object alive so far (modules, classes, the collected tests:
    none of them ever garbage) moved out of the cycle collector's sight (gc.freeze). memory.free_memory collects
    before and after every trial and training attempt; with the ~500k objects of torch, transformers and peft to
    walk, each collection cost ~0.4 s of CPU, several per test (the estimate's real steps, the solver's trials).
    What a test builds afterwards (models, trainers, their cycles) is collected as before. Where no collected module
    trains (a run of the config tests alone), nothing more is imported for it."""
    import gc
    import sys

    if "autotune.trial" in sys.modules or "autotune.runner" in sys.modules:
        import peft  # noqa: F401
        import transformers.trainer  # noqa: F401

        import autotune.runner
        import autotune.trial  # noqa: F401

    gc.collect()
    gc.freeze()


def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto`: a worker per core, as many as the host memory holds (at most 8: the longest tests run alone)."""
    try:
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        memory = WORKER_HOST_MEMORY_BYTES
    return max(1, min(_cores(), memory // WORKER_HOST_MEMORY_BYTES, 8))


@pytest.fixture(scope="session")
def autotune_cache(tmp_path_factory):
    """One AUTOTUNE_CACHE for the session (inherited by CLI subprocesses): the offline Qwen3
    tokenizer is built into it once (~5 s) and reused by every test that trains."""
    from autotune.tokenizer import OFFLINE_QWEN3, load_tokenizer

    root = tmp_path_factory.mktemp("autotune-cache")
    saved = os.environ.get("AUTOTUNE_CACHE")
    os.environ["AUTOTUNE_CACHE"] = str(root)
    load_tokenizer(OFFLINE_QWEN3)
    yield root
    if saved is None:
        os.environ.pop("AUTOTUNE_CACHE", None)
    else:
        os.environ["AUTOTUNE_CACHE"] = saved


@pytest.fixture
def make_cfg(tmp_path, autotune_cache):
    """A few-second CPU run's config (helpers.runs.config_values), every path inside tmp_path/<sub>."""
    from helpers.runs import config_values

    from autotune.config import build_config

    def make(sub: str = "run", **overrides):
        return build_config(config_values(tmp_path / sub, **overrides))

    return make


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of the given size, really full when it is full (skips where mounting needs rights it lacks)."""
    import subprocess
    from pathlib import Path

    mounted: list[Path] = []

    def mount(size_mib: int) -> Path:
        folder = tmp_path / f"disk-{size_mib}m"
        folder.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", str(folder)], capture_output=True, text=True
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here (needs root and mount rights): {done.stderr.strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], check=False)
