"""The Python API (`from autotune import probe, estimate, solve, train, export`): the README's example runs as written,
the answers are the command line's, and bad input is the command line's UserError."""

from __future__ import annotations

import json

import pytest
from helpers import REPO
from helpers.cli import run_cli

from autotune import estimate, solve, train
from autotune.api import Estimated, Solved, Trained
from autotune.errors import UserError


def readme_example() -> str:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    block = readme.split("<!-- api-example:start -->")[1].split("<!-- api-example:end -->")[0]
    return block.strip().removeprefix("```python").removesuffix("```")


def test_the_readme_example_runs(tmp_path, monkeypatch, capsys):
    """From a folder that holds what the repository root does for it (the demo config and data/raw)."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "raw").symlink_to(REPO / "data" / "raw")
    (tmp_path / "profiles").symlink_to(REPO / "profiles")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(readme_example(), "README.md (Python API)", "exec"), scope)
    solved, run, adapter = scope["solved"], scope["run"], scope["adapter"]
    assert isinstance(scope["planned"], Estimated) and scope["planned"].peak_gb > 0
    assert isinstance(solved, Solved) and solved.path.resolve() == tmp_path / "outputs" / "api" / "profile.json"
    assert json.loads(solved.path.read_text())["choice"] == solved.choice
    assert isinstance(run, Trained) and run.status == "succeeded"
    assert run.summary["final"]["global_step"] == 2 and run.output_dir.resolve() == tmp_path / "outputs" / "api"
    assert adapter.out == run.output_dir / "adapter" and (adapter.out / "adapter_model.safetensors").is_file()
    assert "predicted" in capsys.readouterr().out


def test_estimate_answers_what_the_command_answers(capsys):
    shape = dict(model_name="Qwen3-8B", max_sequence_length=1024, batch_size=1, lora_r=16)
    answer = estimate(max_memory_gb=16, host_ram_gb=64, **shape)
    code, out, err = run_cli(
        capsys, "estimate", "--model", "Qwen3-8B", "--max-memory-gb", 16, "--seq", 1024, "--batch", 1, "--rank", 16,
        "--host-ram-gb", 64, "--json",
    )  # fmt: skip
    assert code == 0, err
    assert answer.report == json.loads(out)
    assert answer.fits == answer.report["fits"] and answer.step.peak_bytes == answer.report["peak_bytes"]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: estimate(model_name="Qwen3-7B"), "there is no Qwen3-7B"),
        (lambda: estimate(batch_sise=2), "keyword arguments: unknown key 'batch_sise' (did you mean 'batch_size'?)"),
        (lambda: estimate(lora_rank=8), "keyword arguments: unknown key 'lora_rank' (did you mean 'lora_r'?)"),
        (lambda: solve(objective="fastest"), "objective 'fastest': use one of throughput, max-seq, max-rank"),
        (lambda: train("no/such/config.json"), "config file not found"),
        (lambda: train(profile="no/such/profile.json"), "profile not found"),
    ],
)
def test_bad_input_is_the_commands_user_error(call, message):
    with pytest.raises(UserError) as info:
        call()
    assert message in str(info.value)
