"""YAML configs: the same schema, inheritance and messages as JSON; a syntax error names file:line:column."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO
from helpers.cli import run_cli

from autotune.config import explicit_keys, load_config
from autotune.errors import UserError

JSON_TWIN = {
    "base_config": "hardware/16gb",
    "overrides": {
        "lora_r": 16,
        "learning_rate": 5e-5,
        "target_modules": ["q_proj", "v_proj"],
        "structured_logging": {"log_level": "DEBUG"},
        "system_prompt": "Be brief: 简洁.",
        "max_steps": None,
    },
}
YAML_TWIN = """\
# the same config as JSON_TWIN, with the comments JSON cannot have
base_config: hardware/16gb
overrides:
  lora_r: 16
  learning_rate: 5e-5        # YAML 1.1 would read this as a string; it is a number, as in JSON
  target_modules: [q_proj, v_proj]
  structured_logging:
    log_level: DEBUG
  system_prompt: "Be brief: 简洁."
  max_steps: null
"""


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def error_of(path: Path) -> str:
    with pytest.raises(UserError) as info:
        load_config(path)
    return str(info.value)


@pytest.mark.parametrize("suffix", [".yaml", ".yml"])
def test_yaml_config_equals_its_json_twin(tmp_path, suffix):
    from_json = load_config(write(tmp_path / "c.json", json.dumps(JSON_TWIN)))
    from_yaml = load_config(write(tmp_path / f"c{suffix}", YAML_TWIN))
    assert from_yaml == from_json
    assert from_yaml.learning_rate == 5e-5 and from_yaml.lora_r == 16
    assert from_yaml.structured_logging.log_level == "DEBUG" and from_yaml.batch_size == from_json.batch_size
    assert explicit_keys(tmp_path / f"c{suffix}") == explicit_keys(tmp_path / "c.json")


def test_inheritance_mixes_yaml_and_json(tmp_path):
    write(tmp_path / "base.json", json.dumps({"base_config": "mid.yaml", "batch_size": 2}))
    write(tmp_path / "mid.yaml", "base_config: hardware/8gb\nlora_alpha: 24\n")
    cfg = load_config(write(tmp_path / "top.yml", "base_config: base.json\noverrides:\n  lora_r: 12\n"))
    assert (cfg.batch_size, cfg.lora_alpha, cfg.lora_r) == (2, 24, 12)
    write(tmp_path / "a.yaml", "base_config: b.yaml\n")
    write(tmp_path / "b.yaml", "base_config: a.yaml\n")
    assert "base_config cycle" in error_of(tmp_path / "a.yaml")


def test_value_errors_match_the_json_twin(tmp_path):
    bad = {"lora_r": 0, "quantisation": "4bit", "learning_rate": "fast", "fp16": True, "bf16": True}
    from_json = error_of(write(tmp_path / "c.json", json.dumps(bad)))
    yaml_path = write(
        tmp_path / "c.yaml", "lora_r: 0\nquantisation: 4bit\nlearning_rate: fast\nfp16: true\nbf16: true\n"
    )
    from_yaml = error_of(yaml_path)
    assert from_yaml.replace(str(yaml_path), "FILE") == from_json.replace(str(tmp_path / "c.json"), "FILE")
    assert "did you mean 'quantization'" in from_yaml and "'lora_r': value 0 is not allowed" in from_yaml


@pytest.mark.parametrize(
    ("text", "line", "column"),
    [
        ("lora_r: 8\nbatch_size: [1, 2\n", 3, 1),  # unclosed flow sequence
        ("lora_r: 8\n  batch_size: 2\n", 2, 13),  # bad indentation
        ('system_prompt: "open\n', 2, 1),  # unclosed quote
    ],
)
def test_syntax_error_names_file_line_and_column(tmp_path, text, line, column):
    path = write(tmp_path / "c.yaml", text)
    msg = error_of(path)
    assert msg.startswith(f"{path.resolve()}:{line}:{column}: malformed YAML: ")
    assert "\n" not in msg


@pytest.mark.parametrize(("text", "kind"), [("", "NoneType"), ("- a\n- b\n", "list"), ("just text\n", "str")])
def test_top_level_must_be_a_mapping(tmp_path, text, kind):
    assert f"a config must be a YAML mapping, got {kind}" in error_of(write(tmp_path / "c.yaml", text))


def test_yaml_never_builds_python_objects(tmp_path):
    msg = error_of(write(tmp_path / "c.yaml", "lora_r: !!python/object/apply:os.getcwd []\n"))
    assert "malformed YAML" in msg and "python/object/apply" in msg


def test_cli_validates_yaml(tmp_path, capsys):
    path = write(tmp_path / "c.yaml", YAML_TWIN)
    code, out, _ = run_cli(capsys, "validate", str(path), "--json")
    assert code == 0 and json.loads(out)["config"]["lora_r"] == 16
    bad = write(tmp_path / "bad.yaml", "lora_r: [\n")
    code, out, err = run_cli(capsys, "validate", str(bad))
    assert code == 2 and out == "" and err.startswith(f"error: {bad.resolve()}:2:1: malformed YAML")
    assert "Traceback" not in err


def test_importing_config_does_not_import_yaml():
    code = "import sys, autotune.config; print('yaml' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "False"


def test_the_switches_on_and_off_are_words_in_yaml_as_in_json(tmp_path):
    """YAML 1.1 reads an unquoted on/off as a boolean, and the documented `fused_loss: on` was refused as "value
    True"; read as YAML 1.2 and JSON read them, they are the switch's words. true/false stay booleans."""
    path = tmp_path / "c.yaml"
    path.write_text("model_name: tiny-qwen3\nfused_loss: on\nembedding_on_cpu: off\ngradient_checkpointing: false\n")
    cfg = load_config(path)
    assert (cfg.fused_loss, cfg.embedding_on_cpu, cfg.gradient_checkpointing) == ("on", "off", False)


@pytest.mark.parametrize(
    "name,text,lines",
    [
        ("c.yaml", "model_name: tiny-qwen3\nlora_r: 4\nlora_r: 8\n", "line 2 and line 3"),
        ("c.json", '{\n  "lora_r": 4,\n  "model_name": "tiny-qwen3",\n  "lora_r": 8\n}\n', "line 2 and line 4"),
    ],
)
def test_a_key_given_twice_is_an_error_naming_both_lines(tmp_path, name, text, lines):
    """Both parsers keep the last of two equal keys without a word; a config that says lora_r twice means one of
    them by mistake."""
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(UserError, match=f"key 'lora_r' is given twice \\({lines}\\)"):
        load_config(path)


def test_an_error_quotes_a_huge_value_briefly(tmp_path):
    """A YAML alias bomb (nine times nine times ... one list) as a value: the error quoted the whole expansion (a
    226 MB message). It quotes a few items of a few levels now."""
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, 8):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    lines.append("lora_r: [" + ", ".join(["*a7"] * 9) + "]")
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError) as info:
        load_config(path)  # the whole expansion (43 million strings) is never built
    message = str(info.value)
    assert "key 'lora_r'" in message and "unknown key 'a0'" in message
    assert all(len(line) < 400 for line in message.splitlines()), max(len(line) for line in message.splitlines())


def test_every_error_message_is_bounded_whatever_the_value_it_quotes(tmp_path, capsys):
    """A 51 KB YAML file whose anchor repeats a 50,000-character string 400 times in target_modules made a 20 MB
    message; a 100 KB --set value a 100 KB one. Every UserError is held to a bounded size where it is made, each
    over-long word cut to its ends and said so, whichever check quoted it."""
    long = "x" * 50_000
    path = tmp_path / "bomb.yaml"
    path.write_text(f'model_name: tiny-qwen3\nq: &s "{long}"\ntarget_modules: [' + ", ".join(["*s"] * 400) + "]\n")
    with pytest.raises(UserError) as info:
        load_config(path)
    message = str(info.value)
    assert "target_modules" in message and "unknown key 'q'" in message
    assert len(message) < 5000 and "characters left out" in message
    code, _, err = run_cli(capsys, "validate", "--set", "optimizer=" + "y" * 100_000)
    assert code == 2 and "key 'optimizer'" in err and "is not an HF Trainer name" in err and len(err) < 5000
