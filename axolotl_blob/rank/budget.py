"""AdaLoRA's cubic rank-budget schedule, in optimizer steps.

Step t counts completed optimizer steps (1 … T). The budget holds the initial total rank b0 while t ≤ t_init,
falls as b(t) = b_T + ⌊(b0 − b_T)(1 − (t − t_init)/(T − t_init − t_final))³⌋ until t = T − t_final, where it
reaches b_T, and stays at b_T for the last t_final steps. Allocations happen every ΔT steps inside the
falling phase and, always, at t = T − t_final, whose mask is then kept to the end.
"""

from __future__ import annotations

from dataclasses import dataclass


def check_steps(t_init: int, t_final: int, total_steps: int) -> None:
    """The falling phase needs at least one step: t_init + t_final < T."""
    if t_init + t_final >= total_steps:
        raise ValueError(
            f"rank_scheduler.t_init + rank_scheduler.t_final = {t_init} + {t_final} = {t_init + t_final} must be "
            f"smaller than the run's {total_steps} optimizer steps, or no step is left to reduce the rank: "
            "lower t_init / t_final or train longer"
        )


@dataclass(frozen=True)
class BudgetSchedule:
    initial: int  # b0: total rank at the start (Σ init_r over the adapted modules)
    target: int  # b_T: target_r × number of adapted modules
    total_steps: int  # T: optimizer steps of the whole run
    t_init: int
    t_final: int
    delta_t: int

    def __post_init__(self):
        check_steps(self.t_init, self.t_final, self.total_steps)
        if not 0 <= self.target <= self.initial:
            raise ValueError(f"the target total rank {self.target} must lie in [0, {self.initial}]")

    @property
    def final_step(self) -> int:
        """The step whose allocation fixes the final mask: T − t_final."""
        return self.total_steps - self.t_final

    def budget(self, step: int) -> int:
        if step <= self.t_init:
            return self.initial
        if step >= self.final_step:
            return self.target
        # exact integer arithmetic: (b0 − b_T)·(T − t_final − t)³ // (T − t_final − t_init)³, no float round-off
        span = self.final_step - self.t_init
        return self.target + (self.initial - self.target) * (self.final_step - step) ** 3 // span**3

    def allocates(self, step: int) -> bool:
        """Whether a new mask is computed after optimizer step `step`."""
        if step == self.final_step:
            return True
        return self.t_init < step < self.final_step and step % self.delta_t == 0
