"""Rank scheduling inside the Hugging Face Trainer: the per-step callback, the AdaLoRA regulariser, logging,
checkpoints, and the final pattern written into the adapter."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback

from axolotl_blob.io import save_tensors
from axolotl_blob.ivon.optimizer import IVON
from axolotl_blob.ivon.trainer import unwrap_optimizer
from axolotl_blob.rank.adalora import orthogonality_penalty
from axolotl_blob.rank.budget import BudgetSchedule
from axolotl_blob.rank.importance import SensitivityImportance, SnrImportance
from axolotl_blob.rank.modules import adapted_modules
from axolotl_blob.rank.pattern import commit_adalora_pattern, commit_blob_pattern, write_rank_report
from axolotl_blob.rank.scheduler import RankScheduler

if TYPE_CHECKING:
    from axolotl_blob.args import RankSchedulerSettings

LOG = logging.getLogger(__name__)
STATE_FILE = "rank_scheduler.safetensors"


def build_importance(settings: RankSchedulerSettings, posterior: IVON | None):
    if settings.importance == "sensitivity":
        return SensitivityImportance(settings.beta1, settings.beta2)
    return SnrImportance(folded=settings.importance == "snr_abs", posterior=posterior)


class RankSchedulerCallback(TrainerCallback):
    """Builds the scheduler when the Trainer knows its step count, steps it after every optimizer step, and writes
    the final pattern into the adapter when training ends (before the Trainer's final save)."""

    def __init__(self, settings: RankSchedulerSettings):
        self.settings = settings
        self.scheduler: RankScheduler | None = None
        self.resume_state: dict[str, torch.Tensor] | None = None
        self.initial_rank = 0

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        modules = adapted_modules(model)
        optimizer = unwrap_optimizer(optimizer)
        posterior = optimizer if isinstance(optimizer, IVON) else None
        initial = sum(module.rank for module in modules)
        target = self.settings.target_r * len(modules)
        if target > initial:
            raise ValueError(
                f"rank_scheduler.target_r {self.settings.target_r} × {len(modules)} modules = {target} exceeds the "
                f"adapter's current total rank {initial} (does lora_model_dir hold an already pruned adapter?)"
            )
        self.initial_rank = max(module.rank for module in modules)
        schedule = BudgetSchedule(
            initial=initial,
            target=target,
            total_steps=state.max_steps,
            t_init=self.settings.t_init,
            t_final=self.settings.t_final,
            delta_t=self.settings.delta_t,
        )
        self.scheduler = RankScheduler(modules, schedule, build_importance(self.settings, posterior), posterior)
        if self.resume_state is not None:
            self.scheduler.load_state_dict(self.resume_state)
        if state.is_world_process_zero:
            LOG.info(
                f"rank scheduler ({self.settings.importance}): {len(modules)} modules, total rank {initial} → "
                f"{schedule.target} between steps {schedule.t_init} and {schedule.final_step} of {schedule.total_steps}"
            )

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.scheduler.step(state.global_step + 1)  # the Trainer counts the step only after this event

    def on_train_end(self, args, state, control, model=None, **kwargs):
        scheduler = self.scheduler
        if not scheduler.final and state.is_world_process_zero:
            LOG.warning("training ended before rank_scheduler reached its final budget; saving the current ranks")
        scheduler.apply_mask()  # dropped components may have regrown since the last allocation
        ranks = {name: int(keep.sum()) for name, keep in scheduler.keep.items()}  # before BLoB's cut
        if scheduler.modules[0].kind == "adalora":
            commit_adalora_pattern(model, scheduler.modules, scheduler.keep, state.max_steps)
        else:
            commit_blob_pattern(model, scheduler.modules, scheduler.keep)
        if state.is_world_process_zero:
            write_rank_report(ranks, self.initial_rank, args.output_dir, self.settings.plots)


class RankTrainerMixin:
    """Mixed in front of the Trainer class; `rank_settings` and `adapter_kind` are set by :func:`rank_trainer_cls`."""

    rank_settings: RankSchedulerSettings
    adapter_kind: str

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rank_callback = RankSchedulerCallback(self.rank_settings)
        self.add_callback(self.rank_callback)  # after BLoB's KL step: pruning sees the step's final posterior
        self._orth_penalty: float | None = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        weight = self.rank_settings.orth_reg_weight
        if not model.training or self.adapter_kind != "adalora" or weight == 0:
            return result
        penalty = orthogonality_penalty(self.rank_callback.scheduler.modules)
        self._orth_penalty = penalty.item()
        # once per optimizer step in total: the Trainer divides each micro-batch's loss by the accumulation steps
        # only when the loss is not already normalised by the batch's token count
        trainer_divides = (not self.model_accepts_loss_kwargs or num_items_in_batch is None) and self.compute_loss_func is None
        scale = weight if trainer_divides else weight / self.current_gradient_accumulation_steps
        if return_outputs:
            return result[0] + scale * penalty, result[1]
        return result + scale * penalty

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        scheduler = self.rank_callback.scheduler
        if "loss" in logs and scheduler is not None:
            logs["active_rank"] = scheduler.active_rank
            logs["rank_budget"] = scheduler.schedule.budget(self.state.global_step)
            if self._orth_penalty is not None:
                logs["orth_penalty"] = self._orth_penalty
        super().log(logs, *args, **kwargs)

    def _save(self, output_dir: str | None = None, state_dict=None):
        super()._save(output_dir, state_dict=state_dict)
        scheduler = self.rank_callback.scheduler
        if scheduler is not None:
            tensors = {key: value.contiguous() for key, value in scheduler.state_dict().items()}
            save_tensors(Path(output_dir or self.args.output_dir) / STATE_FILE, tensors)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model=model)
        path = Path(resume_from_checkpoint) / STATE_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{resume_from_checkpoint} has no {STATE_FILE}: it was not saved by a rank-scheduled run")
        self.rank_callback.resume_state = load_file(str(path))


def rank_trainer_cls(base: type[Trainer], settings: RankSchedulerSettings, adapter_kind: str) -> type[Trainer]:
    """A subclass of `base` that schedules the adapter's ranks."""
    attributes = {"rank_settings": settings, "adapter_kind": adapter_kind}
    return type(f"RankScheduled{base.__name__}", (RankTrainerMixin, base), attributes)
