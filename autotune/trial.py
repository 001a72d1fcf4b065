"""The one measured step: the training step of step.py, run for a few optimizer steps under a capped meter.

`autotune solve` measures every candidate with `TrialRunner.measure`; the estimate's tests, the benchmarks and
bench/gpu_check.py measure with it too, so every figure autotune reports comes from this one routine: the cap,
the peak reset, the steps themselves (`run_trial_steps`), the CUDA overhead re-measured after the first real
step, and the cleanup that lets the next trial start from the same baseline. The runner alone holds the
memory budget, in bytes (units.Budget).

It knows nothing of search: solve/ decides which trials to run (as Lightning's batch-size tuner keeps its
search apart from its trial).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import PrinterCallback, TrainerCallback

from autotune.config import Config
from autotune.context import RunContext
from autotune.distributed import ddp_bucket_bytes
from autotune.estimate import RunPlan, plan_run, shape_for
from autotune.measurement import Trial
from autotune.memory import CpuTrackedMeter, HostOutOfMemory, MemoryMeter, free_memory, make_meter
from autotune.modeling import BuiltModel, apply_knobs, build_model, pick_device, quiet_libraries
from autotune.step import ListDataset, make_trainer, release_trainer, training_arguments
from autotune.techniques import Knobs, resolve
from autotune.techniques.packing import collator_for
from autotune.units import Budget, GiB

# The second optimizer step is the first to hold the optimizer state, so two steps reach training's peak.
TRIAL_STEPS = 2


# ------------------------------------------------------------------------------------ the steps


def synthetic_rows(n: int, seq_len: int, vocab_size: int, seed: int = 0) -> ListDataset:
    """Worst-case rows for a trial: every row full length, every token labelled."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (n, seq_len), generator=gen)
    return ListDataset([{"input_ids": row.tolist(), "labels": row.tolist()} for row in ids])


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step (CUDA-synchronised, so the time is the GPU's, not the launch's)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._t0 = 0.0

    def _sync(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_step_begin(self, args, state, control, **kwargs):
        self._sync()
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self._sync()
        self.seconds.append(time.perf_counter() - self._t0)


def _trial_arguments(cfg: Config, built: BuiltModel, workdir: str | Path, *, steps: int, batch_size: int):
    """The training run's TrainingArguments for a trial: one micro-batch per optimizer step, and nothing
    written (no evaluation, checkpoint, log or progress bar) so that only the step itself is measured."""
    return training_arguments(
        cfg,
        built,
        workdir,
        max_steps=steps,
        batch_size=batch_size,
        accumulation=1,
        evaluate=False,
        save=False,
        log=False,
        progress=False,
    )


def run_trial_steps(
    built: BuiltModel, cfg: Config, *, batch_size: int, seq_len: int, steps: int, workdir: str | Path
) -> list[float]:
    """Run `steps` optimizer steps of the training Trainer on full-length synthetic rows, with the techniques
    `built.knobs` holds (packed rows when packing is on: one row of batch_size x seq_len tokens).

    Returns each step's seconds. The second and later steps hold the optimizer state, so the peak of
    a run of >= 2 steps is the peak of training. Raises torch.OutOfMemoryError when it does not fit.
    """
    timer = StepTimer()
    args = _trial_arguments(cfg, built, workdir, steps=steps, batch_size=batch_size)
    data = synthetic_rows(batch_size * steps, seq_len, built.spec.architecture.vocab_size, seed=cfg.seed)
    # Every sample exactly seq_len long: the worst case a training batch of this shape can be.
    collator = collator_for(built.knobs.packing, 0, max_length=seq_len, pad_to_length=seq_len)
    trainer = make_trainer(built, args, data, collator=collator, callbacks=[timer])
    trainer.remove_callback(PrinterCallback)  # a trial prints its own one-line summary
    try:
        trainer.train()
    finally:
        # The next trial starts from the same baseline: the model (and its LoRA weights) alone.
        release_trainer(trainer, built.model)
        del trainer
    return timer.seconds


def run_eval_step(
    built: BuiltModel, cfg: Config, *, train_batch: int, eval_batch: int, seq_len: int, workdir: str | Path
) -> list[float]:
    """One optimizer step at the training micro-batch, then one evaluation (the Trainer's evaluate()) at
    `eval_batch`, on full-length synthetic rows: the evaluation sees the optimizer state resident, as it does
    between training steps. Returns the evaluation's seconds."""
    args = _trial_arguments(cfg, built, workdir, steps=1, batch_size=train_batch)
    args.per_device_eval_batch_size = eval_batch
    data = synthetic_rows(max(train_batch, eval_batch), seq_len, built.spec.architecture.vocab_size, seed=cfg.seed)
    collator = collator_for(built.knobs.packing, 0, max_length=seq_len, pad_to_length=seq_len)
    trainer = make_trainer(built, args, data, collator=collator, eval_dataset=ListDataset(data.rows[:eval_batch]))
    trainer.remove_callback(PrinterCallback)
    try:
        trainer.train()
        start = time.perf_counter()
        trainer.evaluate()
        return [time.perf_counter() - start]
    finally:
        release_trainer(trainer, built.model)
        del trainer


# ------------------------------------------------------------------------------------ the runner


class TrialRunner:
    """Builds the training model once per rank and measures trials on it under a capped meter.

    The budget (a units.Budget) is the runner's alone: `measure` caps the meter at its total and judges
    "fits" against its usable part; `set_budget` moves it (a benchmark sweeping caps on one model build).

    With world_size > 1 (DDP) a trial is one rank's step: the same step, beside the gradient buckets DDP
    allocates on every rank, measured once per model build with a real DDP (distributed.ddp_bucket_bytes);
    the meter's cap leaves room for them and every peak includes them.
    """

    def __init__(
        self,
        ctx: RunContext,
        budget: Budget,
        *,
        init: str = "random",
        device: torch.device | None = None,
        meter: MemoryMeter | None = None,
        world_size: int = 1,
        host_ram_bytes: int | None = None,
        samples: int | None = None,
    ):
        quiet_libraries()
        self.ctx = ctx
        self.budget = budget
        self.knobs = resolve(ctx.cfg, ctx.spec)  # what a trial runs with unless it asks for other knobs
        self.device = device or pick_device()
        self.meter = meter or make_meter(self.device.type)
        self.init = init
        self.world_size = world_size
        # The host memory the run may hold (the probed RAM; None: not checked): a trial whose plan needs more is
        # not run (estimate/run.py's host terms: offloaded inputs, tables kept on the host).
        self.host_ram_bytes = host_ram_bytes
        self.samples = samples  # the dataset's rows, which the run holds in host memory too (None: unknown)
        self.build_seconds = 0.0
        # The device's peak while the model of the latest build loaded and took its techniques (estimate/run.py's
        # load phase; _count_the_build says what the CPU's tracker sees of it).
        self.load_peak_bytes: int | None = None
        self.bucket_bytes = 0  # DDP's gradient buckets of the model built now (0 in one process)
        self._built: BuiltModel | None = None
        self._overhead_remeasured = False
        self._workdir: str | None = None

    @property
    def cfg(self) -> Config:
        return self.ctx.cfg

    @property
    def device_type(self) -> str:
        return self.device.type

    @property
    def dtype(self) -> str | None:
        """The compute dtype of the built model ("bfloat16"), None before the first build."""
        return str(self._built.dtype).removeprefix("torch.") if self._built else None

    def set_budget(self, budget: Budget) -> None:
        self.budget = budget

    def model_for(self, rank: int) -> BuiltModel:
        """The training model at LoRA rank `rank`, built once and reused while the rank stays the same."""
        if self._built is not None and self._built.lora_r == rank:
            return self._built
        self.release()
        t = time.perf_counter()
        self.meter.reset_peak()
        tracked = isinstance(self.meter, CpuTrackedMeter)
        self._built = build_model(
            self.ctx,
            init=self.init,
            lora_r=rank,
            device=self.device,
            knobs=self.knobs,
            after_load=self._count_the_build if tracked else None,
        )
        self.load_peak_bytes = self.meter.peak_bytes()
        self.build_seconds += time.perf_counter() - t
        if self.world_size > 1:
            self.bucket_bytes = ddp_bucket_bytes(self._built.model)
        return self._built

    @contextlib.contextmanager
    def _count_the_build(self, base) -> Iterator[None]:
        """On the CPU, where the tracked meter stands in for the device: the loaded weights counted (those loaded on
        the host are marked and left out), then what the build adds to them (adapters, the 8-bit head and its
        scratch), as a GPU's allocator would see the load. (What from_pretrained holds for a moment while it
        quantizes, one projection in the compute dtype, happens before this and is not seen.)"""
        meter = self.meter
        assert isinstance(meter, CpuTrackedMeter)  # only the tracked meter asks for this (model_for)
        meter.track_existing(base)
        with meter:
            yield

    def release(self) -> None:
        """Free the model (the next one's peak must not include it) and the trials' scratch folder."""
        self._built = None
        self.bucket_bytes = 0
        free_memory()
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def workdir(self) -> str:
        # Trials save nothing, but the Trainer wants an output folder: keep it out of the user's tree.
        if self._workdir is None:
            self._workdir = tempfile.mkdtemp(prefix="autotune-trial-")
        return self._workdir

    def measure(
        self, batch: int, seq: int, rank: int, *, knobs: Knobs | None = None, steps: int = TRIAL_STEPS
    ) -> Trial:
        """`steps` optimizer steps (>= 2) at batch x seq with `knobs` (default: the config's) under the cap; the
        step time is the mean of the steps after the first (the first builds the optimizer state)."""
        return self._trial(
            batch,
            seq,
            rank,
            knobs,
            lambda built: run_trial_steps(
                built, self.cfg, batch_size=batch, seq_len=seq, steps=steps, workdir=self.workdir()
            ),
        )

    def measure_eval(self, batch: int, seq: int, rank: int, *, train_batch: int, knobs: Knobs | None = None) -> Trial:
        """An evaluation step at batch x seq after a training step at train_batch, under the cap: whether an
        evaluation batch of that size fits beside the model and its optimizer state, as training evaluates."""
        return self._trial(
            batch,
            seq,
            rank,
            knobs,
            lambda built: run_eval_step(
                built, self.cfg, train_batch=train_batch, eval_batch=batch, seq_len=seq, workdir=self.workdir()
            ),
            kind="eval",
        )

    def run_plan(self, batch: int, seq: int, rank: int, knobs: Knobs) -> RunPlan:
        """The estimate's plan of a run of this shape on this runner's device (estimate/run.py)."""
        shape = shape_for(
            self.cfg,
            self.ctx.architecture,
            batch=batch,
            seq=seq,
            rank=rank,
            device=self.device_type,
            knobs=knobs,
            world_size=self.world_size,
        )
        return plan_run(shape, samples=self.samples)

    def _trial(self, batch: int, seq: int, rank: int, knobs: Knobs | None, run, kind: str = "train") -> Trial:
        """`run(built)` (returning its steps' seconds) under the capped meter, and the Trial it makes; not run when
        the host would lack the memory the run's plan keeps there."""
        knobs = knobs or self.knobs
        host = self.run_plan(batch, seq, rank, knobs).host_bytes
        if self.host_ram_bytes is not None and host > self.host_ram_bytes:
            note = (
                f"host RAM: the run would hold {host / GiB:.2f} GiB of host memory, {self.host_ram_bytes / GiB:.2f} "
                "GiB is available"
            )
            return Trial(
                batch, seq, rank, False, False, None, 0.0, None, None,
                note=note, knobs=knobs, kind=kind, host_bytes=host, over_host_ram=True,
            )  # fmt: skip
        built = self.model_for(rank)
        try:
            apply_knobs(built, knobs, self.cfg.gradient_checkpointing_kwargs)
        except torch.OutOfMemoryError as exc:
            # A switch that builds a table on the device (the experts dequantized back to bf16, the bf16 head) can
            # itself run out: a trial that does not fit, and the next trial's switch puts the model right.
            free_memory()
            note = f"switching to {knobs.describe()}: {str(exc).splitlines()[0][:200]}"
            return Trial(
                batch, seq, rank, False, True, None, 0.0, None, None, note=note, knobs=knobs, kind=kind, host_bytes=host
            )
        # What the switch let go (a table moved to the host, the bf16 head the 8-bit one replaced) is freed now,
        # not left in CUDA's cache, where the peak reset below would count it as this trial's.
        free_memory()
        if isinstance(self.meter, CpuTrackedMeter):
            self.meter.track_existing(built.model)  # a table moved back from the host counts again
        t = time.perf_counter()
        peak, seconds, oom, note, memory, over_host_ram = None, None, False, "", {}, False
        # DDP's buckets live beside every step of a rank: the step gets what they leave of the card.
        self.meter.cap(max(1, self.budget.total_bytes - self.bucket_bytes))
        self.meter.reset_peak()
        try:
            with self.meter:
                seconds = run(built)
            peak = self.meter.peak_bytes()
            memory = self.meter.details()
        except torch.OutOfMemoryError as exc:
            oom, note = True, str(exc).splitlines()[0][:300]
            over_host_ram = isinstance(exc, HostOutOfMemory)
        finally:
            self.meter.cap(None)
            built.model.zero_grad(set_to_none=True)
            self.meter.cleanup()
        if peak is not None:
            growth = self._overhead_growth()
            peak += growth + self.bucket_bytes
            if "overhead_bytes" in memory:
                memory["overhead_bytes"] += growth
            if self.bucket_bytes:
                memory["ddp_bucket_bytes"] = self.bucket_bytes
        steady = (seconds[1:] or seconds) if seconds else None
        step_s = sum(steady) / len(steady) if steady else None
        fits = not oom and peak is not None and peak <= self.budget.usable_bytes
        return Trial(
            batch,
            seq,
            rank,
            fits,
            oom,
            peak,
            time.perf_counter() - t,
            step_s,
            (batch * seq / step_s) if step_s else None,
            note=note,
            knobs=knobs,
            memory=memory,
            kind=kind,
            host_bytes=host,
            over_host_ram=over_host_ram,
        )

    def _overhead_growth(self) -> int:
        """The first real step loads kernels and library workspaces lazily, so the CUDA context grows:
        measure it again once, after that step, and count the growth in this and every later peak."""
        remeasure = getattr(self.meter, "remeasure_overhead", None)
        if remeasure is None or self._overhead_remeasured:
            return 0
        before = self.meter.overhead_bytes  # type: ignore[attr-defined]
        self._overhead_remeasured = True
        return remeasure() - before
