"""Training on several processes, tested with several real processes on this CPU.

Every multi-process test here starts real processes with torchrun (or two torchrun agents for two "nodes" on
the loopback) and the gloo backend, as CI can: DDP through the HF Trainer exactly as on GPUs, one writer,
resume, a collective OOM recovery, multi-node rendezvous, and FSDP2 sharding of the QLoRA model (torch's
fully_shard runs on CPU/gloo; the HF Trainer does not shard on a CPU, see test_fsdp_on_the_cpu).

What this machine cannot have is faked, and said so where it is: a second GPU and NVLink (the probe's fake
NVML in test_probe.py), and an out-of-memory on one rank (distributed.INJECT_OOM_ENV raises it on cue).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from helpers.cli import run_cli
from helpers.runs import config_values

from autotune import distributed
from autotune.batching import BatchPlan
from autotune.config import build_config
from autotune.distributed import World, plan_for_world, resolve_strategy
from autotune.errors import UserError

PY = sys.executable


# ------------------------------------------------------------------------------------ the world


def test_world_reads_torchrun_environment():
    env = {
        "RANK": "3",
        "LOCAL_RANK": "1",
        "WORLD_SIZE": "4",
        "LOCAL_WORLD_SIZE": "2",
        "TORCHELASTIC_RESTART_COUNT": "2",
        "TORCHELASTIC_RUN_ID": "abc",
    }
    w = distributed.world(env)
    assert w == World(rank=3, local_rank=1, size=4, local_size=2, restart=2, launch="abc", launched=True)
    assert w.distributed and not w.is_main and w.describe() == "rank 3 of 4"
    one = distributed.world({})
    assert one == World() and one.is_main and not one.distributed and not one.launched


@pytest.mark.parametrize("env", [{"WORLD_SIZE": "two"}, {"WORLD_SIZE": "0"}, {"RANK": "2", "WORLD_SIZE": "2"}])
def test_a_hand_made_world_is_one_clear_error(env):
    with pytest.raises(UserError, match="torchrun"):
        distributed.world(env)


# ------------------------------------------------------------------------------------ the batch plan


@pytest.mark.parametrize("batch", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("effective", [8, 12, 16, 48])
@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_rank_batches_keep_the_effective_batch_exact(batch, effective, world_size):
    if effective % world_size:
        return
    plan = BatchPlan.largest(effective, world_size, batch)
    micro, accumulation = plan.micro, plan.accumulation
    assert micro * accumulation * world_size == effective == plan.effective
    share = effective // world_size
    # the largest micro-batch up to `batch` that divides a rank's share
    assert micro == max(d for d in range(1, min(batch, share) + 1) if share % d == 0)


def test_an_effective_batch_that_does_not_split_is_refused():
    with pytest.raises(UserError, match="cannot be split over 3 processes"):
        BatchPlan.largest(16, 3, 4)


def _cfg(**values):
    base = dict(model_name="tiny-qwen3", init="random", quantization="none", batch_size=4)
    return build_config({**base, **values})


def _profile(world_size: int, strategy: str = "ddp") -> dict:
    return {"constraints": {"world_size": world_size, "strategy": strategy}}


def test_a_profile_for_another_gpu_count_gets_its_accumulation_rederived_and_says_so():
    cfg = _cfg(batch_size=4, effective_batch_size=32)
    planned, notes = plan_for_world(cfg, _profile(2), "ddp", World(size=4, local_size=4))
    assert (planned.batch_size, planned.gradient_accumulation_steps, planned.effective_batch) == (4, 2, 32)
    assert planned.distributed_strategy == "ddp"
    assert len(notes) == 1 and "solved for 2 process(es) and this run has 4" in notes[0] and "32 / (4 x 4)" in notes[0]
    # The same profile on its own GPU count: only the split is said; one process keeps the config's own numbers.
    same = plan_for_world(cfg, _profile(4), "ddp", World(size=4, local_size=4))[1]
    assert same == ["4 processes: micro-batch 4 x accumulation 2 per process x 4 = effective batch 32"]
    single, notes = plan_for_world(cfg, None, "ddp", World())
    assert (single.batch_size, single.gradient_accumulation_steps, notes) == (4, 8, [])


def test_fewer_ranks_than_an_fsdp_profile_was_solved_for_is_a_warning():
    notes = plan_for_world(_cfg(effective_batch_size=16), _profile(4, "fsdp"), "fsdp", World(size=2, local_size=2))[1]
    assert any("may not fit" in n and "--gpus 2" in n for n in notes)


def test_strategy_follows_the_profile_and_refuses_another():
    assert resolve_strategy(_cfg(), _profile(2), "cpu") == "ddp"
    assert resolve_strategy(_cfg(), None, "cpu") == "ddp"
    with pytest.raises(UserError) as exc:
        resolve_strategy(_cfg(distributed_strategy="ddp"), _profile(4, "fsdp"), "cuda")
    message = str(exc.value)
    assert "solved for fsdp on 4 processes" in message and "--strategy fsdp" in message
    assert "autotune solve --gpus N --strategy ddp" in message


@pytest.mark.parametrize(
    "values, device, needle",
    [
        ({}, "cpu", "needs CUDA GPUs"),
        ({"quantization": "8bit"}, "cuda", '"8bit"'),
        ({"embedding_on_cpu": "on", "model_name": "Qwen3-8B"}, "cuda", "embedding_on_cpu"),
    ],
)
def test_what_fsdp_cannot_do_is_one_clear_error(values, device, needle):
    """What the machine or the config cannot shard (resolve_strategy), and the techniques FSDP refuses over several
    ranks (their rows: techniques.check_strategy): each one message, as train checks them before anything starts."""
    from autotune.techniques import check_strategy

    cfg = _cfg(distributed_strategy="fsdp", **values)
    with pytest.raises(UserError, match=needle):
        check_strategy(cfg, resolve_strategy(cfg, None, device), 2)


def test_strategy_arguments_per_strategy(monkeypatch):
    layer = "Qwen3DecoderLayer"
    assert distributed.strategy_arguments("ddp", on_cpu=True, layer_class=layer) == {}  # one process: nothing to add
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    ddp = distributed.strategy_arguments("ddp", on_cpu=True, layer_class=layer)
    assert ddp == {"ddp_find_unused_parameters": False, "ddp_broadcast_buffers": False, "ddp_backend": "gloo"}
    fsdp = distributed.strategy_arguments("fsdp", on_cpu=False, layer_class=layer)
    # What transformers turns it into is what accelerate's FSDP2 plugin gets: one unit per decoder layer.
    from accelerate.utils import FullyShardedDataParallelPlugin
    from transformers import TrainingArguments

    monkeypatch.delenv("WORLD_SIZE")  # the arguments, not a process group: this test is one process
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    args = TrainingArguments(output_dir="unused", use_cpu=True, report_to="none", **fsdp)
    plugin = FullyShardedDataParallelPlugin(**args._process_fsdp_args())
    assert plugin.fsdp_version == 2 and plugin.transformer_cls_names_to_wrap == ["Qwen3DecoderLayer"]
    assert plugin.reshard_after_forward is True and "SHARDED_STATE_DICT" in str(plugin.state_dict_type)


def test_fsdp_wraps_each_models_own_decoder_layer():
    """FSDP's unit is the model's decoder layer: Qwen3's class named for an MoE or hybrid model is a class the model
    lacks (accelerate refuses it; the whole model would be one unit). The catalog's name is transformers' own."""
    import transformers

    from autotune.catalog import CATALOG

    kinds = {spec.architecture.model_type: spec.architecture for spec in CATALOG.values()}
    assert {"qwen3", "qwen3_moe", "qwen3_5_text", "qwen3_5_moe_text"} <= set(kinds)
    for arch in kinds.values():
        model_class = getattr(transformers, arch.causal_lm_class)
        assert arch.decoder_layer_class == model_class._no_split_modules[0], arch.model_type


def test_nproc_becomes_a_torchrun_command_line():
    argv = ["train", "--config", "c.json", "--nproc", "2", "--set", "x=1", "--nproc=3"]
    rest = distributed.without_option(argv, "--nproc")
    assert rest == ["train", "--config", "c.json", "--set", "x=1"]
    command = distributed.torchrun_command(2, rest, max_restarts=4, python="/py")
    assert command == [
        "/py",
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        "--max-restarts=4",
        "-m",
        "autotune.cli",
        *rest,
    ]


def test_an_oom_decision_belongs_to_its_launch(tmp_path):
    first = World(size=2, local_size=2, restart=0, launch="L1", launched=True)
    change = {"at_step": 3, "batch_size": [2, 1], "gradient_accumulation_steps": [1, 2]}
    distributed.record_oom(tmp_path, change, first)
    restarted = World(size=2, local_size=2, restart=1, launch="L1", launched=True)
    assert distributed.oom_decisions(tmp_path, restarted) == [change]
    assert distributed.oom_decisions(tmp_path, first) == []  # the first attempt of a launch starts clean
    assert distributed.oom_decisions(tmp_path, World(restart=1, launch="L2", launched=True)) == []
    distributed.record_oom(tmp_path, change, restarted)  # a second rank writing the same change: once
    assert distributed.oom_decisions(tmp_path, restarted) == [change]


def test_the_injection_hook_fires_on_its_rank_in_the_first_attempt_only(monkeypatch):
    monkeypatch.setenv(distributed.INJECT_OOM_ENV, "1:3")
    assert distributed.injected_oom_step(World(rank=1, size=2, local_size=2)) == 3
    assert distributed.injected_oom_step(World(rank=0, size=2, local_size=2)) is None
    assert distributed.injected_oom_step(World(rank=1, size=2, local_size=2, restart=1)) is None
    monkeypatch.setenv(distributed.INJECT_OOM_ENV, "one")
    with pytest.raises(UserError, match="RANK:STEP"):
        distributed.injected_oom_step(World())


def test_ddp_buckets_are_measured_with_a_real_ddp_and_are_the_trainable_gradients(autotune_cache):
    """DDP itself reports the buckets it allocated; with gradient_as_bucket_view off they are one more copy of
    the trainable (fp32 LoRA) gradients, the estimate's `distributed` term for a DDP rank."""
    from autotune.context import RunContext
    from autotune.modeling import build_model

    built = build_model(RunContext(_cfg(lora_r=8, target_modules=["q_proj", "v_proj"])))
    trainable = sum(p.numel() * p.element_size() for p in built.model.parameters() if p.requires_grad)
    assert distributed.ddp_bucket_bytes(built.model) == trainable > 0
    hooks = [p._backward_hooks for p in built.model.parameters() if p.requires_grad]
    assert all(not h for h in hooks)  # the model itself got no DDP hooks


# ------------------------------------------------------------------------------------ solve and profile


def test_budget_for_several_gpus_is_the_smallest_card():
    from autotune.solve.command import budget_for

    doc = {
        "gpus": [
            {"index": 0, "memory_free_gb": 23.0, "error": None},
            {"index": 1, "memory_free_gb": 15.0, "error": None},
            {"index": 2, "memory_free_gb": 9.0, "error": None},
        ]
    }
    budget, source = budget_for(None, _cfg(), False, doc, 0.05, gpus=2)
    # the smallest card's free memory, the margin taken once (by the budget)
    assert (budget.gb, budget.margin) == (15.0, 0.05) and "GPU 1, the smallest of GPUs 0-1" in source
    with pytest.raises(UserError, match="shows 3 usable GPU"):
        budget_for(None, _cfg(), False, doc, 0.05, gpus=4)
    assert budget_for(16.0, _cfg(), False, doc, 0.05, gpus=4)[0].gb == 16.0  # a plan for another machine


def test_a_profile_with_a_bad_world_is_corrupt(tmp_path):
    from autotune.profile import load_profile

    path = tmp_path / "p.json"
    doc = {
        "kind": "autotune.profile",
        "schema_version": 2,
        "hardware": {},
        "model": {},
        "measurement": {},
        "trials": [],
        "constraints": {"world_size": 2, "strategy": "zero3"},
    }
    path.write_text(json.dumps(doc), encoding="utf-8")
    with pytest.raises(UserError, match="world_size 2 / strategy 'zero3'"):
        load_profile(path)


# ------------------------------------------------------------------------------------ real processes


def _env(**extra) -> dict:
    """The environment of a multi-process test: one thread per process (two ranks share two cores), offline."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC_", "AUTOTUNE_TESTING_"))}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", **extra)
    return env


def _torchrun(*args: str) -> list[str]:
    return [PY, "-m", "torch.distributed.run", *args]


def _kill_tree(pid: int) -> None:
    """SIGKILL a launcher and every process under it (torchrun's workers are in their own process groups)."""
    import psutil

    try:
        parent = psutil.Process(pid)
        family = [*parent.children(recursive=True), parent]
    except psutil.NoSuchProcess:
        return
    for process in family:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


def _start(command: list[str], cwd: Path, **env) -> tuple[subprocess.Popen, Path]:
    """Start in the background, output into files (a worker that outlives its launcher keeps no pipe open)."""
    logs = Path(tempfile.mkdtemp(prefix="autotune-dist-test-", dir=cwd))
    proc = subprocess.Popen(
        command,
        cwd=cwd,
        env=_env(**env),
        stdout=open(logs / "stdout", "w"),  # noqa: SIM115 - the child owns it
        stderr=open(logs / "stderr", "w"),  # noqa: SIM115
        start_new_session=True,
    )
    return proc, logs


def _finish(proc: subprocess.Popen, logs: Path, timeout: float) -> subprocess.CompletedProcess:
    """Wait up to `timeout` seconds (then kill everything it started and fail), and read what it printed."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(proc.pid)
        proc.wait()
        err = (logs / "stderr").read_text(errors="replace")
        pytest.fail(f"{' '.join(map(str, proc.args))} still running after {timeout}s:\n{err[-4000:]}")
    finally:
        _kill_tree(proc.pid)  # a worker left behind by its launcher
    out, err = ((logs / name).read_text(errors="replace") for name in ("stdout", "stderr"))
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _run(command: list[str], cwd: Path, timeout: float, **env) -> subprocess.CompletedProcess:
    """Run to completion within `timeout` seconds (everything it started killed past it, never leaked)."""
    proc, logs = _start(command, cwd, **env)
    return _finish(proc, logs, timeout)


# The loss curves of one and of two processes agree to this relative tolerance (measured: 0.0, identical in
# fp32 without an OOM; 1.4e-7 across the OOM restart, where the micro-batch 1 x 2 accumulations sum in
# another order). What could differ: DDP's gradient mean vs one process's accumulation, the per-token
# normalisation across ranks (average_tokens_across_devices), the effective batch, the schedule.
LOSS_TOLERANCE = 1e-6
STEPS = 6


def _cli(*args: str) -> list[str]:
    return [PY, "-m", "autotune.cli", *args]


def _losses(log: Path) -> dict[int, float]:
    """The training loss of each step in a JSONL log; each step must be logged exactly once. A line is whole once
    its newline is written: read while a rank appends, the last line may not be yet, and is left for the next read."""
    text = log.read_text(encoding="utf-8")
    records = [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines()]
    steps = [r["global_step"] for r in records if r["message"] == "metrics" and "loss" in r["metrics"]]
    assert len(steps) == len(set(steps)), f"a step logged twice (two writers?): {steps}"
    return {
        r["global_step"]: r["metrics"]["loss"] for r in records if r["message"] == "metrics" and "loss" in r["metrics"]
    }


def _same_curve(got: dict[int, float], want: dict[int, float]) -> None:
    assert sorted(got) == sorted(want)
    for step, loss in want.items():
        assert abs(got[step] - loss) <= LOSS_TOLERANCE * abs(loss), (step, got[step], loss)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, autotune_cache):
    """Data whose every sample is the same QA pair (so that every optimizer step sees the same samples however the
    ranks' samplers order them), a config for it, and the loss curve of ONE process at the effective batch of 4
    (micro-batch 2 x accumulation 2): the reference the multi-process runs are held to."""
    root = tmp_path_factory.mktemp("distributed")
    (root / "data").mkdir()
    pair = "Q{i}: What is the code word for the blue box?\nA{i}: The code word for the blue box is amber.\n\n"
    (root / "data" / "qa.md").write_text("".join(pair.format(i=i) for i in range(1, 9)), encoding="utf-8")
    config = config_values(
        root,
        data_dir=str(root / "data"),
        effective_batch_size=4,
        max_steps=STEPS,
        lora_dropout=0.0,
        eval_ratio=0.0,
        save_every_n_steps=2,
    )
    (root / "c.json").write_text(json.dumps(config), encoding="utf-8")
    # One process needs no launcher: the reference trains in this one.
    from autotune.config import load_config
    from autotune.runner import train

    where = {"output_dir": str(root / "one" / "out"), "log_dir": str(root / "one" / "logs")}
    one = load_config(root / "c.json", {**where, "structured_logging": {"log_file": str(root / "one" / "log.jsonl")}})
    assert train(one, echo=lambda message: None)["status"] == "succeeded"
    return root, _losses(root / "one" / "log.jsonl")


def _where(root: Path, name: str, *extra: str) -> list[str]:
    """`train` arguments putting a run's output and log under root/name."""
    return [
        "--config",
        str(root / "c.json"),
        "--set",
        f"output_dir={root / name / 'out'}",
        "--set",
        f"log_dir={root / name / 'logs'}",
        "--set",
        f"structured_logging.log_file={root / name / 'log.jsonl'}",
        *extra,
    ]


def test_two_ddp_processes_train_the_one_process_curve_through_an_oom_on_one_rank_and_write_everything_once(run_dir):
    """`train --nproc 2`: two DDP processes train the loss curve of one process at the same effective batch, before
    and after an out-of-memory error on one of them, and write every file once. (One launch for both: each launch is
    four processes importing the training stack; this one runs the plain DDP path for steps 1-2, then the recovery.)

    Rank 1 alone runs out of memory at step 3 (injected: distributed.INJECT_OOM_ENV); rank 0 is then waiting in the
    gradient all-reduce. torchrun restarts both, and both go on from checkpoint-2 with micro-batch 1 x accumulation
    2: the effective batch, and so the loss curve, unchanged."""
    root, reference = run_dir
    env = {distributed.INJECT_OOM_ENV: "1:3"}
    result = _run(_cli("train", *_where(root, "ddp"), "--nproc", "2"), root, timeout=400, **env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "torch.distributed.run --standalone --nproc-per-node=2" in result.stderr  # --nproc became torchrun
    assert "out of memory on rank 1 at step 3: every rank restarts with batch_size 2 -> 1" in result.stderr
    assert "another rank stopped mid-step" in result.stderr  # rank 0's one line, not a gloo traceback
    assert "restart 1 of this launch after an out-of-memory on rank 1 at step 3" in result.stderr
    _same_curve(_losses(root / "ddp" / "log.jsonl"), reference)
    out = root / "ddp" / "out"
    summary = json.loads((out / "run_summary.json").read_text(encoding="utf-8"))
    assert summary["status"] == "succeeded" and summary["final"]["global_step"] == STEPS
    (change,) = summary["oom_recoveries"]
    assert (change["rank"], change["at_step"]) == (1, 3)
    assert change["batch_size"] == [2, 1] and change["gradient_accumulation_steps"] == [1, 2]
    assert change["resume_from"].endswith("checkpoint-2") and summary["resumed_from"] == change["resume_from"]
    assert not (out / distributed.OOM_DECISIONS).exists()  # the decision ends with the run
    # One writer: the console's summary once, the run summary by rank 0, every checkpoint whole and written once
    # (the adapter, optimizer and trainer state by rank 0, each rank's RNG state), no staging folder left.
    assert result.stdout.count("training succeeded") == 1
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    for name in checkpoints:
        files = {p.name for p in (out / "checkpoints" / name).iterdir()}
        assert {"adapter_model.safetensors", "optimizer.pt", "trainer_state.json", "autotune_config.json"} <= files
        assert {"rng_state_0.pth", "rng_state_1.pth"} <= files and "rng_state.pth" not in files
    # Each of the 2 ranks: micro-batch 2 x accumulation 1 = the effective batch of 4 (the config's 2 x 2), then
    # after the out-of-memory error 1 x 2.
    for name, shape in (("checkpoint-2", (2, 1, 4)), ("checkpoint-6", (1, 2, 4))):
        saved = json.loads((out / "checkpoints" / name / "autotune_config.json").read_text(encoding="utf-8"))
        assert (saved["batch_size"], saved["gradient_accumulation_steps"], saved["effective_batch_size"]) == shape
    assert (out / "adapter_model.safetensors").is_file()


def test_a_profile_solved_for_two_gpus_trains_on_two_processes(run_dir, capsys):
    """`solve --gpus 2` measures one rank's step with DDP's buckets and writes a profile for 2 DDP ranks;
    `train --profile P --nproc 2` runs it. The solve is one process, this one: only the training has two."""
    root, _ = run_dir
    profile = root / "solved" / "p.json"
    args = ["--config", root / "c.json", "--gpus", 2, "--max-memory-gb", 0.15, "--seq", 32, "--max-trials", 4]
    code, stdout, stderr = run_cli(capsys, "solve", *args, "--output", profile)
    assert code == 0, stderr[-3000:]
    doc = json.loads(profile.read_text(encoding="utf-8"))
    assert (doc["constraints"]["world_size"], doc["constraints"]["strategy"]) == (2, "ddp")
    assert doc["measurement"]["source"] == "trials" and doc["measurement"]["per_rank"] is True
    choice = doc["choice"]
    assert choice["batch_size"] * choice["gradient_accumulation_steps"] * 2 == choice["effective_batch_size"] == 4
    buckets = doc["measurement"]["ddp_bucket_bytes"]
    assert buckets > 0 and all(t["memory"].get("ddp_bucket_bytes") == buckets for t in doc["trials"] if t["peak_bytes"])
    assert f"--profile {profile} --nproc 2" in stdout  # the next command, as solve prints it
    train = _run(
        _cli("train", *_where(root, "solved"), "--profile", str(profile), "--set", "max_steps=2", "--nproc", "2"),
        root,
        timeout=300,
    )
    assert train.returncode == 0, train.stderr[-3000:]
    assert "re-derived" not in train.stderr  # solved for this GPU count: nothing to re-derive
    summary = json.loads((root / "solved" / "out" / "run_summary.json").read_text(encoding="utf-8"))
    assert summary["status"] == "succeeded" and summary["final"]["global_step"] == 2


def test_fsdp_on_a_cpu_and_nproc_under_torchrun_are_one_message_each(tmp_path, capsys, monkeypatch):
    from autotune.cli import main

    def run(*argv) -> tuple[int, str]:
        try:
            main(list(argv))
            code = 0
        except SystemExit as exc:
            code = exc.code
        return code, capsys.readouterr().err

    sets = ["--set", "model_name=tiny-qwen3", "--set", f"output_dir={tmp_path / 'out'}"]
    for extra in ([], ["--nproc", "2"]):  # refused by the run itself, or before launching torchrun
        code, err = run("train", *sets, "--strategy", "fsdp", *extra)
        assert code == 2 and err.count("\n") == 1 and "needs CUDA GPUs" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # nothing written
    monkeypatch.setenv("LOCAL_RANK", "0")
    code, err = run("train", *sets, "--nproc", "2")
    assert code == 2 and "--nproc inside torchrun" in err


@pytest.mark.parametrize(
    "technique, targets",
    [("tiled_mlp", ["q_proj", "down_proj"]), ("embedding_on_cpu", ["q_proj", "v_proj"])],
)
def test_a_technique_ddp_refuses_is_refused_before_any_rank_trains(tmp_path, capsys, monkeypatch, technique, targets):
    """The tiled MLP with LoRA on the MLP (each tile's backward makes DDP see a parameter ready twice) and the host
    embedding (DDP cannot wrap a module with a table in CPU memory) under DDP: refused before torchrun starts
    (`--nproc 2`), and by each rank torchrun started before it trains (its environment set as torchrun sets it;
    the refusal needs no collective), with the reason and nothing written."""

    config = tmp_path / "c.json"
    config.write_text(json.dumps(config_values(tmp_path, target_modules=targets, **{technique: "on"})))
    code, _, err = run_cli(capsys, "train", "--config", str(config), "--nproc", "2")
    assert code == 2 and f'{technique} "on" with distributed_strategy ddp' in err and "Traceback" not in err
    for name, value in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    code, _, err = run_cli(capsys, "train", "--config", str(config))
    assert code == 2 and f'{technique} "on" with distributed_strategy ddp' in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "logs").exists()  # nothing written


def _rank_pid(launcher: int, rank: int) -> int | None:
    import psutil

    for child in psutil.Process(launcher).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "autotune.cli" in " ".join(child.cmdline()):
                return child.pid
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


def test_killing_one_rank_leaves_a_run_every_rank_resumes(run_dir):
    """SIGKILL of rank 1 mid-run: torchrun stops rank 0, the restart it tries refuses to start over (nothing it
    could do differently), and `train --resume` on two processes goes on from the last complete checkpoint and
    trains exactly the steps the killed run had trained after it (constant learning rate: the schedule does not
    depend on max_steps, which the resume shortens)."""
    root, _ = run_dir
    sets = ["--set", "lr_scheduler_type=constant", "--set", "save_every_n_steps=10", "--set", "max_oom_retries=1"]
    proc, logs = _start(_cli("train", *_where(root, "kill"), *sets, "--set", "max_steps=400", "--nproc", "2"), root)
    log = root / "kill" / "log.jsonl"
    deadline = time.monotonic() + 240  # a bound, not a measurement: the run needs ~20 s to get there
    try:
        # Until step 12 is logged: checkpoint-10 is then whole.
        while proc.poll() is None and time.monotonic() < deadline:
            if log.is_file() and max(_losses(log), default=0) >= 12:
                break
            time.sleep(0.05)
        rank1 = _rank_pid(proc.pid, 1)
        assert rank1 is not None, "rank 1 not found: " + (logs / "stderr").read_text(errors="replace")[-3000:]
        # Stopped first, then killed: rank 0 cannot get past the next all-reduce, so no later checkpoint can
        # complete (a save waits for every rank), whatever the timing.
        os.kill(rank1, signal.SIGSTOP)
        trained = _losses(log)
        os.kill(rank1, signal.SIGKILL)
    finally:
        result = _finish(proc, logs, timeout=180)
    err = result.stderr
    assert result.returncode != 0
    assert "not trying again" in err  # the restart torchrun tried: an OOM's restart alone has a new plan
    out = root / "kill" / "out"
    last = distributed_last_checkpoint(out)
    assert last is not None and last.name == "checkpoint-10"
    assert {"rng_state_0.pth", "rng_state_1.pth", "trainer_state.json"} <= {p.name for p in last.iterdir()}
    assert json.loads((out / "run_summary.json").read_text(encoding="utf-8"))["status"] != "succeeded"

    result = _run(
        _cli("train", *_where(root, "kill"), *sets, "--set", "max_steps=12", "--nproc", "2", "--resume"),
        root,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "run_summary.json").read_text(encoding="utf-8"))
    assert summary["status"] == "succeeded" and summary["resumed_from"] == str(last)
    resumed = _losses(log)
    assert sorted(resumed) == list(range(1, 13))  # each step once: the killed run's re-run steps were dropped
    for step in (11, 12):  # trained again after checkpoint-10, by both ranks, from its state
        assert abs(resumed[step] - trained[step]) <= LOSS_TOLERANCE * abs(trained[step]), step


def distributed_last_checkpoint(out: Path) -> Path | None:
    from autotune.checkpoint import last_complete_checkpoint

    found = last_complete_checkpoint(out / "checkpoints")
    return Path(found) if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_meet_through_torchruns_rendezvous(run_dir):
    """Multi-node as far as one machine goes: two torchrun agents, one process each, meeting through the c10d
    rendezvous on the loopback (what two machines do over their network), train the one-process curve."""
    root, reference = run_dir
    endpoint = f"127.0.0.1:{_free_port()}"
    started = []
    for node in (0, 1):
        rendezvous = [
            "--nnodes=2",
            f"--node-rank={node}",
            "--nproc-per-node=1",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={endpoint}",
            "--rdzv-id=autotune-test",
        ]
        started.append(_start(_torchrun(*rendezvous, "-m", "autotune.cli", "train", *_where(root, "nodes")), root))
    agents = [_finish(proc, logs, timeout=300) for proc, logs in started]
    assert [a.returncode for a in agents] == [0, 0], [a.stderr[-2000:] for a in agents]
    _same_curve(_losses(root / "nodes" / "log.jsonl"), reference)
    assert sum(a.stdout.count("training succeeded") for a in agents) == 1  # global rank 0 alone says it


# The models the FSDP test shards, each as (model, quantization): both in one torchrun launch.
FSDP_MODELS = (("tiny-qwen3", "4bit"), ("tiny-qwen3-moe", "none"))
# ...each with a vocabulary of this size instead of Qwen3's 151,936 (a local folder holding the architecture): the
# sharding, the per-rank bytes and the gradients do not depend on it, and a bf16 lm_head over the full vocabulary
# is most of the ranks' time on a CPU without AVX512-BF16 (torch's reference bf16 GEMM).
FSDP_VOCAB = 2048


def _fsdp_model_dir(root: Path, model: str) -> Path:
    return root / "models" / model


def test_fsdp_on_the_cpu_shards_the_qlora_model_as_the_trainer_would(tmp_path, autotune_cache):
    """FSDP2 on CPU/gloo, two real processes: the QLoRA model autotune builds for FSDP (4-bit data stored as bf16)
    prepared by accelerate's own fsdp2_prepare_model, with the plugin transformers builds from autotune's
    TrainingArguments. Only the Accelerator around the plugin is a stand-in: accelerate drops the FSDP plugin on
    a CPU (the HF Trainer then silently runs DDP, which is why `train --strategy fsdp` refuses a CPU), so the
    Trainer's FSDP path itself needs two GPUs.

    Shows: one unit per decoder layer; each rank holds exactly the estimate's per-rank weights and adapters;
    the LoRA gradients of two ranks on half a batch each are the gradients of one process on the whole batch;
    the adapter gathered for saving is whole on rank 0. The tiny MoE in bf16: its decoder layer is the unit (not
    Qwen3's, which it lacks), its experts sharded as parameters, their adapters applied by the split LoRA (auto's
    default) from the layer's gathered parameters."""
    from dataclasses import replace

    from autotune.catalog import resolve_model

    root = tmp_path / "fsdp"
    for model, _ in FSDP_MODELS:
        small = replace(resolve_model(model).architecture, vocab_size=FSDP_VOCAB)
        small.to_hf_config().save_pretrained(_fsdp_model_dir(root, model))
        assert resolve_model(str(_fsdp_model_dir(root, model))).architecture == small
    result = _run(_torchrun("--standalone", "--nproc-per-node=2", __file__, "fsdp-worker", str(root)), tmp_path, 300)
    assert result.returncode == 0, result.stderr[-4000:]
    for model, quantization in FSDP_MODELS:
        _check_fsdp_ranks(root / model, model, quantization)


def _check_fsdp_ranks(out: Path, model: str, quantization: str) -> None:
    ranks = [json.loads((out / f"rank{r}.json").read_text(encoding="utf-8")) for r in range(2)]
    layer = "FSDPQwen3MoeDecoderLayer" if model.endswith("moe") else "FSDPQwen3DecoderLayer"
    for r, doc in enumerate(ranks):
        assert doc["units"].count(layer) == 2  # the tiny models' two layers, one unit each
        if quantization == "4bit":
            assert "Params4bit:torch.bfloat16" in doc["kinds"]  # bnb_4bit_quant_storage: flat, uniform shards
        else:
            assert doc["split_experts"] == 2  # both layers' experts apply their adapters split
        assert doc["weights_bytes"] == doc["estimate"]["weights"], r  # 1/2 of the stored weights + quant state
        assert doc["lora_bytes"] == doc["estimate"]["lora_params"], r
        assert doc["grad_error"] <= 1e-5, r  # relative to the largest gradient; measured ~1e-7
    assert ranks[0]["gathered"] == ranks[0]["adapter_tensors"] > 0 and ranks[0]["gather_error"] == 0.0
    assert ranks[1]["gathered"] == 0  # only rank 0 receives the whole adapter (it alone writes it)


def _fsdp_workers(root: str) -> None:
    """One rank of the FSDP test (run by torchrun): each of FSDP_MODELS in turn, its record under root/<model>."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    for model, quantization in FSDP_MODELS:
        _fsdp_worker(str(Path(root) / model), str(_fsdp_model_dir(Path(root), model)), quantization)
    # Both ranks done with every collective before either tears gloo down: a rank that destroys the group while the
    # other's gather to rank 0 is still in flight aborts it ("terminate called without an active exception").
    dist.barrier()
    dist.destroy_process_group()


def _fsdp_worker(out: str, model_name: str, quantization: str) -> None:
    """One rank of test_fsdp_on_the_cpu_shards_the_qlora_model_as_the_trainer_would (run by torchrun)."""
    from types import SimpleNamespace

    import bitsandbytes as bnb
    import torch
    import torch.distributed as dist
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model
    from torch.distributed.fsdp import FSDPModule
    from transformers import TrainingArguments

    from autotune.context import RunContext
    from autotune.estimate import estimate_peak
    from autotune.modeling import build_model
    from autotune.techniques.split_lora import ThinFactorExperts

    rank, size = dist.get_rank(), dist.get_world_size()
    cfg = build_config(
        dict(
            model_name=model_name,
            init="random",
            tokenizer_name="qwen3-offline",
            quantization=quantization,
            bf16=True,
            distributed_strategy="fsdp",
            lora_r=8,
            lora_alpha=16,
            lora_dropout=0.0,
            target_modules=["q_proj", "v_proj"] if model_name.endswith("moe") else ["q_proj", "v_proj", "up_proj"],
        )
    )
    ctx = RunContext(cfg)
    ids = torch.randint(0, 1000, (4, 32), generator=torch.Generator().manual_seed(0))

    def build():
        built = build_model(ctx, device=torch.device("cpu"))
        torch.manual_seed(1)  # lora_B away from zero, so that every adapter gets a gradient
        with torch.no_grad():
            for name, p in built.model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
        built.model.train()
        return built

    # One process, the ranks' halves of the batch in turn: the mean gradient FSDP's reduction computes. (For a dense
    # model that is the whole batch's gradient; an MoE's load-balancing loss is not a mean over samples, so there
    # each rank's own half is what its loss counts, as in every data-parallel MoE run.)
    reference = build().model
    for half in ids.chunk(size):
        (reference(input_ids=half, labels=half).loss / size).backward()
    expected = {n: p.grad.float().clone() for n, p in reference.named_parameters() if p.requires_grad}

    model = build().model
    kinds = sorted({f"{type(p).__name__}:{p.dtype}" for p in model.parameters()})
    args = TrainingArguments(
        output_dir=str(Path(out) / "unused"),
        report_to="none",
        use_cpu=True,
        **distributed.strategy_arguments("fsdp", False, ctx.architecture.decoder_layer_class),
    )
    plugin = FullyShardedDataParallelPlugin(**args._process_fsdp_args())
    stand_in = SimpleNamespace(  # the Accelerator accelerate would have built on GPUs, holding the plugin
        state=SimpleNamespace(fsdp_plugin=plugin),
        torch_device_mesh=None,
        parallelism_config=None,
        mixed_precision="no",
        is_main_process=rank == 0,
        device=torch.device("cpu"),
    )
    model = fsdp2_prepare_model(stand_in, model)
    units = [type(m).__name__ for m in model.modules() if isinstance(m, FSDPModule)]
    # What this rank holds now: each parameter's local shard (as FSDP2 stores it), the buffers, and the 4-bit
    # quantization state, which is no parameter and stays whole on every rank.
    seen: set[int] = set()
    held = {True: 0, False: 0}
    for p in model.parameters():
        storage = (p.to_local() if hasattr(p, "to_local") else p).untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            held[p.requires_grad] += storage.nbytes()
    quant_state = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            qs = getattr(module.weight, "quant_state", None) or module.quant_state
            parts = [qs.absmax, qs.code, qs.offset, *((qs.state2.absmax, qs.state2.code) if qs.state2 else ())]
            quant_state += sum(t.numel() * t.element_size() for t in parts if t is not None)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    estimate = estimate_peak(
        ctx.architecture,
        batch=2,
        seq=32,
        rank=8,
        target_modules=cfg.target_modules,
        quantization=quantization,
        dtype_bytes=2,
        device="cpu",
        world_size=size,
        strategy="fsdp",
    )
    local = ids.chunk(size)[rank]  # each rank half of the batch (equal token counts: FSDP's mean is the mean)
    model(input_ids=local, labels=local).loss.backward()
    largest = max(g.abs().max().item() for g in expected.values())
    error = 0.0
    for name, p in model.named_parameters():
        if p.requires_grad:
            grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            error = max(error, (grad.float() - expected[name]).abs().max().item() / largest)
    gathered = distributed.full_trainable_state(model)
    reference_state = reference.state_dict()
    adapter = [k for k in gathered if "lora_" in k]
    gather_error = max(
        ((gathered[k].float() - reference_state[k].float()).abs().max().item() for k in adapter), default=0.0
    )
    doc = {
        "kinds": kinds,
        "units": units,
        "weights_bytes": held[False] + quant_state + buffers,
        "lora_bytes": held[True],
        "estimate": {k: estimate.components[k] for k in ("weights", "lora_params")},
        "grad_error": error,
        "gathered": len(adapter),
        "adapter_tensors": sum(1 for n, p in reference.named_parameters() if p.requires_grad),
        "gather_error": gather_error,
        "split_experts": sum(isinstance(m, ThinFactorExperts) for m in model.modules()),
    }
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(doc), encoding="utf-8")
    dist.barrier()  # the next model's collectives start together


if __name__ == "__main__" and len(sys.argv) > 2 and sys.argv[1] == "fsdp-worker":
    _fsdp_workers(sys.argv[2])
