"""Training-free Bayesianization (TFB; Shi, Wang et al., arXiv 2412.05723) of a trained LoRA adapter.

Per LoRA layer, B = U diag(d) Vᵀ (SVD). Re-parameterised as B' = B V = U diag(d) and A' = Vᵀ A, the adapter
computes the same B'A' = BA. A' gets the BLoB posterior N(A', Ω²) with Ω_ij = σ_q / d_i: the noise of the update,
B' E = U diag(d) E, then has i.i.d. N(0, σ_q²) entries within span(U) and none outside it (the layer adds it times
its LoRA scaling s, as it does B'A'). A direction whose singular value vanishes (d_i = 0: B' has a zero column
there) changes nothing whatever its noise, so it gets Ω = 0 rather than σ_q / 0.

σ_q is chosen without training: the largest one whose Bayesian model average changes the mean model's own
predictions on an anchor set by at most a tolerance — the relative change of the NLL of the mean model's answers
ŷ (`nll`), or the fraction of answers that flip (`flip`). The search is a bisection that assumes the change grows
with σ_q; every evaluation reseeds the noise (common random numbers), so the measured change grows smoothly with
σ_q. It bisects geometrically: the σ_q that fits depends on the model's scale (1e-4 for SmolLM2-135M's sarcasm LoRA,
~1e-2 in the paper's LLaMA runs), so a bracket spanning decades is searched to the same relative precision everywhere.

`nll_reference` is the rule of the reference code (bayesian-peft `tfblora.py`), which the paper's tables came from:
the relative NLL change divided once more by the number of anchors (so 0.003 at 500 anchors admits a 150 % change),
5 arithmetic bisections of [0.001, 0.015], and the top of the final bracket — the last midpoint over the tolerance,
or 0.015 when none was — not the largest σ_q seen within it.

The posterior is stored as BLoB's (σ = G², so G = √Ω): the result is an ordinary BLoB adapter.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from peft.tuners.lora.layer import LoraLayer
from torch import nn

from axolotl_blob.blob.layer import DEFAULT_EVAL_DRAWS, EvalDraws
from axolotl_blob.blob.model import blob_layers, module_key, unwrap_model
from axolotl_blob.calibration.scoring import ChoiceScoring
from axolotl_blob.multiple_choice import AnswerFormat
from axolotl_blob.sampling import blob_sampler

ChangeMetric = Literal["nll", "flip", "nll_reference"]
EPS = 1e-12


@dataclass(frozen=True)
class SearchDefaults:
    """A metric's tolerance, σ_q bracket, bisection steps and anchor count."""

    tolerance: float
    sigma_range: tuple[float, float]
    steps: int
    anchors: int


SEARCH_DEFAULTS: dict[str, SearchDefaults] = {
    "nll": SearchDefaults(0.003, (1e-5, 0.015), 6, 200),  # the paper's tolerances, taken literally
    "flip": SearchDefaults(0.01, (1e-5, 0.015), 6, 200),
    "nll_reference": SearchDefaults(0.003, (1e-3, 0.015), 5, 500),  # the reference code's
}


@torch.no_grad()
def svd_reparameterize(model: nn.Module, adapter: str = "default") -> dict[str, torch.Tensor]:
    """Rewrite every LoRA linear layer as B' = U diag(d), A' = Vᵀ A (fp64 SVD, stored back in each factor's dtype);
    returns, per module key, the (r,) inverse singular values 1/d_i (0 where d_i vanishes)."""
    inverse_singular_values = {}
    for name, layer in unwrap_model(model).named_modules():
        if not (isinstance(layer, LoraLayer) and adapter in getattr(layer, "lora_A", {})):
            continue
        a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        _, singular, vh = torch.linalg.svd(b.double(), full_matrices=True)  # vh: (r, r), so A' keeps rank r
        d = torch.zeros(b.shape[1], dtype=torch.float64, device=b.device)
        d[: len(singular)] = singular
        b_new, a_new = b.double() @ vh.T, vh @ a.double()  # B V = U diag(d) (zero columns past min(d_out, r))
        negligible = d <= d.max() * max(b.shape) * torch.finfo(b.dtype).eps  # numerically zero (all of B = 0: all)
        b.copy_(b_new.to(b.dtype))
        a.copy_(a_new.to(a.dtype))
        inverse_singular_values[module_key(name)] = torch.where(negligible, 0.0, 1.0 / d.clamp(min=EPS))
    if not inverse_singular_values:
        raise ValueError("TFB found no LoRA linear layers in the adapter")
    return inverse_singular_values


@torch.no_grad()
def set_noise_scale(model: nn.Module, inverse_singular_values: dict[str, torch.Tensor], sigma_q: float) -> None:
    """Give every BLoB layer Ω_ij = σ_q / d_i, i.e. G = √Ω (BLoB's σ = G²)."""
    for name, layer, adapter in blob_layers(model):
        g = layer.blob_G[adapter]
        std = sigma_q * inverse_singular_values[module_key(name)].to(g.device)
        g.copy_(std.sqrt()[:, None].expand_as(g).to(g.dtype))


@dataclass
class BisectionResult:
    """The σ chosen and every (σ, change) evaluated, in order."""

    sigma: float
    trace: list[tuple[float, float]] = field(default_factory=list)


def largest_within_tolerance(
    change: Callable[[float], float], low: float, high: float, tolerance: float, steps: int = 5
) -> BisectionResult:
    """The largest σ in [low, high] with change(σ) ≤ tolerance, for a change that grows with σ: `high` if it
    passes; else `steps` geometric bisections of [low, high] (at √(low·high)), returning the largest σ seen to pass
    (within a factor (high / low)^(1/2^steps) of the true boundary). Raises if not even `low` passes."""
    if not 0 < low < high:
        raise ValueError(f"the σ_q search needs 0 < low < high, got low={low:g}, high={high:g}")
    result = BisectionResult(sigma=low)

    def passes(sigma: float) -> bool:
        value = change(sigma)
        result.trace.append((sigma, value))
        return value <= tolerance

    if passes(high):
        result.sigma = high
        return result
    passed_low = False
    for _ in range(steps):
        middle = math.sqrt(low * high)
        if passes(middle):
            low, passed_low = middle, True
        else:
            high = middle
    if not passed_low and not passes(low):
        raise ValueError(
            f"even σ_q = {low:g} changes the predictions by {result.trace[-1][1]:.4g} > tolerance {tolerance:g}: "
            "lower the lower end of the search (or raise the tolerance)"
        )
    result.sigma = low
    return result


def top_of_final_bracket(
    change: Callable[[float], float], low: float, high: float, tolerance: float, steps: int = 5
) -> BisectionResult:
    """The reference code's search: `steps` arithmetic bisections of [low, high] (a midpoint over the tolerance
    becomes the top, one within it the bottom), returning the top of the final bracket — `high` when every midpoint
    passed (never evaluated), else the last midpoint that failed."""
    if not 0 < low < high:
        raise ValueError(f"the σ_q search needs 0 < low < high, got low={low:g}, high={high:g}")
    result = BisectionResult(sigma=high)
    for _ in range(steps):
        middle = (low + high) / 2
        value = change(middle)
        result.trace.append((middle, value))
        if value > tolerance:
            high = middle
        else:
            low = middle
    result.sigma = high
    return result


def search_sigma(
    change: Callable[[float], float], metric: ChangeMetric, low: float, high: float, tolerance: float, steps: int
) -> BisectionResult:
    """σ_q by the metric's rule: the reference code's for `nll_reference`, else the largest σ_q within tolerance."""
    search = top_of_final_bracket if metric == "nll_reference" else largest_within_tolerance
    return search(change, low, high, tolerance, steps)


def prediction_change(mean_probs: torch.Tensor, bma_probs: torch.Tensor, metric: ChangeMetric) -> float:
    """How much the BMA moved away from the mean model's own answers ŷ = argmax p_mean: the relative change of
    −log p(ŷ) averaged over the anchors (`nll`; divided once more by the number of anchors for `nll_reference`),
    or the fraction of answers that changed (`flip`)."""
    answers = mean_probs.argmax(-1, keepdim=True)
    if metric == "flip":
        return (bma_probs.argmax(-1, keepdim=True) != answers).double().mean().item()
    mean_nll = -mean_probs.gather(-1, answers).clamp(min=EPS).log().mean()
    bma_nll = -bma_probs.gather(-1, answers).clamp(min=EPS).log().mean()
    relative = ((bma_nll - mean_nll).abs() / mean_nll.clamp(min=EPS)).item()
    return relative / len(answers) if metric == "nll_reference" else relative


@dataclass
class TfbResult:
    """σ_q found, the search's (σ_q, change) trace, and how many layers and zero singular values there were."""

    sigma_q: float
    trace: list[tuple[float, float]]
    layers: int
    zero_singular_values: int


def bayesianize_tfb(
    model: nn.Module,
    tokenizer,
    anchors: Sequence[dict],
    n_samples: int = 10,
    metric: ChangeMetric = "nll",
    tolerance: float | None = None,
    sigma_range: tuple[float, float] | None = None,
    steps: int | None = None,
    seed: int = 0,
    batch_size: int = 8,
    draws: EvalDraws = DEFAULT_EVAL_DRAWS,
    answer_format: AnswerFormat = "letters",
) -> TfbResult:
    """TFB in place on a model whose LoRA layers already carry BLoB posteriors (`blob.model.bayesianize`):
    re-parameterise, search σ_q on the multiple-choice `anchors` (tolerance, bracket and steps: the metric's
    `SEARCH_DEFAULTS` unless given; the BMA sampled as `draws` and the questions put in `answer_format`, as evaluation
    will), and set the posterior to the σ_q
    found. Give it an fp32 model: the tolerance is finer than bf16's rounding of the logits."""
    if n_samples < 1:
        raise ValueError(f"TFB's search averages posterior samples: n_samples must be >= 1, got {n_samples}")
    defaults = SEARCH_DEFAULTS[metric]
    inverse_singular_values = svd_reparameterize(model)
    scoring = ChoiceScoring(model, tokenizer, blob_sampler(model, draws), n_samples, batch_size, answer_format=answer_format)
    mean_probs = replace(scoring, n_samples=0).ordered_probabilities(anchors)[0]

    def change(sigma_q: float) -> float:
        set_noise_scale(model, inverse_singular_values, sigma_q)
        torch.manual_seed(seed)  # the same noise for every σ_q: the change grows with σ_q, not with luck
        bma_probs = scoring.ordered_probabilities(anchors)[0]
        return prediction_change(mean_probs, bma_probs, metric)

    search = search_sigma(
        change, metric, *(sigma_range or defaults.sigma_range), defaults.tolerance if tolerance is None else tolerance,
        defaults.steps if steps is None else steps,
    )  # fmt: skip
    set_noise_scale(model, inverse_singular_values, search.sigma)
    zeros = sum(int((v == 0).sum()) for v in inverse_singular_values.values())
    return TfbResult(search.sigma, search.trace, len(inverse_singular_values), zeros)

