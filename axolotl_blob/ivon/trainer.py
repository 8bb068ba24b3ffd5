"""IVON inside the Hugging Face Trainer: a weight sample around every micro-batch's forward and backward.

Each `training_step` (forward + backward of one micro-batch) runs inside ``sampled_params(train=True)``, so with
gradient accumulation every micro-batch is its own Monte-Carlo sample; entering the next sample folds the previous
one's gradient in. The last sample's gradient is read by ``step()`` after the Trainer has clipped it. The Trainer
scales each micro-batch loss by its share of the batch, hence ``grad_reduction="sum"``. Outside training steps the
parameters hold the posterior mean: evaluation, checkpoints and the saved adapter see m.

What happens around a micro-batch (``ivon_micro_batch``) is plain torch, so that it can be run, and tested, without the
Trainer (FSDP2 runs through accelerate on GPUs only).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.optim import Optimizer

from transformers import Trainer

from axolotl_blob.ivon.optimizer import IVON

if TYPE_CHECKING:
    from axolotl_blob.args import IvonSettings


def unwrap_optimizer(optimizer: Optimizer | None) -> Optimizer | None:
    """The torch optimizer inside accelerate's AcceleratedOptimizer (or the optimizer itself)."""
    return getattr(optimizer, "optimizer", optimizer)


class IvonSampler:
    """IVON's posterior: each draw puts θ ~ N(m, σ²) into the parameters and restores m afterwards."""

    def __init__(self, optimizer: IVON):
        self.optimizer = optimizer

    def draws(self, n_samples: int) -> Iterator[None]:
        if n_samples == 0:
            yield
            return
        for _ in range(n_samples):
            with self.optimizer.sampled_params(train=False):
                yield

    def samples_used(self, n_samples: int) -> int:
        return n_samples


def ivon_optimizer_kwargs(settings: IvonSettings, ess: float, beta1: float, weight_decay: float, distributed: bool) -> dict:
    return {
        "ess": ess,
        "hess_init": settings.hess_init,
        "beta1": beta1,
        "beta2": settings.beta2,
        "weight_decay": weight_decay,
        "mc_samples": settings.mc_samples,
        "clip_radius": settings.clip_radius,
        "rescale_lr": settings.rescale_lr,
        "grad_reduction": "sum",
        "sync": distributed,  # micro-batches under no_sync fold rank-local gradients: average ĝ, ĥ at step()
        "seed": settings.seed,
    }


def ivon_micro_batch(model: nn.Module, optimizer: IVON, samples: int, backward: Callable[[float], torch.Tensor]) -> torch.Tensor:
    """One micro-batch as ``samples`` Monte-Carlo samples: each ``backward(1 / samples)`` (a forward and backward of
    the micro-batch, its loss multiplied by the factor) runs with θ ~ N(m, σ²) in the parameters. Returns the sum of
    the returned (scaled) losses.

    Under FSDP2, each sample's gradient must be reduce-scattered into the shards before the next sample is drawn,
    while accelerate's ``no_sync`` (every micro-batch of an accumulated step but the last) would keep the gradients
    unsharded and reduce-scatter their sum at the last micro-batch, one gradient for several samples. The sync is
    turned back on for the micro-batch (``no_sync`` turns it on anyway when it exits): a reduce-scatter per sample.
    """
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(True)
    losses = []
    for _ in range(samples):
        with optimizer.sampled_params(train=True):
            losses.append(backward(1.0 / samples))
    return torch.stack(losses).sum()


class IvonTrainerMixin:
    """Mixed in front of the Trainer class; `ivon_settings` is set by the factory in the plugin."""

    ivon_settings: IvonSettings

    def training_step(self, model, inputs, num_items_in_batch=None):
        def one_sample(scale: float) -> torch.Tensor:
            self._ivon_loss_scale = scale
            return super(IvonTrainerMixin, self).training_step(model, inputs, num_items_in_batch)

        try:
            return ivon_micro_batch(model, unwrap_optimizer(self.optimizer), self.ivon_settings.mc_samples, one_sample)
        finally:
            self._ivon_loss_scale = 1.0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        scale = getattr(self, "_ivon_loss_scale", 1.0)
        if scale == 1.0 or not model.training:
            return result
        if return_outputs:
            return result[0] * scale, result[1]
        return result * scale


def ivon_trainer_cls(base: type[Trainer], settings: IvonSettings) -> type[Trainer]:
    """A subclass of `base` that samples IVON's weights around every micro-batch."""
    return type(f"Ivon{base.__name__}", (IvonTrainerMixin, base), {"ivon_settings": settings})
