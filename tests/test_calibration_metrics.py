"""Calibration metrics against torchmetrics and hand computations."""

import math

import pytest
import torch
from torchmetrics.classification import MulticlassCalibrationError

from axolotl_blob.calibration.metrics import CalibrationState, entropy


def random_predictions(n: int, k: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(n, k, generator=generator) * 2, dim=-1)
    labels = torch.randint(0, k, (n,), generator=generator)
    return probs, labels


@pytest.mark.parametrize("n_bins", [10, 15])
@pytest.mark.parametrize("k", [2, 4])
def test_ece_and_mce_equal_torchmetrics(n_bins, k):
    probs, labels = random_predictions(500, k)
    state = CalibrationState(n_bins)
    state.update(probs[:200], labels[:200])
    state.update(probs[200:], labels[200:])
    metrics = state.compute()
    l1 = MulticlassCalibrationError(num_classes=k, n_bins=n_bins, norm="l1")(probs, labels).item()
    mx = MulticlassCalibrationError(num_classes=k, n_bins=n_bins, norm="max")(probs, labels).item()
    assert metrics["ece"] == pytest.approx(l1, abs=1e-6)
    assert metrics["mce"] == pytest.approx(mx, abs=1e-6)


def test_accuracy_nll_brier_by_hand():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.25, 0.25, 0.5]])
    labels = torch.tensor([0, 2, 2])
    state = CalibrationState(15)
    state.update(probs, labels)
    metrics = state.compute()
    assert metrics["acc"] == pytest.approx(2 / 3)
    assert metrics["nll"] == pytest.approx(-(math.log(0.7) + math.log(0.3) + math.log(0.5)) / 3)
    brier = ((0.3**2 + 0.2**2 + 0.1**2) + (0.1**2 + 0.6**2 + 0.7**2) + (0.25**2 + 0.25**2 + 0.5**2)) / 3
    assert metrics["brier"] == pytest.approx(brier)
    assert metrics["confidence"] == pytest.approx((0.7 + 0.6 + 0.5) / 3)


def test_perfectly_calibrated_predictions_have_zero_ece():
    # confidence 0.75 everywhere (one bin) and exactly 3 of 4 right; confidence 1.0 and always right
    probs = torch.tensor([[0.75, 0.25]] * 4 + [[1.0, 0.0]] * 2)
    labels = torch.tensor([0, 0, 0, 1, 0, 0])
    state = CalibrationState(10)
    state.update(probs, labels)
    assert state.compute()["ece"] == pytest.approx(0.0, abs=1e-12)


def test_confident_and_always_wrong_predictions_have_ece_near_one():
    probs = torch.tensor([[0.999, 0.001]] * 10)
    state = CalibrationState(15)
    state.update(probs, torch.ones(10, dtype=torch.long))
    metrics = state.compute()
    assert metrics["ece"] == pytest.approx(0.999)
    assert metrics["mce"] == pytest.approx(0.999)
    assert metrics["acc"] == 0.0


def test_averaging_probabilities_is_not_averaging_logits():
    """Two draws with logits (4, 0) and (−1, 0): the mean of their softmaxes (p_0 ≈ 0.626) differs from the softmax
    of their mean logits (p_0 ≈ 0.818); the NLL must be the former's."""
    logits = torch.tensor([[[4.0, 0.0]], [[-1.0, 0.0]]])  # two draws, one example, two classes
    draws = torch.softmax(logits, dim=-1)
    averaged_probs = draws.mean(0)
    averaged_logits = torch.softmax(logits.mean(0), dim=-1)
    state = CalibrationState(15)
    state.update(averaged_probs, torch.tensor([0]), draw_entropy=entropy(draws).mean(0))
    metrics = state.compute()
    assert metrics["nll"] == pytest.approx(-math.log((draws[0, 0, 0] + draws[1, 0, 0]).item() / 2))
    assert metrics["nll"] != pytest.approx(-math.log(averaged_logits[0, 0].item()))


def test_mutual_information_is_zero_for_agreeing_draws_and_positive_otherwise():
    same = torch.tensor([[[0.8, 0.2]], [[0.8, 0.2]]], dtype=torch.float64)
    state = CalibrationState(15)
    state.update(same.mean(0), torch.tensor([0]), draw_entropy=entropy(same).mean(0))
    assert state.compute()["mutual_info"] == pytest.approx(0.0, abs=1e-12)
    split = torch.tensor([[[0.9, 0.1]], [[0.1, 0.9]]])
    state = CalibrationState(15)
    state.update(split.mean(0), torch.tensor([0]), draw_entropy=entropy(split).mean(0))
    h = lambda p: -sum(x * math.log(x) for x in p)  # noqa: E731
    assert state.compute()["mutual_info"] == pytest.approx(h([0.5, 0.5]) - h([0.9, 0.1]))


def test_state_round_trips_through_a_flat_tensor_and_sums_across_shards():
    probs, labels = random_predictions(300, 3, seed=2)
    whole, first, second = CalibrationState(15), CalibrationState(15), CalibrationState(15)
    whole.update(probs, labels)
    first.update(probs[:120], labels[:120])
    second.update(probs[120:], labels[120:], indices=torch.arange(120, 300))
    merged = CalibrationState(15)
    merged.load_tensor(first.as_tensor() + second.as_tensor())  # what an all-reduce(SUM) produces
    merged.records = torch.cat([first.records, second.records])  # what the all-gather produces
    assert merged.compute() == pytest.approx(whole.compute())


def test_empty_state_is_an_error():
    with pytest.raises(ValueError, match="no examples"):
        CalibrationState(15).compute()
