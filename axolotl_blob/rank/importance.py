"""Importance scores of rank components: AdaLoRA's sensitivity, and the posterior signal-to-noise ratio.

Every score is elementwise first, then pooled per component as in AdaLoRA:
S_i = s(λ_i) + mean_j s(P_ji) + mean_j s(Q_ij)   (no λ term for BLoB, which has no Λ).

BLoB + SNR: B is a point estimate, so s(B) is undefined (σ = 0). The score is instead the SNR of the rank-one
update itself, ΔW_k = s·B[:, k] A[k, :]: element (i, j) has mean s·B_ik M_kj and std |s·B_ik| σ_kj, so its SNR
is |M_kj| / σ_kj wherever B_ik ≠ 0 — B cancels — and 0 where B_ik = 0 (the element is exactly zero). The same
holds for the folded-normal SNR of |ΔW_ij|. Averaged over the d_out × d_in elements:
S_k = (fraction of non-zero B_ik) · mean_j SNR(A_kj). This is invariant to the B/A rescaling that leaves the
layer unchanged, and a component whose B column is zero scores 0.
"""

from __future__ import annotations

import math

import torch

from axolotl_blob.rank.modules import AdaptedModule


def snr(mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """|μ| / σ."""
    return mean.double().abs() / std.double()


def folded_normal_snr(mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """E|θ| / sd|θ| for θ ~ N(μ, σ²): the SNR of the weight's magnitude (the reference code's default).

    E|θ| = μ·erf(μ/(σ√2)) + σ√(2/π)·exp(−μ²/(2σ²)),  Var|θ| = μ² + σ² − (E|θ|)².  In float64: for |μ| ≫ σ the
    variance is a difference of nearly equal numbers.
    """
    mu, sigma = mean.double(), std.double()
    expected = mu * torch.erf(mu / (sigma * math.sqrt(2.0))) + sigma * math.sqrt(2.0 / math.pi) * torch.exp(
        -(mu * mu) / (2.0 * sigma * sigma)
    )
    variance = (mu * mu + sigma * sigma - expected * expected).clamp_min(torch.finfo(torch.float64).tiny)
    return expected / variance.sqrt()


def pool_components(left: torch.Tensor, right: torch.Tensor, values: torch.Tensor | None) -> torch.Tensor:
    """AdaLoRA's triplet score from elementwise scores: s(λ_i) + mean_j s(P_ji) + mean_j s(Q_ij)."""
    pooled = left.mean(dim=0) + right.mean(dim=1)
    return pooled if values is None else pooled + values.reshape(-1)


class SnrImportance:
    """|μ|/σ (`snr`) or the folded-normal SNR (`snr_abs`), read from a posterior; no per-step bookkeeping.

    AdaLoRA's posterior comes from IVON, matched by parameter identity; BLoB's from the layer (μ = M, σ = G²).
    """

    def __init__(self, folded: bool, posterior=None):
        self.element_snr = folded_normal_snr if folded else snr
        self.posterior = posterior

    def observe(self, modules: list[AdaptedModule]) -> None:
        """Nothing to accumulate: the posterior is the optimizer's (or the layer's) own state."""

    def _ivon_snr(self, param: torch.Tensor) -> torch.Tensor:
        return self.element_snr(self.posterior.posterior_mean(param), self.posterior.posterior_std(param))

    @torch.no_grad()
    def scores(self, module: AdaptedModule) -> torch.Tensor:
        if module.kind == "blob":
            nonzero_b = (module.left != 0).double().mean(dim=0)
            return nonzero_b * self.element_snr(module.right.detach(), module.right_std).mean(dim=1)
        if self.posterior is None:
            raise ValueError("rank_scheduler.importance 'snr'/'snr_abs' with adapter: adalora needs optimizer: ivon")
        values = self._ivon_snr(module.values)
        return pool_components(self._ivon_snr(module.left), self._ivon_snr(module.right), values)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        pass


class SensitivityImportance:
    """AdaLoRA's score: I = |w ⊙ ∇w|, Ī ← β1 Ī + (1−β1) I, Ū ← β2 Ū + (1−β2)|I − Ī|, s = Ī ⊙ Ū.

    Reads `.grad` after the optimizer step (the Trainer clears gradients only afterwards); under IVON with
    gradient accumulation that is the last micro-batch's gradient. A non-finite gradient (an fp16 step the loss
    scaler skipped) is not observed: one inf would make the averages NaN for the rest of the run.
    """

    def __init__(self, beta1: float, beta2: float):
        self.beta1, self.beta2 = beta1, beta2
        self.smoothed: dict[str, torch.Tensor] = {}
        self.uncertainty: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def observe(self, modules: list[AdaptedModule]) -> None:
        for module in modules:
            for role, param in module.factors().items():
                if param.grad is None:
                    continue
                key = f"{module.name}.{role}"
                sensitivity = (param.float() * param.grad.float()).abs()
                if not torch.isfinite(sensitivity).all():
                    continue
                smoothed = self.smoothed.get(key, torch.zeros_like(sensitivity)).to(sensitivity.device)
                uncertainty = self.uncertainty.get(key, torch.zeros_like(sensitivity)).to(sensitivity.device)
                self.smoothed[key], self.uncertainty[key] = smoothed, uncertainty
                smoothed.mul_(self.beta1).add_(sensitivity, alpha=1.0 - self.beta1)
                uncertainty.mul_(self.beta2).add_((sensitivity - smoothed).abs_(), alpha=1.0 - self.beta2)

    def element_scores(self, module: AdaptedModule, role: str, like: torch.Tensor) -> torch.Tensor:
        key = f"{module.name}.{role}"
        if key not in self.smoothed:
            return torch.zeros_like(like, dtype=torch.float32)
        return self.smoothed[key] * self.uncertainty[key]

    def scores(self, module: AdaptedModule) -> torch.Tensor:
        factors = module.factors()
        element = {role: self.element_scores(module, role, param) for role, param in factors.items()}
        return pool_components(element["left"], element["right"], element.get("values")).double()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            **{f"sensitivity.{key}": value for key, value in self.smoothed.items()},
            **{f"uncertainty.{key}": value for key, value in self.uncertainty.items()},
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Averages come back on the CPU; `observe` moves each to its parameter's device."""
        self.smoothed = {k.removeprefix("sensitivity."): v.clone() for k, v in state.items() if k.startswith("sensitivity.")}
        self.uncertainty = {k.removeprefix("uncertainty."): v.clone() for k, v in state.items() if k.startswith("uncertainty.")}
