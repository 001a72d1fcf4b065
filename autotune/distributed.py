"""Training on several processes: torchrun's world, the strategy, and what each rank may do.

autotune neither launches its ranks nor talks between them on its own: torchrun (or `accelerate launch`, which
runs torchrun's launcher) starts them and sets RANK / LOCAL_RANK / WORLD_SIZE; accelerate, through the HF
Trainer's TrainingArguments, joins the process group and wraps the model in DDP or shards it with FSDP2; every
collective here is torch.distributed's (through accelerate's helpers). This module reads that world, says which
rank writes (rank 0, alone), and holds the few decisions the ranks must share:

* the batch plan per rank (batching.BatchPlan): micro-batch x accumulation x world size = the effective batch;
* the folder a checkpoint is staged in (every rank writes its part of a save into the same one);
* an out-of-memory's new micro-batch. An OOM inside DDP's backward leaves the other ranks blocked in the
  gradient all-reduce, so no in-process recovery can be collective; torchrun's elastic agent already solves
  "one worker died": it stops every worker and restarts the group (`--max-restarts`). The rank that ran out of
  memory writes the smaller micro-batch into output_dir and exits; the restarted ranks all read it and resume
  from the last complete checkpoint with it.

Importing this module must not import torch (the CLI builds the torchrun command line before anything heavy).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autotune.batching import BatchPlan
from autotune.config import Config
from autotune.errors import UserError
from autotune.fsutil import atomic_write_json

if TYPE_CHECKING:
    import torch

# Where the rank that ran out of memory leaves the smaller micro-batch for the restarted group (in output_dir).
OOM_DECISIONS = ".autotune-oom.json"
# The one testing hook of this module, and nothing else reads it: "RANK:STEP" raises a CUDA-style OOM on that
# rank at the start of that optimizer step, in the first attempt of a launch only (a CPU cannot run out of
# memory on one rank on cue; tests/test_distributed.py uses it to show the recovery is collective).
INJECT_OOM_ENV = "AUTOTUNE_TESTING_INJECT_OOM"


# ------------------------------------------------------------------------------------ the world


@dataclass(frozen=True)
class World:
    """This process's place among the ranks torchrun started (one process: rank 0 of 1)."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1
    local_size: int = 1
    restart: int = 0  # how many times torchrun's agent has restarted the group (TORCHELASTIC_RESTART_COUNT)
    launch: str | None = None  # the launch's id (TORCHELASTIC_RUN_ID): one per torchrun, kept across restarts
    launched: bool = False  # started by torchrun / accelerate launch (LOCAL_RANK set), even as a world of one

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes everything a run writes (logs, TensorBoard, checkpoints' shared files, outputs)."""
        return self.rank == 0

    def describe(self) -> str:
        return f"rank {self.rank} of {self.size}" if self.distributed else "one process"


def _env_int(env: Mapping[str, str], name: str, default: int, minimum: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise UserError(
            f"environment variable {name}={raw!r} is not an integer >= {minimum}: it is set by torchrun; launch "
            "with torchrun (or `autotune train --nproc N`) instead of setting it by hand"
        )
    return value


def world(env: Mapping[str, str] | None = None) -> World:
    """The world torchrun describes in the environment (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE)."""
    env = os.environ if env is None else env
    size = _env_int(env, "WORLD_SIZE", 1, 1)
    rank = _env_int(env, "RANK", 0, 0)
    local_rank = _env_int(env, "LOCAL_RANK", 0, 0)
    local_size = _env_int(env, "LOCAL_WORLD_SIZE", size, 1)
    if rank >= size or local_rank >= local_size:
        raise UserError(
            f"RANK={rank} / LOCAL_RANK={local_rank} do not fit WORLD_SIZE={size} / LOCAL_WORLD_SIZE={local_size}: "
            "these are set by torchrun; launch with torchrun instead of setting them by hand"
        )
    return World(
        rank=rank,
        local_rank=local_rank,
        size=size,
        local_size=local_size,
        restart=_env_int(env, "TORCHELASTIC_RESTART_COUNT", 0, 0),
        launch=env.get("TORCHELASTIC_RUN_ID") or None,
        launched="LOCAL_RANK" in env,
    )


def rank_device(w: World | None = None) -> torch.device:
    """The device this rank trains on: CUDA device LOCAL_RANK under torchrun (CUDA_VISIBLE_DEVICES numbering),
    the current CUDA device in one process, else the CPU. Set as the current device, so that everything that
    asks for "the" GPU (NCCL, bitsandbytes, the memory meter) means this rank's."""
    import torch

    if not torch.cuda.is_available():
        return torch.device("cpu")
    w = w or world()
    if not w.launched:
        return torch.device("cuda", torch.cuda.current_device())
    count = torch.cuda.device_count()
    if w.local_rank >= count:
        raise UserError(
            f"LOCAL_RANK {w.local_rank} has no GPU: CUDA sees {count} on this node. Start at most {count} processes "
            f"per node (--nproc-per-node {count}, or `autotune train --nproc {count}`)"
        )
    torch.cuda.set_device(w.local_rank)
    return torch.device("cuda", w.local_rank)


def join(device: torch.device) -> None:
    """Join the process group now, as the HF Trainer would (through accelerate's PartialState, which
    TrainingArguments shares later): the ranks must agree before the Trainer exists (who prepares the data
    cache first, when rank 0 has cleared the folder). gloo on the CPU, NCCL on GPUs. A world of one joins
    nothing (accelerate neither wraps nor shards a single process)."""
    if not world().distributed:
        return
    from accelerate import PartialState

    if device.type == "cpu":
        PartialState(cpu=True, backend="gloo")
    else:
        PartialState()


def wait_for_everyone() -> None:
    """A barrier across the ranks (nothing in one process)."""
    if world().distributed:
        from accelerate import PartialState

        PartialState().wait_for_everyone()


def leave() -> None:
    """Leave the process group together once no collective is left (the outputs saved): a rank that simply
    exits while gloo's threads still serve the group can abort at exit ("terminate called without an active
    exception"), which torchrun takes for a failure of the run."""
    if not world().distributed:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        wait_for_everyone()
        dist.destroy_process_group()


def main_process_first():
    """A context in which rank 0 goes first and the others follow once it is done (writing a shared cache)."""
    from contextlib import nullcontext

    if not world().distributed:
        return nullcontext()
    from accelerate import PartialState

    return PartialState().main_process_first()


def from_main(value: Any) -> Any:
    """Rank 0's `value` on every rank (a picklable object)."""
    if not world().distributed:
        return value
    from accelerate.utils import broadcast_object_list

    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]


def any_rank(flag: bool) -> bool:
    """Whether `flag` is true on any rank: a decision every rank then takes together (a Ctrl-C that reached
    some ranks only must stop all of them at the same step, or the others would wait in the next all-reduce)."""
    if not world().distributed:
        return flag
    import torch
    import torch.distributed as dist
    from accelerate import PartialState

    box = torch.tensor([int(flag)], device=PartialState().device)
    dist.all_reduce(box, op=dist.ReduceOp.MAX)
    return bool(box.item())


# ------------------------------------------------------------------------------------ the strategy


def solved_strategy(profile: dict | None) -> tuple[str, int] | None:
    """(strategy, world size) a profile was solved for; a profile from before multi-GPU solves: ("ddp", 1)."""
    if profile is None:
        return None
    constraints = profile.get("constraints") or {}
    return constraints.get("strategy") or "ddp", int(constraints.get("world_size") or 1)


def resolve_strategy(cfg: Config, profile: dict | None, device_type: str) -> str:
    """The strategy this run trains with: the config's (`distributed_strategy`, `--strategy`), `auto` meaning the
    profile's, else ddp. A profile solved for another strategy is refused: its per-rank memory describes
    another layout of the model."""
    asked = cfg.distributed_strategy
    solved = solved_strategy(profile)
    if asked != "auto" and solved is not None and solved[0] != asked and solved[1] > 1:
        raise UserError(
            f"--profile was solved for {solved[0]} on {solved[1]} processes, and this run asks for {asked} "
            f"(distributed_strategy / --strategy): the profile's per-rank memory describes {solved[0]}. Solve for "
            f"it (`autotune solve --gpus N --strategy {asked}`), or train with --strategy {solved[0]}"
        )
    strategy = asked if asked != "auto" else (solved[0] if solved else "ddp")
    if strategy == "fsdp":
        check_fsdp(cfg, device_type)
    return strategy


def check_fsdp(cfg: Config, device_type: str) -> None:
    """What FSDP cannot do with this config or machine, as one UserError."""
    if device_type == "cpu":
        raise UserError(
            "distributed_strategy fsdp needs CUDA GPUs: on a CPU the HF Trainer (through accelerate) does not "
            "shard, it silently runs DDP. Use --strategy ddp here (or auto)"
        )
    if cfg.quantization == "8bit":
        raise UserError(
            'distributed_strategy fsdp with quantization "8bit": FSDP shards parameters of one storage dtype, '
            "and LLM.int8 weights keep int8 data beside their scales, which it cannot. Use quantization "
            '"4bit" (stored as the compute dtype under FSDP) or "none", or --strategy ddp'
        )


def strategy_arguments(strategy: str, on_cpu: bool, layer_class: str) -> dict:
    """What TrainingArguments needs for this strategy, beyond one process's arguments. `layer_class`: the model's
    decoder layer (catalog.Architecture.decoder_layer_class), which FSDP shards as one unit."""
    w = world()
    if not w.distributed:
        return {}
    extra: dict[str, Any] = {
        # A PeftModel is not a PreTrainedModel, so the Trainer would default to find_unused_parameters=True:
        # an extra graph traversal per step and a warning per run. LoRA uses every adapter in every step.
        "ddp_find_unused_parameters": False,
        # Every rank computes its buffers alike from the same config and weights (RoPE's frequencies, the 4-bit
        # experts' NF4 tables: experts_4bit.py); DDP's default re-broadcasts them from rank 0 before every forward,
        # gigabytes a step for an MoE model's experts.
        "ddp_broadcast_buffers": False,
    }
    if on_cpu:
        extra["ddp_backend"] = "gloo"
    if strategy == "fsdp":
        extra["fsdp"] = True
        extra["fsdp_config"] = {
            "version": 2,
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            # One layer all-gathered at a time; a class the model lacks would leave the model one unit, gathered
            # whole (accelerate refuses it).
            "transformer_layer_cls_to_wrap": [layer_class],
            "reshard_after_forward": True,
            # Every rank saves its own shard (peft's FSDP-QLoRA recipe); the adapter alone is gathered at the
            # end (full_trainable_state).
            "state_dict_type": "SHARDED_STATE_DICT",
            # accelerate skips it for 4-bit weights anyway: every rank loads the quantized model whole first.
            "cpu_ram_efficient_loading": False,
        }
    return extra


# ------------------------------------------------------------------------------------ the batch plan


def plan_for_world(cfg: Config, profile: dict | None, strategy: str, w: World) -> tuple[Config, list[str]]:
    """The config one rank trains with: the strategy resolved, the micro-batch and accumulation per rank (the
    effective batch exact), and what changed, said aloud. The config's `gradient_accumulation_steps` counts for
    the whole run: under N processes each takes 1/N of it."""
    effective = cfg.effective_batch
    plan = BatchPlan.largest(effective, w.size, cfg.batch_size)
    micro, accumulation = plan.micro, plan.accumulation
    notes: list[str] = []
    solved = solved_strategy(profile)
    if solved is not None and solved[1] != w.size:
        notes.append(
            f"the profile was solved for {solved[1]} process(es) and this run has {w.size}: gradient accumulation "
            f"re-derived as {effective} / ({micro} x {w.size}) = {accumulation} per process (effective batch "
            f"{effective} unchanged)"
        )
        if strategy == "fsdp" and w.size < solved[1]:
            notes.append(
                f"under FSDP each of {w.size} processes holds 1/{w.size} of the sharded state, more than the "
                f"1/{solved[1]} the profile measured: it may not fit; solve again with --gpus {w.size}"
            )
    elif w.distributed and accumulation != cfg.gradient_accumulation_steps:
        notes.append(
            f"{w.size} processes: micro-batch {micro} x accumulation {accumulation} per process x {w.size} = "
            f"effective batch {effective}"
        )
    if micro != cfg.batch_size:
        notes.append(
            f"batch_size {cfg.batch_size} -> {micro}: the largest micro-batch that divides each process's "
            f"{effective // w.size} samples per step"
        )
    if not w.distributed and micro == cfg.batch_size and accumulation == cfg.gradient_accumulation_steps:
        return cfg, notes  # one process as configured: the config as it is (what its checkpoints record)
    planned = replace(
        cfg,
        distributed_strategy=strategy,
        batch_size=micro,
        gradient_accumulation_steps=accumulation,
        effective_batch_size=effective,
    )
    return planned, notes


# ------------------------------------------------------------------------------------ launching


def torchrun_command(nproc: int, argv: list[str], *, max_restarts: int, python: str | None = None) -> list[str]:
    """The torchrun command line `autotune train --nproc N` runs: one node, N processes, a free rendezvous port
    (--standalone), torchrun restarting the group after a rank's OOM up to max_oom_retries times."""
    return [
        python or sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        f"--max-restarts={max_restarts}",
        "-m",
        "autotune.cli",
        *argv,
    ]


# torchrun's environment for a launch that may restart: its rendezvous otherwise shares one TCPStore across the
# restarts of a group and the restarted workers' process group reuses the same keys in it, so a restarted rank
# can read the dead attempt's addresses and fail to connect (seen with gloo, tests/test_distributed.py). This is
# torch's own opt-out: a fresh store for every round.
RESTARTABLE_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def without_option(argv: list[str], name: str) -> list[str]:
    """`argv` without the option `name` and its value (`--nproc 2` or `--nproc=2`)."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == name:
            skip = True
        elif not arg.startswith(name + "="):
            out.append(arg)
    return out


# ------------------------------------------------------------------------------------ OOM: a shared decision


def oom_decisions(output_dir: str | os.PathLike, w: World | None = None) -> list[dict]:
    """The OOM changes made earlier in this launch (oldest first): what the restarted ranks go on with. Empty in
    the first attempt of a launch, outside torchrun, or when the file belongs to another launch."""
    w = w or world()
    if w.restart == 0 or w.launch is None:
        return []
    try:
        doc = json.loads((Path(output_dir) / OOM_DECISIONS).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    if not isinstance(doc, dict) or doc.get("launch") != w.launch or not isinstance(doc.get("changes"), list):
        return []
    return [c for c in doc["changes"] if isinstance(c, dict)]


def record_oom(output_dir: str | os.PathLike, change: dict, w: World | None = None) -> None:
    """Append this launch's new OOM change for the restarted group (atomically: a reader sees all or nothing;
    two ranks that ran out at once write the same change)."""
    w = w or world()
    changes = oom_decisions(output_dir, w)
    if not changes or changes[-1].get("batch_size") != change.get("batch_size"):
        changes.append(change)
    atomic_write_json(Path(output_dir) / OOM_DECISIONS, {"launch": w.launch, "changes": changes})


def forget_oom_decisions(output_dir: str | os.PathLike) -> None:
    (Path(output_dir) / OOM_DECISIONS).unlink(missing_ok=True)


class RestartForOOM(UserError):
    """This rank ran out of memory: the decision is written, torchrun restarts the group with it. The message
    says what happens next; the exit code (3) tells it apart from a bad input."""

    exit_code = 3


class PeerStopped(UserError):
    """Another rank stopped (it ran out of memory, was killed, hit an error): this rank's collective failed
    with it. Its own message says why; this one says only that this rank stopped too (exit code 3)."""

    exit_code = 3


# How a collective fails when a peer has gone: gloo's words, and NCCL's once its watchdog aborts the communicator.
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "NCCL communicator was aborted")


def peer_stopped(exc: BaseException) -> bool:
    """Whether `exc` is a collective failing because another rank went away."""
    import torch.distributed as dist

    gone = getattr(dist, "DistNetworkError", ())
    return isinstance(exc, gone) or (isinstance(exc, RuntimeError) and any(m in str(exc) for m in _PEER_GONE))


def injected_oom_step(w: World | None = None) -> int | None:
    """The step at which the testing hook (INJECT_OOM_ENV, "RANK:STEP") raises an OOM on this rank, if any."""
    raw = os.environ.get(INJECT_OOM_ENV)
    if not raw:
        return None
    w = w or world()
    try:
        rank, step = (int(x) for x in raw.split(":"))
    except ValueError:
        raise UserError(f"{INJECT_OOM_ENV}={raw!r}: expected RANK:STEP, e.g. 1:3") from None
    return step if rank == w.rank and w.restart == 0 else None


# ------------------------------------------------------------------------------------ checkpoints, outputs


def save_checkpoint_collectively(trainer, save: Callable[[Any, Any], None], model, trial, extra_files: dict) -> None:
    """checkpoint.save_checkpoint for several ranks: every rank writes its part of the save (rank 0 the adapter,
    optimizer and trainer state; each rank its RNG state; under FSDP each its shard) into one staging folder
    rank 0 made, and rank 0 alone renames it into place once all have written (barriers between): a
    checkpoint-N folder is whole, and written once."""
    from transformers.trainer_utils import rotate_checkpoints

    from autotune import checkpoint as ckpt
    from autotune.fsutil import apply_umask, fsync_dir
    from autotune.run_files import CHECKPOINT_PREFIX

    w = world()
    run_dir = Path(trainer._get_output_dir(trial=trial))
    step = trainer.state.global_step
    final = run_dir / f"{CHECKPOINT_PREFIX}-{step}"
    # One name every rank computes alike (remove_partial_saves's pattern: a kill leaves it to the next run).
    staging = run_dir / f"{ckpt.STAGING_PREFIX}{step}.ranks{ckpt.STAGING_SUFFIX}"
    problem = None
    if w.is_main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            need = int(ckpt.estimate_checkpoint_bytes(run_dir, model) * ckpt.SAVE_HEADROOM) + ckpt.FREE_FLOOR_BYTES
            ckpt.check_free_space(run_dir, step, need, ckpt.last_complete_checkpoint(run_dir))
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir()
        except UserError as exc:
            problem = str(exc)
    problem = from_main(problem)  # every rank stops alike, or none does
    if problem:
        raise UserError(problem)
    trainer._get_output_dir = lambda trial=None: str(staging)
    try:
        with ckpt.disk_full_is_a_user_error(
            f"checkpoint-{step}", run_dir, lambda: ckpt.last_complete_checkpoint(run_dir)
        ):
            save(model, trial)
            wait_for_everyone()
            if w.is_main:
                written = staging / final.name
                for name, doc in extra_files.items():
                    atomic_write_json(written / name, doc)
                apply_umask(written)
                # checkpoint.py's own sync and rename (private there: one process calls them through save_checkpoint).
                ckpt.fsync_tree(written)
                ckpt.move_into_place(written, final)
                fsync_dir(run_dir)
        wait_for_everyone()
    finally:
        del trainer._get_output_dir
        if w.is_main:
            shutil.rmtree(staging, ignore_errors=True)
    if w.is_main and trainer.args.should_save:
        rotate_checkpoints(
            output_dir=str(run_dir),
            save_total_limit=trainer.args.save_total_limit,
            best_model_checkpoint=trainer.state.best_model_checkpoint,
            use_mtime=False,
        )


def full_trainable_state(model) -> dict:
    """The trainable parameters (the adapter) as whole CPU tensors on rank 0 (the other ranks get an empty dict),
    from a model FSDP2 shards: torch.distributed.checkpoint's own gather, frozen base weights left out (a tied
    lm_head may come along; peft's save_pretrained keeps only the adapter's keys). Collective: every rank calls
    it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    return get_model_state_dict(model, options=options)


# ------------------------------------------------------------------------------------ measuring DDP


def ddp_bucket_bytes(model) -> int:
    """The bytes of gradient buckets DistributedDataParallel allocates for `model`'s trainable parameters, as DDP
    itself reports them: a real DDP, built in a one-process group (gloo on the CPU, NCCL on a GPU) over
    parameters of the same shapes, dtypes and device as the trainable ones (so that the model itself gets no
    DDP hooks and its frozen weights no broadcast), then let go. With gradient_as_bucket_view off (the
    Trainer's default) the buckets are a second copy of the trainable gradients, resident for the whole run:
    they add to every step's peak on each rank."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from autotune.memory import free_memory

    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        return 0
    device = trainable[0].device
    stand_in = torch.nn.ParameterList(torch.nn.Parameter(torch.empty_like(p)) for p in trainable)
    joined = not dist.is_initialized()
    if joined:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    try:
        kwargs: dict[str, Any] = {"find_unused_parameters": False}
        if device.type == "cuda":
            kwargs["device_ids"] = [device.index]
        wrapper = DistributedDataParallel(stand_in, **kwargs)
        sizes = str(wrapper._get_ddp_logging_data().get("bucket_sizes", ""))
        del wrapper
    finally:
        if joined:
            dist.destroy_process_group()
        del stand_in
        free_memory()
    return sum(int(s) for s in sizes.replace(" ", "").split(",") if s)
