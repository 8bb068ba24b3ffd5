"""BLoB inside the Hugging Face Trainer: its optimizer, the KL schedule, sampled evaluation, logging, checkpoints.

The objective is NLL + π_t·KL. The Trainer builds the optimizer `optimizer:` names, as for any run but without the
σ factors G under the reference σ update, and :class:`BlobTrainerMixin` wraps it in :class:`BlobOptimizer`, which
takes BLoB's SGD steps on the posterior roles (blob/optimizer.py). :class:`BlobKLSchedule` writes π_t into the
optimizer's groups before every optimizer step and stops training when a posterior factor turns NaN or inf.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from axolotl_blob.blob.kl import kl_weight, rescaled_cycle_steps
from axolotl_blob.blob.model import (
    PosteriorSpec,
    kl_divergence,
    load_posterior,
    module_key,
    posterior_parameters,
    posterior_state_dict,
    posterior_summary,
    save_posterior,
)
from axolotl_blob.blob.optimizer import MEAN, SIGMA, BlobOptimizer, first_non_finite, set_kl_weight
from axolotl_blob.engines import is_sharded, is_zero3_partitioned, local_shard
from axolotl_blob.multiple_choice import ChoiceLoss
from axolotl_blob.sampling import blob_sampler, bma_choice_nll, bma_log_probs, bma_token_nll, next_token_nll

if TYPE_CHECKING:
    from axolotl_blob.args import BlobSettings


class NonFinitePosteriorError(FloatingPointError):
    """A posterior factor turned NaN or inf; the message names the layer, the step and the setting to change."""


def optimizer_steps_per_epoch(args: TrainingArguments, train_dataloader: Any) -> int | None:
    try:
        return max(math.ceil(len(train_dataloader) / args.gradient_accumulation_steps), 1)  # as the Trainer counts
    except TypeError:  # an iterable dataset has no length
        return None


def cycle_steps(settings: BlobSettings, args: TrainingArguments, train_dataloader: Any) -> int:
    """K: `blob.kl_cycle_steps` as given, the reference's dataset rescaling (`rescaled`), or one epoch (unset)."""
    if isinstance(settings.kl_cycle_steps, int):
        return settings.kl_cycle_steps
    if settings.kl_cycle_steps == "rescaled":
        try:
            n_examples = len(train_dataloader.dataset)
        except TypeError:
            raise ValueError("blob.kl_cycle_steps 'rescaled' needs the number of training examples; this dataset has no length: set an integer") from None
        batch = args.per_device_train_batch_size * args.gradient_accumulation_steps
        return rescaled_cycle_steps(n_examples, args.world_size, batch)
    per_epoch = optimizer_steps_per_epoch(args, train_dataloader)
    if per_epoch is None:
        raise ValueError("blob.kl_cycle_steps must be set when the training data has no length")
    return per_epoch


def non_finite_error(role: str, tensor: torch.Tensor, model: nn.Module, step: int, settings: BlobSettings) -> NonFinitePosteriorError:
    names = {id(local_shard(param)): name for name, param in model.named_parameters()}
    where = module_key(names.get(id(tensor), "a flat partition of the optimizer (the engine holds no names)"))
    factor = "mean M (lora_A)" if role == MEAN else "σ factor G (blob_G)"
    return NonFinitePosteriorError(
        f"BLoB: the posterior {factor} of {where} holds NaN or inf after optimizer step {step}; training stopped. "
        f"Lower blob.kl_lr (now {settings.kl_lr:g}) or blob.init_std (now {settings.init_std:g}); "
        "under fp16, train in bf16 instead (bf16: true, fp16: false)."
    )


class BlobKLSchedule(TrainerCallback):
    """π_t into the optimizer's role groups before every optimizer step; after it, one finiteness check."""

    def __init__(self, settings: BlobSettings):
        self.settings = settings
        self.cycle_steps: int | None = None
        self.last_weight = 0.0

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        self.cycle_steps = cycle_steps(self.settings, args, train_dataloader)

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        """Before the step's first micro-batch: DeepSpeed steps inside the last backward, before the Trainer's
        `on_pre_optimizer_step`."""
        self.last_weight = kl_weight(state.global_step + 1, self.cycle_steps, self.settings.kl_weighting)
        set_kl_weight(optimizer.param_groups, self.last_weight)

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        found = first_non_finite(optimizer.param_groups if not zero3_partitioned(model) else posterior_shards(model))
        if found is not None:
            raise non_finite_error(*found, model, state.global_step + 1, self.settings)


def zero3_partitioned(model: nn.Module) -> bool:
    return any(is_zero3_partitioned(g) for g in posterior_parameters(model)[1])


def posterior_shards(model: nn.Module) -> list[dict]:
    """The role groups as this rank holds them in the model: ZeRO-3 empties the optimizer's groups outside its step."""
    means, sigmas = posterior_parameters(model)
    return [{"role": MEAN, "params": [local_shard(p) for p in means]}, {"role": SIGMA, "params": [local_shard(p) for p in sigmas]}]


@contextlib.contextmanager
def hidden_from_optimizer(params: list[nn.Parameter]) -> Iterator[None]:
    """The Trainer (and Axolotl's grouping, LoRA+, …) puts every parameter that requires a gradient into its
    optimizer; G needs its NLL gradient but must stay out, so it looks frozen while the optimizer is built."""
    params = [param for param in params if param.requires_grad]
    for param in params:
        param.requires_grad_(False)
    try:
        yield
    finally:
        for param in params:
            param.requires_grad_(True)


class BlobTrainerMixin:
    """Mixed in front of the Trainer class Axolotl would use; `blob_settings` is set by :func:`blob_trainer_cls`."""

    blob_settings: BlobSettings

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.blob_kl = BlobKLSchedule(self.blob_settings)
        self.add_callback(self.blob_kl)

    def create_optimizer(self, model=None):
        """The optimizer the run asked for, built as usual (without G under the reference σ update), wrapped."""
        if isinstance(self.optimizer, BlobOptimizer):
            return self.optimizer
        settings = self.blob_settings
        means, sigmas = posterior_parameters(self.model if model is None else model)
        with hidden_from_optimizer(sigmas if settings.sigma_update == "reference" else []):
            inner = super().create_optimizer(model)
        self.optimizer = BlobOptimizer(
            inner, means, sigmas, kl_lr=settings.kl_lr, prior_std=settings.prior_std, sigma_update=settings.sigma_update
        )
        return self.optimizer

    def _clip_grad_norm(self, model):
        """`blob.clip_sigma_grad: false` (the reference): max_grad_norm clips the other parameters as the Trainer
        would, and G's NLL gradient is neither clipped nor counted in the norm returned (and logged)."""
        if self.blob_settings.clip_sigma_grad:
            return super()._clip_grad_norm(model)
        sigmas = {id(g) for g in posterior_parameters(model)[1]}
        others = [param for param in model.parameters() if id(param) not in sigmas]
        return self.accelerator.clip_grad_norm_(others, self.args.max_grad_norm)

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
        """Eval loss = NLL of the probabilities averaged over `eval_samples` posterior draws (over the K answer
        choices under a K-way training loss: multiple_choice.likelihood choices, or cloze data)."""
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        sampler, n_samples = blob_sampler(model, self.blob_settings.eval_draws), self.blob_settings.eval_samples
        if return_outputs and not self.args.prediction_loss_only:
            log_probs = bma_log_probs(model, model_inputs, sampler, n_samples)
            return next_token_nll(log_probs, inputs["labels"]), {"logits": log_probs}
        likelihood = getattr(self, "compute_loss_func", None)
        if isinstance(likelihood, ChoiceLoss):
            loss = bma_choice_nll(model, model_inputs, inputs["labels"], likelihood, sampler, n_samples)
        else:
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
        """On the saving process only: under ZeRO-3 / FSDP the σ factors come from the state dict the engine
        gathered for the adapter (`posterior_state_dict`)."""
        super()._save(output_dir, state_dict=state_dict)
        tensors = posterior_state_dict(self.model, state_dict)
        save_posterior(self.model, output_dir or self.args.output_dir, posterior_spec(self.blob_settings), tensors)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None):
        """The posterior file restores G; under FSDP the engine's own sharded checkpoint already did."""
        super()._load_from_checkpoint(resume_from_checkpoint, model=model)
        model = model if model is not None else self.model
        if not any(is_sharded(g) for g in posterior_parameters(model)[1]):
            load_posterior(model, resume_from_checkpoint)


def posterior_spec(settings: BlobSettings) -> PosteriorSpec:
    return PosteriorSpec(prior_std=settings.prior_std, init_std=settings.init_std, noise=settings.noise, eval_draws=settings.eval_draws)


def blob_trainer_cls(base: type[Trainer], settings: BlobSettings) -> type[Trainer]:
    """A subclass of `base` with BLoB's loss, logging and checkpointing."""
    return type(f"Blob{base.__name__}", (BlobTrainerMixin, base), {"blob_settings": settings})
