"""The batch plan: micro-batch x accumulation x world size = the effective batch, exactly.

The effective batch (samples per optimizer step) is the user's contract: the learning rate and the loss scale
were chosen for it. So every micro-batch autotune picks (the config's, the solver's, one rank's of several, the
one an out-of-memory falls back to) divides each rank's share of the effective batch, and accumulation makes up
the rest, never rounding either way. One rule, here: the largest divisor of the share up to what fits.
Importing this module must not import torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from autotune.errors import UserError


def divisors_up_to(n: int, limit: int) -> list[int]:
    """The divisors of n that are at most `limit`, ascending."""
    return [d for d in range(1, min(n, limit) + 1) if n % d == 0]


def share_of(effective: int, world: int) -> int:
    """One rank's samples per optimizer step; a UserError when the ranks cannot take equal shares."""
    if world < 1 or effective % world:
        raise UserError(
            f"the effective batch {effective} cannot be split over {world} processes: every optimizer step "
            f"takes the same number of samples from each rank. Use a process count that divides {effective}, or "
            "set effective_batch_size to a multiple of the process count"
        )
    return effective // world


@dataclass(frozen=True)
class BatchPlan:
    """micro x accumulation x world == effective."""

    micro: int
    accumulation: int
    world: int = 1

    @property
    def effective(self) -> int:
        return self.micro * self.accumulation * self.world

    @property
    def share(self) -> int:
        """One rank's samples per optimizer step."""
        return self.micro * self.accumulation

    @classmethod
    def largest(cls, effective: int, world: int = 1, upper: int | None = None) -> BatchPlan:
        """The plan with the largest micro-batch up to `upper` (default: no bound) that divides each rank's share:
        a smaller micro-batch always fits where a larger one did (memory grows with the micro-batch)."""
        share = share_of(effective, world)
        micro = divisors_up_to(share, max(1, share if upper is None else upper))[-1]
        return cls(micro, share // micro, world)

    def smaller(self) -> BatchPlan | None:
        """After an out-of-memory: the largest micro-batch of at most half this one that divides the share, the
        accumulation keeping the effective batch (halve and double when the micro-batch is a power of two; 3 x 2
        becomes 1 x 6, never 1 x 4). None at a micro-batch of 1."""
        if self.micro <= 1:
            return None
        return BatchPlan.largest(self.effective, self.world, self.micro // 2)

    def describe(self) -> str:
        ranks = f" x {self.world} processes" if self.world > 1 else ""
        return f"micro-batch {self.micro} x accumulation {self.accumulation}{ranks} = effective batch {self.effective}"
