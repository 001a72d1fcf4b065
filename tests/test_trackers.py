"""`report_to`: the config's trackers pass through to the HF Trainer, checked before a run starts; TensorBoard
goes to the config's folder and the JSONL log is written either way."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers.runs import tiny_values, train_tiny

from autotune.cli import main
from autotune.config import build_config
from autotune.errors import UserError
from autotune.step import check_training_settings, training_arguments
from autotune.trackers import check_report_to, reports_to_tensorboard, trainer_report_to

pytestmark = pytest.mark.filterwarnings("ignore:Could not find a config file:UserWarning")


def cfg(**values):
    return build_config({"optimizer": "adamw_torch", **values})


@pytest.fixture
def installed(monkeypatch):
    """Pretend exactly these trackers' packages are installed."""
    from transformers.integrations import integration_utils

    def set_installed(*names):
        monkeypatch.setattr(integration_utils, "get_available_reporting_integrations", lambda: list(names))

    return set_installed


def test_default_is_tensorboard_attached_by_us():
    c = cfg()
    assert c.report_to == ["tensorboard"] and reports_to_tensorboard(c) and trainer_report_to(c) == "none"
    assert not reports_to_tensorboard(cfg(enable_tensorboard=False))


def test_trackers_pass_through_to_the_trainer(installed, tmp_path, autotune_cache):
    from autotune.context import RunContext
    from autotune.modeling import build_model

    installed("tensorboard", "wandb", "mlflow")
    c = build_config(tiny_values(tmp_path, report_to=["wandb", "tensorboard", "mlflow"]))
    check_training_settings(c)
    built = build_model(RunContext(c))
    assert training_arguments(c, built, tmp_path).report_to == ["wandb", "mlflow"]
    assert training_arguments(c, built, tmp_path, log=False).report_to == []  # a solver trial reports nowhere


def test_unknown_tracker_is_a_user_error():
    with pytest.raises(UserError, match=r"report_to 'wandbb' is not a tracker the HF Trainer knows.*mlflow.*wandb"):
        check_report_to(cfg(report_to=["wandbb"]))
    with pytest.raises(UserError, match='"none" cannot go with trackers'):
        check_report_to(cfg(report_to=["none", "wandb"]))


def test_uninstalled_tracker_says_what_to_install(installed):
    installed("tensorboard")
    with pytest.raises(UserError, match=r"report_to 'mlflow': its package is not installed.*pip install mlflow"):
        check_report_to(cfg(report_to=["tensorboard", "mlflow"]))
    check_report_to(cfg(report_to=["none"]))
    installed()  # not even tensorboard: fine when it is switched off
    check_report_to(cfg(report_to=["tensorboard"], enable_tensorboard=False))


def test_tensorboard_and_jsonl_logs_are_written(tmp_path, autotune_cache):
    summary = train_tiny(tmp_path, enable_tensorboard=True, tensorboard_log_dir=str(tmp_path / "tb"), max_steps=2)
    assert summary["status"] == "succeeded"
    assert list((tmp_path / "tb" / summary["run_id"]).glob("events.out.tfevents.*"))  # a folder per run
    records = [json.loads(line) for line in (tmp_path / "logs" / "run.jsonl").read_text().splitlines()]
    assert any(r["message"] == "metrics" for r in records)
    assert not (tmp_path / "out" / "checkpoints" / "runs").exists()  # not the Trainer's default folder


def test_train_with_an_uninstalled_tracker_stops_before_anything_runs(tmp_path, capsys, installed):
    installed("tensorboard")
    path = tmp_path / "c.json"
    path.write_text(json.dumps(tiny_values(tmp_path, report_to=["mlflow"])))
    try:
        main(["train", "--config", str(path)])
        code = 0
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and "report_to 'mlflow'" in err and "Traceback" not in err
    assert not Path(tmp_path / "out").exists()
