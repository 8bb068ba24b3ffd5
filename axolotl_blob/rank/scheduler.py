"""The rank scheduler: importance → budget → mask, once per optimizer step.

Called after the optimizer step and before gradients are cleared. Up to t = T − t_final it lets the importance
score observe the step; every ΔT steps in the falling phase it keeps the `budget` highest-scoring components
over all modules and zeroes the rest; at t = T − t_final it fixes the final mask and re-applies it after every
later step, so the last t_final steps train the final ranks.
"""

from __future__ import annotations

import torch

from axolotl_blob.rank.budget import BudgetSchedule
from axolotl_blob.rank.importance import SensitivityImportance, SnrImportance
from axolotl_blob.rank.modules import AdaptedModule, prune_

Importance = SnrImportance | SensitivityImportance


class RankScheduler:
    def __init__(self, modules: list[AdaptedModule], schedule: BudgetSchedule, importance: Importance, posterior=None):
        total = sum(module.rank for module in modules)
        if total != schedule.initial:
            raise ValueError(f"the modules hold {total} rank components but the schedule starts from {schedule.initial}")
        self.modules = modules
        self.schedule = schedule
        self.importance = importance
        self.posterior = posterior  # IVON, whose posterior mean the pruning must edit; None otherwise
        self.keep = {module.name: torch.ones(module.rank, dtype=torch.bool, device=module.right.device) for module in modules}
        self.final = False

    @property
    def active_rank(self) -> int:
        """Components kept by the latest allocation (all of them before the first)."""
        return int(sum(int(keep.sum()) for keep in self.keep.values()))

    def step(self, step: int) -> None:
        """Run after optimizer step `step` (1-based count of completed steps)."""
        if self.final:
            self.apply_mask()
            return
        if step < self.schedule.final_step:  # as PEFT: the final allocation uses the scores of the steps before it
            self.importance.observe(self.modules)
        if self.schedule.allocates(step):
            self.allocate(self.schedule.budget(step))
            self.final = step == self.schedule.final_step

    @torch.no_grad()
    def allocate(self, budget: int) -> None:
        """Keep the `budget` highest-scoring components; ties go to the earlier module and index."""
        scores = torch.cat([self.importance.scores(module).to(torch.float64).cpu() for module in self.modules])
        order = torch.argsort(scores, stable=True)
        keep = torch.ones_like(scores, dtype=torch.bool)
        keep[order[: scores.numel() - budget]] = False
        for module, module_keep in zip(self.modules, keep.split([m.rank for m in self.modules])):
            self.keep[module.name] = module_keep.to(module.right.device)
        self.apply_mask()

    def apply_mask(self) -> None:
        """Zero the components the latest allocation dropped (they may have regrown since)."""
        for module in self.modules:
            prune_(module, self.keep[module.name], self.posterior)

    def rank_pattern(self) -> dict[str, list[bool]]:
        """{module name: which components are kept}."""
        return {name: keep.tolist() for name, keep in self.keep.items()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            **{f"keep.{name}": keep.cpu() for name, keep in self.keep.items()},
            "final": torch.tensor(self.final),
            **self.importance.state_dict(),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        saved = {k.removeprefix("keep."): v for k, v in state.items() if k.startswith("keep.")}
        if saved.keys() != self.keep.keys():
            raise ValueError("the saved rank-scheduler state does not match the model's adapted modules")
        self.keep = {name: saved[name].to(device=keep.device, dtype=torch.bool) for name, keep in self.keep.items()}
        self.final = bool(state["final"])
        self.importance.load_state_dict({k: v for k, v in state.items() if k != "final" and not k.startswith("keep.")})
