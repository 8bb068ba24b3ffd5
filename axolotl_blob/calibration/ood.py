"""Out-of-distribution detection: how well an uncertainty score separates in-distribution from OOD questions.

AUROC = P(score of a random OOD example > score of a random in-distribution one), ties counted ½ (the
Mann–Whitney statistic), for three scores where high means "looks OOD": 1 − max probability, the predictive
entropy, and the mutual information (the epistemic part: a point estimate has none, so its MI AUROC is 0.5).
"""

from __future__ import annotations

import torch

OOD_SCORES = ("confidence", "entropy", "mutual_info")


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """1-based ranks of `values`, ties given the mean of the ranks they span."""
    _, inverse, tie_sizes = torch.unique(values.double().flatten(), sorted=True, return_inverse=True, return_counts=True)
    tie_end = tie_sizes.cumsum(0).double()
    tie_mean_rank = tie_end - (tie_sizes.double() - 1) / 2
    return tie_mean_rank[inverse]


def auroc(in_distribution: torch.Tensor, out_of_distribution: torch.Tensor) -> float:
    """P(OOD score > in-distribution score) + ½ P(equal): the area under the ROC curve of "OOD" vs "not"."""
    n_in, n_out = in_distribution.numel(), out_of_distribution.numel()
    if n_in == 0 or n_out == 0:
        raise ValueError("AUROC needs at least one in-distribution and one OOD example")
    ranks = average_ranks(torch.cat([in_distribution.flatten(), out_of_distribution.flatten()]).double())
    return ((ranks[n_in:].sum() - n_out * (n_out + 1) / 2) / (n_in * n_out)).item()


def ood_scores(confidence: torch.Tensor, entropy: torch.Tensor, mutual_info: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each uncertainty measure oriented so that higher means more likely OOD."""
    return {"confidence": -confidence, "entropy": entropy, "mutual_info": mutual_info}


def ood_metrics(in_distribution: dict[str, torch.Tensor], out_of_distribution: dict[str, torch.Tensor]) -> dict:
    """`ood_auroc_by_<score>` for each score, from per-example `confidence`, `entropy`, `mutual_info` tensors."""
    scores_in, scores_out = ood_scores(**in_distribution), ood_scores(**out_of_distribution)
    return {f"ood_auroc_by_{name}": auroc(scores_in[name], scores_out[name]) for name in OOD_SCORES}
