"""IVON's posterior read back from a Trainer checkpoint, for prediction after training.

IVON's posterior N(m, σ²) lives in the optimizer state, not in the adapter: m is the adapter's weights (or, for
bf16 weights, the fp32 master copy in the state) and σ = 1/sqrt(ess·(h + δ)) needs the Hessian h and the group
settings. The HF Trainer saves that state as `optimizer.pt` in every `checkpoint-N/` directory (not in the final
output directory), keyed by position in its parameter groups. The groups are rebuilt here in the order Axolotl's
Trainer built them (weight-decayed, embeddings, not decayed; empty groups dropped) and checked against the saved
group sizes and tensor shapes before any state is used.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from axolotl_blob.ivon.optimizer import IVON

OPTIMIZER_FILE = "optimizer.pt"


def _is_adapter_parameter(name: str) -> bool:
    return "lora_" in name or "modules_to_save" in name


def _is_embedding_parameter(name: str) -> bool:
    return name.endswith("modules_to_save.default.weight") or "embed_tokens" in name or "lm_head" in name


def trainer_parameter_groups(model: nn.Module) -> list[list[nn.Parameter]]:
    """The adapter's parameters grouped and ordered as Axolotl's Trainer hands them to its optimizer."""
    from transformers import Trainer

    decayed = set(Trainer.get_decay_parameter_names(None, model))  # a rule that does not read the Trainer
    groups: dict[str, list[nn.Parameter]] = {"decayed": [], "embeddings": [], "not_decayed": []}
    for name, param in model.named_parameters():
        if _is_adapter_parameter(name):
            role = "embeddings" if _is_embedding_parameter(name) else "decayed" if name in decayed else "not_decayed"
            groups[role].append(param)
    return [group for group in groups.values() if group]


def ivon_from_checkpoint(model: nn.Module, directory: str | Path) -> IVON:
    """An IVON optimizer over `model`'s adapter parameters holding the posterior saved in `directory`."""
    path = Path(directory) / OPTIMIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{directory} has no {OPTIMIZER_FILE}: IVON's posterior lives in the optimizer state, which the Trainer "
            "saves only in checkpoint-N/ directories; point at one (save_strategy: steps), or use --samples 0 for "
            "the posterior mean"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    if "ivon" not in state:
        raise ValueError(f"{path} is not an IVON optimizer state (no 'ivon' entry): was the run 'optimizer: ivon'?")
    groups = trainer_parameter_groups(model)
    saved_sizes = [len(group["params"]) for group in state["param_groups"]]
    if saved_sizes != [len(group) for group in groups]:
        raise ValueError(
            f"{path}: parameter groups of sizes {saved_sizes}, but the adapter's parameters group as "
            f"{[len(g) for g in groups]}; the checkpoint belongs to another adapter or optimizer grouping"
        )
    optimizer = IVON([{"params": group} for group in groups], lr=1.0, ess=1.0)  # settings come from the state
    optimizer.load_state_dict(state)
    for group in optimizer.param_groups:
        for param in group["params"]:
            hess = optimizer.state[param].get("hess")
            if hess is None or hess.shape != param.shape:
                shape = None if hess is None else tuple(hess.shape)
                raise ValueError(f"{path}: a saved Hessian of shape {shape} meets a parameter of shape {tuple(param.shape)}")
    return optimizer
