"""The BLoB layer: a Gaussian posterior over LoRA's A factor, sampled with Flipout in training and, in prediction,
by the same per-token path or as whole weights (`blob.eval_draws`).

BLoB is a PEFT LoRA *variant*: PEFT's own LoRA layers (``nn.Linear``, bitsandbytes 8-bit and 4-bit) keep their
forward, dtype casting, merging and saving, and call :meth:`BlobVariant.forward` for the adapter part.

Per adapter the layer holds the ordinary ``lora_A`` (the posterior mean M), ``lora_B`` (a point estimate) and
``blob_G`` with σ = G² elementwise. ``blob_G`` deliberately lives outside the ``lora_`` namespace so the PEFT
adapter file stays a plain LoRA adapter (the posterior mean); the posterior is saved beside it.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import LoraLayer, LoraVariant
from torch import nn

POSTERIOR_PARAM = "blob_G"
NoisePath = Literal["flipout", "rank_signs"]
EvalDraws = Literal["per_token", "whole_weights"]  # blob.eval_draws: the noise path's per-token draws, or one A per forward
# The reference evaluates with its training path, and σ is learnt under it; on the demo's held-out training slice the
# two draws scored within their Monte Carlo noise (bench/results/eval_draws.json)
DEFAULT_EVAL_DRAWS: EvalDraws = "per_token"


def posterior_std(g: torch.Tensor) -> torch.Tensor:
    """σ = G²: smooth, non-negative, and G's gradient vanishes only at σ = 0."""
    return g * g


def init_posterior_factor(weight: torch.Tensor, init_std: float) -> nn.Parameter:
    """G ~ Uniform(ε/√2, ε), so σ starts in [ε²/2, ε²]."""
    g = torch.empty_like(weight)
    nn.init.uniform_(g, init_std / math.sqrt(2.0), init_std)
    return nn.Parameter(g)


def sampling_enabled(module: LoraLayer) -> bool:
    """Sample in training by default; an explicit ``blob_sampling`` (set by the sampling context) wins."""
    forced = getattr(module, "blob_sampling", None)
    return module.training if forced is None else forced


def draws_whole_weights(module: LoraLayer) -> bool:
    """Set by the sampling context for Bayesian model averaging (``blob_weight_draws``)."""
    return getattr(module, "blob_weight_draws", False)


def weight_sample(mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """A = M + σ ⊙ ε: one draw of the whole factor, r × d_in numbers."""
    return torch.addcmul(mean, std, torch.randn_like(std))


def rademacher(shape: torch.Size, like: torch.Tensor) -> torch.Tensor:
    """Independent ±1 signs."""
    return torch.randint(0, 2, shape, device=like.device, dtype=like.dtype).mul_(2).sub_(1)


def flipout_noise(x: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """((x ⊙ r_in) Eᵀ) ⊙ r_out with E = σ ⊙ ε: one Gaussian draw per call, per-token sign flips.

    Token n sees ΔA_n = (r_out,n r_in,nᵀ) ⊙ E, an exact N(0, σ²) sample that is pseudo-independent of the
    other tokens', at the cost of one rank-r matmul.
    """
    noise = std * torch.randn_like(std)
    signs_in = rademacher(x.shape, x)
    signs_out = rademacher(x.shape[:-1] + (std.shape[0],), x)
    return F.linear(x * signs_in, noise.to(x.dtype)) * signs_out


def rank_sign_noise(x: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(x Eᵀ) ⊙ r_out with E = σ ⊙ ε: Flipout's output signs only.

    Token n sees ΔA_n = diag(r_out,n) E: still an exact N(0, σ²) sample, and uncorrelated with every other token's
    (E[r_out,n r_out,m] = 0), as with Flipout; what the input signs add is only a weaker dependence of higher order.
    No input-wide random tensor is drawn or saved: one rank-r matmul on the input the mean path already holds, and
    tokens × r signs — the physical limit of the noise path.
    """
    noise = std * torch.randn_like(std)
    return F.linear(x, noise.to(x.dtype)) * rademacher(x.shape[:-1] + (std.shape[0],), x)


NOISE_PATHS = {"flipout": flipout_noise, "rank_signs": rank_sign_noise}


def autocast_input(x: torch.Tensor) -> torch.Tensor:
    """x in the autocast dtype, cast once: the mean and noise matmuls then share one low-precision copy (each would
    otherwise cast, and save for backward, its own)."""
    device = x.device.type
    if torch.is_autocast_enabled(device) and x.is_floating_point():
        return x.to(torch.get_autocast_dtype(device))
    return x


class BlobVariant(LoraVariant):
    """LoRA with q(A) = N(M, σ²): mean path s·B(Mx) plus, when sampling, a noise path (`noise`: Flipout, the
    reference's, or its output signs only) — or, for Bayesian model averaging, s·B(Ax) with one whole draw A per
    forward shared by every token: the weight-space sample a BMA averages over (every position of a sequence sees
    the same A, which per-token noise does not give), at exactly LoRA's cost. Per-token noise exists to decorrelate
    a minibatch's gradients; a prediction has none."""

    def __init__(self, noise: NoisePath = "flipout"):
        if noise not in NOISE_PATHS:
            raise ValueError(f"unknown BLoB noise path {noise!r}: expected one of {', '.join(NOISE_PATHS)}")
        self.noise = noise

    @staticmethod
    def init(module: LoraLayer, adapter_name: str, init_std: float = 0.05, noise: NoisePath = "flipout", **kwargs) -> None:
        if not hasattr(module, POSTERIOR_PARAM):
            module.blob_G = nn.ParameterDict()
            module.adapter_layer_names = module.adapter_layer_names + (POSTERIOR_PARAM,)
        module.blob_G[adapter_name] = init_posterior_factor(module.lora_A[adapter_name].weight, init_std)
        module.lora_variant[adapter_name] = BlobVariant(noise)

    @staticmethod
    def merge_safe(module: LoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        """Merging folds in the posterior mean only, as plain LoRA would."""
        return orig_weight + module.get_delta_weight(active_adapter)

    @staticmethod
    def merge_unsafe(module: LoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> None:
        orig_weight.data += module.get_delta_weight(active_adapter)

    @staticmethod
    def unmerge(module: LoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight - module.get_delta_weight(active_adapter)

    def forward(
        self, module: LoraLayer, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs
    ) -> torch.Tensor:
        x = module.lora_dropout[active_adapter](x)
        sampling = sampling_enabled(module)
        if sampling and draws_whole_weights(module):
            std = posterior_std(module.blob_G[active_adapter])
            hidden = F.linear(x, weight_sample(module.lora_A[active_adapter].weight, std).to(x.dtype))
            return result + module.lora_B[active_adapter](hidden) * module.scaling[active_adapter]
        if sampling:
            x = autocast_input(x)
        hidden = module.lora_A[active_adapter](x)
        if sampling:
            std = posterior_std(module.blob_G[active_adapter])
            hidden = hidden + NOISE_PATHS[self.noise](x, std)
        return result + module.lora_B[active_adapter](hidden) * module.scaling[active_adapter]
