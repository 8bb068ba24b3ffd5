"""BLoB inside the Hugging Face Trainer: the KL step, sampled evaluation, logging, and posterior checkpoints.

The objective is NLL + π_t·KL. As in the BLoB reference, the two parts take separate steps: the Trainer's
optimizer steps on the NLL gradient, then :class:`BlobKLCallback` takes a plain SGD step of size
kl_lr · (lr_t / lr_0) · π_t on the closed-form KL gradient. The KL step needs no activations, is identical on
every rank, and is independent of gradient accumulation and loss scaling.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from axolotl_blob.args import BlobSettings
from axolotl_blob.blob.kl import kl_weight
from axolotl_blob.blob.model import (
    PosteriorSpec,
    kl_divergence,
    kl_sgd_step,
    load_posterior,
    posterior_summary,
    save_posterior,
)
from axolotl_blob.sampling import BlobSampler, bma_log_probs, bma_token_nll, next_token_nll


def optimizer_steps_per_epoch(args: TrainingArguments, train_dataloader: Any) -> int | None:
    try:
        return max(math.ceil(len(train_dataloader) / args.gradient_accumulation_steps), 1)  # as the Trainer counts
    except TypeError:  # an iterable dataset has no length
        return None


class BlobKLCallback(TrainerCallback):
    """Applies the KL step once per optimizer step (after the NLL step, before gradients are cleared)."""

    def __init__(self, settings: BlobSettings):
        self.settings = settings
        self.cycle_steps: int | None = settings.kl_cycle_steps
        self.last_weight = 0.0

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        if self.settings.kl_cycle_steps is None:
            per_epoch = optimizer_steps_per_epoch(args, train_dataloader)
            if per_epoch is None:
                raise ValueError("blob.kl_cycle_steps must be set when the training data has no length")
            self.cycle_steps = per_epoch

    def on_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, optimizer=None, **kwargs
    ):
        self.last_weight = kl_weight(state.global_step + 1, self.cycle_steps, self.settings.kl_weighting)
        group = optimizer.param_groups[0]
        base_lr = group.get("initial_lr", args.learning_rate)
        schedule_factor = group["lr"] / base_lr if base_lr > 0 else 0.0
        step_size = self.settings.kl_lr * schedule_factor * self.last_weight
        if step_size > 0:
            kl_sgd_step(model, self.settings.prior_std, step_size)


class BlobTrainerMixin:
    """Mixed in front of the Trainer class Axolotl would use; `blob_settings` is set by :func:`blob_trainer_cls`."""

    blob_settings: BlobSettings

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.blob_kl = BlobKLCallback(self.blob_settings)
        self.add_callback(self.blob_kl)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        settings = self.blob_settings
        if not model.training and settings.eval_samples > 0 and "labels" in inputs:
            return self._bma_eval_loss(model, inputs, return_outputs)
        if model.training and settings.train_samples > 1 and not return_outputs:
            losses = []
            for _ in range(settings.train_samples):  # a loop: zero-argument super() fails inside a comprehension
                losses.append(super().compute_loss(model, inputs, num_items_in_batch=num_items_in_batch))
            return torch.stack(losses).mean()
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    def _bma_eval_loss(self, model, inputs, return_outputs: bool):
        """Eval loss = NLL of the probabilities averaged over `eval_samples` posterior draws."""
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        sampler, n_samples = BlobSampler(model), self.blob_settings.eval_samples
        if return_outputs and not self.args.prediction_loss_only:
            log_probs = bma_log_probs(model, model_inputs, sampler, n_samples)
            return next_token_nll(log_probs, inputs["labels"]), {"logits": log_probs}
        loss = bma_token_nll(model, model_inputs, inputs["labels"], sampler, n_samples)
        return (loss, {}) if return_outputs else loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs:  # a training log line
            with torch.no_grad():
                logs["kl"] = kl_divergence(self.model, self.blob_settings.prior_std).item()
            logs["kl_weight"] = self.blob_kl.last_weight
            logs.update(posterior_summary(self.model))
        super().log(logs, *args, **kwargs)

    def _save(self, output_dir: str | None = None, state_dict=None):
        super()._save(output_dir, state_dict=state_dict)
        save_posterior(self.model, output_dir or self.args.output_dir, posterior_spec(self.blob_settings))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model=model)
        load_posterior(model if model is not None else self.model, resume_from_checkpoint)


def posterior_spec(settings: BlobSettings) -> PosteriorSpec:
    return PosteriorSpec(prior_std=settings.prior_std, init_std=settings.init_std)


def blob_trainer_cls(base: type[Trainer], settings: BlobSettings) -> type[Trainer]:
    """A subclass of `base` with BLoB's loss, logging and checkpointing."""
    return type(f"Blob{base.__name__}", (BlobTrainerMixin, base), {"blob_settings": settings})
