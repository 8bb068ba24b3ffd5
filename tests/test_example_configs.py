"""Every example config passes the plugin's validation as shipped (run from the repository root, where the README
runs them, with the assets that `python -m axolotl_blob.assets --out assets` builds)."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "example_configs").glob("*.yml"))


def built_by_assets() -> set[str]:
    """The JSONL files `python -m axolotl_blob.assets` writes (the paper tasks unless --skip-paper-tasks)."""
    from axolotl_blob.assets import OOD_FILE
    from axolotl_blob.paper_tasks import SHIFT_SETS, TASKS

    paper = {f"{task.name}_{part}.jsonl" for task in TASKS for part in ("train", "train_split", "held_out", "test")}
    return {"sarcasm_train.jsonl", "sarcasm_val.jsonl", OOD_FILE, *paper, *(f"{shift.name}_test.jsonl" for shift in SHIFT_SETS)}


def data_files(path: Path) -> list[str]:
    """The data files a config names: its datasets and its calibration block's."""
    import yaml

    config = yaml.safe_load(path.read_text())
    calibration = config.get("calibration") or {}
    held_out = [calibration["fit_temperature"]] if calibration.get("fit_temperature") else []
    return [entry["path"] for entry in [*config["datasets"], *calibration.get("datasets", [])]] + held_out


@pytest.mark.parametrize("path", EXAMPLES, ids=[path.stem for path in EXAMPLES])
def test_example_config_validates(path, monkeypatch):
    from axolotl.cli.config import load_cfg

    files = data_files(path)
    assert {Path(file).name for file in files} <= built_by_assets() and all(file.startswith("assets/") for file in files)
    missing = [file for file in files if not (ROOT / file).is_file()]
    if missing:
        pytest.skip(f"{missing[0]} not built (python -m axolotl_blob.assets --out assets)")
    monkeypatch.chdir(ROOT)
    cfg = load_cfg(str(path))
    assert cfg.adapter in ("blob", "lora", "adalora") and "axolotl_blob.BlobPlugin" in cfg.plugins
    assert cfg.bf16 is True and not cfg.fp16  # bf16 autocast on CPU, never Axolotl's implicit fp16
    if cfg.rank_scheduler:
        assert cfg.rank_scheduler["t_init"] + cfg.rank_scheduler["t_final"] < cfg.num_epochs * 400 // cfg.micro_batch_size
