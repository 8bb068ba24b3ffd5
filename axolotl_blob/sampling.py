"""Posterior sampling as one interface, and Bayesian model averaging over it.

A sampler turns a model into a sequence of N predictive functions (N posterior draws, or one pass at the mean
for N = 0 or a deterministic model). Averaging happens over *probabilities*, never logits.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Protocol

import torch
from torch import nn

from axolotl_blob.blob.layer import DEFAULT_EVAL_DRAWS, EvalDraws
from axolotl_blob.blob.model import blob_layers, posterior_sampling
from axolotl_blob.multiple_choice import ChoiceLoss


class PosteriorSampler(Protocol):
    def draws(self, n_samples: int) -> Iterator[None]:
        """Yield once per posterior draw with the model set to that draw (once at the mean when n = 0)."""

    def samples_used(self, n_samples: int) -> int:
        """How many posterior samples `draws(n_samples)` really averages (0: one pass at a point)."""


class DeterministicSampler:
    """A point-estimate model (plain LoRA): one pass, whatever N is asked for."""

    def draws(self, n_samples: int) -> Iterator[None]:
        yield

    def samples_used(self, n_samples: int) -> int:
        return 0


class BlobSampler:
    """BLoB layers: each draw is one fresh sample of every layer's A, shared by the whole batch (N forwards cost
    N LoRA forwards); N = 0 is the posterior mean."""

    def __init__(self, model: nn.Module, whole_weights: bool = True):
        self.model, self.whole_weights = model, whole_weights  # False: the training noise path's per-token draws

    def draws(self, n_samples: int) -> Iterator[None]:
        with posterior_sampling(self.model, enabled=n_samples > 0, whole_weights=self.whole_weights):
            for _ in range(max(n_samples, 1)):
                yield

    def samples_used(self, n_samples: int) -> int:
        return n_samples


class DropoutSampler:
    """MC dropout (Gal & Ghahramani, 2016) on a point-estimate model: every draw runs with the dropout layers
    (LoRA's `lora_dropout` among them) active as in training; N = 0 is one pass with dropout off."""

    def __init__(self, model: nn.Module):
        self.dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout) and m.p > 0]
        if not self.dropouts:
            raise ValueError("MC dropout found no dropout layer with p > 0: train with lora_dropout > 0 (e.g. 0.1)")

    def draws(self, n_samples: int) -> Iterator[None]:
        if n_samples == 0:
            yield
            return
        previous = [m.training for m in self.dropouts]
        for module in self.dropouts:
            module.train()
        try:
            for _ in range(n_samples):
                yield
        finally:
            for module, training in zip(self.dropouts, previous):
                module.train(training)

    def samples_used(self, n_samples: int) -> int:
        return n_samples


def blob_sampler(model: nn.Module, draws: EvalDraws) -> BlobSampler:
    """BLoB's sampler for a `blob.eval_draws` setting."""
    return BlobSampler(model, whole_weights=draws == "whole_weights")


def sampler_for(model: nn.Module, optimizer=None, draws: EvalDraws = DEFAULT_EVAL_DRAWS) -> PosteriorSampler:
    """The model's posterior source: IVON's optimizer state, BLoB layers (sampled as `draws` says), or none (a point
    estimate)."""
    from axolotl_blob.ivon.optimizer import IVON
    from axolotl_blob.ivon.trainer import IvonSampler, unwrap_optimizer

    optimizer = unwrap_optimizer(optimizer)
    if isinstance(optimizer, IVON):
        return IvonSampler(optimizer)
    return blob_sampler(model, draws) if next(blob_layers(model), None) else DeterministicSampler()


def log_mean_exp(log_probs_per_draw: Iterable[torch.Tensor]) -> torch.Tensor:
    """log((1/N) Σ_n exp(x_n)), streamed so memory does not grow with N."""
    total, count = None, 0
    for log_probs in log_probs_per_draw:
        total = log_probs if total is None else torch.logaddexp(total, log_probs)
        count += 1
    return total - math.log(count)


@torch.no_grad()
def bma_log_probs(model: nn.Module, model_inputs: dict, sampler: PosteriorSampler, n_samples: int) -> torch.Tensor:
    """log of the averaged predictive distribution over the vocabulary, (batch, seq, vocab)."""
    return log_mean_exp(
        torch.log_softmax(model(**model_inputs).logits.float(), dim=-1) for _ in sampler.draws(n_samples)
    )


def next_token_nll(log_probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean NLL over supervised positions of a causal LM, given log-probabilities aligned with the inputs."""
    targets = labels[:, 1:]
    mask = targets != -100
    picked = log_probs[:, :-1].gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return -(picked * mask).sum() / mask.sum().clamp(min=1)


@torch.no_grad()
def bma_token_nll(
    model: nn.Module, model_inputs: dict, labels: torch.Tensor, sampler: PosteriorSampler, n_samples: int
) -> torch.Tensor:
    """NLL of the averaged probabilities −log((1/N) Σ_n p_n(label)), gathering only the label entries."""
    targets = labels[:, 1:].clamp(min=0).unsqueeze(-1)

    def label_log_probs() -> Iterator[torch.Tensor]:
        for _ in sampler.draws(n_samples):
            logits = model(**model_inputs).logits[:, :-1].float()
            yield (logits.gather(-1, targets) - torch.logsumexp(logits, dim=-1, keepdim=True)).squeeze(-1)

    picked = log_mean_exp(label_log_probs())
    mask = labels[:, 1:] != -100
    return -(picked * mask).sum() / mask.sum().clamp(min=1)


@torch.no_grad()
def bma_choice_nll(
    model: nn.Module, model_inputs: dict, labels: torch.Tensor, likelihood: ChoiceLoss, sampler: PosteriorSampler, n_samples: int
) -> torch.Tensor:
    """−log((1/N) Σ_n p_n(answer)) with p_n the K-way softmax of the training loss `likelihood` (the answer letters,
    or the cloze choices' scores), mean over the questions."""
    answers: list[torch.Tensor] = []

    def draw_log_probs() -> Iterator[torch.Tensor]:
        for _ in sampler.draws(n_samples):
            log_probs, index = likelihood.choice_log_probs(model(**model_inputs).logits, labels)
            answers.append(index)
            yield log_probs

    averaged = log_mean_exp(draw_log_probs())
    return -averaged.gather(-1, answers[0][:, None]).mean()
