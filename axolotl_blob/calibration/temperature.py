"""Temperature scaling (Guo et al., 2017) for any posterior: one scalar T, fitted after training on held-out
multiple-choice examples, divides each posterior draw's K choice logits s_n before the draws are averaged,

    p(y | x) = (1/N) Σ_n softmax(s_n / T).

For a point estimate (N = 1) this is classic temperature scaling. T is fitted with the very sampler and N it is
applied with, so BLoB's T calibrates the model average, not one draw (which is often over-confident where the
average is not). The fitted T is saved beside the adapter (:mod:`axolotl_blob.calibration.temperature_file`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from axolotl_blob.calibration.scoring import ChoiceScoring, gather_rows, rank_and_world
from axolotl_blob.sampling import BlobSampler, DropoutSampler, PosteriorSampler

MASKED = -1e30  # a choice a question lacks: exp(MASKED / T) = 0 for any T it meets, yet finite, so d/dT is 0, not NaN


@dataclass(frozen=True)
class FittedTemperature:
    """One fit, as temperature.json records it: what T is, and what it was fitted on and with."""

    temperature: float
    fitted_on: str  # the held-out multiple-choice file
    examples: int
    samples: int  # posterior samples averaged (0: one pass, a point estimate or a posterior mean)
    eval_draws: str | None  # how they were drawn: per_token, whole_weights, mc_dropout; None for one pass
    nll_before: float  # of the held-out examples at T = 1
    nll_after: float  # at the fitted T


def draw_averaged_nll(draw_log_probs: torch.Tensor, answers: torch.Tensor, temperature: float | torch.Tensor) -> torch.Tensor:
    """−mean_i log((1/N) Σ_n softmax(s_ni / T)[y_i]) of (N, n, K) per-draw choice log-probabilities (any
    per-question shift of s_ni cancels in the softmax, so log-probabilities stand for logits)."""
    scaled = torch.log_softmax(draw_log_probs / temperature, dim=-1)
    picked = scaled.gather(-1, answers.expand(len(scaled), -1).unsqueeze(-1)).squeeze(-1)  # (N, n)
    return -(torch.logsumexp(picked, dim=0) - math.log(len(scaled))).mean()


def _checked(draw_log_probs: torch.Tensor, answers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if draw_log_probs.dim() != 3 or draw_log_probs.shape[1] != len(answers) or not len(answers):
        raise ValueError(
            f"choice log-probabilities must be (N draws, n examples, K) with n = {len(answers)} answers > 0, "
            f"got {tuple(draw_log_probs.shape)}"
        )
    return torch.nan_to_num(draw_log_probs.double(), neginf=MASKED), answers.long()


def fit_temperature(draw_log_probs: torch.Tensor, answers: torch.Tensor) -> float:
    """argmin_T of :func:`draw_averaged_nll`, by L-BFGS over log T (T > 0 without a constraint)."""
    draw_log_probs, answers = _checked(draw_log_probs, answers)
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-14, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = draw_averaged_nll(draw_log_probs, answers, log_t.exp())
        loss.backward()
        return loss

    optimizer.step(closure)
    temperature = float(log_t.detach().exp())
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature fit diverged (T = {temperature}): does the model answer every held-out question right?")
    return temperature


def draws_kind(sampler: PosteriorSampler, samples: int) -> str | None:
    """How `sampler` draws `samples` samples, in temperature.json's words (None: one pass, or another sampler)."""
    if samples == 0:
        return None
    if isinstance(sampler, BlobSampler):
        return "whole_weights" if sampler.whole_weights else "per_token"
    return "mc_dropout" if isinstance(sampler, DropoutSampler) else None


def gathered_draw_log_probs(scoring: ChoiceScoring, examples: Sequence[dict]) -> torch.Tensor:
    """(N, n, K) per-draw choice log-probabilities of `examples` in their order, each rank scoring its shard (as
    :meth:`ChoiceScoring.calibration_state` does) and every rank receiving all of them, so that every rank fits the same T."""
    rank, world = rank_and_world()
    if world == 1:
        return scoring.ordered_draw_log_probs(examples)
    n_draws, width = max(scoring.sampler.samples_used(scoring.n_samples), 1), max(len(e["choices"]) for e in examples)
    shard = examples[rank::world]
    own = scoring.ordered_draw_log_probs(shard) if shard else torch.empty(n_draws, 0, width, dtype=torch.float64)
    padded = torch.full((len(shard), n_draws, width), float("-inf"), dtype=torch.float64)
    padded[..., : own.shape[-1]] = own.transpose(0, 1)
    rows = gather_rows(padded)  # rank 0's shard, then rank 1's, …
    ordered = torch.empty_like(rows)
    ordered[torch.cat([torch.arange(r, len(examples), world) for r in range(world)])] = rows
    return ordered.transpose(0, 1)


def fit_on_examples(scoring: ChoiceScoring, examples: Sequence[dict], fitted_on: str) -> FittedTemperature:
    """T fitted on held-out `examples` (read from `fitted_on`) with the draws the evaluation will use."""
    draw_log_probs = gathered_draw_log_probs(scoring, examples)
    finite, answers = _checked(draw_log_probs, torch.tensor([e["answer"] for e in examples]))
    temperature = fit_temperature(finite, answers)
    samples = scoring.sampler.samples_used(scoring.n_samples)
    return FittedTemperature(
        temperature=temperature,
        fitted_on=fitted_on,
        examples=len(examples),
        samples=samples,
        eval_draws=draws_kind(scoring.sampler, samples),
        nll_before=float(draw_averaged_nll(finite, answers, 1.0)),
        nll_after=float(draw_averaged_nll(finite, answers, temperature)),
    )
