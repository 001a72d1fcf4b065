"""`autotune solve`: choose micro-batch, accumulation, sequence length, LoRA rank and the step's techniques by
measured trials, and write the profile `autotune train` runs.

- search.py: which trials to run, given a way to run one (pure: no model, no GPU, no torch);
- plan.py: the sequence, the technique combinations worth measuring, the objective's search, the choice and its
  reasons (`SolveResult`); `plan_from_estimate` for FSDP, where no step can be measured here;
- command.py: the command end to end (probe, budget, strategy, trials, profile);
- record.py: the profile document a result becomes (profile.py holds the contract).

The trial itself (the measured training step) is trial.py's, shared with the tests and the benchmarks.
"""

from autotune.solve.command import run_solve
from autotune.solve.plan import SolveRequest, SolveResult, plan_from_estimate, solve

__all__ = ["SolveRequest", "SolveResult", "plan_from_estimate", "run_solve", "solve"]
