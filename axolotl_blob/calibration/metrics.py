"""Calibration metrics from averaged predictive probabilities, as summable state (update / merge / compute).

Every state is a sum, so per-process states add up to the global one (all-reduce, then compute): the metrics are
correct under multi-process evaluation by construction. Confidence is the top-label probability max_k p_k.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

EPS = 1e-12


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """H(p) = −Σ p log p over the last dimension, in nats."""
    return -(probs * torch.log(probs.clamp(min=EPS))).sum(-1)


@dataclass
class CalibrationState:
    """Sums over examples; `bin_*` are per equal-width confidence bin."""

    n_bins: int = 15
    bin_count: torch.Tensor = field(init=False)
    bin_confidence: torch.Tensor = field(init=False)
    bin_correct: torch.Tensor = field(init=False)
    totals: torch.Tensor = field(init=False)  # count, correct, nll, brier, entropy, mutual information

    def __post_init__(self):
        self.bin_count = torch.zeros(self.n_bins, dtype=torch.float64)
        self.bin_confidence = torch.zeros(self.n_bins, dtype=torch.float64)
        self.bin_correct = torch.zeros(self.n_bins, dtype=torch.float64)
        self.totals = torch.zeros(6, dtype=torch.float64)

    def update(self, probs: torch.Tensor, labels: torch.Tensor, draw_entropy: torch.Tensor | None = None) -> None:
        """probs: (n, K) averaged predictive probabilities; labels: (n,); draw_entropy: optional (n,) mean over
        posterior draws of H(p_n), for the mutual information H(p̄) − mean_n H(p_n) (epistemic uncertainty)."""
        probs, labels = probs.detach().double().cpu(), labels.detach().cpu()
        confidence, prediction = probs.max(-1)
        correct = (prediction == labels).double()
        boundaries = torch.linspace(0, 1, self.n_bins + 1, dtype=torch.float64)
        bins = (torch.bucketize(confidence, boundaries, right=True) - 1).clamp(0, self.n_bins - 1)  # [lo, hi)
        self.bin_count += torch.bincount(bins, minlength=self.n_bins).double()
        self.bin_confidence += torch.bincount(bins, weights=confidence, minlength=self.n_bins)
        self.bin_correct += torch.bincount(bins, weights=correct, minlength=self.n_bins)
        label_prob = probs.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        brier = (probs.square().sum(-1) - 2 * label_prob + 1).sum()
        predictive_entropy = entropy(probs)
        mutual_information = (
            predictive_entropy - draw_entropy.detach().double().cpu()
            if draw_entropy is not None
            else torch.zeros_like(predictive_entropy)
        )
        self.totals += torch.stack(
            [
                torch.tensor(float(len(labels)), dtype=torch.float64),
                correct.sum(),
                -torch.log(label_prob.clamp(min=EPS)).sum(),
                brier,
                predictive_entropy.sum(),
                mutual_information.sum(),
            ]
        )

    def as_tensor(self) -> torch.Tensor:
        return torch.cat([self.bin_count, self.bin_confidence, self.bin_correct, self.totals])

    def load_tensor(self, flat: torch.Tensor) -> None:
        """Inverse of `as_tensor`, used after an all-reduce of the flat state."""
        b = self.n_bins
        flat = flat.double().cpu()
        self.bin_count, self.bin_confidence, self.bin_correct = flat[:b], flat[b : 2 * b], flat[2 * b : 3 * b]
        self.totals = flat[3 * b :]

    def compute(self) -> dict:
        n = self.totals[0].item()
        if n == 0:
            raise ValueError("no examples were evaluated")
        occupied = self.bin_count > 0
        gap = torch.zeros(self.n_bins, dtype=torch.float64)
        gap[occupied] = (
            self.bin_correct[occupied] / self.bin_count[occupied]
            - self.bin_confidence[occupied] / self.bin_count[occupied]
        ).abs()
        metrics = {
            "acc": self.totals[1].item() / n,
            "ece": (self.bin_count * gap).sum().item() / n,
            "mce": gap.max().item(),
            "nll": self.totals[2].item() / n,
            "brier": self.totals[3].item() / n,
            "entropy": self.totals[4].item() / n,
            "mutual_info": self.totals[5].item() / n,
            "confidence": self.bin_confidence.sum().item() / n,
            "n": int(n),
        }
        return metrics

    def bins(self) -> list[dict]:
        """Per-bin counts, mean confidence and accuracy, for the JSON report and the reliability diagram."""
        rows = []
        for i in range(self.n_bins):
            count = self.bin_count[i].item()
            rows.append(
                {
                    "lower": i / self.n_bins,
                    "upper": (i + 1) / self.n_bins,
                    "count": int(count),
                    "confidence": self.bin_confidence[i].item() / count if count else math.nan,
                    "accuracy": self.bin_correct[i].item() / count if count else math.nan,
                }
            )
        return rows
