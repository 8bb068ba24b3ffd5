"""Turning a PEFT LoRA model into a BLoB model, and the model-wide operations on its posterior.

Everything here works on any ``nn.Module`` that contains PEFT LoRA layers (a ``PeftModel``, or one wrapped by
DDP); nothing here knows about Axolotl.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from peft.tuners.lora.layer import LoraLayer
from torch import nn

from axolotl_blob.blob.adapter_file import keep_posterior_out_of_adapter_file
from axolotl_blob.blob.kl import gaussian_kl
from axolotl_blob.blob.layer import POSTERIOR_PARAM, BlobVariant, EvalDraws, NoisePath, posterior_std
from axolotl_blob.engines import gathered
from axolotl_blob.io import save_tensors, write_json

POSTERIOR_FILE = "blob_posterior.safetensors"
POSTERIOR_CONFIG_FILE = "blob_config.json"


@dataclass(frozen=True)
class PosteriorSpec:
    """What a saved posterior needs to be read back: the parameterisation and the prior it was trained with, and
    how it is sampled at evaluation."""

    prior_std: float
    init_std: float
    sigma: str = "G**2"
    noise: NoisePath = "flipout"  # files written before the setting existed were trained with Flipout
    eval_draws: EvalDraws = "whole_weights"  # … and were evaluated with whole-weight draws (786809e onwards)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (or the model itself)."""
    return getattr(model, "module", model)


def blob_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer, str]]:
    """(module name, layer, adapter name) for every adapter that carries a BLoB posterior."""
    for name, module in unwrap_model(model).named_modules():
        if isinstance(module, LoraLayer) and hasattr(module, POSTERIOR_PARAM):
            for adapter in module.blob_G:
                yield name, module, adapter


def posterior_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(means M, σ factors G) of every BLoB layer."""
    layers = list(blob_layers(model))
    return [layer.lora_A[a].weight for _, layer, a in layers], [layer.blob_G[a] for _, layer, a in layers]


def bayesianize(model: nn.Module, init_std: float, adapter_name: str = "default", noise: NoisePath = "flipout") -> int:
    """Give every LoRA linear layer of `adapter_name` a BLoB posterior over A, sampled by the `noise` path;
    returns how many."""
    keep_posterior_out_of_adapter_file()
    count = 0
    for module in unwrap_model(model).modules():
        if isinstance(module, LoraLayer) and adapter_name in getattr(module, "lora_A", {}):
            if module.use_dora.get(adapter_name, False):
                raise ValueError("adapter: blob cannot be combined with DoRA (peft_use_dora)")
            if adapter_name in module.lora_variant:
                raise ValueError(f"LoRA layer already uses variant {type(module.lora_variant[adapter_name]).__name__}")
            BlobVariant.init(module, adapter_name, init_std=init_std, noise=noise)
            module.blob_G[adapter_name].requires_grad_(module.lora_A[adapter_name].weight.requires_grad)
            count += 1
    if count == 0:
        raise ValueError("adapter: blob found no LoRA linear layers; check lora_target_modules / lora_target_linear")
    return count


@torch.no_grad()
def untie_output_embeddings(model: nn.Module) -> int:
    """Give the output projection its own frozen copy of a weight it shares with the input embeddings
    (tie_word_embeddings); returns the parameters copied, 0 when untied already.

    PEFT puts a LoRA on a tied lm_head as on any linear layer: trained and evaluated unmerged it is right, but
    merging it writes B·A into the shared weight, i.e. into the input embeddings too (both PEFT 0.20 and 0.21).
    """
    output, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    if output is None or embeddings is None or output.weight is not embeddings.weight:
        return 0
    output.weight = nn.Parameter(embeddings.weight.detach().clone(), requires_grad=False)
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        config.tie_word_embeddings = False  # nothing re-ties them later (resize_token_embeddings, save)
    return output.weight.numel()


def kl_divergence(model: nn.Module, prior_std: float) -> torch.Tensor:
    """KL(q‖p) summed over every posterior entry of every layer (fp32 scalar), of the full tensors when an engine
    shards them (a collective then: every rank calls it)."""
    layers = list(blob_layers(model))
    means = [layer.lora_A[adapter].weight for _, layer, adapter in layers]
    with gathered(means + [layer.blob_G[adapter] for _, layer, adapter in layers]) as full:
        terms = [gaussian_kl(mean, posterior_std(g), prior_std) for mean, g in zip(full, full[len(means) :])]
        return torch.stack(terms).sum()


@torch.no_grad()
def posterior_summary(model: nn.Module) -> dict[str, float]:
    """Mean σ over all posterior entries: a cheap signal of how much uncertainty the adapter learnt (full tensors,
    as :func:`kl_divergence`)."""
    total, count = 0.0, 0
    with gathered([layer.blob_G[adapter] for _, layer, adapter in blob_layers(model)]) as factors:
        for g in factors:
            std = posterior_std(g.float())
            total += std.sum().item()
            count += std.numel()
    return {"sigma_mean": total / max(count, 1)}


@contextlib.contextmanager
def posterior_sampling(model: nn.Module, enabled: bool, whole_weights: bool = False) -> Iterator[None]:
    """Force sampling on (draws from q) or off (the posterior mean, N = 0) regardless of train/eval mode;
    `whole_weights`: each forward draws one A per layer for the whole batch (prediction) instead of the training
    noise path's per-token perturbations."""
    layers = {id(layer): layer for _, layer, _ in blob_layers(model)}.values()
    previous = [(getattr(layer, "blob_sampling", None), getattr(layer, "blob_weight_draws", False)) for layer in layers]
    for layer in layers:
        layer.blob_sampling, layer.blob_weight_draws = enabled, whole_weights
    try:
        yield
    finally:
        for layer, (sampling, weight_draws) in zip(layers, previous):
            layer.blob_sampling, layer.blob_weight_draws = sampling, weight_draws


def module_key(name: str) -> str:
    """A module's path below PEFT's wrappers (`base_model.model.`): the key posterior files and rank patterns use."""
    return name.removeprefix("base_model.model.")


def _posterior_key(name: str, adapter: str) -> str:
    """Key independent of wrappers and adapter name."""
    name = module_key(name)
    return f"{name}.{POSTERIOR_PARAM}" if adapter == "default" else f"{name}.{POSTERIOR_PARAM}.{adapter}"


def posterior_state_dict(model: nn.Module, full_state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The σ factors by posterior key: read off `full_state_dict` (the model's state dict an engine already
    gathered, keyed by parameter name) where it has them, else off the model (gathered: every rank calls it)."""
    layers = list(blob_layers(model))
    names = [f"{name}.{POSTERIOR_PARAM}.{adapter}" for name, _, adapter in layers]
    if full_state_dict is not None and all(name in full_state_dict for name in names):
        return _keyed(layers, [full_state_dict[name] for name in names])
    with gathered([layer.blob_G[adapter] for _, layer, adapter in layers]) as factors:
        return _keyed(layers, factors)


def _keyed(layers: list[tuple[str, LoraLayer, str]], factors: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copies (a gathered shard's memory is released when its block ends), by posterior key."""
    return {_posterior_key(name, adapter): g.detach().to("cpu", copy=True).contiguous() for (name, _, adapter), g in zip(layers, factors)}


def save_posterior(model: nn.Module, directory: str | Path, spec: PosteriorSpec, tensors: dict[str, torch.Tensor] | None = None) -> None:
    """Write the σ factors (`tensors` from :func:`posterior_state_dict`, else the model's own) and their
    parameterisation beside the PEFT adapter in `directory`, each file whole."""
    directory = Path(directory)
    save_tensors(directory / POSTERIOR_FILE, posterior_state_dict(model) if tensors is None else tensors)
    write_json(directory / POSTERIOR_CONFIG_FILE, asdict(spec))


class PosteriorFileError(ValueError):
    """A saved posterior that cannot be used with this model; the message names the file and the fix."""


UNREADABLE_ADVICE = (
    "it was probably cut short by a process that died while writing it. Resume from an earlier checkpoint, or "
    "point lora_model_dir at an intact output of an 'adapter: blob' run"
)
MISMATCH_ADVICE = (
    "it was saved for another model or adapter shape. Use the same base_model, lora_r, lora_target_modules / "
    "lora_target_linear (and rank_scheduler) as the run that saved it, or another directory"
)


def read_posterior_spec(directory: str | Path) -> PosteriorSpec:
    path = Path(directory) / POSTERIOR_CONFIG_FILE
    try:
        values = json.loads(path.read_text())
        names = {f.name for f in fields(PosteriorSpec)}
        if not isinstance(values, dict) or not values.keys() <= names:
            raise ValueError(f"expected an object with keys {sorted(names)}, got {values!r:.200}")
        return PosteriorSpec(**values)
    except (ValueError, TypeError) as error:  # json.JSONDecodeError is a ValueError
        raise PosteriorFileError(f"{path} is not a valid BLoB posterior config ({error}): {UNREADABLE_ADVICE}") from error


def saved_eval_draws(directory: str | Path) -> EvalDraws:
    """How the BLoB posterior saved in `directory` is sampled at evaluation (PosteriorSpec's default where there is
    none: nothing is sampled then)."""
    return PosteriorSpec.eval_draws if missing_posterior_files(directory) else read_posterior_spec(directory).eval_draws


def missing_posterior_files(directory: str | Path) -> list[str]:
    return [f for f in (POSTERIOR_FILE, POSTERIOR_CONFIG_FILE) if not (Path(directory) / f).is_file()]


def read_posterior_tensors(path: Path, header_only: bool = False) -> dict[str, torch.Tensor]:
    """The saved σ factors, or (`header_only`) just a check that the file reads back: its header and size."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        if header_only:
            with safe_open(str(path), "pt") as opened:
                opened.keys()
            return {}
        return load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise PosteriorFileError(f"{path} is truncated or corrupt ({error}): {UNREADABLE_ADVICE}") from error


def check_posterior_files(directory: str | Path) -> None:
    """Both posterior files of `directory` read back; cheap, so it runs before any weights load."""
    read_posterior_spec(directory)
    read_posterior_tensors(Path(directory) / POSTERIOR_FILE, header_only=True)


@torch.no_grad()
def load_posterior(model: nn.Module, directory: str | Path) -> None:
    """Copy saved σ factors into the model; every posterior must be matched exactly, in both directions, before
    any is copied (a mismatch leaves the model untouched)."""
    missing = missing_posterior_files(directory)
    if missing:
        raise FileNotFoundError(f"{directory} has no BLoB posterior ({', '.join(missing)} missing)")
    spec = read_posterior_spec(directory)
    if spec.sigma != "G**2":
        raise PosteriorFileError(f"{directory}/{POSTERIOR_CONFIG_FILE}: unsupported sigma parameterisation {spec.sigma!r}")
    path = Path(directory) / POSTERIOR_FILE
    saved = read_posterior_tensors(path)
    expected = {_posterior_key(name, adapter): layer.blob_G[adapter] for name, layer, adapter in blob_layers(model)}
    if saved.keys() != expected.keys():
        absent, extra = sorted(expected.keys() - saved.keys()), sorted(saved.keys() - expected.keys())
        raise PosteriorFileError(
            f"{path} does not match the model's BLoB layers (missing {absent[:3]}{'…' if len(absent) > 3 else ''}, "
            f"unexpected {extra[:3]}{'…' if len(extra) > 3 else ''}): {MISMATCH_ADVICE}"
        )
    for key, param in expected.items():
        if saved[key].shape != param.shape:
            raise PosteriorFileError(
                f"{path}: {key} has shape {tuple(saved[key].shape)}, the model's is {tuple(param.shape)}: {MISMATCH_ADVICE}"
            )
    for key, param in expected.items():
        param.copy_(saved[key])
