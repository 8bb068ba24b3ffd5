"""Calibration metrics from averaged predictive probabilities, as state (update / merge / compute).

Two kinds of state, each correct under multi-process evaluation by construction: sums (the bins and totals), which
add up across processes (all-reduce), and one record per example (its index, confidence, correctness, entropy and
mutual information), which processes concatenate (all-gather, then order by index) for the rankings of selective
prediction and OOD detection. Confidence is the top-label probability max_k p_k.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from axolotl_blob.calibration.selective import risk_coverage_grid, selective_metrics

EPS = 1e-12
RECORD_FIELDS = ("index", "confidence", "correct", "entropy", "mutual_info")


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """H(p) = −Σ p log p over the last dimension, in nats."""
    return -(probs * torch.log(probs.clamp(min=EPS))).sum(-1)


@dataclass
class CalibrationState:
    """Sums over examples (`bin_*` per equal-width confidence bin) and one row of RECORD_FIELDS per example."""

    n_bins: int = 15
    bin_count: torch.Tensor = field(init=False)
    bin_confidence: torch.Tensor = field(init=False)
    bin_correct: torch.Tensor = field(init=False)
    totals: torch.Tensor = field(init=False)  # count, correct, nll, brier, entropy, mutual information
    records: torch.Tensor = field(init=False)  # (examples, len(RECORD_FIELDS)), float64

    def __post_init__(self):
        self.bin_count = torch.zeros(self.n_bins, dtype=torch.float64)
        self.bin_confidence = torch.zeros(self.n_bins, dtype=torch.float64)
        self.bin_correct = torch.zeros(self.n_bins, dtype=torch.float64)
        self.totals = torch.zeros(6, dtype=torch.float64)
        self.records = torch.zeros(0, len(RECORD_FIELDS), dtype=torch.float64)

    def update(
        self,
        probs: torch.Tensor,
        labels: torch.Tensor,
        draw_entropy: torch.Tensor | None = None,
        indices: torch.Tensor | None = None,
    ) -> None:
        """probs: (n, K) averaged predictive probabilities; labels: (n,); draw_entropy: optional (n,) mean over
        posterior draws of H(p_n), for the mutual information H(p̄) − mean_n H(p_n) (epistemic uncertainty);
        indices: each example's position in the whole evaluation (default: the order of updates), which orders
        the records gathered from several processes."""
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
        if indices is None:
            start = len(self.records)
            indices = torch.arange(start, start + len(labels))
        rows = [indices.double().cpu(), confidence, correct, predictive_entropy, mutual_information]
        self.records = torch.cat([self.records, torch.stack(rows, dim=1)])
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

    def record(self, name: str) -> torch.Tensor:
        """One per-example field (a column of RECORD_FIELDS), in index order once gathered."""
        return self.records[:, RECORD_FIELDS.index(name)]

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
        metrics.update(selective_metrics(*self._ranking_records()))
        return metrics

    def _ranking_records(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.record("confidence"), self.record("mutual_info"), self.record("correct")

    def risk_coverage(self) -> dict:
        """The risk–coverage curves (by max probability and by mutual information) on a 2 % coverage grid."""
        return risk_coverage_grid(*self._ranking_records())

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
