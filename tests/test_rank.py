"""Rank scheduling in isolation: the cubic budget, the scores against hand values and PEFT's RankAllocator,
the allocation invariants, the regulariser, and BLoB's cut to the final ranks."""

from __future__ import annotations

import copy
import math
from fractions import Fraction

import pytest
import torch
from peft import AdaLoraConfig, LoraConfig, get_peft_model
from peft.tuners.adalora.layer import RankAllocator
from torch import nn

from axolotl_blob.blob.model import bayesianize
from axolotl_blob.ivon.optimizer import IVON
from axolotl_blob.rank.adalora import orthogonality_penalty
from axolotl_blob.rank.budget import BudgetSchedule
from axolotl_blob.rank.importance import SensitivityImportance, SnrImportance, folded_normal_snr, snr
from axolotl_blob.rank.modules import adapted_modules, prune_
from axolotl_blob.rank.pattern import commit_blob_pattern
from axolotl_blob.rank.scheduler import RankScheduler


def toy_base() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 12), nn.ReLU(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 6))


def toy_adalora(init_r: int = 4, target_r: int = 2):
    config = AdaLoraConfig(init_r=init_r, target_r=target_r, target_modules=["0", "2", "4"], total_step=100, tinit=1, tfinal=1)
    model = get_peft_model(toy_base(), config)
    with torch.no_grad():  # PEFT starts Λ at zero; give every factor a value so scores differ
        for name, param in model.named_parameters():
            if "lora_E" in name:
                param.normal_()
    return model


def toy_blob(use_rslora: bool = False):
    model = get_peft_model(
        toy_base(), LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2", "4"], init_lora_weights=False, use_rslora=use_rslora)
    )
    bayesianize(model, init_std=0.3)
    return model


# ------------------------------------------------------------------------------------------------ budget


@pytest.mark.parametrize("initial, target, total, t_init, t_final", [(48, 24, 100, 10, 30), (16, 8, 12, 2, 4), (7, 1, 9, 0, 0)])
def test_budget_is_the_cubic_formula_at_every_step(initial, target, total, t_init, t_final):
    schedule = BudgetSchedule(initial, target, total, t_init, t_final, delta_t=1)
    for step in range(1, total + 1):
        if step <= t_init:
            expected = initial
        elif step >= total - t_final:
            expected = target
        else:
            remaining = 1 - Fraction(step - t_init, total - t_final - t_init)
            expected = target + math.floor((initial - target) * remaining**3)
        assert schedule.budget(step) == expected, step
    assert schedule.budget(t_init + 1) < initial or initial - target < 3  # the fall starts right after t_init


def test_budget_agrees_with_peft_budget_schedule():
    model = toy_adalora()
    config = model.peft_config["default"]
    config.total_step, config.tinit, config.tfinal, config.deltaT = 60, 5, 15, 3
    allocator = RankAllocator(model, config, "default")
    schedule = BudgetSchedule(allocator.init_bgt, allocator.target_bgt, 60, 5, 15, 3)
    for step in range(1, 60):
        budget, peft_allocates = allocator.budget_schedule(step)
        assert schedule.budget(step) == budget, step
        if step < 45:
            assert schedule.allocates(step) == peft_allocates, step


def test_allocation_steps():
    schedule = BudgetSchedule(16, 8, 30, t_init=4, t_final=6, delta_t=5)
    assert [step for step in range(1, 31) if schedule.allocates(step)] == [5, 10, 15, 20, 24]


# ------------------------------------------------------------------------------------------------ scores


def test_element_snr_hand_values():
    assert snr(torch.tensor(-0.3), torch.tensor(0.1)).item() == pytest.approx(3.0)
    # θ ~ N(0, σ²): E|θ| = σ√(2/π), Var|θ| = σ²(1 − 2/π), whatever σ
    at_zero = math.sqrt(2 / math.pi) / math.sqrt(1 - 2 / math.pi)
    torch.testing.assert_close(folded_normal_snr(torch.zeros(2), torch.tensor([0.1, 5.0])), torch.full((2,), at_zero, dtype=torch.float64))
    # μ = σ: E|θ| = σ(erf(1/√2) + √(2/π) e^{−1/2})
    expected = math.erf(1 / math.sqrt(2)) + math.sqrt(2 / math.pi) * math.exp(-0.5)
    expected /= math.sqrt(2 - expected**2)
    assert folded_normal_snr(torch.tensor(0.2), torch.tensor(0.2)).item() == pytest.approx(expected, rel=1e-12)
    # |μ| ≫ σ: |θ| is (almost) never folded, so its SNR is |μ|/σ (no cancellation to zero in float64)
    assert folded_normal_snr(torch.tensor(-50.0), torch.tensor(0.01)).item() == pytest.approx(5000.0, rel=1e-6)


def crafted_ivon(model, shuffle: bool) -> IVON:
    """IVON over the adapter with crafted Hessians: σ = 1/sqrt(ess (h + δ)) with h set per element."""
    params = [p for p in model.parameters() if p.requires_grad]
    if shuffle:
        params = params[::-1][:2] + params[::-1][2:]  # a different order, split over two groups
        groups = [{"params": params[:3]}, {"params": params[3:]}]
    else:
        groups = [{"params": params}]
    optimizer = IVON(groups, lr=0.1, ess=50.0, hess_init=1.0, weight_decay=0.0)
    generator = torch.Generator().manual_seed(1)
    for group in optimizer.param_groups:
        for p in group["params"]:
            optimizer.state[p]["hess"] = torch.rand(p.shape, generator=generator) + 0.5
    return optimizer


@pytest.mark.parametrize("folded", [False, True])
def test_snr_scores_from_ivon_state_equal_hand_computation(folded):
    model = toy_adalora()
    optimizer = crafted_ivon(model, shuffle=False)
    importance = SnrImportance(folded=folded, posterior=optimizer)

    def element(value: float, hess: float) -> float:
        mu, sigma = value, 1.0 / math.sqrt(50.0 * hess)
        if not folded:
            return abs(mu) / sigma
        e = mu * math.erf(mu / (sigma * math.sqrt(2))) + sigma * math.sqrt(2 / math.pi) * math.exp(-(mu**2) / (2 * sigma**2))
        return e / math.sqrt(mu**2 + sigma**2 - e**2)

    for module in adapted_modules(model):
        hess = {role: optimizer.state[p]["hess"] for role, p in module.factors().items()}
        left, right, values = module.left.tolist(), module.right.tolist(), module.values.flatten().tolist()
        expected = []
        for i in range(module.rank):
            score = element(values[i], hess["values"][i, 0].item())
            score += sum(element(left[j][i], hess["left"][j, i].item()) for j in range(len(left))) / len(left)
            score += sum(element(right[i][j], hess["right"][i, j].item()) for j in range(len(right[i]))) / len(right[i])
            expected.append(score)
        torch.testing.assert_close(importance.scores(module), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=0)


def test_snr_reads_the_posterior_by_parameter_identity():
    model = toy_adalora()
    in_order, shuffled = crafted_ivon(model, shuffle=False), crafted_ivon(model, shuffle=True)
    for p in model.parameters():  # the same Hessian per parameter, held at other positions of the state
        if p.requires_grad:
            shuffled.state[p]["hess"] = in_order.state[p]["hess"].clone()
    for module in adapted_modules(model):
        torch.testing.assert_close(
            SnrImportance(False, in_order).scores(module), SnrImportance(False, shuffled).scores(module), rtol=0, atol=0
        )


def test_blob_snr_is_the_snr_of_the_rank_one_update():
    model = toy_blob()
    module = adapted_modules(model)[0]
    with torch.no_grad():
        module.left[:3, 1] = 0.0  # 3 of 12 B entries of component 1 are zero
        module.left[:, 2] = 0.0  # component 2 contributes nothing
    mean, std = module.right.detach().double(), module.right_std.double()
    expected = (mean.abs() / std).mean(dim=1)
    expected[1] *= 9 / 12
    expected[2] = 0.0
    torch.testing.assert_close(SnrImportance(folded=False).scores(module), expected)
    folded = SnrImportance(folded=True).scores(module)
    with torch.no_grad():  # B → 4B, A → A/4 (M and σ = G² alike): the same layer, so the same scores
        module.left.mul_(4.0)
        module.right.div_(4.0)
        module.layer.blob_G["default"].div_(2.0)
    torch.testing.assert_close(SnrImportance(folded=False).scores(module), expected)
    torch.testing.assert_close(SnrImportance(folded=True).scores(module), folded)


def test_sensitivity_skips_non_finite_gradients():
    """An fp16 step the loss scaler skipped leaves inf gradients; observing them would poison the averages."""
    model = toy_adalora()
    modules = adapted_modules(model)
    observed, reference = SensitivityImportance(0.85, 0.85), SensitivityImportance(0.85, 0.85)
    for param in model.parameters():
        if param.requires_grad:
            param.grad = torch.rand_like(param)
    observed.observe(modules)
    reference.observe(modules)
    poisoned = modules[0].left
    poisoned.grad[0, 0] = float("inf")
    observed.observe(modules)
    poisoned.grad = None  # the reference simply does not see that factor's step
    reference.observe(modules)
    for module in modules:
        scores = observed.scores(module)
        assert torch.isfinite(scores).all()
        torch.testing.assert_close(scores, reference.scores(module), rtol=0, atol=0)


def test_sensitivity_equals_peft_rank_allocator():
    model = toy_adalora()
    config = copy.deepcopy(model.peft_config["default"])
    config.beta1, config.beta2 = 0.7, 0.9
    allocator = RankAllocator(model, config, "default")
    ours = SensitivityImportance(beta1=0.7, beta2=0.9)
    modules = adapted_modules(model)
    generator = torch.Generator().manual_seed(3)
    for _ in range(4):  # identical weights and gradients for both, step after step
        for param in model.parameters():
            if param.requires_grad:
                param.data = torch.randn(param.shape, generator=generator)
                param.grad = torch.randn(param.shape, generator=generator)
        allocator.update_ipt(model)
        ours.observe(modules)
    for module in modules:
        for role, suffix in (("left", "lora_B"), ("right", "lora_A"), ("values", "lora_E")):
            name = f"base_model.model.{module.name}.{suffix}.default"
            torch.testing.assert_close(ours.element_scores(module, role, module.factors()[role]), allocator._element_score(name))
    budget = 7
    scores = torch.cat([ours.scores(module) for module in modules])
    keep = torch.ones_like(scores, dtype=torch.bool)
    keep[torch.argsort(scores)[: scores.numel() - budget]] = False
    peft_pattern = allocator.mask_to_budget(copy.deepcopy(model), budget)
    assert torch.tensor(sum(peft_pattern.values(), [])).tolist() == keep.tolist()


# ------------------------------------------------------------------------------------------------ scheduler


class ShuffledImportance:
    """Fresh random scores at every allocation, to exercise the scheduler's bookkeeping alone."""

    def __init__(self):
        self.generator = torch.Generator().manual_seed(0)
        self.observed = 0

    def observe(self, modules):
        self.observed += 1

    def scores(self, module):
        return torch.rand(module.rank, generator=self.generator, dtype=torch.float64)

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        assert state == {}


def test_scheduler_keeps_the_budget_and_then_the_final_mask():
    model = toy_adalora(init_r=4, target_r=2)
    modules = adapted_modules(model)
    schedule = BudgetSchedule(12, 6, total_steps=20, t_init=3, t_final=5, delta_t=2)
    scheduler = RankScheduler(modules, schedule, ShuffledImportance())
    final_pattern = None
    for step in range(1, 21):
        with torch.no_grad():  # an optimizer step regrows every Λ entry
            for module in modules:
                module.values.add_(1.0)
        scheduler.step(step)
        values = torch.cat([module.values.flatten() for module in modules])
        if schedule.allocates(step):
            assert scheduler.active_rank == schedule.budget(step), step
            assert int((values != 0).sum()) == schedule.budget(step), step  # exactly the masked Λ are zero
        if step == schedule.final_step:
            final_pattern = scheduler.rank_pattern()
        if step > schedule.final_step:
            assert scheduler.rank_pattern() == final_pattern  # new scores, same mask
            assert int((values != 0).sum()) == schedule.target  # re-applied after every step
    assert scheduler.importance.observed == schedule.final_step - 1  # as PEFT: none at or after the final step
    restored = RankScheduler(modules, schedule, ShuffledImportance())
    restored.load_state_dict(scheduler.state_dict())
    assert restored.rank_pattern() == final_pattern and restored.final


def test_pruning_edits_ivon_posterior_mean_including_its_fp32_copy():
    model = toy_adalora().to(torch.bfloat16)
    optimizer = IVON([p for p in model.parameters() if p.requires_grad], lr=0.1, ess=50.0)
    module = adapted_modules(model)[0]
    with optimizer.sampled_params():  # creates the state: for a bf16 parameter, an fp32 copy of the mean
        pass
    keep = torch.tensor([True, False, True, False])
    prune_(module, keep, optimizer)
    mean = optimizer.posterior_mean(module.values).flatten()
    assert mean.dtype == torch.float32 and (mean[~keep] == 0).all() and (mean[keep] != 0).all()
    assert (module.values.flatten()[~keep] == 0).all()


# ------------------------------------------------------------------------------------------------ regulariser and BLoB cut


def test_orthogonality_penalty_hand_value():
    model = toy_adalora(init_r=2)
    modules = adapted_modules(model)
    with torch.no_grad():
        for module in modules:
            module.left.zero_()
            module.left[0, 0] = module.left[1, 1] = 1.0  # PᵀP = I
            module.right.zero_()
            module.right[0, 0] = module.right[1, 1] = 2.0  # QQᵀ = 4I: ‖3I‖² = 18
        modules[0].left[0, 0] = 3.0  # this module's PᵀP = diag(9, 1): + 64
    assert orthogonality_penalty(modules).item() == pytest.approx((18 + 18 + 18 + 64) / 3)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_blob_cut_to_final_ranks_keeps_the_function_and_reloads(use_rslora, tmp_path):
    from peft import PeftModel

    model = toy_blob(use_rslora).eval()
    modules = adapted_modules(model)
    keep = {modules[0].name: torch.tensor([True, False, True, False]), modules[1].name: torch.tensor([False] * 4),
            modules[2].name: torch.tensor([True, True, True, False])}  # fmt: skip
    for module in modules:
        prune_(module, keep[module.name])
    x = torch.randn(5, 10)
    with torch.no_grad():
        before = model(x)
    commit_blob_pattern(model, modules, keep)
    assert [module.layer.lora_A["default"].weight.shape[0] for module in modules] == [2, 1, 3]  # rank 0 keeps one zero term
    assert [module.layer.blob_G["default"].shape[0] for module in modules] == [2, 1, 3]
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=0, atol=1e-6)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(toy_base(), str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), before, rtol=0, atol=1e-6)


def test_callback_reapplies_the_final_mask_before_writing_it_into_the_adapter(tmp_path):
    import json
    from types import SimpleNamespace

    from transformers import TrainerControl, TrainerState

    from axolotl_blob.args import RankSchedulerSettings
    from axolotl_blob.rank.trainer import RankSchedulerCallback

    model = toy_adalora(init_r=4, target_r=2)
    params = [p for p in model.parameters() if p.requires_grad]
    settings = RankSchedulerSettings(importance="sensitivity", target_r=2, t_init=1, t_final=2, delta_t=1, plots=False)
    callback = RankSchedulerCallback(settings)
    args, state, control = SimpleNamespace(output_dir=str(tmp_path)), TrainerState(max_steps=6), TrainerControl()
    callback.on_train_begin(args, state, control, model=model, optimizer=None)
    for step in range(6):
        for param in params:
            param.grad = torch.rand_like(param)
        state.global_step = step
        callback.on_optimizer_step(args, state, control)
    modules = adapted_modules(model)
    with torch.no_grad():  # e.g. training stopped early: dropped components have regrown since the last allocation
        for module in modules:
            module.values.add_(1.0)
    callback.on_train_end(args, state, control, model=model)
    assert int((torch.cat([module.values.flatten() for module in modules]) != 0).sum()) == 6  # 2 × 3 modules
    config = model.peft_config["default"]
    assert sum(sum(keep) for keep in config.rank_pattern.values()) == 6 and config.total_step == 6
    report = json.loads((tmp_path / "rank_pattern.json").read_text())
    assert report["total_rank"] == 6 and report["initial_rank"] == 4


def test_callback_names_a_target_above_the_adapters_current_rank(tmp_path):
    from types import SimpleNamespace

    from transformers import TrainerControl, TrainerState

    from axolotl_blob.args import RankSchedulerSettings
    from axolotl_blob.rank.trainer import RankSchedulerCallback

    model = toy_adalora(init_r=2, target_r=2)  # e.g. an adapter already pruned to 2, loaded by lora_model_dir
    callback = RankSchedulerCallback(RankSchedulerSettings(importance="sensitivity", target_r=3, t_final=1))
    with pytest.raises(ValueError, match=r"target_r 3 × 3 modules = 9 exceeds the adapter's current total rank 6"):
        callback.on_train_begin(SimpleNamespace(output_dir=str(tmp_path)), TrainerState(max_steps=6), TrainerControl(), model=model)
