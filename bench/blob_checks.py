"""BLoB's numbers on the device a benchmark runs on: the checks `gpu_check.py` makes before it times anything.

Each check returns a dict of its figures with `passed`. They run on whatever model `make_model` builds (bf16
weights, fp32 LoRA, bf16 autocast in `gpu_check`), so on a GPU they test the CUDA kernels, bf16 included.
"""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from axolotl_blob.blob.layer import posterior_std
from axolotl_blob.blob.model import bayesianize, blob_layers, posterior_sampling
from common import AutocastFactory, arm_optimizer, token_batch, trained_looking, training_step

ModelFactory = Callable[[str], nn.Module]  # attention implementation → a LoRA model with random weights

# Two attention kernels round differently in bf16, and a deep random network carries those roundings on (relative
# logit differences of ~3 % between eager and sdpa on the 16-layer 1B shape on a CPU): what BLoB must not add is a
# difference of its own, so a seeded draw may differ between kernels by at most twice what the posterior mean does.
MEAN_MULTIPLE, KERNEL_MARGIN = 2.0, 2.0**-8
LOSS_DROP = 0.1  # nats; step-to-step noise on a fixed batch is ~0.01
STANDARD_ERRORS = 6.0  # per output coordinate: a false alarm once in ~10⁹ coordinates


def blob_check_model(make_model: ModelFactory) -> nn.Module:
    """A BLoB model (sdpa attention, Flipout) whose noise visibly moves the outputs: B non-zero, σ ∈ [0.02, 0.04]."""
    model = trained_looking(make_model("sdpa"), std=0.05)
    bayesianize(model, init_std=0.2)
    return model


def closed_form_variance(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Var[y_j] = s² Σ_k B_jk² Σ_i σ_ki² x_i² for one input row x (1 × d_in): the adapter's output variance under
    q(A), whichever way A is sampled (fp64, with x and B as the bf16 matmuls see them)."""
    b = layer.lora_B["default"].weight.to(x.dtype).double()
    sigma = posterior_std(layer.blob_G["default"]).double()
    per_rank = (sigma**2 * x.double() ** 2).sum(dim=1)
    return layer.scaling["default"] ** 2 * (b**2 * per_rank).sum(dim=1)


@torch.no_grad()
def sampled_moments(
    model: nn.Module, layer: nn.Module, x: torch.Tensor, calls: int, rows: int, whole_weights: bool,
    autocast: AutocastFactory,
) -> dict:  # fmt: skip
    """The layer's sampled outputs for `rows` copies of x per call, against the closed-form mean (the N = 0 output)
    and variance. Calls are independent draws, rows within a call may not be (they share the Gaussian draw), so
    standard errors come from the spread of the per-call statistics."""
    with autocast(), posterior_sampling(model, enabled=False):
        mean = layer(x)[0].double()
    per_call_mean, per_call_square = [], []
    with autocast(), posterior_sampling(model, enabled=True, whole_weights=whole_weights):
        for _ in range(calls):
            deviation = layer(x.expand(rows, -1)).double() - mean
            per_call_mean.append(deviation.mean(0))
            per_call_square.append((deviation**2).mean(0))
    means, squares = torch.stack(per_call_mean), torch.stack(per_call_square)
    variance = closed_form_variance(layer, x)
    half_ulp = mean.abs() * 2.0**-8  # bf16 rounds the output to 8 significant bits
    mean_allowance = STANDARD_ERRORS * means.std(0) / calls**0.5 + half_ulp
    variance_allowance = STANDARD_ERRORS * squares.std(0) / calls**0.5 + (2 * half_ulp) ** 2
    return {
        "draws": calls * rows,
        "max_mean_error_over_allowance": (means.mean(0).abs() / mean_allowance).max().item(),
        "max_variance_error_over_allowance": ((squares.mean(0) - variance).abs() / variance_allowance).max().item(),
        "max_relative_variance_error": ((squares.mean(0) / variance) - 1).abs().max().item(),
        "noise_std_over_output": (variance.sqrt().mean() / mean.abs().mean()).item(),
    }


def layer_moments(make_model: ModelFactory, device: str, autocast: AutocastFactory, calls: int, rows: int) -> dict:
    """The first adapted layer's sampled outputs match the closed-form mean and variance, for both training noise
    paths (per-token perturbations) and the whole-weight draws of prediction (one draw per forward)."""
    model = blob_check_model(make_model)
    _, layer, _ = next(blob_layers(model))
    x = torch.randn(1, layer.in_features, generator=torch.Generator().manual_seed(0)).to(device, torch.bfloat16)
    paths = {"flipout": ("flipout", False, rows), "rank_signs": ("rank_signs", False, rows)}
    paths["whole_weights"] = ("flipout", True, 1)  # one draw per forward: one row per call
    result = {}
    for name, (noise, whole_weights, path_rows) in paths.items():
        layer.lora_variant["default"].noise = noise
        result[name] = sampled_moments(model, layer, x, calls, path_rows, whole_weights, autocast)
    within = [r["max_mean_error_over_allowance"] <= 1 and r["max_variance_error_over_allowance"] <= 1 for r in result.values()]
    return {**result, "passed": all(within)}


@torch.no_grad()
def sampled_and_mean_logits(
    model: nn.Module, ids: torch.Tensor, seed: int, autocast: AutocastFactory
) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits of one seeded posterior draw and of the posterior mean (fp32)."""
    torch.manual_seed(seed)
    with autocast(), posterior_sampling(model, enabled=True):
        sampled = model(input_ids=ids).logits.float()
    with autocast(), posterior_sampling(model, enabled=False):
        return sampled, model(input_ids=ids).logits.float()


def set_attention(model: nn.Module, implementation: str) -> None:
    """Switch the attention kernel of a (PEFT-wrapped) transformers model in place."""
    model.get_base_model().set_attn_implementation(implementation)


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def attention_kernels(
    make_model: ModelFactory,
    device: str,
    autocast: AutocastFactory,
    tokens: tuple[int, int],
    kernels: dict[str, tuple[str, SDPBackend | None]],
) -> dict:
    """With the noise fixed (the same seed before each forward), another attention kernel (`kernels`: name →
    transformers' attn_implementation and, for sdpa, the backend forced) moves a sampled BLoB forward no more than
    it moves the posterior mean's, while another seed moves it by far more: the posterior lives in the linear
    layers, so the draws cannot depend on the kernel. The reference is sdpa as torch dispatches it; a kernel that
    refuses the input (a forced backend's constraints) is recorded as unavailable."""
    model = blob_check_model(make_model)
    ids = token_batch(*tokens, high=model.config.vocab_size).to(device)
    sampled, mean = sampled_and_mean_logits(model, ids, 1, autocast)
    differences = {}
    for name, (implementation, backend) in kernels.items():
        try:
            set_attention(model, implementation)
            with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
                other_sampled, other_mean = sampled_and_mean_logits(model, ids, 1, autocast)
        except (RuntimeError, ImportError, ValueError) as error:  # e.g. a forced sdpa backend refuses this input
            differences[name] = {"unavailable": f"{type(error).__name__}: {error}"[:300]}
            continue
        finally:
            set_attention(model, "sdpa")
        of_mean = relative_difference(other_mean, mean)
        differences[name] = {
            "sampled": relative_difference(other_sampled, sampled),
            "posterior_mean": of_mean,
            "allowance": MEAN_MULTIPLE * of_mean + KERNEL_MARGIN,
        }
    another_draw = relative_difference(sampled_and_mean_logits(model, ids, 2, autocast)[0], sampled)
    compared = [d for d in differences.values() if "sampled" in d]
    return {
        "relative_difference_to_sdpa": differences,
        "relative_difference_of_another_draw": another_draw,
        "passed": bool(compared)
        and all(d["sampled"] <= d["allowance"] for d in compared)
        and another_draw > 10 * max(d["sampled"] for d in compared),
    }


def training_loss_falls(
    make_model: ModelFactory, device: str, autocast: AutocastFactory, tokens: tuple[int, int], steps: int
) -> dict:
    """A short BLoB training run (AdamW in BLoB's optimizer, each noise path) on a batch of 64 distinct tokens: the
    loss must fall well below the uniform guess over the vocabulary within `steps` steps."""
    batch = token_batch(*tokens, high=74).to(device)
    result = {}
    for noise in ("flipout", "rank_signs"):
        model = make_model("sdpa")
        step = training_step(model, arm_optimizer(model, noise, lr=3e-3), batch, autocast)
        losses = torch.stack([step() for _ in range(steps)]).tolist()
        result[noise] = {"first": losses[0], "last_5_mean": statistics.mean(losses[-5:]), "losses": losses}
    passed = all(r["last_5_mean"] < r["first"] - LOSS_DROP for r in result.values())
    return {**result, "passed": passed}
