"""KL of the BLoB posterior: closed form, torch.distributions, analytic gradients, the weight schedule."""

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from axolotl_blob.blob.kl import gaussian_kl, kl_grad_mean, kl_grad_std, kl_weight


def test_kl_matches_closed_form_and_torch_distributions():
    torch.manual_seed(0)
    mean = torch.randn(8, 32, dtype=torch.float64) * 0.3
    std = torch.rand(8, 32, dtype=torch.float64) * 0.1 + 1e-3
    prior = 0.2
    by_hand = sum(
        math.log(prior / s) + (s * s + m * m) / (2 * prior * prior) - 0.5
        for m, s in zip(mean.flatten().tolist(), std.flatten().tolist())
    )
    reference = kl_divergence(Normal(mean, std), Normal(torch.zeros_like(mean), prior)).sum().item()
    ours = gaussian_kl(mean, std, prior).item()
    assert ours == pytest.approx(by_hand, rel=1e-5)
    assert ours == pytest.approx(reference, rel=1e-5)


def test_kl_is_zero_at_the_prior_and_computed_in_fp32():
    mean = torch.zeros(4, 4, dtype=torch.bfloat16)
    std = torch.full((4, 4), 0.25, dtype=torch.bfloat16)
    kl = gaussian_kl(mean, std, 0.25)
    assert kl.dtype == torch.float32
    assert kl.item() == pytest.approx(0.0, abs=1e-5)


def test_analytic_gradients_match_autograd():
    torch.manual_seed(1)
    mean = (torch.randn(6, 10, dtype=torch.float64) * 0.2).requires_grad_()
    std = (torch.rand(6, 10, dtype=torch.float64) * 0.05 + 1e-3).requires_grad_()
    gaussian_kl(mean.double(), std.double(), 0.15).backward()
    grad_mean, grad_std = kl_grad_mean(mean.detach(), 0.15), kl_grad_std(std.detach(), 0.15)
    torch.testing.assert_close(grad_mean.double(), mean.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_std.double(), std.grad, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("cycle", [1, 2, 3, 5])
def test_reweight_schedule_matches_formula(cycle):
    for step in range(1, 3 * cycle + 1):
        j = step % cycle or cycle
        assert kl_weight(step, cycle, "reweight") == pytest.approx(2**j / (2 ** (cycle + 1) - 1), rel=1e-12)
    cycle_sum = sum(kl_weight(step, cycle, "reweight") for step in range(1, cycle + 1))
    assert cycle_sum == pytest.approx(1 - 1 / (2 ** (cycle + 1) - 1), rel=1e-12)


def test_reweight_schedule_with_long_cycles_does_not_overflow():
    assert kl_weight(5000, 5000, "reweight") == pytest.approx(0.5, rel=1e-9)
    assert kl_weight(1, 5000, "reweight") == 0.0


def test_uniform_schedule_and_bad_arguments():
    assert kl_weight(7, 4, "uniform") == 0.25
    with pytest.raises(ValueError, match="step >= 1"):
        kl_weight(0, 4, "reweight")
