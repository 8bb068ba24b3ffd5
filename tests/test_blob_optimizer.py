"""BLoB's update as an optimizer over role-tagged groups: the reference σ update against a hand computation, the
closed-form KL against autograd, today's routing, the schedule factor, an exact state_dict, the finiteness check."""

import copy
import math

import pytest
import torch

from axolotl_blob.blob.kl import rescaled_cycle_steps
from axolotl_blob.blob.model import kl_divergence
from axolotl_blob.blob.optimizer import BlobOptimizer, first_non_finite, schedule_factor, set_kl_weight
from axolotl_blob.blob.model import posterior_parameters
from conftest import tiny_blob_model

PRIOR, KL_LR, LR = 0.2, 0.05, 1e-2


@pytest.fixture
def model(tiny_model_dir):
    return tiny_blob_model(tiny_model_dir)


def inputs(seed: int = 3):
    ids = torch.randint(4, 100, (2, 9), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


def blob_optimizer(model, sigma_update="reference", **kwargs):
    means, sigmas = posterior_parameters(model)
    excluded = {id(p) for p in sigmas} if sigma_update == "reference" else set()
    inner = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad and id(p) not in excluded], lr=LR)
    return BlobOptimizer(inner, means, sigmas, kl_lr=KL_LR, prior_std=PRIOR, sigma_update=sigma_update, **kwargs)


def backward_nll(model, seed: int = 7):
    model.train()
    torch.manual_seed(seed)
    model(**inputs()).loss.backward()


def grad_g_kl(g: torch.Tensor) -> torch.Tensor:
    """∂KL/∂G for σ = G², by hand."""
    sigma = g * g
    return (sigma / PRIOR**2 - 1 / (sigma + 1e-8)) * 2 * g


def test_reference_update_moves_g_by_sgd_on_nll_plus_kl_and_m_by_the_kl_pull(model):
    optimizer = blob_optimizer(model)
    means, sigmas = posterior_parameters(model)
    inner_params = {id(p) for group in optimizer.inner.param_groups for p in group["params"]}
    assert not any(id(g) in inner_params for g in sigmas)  # G is in no group of the Trainer's optimizer
    assert {group.get("role") for group in optimizer.param_groups} == {None, "mean", "sigma"}
    shadow = copy.deepcopy(model)  # the same AdamW on the same gradients, without BLoB
    backward_nll(model)
    backward_nll(shadow)
    weight, factor = 0.3, 0.5
    adam = torch.optim.AdamW([p for n, p in shadow.named_parameters() if p.requires_grad and "blob_G" not in n], lr=LR * factor)
    adam.step()
    g_before = [g.detach().clone() for g in sigmas]
    g_grads = [g.grad.clone() for g in sigmas]
    for group in optimizer.param_groups:  # as an LR scheduler half-way down its schedule would leave them
        group["lr"] *= factor
    set_kl_weight(optimizer.param_groups, weight)
    optimizer.step()
    rate = KL_LR * factor
    shadow_means, shadow_sigmas = posterior_parameters(shadow)
    for mean, adam_mean in zip(means, shadow_means):  # the pull is computed at the new mean, as the reference does
        torch.testing.assert_close(mean, adam_mean - rate * weight * adam_mean / PRIOR**2, rtol=1e-6, atol=1e-8)
    for g, before, grad, untouched in zip(sigmas, g_before, g_grads, shadow_sigmas):
        torch.testing.assert_close(g, before - rate * (grad + weight * grad_g_kl(before)), rtol=1e-6, atol=1e-8)
        assert torch.equal(untouched, before)
    for (name, param), (_, expected) in zip(model.named_parameters(), shadow.named_parameters()):
        if "lora_B" in name:
            assert torch.equal(param, expected), name  # B: the NLL step of AdamW alone


def test_closed_form_kl_step_equals_sgd_on_the_autograd_kl(model):
    """No NLL gradient: M and G move by exactly one SGD step of rate · π on the KL that autograd differentiates."""
    reference = copy.deepcopy(model)
    optimizer = blob_optimizer(model)
    set_kl_weight(optimizer.param_groups, 0.25)
    optimizer.step()
    params = [p for n, p in reference.named_parameters() if "lora_A" in n or "blob_G" in n]
    sgd = torch.optim.SGD(params, lr=KL_LR * 0.25)
    kl_divergence(reference, PRIOR).backward()
    sgd.step()
    for (name, a), (_, b) in zip(model.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)


def test_optimizer_routing_steps_g_with_the_inner_optimizer_and_adds_the_kl_pull(model):
    optimizer = blob_optimizer(model, sigma_update="optimizer")
    assert not optimizer._own_groups
    shadow = copy.deepcopy(model)
    backward_nll(model)
    backward_nll(shadow)
    torch.optim.AdamW([p for p in shadow.parameters() if p.requires_grad], lr=LR).step()
    set_kl_weight(optimizer.param_groups, 0.5)
    optimizer.step()
    for g, adam_g in zip(posterior_parameters(model)[1], posterior_parameters(shadow)[1]):
        torch.testing.assert_close(g, adam_g - KL_LR * 0.5 * grad_g_kl(adam_g), rtol=1e-6, atol=1e-8)


def test_the_sigma_group_follows_the_lr_schedule(model):
    """The σ group runs at learning_rate like every other group (tests/test_blob_schedules.py: every scheduler)."""
    optimizer = blob_optimizer(model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    for step in range(3):
        assert optimizer.param_groups[-1]["lr"] == pytest.approx(LR / (1 + step))
        assert optimizer.param_groups[0]["lr"] == pytest.approx(LR / (1 + step))  # the inner groups: the same factor
        assert schedule_factor(optimizer.param_groups[-1]) == pytest.approx(1.0 / (1 + step))
        optimizer.step()
        scheduler.step()


def run_steps(model, optimizer, scheduler, steps: range):
    for step in steps:
        optimizer.zero_grad()
        backward_nll(model, seed=step)
        set_kl_weight(optimizer.param_groups, 0.1 * (step + 1))
        optimizer.step()
        scheduler.step()


def test_state_dict_resumes_bit_identically(model, tiny_model_dir):
    resumed_model = copy.deepcopy(model)
    optimizer = blob_optimizer(model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.8**step)
    run_steps(model, optimizer, scheduler, range(2))
    saved_model, saved_optimizer, saved_scheduler = (
        copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict()), scheduler.state_dict()
    )  # fmt: skip
    run_steps(model, optimizer, scheduler, range(2, 4))

    resumed_model.load_state_dict(saved_model)
    resumed = blob_optimizer(resumed_model)
    resumed_scheduler = torch.optim.lr_scheduler.LambdaLR(resumed, lambda step: 0.8**step)
    resumed.load_state_dict(saved_optimizer)
    resumed_scheduler.load_state_dict(saved_scheduler)
    assert resumed.param_groups[-1]["lr"] == pytest.approx(LR * 0.8**2)  # the σ group's scheduled lr came back
    assert resumed.state is resumed.inner.state and len(resumed.state) > 0
    run_steps(resumed_model, resumed, resumed_scheduler, range(2, 4))
    for (name, a), (_, b) in zip(model.named_parameters(), resumed_model.named_parameters()):
        assert torch.equal(a, b), name


def test_a_checkpoint_of_the_kl_lr_based_sigma_group_is_refused(model):
    """Before the fix the σ group was scheduled from kl_lr; its saved lr (and the scheduler's base) cannot resume."""
    saved = blob_optimizer(model).state_dict()
    del saved["own_groups"][0]["built_lr"]
    with pytest.raises(ValueError, match="predates the σ group's schedule at learning_rate"):
        blob_optimizer(model).load_state_dict(saved)


def test_zero_grad_clears_the_sigma_group_too(model):
    optimizer = blob_optimizer(model)
    backward_nll(model)
    optimizer.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_first_non_finite_finds_the_tensor(model):
    optimizer = blob_optimizer(model)
    assert first_non_finite(optimizer.param_groups) is None
    g = posterior_parameters(model)[1][2]
    with torch.no_grad():
        g[0, 1] = float("nan")
    role, tensor = first_non_finite(optimizer.param_groups)
    assert role == "sigma" and tensor is g
    with torch.no_grad():
        g[0, 1] = float("inf")
    assert first_non_finite(optimizer.param_groups)[1] is g


def test_bad_construction_is_refused(model):
    means, sigmas = posterior_parameters(model)
    everything = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    with pytest.raises(ValueError, match="σ factors are in the inner optimizer"):
        BlobOptimizer(everything, means, sigmas, kl_lr=KL_LR, prior_std=PRIOR)
    without_g = torch.optim.AdamW([p for n, p in model.named_parameters() if p.requires_grad and "blob_G" not in n], lr=LR)
    with pytest.raises(ValueError, match="every σ factor must be in the inner optimizer"):
        BlobOptimizer(without_g, means, sigmas, kl_lr=KL_LR, prior_std=PRIOR, sigma_update="optimizer")
    with pytest.raises(ValueError, match="Invalid kl_lr"):
        BlobOptimizer(without_g, means, sigmas, kl_lr=-1.0, prior_std=PRIOR)


@pytest.mark.parametrize("n, world, batch", [(400, 1, 8), (400, 2, 4), (28498, 2, 16), (3, 1, 64)])
def test_rescaled_cycle_equals_the_reference_formula(n, world, batch):
    expected = max(int(100 * n ** (math.pi / 8) / world / batch), 1)
    assert rescaled_cycle_steps(n, world, batch) == expected
    assert rescaled_cycle_steps(400, 1, 8) == 131  # the demo: 400 headlines, 8 per step
