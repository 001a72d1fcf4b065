"""A few-second `autotune train` of the tiny Qwen3 on the CPU, for tests that need a finished run.

The values are test_train's `config_values` (one copy), with a longer window and one MLP projection so
that exported adapters cover attention and MLP alike.
"""

from __future__ import annotations

from pathlib import Path

from test_train import config_values


def tiny_values(tmp: Path, **overrides) -> dict:
    """Config values of a short fp32 CPU run with every path inside `tmp` (data: `tmp/data`)."""
    shape = dict(max_steps=3, max_sequence_length=96, target_modules=["q_proj", "v_proj", "up_proj"])
    return config_values(tmp, **{**shape, **overrides})


def train_tiny(tmp: Path, **overrides) -> dict:
    """Train; returns the run summary."""
    from autotune.config import build_config
    from autotune.trainer import train

    return train(build_config(tiny_values(tmp, **overrides)), echo=lambda message: None)
