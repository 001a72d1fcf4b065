"""The trackers a training run reports to: the config's `report_to`, passed through to the HF Trainer.

The reporting itself is transformers' own integrations (wandb, mlflow, ...); nothing here logs anything. Two
things are ours: the names are checked before a run starts (an unknown or uninstalled tracker would otherwise
fail after the model is built), and TensorBoard's callback is attached by runner.py with the config's folder
(tensorboard_log_dir, else <log_dir>/tensorboard) instead of the Trainer's default under output_dir.
`enable_tensorboard: false` (the guide's key) takes tensorboard out of report_to.
"""

from __future__ import annotations

from autotune.config import Config
from autotune.errors import UserError

TENSORBOARD = "tensorboard"
NONE = "none"  # the Trainer's spelling of "no tracker"


def selected(cfg: Config) -> list[str]:
    """The trackers the run reports to, tensorboard included (unless enable_tensorboard is false)."""
    names = [name for name in dict.fromkeys(cfg.report_to) if name != NONE]
    return [name for name in names if name != TENSORBOARD or cfg.enable_tensorboard]


def reports_to_tensorboard(cfg: Config) -> bool:
    return TENSORBOARD in selected(cfg)


def trainer_report_to(cfg: Config) -> list[str] | str:
    """TrainingArguments.report_to: every selected tracker but TensorBoard, which runner.py attaches itself."""
    others = [name for name in selected(cfg) if name != TENSORBOARD]
    return others or NONE


def check_report_to(cfg: Config) -> None:
    """A UserError for a name transformers has no integration for, or whose package is not installed."""
    from transformers.integrations.integration_utils import (
        INTEGRATION_TO_CALLBACK,
        get_available_reporting_integrations,
    )

    known = sorted(INTEGRATION_TO_CALLBACK)
    if NONE in cfg.report_to and len(set(cfg.report_to)) > 1:
        raise UserError(f'report_to {cfg.report_to!r}: "none" cannot go with trackers. Fix: give ["none"] or trackers.')
    unknown = [name for name in cfg.report_to if name != NONE and name not in known]
    if unknown:
        raise UserError(
            f"report_to {unknown[0]!r} is not a tracker the HF Trainer knows. Fix: use any of {', '.join(known)}, "
            f'or ["none"].'
        )
    available = set(get_available_reporting_integrations())
    missing = [name for name in selected(cfg) if name not in available]
    if missing:
        raise UserError(
            f"report_to {missing[0]!r}: its package is not installed, so the HF Trainer cannot report to it. Fix: "
            f"install it (`pip install {missing[0].replace('_', '-')}`), or remove it from report_to."
        )
