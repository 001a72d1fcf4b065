"""Configs brought from TRL, LLaMA-Factory and axolotl: read with a note naming autotune's key, converted by
`autotune convert` into configs `autotune validate` accepts, and hinted from the peers' table rather than by spelling.
The peers' files are tests/fixtures/peers/, written for these tests in each tool's published format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from helpers import REPO
from helpers.cli import run_cli

from autotune.catalog import PROJECTIONS, resolve_model, resolve_targets
from autotune.config import OPTIMIZERS, SCHEDULERS, TRACKERS, load_config, parse_set
from autotune.errors import UserError
from autotune.peers import SPELLINGS, reference_markdown

PEERS = REPO / "tests" / "fixtures" / "peers"
TRL_FILE = PEERS / "trl_sft_lora.yaml"
LLAMA_FACTORY_FILE = PEERS / "llama_factory_qlora_sft.yaml"
AXOLOTL_FILE = PEERS / "axolotl_qwen3_qlora.yaml"


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def converted(capsys, peer: Path, out: Path, *flags) -> tuple[dict, str]:
    """`autotune convert PEER --out OUT`: the config it wrote and its stderr (notes, what it left out)."""
    code, _, err = run_cli(capsys, "convert", peer, "--out", out, *flags)
    assert code == 0, err
    text = out.read_text(encoding="utf-8")
    return (yaml.safe_load(text) if out.suffix == ".yaml" else json.loads(text)), err


# What each peer file means in autotune's keys (its keys, and the tool's defaults for the ones it leaves unset).
EXPECTED = {
    TRL_FILE: {
        "model_name": "Qwen/Qwen3-0.6B",
        "dataset_name": "trl-lib/Capybara",
        "report_to": ["none"],
        "quantization": "4bit",
        "lora_r": 32,
        "target_modules": list(PROJECTIONS),
        "max_sequence_length": 2048,
        "packing": "on",
        "batch_size": 2,
        "gradient_accumulation_steps": 8,
        "num_epochs": 1,
        "save_every_n_steps": 200,
        "bf16": True,
        "lora_dropout": 0.05,  # TRL's default (ModelConfig), which the file leaves unset
        "weight_decay": 0.0,  # the HF Trainer's default
    },
    LLAMA_FACTORY_FILE: {
        "model_name": "Qwen/Qwen3-8B",
        "quantization": "4bit",
        "lora_r": 16,
        "lora_alpha": 32,  # LLaMA-Factory's default: twice the rank
        "target_modules": list(PROJECTIONS),
        "max_sequence_length": 1024,
        "eval_ratio": 0.1,
        "batch_size": 2,
        "eval_batch_size": 1,
        "num_epochs": 2.0,
        "log_every_n_steps": 5,
        "save_every_n_steps": 250,
        "report_to": ["none"],
        "lora_dropout": 0.0,
    },
    AXOLOTL_FILE: {
        "model_name": "Qwen/Qwen3-14B",
        "dataset_name": "my-org/support-chats",
        "dataset_split": "train",
        "eval_ratio": 0.05,
        "max_sequence_length": 4096,
        "quantization": "4bit",
        "target_modules": list(PROJECTIONS),
        "batch_size": 1,
        "lr_scheduler_type": "cosine",
        "bf16": True,
        "gradient_checkpointing": True,
        "offload_activations": "on",
        "fused_loss": "on",
        "data_cache_dir": "last_run_prepared",
    },
}
LEFT_OUT = {TRL_FILE: [], LLAMA_FACTORY_FILE: ["dataset", "max_samples"], AXOLOTL_FILE: ["saves_per_epoch"]}


@pytest.mark.parametrize("peer", list(EXPECTED), ids=lambda p: p.stem)
@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_a_peer_config_converts_to_one_validate_accepts(capsys, tmp_path, peer, suffix):
    out = tmp_path / f"converted{suffix}"
    values, err = converted(capsys, peer, out)
    assert {k: values[k] for k in EXPECTED[peer]} == EXPECTED[peer]
    left_out = [line for line in err.splitlines() if line.startswith("left out: ")]
    assert [line.split("'")[1] for line in left_out] == LEFT_OUT[peer]
    code, stdout, err = run_cli(capsys, "validate", out, "--json")
    assert code == 0, err
    assert json.loads(stdout)["config"]["target_modules"] == EXPECTED[peer]["target_modules"]
    # the file autotune wrote reads back as the values it printed (YAML's on/off stay words, numbers stay numbers)
    assert load_config(out) == load_config(write(tmp_path / "twin.json", json.dumps(values)))


def test_validating_a_peer_file_names_autotunes_keys_not_a_spelling_guess(capsys):
    code, out, err = run_cli(capsys, "validate", LLAMA_FACTORY_FILE)
    assert code == 2 and out == ""
    assert "did you mean" not in err
    notes = [line for line in err.splitlines() if line.startswith("note: ")]
    for peer_key, autotune in [
        ("lora_rank", "lora_r 16"),
        ("lora_target", 'target_modules ["all-linear"]'),  # spelled out for the model the config names
        ("cutoff_len", "max_sequence_length 1024"),
        ("save_steps", "save_every_n_steps 250"),
        ("per_device_train_batch_size", "batch_size 2"),
        ("quantization_bit", 'quantization "4bit"'),
        ("val_size", "eval_ratio 0.1"),
        ("num_train_epochs", "num_epochs 2.0"),
    ]:
        assert any(f"key {peer_key!r} (" in n and f"read as {autotune}" in n for n in notes), (peer_key, notes)
    # what it cannot carry over is an error saying why, not a guess
    assert "key 'dataset' (LLaMA-Factory's): LLaMA-Factory's dataset names are entries of its dataset_info.json" in err
    assert "key 'max_samples'" in err and "error: " in err


def test_a_peer_file_autotune_can_carry_whole_validates_as_it_is(capsys):
    code, out, err = run_cli(capsys, "validate", TRL_FILE, "--json")
    assert code == 0, err
    config = json.loads(out)["config"]
    assert (config["lora_r"], config["quantization"], config["max_sequence_length"]) == (32, "4bit", 2048)
    assert config["report_to"] == ["none"] and config["target_modules"] == list(PROJECTIONS)
    assert "note: " in err and "key 'max_length' (TRL's): read as max_sequence_length 2048" in err


def test_axolotl_peer_values_of_autotunes_own_keys(capsys, tmp_path):
    """axolotl writes `bf16: auto` and `gradient_checkpointing: offload`: read as what they mean, with a note."""
    text = "bf16: auto\ngradient_checkpointing: offload\nmax_steps: -1\nload_in_8bit: false\nwandb_project:\n"
    path = write(tmp_path / "c.yaml", text)  # a false or empty peer key says nothing: no note
    notes: list[str] = []
    cfg = load_config(path, notes=notes)
    assert cfg.bf16 is True and cfg.gradient_checkpointing is True and cfg.offload_activations == "on"
    assert cfg.max_steps is None
    assert len(notes) == 3 and "axolotl" in notes[0] and "offload_activations" in notes[1]


@pytest.mark.parametrize(
    ("key", "autotune"),
    [
        ("lora_target", "target_modules"),  # a spelling guess said lora_r
        ("save_steps", "save_every_n_steps"),  # a spelling guess said max_steps
        ("cutoff_len", "max_sequence_length"),
        ("micro_batch_size", "batch_size"),
        ("per_device_train_batch_size", "batch_size"),
        ("model_name_or_path", "model_name"),
        ("val_set_size", "eval_ratio"),
    ],
)
def test_set_takes_autotunes_names_and_hints_from_the_table(capsys, key, autotune):
    code, _, err = run_cli(capsys, "validate", "--set", f"{key}=1")
    assert code == 2 and f"--set: unknown key {key!r} (did you mean {autotune!r}?)" in err


def test_a_key_without_an_autotune_name_is_hinted_by_what_autotune_does(capsys):
    code, _, err = run_cli(capsys, "validate", "--set", "flash_attention=true")
    assert code == 2 and "(axolotl's key: autotune's step runs PyTorch's SDPA attention)" in err
    code, _, err = run_cli(capsys, "validate", "--set", "batchsize=2")  # not a peer's: the spelling guess
    assert code == 2 and "did you mean 'batch_size'?" in err


def test_two_keys_for_one_autotune_key_must_agree(tmp_path):
    with pytest.raises(UserError, match=r"keys 'lora_r' and 'lora_rank' both set lora_r, to 16 and 8: keep one"):
        load_config(write(tmp_path / "c.yaml", "lora_r: 16\nlora_rank: 8\n"))
    assert load_config(write(tmp_path / "d.yaml", "lora_r: 8\nlora_rank: 8\n")).lora_r == 8
    # axolotl's two ways of naming targets add up, as axolotl adds them
    cfg = load_config(write(tmp_path / "e.yaml", "lora_target_modules: [q_proj]\nlora_target_linear: true\n"))
    assert cfg.target_modules == list(PROJECTIONS)


def test_a_value_autotune_cannot_honour_is_an_error_with_the_reason(tmp_path):
    path = write(tmp_path / "c.yaml", "finetuning_type: full\nquantization_bit: 2\nsave_steps: 0.25\n")
    with pytest.raises(UserError) as info:
        load_config(path)
    message = str(info.value)
    assert "key 'finetuning_type' (LLaMA-Factory's): autotune trains LoRA adapters only" in message
    assert "key 'quantization_bit' (LLaMA-Factory's): 2-bit" in message
    assert "key 'save_steps'" in message and "share of the run's steps" in message


def test_convert_never_overwrites_unasked_and_prints_without_out(capsys, tmp_path):
    out = write(tmp_path / "mine.json", "{}")
    code, _, err = run_cli(capsys, "convert", TRL_FILE, "--out", out)
    assert code == 2 and "exists" in err and "--overwrite" in err and out.read_text() == "{}"
    code, _, err = run_cli(capsys, "convert", TRL_FILE, "--out", out, "--overwrite")
    assert code == 0 and json.loads(out.read_text())["lora_r"] == 32
    code, stdout, _ = run_cli(capsys, "convert", AXOLOTL_FILE)
    assert code == 0 and json.loads(stdout)["model_name"] == "Qwen/Qwen3-14B"


def test_convert_says_when_it_cannot_tell_the_tool(capsys, tmp_path):
    code, _, err = run_cli(capsys, "convert", write(tmp_path / "a.json", json.dumps({"lora_r": 4})))
    assert code == 2 and "already an autotune config" in err
    odd = write(tmp_path / "b.yaml", "learning_rate: 1.0e-4\nsomething_else: 1\n")
    code, _, err = run_cli(capsys, "convert", odd)
    assert code == 2 and "--from" in err
    code, stdout, err = run_cli(capsys, "convert", odd, "--from", "axolotl")
    assert code == 2 and "unknown key 'something_else'" in err  # a key no one knows stays an error
    code, stdout, _ = run_cli(capsys, "convert", write(tmp_path / "c.yaml", "cutoff_len: 512\n"), "--from", "trl")
    assert code == 0 and json.loads(stdout)["max_sequence_length"] == 512


def test_convert_refuses_a_config_autotune_would_refuse(capsys, tmp_path):
    llama = write(tmp_path / "llama.yaml", "model_name_or_path: meta-llama/Meta-Llama-3-8B\nstage: sft\n")
    code, _, err = run_cli(capsys, "convert", llama, "--out", tmp_path / "x.json")
    assert code == 2 and "not a Qwen3 model" in err and not (tmp_path / "x.json").exists()


def test_report_to_none_as_a_word(tmp_path):
    assert load_config(write(tmp_path / "c.yaml", "report_to: none\n")).report_to == ["none"]
    assert load_config(None, parse_set(["report_to=wandb"])).report_to == ["wandb"]


@pytest.mark.parametrize("targets", ['"all-linear"', '["all-linear"]', "all-linear"])
def test_all_linear_is_every_projection_listed(tmp_path, targets):
    cfg = load_config(write(tmp_path / "c.yaml", f"target_modules: {targets}\n"))
    assert cfg.target_modules == list(PROJECTIONS) == resolve_targets("all-linear")
    assert resolve_targets(["q_proj"]) == ["q_proj"]


def test_all_linear_is_the_models_own_projections_and_adds_up_with_names_beside_it(tmp_path):
    assert load_config(write(tmp_path / "c.yaml", "target_modules: [all-linear, q_proj]\n")).target_modules == list(
        PROJECTIONS
    )
    hybrid = load_config(write(tmp_path / "h.yaml", "model_name: Qwen3.5-9B\ntarget_modules: all-linear\n"))
    assert hybrid.target_modules == list(resolve_model("Qwen3.5-9B").architecture.projection_names)
    assert "in_proj_qkv" in hybrid.target_modules
    moe = load_config(
        write(tmp_path / "m.yaml", "model_name: Qwen3-30B-A3B\nlora_dropout: 0\ntarget_modules: all-linear\n")
    )
    assert moe.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]  # its experts get adapters by lora_experts


def test_on_and_off_for_switches_and_true_false_keys(tmp_path):
    text = "fused_loss: on\npacking: off\ntiled_mlp: true\ngradient_checkpointing: off\nbf16: on\n"
    cfg = load_config(write(tmp_path / "c.yaml", text))
    assert (cfg.fused_loss, cfg.packing, cfg.tiled_mlp) == ("on", "off", "on")
    assert cfg.gradient_checkpointing is False and cfg.bf16 is True


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        (
            "optimizer=adamw_torch_fusd",
            "key 'optimizer': 'adamw_torch_fusd' is not an HF Trainer name (did you mean 'adamw_torch_fused'?)",
        ),
        (
            "lr_scheduler_type=cosin",
            "key 'lr_scheduler_type': 'cosin' is not an HF Trainer name (did you mean 'cosine'?)",
        ),
        ("report_to=wandbb", "key 'report_to': 'wandbb' is not a tracker the HF Trainer knows (did you mean 'wandb'?)"),
        ('report_to=["none", "wandb"]', '"none" cannot go with trackers'),
    ],
)
def test_validate_checks_the_trainers_names(capsys, setting, expected):
    code, _, err = run_cli(capsys, "validate", "--set", setting)
    assert code == 2 and expected in err, err


def test_validate_needs_no_torch_for_the_trainers_names(tmp_path):
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from autotune.cli import main\n"
        "try:\n    main(['validate', '--set', 'optimizer=nope', '--set', 'report_to=none'])\n"
        "except SystemExit as exc:\n    assert exc.code == 2\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0 and "key 'optimizer': 'nope'" in done.stderr, done.stderr


def test_the_trainers_names_are_transformers_own():
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames

    assert tuple(o.value for o in OptimizerNames) == OPTIMIZERS
    assert tuple(s.value for s in SchedulerType) == SCHEDULERS
    assert tuple(sorted(INTEGRATION_TO_CALLBACK)) == TRACKERS


def test_every_row_names_keys_autotune_has_and_says_why_otherwise():
    from autotune.config import KEY_DOCS

    for row in SPELLINGS.values():
        assert row.key not in KEY_DOCS, f"{row.key} is autotune's own key"
        assert set(row.names) <= set(KEY_DOCS), row.key
        assert row.names or row.why, row.key


def test_readme_lists_the_peers_keys():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    table = readme.split("<!-- peer-keys:start -->")[1].split("<!-- peer-keys:end -->")[0].strip()
    assert table == reference_markdown(), (
        "regenerate it: python -c 'from autotune.peers import reference_markdown; print(reference_markdown())'"
    )
