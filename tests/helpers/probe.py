"""Test-only Axolotl plugin that records what the run built: base layer types after loading, and every rank's
adapter and posterior after training (to compare ranks)."""

import json
import os
from pathlib import Path

from axolotl.integrations.base import BasePlugin
from peft.tuners.lora.layer import LoraLayer
from safetensors.torch import save_file


class ProbePlugin(BasePlugin):
    def post_model_load(self, cfg, model):
        base_types = sorted({type(m.get_base_layer()).__name__ for m in model.modules() if isinstance(m, LoraLayer)})
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.output_dir) / "probe_layers.json").write_text(json.dumps(base_types))

    def post_train(self, cfg, model):
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if "lora_" in k or "blob_G" in k}
        save_file(state, Path(cfg.output_dir) / f"rank{os.environ.get('RANK', '0')}_adapter.safetensors")
