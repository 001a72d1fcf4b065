"""`autotune train` for real, on the tiny Qwen3 (real 151k vocabulary, hidden 64, 2 layers) on the CPU.

Each run is a handful of optimizer steps on ten short QA pairs: what is asserted is behaviour (the
loss falls, files are loadable, a killed run resumes to the same numbers, an OOM keeps the effective
batch), not just that nothing crashed.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from datetime import datetime
from pathlib import Path

import pytest
import torch
from helpers.cli import cli_process, run_cli
from helpers.faults import InjectOOM, stop
from helpers.runs import (
    PAIRS,
    QUIET,
    BatchRows,
    config_values,
    loss_by_step,
    read_jsonl,
    summary_file,
    tiny_profile,
    write_qa,
)

from autotune.catalog import resolve_model
from autotune.config import build_config
from autotune.context import RunContext
from autotune.errors import UserError
from autotune.runner import train

# Saving an adapter of a random-init base (no hub name) makes peft say it cannot check the vocabulary.
pytestmark = pytest.mark.filterwarnings("ignore:Could not find a config file:UserWarning")


# ---------------------------------------------------------------------------------- the model


def test_qlora_4bit_loss_falls_on_a_repeated_batch(tmp_path, autotune_cache):
    import bitsandbytes as bnb
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    from autotune.data.encoding import CausalLMCollator, encode_pairs
    from autotune.data.parsing import QAPair
    from autotune.modeling import build_model
    from autotune.step import ListDataset, make_trainer, training_arguments
    from autotune.tokenizer import load_tokenizer

    cfg = build_config(
        config_values(
            tmp_path,
            quantization="4bit",
            learning_rate=2e-2,
            lr_scheduler_type="constant",
            lora_dropout=0.0,
            max_steps=8,
        )
    )
    built = build_model(RunContext(cfg))
    quantized = [m for m in built.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    # Every linear layer of both blocks (q, k, v, o, gate, up, down) holds nf4 weights.
    assert len(quantized) == 2 * 7
    assert all(m.weight.quant_type == "nf4" for m in quantized)
    adapted = [m for m in built.model.modules() if isinstance(m, LoraLinear4bit)]
    assert len(adapted) == 2 * len(cfg.target_modules)
    trainable = [p for p in built.model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)

    tokenizer = load_tokenizer("qwen3-offline")
    pair = QAPair(question=PAIRS[0][0], answer=PAIRS[0][1], source="qa.md", line=1)
    (row,), _ = encode_pairs(tokenizer, [pair], cfg.max_sequence_length, thinking_model=True)
    args = training_arguments(cfg, built, tmp_path / "trainer", evaluate=False, save=False, progress=False)
    trainer = make_trainer(built, args, ListDataset([row] * 16), collator=CausalLMCollator(tokenizer.pad_token_id))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 8
    assert losses[-1] < losses[0] - 0.3, losses


def test_evaluating_and_saving_leave_the_4bit_base_weights_alone(tmp_path, autotune_cache):
    """On a CPU with AVX512-BF16, bitsandbytes repacks a Linear4bit on its first no-grad eval forward (block
    scales rounded to bf16) and unpacks it on state_dict() (scales re-quantized): both lossy, so every
    evaluation and checkpoint changed the frozen base, and a resumed run (fresh base) drifted from the run it
    resumed. build_model keeps the training layout. On a CPU without AVX512-BF16 this passes either way."""
    import bitsandbytes as bnb

    from autotune.modeling import build_model

    cfg = build_config(config_values(tmp_path, quantization="4bit", bf16=True, lora_dropout=0.0))
    built = build_model(RunContext(cfg))
    layers = [m for m in built.model.modules() if isinstance(m, bnb.nn.Linear4bit)]

    def dequantized():
        return [bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state) for m in layers]

    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    before = dequantized()
    built.model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        built.model(input_ids=ids)
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    built.model.state_dict()  # what every checkpoint (peft's adapter extraction) calls
    after = dequantized()
    assert all(torch.equal(a, b) for a, b in zip(before, after))


# ------------------------------------------------------------------------------ end to end


def test_train_writes_a_loadable_adapter_and_a_true_summary(make_cfg):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from autotune.modeling import load_base_model
    from autotune.tokenizer import load_tokenizer

    cfg = make_cfg(max_steps=4, save_every_n_steps=2)
    summary = train(cfg, **QUIET)
    out = Path(cfg.output_dir)

    assert summary["status"] == "succeeded"
    assert summary_file(cfg) == json.loads(json.dumps(summary, default=str))
    final = summary["final"]
    assert final["global_step"] == cfg.max_steps
    assert math.isfinite(final["last_loss"]) and final["last_loss"] < final["first_loss"]
    assert final["eval_loss"] is not None  # 1 of 10 pairs held out, evaluated at steps 2 and 4
    assert summary["oom_recoveries"] == []
    assert summary["data"]["pairs"] == len(PAIRS)

    saved_cfg = json.loads((out / "autotune_config.json").read_text(encoding="utf-8"))
    assert saved_cfg == json.loads(json.dumps(cfg.to_dict()))
    assert build_config(saved_cfg) == cfg  # the saved config reproduces the run

    # The adapter loads onto a freshly built base (same seeded random init) and is what was saved.
    adapter_config = json.loads((out / "adapter_config.json").read_text(encoding="utf-8"))
    assert adapter_config["r"] == cfg.lora_r and adapter_config["lora_alpha"] == cfg.lora_alpha
    assert sorted(adapter_config["target_modules"]) == sorted(cfg.target_modules)
    saved = load_file(str(out / "adapter_model.safetensors"))
    assert len(saved) == 2 * len(cfg.target_modules) * 2  # layers x targets x (A, B)
    spec = resolve_model(cfg.model_name)
    base = load_base_model(
        spec, init="random", quantization="none", dtype=torch.float32, device=torch.device("cpu"), seed=cfg.seed
    )
    model = PeftModel.from_pretrained(base, str(out))
    state = model.state_dict()
    for key, tensor in saved.items():
        loaded = state[key.replace(".weight", ".default.weight")]
        assert torch.equal(loaded, tensor), key
        if "lora_B" in key:
            assert tensor.abs().sum() > 0, f"{key} is still its zero init: training did not reach the file"
    ids = torch.tensor([[151644, 872, 198, 9707, 151645]])
    with torch.no_grad():
        tuned = model(input_ids=ids).logits
        with model.disable_adapter():
            plain = model(input_ids=ids).logits
    assert not torch.allclose(tuned, plain)

    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).is_file(), name
    text = "Q: what is box 3?\n<|im_start|>assistant"
    assert (
        AutoTokenizer.from_pretrained(str(out))(text)["input_ids"] == load_tokenizer("qwen3-offline")(text)["input_ids"]
    )


def test_failed_run_summary_says_failed_with_the_error(make_cfg, tmp_path):
    empty = tmp_path / "nothing"
    empty.mkdir()
    (empty / "notes.md").write_text("Some notes, but no Q1:/A1: pairs.\n", encoding="utf-8")
    cfg = make_cfg(data_dir=str(empty))
    with pytest.raises(UserError, match="no QA pairs") as caught:
        train(cfg, **QUIET)
    summary = summary_file(cfg)
    assert summary["status"] == "failed"
    assert summary["error"] == str(caught.value)
    assert "final" not in summary and "traceback" not in summary
    last = read_jsonl(cfg)[-1]
    assert (last["level"], last["message"]) == ("ERROR", "run failed")


# ---------------------------------------------------------------------------- logging


def test_tensorboard_event_files_hold_the_training_scalars(make_cfg):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = make_cfg(enable_tensorboard=True, max_steps=3)
    train(cfg, **QUIET)
    tb_dir = Path(cfg.log_dir) / "tensorboard"
    events = list(tb_dir.rglob("events.out.tfevents*"))
    assert events
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    scalars = acc.Tags()["scalars"]
    assert "train/loss" in scalars and "train/tokens_per_second" in scalars
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3]
    losses = loss_by_step(read_jsonl(cfg))
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx([losses[s] for s in (1, 2, 3)])
    assert all(e.value > 0 for e in acc.Scalars("train/tokens_per_second"))


def test_tensorboard_off_writes_no_event_files(make_cfg, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # so that a writer with a relative default dir (./runs) would show too
    cfg = make_cfg(enable_tensorboard=False, max_steps=2)
    train(cfg, **QUIET)
    assert loss_by_step(read_jsonl(cfg))  # it did log, to the JSONL file only
    assert not list(tmp_path.rglob("events.out.tfevents*"))


def test_jsonl_records_carry_the_documented_fields(make_cfg):
    cfg = make_cfg(max_steps=2, structured_logging={"include_memory_stats": True, "include_model_stats": True})
    summary = train(cfg, **QUIET)
    records = read_jsonl(cfg)
    for r in records:
        assert {"timestamp", "level", "component", "message", "metrics", "memory"} <= set(r), r
        assert datetime.fromisoformat(r["timestamp"]).tzinfo is not None
        assert r["level"] in ("DEBUG", "INFO", "WARNING", "ERROR")
        assert isinstance(r["metrics"], dict)
        assert r["memory"]["process_rss_gb"] > 0
    started = next(r for r in records if r["message"] == "training started")
    counts = {k: summary["model"][k] for k in ("trainable_parameters", "total_parameters")}
    assert started["metrics"] == counts
    assert 0 < counts["trainable_parameters"] < counts["total_parameters"]
    assert (started["batch_size"], started["gradient_accumulation_steps"], started["max_steps"]) == (2, 1, 2)
    assert sorted(loss_by_step(records)) == [1, 2]
    assert all("tokens_per_second" in r["metrics"] for r in records if "loss" in r["metrics"])
    assert records[-1]["message"] == "run succeeded"


def test_jsonl_without_memory_or_model_stats(make_cfg):
    cfg = make_cfg(max_steps=1, structured_logging={"include_memory_stats": False, "include_model_stats": False})
    train(cfg, **QUIET)
    records = read_jsonl(cfg)
    assert len(records) >= 4  # dataset ready, training started, metrics, run succeeded
    assert all("memory" not in r for r in records)
    started = next(r for r in records if r["message"] == "training started")
    assert "trainable_parameters" not in started["metrics"]


# ----------------------------------------------------------------------------- OOM recovery


def test_oom_halves_the_batch_keeps_the_effective_batch_and_repeats_no_step(make_cfg):
    common = dict(
        batch_size=2,
        gradient_accumulation_steps=1,
        max_steps=6,
        save_every_n_steps=100,
        lora_dropout=0.0,
        eval_ratio=0.0,
    )
    cfg = make_cfg("oom", **common)
    rows = BatchRows()
    summary = train(cfg, extra_callbacks=[InjectOOM({3}), rows], **QUIET)

    assert summary["status"] == "succeeded" and summary["final"]["global_step"] == 6
    assert summary_file(cfg)["oom_recoveries"] == summary["oom_recoveries"]
    (change,) = summary["oom_recoveries"]
    assert change["at_step"] == 3
    assert change["batch_size"] == [2, 1] and change["gradient_accumulation_steps"] == [1, 2]
    assert change["effective_batch_size"] == 2
    assert "injected OOM" in change["error"]

    records = read_jsonl(cfg)
    steps = [r["global_step"] for r in records if r["message"] == "metrics" and "loss" in r["metrics"]]
    assert steps == [1, 2, 3, 4, 5, 6]  # every step exactly once, none repeated after the recovery
    starts = [
        (r["global_step"], r["batch_size"], r["gradient_accumulation_steps"])
        for r in records
        if r["message"] == "training started"
    ]
    assert starts == [(0, 2, 1), (3, 1, 2)]
    assert any(r["level"] == "WARNING" and r["component"] == "oom" for r in records)
    # tokens/s counts only the tokens of this attempt: the resumed trainer starts with the
    # checkpoint's num_input_tokens_seen, which must not be credited to its first step.
    since, seen_then = None, 0
    for r in records:
        now = datetime.fromisoformat(r["timestamp"])
        if r["message"] == "training started":  # the clock restarts; tokens so far are the checkpoint's
            since = now
        elif r["message"] == "metrics" and "loss" in r["metrics"]:
            seen = r["metrics"]["num_input_tokens_seen"]
            rate = (seen - seen_then) / (now - since).total_seconds()
            assert 0.8 < r["metrics"]["tokens_per_second"] / rate < 1.25, (r["global_step"], r["metrics"], rate)
            since, seen_then = now, seen
    # The micro-batch really halved: full steps before the OOM ran 2 rows, after it 2 x 1 row.
    per_step: dict[int, list[int]] = {}
    for step, n in rows.seen:
        per_step.setdefault(step, []).append(n)
    assert per_step[1] == per_step[2] == per_step[3] == [2]
    assert per_step[4] == [1, 1] and per_step[6] == [1, 1]

    # Same samples, same effective batch: the losses match a run that never ran out of memory.
    baseline_cfg = make_cfg("baseline", **common)
    train(baseline_cfg, **QUIET)
    expected = loss_by_step(read_jsonl(baseline_cfg))
    got = loss_by_step(records)
    assert got == pytest.approx(expected, rel=1e-4)


def test_oom_at_batch_one_says_what_to_lower(make_cfg):
    cfg = make_cfg(
        batch_size=1, gradient_accumulation_steps=2, max_steps=3, structured_logging={"log_level": "WARNING"}
    )
    with pytest.raises(UserError) as caught:
        train(cfg, extra_callbacks=[InjectOOM({1})], **QUIET)
    message = str(caught.value)
    assert "out of GPU memory at step 1 with batch_size=1" in message
    for hint in ("max_sequence_length (now 64)", "lora_r (now 4)", 'quantization="4bit"', "autotune solve"):
        assert hint in message
    summary = summary_file(cfg)
    assert summary["status"] == "failed" and summary["error"] == message
    assert summary["oom_recoveries"] == []
    # log_level WARNING: the INFO records of step 1 (dataset, start, metrics) are filtered out.
    records = read_jsonl(cfg)
    assert [(r["level"], r["message"]) for r in records] == [
        ("ERROR", "out of memory, giving up"),
        ("ERROR", "run failed"),
    ]


def test_oom_gives_up_after_max_oom_retries(make_cfg):
    cfg = make_cfg(batch_size=4, gradient_accumulation_steps=1, max_steps=3, max_oom_retries=1)
    with pytest.raises(UserError, match="after 1 halvings") as caught:
        train(cfg, extra_callbacks=[InjectOOM({1, 2})], **QUIET)
    assert "batch_size=2" in str(caught.value)
    summary = summary_file(cfg)
    assert summary["status"] == "failed"
    # The one recovery that did happen is in the failed run's summary too.
    assert [(c["at_step"], c["batch_size"]) for c in summary["oom_recoveries"]] == [(1, [4, 2])]


# ----------------------------------------------------------------------------------- resume


# The default config: QLoRA (nf4 + double quant), bf16, paged 8-bit AdamW, LoRA dropout 0.1 and an
# evaluation at every checkpoint; and the plain fp32 + adamw_torch run the test covered before.
DEFAULT_PRECISION = dict(eval_ratio=0.1, quantization="4bit", bf16=True, optimizer="paged_adamw_8bit")
FP32_PRECISION = dict(eval_ratio=0.0)
# The tiny Qwen3-MoE: adapters on every expert (no dropout: PEFT's expert adapters take none), the router's
# load-balancing loss in the loss, the experts in NF4 (experts_4bit: the adapters applied per routed expert); the data
# order and the routing must come back as they were.
MOE = dict(eval_ratio=0.0, model_name="tiny-qwen3-moe", lora_dropout=0.0, experts_4bit="on")
# The tiny Qwen3.5 hybrid: adapters in its Gated DeltaNet and gated attention layers, its own tokenizer.
HYBRID = dict(
    eval_ratio=0.0,
    model_name="tiny-qwen3.5",
    tokenizer_name=None,
    target_modules=["q_proj", "v_proj", "in_proj_qkv", "out_proj"],
)


@pytest.mark.parametrize(
    "precision", [DEFAULT_PRECISION, FP32_PRECISION, MOE, HYBRID], ids=["default", "fp32", "moe", "hybrid"]
)
def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path, autotune_cache, capsys, precision):
    # lora_dropout stays on where it can: resuming must restore the RNG state, not only weights and optimizer.
    # 5 steps, checkpoints at 2 and 4: killed at checkpoint-2, the resume trains 3 steps (1 if checkpoint-4 slipped in).
    common = {**dict(max_steps=5, save_every_n_steps=2, log_every_n_steps=1, lora_dropout=0.1), **precision}
    values = config_values(tmp_path / "killed", enable_tensorboard=True, **common)
    config_path = tmp_path / "killed.json"
    config_path.write_text(json.dumps(values), encoding="utf-8")
    out = Path(values["output_dir"])
    checkpoint = out / "checkpoints" / "checkpoint-2"

    proc = cli_process("train", "--config", str(config_path))
    deadline = time.monotonic() + 300
    try:
        while not checkpoint.is_dir():
            if proc.poll() is not None:
                pytest.fail(
                    f"training exited (rc {proc.returncode}) before checkpoint-2:\n{proc.stderr.read()[-3000:]}"
                )
            if time.monotonic() > deadline:
                pytest.fail("no checkpoint-2 within 300 s")
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        stop(proc)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "adapter_model.safetensors").exists(), "the run finished before it was killed"
    # A save is renamed into place whole: checkpoint-2 exists, so it is complete.
    assert (checkpoint / "trainer_state.json").is_file()

    # The resume runs in this process (the kill is what needs a process of its own): the command as a user runs it.
    code, stdout, stderr = run_cli(capsys, "train", "--config", str(config_path), "--resume")
    assert code == 0, stderr[-3000:]
    assert "training succeeded" in stdout

    baseline = build_config(config_values(tmp_path / "uninterrupted", **common))
    expected = train(baseline, **QUIET)

    cfg = build_config(values)
    got = summary_file(cfg)
    assert got["status"] == "succeeded"
    assert got["final"]["global_step"] == expected["final"]["global_step"] == 5
    # Same arithmetic in both processes: a resume reproduces the run bit for bit (README, "Resume").
    assert got["final"]["last_loss"] == expected["final"]["last_loss"]
    records = read_jsonl(cfg)  # both processes appended to it
    starts = [r["global_step"] for r in records if r["message"] == "training started"]
    # Not from scratch: from checkpoint-2, or from checkpoint-4 when a save slipped in before the kill.
    assert len(starts) == 2 and starts[0] == 0 and starts[1] in (2, 4), starts
    # Each step logged once: the killed attempt's records of the steps re-run after the resume are gone.
    steps = [r["global_step"] for r in records if r["message"] == "metrics" and "loss" in r["metrics"]]
    assert steps == list(range(1, 6)), steps
    assert {r["run_id"] for r in records} == {got["run_id"]}  # one run, resumed
    # Every step, including those re-run after the resume, matches the uninterrupted run.
    assert loss_by_step(records) == loss_by_step(read_jsonl(baseline))
    # TensorBoard too: the resume writes into the run's own folder, and what the killed attempt logged past the
    # checkpoint is purged (purge_step), so each step shows once with the resumed run's loss.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from autotune.runner import tensorboard_dir

    acc = EventAccumulator(str(tensorboard_dir(cfg, got["run_id"])))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 6))
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx(
        [loss_by_step(records)[s] for s in range(1, 6)]
    )


def test_a_finished_run_resumed_trains_nothing_and_a_lost_final_save_is_written_from_its_checkpoint(tmp_path):
    """transformers' loop checks for the end only after a step: resuming a finished run used to train one more step
    and replace the finished adapter. Now it trains nothing and writes nothing, and says so; where the final save
    never completed (a full disk: the message says to --resume), the outputs are written from the last checkpoint,
    which holds every step, without a step more."""
    from safetensors.torch import load_file

    cfg = build_config(config_values(tmp_path, max_steps=4, save_every_n_steps=2))
    first = train(cfg, **QUIET)
    out = Path(cfg.output_dir)
    adapter = out / "adapter_model.safetensors"
    finished = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    log_before = Path(cfg.structured_logging.log_file).read_bytes()
    said: list[str] = []

    again = train(cfg, resume=True, echo=said.append)
    assert again["already_finished"] and again["final"]["global_step"] == 4
    assert any("nothing to train" in line for line in said), said
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == finished  # nothing rewritten
    assert Path(cfg.structured_logging.log_file).read_bytes() == log_before

    # The final save lost (as after a full disk): no adapter, and a summary that never reached "succeeded".
    weights = load_file(str(adapter))
    adapter.unlink()
    summary_path = out / "run_summary.json"
    summary_path.write_text(json.dumps({**first, "status": "failed"}), encoding="utf-8")
    redone = train(cfg, resume=True, **QUIET)
    assert redone["status"] == "succeeded" and redone["final"]["global_step"] == 4
    again_weights = load_file(str(adapter))
    assert set(again_weights) == set(weights) and all(torch.equal(again_weights[k], weights[k]) for k in weights)
    steps = [r["global_step"] for r in read_jsonl(cfg) if r["message"] == "metrics" and "loss" in r["metrics"]]
    assert max(steps) == 4  # not a step more


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory, autotune_cache):
    """The config values of a finished 4-step run with checkpoints at steps 2 and 4."""
    values = config_values(
        tmp_path_factory.mktemp("two-checkpoints"), max_steps=4, save_every_n_steps=2, eval_ratio=0.0
    )
    train(build_config(values), **QUIET)
    return values


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 3)])


@pytest.mark.parametrize(
    "damage,file",
    [
        (_truncate, "optimizer.pt"),
        (_truncate, "adapter_model.safetensors"),
        (lambda p: p.write_text('{"global_step": 4,'), "trainer_state.json"),
        (Path.unlink, "adapter_model.safetensors"),
        (Path.unlink, "optimizer.pt"),
    ],
    ids=["optimizer-truncated", "adapter-truncated", "state-malformed", "adapter-missing", "optimizer-missing"],
)
def test_a_damaged_checkpoint_is_one_clear_error_naming_the_intact_one(two_checkpoints, tmp_path, capsys, damage, file):
    """A truncated optimizer.pt or adapter, or a malformed trainer_state.json, was a raw traceback on --resume; a
    missing adapter a traceback that marked the finished run failed, a missing optimizer.pt a resume with a fresh
    optimizer, said nowhere."""
    import shutil

    values = two_checkpoints
    out = tmp_path / "out"
    shutil.copytree(values["output_dir"], out)
    damage(out / "checkpoints" / "checkpoint-4" / file)
    config = tmp_path / "c.json"
    config.write_text(json.dumps({**values, "output_dir": str(out)}))
    code, _out, err = run_cli(capsys, "train", "--config", str(config), "--resume")
    assert code == 2 and "Traceback" not in err, err[-2000:]
    assert f"checkpoint-4 is damaged ({file}:" in err and "the newest intact one is checkpoint-2" in err
    assert json.loads((out / "run_summary.json").read_text(encoding="utf-8"))["status"] == "succeeded"  # untouched


def test_resuming_with_another_alpha_or_data_says_so(two_checkpoints, tmp_path):
    """lora_alpha (the adapter's scale) and data_dir change what the rest of a run trains without breaking a tensor's
    shape: a resume may change them, and now says it does (it went on silently)."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(two_checkpoints["output_dir"], out)
    data = tmp_path / "more"
    write_qa(data, PAIRS[:6])
    values = {**two_checkpoints, "output_dir": str(out), "max_steps": 5, "lora_alpha": 16, "data_dir": str(data)}
    said: list[str] = []
    summary = train(build_config(values), resume=True, echo=said.append)
    assert summary["status"] == "succeeded" and summary["final"]["global_step"] == 5
    notes = [line for line in said if line.startswith("note: resuming checkpoint-4 with")]
    assert len(notes) == 1, said
    (note,) = notes
    assert "lora_alpha 8 -> 16" in note and f"-> {str(data)!r}" in note


def test_resume_without_a_checkpoint_is_a_user_error_and_writes_nothing(make_cfg):
    cfg = make_cfg()
    with pytest.raises(UserError, match="no complete checkpoint"):
        train(cfg, resume=True, **QUIET)
    # A bad input: nothing written, not even the output folder, its lock or the log.
    assert not Path(cfg.output_dir).exists()
    assert not Path(cfg.structured_logging.log_file).exists()
    # A checkpoint folder from before saves were atomic, cut short by a kill (no trainer_state.json), is not
    # resumable either.
    partial = Path(cfg.output_dir) / "checkpoints" / "checkpoint-4"
    partial.mkdir(parents=True)
    (partial / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="no complete checkpoint"):
        train(cfg, resume=True, **QUIET)
    assert sorted(p.name for p in Path(cfg.output_dir).iterdir()) == ["checkpoints"]


def test_resume_picks_the_newest_complete_checkpoint(tmp_path):
    from autotune.runner import last_complete_checkpoint

    assert last_complete_checkpoint(tmp_path / "missing") is None
    for step, complete in ((2, True), (10, True), (12, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if complete:
            (folder / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-x").mkdir()
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-10")  # numeric order; 12 cut short


# -------------------------------------------------------------------------------- inference


def test_inference_report_has_base_and_tuned_answers_and_whole_references(make_cfg, tmp_path):
    long_pairs = [
        (q, a + " " + " ".join(f"Detail {n} about box {i} follows here, stated in full." for n in range(12)))
        for i, (q, a) in enumerate(PAIRS, 1)
    ]
    data = write_qa(tmp_path / "long", long_pairs)
    cfg = make_cfg(
        data_dir=str(data), max_steps=2, enable_inference_test=True, inference_samples=1, inference_max_new_tokens=8
    )
    summary = train(cfg, **QUIET)
    assert (summary["inference_report"]["samples"], summary["inference_report"]["trained_samples"]) == (1, 1)
    out = Path(cfg.output_dir)
    report = json.loads((out / "inference_report.json").read_text(encoding="utf-8"))
    (sample,) = report["samples"]
    (trained,) = report["trained_samples"]
    for row in (sample, trained):
        assert {"question", "reference", "base", "tuned"} <= set(row)
        assert (row["question"], row["reference"]) in long_pairs  # answers whole
        assert isinstance(row["base"], str) and isinstance(row["tuned"], str)
        assert 0 <= row["base_token_match"] <= 1 and 0 <= row["tuned_token_match"] <= 1
    assert sample["question"] != trained["question"]  # one held out, one trained on
    assert report["trained_token_match"]["tuned"] == trained["tuned_token_match"]
    markdown = (out / "inference_report.md").read_text(encoding="utf-8")
    assert len(sample["reference"]) > 500  # far longer than the 64-token training window
    for row in (sample, trained):
        assert row["reference"] in markdown and row["question"] in markdown
    assert "Questions it was trained on" in markdown and "Held-out questions" in markdown
    assert "memorisation by a tiny random model" in markdown  # init=random: said plainly


def test_token_match_counts_reference_tokens_reproduced_in_place():
    from autotune.inference import token_match

    assert token_match([5, 6, 7], [5, 6, 7], max_new_tokens=8) == 1.0
    assert token_match([5, 9, 7, 1, 1], [5, 6, 7], max_new_tokens=8) == pytest.approx(2 / 3)
    assert token_match([6, 7], [5, 6, 7], max_new_tokens=8) == 0.0  # shifted by one: nothing in place
    assert token_match([], [5, 6, 7], max_new_tokens=8) == 0.0
    # Only as much of the reference as the answer was allowed to be long.
    assert token_match([5, 6], [5, 6, 7, 8], max_new_tokens=2) == 1.0
    assert token_match([1], [], max_new_tokens=8) is None


# ---------------------------------------------------------------------------------- profiles


def test_train_with_profile_uses_its_choice(tmp_path, capsys, autotune_cache):
    from autotune.cli import main
    from autotune.profile import save_profile

    values = config_values(tmp_path, max_steps=2)
    assert (values["batch_size"], values["lora_r"]) == (2, 4)  # the profile must change these
    config_path = tmp_path / "cfg.json"
    config_path.write_text(json.dumps(values), encoding="utf-8")
    profile = tiny_profile()
    profile_path = save_profile(profile, tmp_path / "profile.json")
    try:
        main(["train", "--config", str(config_path), "--profile", str(profile_path)])
        code = 0
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    out = Path(values["output_dir"])
    used = json.loads((out / "autotune_config.json").read_text(encoding="utf-8"))
    assert (used["batch_size"], used["gradient_accumulation_steps"], used["lora_r"]) == (1, 2, 2)
    assert used["target_modules"] == ["q_proj", "k_proj"] and used["max_memory_gb"] == 2.0
    assert json.loads((out / "adapter_config.json").read_text(encoding="utf-8"))["r"] == 2
    assert json.loads((out / "profile.json").read_text(encoding="utf-8")) == profile
    records = [json.loads(line) for line in Path(values["structured_logging"]["log_file"]).read_text().splitlines()]
    started = next(r for r in records if r["message"] == "training started")
    assert (started["batch_size"], started["gradient_accumulation_steps"]) == (1, 2)
    assert "training succeeded" in captured.out


def test_train_with_a_corrupt_profile_exits_2_without_traceback(tmp_path, capsys):
    config_path = tmp_path / "cfg.json"
    config_path.write_text(json.dumps(config_values(tmp_path)), encoding="utf-8")
    bad = tmp_path / "profile.json"
    bad.write_text('{"schema_version": 1, "kind": "autotune.profile", "choice": {', encoding="utf-8")
    code, _stdout, stderr = run_cli(capsys, "train", "--config", str(config_path), "--profile", str(bad))
    assert code == 2, stderr
    assert "Traceback" not in stderr
    assert f"error: {bad}:1:" in stderr and "corrupt" in stderr and "autotune solve" in stderr
    assert not (tmp_path / "out").exists()  # nothing trained


@pytest.mark.parametrize(
    "batch,effective,expected",
    [
        (2, 2, (1, 2)),
        (8, 64, (4, 16)),
        (3, 6, (1, 6)),
        (6, 12, (3, 4)),
        (5, 15, (1, 15)),
        (4, 12, (2, 6)),
    ],
)
def test_smaller_batch_keeps_the_effective_batch_exactly(batch, effective, expected):
    from autotune.batching import BatchPlan

    smaller = BatchPlan(batch, effective // batch).smaller()
    assert smaller is not None
    new, accumulation = smaller.micro, smaller.accumulation
    assert (new, accumulation) == expected
    assert new <= batch // 2 and new * accumulation == effective


@pytest.mark.parametrize(
    "section,value",
    [("hardware", None), ("constraints", []), ("model", None), ("trials", {}), ("measurement", "x"), ("config", [1])],
)
def test_a_parseable_but_corrupt_profile_is_one_clear_error(tmp_path, section, value):
    from autotune.profile import load_profile, save_profile

    doc = tiny_profile()
    doc[section] = value
    path = save_profile(doc, tmp_path / "p.json")
    with pytest.raises(UserError, match=f"corrupt.*'{section}'"):
        load_profile(path)


def test_a_profile_from_before_a_technique_existed_loads_with_it_off_and_says_so(tmp_path):
    """A profile written before the tiled MLP (its choice and config lack the key, its list of techniques too)
    loads with the technique off, as its trials ran, and a note says so; train reads the same."""
    from autotune.profile import apply_profile, load_profile, save_profile
    from autotune.techniques import TECHNIQUES

    doc = tiny_profile()
    del doc["choice"]["tiled_mlp"]
    doc["techniques"] = [t for t in TECHNIQUES if t != "tiled_mlp"]
    doc["autotune_version"] = "0.0.9"
    doc["config"] = {"model_name": "tiny-qwen3"}
    path = save_profile(doc, tmp_path / "old.json")
    notes: list[str] = []
    loaded = load_profile(path, notes)
    assert loaded["choice"]["tiled_mlp"] == "off" and loaded["config"]["tiled_mlp"] == "off"
    (note,) = notes
    assert "autotune 0.0.9, before tiled_mlp existed: it is off, as its trials ran" in note
    assert apply_profile(build_config({}), loaded).tiled_mlp == "off"  # type: ignore[attr-defined]
    # A profile without the list (written before profiles kept one) reads the same way.
    del doc["techniques"]
    assert load_profile(save_profile(doc, tmp_path / "older.json"))["choice"]["tiled_mlp"] == "off"


def test_a_profile_missing_a_technique_its_writer_knew_or_from_a_newer_schema_is_refused(tmp_path):
    from autotune.profile import SCHEMA_VERSION, load_profile, save_profile

    doc = tiny_profile()
    del doc["choice"]["tiled_mlp"]  # its writer listed it: a damaged file, not an old one
    with pytest.raises(UserError, match=r"missing keys \['tiled_mlp'\], which its writer knew"):
        load_profile(save_profile(doc, tmp_path / "damaged.json"))
    newer = tiny_profile()
    newer["schema_version"] = SCHEMA_VERSION + 1
    with pytest.raises(UserError, match="written by a newer autotune"):
        load_profile(save_profile(newer, tmp_path / "newer.json"))


def test_train_prints_the_note_of_a_profile_from_before_a_technique(tmp_path, capsys):
    from autotune.cli import main
    from autotune.profile import save_profile

    doc = tiny_profile()
    del doc["choice"]["tiled_mlp"]
    doc["techniques"] = ["fused_loss"]
    path = save_profile(doc, tmp_path / "old.json")
    # --resume with no run to resume: the profile is read, its note said, then the run refused (nothing trained).
    config = tmp_path / "c.json"
    config.write_text(json.dumps(config_values(tmp_path)), encoding="utf-8")
    with pytest.raises(SystemExit) as exc:
        main(["train", "--config", str(config), "--profile", str(path), "--resume"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "warning: " in err and "before tiled_mlp existed: it is off" in err and "no complete checkpoint" in err


def test_train_with_only_a_profile_trains_what_it_was_solved_for(tmp_path, capsys, autotune_cache):
    """No --config: the profile's own config (model, tokenizer, data, output) is the base."""
    from autotune.cli import main
    from autotune.profile import save_profile

    values = config_values(tmp_path, max_steps=1)
    doc = tiny_profile()
    doc["config"] = values
    path = save_profile(doc, tmp_path / "p.json")
    try:
        main(["train", "--profile", str(path), "--set", "enable_inference_test=false"])
    except SystemExit as exc:
        assert exc.code in (0, None), capsys.readouterr().err
    saved = json.loads((Path(values["output_dir"]) / "autotune_config.json").read_text())
    assert saved["model_name"] == "tiny-qwen3" and saved["data_dir"] == values["data_dir"]
    assert saved["batch_size"] == 1 and saved["lora_r"] == 2  # the profile's choice still wins
    assert saved["enable_inference_test"] is False  # and --set over both
