"""`autotune estimate`: a peak prediction by component and the largest shapes, with no GPU."""

import json
import re

import pytest
from helpers.cli import run_cli

from autotune.catalog import resolve_model
from autotune.cli import main
from autotune.estimate import COMPONENTS, error_band, estimate_peak


def run(capsys, *args):
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def run_ok(capsys, *args):
    try:
        main(list(args))
    except SystemExit as exc:  # click may exit 0 explicitly
        assert exc.code in (0, None)
    return capsys.readouterr()


def test_estimate_json_for_qwen3_14b_at_16gb(capsys):
    out = run_ok(
        capsys,
        "estimate",
        "--model",
        "Qwen3-14B",
        "--max-memory-gb",
        "16",
        "--seq",
        "512",
        "--batch",
        "2",
        "--rank",
        "16",
        "--json",
    ).out
    doc = json.loads(out)
    assert doc["model"] == "Qwen3-14B" and doc["shape"]["batch"] == 2 and doc["shape"]["seq"] == 512
    assert doc["shape"]["rank"] == 16 and doc["shape"]["quantization"] == "4bit"
    parts = doc["components_gb"]
    assert tuple(parts) == COMPONENTS
    assert abs(sum(parts.values()) - doc["peak_gb"]) < 0.01
    # 14B in 4-bit: ~9 GiB of weights, so a 16 GiB card fits a small batch, not a large one.
    assert 8 < parts["weights"] < 11
    expected = estimate_peak(
        resolve_model("Qwen3-14B").architecture,
        batch=2,
        seq=512,
        rank=16,
        lora_dropout=0.1,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        fused_loss=True,  # the defaults' techniques: auto means the fused loss and packing
        packing=True,
    )
    assert doc["shape"]["fused_loss"] is True and doc["shape"]["packing"] is True
    assert doc["peak_bytes"] == expected.peak_bytes
    assert doc["fits"] is True and doc["largest_batch_at_seq"] >= 2 and doc["largest_seq_at_batch"] >= 512
    bigger = estimate_peak(
        resolve_model("Qwen3-14B").architecture,
        batch=doc["largest_batch_at_seq"] + 1,
        seq=512,
        rank=16,
        lora_dropout=0.1,
        fused_loss=True,
        packing=True,
    )
    # The largest-fit answers keep to the safe side of the estimate's measured error band.
    assert bigger.peak_bytes > 16 * 2**30 * 0.95 * (1 + error_band()[0])


def test_estimate_table_says_when_it_does_not_fit(capsys):
    out = run_ok(capsys, "estimate", "--model", "Qwen3-14B", "--max-memory-gb", "8", "--batch", "1").out
    assert "does NOT fit 8 GiB" in out and "weights" in out and "peak" in out


def test_when_nothing_fits_the_estimate_says_so_in_words(capsys):
    # 14B's 4-bit weights alone exceed 6 GiB: no batch and no sequence fits, and "batch 0" is no plan
    out = run_ok(capsys, "estimate", "--model", "Qwen3-14B", "--max-memory-gb", "6").out
    assert "no batch at seq" in out and "no sequence at batch" in out and "batch 0" not in out
    assert "nothing of this shape is predicted to fit" in out and "--strategy fsdp" in out


def test_estimate_unknown_model_is_a_clear_error(capsys):
    code, _out, err = run(capsys, "estimate", "--model", "Qwen3-7B")
    assert code == 2 and "Qwen3-8B" in err and "Traceback" not in err


def test_estimate_says_what_every_technique_would_buy_and_how_to_ask_for_it(capsys):
    """Qwen3-8B r=32 on a 16 GB card: with the config's techniques the longest batch-1 sequence is ~13.5k tokens;
    with every memory technique the model takes, ~40k. Both are said, with the --set line that switches them on."""
    args = ["estimate", "--model", "Qwen3-8B", "--max-memory-gb", "16", "--batch", "1", "--rank", "32"]
    out = run_ok(capsys, *args).out
    own = re.search(r"predicted to fit.*seq (\d+) at batch 1", out)
    lean = re.search(r"with every memory technique this model takes \((.*)\): .*seq (\d+) at batch 1", out)
    assert own and lean, out
    assert int(lean.group(2)) > 2 * int(own.group(1))
    sets = lean.group(1).split()  # --set key=value ...
    assert {"offload_activations=on", "embedding_on_cpu=on", "tiled_mlp=on"} <= set(sets[1::2])
    doc = json.loads(run_ok(capsys, *args, "--json").out)["with_every_technique"]
    assert doc["largest_seq_at_batch"] == int(lean.group(2)) and doc["set"]["offload_activations"] == "on"
    # With every one of them already on, there is nothing more to say.
    out = run_ok(capsys, *args, *sets).out
    assert "with every memory technique" not in out and f"seq {lean.group(2)} at batch 1" in out


@pytest.mark.parametrize(
    "flag,value,message",
    [
        ("--seq", "1000000000000", "is more than the 40960 positions Qwen3-8B supports"),
        ("--rank", "100000000", "is more than Qwen3-8B's hidden size 4096"),
    ],
)
def test_the_shape_flags_are_held_to_the_bounds_a_run_is(capsys, flag, value, message):
    """--seq and --rank had no upper bound: a sequence of 10^12 tokens or a rank of 10^8 got an answer. They go
    through the config, whose checks a run meets too."""
    code, out, err = run_cli(capsys, "estimate", "--model", "Qwen3-8B", flag, value)
    assert code == 2 and out == "" and message in err and "Traceback" not in err
