"""Issue 10: no run lost, resume exact, every error clean, evaluation apart from training, a memory watchdog.

Faults are real wherever this machine can have them: `autotune train` runs as a separate process and gets
SIGKILL or SIGINT, two processes race for one folder, the disk is a small tmpfs that really fills (mounting
one needs root; the tests skip with the reason where the platform refuses). Faked, and said so at each
place: an out-of-memory error in evaluation (a CPU has no device memory to run out of) and the GPU memory
readings of the watchdog (a CPU has no CUDA allocator).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import REPO
from helpers.cli import cli_process, run_cli, run_cli_process
from helpers.faults import stop
from helpers.runs import (
    PAIRS,
    QUIET,
    config_values,
    loss_by_step,
    read_jsonl,
    samples,
    summary_file,
    tiny_profile,
    write_qa,
)
from transformers import TrainerCallback

from autotune.config import build_config
from autotune.errors import UserError
from autotune.runner import train

pytestmark = pytest.mark.filterwarnings("ignore:Could not find a config file:UserWarning")


def config_file(tmp: Path, sub: str = "run", **overrides) -> tuple[Path, dict]:
    values = config_values(tmp / sub, **overrides)
    path = tmp / f"{sub}.json"
    path.write_text(json.dumps(values), encoding="utf-8")
    return path, values


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes: two equal trees mean nothing was written."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def checkpoints(out: Path) -> list[str]:
    """Every entry of the checkpoints folder (staging folders included), in step order."""
    return sorted((p.name for p in (out / "checkpoints").iterdir()), key=lambda n: (len(n), n))


def last_step(out: Path) -> int:
    return max(int(name.split("-")[1]) for name in checkpoints(out) if name.startswith("checkpoint-"))


def wait_for(predicate, proc: subprocess.Popen, what: str, limit_s: float = 300) -> None:
    """Poll `predicate` until it holds; fail (with the process's stderr) if the process ends first."""
    deadline = time.monotonic() + limit_s
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"the run exited (rc {proc.returncode}) before {what}:\n{proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {limit_s} s")
        time.sleep(0.05)


def logged(values: dict, message: str, min_step: int = 0) -> bool:
    path = Path(values["structured_logging"]["log_file"])
    if not path.is_file():
        return False
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record["message"] == message and (record.get("global_step") or 0) >= min_step:
            return True
    return False


def clean_error(stderr: str) -> str:
    """The one error message of a refused command (and no traceback). A progress bar left mid-line may precede
    it on its line."""
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = re.findall(r"error: .*", stderr)
    assert len(errors) == 1, stderr[-3000:]
    return errors[0]


# ------------------------------------------------------------------------- 1. no run is lost


def test_a_second_run_is_refused_and_keeps_the_first_until_asked_to_overwrite(tmp_path, autotune_cache, capsys):
    """The issue's reproduction: 25 steps saved every step (2 kept), then the same config with max_steps=3. The
    first run is a process of its own (its console is the user's); the second and third run in this one."""
    config, values = config_file(
        tmp_path, max_steps=5, save_every_n_steps=1, save_total_limit=2, enable_tensorboard=True
    )
    out, log = Path(values["output_dir"]), Path(values["structured_logging"]["log_file"])
    tensorboard = Path(values["log_dir"]) / "tensorboard"
    code, _, stderr = run_cli_process("train", "--config", str(config), timeout=300)
    assert code == 0, stderr[-3000:]
    first_id = summary_file(build_config(values))["run_id"]
    assert [p.name for p in tensorboard.iterdir()] == [first_id]  # a folder per run
    assert "pip install kernels" not in stderr  # bitsandbytes' hint for a kernel autotune never uses
    first, first_log = tree(out), log.read_bytes()
    assert checkpoints(out) == ["checkpoint-4", "checkpoint-5"]

    code, _, stderr = run_cli(capsys, "train", "--config", str(config), "--set", "max_steps=3")
    assert code == 2
    error = clean_error(stderr)
    assert f"output_dir {out} already holds a finished run (5 steps)" in error
    for way_out in ("--resume", "--set output_dir=", "--overwrite"):
        assert way_out in error
    assert tree(out) == first and log.read_bytes() == first_log  # nothing touched

    # --overwrite with an input that fails only once the new run is set up (its TensorBoard folder is a file):
    # refused before anything of the previous run is removed.
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("")
    code, _, stderr = run_cli(
        capsys, "train", "--config", str(config), "--set", f"tensorboard_log_dir={blocked}", "--overwrite"
    )
    assert code != 0 and tree(out) == first, stderr[-2000:]

    # --overwrite killed while it trains, before its first checkpoint: the previous run waits whole, moved aside,
    # and the next command holding the folder puts it back (the killed run's files and records go).
    killed = cli_process(
        "train", "--config", str(config), "--set", "max_steps=400", "--set", "save_every_n_steps=300", "--overwrite"
    )
    try:
        wait_for(lambda: _training_run_id(values) not in (None, first_id), killed, "the new run's first step")
        killed_id = _training_run_id(values)
        os.kill(killed.pid, signal.SIGKILL)
        killed.wait(timeout=60)
    finally:
        stop(killed)
    aside = out / ".autotune-replaced"
    assert (aside / "adapter_model.safetensors").read_bytes() == first["adapter_model.safetensors"]
    assert tree(aside / "checkpoints") == {k.removeprefix("checkpoints/"): v for k, v in first.items() if "/" in k}
    code, _, stderr = run_cli(capsys, "train", "--config", str(config), "--set", "max_steps=3")
    assert code == 2 and "the run it was to replace is back in place" in stderr, stderr[-2000:]
    assert tree(out) == first
    assert killed_id not in {r["run_id"] for r in read_jsonl(build_config(values))}

    code, stdout, stderr = run_cli(capsys, "train", "--config", str(config), "--set", "max_steps=3", "--overwrite")
    assert code == 0, stderr[-3000:]
    assert "training succeeded" in stdout
    assert checkpoints(out) == ["checkpoint-2", "checkpoint-3"]
    summary = summary_file(build_config(values))
    assert summary["final"]["global_step"] == 3
    # The replaced run's records left the log with it; the new run's are there once each.
    records = read_jsonl(build_config(values))
    ids = {r["run_id"] for r in records}
    # (beside them, the refused attempt's own record of its failure: it never owned the folder)
    assert first_id not in ids and summary["run_id"] in ids and len(ids) <= 2
    assert sorted(loss_by_step([r for r in records if r["run_id"] == summary["run_id"]])) == [1, 2, 3]
    # and its TensorBoard events: only the new run's curve is left to see
    assert [p.name for p in tensorboard.iterdir()] == [summary["run_id"]] != [first_id]


def _training_run_id(values: dict) -> str | None:
    """The run_id of the run that has logged a training step under the folder's running summary (None: none yet)."""
    try:
        summary = json.loads((Path(values["output_dir"]) / "run_summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if summary.get("status") != "running":
        return None
    log = Path(values["structured_logging"]["log_file"])
    lines = log.read_text(encoding="utf-8").splitlines() if log.is_file() else []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("run_id") == summary["run_id"] and record.get("message") == "metrics":
            return summary["run_id"]
    return None


def test_two_runs_cannot_share_a_folder_and_a_dead_runs_lock_is_taken_over(tmp_path, autotune_cache, capsys):
    """The first run is a process of its own (killed); the second and third run in this one."""
    config, values = config_file(tmp_path, max_steps=500, save_every_n_steps=2, eval_ratio=0.0)
    out = Path(values["output_dir"])
    first = cli_process("train", "--config", str(config))
    try:
        wait_for(lambda: (out / "checkpoints" / "checkpoint-2").is_dir(), first, "checkpoint-2")
        code, _, stderr = run_cli(capsys, "train", "--config", str(config))
        assert code == 2
        error = clean_error(stderr)
        assert f"output_dir {out} is in use by another `autotune train` (pid {first.pid} on " in error
        assert first.poll() is None  # the first run goes on
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=60)
    finally:
        stop(first)
    assert (out / ".autotune.lock").exists()  # a kill leaves the file, but not the lock
    # A save a kill cut short leaves a hidden staging folder; the next run holding the folder removes it.
    leftover = out / "checkpoints" / ".checkpoint-9.abcd.partial"
    leftover.mkdir()
    (leftover / "adapter_model.safetensors").write_bytes(b"half")
    killed = summary_file(build_config(values))  # written as training started: it says it never finished
    assert (killed["status"], killed["pid"]) == ("running", first.pid)
    code, _, stderr = run_cli(
        capsys, "train", "--config", str(config), "--resume", "--set", f"max_steps={last_step(out) + 1}"
    )
    assert code == 0, stderr[-3000:]
    assert f"took over the lock of a run that is no longer running (pid {first.pid} on" in stderr
    assert not leftover.exists()
    assert not (out / ".autotune.lock").exists()  # released at the end
    assert summary_file(build_config(values))["status"] == "succeeded"


def test_ctrl_c_saves_a_checkpoint_says_interrupted_and_resumes_exactly(tmp_path, autotune_cache, capsys):
    common = dict(max_steps=8, save_every_n_steps=100, lora_dropout=0.1, eval_ratio=0.0)
    config, values = config_file(tmp_path, "interrupted", **common)
    out = Path(values["output_dir"])
    proc = cli_process("train", "--config", str(config))
    try:
        wait_for(lambda: logged(values, "metrics", min_step=3), proc, "step 3")
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=300)
    finally:
        stop(proc)
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    summary = summary_file(build_config(values))
    assert summary["status"] == "interrupted" and "traceback" not in summary and "error" not in summary
    step = summary["final"]["global_step"]
    assert 3 <= step < 8
    # The checkpoint of the step it stopped at, whole; no adapter as if it had finished.
    assert summary["resume_from"] == str(out / "checkpoints" / f"checkpoint-{step}")
    assert (out / "checkpoints" / f"checkpoint-{step}" / "trainer_state.json").is_file()
    assert not (out / "adapter_model.safetensors").exists()
    assert read_jsonl(build_config(values))[-1]["message"] == "run interrupted"
    (command,) = [line.removeprefix("resume with: ") for line in stderr.splitlines() if line.startswith("resume with")]
    assert command == shlex.join(["autotune", "train", "--config", str(config), "--resume"])

    code, _, stderr = run_cli(capsys, *shlex.split(command)[1:])  # the printed command, run in this process
    assert code == 0, stderr[-3000:]
    baseline = build_config(config_values(tmp_path / "uninterrupted", **common))
    train(baseline, **QUIET)
    records = read_jsonl(build_config(values))
    steps = [r["global_step"] for r in records if r["message"] == "metrics" and "loss" in r["metrics"]]
    assert steps == list(range(1, 9))  # each step once
    assert loss_by_step(records) == loss_by_step(read_jsonl(baseline))  # exactly the uninterrupted run


def test_resume_with_changed_shape_settings_is_refused_and_writes_nothing(make_cfg):
    cfg = make_cfg(max_steps=2, save_every_n_steps=1, eval_ratio=0.0)
    train(cfg, **QUIET)
    out, log = Path(cfg.output_dir), Path(cfg.structured_logging.log_file)
    before, log_before = tree(out), log.read_bytes()
    values = cfg.to_dict()
    for change, said in [
        (dict(lora_r=8), "lora_r 4 -> 8"),
        (dict(target_modules=["q_proj", "k_proj", "v_proj"]), "target_modules ['q_proj', 'v_proj'] -> "),
        (dict(quantization="8bit"), "quantization 'none' -> '8bit'"),
        (dict(model_name="Qwen3-0.6B"), "model_name 'tiny-qwen3' -> 'Qwen3-0.6B'"),
    ]:
        changed = build_config({**values, **change, "max_steps": 4})
        with pytest.raises(UserError) as caught:
            train(changed, resume=True, **QUIET)
        message = str(caught.value)
        assert message.startswith(f"--resume: {out / 'checkpoints' / 'checkpoint-2'} was trained with other")
        assert said in message and "--set" in message and "--overwrite" in message
        assert tree(out) == before and log.read_bytes() == log_before
    # What does not shape the tensors may change.
    resumed = train(build_config({**values, "max_steps": 3, "learning_rate": 5e-3}), resume=True, **QUIET)
    assert resumed["status"] == "succeeded" and resumed["final"]["global_step"] == 3


def test_resume_and_overwrite_together_are_refused(make_cfg):
    with pytest.raises(UserError, match="--resume and --overwrite contradict"):
        train(make_cfg(), resume=True, overwrite=True, **QUIET)


def test_a_run_that_failed_before_its_first_checkpoint_is_not_a_run_to_keep(make_cfg, tmp_path):
    empty = tmp_path / "nothing"
    empty.mkdir()
    (empty / "notes.md").write_text("no pairs here\n", encoding="utf-8")
    cfg = make_cfg(data_dir=str(empty))
    with pytest.raises(UserError, match="no QA pairs"):
        train(cfg, **QUIET)
    assert summary_file(cfg)["status"] == "failed"
    fixed = build_config({**cfg.to_dict(), "data_dir": str(write_qa(tmp_path / "qa", PAIRS)), "max_steps": 1})
    assert train(fixed, **QUIET)["status"] == "succeeded"  # nothing of value was there: no refusal


# ------------------------------------------------------------------------------ the full disk


def test_the_free_space_is_checked_before_each_save(tmp_path, small_disk, autotune_cache, capsys):
    # A checkpoint here is ~19 MB (the tokenizer's 18.7 MB dominate); 100 MiB holds four and a reserve.
    disk = small_disk(100)
    config, values = config_file(
        tmp_path, max_steps=8, save_every_n_steps=1, save_total_limit=10, eval_ratio=0.0, output_dir=str(disk / "out")
    )
    code, _, stderr = run_cli(capsys, "train", "--config", str(config))
    assert code == 2
    error = clean_error(stderr)
    out = disk / "out"
    saved = checkpoints(out)
    assert saved and all((out / "checkpoints" / name / "trainer_state.json").is_file() for name in saved)
    step = last_step(out) + 1
    assert f"error: not enough disk space for checkpoint-{step}:" in error
    assert f"the last good checkpoint is {out / 'checkpoints' / saved[-1]}" in error and "--resume" in error
    summary = summary_file(build_config(values))
    assert summary["status"] == "failed" and summary["error"] == error.removeprefix("error: ")


def test_a_disk_that_fills_during_a_save_leaves_no_half_checkpoint(tmp_path, small_disk, make_cfg, monkeypatch):
    """The free-space check is switched off (the one thing changed), so the disk really fills mid-save."""
    import autotune.checkpoint

    monkeypatch.setattr(autotune.checkpoint, "check_free_space", lambda *args: None)
    disk = small_disk(50)  # two checkpoints of ~19 MB fit, the third does not
    cfg = make_cfg(max_steps=6, save_every_n_steps=1, save_total_limit=10, eval_ratio=0.0, output_dir=str(disk / "out"))
    with pytest.raises(UserError) as caught:
        train(cfg, **QUIET)
    out = disk / "out"
    good = out / "checkpoints" / "checkpoint-2"
    message = str(caught.value)
    assert message.startswith(f"the disk holding {out / 'checkpoints'} is full: checkpoint-3 could not be written")
    assert f"the last good checkpoint is {good}" in message
    assert checkpoints(out) == ["checkpoint-1", "checkpoint-2"]  # no half-written checkpoint-3, no staging
    assert (good / "trainer_state.json").is_file()
    summary = summary_file(cfg)  # the failed save's staging is gone, so the summary fits: not a stale one
    assert summary["status"] == "failed" and summary["error"] == message


# ----------------------------------------------------------------------------- clean errors


def test_a_profile_solved_for_another_architecture_is_refused_naming_both(make_cfg):
    from autotune.catalog import resolve_model
    from autotune.profile import architecture_hash

    cfg = make_cfg(max_steps=1)
    other = resolve_model("Qwen3-0.6B")
    profile = tiny_profile()
    profile["model"] = {"name": "Qwen3-0.6B", "architecture_hash": architecture_hash(other.architecture)}
    with pytest.raises(UserError) as caught:
        train(cfg, profile=profile, **QUIET)
    message = str(caught.value)
    assert "solved for model 'Qwen3-0.6B' but the config trains 'tiny-qwen3', another architecture" in message
    assert "autotune solve --model tiny-qwen3" in message
    assert not Path(cfg.output_dir).exists()  # refused before anything was written


def test_profile_and_model_mismatches_name_both_models():
    import dataclasses

    from autotune.catalog import resolve_model
    from autotune.profile import architecture_hash, model_mismatch

    tiny = resolve_model("tiny-qwen3").architecture
    profile = tiny_profile()
    profile["model"] = {"name": "my-copy-of-tiny", "architecture_hash": architecture_hash(tiny)}
    message, other_arch = model_mismatch(profile, "tiny-qwen3", tiny)
    assert not other_arch and "'my-copy-of-tiny' but the config trains 'tiny-qwen3'" in message
    # The same name, but the architecture changed under it (a local folder's config.json edited): said once,
    # with what changed, instead of "solved for X ... trains X".
    wider = dataclasses.replace(tiny, hidden_size=128)
    profile["model"] = {
        "name": "tiny-qwen3",
        "architecture_hash": architecture_hash(wider),
        "architecture": dataclasses.asdict(wider),
    }
    message, other_arch = model_mismatch(profile, "tiny-qwen3", tiny)
    assert other_arch and "'tiny-qwen3' now has another architecture (hidden_size 128 -> 64)" in message


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_every_file_a_run_writes_keeps_the_umask(make_cfg, umask):
    from autotune.profile import save_profile

    cfg = make_cfg(max_steps=2, save_every_n_steps=1, enable_inference_test=True, inference_samples=1)
    cfg = build_config({**cfg.to_dict(), "inference_max_new_tokens": 4})
    previous = os.umask(umask)
    try:
        save_profile(tiny_profile(), Path(cfg.output_dir).parent / "profile.json")
        train(cfg, profile=tiny_profile(), **QUIET)
    finally:
        os.umask(previous)
    roots = [Path(cfg.output_dir), Path(cfg.data_cache_dir), Path(cfg.structured_logging.log_file).parent]
    files = [p for root in roots for p in root.rglob("*")] + [Path(cfg.output_dir).parent / "profile.json"]
    assert any(p.name == "adapter_model.safetensors" for p in files)
    for path in files:
        mode = stat.S_IMODE(path.stat().st_mode)
        want = (0o777 if path.is_dir() else 0o666) & ~umask
        assert mode == want, f"{path}: {oct(mode)}, the umask gives {oct(want)}"


def test_a_hub_id_without_network_fails_at_once_with_what_to_do(tmp_path, autotune_cache):
    """No network here either way; HF_ENDPOINT points at a closed local port so the test does not depend on
    how this sandbox fails DNS. Without the one connection check, transformers retried for ~53 s and then
    said only that it could not connect."""
    config, _ = config_file(tmp_path, max_steps=1)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf-home"), TOKENIZERS_PARALLELISM="false")
    for sets, what in [
        (["tokenizer_name=null"], "tokenizer"),  # the tokenizer is loaded first, with the data
        (["init=pretrained"], "model"),  # the offline tokenizer, then the weights
    ]:
        args = ["train", "--config", str(config), "--set", "model_name=Qwen/Qwen3-0.6B", "--set", *sets]
        done = subprocess.run(
            [sys.executable, "-m", "autotune.cli", *args],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 2, done.stderr[-3000:]
        error = clean_error(done.stderr)
        assert f"{what} 'Qwen/Qwen3-0.6B' is not in the local Hugging Face cache and the hub cannot be reached" in error
        assert "127.0.0.1:9" in error and "HF_HUB_OFFLINE=1" in error and "hf download Qwen/Qwen3-0.6B" in error


def test_only_bitsandbytes_kernels_hint_is_silenced(caplog):
    import autotune.quiet  # noqa: F401  (installed on import)

    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING, logger="bitsandbytes.backends.cpu.ops"):
        logger.warning(
            "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already "
            "`pip install kernels` and the kernels >= 0.11.1",
            "No module named 'kernels'",
        )
        logger.warning("some other bitsandbytes warning")
    assert [r.getMessage() for r in caplog.records] == ["some other bitsandbytes warning"]


def test_one_logged_loss_is_not_shown_as_a_change(tmp_path, autotune_cache, capsys):
    config, _ = config_file(tmp_path, max_steps=1)
    code, stdout, stderr = run_cli(capsys, "train", "--config", str(config))
    assert code == 0, stderr[-3000:]
    assert "1 steps, loss " in stdout and "(one logged step)" in stdout and " -> " not in stdout


# --------------------------------------------------------------------- evaluation apart from training


class InjectEvalOOM(TrainerCallback):
    """Faked, as a CPU cannot run out of device memory: an evaluation forward of more than `fits` rows raises
    the OOM a GPU would (InjectOOM, in tests/faults.py, does the same for training steps)."""

    def __init__(self, fits: int):
        self.fits, self.raised = fits, 0
        self._handle = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        def hook(module, args, kwargs):
            n = samples(kwargs)  # not rows: packing puts a micro-batch's samples in one row
            if not module.training and n > self.fits:
                self.raised += 1
                raise torch.OutOfMemoryError(f"injected OOM in evaluation ({n} samples)")

        if self._handle is None:
            self._handle = model.register_forward_pre_hook(hook, with_kwargs=True)


def test_an_evaluation_oom_shrinks_the_evaluation_batch_never_the_training_one(make_cfg):
    common = dict(batch_size=2, max_steps=4, save_every_n_steps=2, eval_ratio=0.3, lora_dropout=0.0)
    cfg = make_cfg("oom", **common)
    fault = InjectEvalOOM(fits=1)
    summary = train(cfg, extra_callbacks=[fault], **QUIET)
    assert summary["status"] == "succeeded" and fault.raised == 1
    assert summary["oom_recoveries"] == []  # the training micro-batch never moved
    (change,) = summary["eval_oom_recoveries"]
    assert change["at_step"] == 2 and change["eval_batch_size"] == [2, 1]
    records = read_jsonl(cfg)
    starts = [
        (r["batch_size"], r["gradient_accumulation_steps"]) for r in records if r["message"] == "training started"
    ]
    assert starts == [(2, 1)]
    assert [r["global_step"] for r in records if r["message"] == "evaluation"] == [2, 4]
    assert any(r["component"] == "oom" and "eval_batch_size 2 -> 1" in r["message"] for r in records)
    # Training itself is untouched: the same losses as a run whose evaluation never ran out of memory.
    baseline = make_cfg("baseline", **common)
    train(baseline, **QUIET)
    assert loss_by_step(records) == loss_by_step(read_jsonl(baseline))
    assert summary["final"]["eval_loss"] is not None


def test_evaluation_that_never_fits_is_dropped_and_training_goes_on(make_cfg):
    cfg = make_cfg(batch_size=2, max_steps=4, save_every_n_steps=2, eval_ratio=0.3)
    summary = train(cfg, extra_callbacks=[InjectEvalOOM(fits=0)], **QUIET)
    assert summary["status"] == "succeeded" and summary["final"]["global_step"] == 4
    assert [c["eval_batch_size"] for c in summary["eval_oom_recoveries"]] == [[2, 1], [1, None]]
    assert summary["oom_recoveries"] == [] and summary["final"]["eval_loss"] is None


# ----------------------------------------------------------------------------- the memory watchdog


def test_memory_creeping_past_the_solved_budget_is_warned_once_saying_what_grew(make_cfg, monkeypatch):
    """Faked: only the readings (a CPU has no CUDA allocator); the watchdog, the run and the log are real."""
    import autotune.watchdog as watchdog

    GiB = 2**30
    readings = iter(
        [watchdog.MemoryReading(int((0.90 + 0.04 * max(0, n - 2)) * GiB), int(0.70 * GiB)) for n in range(1, 9)]
    )
    monkeypatch.setattr(watchdog, "read_memory", lambda: next(readings))
    profile = tiny_profile()
    profile["measurement"] = {"peak_bytes": int(0.85 * GiB)}
    profile["constraints"] = {"max_memory_gb": 1.0, "margin": 0.05}
    said: list[str] = []
    cfg = make_cfg(max_steps=8, eval_ratio=0.0)
    summary = train(cfg, profile=profile, echo=said.append)
    # 0.90, 0.90, 0.94, 0.98, 1.02 GiB: the 4th step passes the line every trial of the solve was held to, the
    # budget less its margin (0.95 GiB); warned there, and only there.
    (warning,) = [r for r in read_jsonl(cfg) if r["component"] == "memory"]
    assert warning["level"] == "WARNING"
    assert "memory is creeping up: at step 4 the process holds 0.98 GiB" in warning["message"]
    assert "past the solved budget, 1 GiB less a 5% margin (0.95 GiB)" in warning["message"]
    assert "the allocator's cache grew by 0.08 GiB while live tensors grew by 0.00 GiB" in warning["message"]
    assert [m for m in said if "memory is creeping up" in m] == [f"warning: {warning['message']}"]
    assert summary["memory_warnings"] == [warning["message"]] and summary["status"] == "succeeded"


def test_growing_live_tensors_are_named_as_such():
    from autotune.watchdog import MemoryReading, MemoryWatchdog

    GiB = 2**30
    warned: list[str] = []
    readings = iter(
        [MemoryReading(GiB, GiB // 2), MemoryReading(GiB, GiB // 2), MemoryReading(2 * GiB, GiB + GiB // 2)]
    )
    dog = MemoryWatchdog(
        int(1.5 * GiB), "max_memory_gb 1.5", lambda m, _: warned.append(m), read=lambda: next(readings)
    )
    for step in (1, 2, 3):
        dog.on_step_end(None, type("S", (), {"global_step": step})(), None)
    (message,) = warned
    assert "live tensors grew by 1.00 GiB (allocated 0.50 GiB -> 1.50 GiB)" in message


def test_the_watchdog_limit_comes_from_the_profile_else_the_budget():
    from autotune.watchdog import limit_for

    GiB = 2**30
    profile = {"measurement": {"peak_bytes": 10 * GiB}, "constraints": {"max_memory_gb": 12.0, "margin": 0.1}}
    assert limit_for(profile, 16.0) == (int(12 * GiB * 0.9), "the solved budget, 12 GiB less a 10% margin")
    assert limit_for({"constraints": {}}, 16.0) == (int(16 * GiB * 0.95), "max_memory_gb, 16 GiB less a 5% margin")
    assert limit_for(None, 16.0)[0] == int(16 * GiB * 0.95)
    assert limit_for(None, None) is None


# ------------------------------------------------------------------------------------ the demo


def test_the_demo_refuses_a_folder_holding_someone_elses_run(tmp_path, capsys):
    out = tmp_path / "real-run"
    (out / "checkpoints" / "checkpoint-100").mkdir(parents=True)
    (out / "autotune_config.json").write_text(json.dumps({"model_name": "Qwen3-8B", "init": "pretrained"}))
    before = tree(out)
    code, _, stderr = run_cli(capsys, "demo", "--output-dir", str(out))
    assert code == 2
    error = clean_error(stderr)
    assert f"--output-dir {out} already holds a run with checkpoints up to step 100, not a demo's" in error
    assert tree(out) == before


def test_the_demo_visibly_learns(tmp_path, autotune_cache, capsys):
    """`autotune demo` end to end (probe, solve, train, inference report) offline on the CPU: its loss at least
    halves, and the tuned model reproduces tokens of answers it was trained on, which the base model does not. In
    this process (the command's own entry point): a process of its own would only add its imports."""
    out = tmp_path / "demo"
    code, stdout, stderr = run_cli(capsys, "demo", "--output-dir", str(out))
    assert code == 0, stderr[-3000:]
    assert "Traceback" not in stderr and "pip install kernels" not in stderr
    final = json.loads((out / "run_summary.json").read_text(encoding="utf-8"))["final"]
    assert final["last_loss"] <= final["first_loss"] / 2, final
    report = json.loads((out / "inference_report.json").read_text(encoding="utf-8"))
    assert report["trained_samples"] and report["samples"]  # trained-on and held-out questions, side by side
    assert report["trained_token_match"]["tuned"] > report["trained_token_match"]["base"]
    assert "memorisation by a tiny random model" in stdout  # the report, printed, says what it shows
