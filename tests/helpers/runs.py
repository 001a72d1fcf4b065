"""Short real trainings of the tiny Qwen3 on the CPU, and what tests read back from them: the one copy of the
test runs' config, data and log readers."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import TrainerCallback

from autotune.catalog import resolve_model
from autotune.config import Config, build_config

QUIET = dict(echo=lambda message: None)

PAIRS = [
    (f"What is the code word for box {i}?", f"The code word for box {i} is {word}.")
    for i, word in enumerate(
        ["amber", "birch", "cedar", "delta", "ember", "fjord", "grove", "heron", "inlet", "juniper"], 1
    )
]


def write_qa(folder: Path, pairs) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    text = "".join(f"Q{i}: {q}\nA{i}: {a}\n\n" for i, (q, a) in enumerate(pairs, 1))
    (folder / "qa.md").write_text(text, encoding="utf-8")
    return folder


def config_values(tmp: Path, **overrides) -> dict:
    """A few-second CPU run; every path inside `tmp`."""
    values = dict(
        model_name="tiny-qwen3",
        init="random",
        tokenizer_name="qwen3-offline",
        quantization="none",
        bf16=False,
        optimizer="adamw_torch",  # bf16 autocast is ~4x slower on this CPU
        batch_size=2,
        gradient_accumulation_steps=1,
        max_steps=4,
        max_sequence_length=64,
        learning_rate=1e-2,
        warmup_ratio=0.0,
        lora_r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        data_cache_dir=str(tmp / "cache"),
        output_dir=str(tmp / "out"),
        log_dir=str(tmp / "logs"),
        structured_logging={"log_file": str(tmp / "logs" / "run.jsonl")},
        enable_tensorboard=False,
        enable_inference_test=False,
        verify_environment=False,
        log_every_n_steps=1,
        save_every_n_steps=100,
    )
    # The default data only when the caller brings none: a folder of its own would otherwise be mixed in.
    if "data_dir" not in overrides:
        values["data_dir"] = str(write_qa(tmp / "data", PAIRS))
    for key, value in overrides.items():
        if key == "structured_logging":
            values[key] = {**values[key], **value}
        else:
            values[key] = value
    return values


def read_jsonl(cfg: Config) -> list[dict]:
    lines = Path(cfg.structured_logging.log_file).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def loss_by_step(records: list[dict]) -> dict[int, float]:
    """The training loss of each logged step (a later record of a step wins: after a resume)."""
    return {
        r["global_step"]: r["metrics"]["loss"] for r in records if r["message"] == "metrics" and "loss" in r["metrics"]
    }


def summary_file(cfg: Config) -> dict:
    return json.loads((Path(cfg.output_dir) / "run_summary.json").read_text(encoding="utf-8"))


def samples(forward_kwargs: dict) -> int:
    """The samples of a forward pass: its rows, or with packing (a micro-batch's samples in one row, each
    restarting its positions at 0) the position resets."""
    positions = forward_kwargs.get("position_ids")
    return forward_kwargs["input_ids"].shape[0] if positions is None else int((positions == 0).sum())


class BatchRows(TrainerCallback):
    """Records (optimizer step, samples) for every forward pass of training."""

    def __init__(self):
        self.seen: list[tuple[int, int]] = []
        self._handle = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self._handle is not None:  # a trainer that died of an OOM never reached on_train_end
            self._handle.remove()

        def hook(module, args, kwargs):
            if module.training:
                self.seen.append((state.global_step + 1, samples(kwargs)))

        self._handle = model.register_forward_pre_hook(hook, with_kwargs=True)

    def on_train_end(self, args, state, control, **kwargs):
        self._handle.remove()
        self._handle = None


def tiny_values(tmp: Path, **overrides) -> dict:
    """Config values of a short fp32 CPU run with every path inside `tmp` (data: `tmp/data`), a longer window
    and one MLP projection, so that exported adapters cover attention and MLP alike."""
    shape = dict(max_steps=3, max_sequence_length=96, target_modules=["q_proj", "v_proj", "up_proj"])
    return config_values(tmp, **{**shape, **overrides})


def train_tiny(tmp: Path, **overrides) -> dict:
    """A few-second `autotune train` of tiny_values; returns the run summary."""
    from autotune.runner import train

    return train(build_config(tiny_values(tmp, **overrides)), **QUIET)


def tiny_profile(**choice) -> dict:
    from autotune.profile import CHOICE_KEYS, architecture_hash, hardware_fingerprint, new_profile
    from autotune.techniques import TECHNIQUES

    spec = resolve_model("tiny-qwen3")
    full = {
        # Every choice key a solve records, at the config's default unless said here (the list grows).
        **{k: v for k, v in Config().to_dict().items() if k in CHOICE_KEYS},
        "batch_size": 1,
        "gradient_accumulation_steps": 2,
        "effective_batch_size": 2,
        "max_sequence_length": 64,
        "lora_r": 2,
        "lora_alpha": 4,
        "target_modules": ["q_proj", "k_proj"],
        "quantization": "none",
        "gradient_checkpointing": True,
        "optimizer": "adamw_torch",
        # The step's memory techniques, as a solve records them: the tiny model on a CPU needs none.
        **{name: "off" for name in TECHNIQUES},
        **choice,
    }
    assert set(full) == set(CHOICE_KEYS)
    return new_profile(
        hardware=hardware_fingerprint(None, "cpu"),
        model={"name": spec.name, "architecture_hash": architecture_hash(spec.architecture)},
        data=None,
        constraints={"max_memory_gb": 2.0},
        choice=full,
        prediction={},
        measurement={},
        runner_up=None,
        reason="test",
        trials=[],
    )
