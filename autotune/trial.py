"""The one measured step: the training step of step.py, run for a few optimizer steps under a capped meter.

`autotune solve` measures every candidate with `TrialRunner.measure`; the estimate's tests, the benchmarks and
bench/gpu_check.py measure with it too, so every figure autotune reports comes from this one routine: the cap,
the peak reset, the steps themselves (`run_trial_steps`), the CUDA overhead re-measured after the first real
step, and the cleanup that lets the next trial start from the same baseline. The runner alone holds the
memory budget, in bytes (units.Budget).

It knows nothing of search: solver.py decides which trials to run (as Lightning's batch-size tuner keeps its
search apart from its trial).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PrinterCallback, TrainerCallback

from autotune.config import Config
from autotune.context import RunContext
from autotune.data.encoding import CausalLMCollator
from autotune.memory import CpuTrackedMeter, MemoryMeter, free_memory, make_meter
from autotune.modeling import BuiltModel, build_model, pick_device, quiet_libraries, set_checkpointing
from autotune.step import ListDataset, make_trainer, release_trainer, training_arguments
from autotune.units import Budget, GiB

# The second optimizer step is the first to hold the optimizer state, so two steps reach training's peak.
TRIAL_STEPS = 2


@dataclass
class Trial:
    batch: int
    seq: int
    rank: int
    fits: bool  # ran, and its peak is inside the usable budget (budget less margin)
    oom: bool  # the step ran out of memory under the cap
    peak_bytes: int | None
    seconds: float  # wall time of the whole trial
    step_seconds: float | None  # mean of the optimizer steps after the first
    tokens_per_second: float | None
    predicted_bytes: int | None = None
    note: str = ""
    checkpointing: bool | None = None  # gradient checkpointing in this trial (None: as configured)

    def describe(self, budget_bytes: int) -> str:
        peak = (
            f"{self.peak_bytes / GiB:7.3f} GiB ({self.peak_bytes / budget_bytes:5.1%})"
            if self.peak_bytes
            else "      -"
        )
        verdict = "fits" if self.fits else ("OOM" if self.oom else "over margin")
        speed = f"{self.tokens_per_second:9.0f} tok/s" if self.tokens_per_second else ""
        ckpt = {True: " ckpt", False: " no-ckpt", None: ""}[self.checkpointing]
        return (
            f"batch {self.batch:4d} x seq {self.seq:6d}  r={self.rank:<4d}{ckpt} peak {peak}  {verdict:11s} "
            f"{self.seconds:6.1f}s {speed}"
        )


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


def run_trial_steps(
    built: BuiltModel, cfg: Config, *, batch_size: int, seq_len: int, steps: int, workdir: str | Path
) -> list[float]:
    """Run `steps` optimizer steps of the training Trainer on full-length synthetic rows.

    Returns each step's seconds. The second and later steps hold the optimizer state, so the peak of
    a run of >= 2 steps is the peak of training. Raises torch.OutOfMemoryError when it does not fit.
    """
    timer = StepTimer()
    args = training_arguments(
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
    data = synthetic_rows(batch_size * steps, seq_len, built.spec.architecture.vocab_size, seed=cfg.seed)
    # Every row exactly seq_len long: the worst case a training batch of this shape can be.
    collator = CausalLMCollator(pad_token_id=0, pad_to_length=seq_len)
    trainer = make_trainer(built, args, data, collator=collator, callbacks=[timer])
    trainer.remove_callback(PrinterCallback)  # a trial prints its own one-line summary
    try:
        trainer.train()
    finally:
        # The next trial starts from the same baseline: the model (and its LoRA weights) alone.
        release_trainer(trainer, built.model)
        del trainer
    return timer.seconds


# ------------------------------------------------------------------------------------ the runner


class TrialRunner:
    """Builds the training model once per rank and measures trials on it under a capped meter.

    The budget (a units.Budget) is the runner's alone: `measure` caps the meter at its total and judges
    "fits" against its usable part; `set_budget` moves it (a benchmark sweeping caps on one model build).
    """

    def __init__(
        self,
        ctx: RunContext,
        budget: Budget,
        *,
        init: str = "random",
        device: torch.device | None = None,
        meter: MemoryMeter | None = None,
    ):
        quiet_libraries()
        self.ctx = ctx
        self.budget = budget
        self.device = device or pick_device()
        self.meter = meter or make_meter(self.device.type)
        self.init = init
        self.build_seconds = 0.0
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
        self._built = build_model(self.ctx, init=self.init, lora_r=rank, device=self.device)
        self.build_seconds += time.perf_counter() - t
        if isinstance(self.meter, CpuTrackedMeter):  # a GPU counts the weights by itself
            self.meter.track_existing(self._built.model)
        return self._built

    def release(self) -> None:
        """Free the model (the next one's peak must not include it) and the trials' scratch folder."""
        self._built = None
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
        self, batch: int, seq: int, rank: int, *, checkpointing: bool | None = None, steps: int = TRIAL_STEPS
    ) -> Trial:
        """`steps` optimizer steps (>= 2) at batch x seq under the cap; the step time is the mean of the
        steps after the first (the first builds the optimizer state)."""
        built = self.model_for(rank)
        want = self.cfg.gradient_checkpointing if checkpointing is None else checkpointing
        set_checkpointing(built, want, self.cfg.gradient_checkpointing_kwargs)
        t = time.perf_counter()
        peak, seconds, oom, note = None, None, False, ""
        self.meter.cap(self.budget.total_bytes)
        self.meter.reset_peak()
        try:
            with self.meter:
                seconds = run_trial_steps(
                    built, self.cfg, batch_size=batch, seq_len=seq, steps=steps, workdir=self.workdir()
                )
            peak = self.meter.peak_bytes()
        except torch.OutOfMemoryError as exc:
            oom, note = True, str(exc).splitlines()[0][:300]
        finally:
            self.meter.cap(None)
            built.model.zero_grad(set_to_none=True)
            self.meter.cleanup()
        if peak is not None:
            peak += self._overhead_growth()
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
            checkpointing=want,
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
