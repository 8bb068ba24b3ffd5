"""Test-only Axolotl plugin that records what the run built: base layer types and every rank's initial adapter
after loading, and every rank's adapter, posterior, IVON state and logits on a fixed input after training (to
compare ranks, reruns and reloads)."""

import json
import os
from pathlib import Path

import torch

from axolotl.integrations.base import BasePlugin
from peft.tuners.lora.layer import LoraLayer
from safetensors.torch import save_file
from transformers import TrainerCallback


PROBE_INPUT = torch.arange(4, 36).reshape(2, 16)  # token ids every test tokenizer has


def adapter_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if "lora_" in k or "blob_G" in k}


class OptimizerStateDump(TrainerCallback):
    """At the end of training, every rank writes its IVON means and Hessians, keyed by parameter name."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_end(self, args, state, control, **kwargs):
        optimizer = getattr(self.trainer.optimizer, "optimizer", self.trainer.optimizer)
        tensors = {}
        for name, param in self.trainer.model.named_parameters():
            if param in optimizer.state and "hess" in optimizer.state[param]:
                tensors[f"hess.{name}"] = optimizer.state[param]["hess"].contiguous()
                tensors[f"mean.{name}"] = optimizer.posterior_mean(param).detach().float().contiguous()
        save_file(tensors, Path(args.output_dir) / f"rank{os.environ.get('RANK', '0')}_ivon.safetensors")


class ProbePlugin(BasePlugin):
    def post_model_load(self, cfg, model):
        base_types = sorted({type(m.get_base_layer()).__name__ for m in model.modules() if isinstance(m, LoraLayer)})
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.output_dir) / "probe_layers.json").write_text(json.dumps(base_types))
        save_file(adapter_state(model), Path(cfg.output_dir) / f"rank{os.environ.get('RANK', '0')}_initial_adapter.safetensors")

    def add_callbacks_post_trainer(self, cfg, trainer):
        return [OptimizerStateDump(trainer)] if cfg.optimizer == "ivon" else []

    def post_train(self, cfg, model):
        save_file(adapter_state(model), Path(cfg.output_dir) / f"rank{os.environ.get('RANK', '0')}_adapter.safetensors")
        model.eval()  # BLoB: the posterior mean
        with torch.no_grad():
            logits = model(input_ids=PROBE_INPUT.to(model.device)).logits.float().cpu()
        save_file({"logits": logits}, Path(cfg.output_dir) / f"rank{os.environ.get('RANK', '0')}_logits.safetensors")


def patched_by_axolotl_blob() -> list[str]:
    """Which Axolotl / PEFT functions carry the plugin's patch marker in this process."""
    import axolotl.utils.trainer as trainer_utils
    from axolotl.loaders.model import ModelLoader
    from peft.tuners.lora.model import LoraModel

    owners = {"ModelLoader": ModelLoader, "axolotl.utils.trainer": trainer_utils, "LoraModel": LoraModel}
    return sorted(
        f"{label}.{name}"
        for label, owner in owners.items()
        for name in dir(owner)
        if getattr(getattr(owner, name, None), "_axolotl_blob_patched", False)
    )


class SetupProbe(BasePlugin):
    """Records what the run was set up with: TrainingArguments, the environment accelerate reads, patched code."""

    def post_trainer_create(self, cfg, trainer):
        args = {k: v for k, v in trainer.args.to_dict().items() if k not in ("output_dir", "logging_dir")}
        setup = {
            "training_args": json.loads(json.dumps(args, default=str)),
            "environment": {k: v for k, v in os.environ.items() if k.startswith("ACCELERATE_")},
            "patched": patched_by_axolotl_blob(),
            "trainer_cls": type(trainer).__name__,
        }
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.output_dir) / "probe_setup.json").write_text(json.dumps(setup, indent=1, sort_keys=True))
