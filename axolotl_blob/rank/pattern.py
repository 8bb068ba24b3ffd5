"""The final rank pattern: written into the adapter so it reloads pruned, and reported as JSON and a PNG.

AdaLoRA: PEFT already knows rank patterns: with `rank_pattern` in the config, `save_pretrained` drops the pruned
rows and columns and `from_pretrained` rebuilds each layer at its own rank, keeping the scale lora_alpha/init_r.
BLoB: the LoRA layers are cut to their kept components in place (A's mean and σ factor, B), and the config
records each module's rank in `rank_pattern` and, in `alpha_pattern`, the lora_alpha that reproduces the
layer's trained scale at the new rank. A plain LoRA loader then rebuilds the same function. PEFT's LoRA has no
rank 0, so a module that lost every component keeps one whose B column is zero: its update stays exactly 0.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from torch import nn

from axolotl_blob.blob.layer import POSTERIOR_PARAM
from axolotl_blob.blob.model import unwrap_model
from axolotl_blob.io import replaced_whole, write_json
from axolotl_blob.rank.modules import AdaptedModule

PATTERN_FILE = "rank_pattern.json"
PLOT_FILE = "rank_pattern.png"


def peft_config_of(model: nn.Module, adapter: str):
    return unwrap_model(model).peft_config[adapter]


def commit_adalora_pattern(model: nn.Module, modules: list[AdaptedModule], keep: dict[str, torch.Tensor], total_steps: int) -> None:
    config = peft_config_of(model, modules[0].adapter)
    config.rank_pattern = {f"{module.name}.lora_E": keep[module.name].tolist() for module in modules}
    config.total_step = total_steps


@torch.no_grad()
def _cut_blob_layer(module: AdaptedModule, index: torch.Tensor) -> None:
    layer, adapter = module.layer, module.adapter
    old_a, old_b = layer.lora_A[adapter], layer.lora_B[adapter]
    new_a = nn.Linear(old_a.in_features, index.numel(), bias=False, device=old_a.weight.device, dtype=old_a.weight.dtype)
    new_b = nn.Linear(
        index.numel(), old_b.out_features, bias=old_b.bias is not None, device=old_b.weight.device, dtype=old_b.weight.dtype
    )
    new_a.weight.copy_(old_a.weight[index])
    new_b.weight.copy_(old_b.weight[:, index])
    if old_b.bias is not None:
        new_b.bias.copy_(old_b.bias)
    new_a.requires_grad_(old_a.weight.requires_grad)
    new_b.requires_grad_(old_b.weight.requires_grad)
    layer.lora_A[adapter], layer.lora_B[adapter] = new_a, new_b
    factors = getattr(layer, POSTERIOR_PARAM)
    old_g = factors[adapter]
    factors[adapter] = nn.Parameter(old_g[index].clone(), requires_grad=old_g.requires_grad)
    layer.r[adapter] = index.numel()


def commit_blob_pattern(model: nn.Module, modules: list[AdaptedModule], keep: dict[str, torch.Tensor]) -> None:
    """Cut every BLoB layer to its kept components and record ranks and scale-preserving alphas in the config."""
    config = peft_config_of(model, modules[0].adapter)
    rank_pattern, alpha_pattern = dict(config.rank_pattern or {}), dict(config.alpha_pattern or {})
    for module in modules:
        index = keep[module.name].nonzero().flatten()
        if index.numel() == 0:
            index = torch.zeros(1, dtype=torch.long, device=index.device)  # its B column was zeroed when pruned
        scale = module.layer.scaling[module.adapter]
        _cut_blob_layer(module, index)
        rank = index.numel()
        rank_pattern[module.name] = rank
        alpha_pattern[module.name] = scale * (math.sqrt(rank) if module.layer.use_rslora[module.adapter] else rank)
    config.rank_pattern, config.alpha_pattern = rank_pattern, alpha_pattern


def _layer_and_kind(name: str) -> tuple[str, str]:
    numbers = re.findall(r"\.(\d+)\.", f".{name}.")
    return (numbers[0] if numbers else "-"), name.rsplit(".", 1)[-1]


def write_rank_report(ranks: dict[str, int], initial_rank: int, output_dir: str | Path, plot: bool) -> None:
    """rank_pattern.json ({module: final rank}) and a module × layer heat map of the final ranks."""
    output_dir = Path(output_dir)
    summary = {"initial_rank": initial_rank, "total_rank": sum(ranks.values()), "ranks": ranks}
    write_json(output_dir / PATTERN_FILE, summary)
    if not plot:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = {_layer_and_kind(name): rank for name, rank in ranks.items()}
    layers = sorted({layer for layer, _ in cells}, key=lambda s: (not s.isdigit(), int(s) if s.isdigit() else 0))
    kinds = sorted({kind for _, kind in cells})
    grid = torch.full((len(kinds), len(layers)), float("nan"))
    for (layer, kind), rank in cells.items():
        grid[kinds.index(kind), layers.index(layer)] = rank
    figure, axes = plt.subplots(figsize=(2.5 + 0.32 * len(layers), 1.4 + 0.45 * len(kinds)))
    image = axes.imshow(grid.numpy(), cmap="viridis", vmin=0, vmax=initial_rank, aspect="auto")
    for row, kind in enumerate(kinds):
        for col, layer in enumerate(layers):
            if (layer, kind) in cells:
                rank = cells[layer, kind]
                color = "black" if rank > 0.6 * initial_rank else "white"  # readable on viridis' light end
                axes.text(col, row, str(rank), ha="center", va="center", color=color, fontsize=7)
    axes.set_xticks(range(len(layers)), layers, fontsize=7)
    axes.set_yticks(range(len(kinds)), kinds)
    axes.set_xlabel("layer")
    axes.set_title(f"final rank per module (of {initial_rank}), total {summary['total_rank']}")
    figure.colorbar(image, ax=axes, label="rank")
    figure.tight_layout()
    with replaced_whole(output_dir / PLOT_FILE) as temporary:
        figure.savefig(temporary, dpi=120)
    plt.close(figure)
