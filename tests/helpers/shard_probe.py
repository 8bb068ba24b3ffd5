"""Test-only Axolotl plugin: every rank writes the shapes of its adapter and posterior parameters as the model
holds them after training (outside forward), to show which ones an engine (ZeRO-3) kept as shards."""

import json
import os
from pathlib import Path

import torch.distributed as dist
from axolotl.integrations.base import BasePlugin


class ShardProbePlugin(BasePlugin):
    def post_train(self, cfg, model):
        if not dist.is_initialized():  # Axolotl's second call, after the process group is gone
            return
        shapes = {name: list(p.shape) for name, p in model.named_parameters() if "lora_" in name or "blob_G" in name}
        (Path(cfg.output_dir) / f"rank{os.environ.get('RANK', '0')}_shapes.json").write_text(json.dumps(shapes))
