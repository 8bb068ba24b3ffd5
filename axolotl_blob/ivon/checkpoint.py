"""IVON's posterior read back from a Trainer checkpoint, for prediction after training.

IVON's posterior N(m, σ²) lives in the optimizer state, not in the adapter: m is the adapter's weights (or, for
bf16 weights, the fp32 master copy in the state) and σ = 1/sqrt(ess·(h + δ)) needs the Hessian h and the group
settings. The HF Trainer saves that state in every `checkpoint-N/` directory (not in the final output directory):
as `optimizer.pt`, keyed by position in its parameter groups, whose groups are rebuilt here in the order Axolotl's
Trainer built them (weight-decayed, embeddings, not decayed; empty groups dropped) and checked against the saved
group sizes; or, under FSDP2 with FULL_STATE_DICT, as `optimizer.bin`, the gathered state that accelerate writes
(`get_optimizer_state_dict`), keyed by parameter name, whose groups are read from the names. Tensor shapes are
checked before any state is used.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from axolotl_blob.ivon.optimizer import IVON

OPTIMIZER_FILE = "optimizer.pt"  # the Trainer's torch.save of optimizer.state_dict()
GATHERED_OPTIMIZER_FILE = "optimizer.bin"  # accelerate's gathered FSDP2 state (FULL_STATE_DICT)


def optimizer_file(directory: str | Path) -> Path | None:
    """The optimizer state a Trainer checkpoint holds, if any."""
    for name in (OPTIMIZER_FILE, GATHERED_OPTIMIZER_FILE):
        if (Path(directory) / name).is_file():
            return Path(directory) / name
    return None


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


def _by_position(model: nn.Module, state: dict, path: Path) -> tuple[list[list[nn.Parameter]], dict]:
    """The groups named in a state keyed by parameter name, and the state keyed by position, as torch loads it."""
    parameters = dict(model.named_parameters())
    names = [name for group in state["param_groups"] for name in group["params"]]
    missing = [name for name in names if name not in parameters]
    if missing:
        raise ValueError(f"{path} holds the state of parameters the model does not have, e.g. {missing[0]!r}")
    position = {name: i for i, name in enumerate(names)}
    groups = [[parameters[name] for name in group["params"]] for group in state["param_groups"]]
    by_position = {
        "state": {position[name]: entries for name, entries in state["state"].items()},
        "param_groups": [{**group, "params": [position[name] for name in group["params"]]} for group in state["param_groups"]],
    }
    return groups, by_position


def ivon_from_checkpoint(model: nn.Module, directory: str | Path) -> IVON:
    """An IVON optimizer over `model`'s adapter parameters holding the posterior saved in `directory`."""
    path = optimizer_file(directory)
    if path is None:
        raise FileNotFoundError(
            f"{directory} has no {OPTIMIZER_FILE} (nor {GATHERED_OPTIMIZER_FILE}): IVON's posterior lives in the "
            "optimizer state, which the Trainer saves only in checkpoint-N/ directories; point at one "
            "(save_strategy: steps), or use --samples 0 for the posterior mean"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    if "ivon" not in state and not any("hess" in entries for entries in state.get("state", {}).values()):
        raise ValueError(f"{path} is not an IVON optimizer state (no Hessian): was the run 'optimizer: ivon'?")
    named = any(isinstance(name, str) for group in state["param_groups"] for name in group["params"])
    if named:
        groups, state = _by_position(model, state, path)
    else:
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
