"""Fault injection for the tests: what a CPU cannot produce on its own, raised exactly where the real
fault would reach autotune."""

from __future__ import annotations

import subprocess

import torch
from transformers import TrainerCallback


class InjectOOM(TrainerCallback):
    """Raise a CUDA-style OOM at the start of the given optimizer steps (each once): lets tests on a
    CPU exercise the recovery path exactly as a real OOM would reach it."""

    def __init__(self, at_steps):
        self.pending = set(at_steps)

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step in self.pending:
            self.pending.discard(state.global_step)
            raise torch.OutOfMemoryError(f"injected OOM at step {state.global_step}")


def stop(proc: subprocess.Popen) -> None:
    """Reap a test's child process whatever happened to the test: kill it if it still runs, close its pipes."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    for pipe in (proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()
