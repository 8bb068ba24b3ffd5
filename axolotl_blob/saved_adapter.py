"""A saved PEFT LoRA adapter directory, checked against a base model before any weights load.

PEFT itself reports a wrong base model as a size-mismatch traceback deep inside `load_state_dict`, and a non-LoRA
adapter as whatever breaks first. Here the adapter's files are read (the safetensors header only) and every LoRA
factor is matched against the base model's layer shapes, built on the meta device from its config.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open

LOG = logging.getLogger(__name__)
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def _factor_shapes(weights: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(weights), framework="pt") as f:
        return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}


def _base_model_layers(base_model: str) -> dict[str, torch.nn.Module]:
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base_model))
    return dict(model.named_modules())


def check_lora_adapter(directory: str | Path, base_model: str, flag: str = "--adapter") -> dict:
    """The adapter's config, once `directory` is known to hold a LoRA adapter whose every factor fits `base_model`;
    otherwise a FileNotFoundError / ValueError naming the file and what to do."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{flag} {directory}: no such directory")
    config_file = directory / ADAPTER_CONFIG
    if not config_file.is_file():
        held = " (it holds a full model, config.json)" if (directory / "config.json").is_file() else ""
        raise FileNotFoundError(
            f"{flag} {directory}: no {ADAPTER_CONFIG}{held}; point it at a PEFT LoRA adapter directory "
            "(an Axolotl output_dir or one of its checkpoint-N directories)"
        )
    config = json.loads(config_file.read_text())
    if config.get("peft_type") != "LORA":
        raise ValueError(
            f"{config_file}: peft_type is {config.get('peft_type')!r}, not 'LORA'; this needs a LoRA adapter "
            "(from adapter: lora, adapter: blob, or any PEFT LoRA)"
        )
    weights = directory / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: missing; save the adapter as safetensors (save_safetensors: true)")
    layers = _base_model_layers(base_model)
    for key, shape in _factor_shapes(weights).items():
        module_name, _, factor = key.removeprefix("base_model.model.").rpartition(".lora_")
        layer = layers.get(module_name)
        if layer is None:
            raise ValueError(
                f"{weights}: the adapter adapts '{module_name}', which base model {base_model} does not have; "
                f"it was trained on another model ({ADAPTER_CONFIG} names {config.get('base_model_name_or_path')!r})"
            )
        expected = {"A.weight": getattr(layer, "in_features", None), "B.weight": getattr(layer, "out_features", None)}
        size = shape[1] if factor == "A.weight" else shape[0]
        if expected.get(factor) not in (None, size):
            raise ValueError(
                f"{weights}: '{key}' has shape {list(shape)}, but '{module_name}' of base model {base_model} is "
                f"{layer.in_features} → {layer.out_features}: the adapter was trained on another model "
                f"({ADAPTER_CONFIG} names {config.get('base_model_name_or_path')!r}); set base_model to that model"
            )
    named = config.get("base_model_name_or_path")
    if named and Path(named).resolve() != Path(base_model).resolve() and named != base_model:
        LOG.warning(f"{config_file} names base model {named!r}, the config {base_model!r}; their shapes agree")
    return config
