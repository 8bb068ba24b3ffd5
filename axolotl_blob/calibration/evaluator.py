"""One calibration evaluation of a model: every dataset of the `calibration:` block, scored and reported.

Datasets marked `ood: true` are scored like the others and, in addition, get the AUROC of telling their questions
apart from the pooled in-distribution ones by max probability, predictive entropy and mutual information.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from axolotl_blob.calibration.metrics import CalibrationState
from axolotl_blob.calibration.ood import OOD_SCORES, ood_metrics
from axolotl_blob.calibration.report import (
    dataset_report,
    reliability_diagram,
    risk_coverage_plot,
    scalar_metrics,
    write_json,
)
from axolotl_blob.calibration.scoring import AutocastFactory, ChoiceScoring, choice_scorer, score_tokens
from axolotl_blob.calibration.temperature import FittedTemperature, fit_on_examples
from axolotl_blob.multiple_choice import AnswerFormat, read_examples
from axolotl_blob.sampling import PosteriorSampler

if TYPE_CHECKING:
    from axolotl_blob.args import CalibrationSettings

TOKENS_DATASET = "tokens"


@dataclass
class CalibrationEvaluator:
    settings: CalibrationSettings
    n_samples: int
    answer_format: AnswerFormat = "letters"  # the training data's: scored as the model was trained
    temperature: float | None = None  # divides each draw's choice logits before the average (None: no scaling)

    def __post_init__(self):
        self.examples = {d.label: read_examples(d.path) for d in self.settings.datasets}
        self.last_fit: FittedTemperature | None = None
        self.fit_temperature_on(self.settings.fit_temperature)

    def fit_temperature_on(self, path: str | Path | None) -> None:
        """Fit T on the held-out multiple-choice file `path` at every evaluation, with that evaluation's draws, and
        score with it (None: no fit, `temperature` applies)."""
        self.held_out_path = None if path is None else str(path)
        self.held_out = read_examples(path) if path is not None else []

    def check_tokenizer(self, tokenizer) -> None:
        """Every question must be scorable with this tokenizer: each answer label one token (letters), each choice text
        its own tokens after the prompt (cloze). Raises ValueError naming the dataset and what fails."""
        held_out = {"calibration.fit_temperature": self.held_out} if self.held_out else {}
        for name, examples in {**self.examples, **held_out}.items():
            try:
                choice_scorer(self.answer_format, tokenizer, examples)
            except ValueError as exc:
                raise ValueError(f"calibration dataset {name!r}: {exc}") from None

    def evaluate(
        self,
        model: nn.Module,
        tokenizer,
        sampler: PosteriorSampler,
        eval_batches: Iterable[dict] | None = None,
        autocast: AutocastFactory = contextlib.nullcontext,
    ) -> dict[str, dict]:
        """{dataset name: metrics and per-bin statistics}; identical on every rank."""
        s = self.settings
        used = sampler.samples_used(self.n_samples)
        if s.mode == "tokens":
            state = score_tokens(model, eval_batches, sampler, self.n_samples, s.n_bins, autocast)
            return {TOKENS_DATASET: dataset_report(state, used)}
        scoring = ChoiceScoring(model, tokenizer, sampler, self.n_samples, s.batch_size, autocast, self.answer_format)
        temperature = self.temperature
        if self.held_out:
            self.last_fit = fit_on_examples(scoring, self.held_out, self.held_out_path)
            temperature = self.last_fit.temperature
        states = {
            name: scoring.calibration_state(examples, s.n_bins, 1.0 if temperature is None else temperature)
            for name, examples in self.examples.items()
        }
        reports = {name: dataset_report(state, used) for name, state in states.items()}
        if temperature is not None:
            for report in reports.values():
                report["temperature"] = temperature
        in_distribution = _uncertainties([states[d.label] for d in s.datasets if not d.ood])
        for dataset in s.datasets:
            if dataset.ood:
                ood = ood_metrics(in_distribution, _uncertainties([states[dataset.label]]))
                reports[dataset.label].update(ood=True, **ood)
        return reports

    def metric_names(self, reports: dict[str, dict], prefix: str = "eval") -> dict[str, float]:
        """`eval_acc`, … for one dataset; `eval_<dataset>_acc`, … for several."""
        single = len(reports) == 1
        return {
            f"{prefix}_{metric}" if single else f"{prefix}_{name}_{metric}": value
            for name, report in reports.items()
            for metric, value in scalar_metrics(report).items()
            if metric not in ("n", "n_samples")
        }

    def save(self, reports: dict[str, dict], directory: Path, step: int) -> None:
        write_json(directory / f"step-{step}.json", step, self.settings.n_bins, self.settings.mode, reports)
        if self.settings.plots:
            for name, report in reports.items():
                title = f"{name}, step {step}, N = {report['n_samples']}"
                reliability_diagram(report, title, directory / f"{name}-step-{step}.png")
                risk_coverage_plot(report, title, directory / f"{name}-step-{step}-risk-coverage.png")


def _uncertainties(states: list[CalibrationState]) -> dict[str, torch.Tensor]:
    """Per-example confidence, entropy and mutual information of the examples of `states`, pooled."""
    return {name: torch.cat([state.record(name) for state in states]) for name in OOD_SCORES}
