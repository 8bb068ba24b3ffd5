"""The rank components a scheduler can prune, for the two adapters that support it.

A rank component is one rank-one term of a layer's update. AdaLoRA writes the update as P Λ Q, so component i
is the triplet (P[:, i], λ_i, Q[i, :]), and pruning sets λ_i = 0 (P and Q stay and may come back at a later
allocation, as in AdaLoRA). BLoB writes it as s·B A with a Gaussian posterior over A, so component k is
(B[:, k], A[k, :]) and pruning sets the point-estimate column B[:, k] = 0, which removes the term exactly,
under every posterior draw of A.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from peft.tuners.adalora.layer import AdaLoraLayer
from peft.tuners.lora.layer import LoraLayer
from torch import nn

from axolotl_blob.blob.layer import POSTERIOR_PARAM, posterior_std
from axolotl_blob.blob.model import blob_layers, module_key, unwrap_model

AdapterKind = Literal["adalora", "blob"]


@dataclass(frozen=True)
class AdaptedModule:
    """One adapted linear layer: its name below the base model, and its factors as (left, values, right)."""

    name: str
    layer: LoraLayer
    adapter: str
    kind: AdapterKind

    @property
    def left(self) -> nn.Parameter:
        """P (AdaLoRA) or B (BLoB): d_out × r."""
        factor = self.layer.lora_B[self.adapter]
        return factor if self.kind == "adalora" else factor.weight

    @property
    def right(self) -> nn.Parameter:
        """Q (AdaLoRA) or A's posterior mean M (BLoB): r × d_in."""
        factor = self.layer.lora_A[self.adapter]
        return factor if self.kind == "adalora" else factor.weight

    @property
    def values(self) -> nn.Parameter | None:
        """Λ as an r × 1 column (AdaLoRA); BLoB has none."""
        return self.layer.lora_E[self.adapter] if self.kind == "adalora" else None

    @property
    def right_std(self) -> torch.Tensor:
        """BLoB's posterior std of A, σ = G²."""
        return posterior_std(getattr(self.layer, POSTERIOR_PARAM)[self.adapter].detach().float())

    @property
    def rank(self) -> int:
        return self.right.shape[0]

    def factors(self) -> dict[str, nn.Parameter]:
        """The trainable tensors that carry the components, by role."""
        roles = {"left": self.left, "right": self.right}
        if self.values is not None:
            roles["values"] = self.values
        return roles


def adapted_modules(model: nn.Module) -> list[AdaptedModule]:
    """Every AdaLoRA layer, or every BLoB layer, of `model`, in module order."""
    found = [
        AdaptedModule(module_key(name), layer, adapter, "adalora")
        for name, layer in unwrap_model(model).named_modules()
        if isinstance(layer, AdaLoraLayer)
        for adapter in layer.lora_E
    ]
    found += [AdaptedModule(module_key(name), layer, adapter, "blob") for name, layer, adapter in blob_layers(model)]
    if not found:
        raise ValueError("rank_scheduler found no AdaLoRA or BLoB layers; check lora_target_modules / lora_target_linear")
    return found


@torch.no_grad()
def prune_(module: AdaptedModule, keep: torch.Tensor, posterior=None) -> None:
    """Zero the components where `keep` is False: λ_i (AdaLoRA) or B[:, k] (BLoB).

    With IVON (`posterior`) the zeros go into the posterior mean, including its fp32 copy of low-precision weights.
    """
    if module.kind == "adalora":
        values = module.values
        if posterior is not None:
            mean = posterior.posterior_mean(values)
            mean[~keep] = 0.0
            posterior.set_posterior_mean(values, mean)
        else:
            values[~keep] = 0.0
    else:
        module.left[:, ~keep] = 0.0
