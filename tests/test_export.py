"""`autotune export` on real tiny runs: the merged model computes what base + adapter computes, the adapter
folder loads in peft, the merge streams shard by shard, and nothing half-written is ever left behind."""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import pytest
import torch
from helpers.cli import run_cli
from helpers.runs import train_tiny

from autotune.catalog import resolve_model
from autotune.errors import UserError
from autotune.export import export_run
from autotune.modeling import load_base_model

pytestmark = pytest.mark.filterwarnings("ignore:Could not find a config file:UserWarning")

# <|im_start|>user\nWhat is box 1?<|im_end|>\n<|im_start|>assistant\n
PROMPT_IDS = [151644, 872, 198, 3838, 374, 3745, 220, 16, 30, 151645, 198, 151644, 77091, 198]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, autotune_cache) -> Path:
    """A finished run on the random-init tiny Qwen3 (the demo's kind of base)."""
    tmp = tmp_path_factory.mktemp("export-run")
    summary = train_tiny(tmp)
    assert summary["status"] == "succeeded"
    return Path(summary["output_dir"])


@pytest.fixture(scope="module")
def folder_run_dir(tmp_path_factory, autotune_cache) -> Path:
    """A finished run on real weights read from a local folder (a saved tiny Qwen3 with distinct random weights)."""
    tmp = tmp_path_factory.mktemp("export-folder-run")
    base = load_base_model(
        resolve_model("tiny-qwen3"),
        init="random",
        quantization="none",
        dtype=torch.float32,
        device=torch.device("cpu"),
        seed=7,
    )
    base.save_pretrained(str(tmp / "base"), safe_serialization=True)
    summary = train_tiny(tmp, model_name=str(tmp / "base"), init="pretrained", tokenizer_name="qwen3-offline")
    assert summary["status"] == "succeeded"
    return Path(summary["output_dir"])


def base_of(run: Path):
    """The run's base model, unquantized fp32, as a plain transformers model."""
    from transformers import AutoModelForCausalLM

    cfg = json.loads((run / "autotune_config.json").read_text())
    if cfg["init"] == "random":
        spec = resolve_model(cfg["model_name"])
        return load_base_model(
            spec, init="random", quantization="none", dtype=torch.float32, device=torch.device("cpu"), seed=cfg["seed"]
        )
    return AutoModelForCausalLM.from_pretrained(cfg["model_name"], dtype=torch.float32)


def peft_model(run: Path, adapter: Path):
    from peft import PeftModel

    return PeftModel.from_pretrained(base_of(run), str(adapter)).eval()


def logits(model, ids=PROMPT_IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def greedy(model, tokenizer, n=12) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([PROMPT_IDS]),
            max_new_tokens=n,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=None,  # generate all n tokens: more to compare
        )
    return out[0, len(PROMPT_IDS) :].tolist()


def no_leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


# ------------------------------------------------------------------------------------- merged


def test_merged_model_computes_base_plus_adapter(run_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = export_run(run_dir, tmp_path / "merged", merge=True, dtype="fp32")
    assert result.merged and result.dtype == "fp32" and result.out == tmp_path / "merged"
    files = sorted(p.name for p in result.out.iterdir())
    assert files == [
        "autotune_export.json",
        "chat_template.jinja",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    config = json.loads((result.out / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"] and config["model_type"] == "qwen3"
    generation = json.loads((result.out / "generation_config.json").read_text())
    assert 151645 in generation["eos_token_id"]  # stops at <|im_end|>

    merged = AutoModelForCausalLM.from_pretrained(str(result.out)).eval()
    reference = peft_model(run_dir, run_dir)
    got, want = logits(merged), logits(reference)
    with reference.disable_adapter():
        base = logits(reference)
    assert (want - base).abs().max() > 1e-2  # the adapter changes the logits, so equality below means something
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)

    tokenizer = AutoTokenizer.from_pretrained(str(result.out))
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert greedy(merged, tokenizer) == greedy(reference, tokenizer)
    assert no_leftovers(tmp_path) == []


def test_merged_bf16_loads_as_bf16_and_stays_close(run_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    result = export_run(run_dir, tmp_path / "m16", merge=True, dtype="bf16")
    merged = AutoModelForCausalLM.from_pretrained(str(result.out)).eval()
    assert merged.dtype == torch.bfloat16
    want = logits(peft_model(run_dir, run_dir))
    got = logits(merged).float()
    assert (got - want).abs().max() < 0.05 * want.abs().max()
    assert "--outtype bf16" in result.gguf_command


def test_merge_of_folder_base_streams_shard_by_shard(folder_run_dir, tmp_path, monkeypatch):
    """Real weights read lazily from safetensors; several output shards, each written before the tensors of any
    later shard are read, so memory holds about one shard."""
    import safetensors.torch
    from transformers import AutoModelForCausalLM

    # The module (`from autotune import export` is the Python API's function of that name).
    export = importlib.import_module("autotune.export")

    events: list[tuple[str, str]] = []
    real_get, real_save = export._SafetensorsWeights.get, safetensors.torch.save_file
    monkeypatch.setattr(
        export._SafetensorsWeights, "get", lambda self, n: events.append(("get", n)) or real_get(self, n)
    )
    monkeypatch.setattr(
        safetensors.torch,
        "save_file",
        lambda t, path, **kw: events.append(("save", Path(path).name)) or real_save(t, path, **kw),
    )
    result = export_run(folder_run_dir, tmp_path / "sharded", merge=True, dtype="fp32", max_shard_bytes=100_000)

    index = json.loads((result.out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and shards == result.files
    assert all((result.out / s).is_file() for s in shards)
    shard_of = index["weight_map"]
    saved: set[str] = set()
    for kind, name in events:
        if kind == "save":
            saved.add(name)
        else:  # every shard before this tensor's is already on disk
            assert {s for s in shards if s < shard_of[name]} <= saved, name
    assert saved == set(shards)

    merged = AutoModelForCausalLM.from_pretrained(str(result.out)).eval()
    torch.testing.assert_close(logits(merged), logits(peft_model(folder_run_dir, folder_run_dir)), atol=1e-4, rtol=1e-4)


def test_qlora_bf16_run_like_the_demo_merges_into_the_unquantized_base(tmp_path_factory, autotune_cache):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tmp = tmp_path_factory.mktemp("qlora-run")
    summary = train_tiny(tmp, quantization="4bit", bf16=True, max_steps=2)
    run = Path(summary["output_dir"])
    result = export_run(run, tmp / "merged", merge=True)  # dtype auto: what the run trained in
    assert result.dtype == "bf16" and any("unquantized" in note for note in result.notes)
    merged = AutoModelForCausalLM.from_pretrained(str(result.out)).eval()
    assert merged.dtype == torch.bfloat16
    base = load_base_model(
        resolve_model("tiny-qwen3"),
        init="random",
        quantization="none",
        dtype=torch.bfloat16,
        device=torch.device("cpu"),
        seed=42,
    )
    reference = PeftModel.from_pretrained(base, str(run)).eval()
    got, want = logits(merged).float(), logits(reference).float()
    assert (got - want).abs().max() < 0.02 * want.abs().max()  # bf16 rounding of the merged weights, no more


# ------------------------------------------------------------------------------------ adapter


def test_adapter_folder_loads_in_peft(folder_run_dir, tmp_path):
    result = export_run(folder_run_dir, tmp_path / "adapter")
    files = sorted(p.name for p in result.out.iterdir())
    assert files == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "autotune_export.json",
        "chat_template.jinja",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    doc = json.loads((result.out / "adapter_config.json").read_text())
    base_folder = json.loads((folder_run_dir / "autotune_config.json").read_text())["model_name"]
    assert doc["base_model_name_or_path"] == base_folder and doc["inference_mode"] is True
    torch.testing.assert_close(
        logits(peft_model(folder_run_dir, result.out)), logits(peft_model(folder_run_dir, folder_run_dir))
    )
    assert result.gguf_command.startswith(f"python convert_lora_to_gguf.py {result.out} --base {base_folder}")
    assert result.dtype == "fp32" and result.gguf_command.endswith("--outtype f32")  # as peft saved it


def test_adapter_of_random_base_says_how_to_use_it(run_dir, tmp_path):
    result = export_run(run_dir, tmp_path / "a", dtype="bf16")
    from safetensors import safe_open

    with safe_open(str(result.out / "adapter_model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}  # noqa: SIM118
    assert result.gguf_command is None and any("--merge" in n for n in result.notes)


# ------------------------------------------------------------------------------ errors, safety


def test_a_run_that_has_not_finished_is_not_exported(run_dir, tmp_path):
    """A folder whose summary says the run is still running (killed, or resumed and stopped) holds an earlier
    adapter beside newer checkpoints: export refuses it, naming the status and the newest checkpoint, and writes
    nothing (it used to exit 0 with the old adapter)."""
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    summary = json.loads((copy / "run_summary.json").read_text())
    (copy / "run_summary.json").write_text(json.dumps({**summary, "status": "running"}))
    newer = copy / "checkpoints" / "checkpoint-9"  # complete: its trainer state is the last file a save writes
    newer.mkdir(parents=True)
    (newer / "trainer_state.json").write_text(json.dumps({"global_step": 9}))
    with pytest.raises(UserError, match=r"has not finished \(its run_summary.json says 'running'\); its newest "
                       r"checkpoint is at step 9.*--resume"):  # fmt: skip
        export_run(copy, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_overwrite_replaces_an_earlier_export_and_nothing_else(run_dir, tmp_path):
    """A folder of one's own (or another run's checkpoints) is never an export's to replace: --overwrite used to
    wipe any folder. An earlier export is replaced whole, and only what it wrote: a file the user put beside it is
    named and refused, not deleted."""
    out = tmp_path / "taken"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(UserError, match=r"not empty.*--overwrite"):
        export_run(run_dir, out)
    with pytest.raises(UserError, match=r"not an autotune export \(mine.txt\); --overwrite replaces only an earlier"):
        export_run(run_dir, out, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["mine.txt"] and (out / "mine.txt").read_text() == "keep me"
    earlier = tmp_path / "export"
    export_run(run_dir, earlier)
    assert "adapter_model.safetensors" in json.loads((earlier / "autotune_export.json").read_text())["files"]
    (earlier / "notes.txt").write_text("the user's own")
    with pytest.raises(
        UserError, match=r"files the export did not write \(notes.txt\), which --overwrite would delete"
    ):
        export_run(run_dir, earlier, dtype="bf16", overwrite=True)
    assert (earlier / "notes.txt").read_text() == "the user's own"
    (earlier / "notes.txt").unlink()
    export_run(run_dir, earlier, dtype="bf16", overwrite=True)
    assert (earlier / "adapter_model.safetensors").is_file()
    assert no_leftovers(tmp_path) == []


def test_a_killed_exports_staging_folder_is_removed_by_the_next_export(run_dir, tmp_path):
    """An export killed mid-way leaves its hidden staging folder beside --out (named with its pid); the next export
    to that place removes it once that process is gone, and leaves a live one's alone."""
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    killed = tmp_path / f".out.{int(dead.stdout)}.abc123.tmp"
    killed.mkdir()
    (killed / "model-00001-of-00002.safetensors").write_bytes(b"half")
    running = tmp_path / f".out.{os.getpid()}.def456.tmp"
    running.mkdir()
    export_run(run_dir, tmp_path / "out")
    assert not killed.exists() and running.is_dir()


def test_out_may_not_be_the_run(run_dir):
    with pytest.raises(UserError, match="would replace the run"):
        export_run(run_dir, run_dir, overwrite=True)
    with pytest.raises(UserError, match="would replace the run"):
        export_run(run_dir, run_dir.parent, overwrite=True)


def test_failed_merge_leaves_nothing(run_dir, tmp_path, monkeypatch):
    import safetensors.torch

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError):
        export_run(run_dir, tmp_path / "merged", merge=True)
    assert list(tmp_path.iterdir()) == []


def test_hub_base_not_in_the_cache_offline_is_one_clear_error(run_dir, tmp_path, monkeypatch):
    import shutil

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("checkpoints"))
    cfg = json.loads((run / "autotune_config.json").read_text())
    cfg.update(model_name="Qwen3-0.6B", init="pretrained")
    (run / "autotune_config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=r"'Qwen/Qwen3-0.6B' is not in the local Hugging Face cache and HF_HUB_OFFLINE"):
        export_run(run, tmp_path / "m", merge=True)
    assert not (tmp_path / "m").exists() and no_leftovers(tmp_path) == []


def test_not_a_run_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no such run folder"):
        export_run(tmp_path / "nope")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(UserError, match="safetensors only"):
        export_run(tmp_path / "half")


def test_cli_export_merge(run_dir, tmp_path, capsys):
    code, out, err = run_cli(capsys, "export", str(run_dir), "--merge", "--out", str(tmp_path / "m"))
    assert code == 0, err
    assert f"merged model (fp32) of tiny-qwen3 with random weights (seed 42): {tmp_path / 'm'}" in out
    assert f"python convert_hf_to_gguf.py {tmp_path / 'm'} --outfile {tmp_path / 'm'}.gguf --outtype f32" in out
    assert "merging layers" in err  # the progress bar's label (click draws the bar itself only on a terminal)
    code, _, err = run_cli(capsys, "export", str(run_dir), "--merge", "--out", str(tmp_path / "m"))
    assert code == 2 and err.startswith("error: --out") and "Traceback" not in err


def test_files_keep_the_umask(run_dir, tmp_path):
    old = os.umask(0o027)
    try:
        result = export_run(run_dir, tmp_path / "u")
    finally:
        os.umask(old)
    assert (result.out.stat().st_mode & 0o777) == 0o750
    assert {p.stat().st_mode & 0o777 for p in result.out.iterdir()} == {0o640}
