"""The BLoB layer: a Gaussian posterior over LoRA's A factor, sampled with Flipout.

BLoB is a PEFT LoRA *variant*: PEFT's own LoRA layers (``nn.Linear``, bitsandbytes 8-bit and 4-bit) keep their
forward, dtype casting, merging and saving, and call :meth:`BlobVariant.forward` for the adapter part.

Per adapter the layer holds the ordinary ``lora_A`` (the posterior mean M), ``lora_B`` (a point estimate) and
``blob_G`` with σ = G² elementwise. ``blob_G`` deliberately lives outside the ``lora_`` namespace so the PEFT
adapter file stays a plain LoRA adapter (the posterior mean); the posterior is saved beside it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import LoraLayer, LoraVariant
from torch import nn

POSTERIOR_PARAM = "blob_G"


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


class BlobVariant(LoraVariant):
    """LoRA with q(A) = N(M, σ²): mean path s·B(Mx) plus, when sampling, the Flipout noise path."""

    @staticmethod
    def init(module: LoraLayer, adapter_name: str, init_std: float = 0.05, **kwargs) -> None:
        if not hasattr(module, POSTERIOR_PARAM):
            module.blob_G = nn.ParameterDict()
            module.adapter_layer_names = module.adapter_layer_names + (POSTERIOR_PARAM,)
        module.blob_G[adapter_name] = init_posterior_factor(module.lora_A[adapter_name].weight, init_std)
        module.lora_variant[adapter_name] = BlobVariant()

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

    @staticmethod
    def forward(
        module: LoraLayer, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs
    ) -> torch.Tensor:
        x = module.lora_dropout[active_adapter](x)
        hidden = module.lora_A[active_adapter](x)
        if sampling_enabled(module):
            std = posterior_std(module.blob_G[active_adapter])
            hidden = hidden + flipout_noise(x, std)
        return result + module.lora_B[active_adapter](hidden) * module.scaling[active_adapter]
