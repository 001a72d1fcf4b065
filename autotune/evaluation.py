"""Evaluation that recovers from its own out-of-memory errors, apart from training.

The Trainer evaluates from inside train(), so an evaluation OOM would otherwise reach the runner's training
OOM recovery and halve the *training* micro-batch (transformers #32215 is the same flaw in
auto_find_batch_size). Here evaluation catches its own OOM, halves only the evaluation batch and runs again;
at an evaluation batch of 1 it stops evaluating for the rest of the run rather than stop training.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers.trainer_utils import IntervalStrategy

from autotune.memory import free_memory


def _notify(trainer, change: dict) -> None:
    """Tell the callbacks that listen (on_eval_oom); the runner's log and console are among them."""
    for callback in trainer.callback_handler.callbacks:
        listener = getattr(callback, "on_eval_oom", None)
        if listener is not None:
            listener(trainer.state, change)


def evaluate_with_oom_recovery(trainer, evaluate: Callable[..., dict], *args, **kwargs) -> dict:
    """`evaluate(*args, **kwargs)` (the Trainer's), halving args.per_device_eval_batch_size on each OOM."""
    while True:
        try:
            return evaluate(*args, **kwargs)
        except torch.OutOfMemoryError as exc:
            free_memory()  # the failed batch's activations live on in the traceback's frames until collected
            batch = trainer.args.per_device_eval_batch_size
            change = {"at_step": trainer.state.global_step, "error": str(exc).splitlines()[0][:200]}
            if batch <= 1:
                # Nothing smaller to try: give up evaluating, keep training.
                trainer.args.eval_strategy = IntervalStrategy.NO
                _notify(trainer, {**change, "eval_batch_size": [batch, None]})
                return {}
            new = batch // 2
            trainer.args.per_device_eval_batch_size = new
            _notify(trainer, {**change, "eval_batch_size": [batch, new]})
