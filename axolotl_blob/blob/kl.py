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


def gaussian_kl_grads(
    mean: torch.Tensor, std: torch.Tensor, prior_std: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(∂KL/∂μ, ∂KL/∂σ) in closed form, so the KL step needs no autograd graph."""
    mean, std = mean.float(), std.float()
    variance = prior_std**2
    return mean / variance, std / variance - 1.0 / (std + EPS)


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

