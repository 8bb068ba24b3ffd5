"""Selective prediction: answer the examples the model is surest of, abstain on the rest.

Rank the examples by a confidence score (max probability, or low mutual information), keep the top fraction c
(the coverage) and measure the error among the kept ones (the selective risk). The risk–coverage curve plots that
risk for every c = k/n; its area (AURC, Geifman & El-Yaniv) is the mean risk over k = 1 … n — lower is better.

Ties in the score are ranked as their expected value over random orders within the tie: a point estimate, whose
mutual information is 0 everywhere, thus gets the risk of abstaining at random (the error rate at every coverage),
not an artefact of the order the examples came in.
"""

from __future__ import annotations

import math

import torch

SELECTIVE_COVERAGES = (0.8, 0.9)
CURVE_POINTS = 50  # coverage grid of the risk–coverage curve kept in the report (every 2 %)


def expected_errors_kept(scores: torch.Tensor, errors: torch.Tensor) -> torch.Tensor:
    """Expected number of errors among the k highest-scoring examples, for k = 1 … n (ties averaged)."""
    scores, errors = scores.double().flatten(), errors.double().flatten()
    order = torch.argsort(scores, descending=True, stable=True)
    _, tie_sizes = torch.unique_consecutive(scores[order], return_counts=True)
    cumulative = torch.cat([errors.new_zeros(1), errors[order].cumsum(0)])
    tie_end = tie_sizes.cumsum(0)
    tie_start = tie_end - tie_sizes
    tie_error_rate = (cumulative[tie_end] - cumulative[tie_start]) / tie_sizes
    tie_of = torch.repeat_interleave(torch.arange(len(tie_sizes)), tie_sizes)
    kept = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    return cumulative[tie_start[tie_of]] + (kept - tie_start[tie_of]) * tie_error_rate[tie_of]


def risk_coverage(scores: torch.Tensor, correct: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(coverage k/n, selective risk at that coverage) for k = 1 … n, examples ranked by `scores` (high = kept)."""
    n = len(scores)
    kept = torch.arange(1, n + 1, dtype=torch.float64)
    return kept / n, expected_errors_kept(scores, 1.0 - correct.double()) / kept


def aurc(scores: torch.Tensor, correct: torch.Tensor) -> float:
    """Area under the risk–coverage curve: the mean selective risk over k = 1 … n."""
    return risk_coverage(scores, correct)[1].mean().item()


def kept_count(coverage: float, n: int) -> int:
    """The number of examples a coverage keeps: ⌈c·n⌉, at least one."""
    return max(1, math.ceil(coverage * n - 1e-9))


def accuracy_at_coverage(scores: torch.Tensor, correct: torch.Tensor, coverage: float) -> float:
    """Accuracy on the ⌈c·n⌉ highest-scoring examples."""
    risk = risk_coverage(scores, correct)[1]
    return 1.0 - risk[kept_count(coverage, len(risk)) - 1].item()


def selective_rankings(confidence: torch.Tensor, mutual_info: torch.Tensor) -> dict[str, torch.Tensor]:
    """The two rankings the report uses: by max probability (high first) and by mutual information (low first)."""
    return {"confidence": confidence, "mutual_info": -mutual_info}


def selective_metrics(confidence: torch.Tensor, mutual_info: torch.Tensor, correct: torch.Tensor) -> dict[str, float]:
    """`aurc_by_<ranking>` and `acc_cov80_by_<ranking>`, `acc_cov90_by_<ranking>` for both rankings."""
    metrics = {}
    for name, scores in selective_rankings(confidence, mutual_info).items():
        metrics[f"aurc_by_{name}"] = aurc(scores, correct)
        for coverage in SELECTIVE_COVERAGES:
            metrics[f"acc_cov{round(coverage * 100)}_by_{name}"] = accuracy_at_coverage(scores, correct, coverage)
    return metrics


def risk_coverage_grid(confidence: torch.Tensor, mutual_info: torch.Tensor, correct: torch.Tensor) -> dict:
    """Both rankings' risk–coverage curves at coverages 2 %, 4 %, … 100 %: small enough for the JSON report."""
    grid = [(i + 1) / CURVE_POINTS for i in range(CURVE_POINTS)]
    curves: dict = {"coverage": grid}
    for name, scores in selective_rankings(confidence, mutual_info).items():
        risk = risk_coverage(scores, correct)[1]
        curves[f"risk_by_{name}"] = [risk[kept_count(c, len(risk)) - 1].item() for c in grid]
    return curves
