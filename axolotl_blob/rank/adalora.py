"""`adapter: adalora`: PEFT's SVD-form adapter P Λ Q built from Axolotl's `lora_*` keys, and its regulariser.

The adapter is PEFT's AdaLoRA, so saved adapters load with plain `PeftModel.from_pretrained`. Two things are
ours rather than PEFT's: the rank allocation (:mod:`axolotl_blob.rank.scheduler`, driven by a Trainer
callback instead of a hand-written loop), and the orthogonality regulariser, which PEFT adds inside the
model's forward (then also to eval losses, and once per micro-batch whatever the gradient accumulation).
Here it is added to the training loss only: per module the paper's R(P, Q) = ‖PᵀP − I‖²_F + ‖QQᵀ − I‖²_F, averaged over
modules as PEFT's code averages (the paper sums over modules; PEFT's code uses the unsquared norm), so
orth_reg_weight does not scale with the number of adapted modules. PEFT's forward still computes its own term and
adds it times 0 (a small cost, no effect).
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch
from peft import AdaLoraConfig, PeftModel, get_peft_model

from axolotl_blob.rank.modules import AdaptedModule

if TYPE_CHECKING:
    from axolotl.utils.dict import DictDefault

    from axolotl_blob.args import RankSchedulerSettings

# LoraConfig fields that keep their meaning in AdaLoraConfig (Axolotl fills them from its lora_* keys)
SHARED_LORA_FIELDS = (
    "target_modules", "exclude_modules", "lora_alpha", "lora_dropout", "fan_in_fan_out", "bias",
    "modules_to_save", "layers_to_transform", "layers_pattern", "task_type", "init_lora_weights",
)  # fmt: skip


def initial_rank(cfg: DictDefault, settings: RankSchedulerSettings) -> int:
    """rank_scheduler.init_r, else lora_r (validation guarantees one of them, and that they agree)."""
    return settings.init_r if settings.init_r is not None else cfg.lora_r


def adalora_config(cfg: DictDefault, model, settings: RankSchedulerSettings, total_steps: int | None) -> AdaLoraConfig:
    """AdaLoraConfig from Axolotl's LoRA settings plus the rank_scheduler block.

    `total_step` is recorded for PEFT's bookkeeping only (our scheduler reads the Trainer's step count); before
    the Trainer exists it is max_steps, or the smallest value PEFT accepts.
    """
    from axolotl.loaders.adapter import load_lora  # Axolotl's reading of its lora_* keys

    _, lora_config = load_lora(model, cfg, config_only=True)
    shared = {name: getattr(lora_config, name) for name in SHARED_LORA_FIELDS}
    return AdaLoraConfig(
        **shared,
        r=8,  # unused by AdaLoRA; PEFT warns if it differs from its default
        init_r=initial_rank(cfg, settings),
        target_r=settings.target_r,
        tinit=settings.t_init,
        tfinal=settings.t_final,
        deltaT=settings.delta_t,
        beta1=settings.beta1,
        beta2=settings.beta2,
        orth_reg_weight=0.0,  # the regulariser is added by our Trainer, not by PEFT's forward
        total_step=total_steps or settings.t_init + settings.t_final + 1,
    )


def load_adalora(model, cfg: DictDefault, settings: RankSchedulerSettings, inference: bool = False, config_only: bool = False):
    """Wrap `model` in a fresh AdaLoRA adapter, or load the one in `lora_model_dir` (with its pruned ranks)."""
    config = adalora_config(cfg, model, settings, cfg.max_steps)
    if config_only:
        return None, config
    if cfg.lora_model_dir:
        with warnings.catch_warnings():
            # PEFT 0.21 checks rank_pattern keys against module names, as LoRA's are; AdaLoRA's own pattern is keyed
            # by `<module>.lora_E` and is applied all the same (the reloaded ranks and outputs are tested)
            warnings.filterwarnings("ignore", "The following rank_pattern keys did not match", RuntimeWarning)
            model = PeftModel.from_pretrained(model, cfg.lora_model_dir, is_trainable=not inference)
        return model, model.peft_config["default"]
    return get_peft_model(model, config), config


def orthogonality_penalty(modules: list[AdaptedModule]) -> torch.Tensor:
    """mean over modules of ‖PᵀP − I‖²_F + ‖QQᵀ − I‖²_F, in fp32, on the first module's device."""
    device = modules[0].left.device
    terms = []
    for module in modules:
        left, right = module.left.float(), module.right.float()
        eye = torch.eye(module.rank, device=left.device)
        terms.append(((left.T @ left - eye).square().sum() + (right @ right.T - eye).square().sum()).to(device))
    return torch.stack(terms).mean()
