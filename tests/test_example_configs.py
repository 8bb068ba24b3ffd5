"""Every example config passes the plugin's validation as shipped (run from the repository root, where the README
runs them, with the assets that `python -m axolotl_blob.assets --out assets` builds)."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "example_configs").glob("*.yml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[path.stem for path in EXAMPLES])
def test_example_config_validates(path, monkeypatch):
    from axolotl.cli.config import load_cfg

    if not (ROOT / "assets" / "sarcasm_val.jsonl").is_file():
        pytest.skip("assets not built (python -m axolotl_blob.assets --out assets)")
    monkeypatch.chdir(ROOT)
    cfg = load_cfg(str(path))
    assert cfg.adapter in ("blob", "lora", "adalora") and "axolotl_blob.BlobPlugin" in cfg.plugins
    assert cfg.bf16 is True and not cfg.fp16  # bf16 autocast on CPU, never Axolotl's implicit fp16
    if cfg.rank_scheduler:
        assert cfg.rank_scheduler["t_init"] + cfg.rank_scheduler["t_final"] < cfg.num_epochs * 400 // cfg.micro_batch_size
