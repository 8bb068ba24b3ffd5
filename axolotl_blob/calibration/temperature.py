"""Temperature scaling (Guo et al., 2017): one scalar T fitted after training, logits / T at prediction.

T is fitted on held-out multiple-choice examples (never on the examples a report is computed on) by minimising the
NLL of softmax(choice logits / T); the scaled model then goes through the ordinary calibration evaluation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import nn

from axolotl_blob.calibration.scoring import AutocastFactory, ordered_choice_probabilities
from axolotl_blob.sampling import DeterministicSampler


class TemperatureScaled(nn.Module):
    """A causal LM whose logits are divided by `temperature`."""

    def __init__(self, model: nn.Module, temperature: float):
        super().__init__()
        self.model, self.temperature = model, temperature

    def get_output_embeddings(self) -> nn.Module | None:
        """The wrapped model's output layer, so scoring can still restrict it to the answer position."""
        return self.model.get_output_embeddings()

    def forward(self, *args, **kwargs):
        outputs = self.model(*args, **kwargs)
        outputs.logits = outputs.logits / self.temperature
        return outputs


def choice_log_probs(
    model: nn.Module, tokenizer, examples: Sequence[dict], batch_size: int = 8, autocast: AutocastFactory = contextlib.nullcontext
) -> torch.Tensor:
    """(n, K) log-softmax over the answer letters (−inf beyond a question's choices), one pass, no sampling: the
    prompts and positions of the calibration block's `choices` scoring. They equal the letters' logits up to a
    constant per question, which softmax(· / T) ignores."""
    return ordered_choice_probabilities(model, tokenizer, examples, DeterministicSampler(), 0, batch_size, autocast)[0].log()


def fit_temperature(logits: torch.Tensor, answers: torch.Tensor) -> float:
    """argmin_T NLL(softmax(logits / T), answers), by L-BFGS over log T (T > 0 without a constraint); `logits`
    may be log-probabilities (choice_log_probs)."""
    logits, answers = torch.nan_to_num(logits.double(), neginf=-1e30), answers.long()  # letters a question lacks
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-14, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(logits / log_t.exp(), answers)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp())
