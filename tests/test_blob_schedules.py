"""BLoB's KL/σ step follows `learning_rate`'s schedule for every scheduler Axolotl builds: η_t = kl_lr · lr_t / lr.

Each scheduler is built by Axolotl's own code (its trainer builder's mapping of `lr_scheduler`, its trainer's
`create_scheduler`) once over the BLoB optimizer and once over a plain SGD at `learning_rate`, whose lr_t / lr is the
schedule's own factor. OneCycleLR is the case that broke: it sets `initial_lr` to max_lr/25 and writes absolute rates
into every group, the σ group included.
"""

from types import SimpleNamespace

import pytest
import torch

from axolotl_blob.blob.optimizer import BlobOptimizer, schedule_factor, set_kl_weight
from axolotl_blob.blob.model import posterior_parameters
from conftest import tiny_blob_model

LR, KL_LR, STEPS = 1e-2, 0.05, 12

SCHEDULES = {  # Axolotl config keys (Axolotl turns warmup_ratio into warmup_steps before the Trainer sees it)
    "cosine": {"lr_scheduler": "cosine", "warmup_steps": 3},
    "linear": {"lr_scheduler": "linear", "warmup_steps": 3},
    "constant": {"lr_scheduler": "constant"},
    "constant_with_warmup": {"lr_scheduler": "constant_with_warmup", "warmup_steps": 3},
    "one_cycle": {"lr_scheduler": "one_cycle", "warmup_steps": 3},
    "rex": {"lr_scheduler": "rex", "warmup_steps": 3},
    "rex_min_lr": {"lr_scheduler": "rex", "warmup_steps": 3, "cosine_min_lr_ratio": 0.1},
    "cosine_min_lr_ratio": {"lr_scheduler": "cosine", "warmup_steps": 3, "cosine_min_lr_ratio": 0.1},
    "cosine_min_lr_constant": {"lr_scheduler": "cosine", "warmup_steps": 3, "cosine_min_lr_ratio": 0.1, "cosine_constant_lr_ratio": 0.5},
    "cosine_quadratic_warmup": {"lr_scheduler": "cosine", "warmup_steps": 3, "lr_quadratic_warmup": True},
    "cosine_with_min_lr": {"lr_scheduler": "cosine_with_min_lr", "warmup_steps": 3, "lr_scheduler_kwargs": {"min_lr_rate": 0.1}},
    "cosine_with_restarts": {"lr_scheduler": "cosine_with_restarts", "warmup_steps": 2, "lr_scheduler_kwargs": {"num_cycles": 2}},
    "polynomial": {"lr_scheduler": "polynomial", "warmup_steps": 3},
    "jagged_restarts": {"lr_scheduler": "cosine", "warmup_steps": 2, "jagged_restart_steps": 5, "jagged_restart_warmup_steps": 2},
}
ARG_KEYS = ("warmup_steps", "cosine_min_lr_ratio", "cosine_constant_lr_ratio", "lr_quadratic_warmup",
            "jagged_restart_steps", "jagged_restart_warmup_steps")  # fmt: skip


def axolotl_scheduler(optimizer: torch.optim.Optimizer, cfg: dict, output_dir: str):
    """The scheduler Axolotl's trainer creates for config `cfg` over `optimizer`."""
    from axolotl.core.builders.base import TrainerBuilderBase
    from axolotl.core.trainers.base import AxolotlTrainer
    from axolotl.core.training_args import AxolotlTrainingArguments
    from axolotl.utils.dict import DictDefault

    kwargs = {key: cfg[key] for key in ARG_KEYS if key in cfg}
    TrainerBuilderBase._configure_scheduler(SimpleNamespace(cfg=DictDefault(cfg)), kwargs)
    trainer = object.__new__(AxolotlTrainer)  # create_scheduler reads only these
    trainer.args = AxolotlTrainingArguments(output_dir=output_dir, learning_rate=LR, use_cpu=True, **kwargs)
    trainer.optimizer, trainer.lr_scheduler = optimizer, None
    return AxolotlTrainer.create_scheduler(trainer, STEPS, optimizer)


def schedule_factors(cfg: dict, output_dir: str) -> list[float]:
    """lr_t / learning_rate at every step, from the schedule over a plain SGD built at learning_rate."""
    plain = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=LR)
    scheduler = axolotl_scheduler(plain, cfg, output_dir)
    factors = []
    for _ in range(STEPS):
        factors.append(plain.param_groups[0]["lr"] / LR)
        plain.step()
        scheduler.step()
    return factors


@pytest.mark.parametrize("name", SCHEDULES)
def test_kl_and_sigma_steps_follow_the_schedule_of_learning_rate(name, tiny_model_dir, tmp_path):
    cfg = SCHEDULES[name]
    factors = schedule_factors(cfg, str(tmp_path))
    assert len(set(factors)) > 1 or name == "constant"  # the schedule really moves
    model = tiny_blob_model(tiny_model_dir)
    means, sigmas = posterior_parameters(model)
    inner = torch.optim.AdamW([p for n, p in model.named_parameters() if p.requires_grad and "blob_G" not in n], lr=LR)
    optimizer = BlobOptimizer(inner, means, sigmas, kl_lr=KL_LR, prior_std=0.2)
    scheduler = axolotl_scheduler(optimizer, cfg, str(tmp_path))
    set_kl_weight(optimizer.param_groups, 0.0)  # the σ step is then the NLL gradient's alone: G ← G − η_t·1
    for step, factor in enumerate(factors):
        for group in optimizer.param_groups:
            if group.get("role"):
                assert schedule_factor(group) == pytest.approx(factor, rel=1e-6, abs=1e-12), (name, step, group["role"])
        before = [g.detach().clone() for g in sigmas]
        for g in sigmas:
            g.grad = torch.ones_like(g)
        optimizer.step()
        for g, g_before in zip(sigmas, before):  # atol: G ~ 0.5, whose fp32 ulp is 6e-8
            torch.testing.assert_close(g_before - g, torch.full_like(g, KL_LR * factor), rtol=1e-4, atol=2e-7)
        scheduler.step()


def test_one_cycle_peaks_at_kl_lr(tiny_model_dir, tmp_path):
    """OneCycleLR rises from max_lr/25 to max_lr = learning_rate: the KL/σ rate from kl_lr/25 to kl_lr, never 25 × kl_lr."""
    factors = schedule_factors(SCHEDULES["one_cycle"], str(tmp_path))
    assert factors[0] == pytest.approx(1 / 25) and max(factors) == pytest.approx(1.0)
