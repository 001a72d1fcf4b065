"""The `autotune` CLI's config commands: validate, profiles, probe; in-process and as the real console script."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO
from helpers.cli import run_cli

from autotune import hardware
from autotune.config import Config

PRESETS = sorted((REPO / "profiles").glob("*/*.json"))


def write(path: Path, doc) -> Path:
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------- validate


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_preset_validates(capsys, path):
    code, out, err = run_cli(capsys, "validate", str(path), "--json")
    assert (code, err) == (0, "")
    doc = json.loads(out)
    assert set(doc["config"]) == set(Config().to_dict())
    assert doc["hardware"] is None


def test_validate_defaults_prints_every_key(capsys):
    code, out, _err = run_cli(capsys, "validate")
    assert code == 0 and out.startswith("config OK: (defaults)")
    for key in Config().to_dict():
        assert f"  {key} " in out


def test_validate_json_with_set(capsys, tmp_path):
    path = write(tmp_path / "c.json", {"base_config": "hardware/8gb", "overrides": {"lora_r": 2}})
    code, out, _ = run_cli(
        capsys, "validate", str(path), "--json", "--set", "batch_size=2", "--set", "structured_logging.log_level=DEBUG"
    )
    assert code == 0
    cfg = json.loads(out)["config"]
    assert (cfg["batch_size"], cfg["lora_r"], cfg["max_memory_gb"]) == (2, 2, 7.5)
    assert cfg["structured_logging"]["log_level"] == "DEBUG"


def test_validate_errors_exit_2_with_every_error_and_no_traceback(capsys, tmp_path):
    path = write(tmp_path / "bad.json", {"batchsize": 4, "lora_r": 0, "model_name": "Qwen3-7B"})
    code, out, err = run_cli(capsys, "validate", str(path))
    assert code == 2 and out == ""
    assert err.startswith("error: ")
    assert "did you mean 'batch_size'?" in err and "'lora_r'" in err and "Qwen3-8B" in err
    assert len(err.strip().splitlines()) == 3
    assert "Traceback" not in err


def test_validate_malformed_json(capsys, tmp_path):
    path = write(tmp_path / "bad.json", '{"batch_size": 4,,}')
    code, _, err = run_cli(capsys, "validate", str(path))
    assert code == 2 and f"error: {path.resolve()}:1:18: malformed JSON" in err


def test_validate_missing_file(capsys, tmp_path):
    code, _, err = run_cli(capsys, "validate", str(tmp_path / "nope.json"))
    assert code == 2 and "config file not found" in err


def test_validate_bad_set(capsys):
    code, _, err = run_cli(capsys, "validate", "--set", "batch_size")
    assert code == 2 and "expected key=value" in err
    code, _, err = run_cli(capsys, "validate", "--set", "bach_size=2")
    assert code == 2 and "did you mean 'batch_size'?" in err


def test_validate_hardware_against_this_machine(capsys):
    code, out, _ = run_cli(capsys, "validate", "--hardware", "--json")
    assert code == 0
    findings = json.loads(out)["hardware"]
    assert isinstance(findings, list)
    if not hardware.probe()["gpus"]:
        assert findings[0]["level"] == "warning"


def test_validate_hardware_errors_exit_2(capsys, monkeypatch):
    small = {
        "index": 0,
        "name": "RTX 3060",
        "memory_total_gb": 12.0,
        "memory_free_gb": 11.5,
        "bf16_supported": True,
        "compute_capability": "8.6",
        "error": None,
    }
    monkeypatch.setattr(
        hardware,
        "probe",
        lambda output_dir=".", nvml=None: {"gpus": [small], "host": {"disk_free_gb": 100.0, "disk_path": "/"}},
    )
    code, out, err = run_cli(capsys, "validate", "--hardware", "--set", "max_memory_gb=20")
    assert code == 2
    assert "ERROR" in out and "1 hardware problem(s)" in err and "max_memory_gb 20 exceeds GPU 0" in err
    code, out, err = run_cli(capsys, "validate", "--hardware", "--set", "max_memory_gb=10")
    assert code == 0 and "max_memory_gb 10 fits GPU 0" in out and err == ""


# ---------------------------------------------------------------------------------- profiles


def test_profiles_list(capsys):
    code, out, _ = run_cli(capsys, "profiles", "list", "--json")
    assert code == 0
    items = json.loads(out)
    assert {i["name"] for i in items} == {f"{p.parent.name}/{p.stem}" for p in PRESETS}
    assert all(set(i) == {"name", "kind", "path", "description"} for i in items)
    code, out, _ = run_cli(capsys, "profiles", "list")
    assert code == 0 and "hardware/16gb" in out and "Guide tier: 16 GB cards." in out


@pytest.mark.parametrize("name", ["hardware/16gb", "16gb", "16gb.json"])
def test_profiles_show(capsys, name):
    code, out, _ = run_cli(capsys, "profiles", "show", name)
    assert code == 0
    header, body = out.split("\n", 1)
    assert header == f"# {REPO / 'profiles' / 'hardware' / '16gb.json'}"
    assert json.loads(body) == json.loads((REPO / "profiles" / "hardware" / "16gb.json").read_text())


def test_profiles_show_unknown(capsys):
    code, out, err = run_cli(capsys, "profiles", "show", "hardware/99gb")
    assert code == 2 and out == "" and "no preset named 'hardware/99gb'" in err


def test_unknown_command_exits_2(capsys):
    code, _, err = run_cli(capsys, "valdate")
    assert code == 2 and "No such command" in err


# --------------------------------------------------------------------- the real console script


def autotune_exe() -> str:
    exe = Path(sys.executable).parent / "autotune"
    return str(exe) if exe.exists() else shutil.which("autotune")


def sh(*argv, cwd=REPO) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    return subprocess.run([autotune_exe(), *argv], cwd=cwd, capture_output=True, text=True, timeout=60, env=env)


def test_console_script_validate():
    res = sh("validate", "profiles/configs/default.json", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["config"] == Config().to_dict()


def test_console_script_validate_bad_file(tmp_path):
    bad = write(tmp_path / "bad.json", {"learning_rate": "fast", "lora_dropout": 3})
    res = sh("validate", str(bad))
    assert res.returncode == 2
    assert res.stderr.startswith("error:")
    assert "'learning_rate'" in res.stderr and "'lora_dropout'" in res.stderr
    assert "Traceback" not in res.stderr + res.stdout


def test_console_script_profiles_list():
    res = sh("profiles", "list", "--json")
    assert res.returncode == 0, res.stderr
    assert "hardware/16gb" in {i["name"] for i in json.loads(res.stdout)}


def test_console_script_probe(tmp_path):
    res = sh("probe", "--json", "--save", str(tmp_path / "p.json"), "--output-dir", str(tmp_path))
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert {"gpus", "host"} <= set(doc)
    if not Path("/dev/nvidiactl").exists():
        assert doc["gpus"] == []  # no GPU on the test machine
    saved = json.loads((tmp_path / "p.json").read_text())
    assert saved["gpus"] == doc["gpus"] and saved["host"]["disk_path"] == str(tmp_path)
    assert saved["kind"] == doc["kind"]


@pytest.mark.parametrize(
    "argv",
    [
        ("estimate", "--model", "Qwen3-8B", "--max-memory-gb", "nan"),
        ("estimate", "--model", "Qwen3-8B", "--max-memory-gb", "inf"),
        ("estimate", "--model", "Qwen3-8B", "--margin", "nan"),
        ("estimate", "--model", "Qwen3-8B", "--host-ram-gb", "inf"),
        ("solve", "--max-memory-gb", "nan"),
        ("solve", "--time-budget", "nan"),
    ],
    ids=lambda a: " ".join(a[-2:]),
)
def test_a_float_flag_that_is_not_a_finite_number_is_one_clear_error(capsys, argv):
    """click's float range lets nan through (and inf without an upper bound): a traceback, or `--time-budget nan`
    silently meaning no budget. Every float flag is a finite number or exit 2."""
    code, _out, err = run_cli(capsys, *argv)
    assert code == 2 and "is not a finite number" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "sets,message",
    [
        (["separator="], "separator: must be a non-empty string"),
        (["question_pattern=(["], "question_pattern: invalid regular expression"),
        (["model_name=Qwen3-8B", "lm_head_8bit=on", "fused_loss=off"], 'lm_head_8bit "on" needs fused_loss'),
        (["model_name=Qwen3-0.6B", "embedding_on_cpu=on"], "ties its input embeddings to lm_head"),
        (["data_dir=/no/such/folder"], "data_dir '/no/such/folder' does not exist"),
        (["tokenizer_name=/no/such/tokenizer"], "tokenizer directory '/no/such/tokenizer' does not exist"),
        (["tensorboard_log_dir={file}"], "tensorboard_log_dir '{file}' is a file, not a folder"),
        (["output_dir={file}/run"], "output_dir '{file}/run' is under {file}, which is a file"),
    ],
    ids=[
        "empty-separator",
        "bad-regex",
        "int8-head-without-fused-loss",
        "host-embedding-on-a-tied-model",
        "no-data-folder",
        "no-tokenizer-folder",
        "tensorboard-folder-a-file",
        "output-under-a-file",
    ],
)
def test_validate_refuses_what_train_refuses_by_the_config(capsys, tmp_path, sets, message):
    """`validate` said "config OK" to values train refused after 12-19 s of preparation (and a missing data or
    tokenizer folder, or a folder that is a file, after 9-13 s, leaving a failed run summary); both run the same
    checks (preflight.check_run_config) now, validate without importing torch."""
    file = tmp_path / "a-file"
    file.write_text("")
    sets, message = [s.format(file=file) for s in sets], message.format(file=file)
    argv = [a for s in sets for a in ("--set", s)]
    code, out, err = run_cli(capsys, "validate", *argv)
    assert code == 2 and "config OK" not in out and message in err and "Traceback" not in err


@pytest.mark.parametrize(
    "values, says",
    [
        ({"optimizer": "adamw_nope"}, "is not an HF Trainer name"),
        ({"model_name": "Qwen3-8B", "lm_head_8bit": "on", "fused_loss": "off"}, 'lm_head_8bit "on" needs fused_loss'),
    ],
)
def test_train_refuses_what_validate_refuses_before_importing_the_training_stack(tmp_path, values, says):
    """A config train refuses by its values alone is refused before transformers, peft or the model load (in a third
    of a second, where it took 11-13 s of imports), with validate's message, and nothing is written."""
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"model_name": "tiny-qwen3", "output_dir": str(tmp_path / "out"), **values}))
    done = _refused_in_a_fresh_process(["train", "--config", str(config)], ("transformers", "peft", "autotune.runner"))
    assert says in done.stderr
    assert not (tmp_path / "out").exists()


def _refused_in_a_fresh_process(argv: list[str], heavy: tuple[str, ...]) -> subprocess.CompletedProcess:
    """`autotune ARGV` in a fresh interpreter, asserted to exit 2 without having imported any of `heavy`."""
    probe = (
        "import json, sys\nfrom autotune.cli import main\n"
        "try:\n    main(json.loads(sys.argv[1]))\n"
        "except SystemExit as exc:\n"
        "    loaded = [m for m in json.loads(sys.argv[2]) if m in sys.modules]\n"
        "    print('exit', exc.code, 'heavy', loaded)\n"
    )
    args = [sys.executable, "-c", probe, json.dumps(argv), json.dumps(heavy)]
    done = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert "exit 2 heavy []" in done.stdout, (done.stdout, done.stderr[-2000:])
    return done


@pytest.mark.parametrize("made", ["nothing", "empty folder", "config only", "unfinished run", "finished, --out taken"])
def test_export_refuses_a_folder_that_is_no_run_before_importing_the_export_stack(tmp_path, made):
    """`autotune export` of a wrong folder, an unfinished run or to an --out it may not replace took 6-9 s of torch
    and bitsandbytes imports to say so; its checks of files now run first (run_files, checkpoint.require_finished),
    and the message names what is wrong."""
    run = tmp_path / "run"
    if made != "nothing":
        run.mkdir()
    if made == "config only":
        (run / "autotune_config.json").write_text("{}")
    if made in ("unfinished run", "finished, --out taken"):  # a run's files; killed: its summary says "running"
        for name in ("adapter_model.safetensors", "adapter_config.json", "autotune_config.json"):
            (run / name).write_text("{}")
        status = "running" if made == "unfinished run" else "succeeded"
        (run / "run_summary.json").write_text(json.dumps({"status": status}))
        (run / "checkpoints" / "checkpoint-8").mkdir(parents=True)
        (run / "checkpoints" / "checkpoint-8" / "trainer_state.json").write_text("{}")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "mine.txt").write_text("the user's")
    argv = ["export", str(run), *(["--out", str(taken), "--overwrite"] if made == "finished, --out taken" else [])]
    done = _refused_in_a_fresh_process(argv, ("torch", "transformers", "autotune.export"))
    said = {
        "nothing": "no such run folder",
        "unfinished run": "has not finished (its run_summary.json says 'running'); its newest checkpoint is at step 8",
        "finished, --out taken": "the folder holds files that are not an autotune export (mine.txt)",
    }.get(made, "no adapter_model.safetensors")
    assert said in done.stderr and "Traceback" not in done.stderr


def test_fsdp_on_a_machine_without_a_gpu_is_refused_by_train_at_once_and_by_validate_with_hardware(tmp_path, capsys):
    """This machine has no GPU that NVML sees (the tests' premise; GPU machines skip): `train --strategy fsdp` was
    refused after 9 s of imports, leaving a failed run summary; now before anything, and `validate --hardware` says
    it (plain validate judges the config, not the machine)."""
    from autotune.hardware import probe_gpus

    if probe_gpus()[0]:
        pytest.skip("a GPU is visible: FSDP can run here")
    out = tmp_path / "out"
    sets = ["--set", "distributed_strategy=fsdp", "--set", f"output_dir={out}"]
    code, _, err = run_cli(capsys, "train", *sets)
    assert code == 2 and "distributed_strategy fsdp needs CUDA GPUs" in err and not out.exists()
    code, out_text, _ = run_cli(capsys, "validate", *sets)
    assert code == 0 and "config OK" in out_text
    code, _, err = run_cli(capsys, "validate", "--hardware", *sets)
    assert code == 2 and "distributed_strategy fsdp needs CUDA GPUs" in err
