"""Test-only Axolotl plugin: every rank writes its adapter and posterior after training, to compare ranks."""

import os
from pathlib import Path

from axolotl.integrations.base import BasePlugin
from safetensors.torch import save_file


class RankDumpPlugin(BasePlugin):
    def post_train(self, cfg, model):
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if "lora_" in k or "blob_G" in k}
        save_file(state, Path(cfg.output_dir) / f"rank{os.environ.get('RANK', '0')}_adapter.safetensors")
