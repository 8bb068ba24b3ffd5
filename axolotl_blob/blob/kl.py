"""KL divergence of BLoB's posterior from its prior, its analytic gradient, and the KL weight schedule.

q(A) = N(M, diag(σ²)) elementwise, p(A) = N(0, β²). The KL is summed over entries and computed in fp32
(bf16 would lose the log σ term); EPS keeps log σ finite if σ collapses to zero.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

EPS = 1e-8

KLWeighting = Literal["reweight", "uniform"]


def gaussian_kl(mean: torch.Tensor, std: torch.Tensor, prior_std: float) -> torch.Tensor:
    """Σ [log β − log σ + (σ² + μ²) / (2β²) − ½], in fp32."""
    mean, std = mean.float(), std.float()
    return (
        math.log(prior_std)
        - torch.log(std + EPS)
        + (std.square() + mean.square()) / (2.0 * prior_std**2)
        - 0.5
    ).sum()


def kl_grad_mean(mean: torch.Tensor, prior_std: float) -> torch.Tensor:
    """∂KL/∂μ = μ/β² in closed form (fp32). The KL is a sum of a term in μ and a term in σ, so each gradient needs
    only its own tensor: an update can run on any shard of it."""
    return mean.float() / prior_std**2


def kl_grad_std(std: torch.Tensor, prior_std: float) -> torch.Tensor:
    """∂KL/∂σ = σ/β² − 1/σ in closed form (fp32, EPS as in the KL)."""
    std = std.float()
    return std / prior_std**2 - 1.0 / (std + EPS)


def rescaled_cycle_steps(n_examples: int, world_size: int, batch_size: int, gamma: float = 8.0) -> int:
    """The BLoB reference's dataset-rescaled cycle, K = int(100 · N^(π/γ) / world_size / batch_size).

    N: training examples; batch_size: examples per rank and optimizer step (the reference's per-device batch,
    here micro_batch_size × gradient_accumulation_steps). At least 1: a cycle cannot be shorter than a step.
    """
    return max(int(100 * n_examples ** (math.pi / gamma) / world_size / batch_size), 1)


def kl_weight(step: int, cycle_steps: int, weighting: KLWeighting) -> float:
    """π_t for optimizer step `step` (1-based).

    `reweight` (BLoB's schedule): j = step mod K (K when 0), π = 2^j / (2^(K+1) − 1), growing within each
    cycle and summing to ≈1 per cycle. Computed as 2^(j−K−1) / (1 − 2^(−K−1)) so large K cannot overflow.
    `uniform`: π = 1/K.
    """
    if step < 1 or cycle_steps < 1:
        raise ValueError(f"kl_weight needs step >= 1 and cycle_steps >= 1, got {step}, {cycle_steps}")
    if weighting == "uniform":
        return 1.0 / cycle_steps
    j = step % cycle_steps or cycle_steps
    return math.ldexp(1.0, j - cycle_steps - 1) / (1.0 - math.ldexp(1.0, -cycle_steps - 1))

