"""Tests for autotune.config: the typed config, inheritance, validation messages, --set, presets."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
from helpers import REPO
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autotune import config as C
from autotune.config import (
    KEY_DOCS,
    NESTED,
    Config,
    StructuredLogging,
    config_reference_markdown,
    list_presets,
    load_config,
    parse_set,
    preset_path,
)
from autotune.errors import UserError

PRESETS = sorted((REPO / "profiles").glob("*/*.json"))

# A valid value different from the default for every key of the schema.
NON_DEFAULT = {
    "model_name": "Qwen3-0.6B",
    "tokenizer_name": "qwen3-offline",
    "init": "random",
    "output_dir": "./elsewhere",
    "max_memory_gb": 7.5,
    "quantization": "none",
    "batch_size": 2,
    "gradient_accumulation_steps": 3,
    "effective_batch_size": 6,
    "learning_rate": 1e-4,
    "num_epochs": 2.5,
    "max_steps": 10,
    "max_sequence_length": 64,
    "warmup_ratio": 0.0,
    "weight_decay": 0.0,
    "max_grad_norm": 0.5,
    "seed": 0,
    "lora_r": 4,
    "lora_alpha": 8.5,
    "lora_dropout": 0.0,
    "target_modules": ["q_proj", "gate_proj"],
    "lora_experts": "off",
    "data_encoding": "cp949",
    "data_dir": "elsewhere/raw",
    "data_format": "jsonl",
    "dataset_name": "org/qa-set",
    "dataset_split": "validation",
    "reasoning_traces": "drop",
    "reasoning_markers": "text",
    "question_prefix": "Question",
    "answer_prefix": "Answer",
    "separator": "-",
    "question_pattern": r"^Q\d+",
    "answer_pattern": r"^A\d+",
    "eval_ratio": 0.25,
    "system_prompt": "Be brief. 简洁",
    "overflow": "drop",
    "data_cache_dir": "cache",
    "log_dir": "./l",
    "enable_tensorboard": False,
    "tensorboard_log_dir": "tb",
    "report_to": ["tensorboard", "wandb"],
    "log_every_n_steps": 1,
    "save_every_n_steps": 5,
    "save_total_limit": 1,
    "structured_logging": {
        "enabled": False,
        "log_file": "x.jsonl",
        "log_level": "DEBUG",
        "include_memory_stats": False,
        "include_model_stats": False,
    },
    "enable_inference_test": False,
    "inference_samples": 2,
    "inference_max_new_tokens": 16,
    "verify_environment": False,
    "auto_install_deps": True,
    "gradient_checkpointing": False,
    "gradient_checkpointing_kwargs": {"use_reentrant": True},
    "fp16": True,
    "bf16": False,
    "tf32": False,
    "optimizer": "adamw_torch",
    "optimizer_kwargs": {"betas": [0.9, 0.95], "eps": 1e-7},
    "lr_scheduler_type": "linear",
    "lr_scheduler_kwargs": {"num_cycles": 2},
    "max_oom_retries": 0,
    "distributed_strategy": "ddp",
    "eval_batch_size": 2,
    "fused_loss": "off",
    "offload_activations": "on",
    "embedding_on_cpu": "on",
    "lm_head_8bit": "on",
    "tiled_mlp": "on",
    "packing": "off",
    "experts_4bit": "off",
    "experts_split_lora": "off",
}


def write(path: Path, doc) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc, indent=2), encoding="utf-8")
    return path


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(UserError) as info:
        fn(*args, **kwargs)
    assert info.value.exit_code == 2
    return str(info.value)


# ------------------------------------------------------------------------------- round trips


def test_defaults_round_trip_through_a_file(tmp_path):
    defaults = Config().to_dict()
    path = write(tmp_path / "c.json", defaults)
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert isinstance(cfg.structured_logging, StructuredLogging)
    assert cfg.to_dict() == defaults
    assert cfg == Config()


def test_non_default_values_cover_every_key():
    assert set(NON_DEFAULT) == {f.name for f in dataclasses.fields(Config)}
    assert set(NON_DEFAULT["structured_logging"]) == {f.name for f in dataclasses.fields(StructuredLogging)}
    defaults = Config().to_dict()
    for key, value in NON_DEFAULT.items():
        assert value != defaults[key], key
    for key, value in NON_DEFAULT["structured_logging"].items():
        assert value != defaults["structured_logging"][key], key


def test_every_key_set_to_a_non_default_value_round_trips(tmp_path):
    cfg = load_config(write(tmp_path / "c.json", NON_DEFAULT))
    assert cfg.to_dict() == NON_DEFAULT
    again = load_config(write(tmp_path / "again.json", cfg.to_dict()))
    assert again == cfg
    assert cfg.effective_batch == 6


def test_defaults_are_fresh_objects():
    a, b = Config(), Config()
    a.target_modules.append("x")
    a.gradient_checkpointing_kwargs["x"] = 1
    assert b.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert b.gradient_checkpointing_kwargs == {"use_reentrant": False}


def test_no_path_gives_defaults_and_overrides_apply():
    assert load_config() == Config()
    cfg = load_config(None, {"batch_size": 1})
    assert cfg.batch_size == 1
    assert cfg.effective_batch == 16


def test_nested_values_merge_with_defaults(tmp_path):
    cfg = load_config(write(tmp_path / "c.json", {"structured_logging": {"log_level": "ERROR"}}))
    assert cfg.structured_logging.log_level == "ERROR"
    assert cfg.structured_logging.enabled is True
    assert cfg.structured_logging.log_file == "./logs/structured/training.jsonl"


def test_utf8_bom_is_accepted(tmp_path):
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"batch_size": 3}).encode())
    assert load_config(path).batch_size == 3


# ------------------------------------------------------------------------------- inheritance


def test_three_file_chain_with_relative_paths_in_subfolders(tmp_path):
    write(
        tmp_path / "shared" / "deep" / "base.json",
        {"description": "bottom", "batch_size": 1, "lora_r": 2, "seed": 1, "data_dir": "base-data"},
    )
    write(tmp_path / "shared" / "mid.json", {"base_config": "deep/base.json", "overrides": {"lora_r": 3, "seed": 2}})
    top = write(tmp_path / "runs" / "a" / "top.json", {"base_config": "../../shared/mid.json", "seed": 3})
    cfg = load_config(top)
    assert cfg.batch_size == 1  # only the bottom sets it
    assert cfg.data_dir == "base-data"
    assert cfg.lora_r == 3  # middle overrides bottom
    assert cfg.seed == 3  # top overrides both
    assert cfg.learning_rate == Config().learning_rate  # untouched default


def test_relative_base_is_relative_to_the_file_not_the_working_directory(tmp_path, monkeypatch):
    write(tmp_path / "cfgs" / "base.json", {"lora_r": 9})
    top = write(tmp_path / "cfgs" / "top.json", {"base_config": "base.json"})
    monkeypatch.chdir(REPO)
    assert load_config(top).lora_r == 9
    monkeypatch.chdir(tmp_path)
    assert load_config("cfgs/top.json").lora_r == 9


@pytest.mark.parametrize("ref", ["hardware/16gb", "16gb", "hardware/16gb.json", "16gb.json"])
def test_base_by_preset_name(tmp_path, ref):
    cfg = load_config(write(tmp_path / "c.json", {"base_config": ref, "overrides": {"lora_r": 2}}))
    preset = json.loads((REPO / "profiles" / "hardware" / "16gb.json").read_text())
    assert cfg.max_memory_gb == preset["max_memory_gb"] == 15.0
    assert cfg.max_sequence_length == preset["max_sequence_length"]
    assert cfg.lora_r == 2


def test_a_file_beside_the_config_wins_over_a_preset_of_the_same_name(tmp_path):
    write(tmp_path / "16gb.json", {"lora_r": 77})
    cfg = load_config(write(tmp_path / "c.json", {"base_config": "16gb.json"}))
    assert cfg.lora_r == 77


def test_preset_chain_of_presets(tmp_path):
    write(tmp_path / "mid.json", {"base_config": "models/Qwen3-8B", "overrides": {"batch_size": 1}})
    cfg = load_config(write(tmp_path / "top.json", {"base_config": "mid.json", "lora_r": 4}))
    assert cfg.model_name == "Qwen/Qwen3-8B"
    assert cfg.max_memory_gb == 15.0
    assert (cfg.batch_size, cfg.lora_r) == (1, 4)


def test_overrides_and_top_level_keys_win_over_the_base(tmp_path):
    write(tmp_path / "base.json", {"batch_size": 8, "lora_r": 8, "seed": 8})
    cfg = load_config(
        write(tmp_path / "c.json", {"base_config": "base.json", "lora_r": 1, "overrides": {"batch_size": 2}})
    )
    assert (cfg.batch_size, cfg.lora_r, cfg.seed) == (2, 1, 8)


def test_overrides_win_over_top_level_keys_of_the_same_file(tmp_path):
    cfg = load_config(write(tmp_path / "c.json", {"lora_r": 1, "overrides": {"lora_r": 2}}))
    assert cfg.lora_r == 2


def test_top_level_and_overrides_of_one_file_are_both_checked_and_nested_objects_merge(tmp_path):
    path = write(
        tmp_path / "c.json",
        {
            "structured_logging": {"enabled": False},
            "lora_r": "x",
            "overrides": {"structured_logging": {"log_level": "DEBUG"}, "lora_r": 2},
        },
    )
    assert "'lora_r': value 'x'" in error_of(load_config, path)
    path = write(
        tmp_path / "c.json",
        {"structured_logging": {"enabled": False}, "overrides": {"structured_logging": {"log_level": "DEBUG"}}},
    )
    logging = load_config(path).structured_logging
    assert (logging.enabled, logging.log_level) == (False, "DEBUG")


def test_set_wins_over_everything(tmp_path):
    write(tmp_path / "base.json", {"batch_size": 8, "structured_logging": {"log_level": "ERROR"}})
    path = write(tmp_path / "c.json", {"base_config": "base.json", "overrides": {"batch_size": 2}})
    cfg = load_config(path, parse_set(["batch_size=1", "structured_logging.log_level=DEBUG"]))
    assert cfg.batch_size == 1
    assert cfg.structured_logging.log_level == "DEBUG"
    assert cfg.structured_logging.enabled is True


def test_self_cycle_is_reported(tmp_path):
    path = write(tmp_path / "self.json", {"base_config": "self.json"})
    msg = error_of(load_config, path)
    assert "cycle" in msg
    assert msg.count(str(path.resolve())) == 2


def test_two_file_cycle_names_each_file(tmp_path):
    a = write(tmp_path / "a.json", {"base_config": "sub/b.json"})
    b = write(tmp_path / "sub" / "b.json", {"base_config": "../a.json"})
    msg = error_of(load_config, a)
    assert "cycle" in msg
    assert f"{a.resolve()} -> {b.resolve()} -> {a.resolve()}" in msg


def test_three_file_cycle_names_each_file(tmp_path):
    a = write(tmp_path / "a.json", {"base_config": "b.json"})
    b = write(tmp_path / "b.json", {"base_config": "c.json"})
    c = write(tmp_path / "c.json", {"base_config": "a.json"})
    msg = error_of(load_config, b)
    assert f"{b.resolve()} -> {c.resolve()} -> {a.resolve()} -> {b.resolve()}" in msg


# ------------------------------------------------------------------------------------ errors


def test_unknown_key_names_it_and_the_closest_known_key(tmp_path):
    path = write(tmp_path / "c.json", {"batchsize": 4})
    msg = error_of(load_config, path)
    assert str(path) in msg
    assert "unknown key 'batchsize'" in msg
    assert "did you mean 'batch_size'?" in msg


def test_unknown_key_without_anything_close(tmp_path):
    msg = error_of(load_config, write(tmp_path / "c.json", {"zzzzqqq": 1}))
    assert "unknown key 'zzzzqqq'" in msg
    assert "did you mean" not in msg


def test_unknown_nested_key(tmp_path):
    msg = error_of(load_config, write(tmp_path / "c.json", {"structured_logging": {"log_lvl": "DEBUG"}}))
    assert "unknown key 'structured_logging.log_lvl'" in msg
    assert "did you mean 'log_level'?" in msg


def test_unknown_key_inside_overrides(tmp_path):
    msg = error_of(load_config, write(tmp_path / "c.json", {"overrides": {"learning_rte": 1e-4}}))
    assert "unknown key 'learning_rte'" in msg and "'learning_rate'" in msg


def test_wrong_type_names_file_key_value_and_what_is_allowed(tmp_path):
    path = write(tmp_path / "c.json", {"batch_size": "four"})
    msg = error_of(load_config, path)
    assert msg == f"{path}: key 'batch_size': value 'four' is not allowed: must be an integer >= 1"


@pytest.mark.parametrize(
    "key,value,allowed",
    [
        ("batch_size", 0, "an integer >= 1"),
        ("batch_size", 2.5, "an integer >= 1"),
        ("batch_size", True, "an integer >= 1"),
        ("seed", -1, "an integer >= 0"),
        ("max_sequence_length", 7, "an integer >= 8"),
        ("learning_rate", 0, "a number > 0"),
        ("learning_rate", -1e-5, "a number > 0"),
        ("weight_decay", -0.1, "a number >= 0"),
        ("warmup_ratio", 1.5, "a number from 0 to 1"),
        ("lora_dropout", -0.1, "a number from 0 to 1"),
        ("max_memory_gb", 0, "a number > 0 or null"),
        ("max_steps", 0, "an integer >= 1 or null"),
        ("quantization", "2bit", "one of '4bit', '8bit', 'none'"),
        ("bf16", "yes", "true or false"),
        ("bf16", 1, "true or false"),
        ("output_dir", None, "a string"),
        ("tokenizer_name", 5, "a string or null"),
        ("target_modules", [], "a list of strings"),
        ("target_modules", "q_proj", "a list of strings"),
        ("target_modules", ["q_proj", 3], "a list of strings"),
        ("optimizer_kwargs", [], "a JSON object"),
        ("structured_logging", "on", "a JSON object"),
    ],
)
def test_out_of_range_and_wrong_type(tmp_path, key, value, allowed):
    path = write(tmp_path / "c.json", {key: value})
    msg = error_of(load_config, path)
    assert str(path) in msg
    assert f"'{key}'" in msg
    assert repr(value) in msg
    assert allowed in msg


def test_nested_wrong_value(tmp_path):
    path = write(tmp_path / "c.json", {"structured_logging": {"log_level": "LOUD", "enabled": "no"}})
    msg = error_of(load_config, path)
    assert "key 'structured_logging.log_level': value 'LOUD' is not allowed: must be one of 'DEBUG'" in msg
    assert "key 'structured_logging.enabled': value 'no' is not allowed: must be true or false" in msg


@pytest.mark.parametrize("text", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_are_rejected(tmp_path, text):
    path = write(tmp_path / "c.json", '{"learning_rate": ' + text + "}")
    assert "'learning_rate'" in error_of(load_config, path)


@pytest.mark.parametrize("key", sorted(KEY_DOCS))
def test_every_key_is_type_checked(tmp_path, key):
    path = write(tmp_path / "c.json", {key: [[]]})
    msg = error_of(load_config, path)
    assert f"'{key}'" in msg and "is not allowed: must be" in msg


def test_malformed_json_reports_file_line_and_column(tmp_path):
    path = write(tmp_path / "c.json", '{\n  "batch_size": 4,\n  "lora_r": 8,\n}\n')
    msg = error_of(load_config, path)
    assert msg.startswith(f"{path}:4:1: malformed JSON")
    assert "Only JSON" in msg


def test_malformed_json_in_a_base_names_the_base(tmp_path):
    base = write(tmp_path / "base.json", '{"batch_size": 4 // a comment\n}')
    msg = error_of(load_config, write(tmp_path / "c.json", {"base_config": "base.json"}))
    assert msg.startswith(f"{base.resolve()}:1:18: malformed JSON")


def test_empty_file_is_malformed(tmp_path):
    path = write(tmp_path / "c.json", "")
    assert error_of(load_config, path).startswith(f"{path}:1:1: malformed JSON")


@pytest.mark.parametrize("doc,kind", [([1, 2], "list"), ("a string", "str"), (3, "int"), (None, "NoneType")])
def test_top_level_must_be_an_object(tmp_path, doc, kind):
    path = write(tmp_path / "c.json", json.dumps(doc))
    msg = error_of(load_config, path)
    assert str(path.resolve()) in msg
    assert f"a config must be a JSON object, got {kind}" in msg


def test_missing_file(tmp_path):
    path = tmp_path / "nope.json"
    assert error_of(load_config, path) == f"{path.resolve()}: config file not found"


def test_directory_instead_of_a_file(tmp_path):
    assert "cannot read it" in error_of(load_config, tmp_path)


def test_missing_base(tmp_path):
    path = write(tmp_path / "c.json", {"base_config": "nothere.json"})
    msg = error_of(load_config, path)
    assert "'nothere.json'" in msg
    assert str(tmp_path / "nothere.json") in msg
    assert "profiles list" in msg


def test_base_config_must_be_a_string(tmp_path):
    msg = error_of(load_config, write(tmp_path / "c.json", {"base_config": 3}))
    assert "'base_config' must be a path or preset name" in msg


def test_overrides_must_be_an_object(tmp_path):
    msg = error_of(load_config, write(tmp_path / "c.json", {"overrides": [1]}))
    assert "'overrides' must be an object" in msg


def test_all_errors_of_a_file_in_one_message(tmp_path):
    path = write(
        tmp_path / "c.json",
        {
            "batchsize": 4,  # unknown
            "learning_rate": "fast",  # wrong type
            "lora_dropout": 2,  # out of range
            "quantization": "3bit",  # bad choice
            "structured_logging": {"log_level": "LOUD"},  # bad nested value
            "model_name": "Qwen3-7B",  # no such model (consistency check)
            "fp16": True,  # together with the default bf16: both on
        },
    )
    msg = error_of(load_config, path)
    lines = msg.splitlines()
    assert len(lines) == 7, msg
    assert all(line.startswith(str(path)) for line in lines)
    for needle in (
        "'batchsize'",
        "'learning_rate'",
        "'lora_dropout'",
        "'quantization'",
        "structured_logging.log_level",
        "Qwen3-8B",
        "'fp16' and 'bf16'",
    ):
        assert sum(needle in line for line in lines) == 1, needle


def test_errors_of_every_layer_are_reported_together_each_naming_its_file(tmp_path):
    base = write(tmp_path / "base.json", {"batch_size": 0})
    top = write(tmp_path / "top.json", {"base_config": "base.json", "lora_r": "x"})
    msg = error_of(load_config, top, parse_set(["seed=-3"]))
    lines = msg.splitlines()
    assert len(lines) == 3
    assert any(line.startswith(f"{base.resolve()}: key 'batch_size'") for line in lines)
    assert any(line.startswith(f"{top.resolve()}: key 'lora_r'") for line in lines)
    assert any(line.startswith("--set: key 'seed'") for line in lines)


def test_a_bad_value_in_a_base_is_fine_when_overridden_but_still_reported(tmp_path):
    # Every error of every file is reported, even one a later layer would hide.
    write(tmp_path / "base.json", {"batch_size": 0})
    top = write(tmp_path / "top.json", {"base_config": "base.json", "batch_size": 2})
    assert "'batch_size'" in error_of(load_config, top)


def test_qwen3_7b_suggests_qwen3_8b(tmp_path):
    msg = error_of(load_config, write(tmp_path / "c.json", {"model_name": "Qwen3-7B"}))
    assert "model_name" in msg and "Qwen3-8B" in msg


def test_fp16_and_bf16_both_on():
    msg = error_of(load_config, None, {"fp16": True, "bf16": True})
    assert "'fp16' and 'bf16' are both true" in msg


def test_effective_batch_must_be_a_multiple_of_the_micro_batch():
    msg = error_of(load_config, None, {"batch_size": 4, "effective_batch_size": 6})
    assert "not a multiple of batch_size 4" in msg
    assert load_config(None, {"batch_size": 4, "effective_batch_size": 8}).effective_batch == 8


def test_local_model_directory_is_accepted(tmp_path):
    from autotune.catalog import CATALOG

    CATALOG["tiny-qwen3"].architecture.to_hf_config().save_pretrained(tmp_path / "m")
    cfg = load_config(None, {"model_name": str(tmp_path / "m")})
    assert cfg.model_name == str(tmp_path / "m")
    assert "no config.json" in error_of(load_config, None, {"model_name": str(tmp_path)})


# ----------------------------------------------------------------------------------- --set


def test_parse_set_types_values_by_the_schema():
    values = parse_set(
        [
            "batch_size=2",
            "learning_rate=1e-4",
            "bf16=false",
            "model_name=123",  # a string key keeps the text
            "output_dir=true",
            "tokenizer_name=null",  # str? accepts null
            "system_prompt=Answer in one line = briefly",  # only the first '=' splits
            'target_modules=["q_proj","v_proj"]',
            'optimizer_kwargs={"eps": 1e-8}',
            "max_memory_gb=null",
            "quantization=none",
            "structured_logging.log_level=DEBUG",
            "structured_logging.enabled=false",
            "structured_logging.log_file=123",  # nested string keys are typed too
        ]
    )
    assert values == {
        "batch_size": 2,
        "learning_rate": 1e-4,
        "bf16": False,
        "model_name": "123",
        "output_dir": "true",
        "tokenizer_name": None,
        "system_prompt": "Answer in one line = briefly",
        "target_modules": ["q_proj", "v_proj"],
        "optimizer_kwargs": {"eps": 1e-8},
        "max_memory_gb": None,
        "quantization": "none",
        "structured_logging": {"log_level": "DEBUG", "enabled": False, "log_file": "123"},
    }


def test_parse_set_results_load():
    cfg = load_config(
        None,
        parse_set(
            [
                "batch_size=2",
                "structured_logging.log_level=WARNING",
                "model_name=Qwen3-8B",
                "max_memory_gb=null",
                "bf16=false",
            ]
        ),
    )
    assert (cfg.batch_size, cfg.structured_logging.log_level, cfg.model_name) == (2, "WARNING", "Qwen3-8B")
    assert cfg.max_memory_gb is None and cfg.bf16 is False


def test_parse_set_later_wins_and_nested_objects_merge():
    assert parse_set(["batch_size=2", "batch_size=3"]) == {"batch_size": 3}
    values = parse_set(["structured_logging.enabled=false", 'structured_logging={"log_level": "ERROR"}'])
    assert values == {"structured_logging": {"enabled": False, "log_level": "ERROR"}}


def test_set_values_are_checked_like_file_values():
    msg = error_of(load_config, None, parse_set(["batch_size=two", "lora_rank=4"]))
    assert "--set: key 'batch_size': value 'two' is not allowed" in msg
    assert "--set: unknown key 'lora_rank' (did you mean 'lora_r'?)" in msg


@pytest.mark.parametrize("item", ["batch_size", "=4", " =4", ""])
def test_bad_set_syntax(item):
    msg = error_of(parse_set, [item])
    assert f"--set {item!r}: expected key=value" in msg


def test_set_nested_key_after_a_non_object():
    msg = error_of(parse_set, ["structured_logging=5", "structured_logging.enabled=true"])
    assert "structured_logging" in msg and "not an object" in msg


# --------------------------------------------------------------------------------- presets


def test_presets_exist_and_are_listed():
    names = {p["name"] for p in list_presets()}
    expected = {f"{p.parent.name}/{p.stem}" for p in PRESETS}
    assert names == expected
    for kind in (
        "hardware/8gb",
        "hardware/12gb",
        "hardware/16gb",
        "hardware/24gb",
        "configs/default",
        "models/Qwen3-8B",
        "strategies/quick",
        "lora/qa",
    ):
        assert kind in names
    assert all(p["description"] for p in list_presets())


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_preset_loads(path):
    resolved = load_config(path).to_dict()
    doc = json.loads(path.read_text())
    values = {k: v for k, v in doc.items() if k not in ("description", "base_config", "overrides")}
    values.update(doc.get("overrides", {}))
    for key, value in values.items():
        if key in NESTED:
            assert {k: resolved[key][k] for k in value} == value
        else:
            assert resolved[key] == value


def test_preset_path():
    assert preset_path("hardware/16gb") == C.PROFILES_DIR / "hardware" / "16gb.json"
    assert preset_path("16gb") == C.PROFILES_DIR / "hardware" / "16gb.json"
    assert preset_path("Qwen3-8B") == C.PROFILES_DIR / "models" / "Qwen3-8B.json"
    assert preset_path("nope") is None
    assert preset_path("hardware/nope") is None
    assert preset_path("x" * 400) is None


def test_default_preset_matches_the_defaults():
    doc = json.loads((REPO / "profiles" / "configs" / "default.json").read_text())
    assert load_config(REPO / "profiles" / "configs" / "default.json") == Config()
    defaults = Config().to_dict()
    assert all(defaults[k] == v for k, v in doc.items() if k != "description")


# ------------------------------------------------------------------------------- reference


def test_reference_lists_every_key_with_its_default():
    md = config_reference_markdown()
    rows = [line for line in md.splitlines()[2:]]
    listed = [re.match(r"\| `([^`]+)` \|", row).group(1) for row in rows]
    expected = [f.name for f in dataclasses.fields(Config) if f.name not in NESTED]
    expected += [f"structured_logging.{f.name}" for f in dataclasses.fields(StructuredLogging)]
    assert sorted(listed) == sorted(expected)
    assert len(listed) == len(set(listed))
    assert "| `batch_size` | `4` | an integer >= 1 |" in md
    assert "| `structured_logging.log_level` | `\"INFO\"` | one of 'DEBUG', 'INFO', 'WARNING', 'ERROR' |" in md
    assert all(row.count("|") >= 5 and not row.endswith("|  |") for row in rows)


def test_importing_config_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, autotune.config, autotune.catalog, autotune.preflight; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# Inputs that once escaped as other exceptions (RuntimeError, OSError, ValueError, RecursionError, TypeError).
@pytest.mark.parametrize(
    "text",
    [
        "1" * 5000,  # int too long for Python to convert
        '{"batch_size": %s}' % ("9" * 5000),
        "[" * 100_000,  # nested too deep
        json.dumps({"base_config": "a\x00b"}),  # NUL byte in a path
        json.dumps({"base_config": "x" * 300}),  # file name too long
        json.dumps({"base_config": "/" + "a/" * 3000}),
        json.dumps({"base_config": "~nosuchuser/c.json"}),
        json.dumps({"model_name": "~nosuchuser"}),  # home directory of an unknown user
        json.dumps({"model_name": "x" * 300}),
        json.dumps({"model_name": "a\x00b"}),
    ],
)
def test_hostile_files_raise_user_error(tmp_path, text):
    error_of(load_config, write(tmp_path / "c.json", text))


def test_hostile_config_paths_raise_user_error(tmp_path):
    error_of(load_config, "a\x00b.json")
    error_of(load_config, tmp_path / ("x" * 300))


def test_hostile_set_values():
    assert parse_set(["batch_size=" + "1" * 5000]) == {"batch_size": "1" * 5000}
    assert parse_set(["optimizer_kwargs=" + "[" * 100_000]) == {"optimizer_kwargs": "[" * 100_000}
    error_of(load_config, None, parse_set(["batch_size=" + "1" * 5000]))
    error_of(parse_set, ["structured_logging=[1]", "structured_logging.enabled=true"])


# -------------------------------------------------------------------------------- property

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(10**40), max_value=10**40)
    | st.floats()
    | st.text(max_size=30)
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)
nested_keys = [f"structured_logging.{f.name}" for f in dataclasses.fields(StructuredLogging)]
known_keys = sorted(KEY_DOCS) + ["base_config", "overrides", "description"]
# Keys whose values reach the file system, the catalog or cross-key checks, drawn more often.
hot_keys = [
    "model_name",
    "base_config",
    "overrides",
    "structured_logging",
    "batch_size",
    "effective_batch_size",
    "fp16",
    "bf16",
]
any_key = st.sampled_from(hot_keys) | st.sampled_from(known_keys) | st.text(max_size=20)
edge_strings = st.sampled_from(
    [
        "",
        " ",
        ".",
        "..",
        "/",
        "~",
        "~nosuchuser",
        "~nosuchuser/x",
        "x" * 300,
        "/" + "a/" * 200,
        "a\x00b",
        "c.json",
        "./c.json",
        "hardware/16gb",
        "16gb",
        "hardware/16gb.json",
        "configs/default",
        "Qwen3-14B",
        "org/Qwen3-14B",
        "Qwen3-7B",
        "Qwen/Qwen3-7B",
        "tiny-qwen3",
        "../../..",
        "tests",
        "profiles",
        "config.json",
    ]
)
valid_values = st.sampled_from(list(NON_DEFAULT.values()) + list(Config().to_dict().values()))
values = edge_strings | valid_values | json_values
config_docs = st.dictionaries(
    any_key,
    values | st.dictionaries(any_key, values, max_size=4),
    max_size=8,
)
top_level = config_docs | json_values


def _load_or_user_error(*args):
    try:
        cfg = load_config(*args)
    except UserError as exc:
        assert str(exc)
        return None
    assert isinstance(cfg, Config)
    assert isinstance(cfg.structured_logging, StructuredLogging)
    json.dumps(cfg.to_dict())
    return cfg


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=top_level)
def test_any_json_file_loads_or_raises_user_error(tmp_path, doc):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(doc), encoding="utf-8")
    _load_or_user_error(path)


set_items = st.one_of(
    st.text(max_size=30),
    st.builds(
        lambda k, v: f"{k}={v}",
        st.sampled_from(hot_keys + nested_keys) | st.sampled_from(sorted(KEY_DOCS)) | st.text(max_size=15),
        edge_strings | st.text(max_size=30) | values.map(json.dumps),
    ),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(items=st.lists(set_items, max_size=6), doc=config_docs)
def test_any_set_items_parse_or_raise_user_error(tmp_path, items, doc):
    try:
        overrides = parse_set(items)
    except UserError:
        return
    assert isinstance(overrides, dict)
    _load_or_user_error(None, overrides)
    path = tmp_path / "c.json"
    path.write_text(json.dumps(doc), encoding="utf-8")
    _load_or_user_error(path, overrides)


@settings(max_examples=100, deadline=None)
@given(text=st.text(max_size=60))
def test_any_text_file_loads_or_raises_user_error(text):
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "c.json"
        path.write_text(text, encoding="utf-8")
        _load_or_user_error(path)
