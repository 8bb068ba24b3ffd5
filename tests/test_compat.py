"""The plugin on every supported Axolotl: each way of naming it, no side effects when it is loaded but unused, and an
adapter file that holds LoRA tensors only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

import axolotl
from axolotl_blob.compat import axolotl_version
from conftest import base_config, run_axolotl

pytestmark = pytest.mark.slow
AUTO_LOADS = axolotl_version() >= (0, 20)
SPELLINGS = ["axolotl_blob.BlobPlugin", "axolotl_blob.plugin.BlobPlugin", None]
LORA_KEYS = {
    f"base_model.model.model.layers.{layer}.self_attn.{module}.lora_{factor}.weight"
    for layer in (0, 1)
    for module in ("q_proj", "v_proj")
    for factor in ("A", "B")
}


def short_run(model_dir, data, out: Path, **overrides) -> dict:
    return base_config(
        model_dir, data, out, max_steps=3, save_steps=3, eval_steps=None, val_set_size=0.0, bf16=False, fp16=False,
        **overrides,
    )  # fmt: skip


@pytest.mark.parametrize("spelling", SPELLINGS, ids=["top-level", "module-path", "auto-loaded"])
def test_blob_trains_under_every_plugin_spelling(spelling, tiny_model_dir, completion_data, tmp_path):
    if spelling is None and not AUTO_LOADS:
        pytest.skip(f"Axolotl {axolotl.__version__} loads only the plugins a config lists (auto-loading came in 0.20)")
    plugins = [spelling, "probe.SetupProbe"] if spelling else ["probe.SetupProbe"]
    run_axolotl(short_run(tiny_model_dir, completion_data, tmp_path / "out", plugins=plugins), tmp_path)
    out = tmp_path / "out"
    history = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())["log_history"]
    assert [entry["step"] for entry in history if "kl" in entry] == [1, 2, 3]  # the BLoB trainer ran, once per step
    assert json.loads((out / "probe_setup.json").read_text())["trainer_cls"].startswith("Blob")
    assert set(load_file(out / "blob_posterior.safetensors")) == {
        key.removeprefix("base_model.model.").replace("lora_A.weight", "blob_G") for key in LORA_KEYS if "lora_A" in key
    }
    for directory in (out, out / "checkpoint-3"):
        assert set(load_file(directory / "adapter_model.safetensors")) == LORA_KEYS


def hidden_package(tmp_path: Path) -> Path:
    """A directory that, first on PYTHONPATH, makes `import axolotl_blob` fail: as if it were not installed."""
    shadow = tmp_path / "hidden" / "axolotl_blob"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text('raise ImportError("axolotl_blob hidden by the test")\n')
    return shadow.parent


def test_loaded_but_unused_plugin_changes_nothing(tiny_model_dir, completion_data, tmp_path, monkeypatch):
    """A plain `adapter: lora` run with the plugin loaded (auto-loaded on 0.21; listed on 0.19, which auto-loads
    nothing) is set up exactly as a run where the package cannot be imported."""
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    setups = {}
    for name, plugins, path_first in (
        ("with", ["probe.SetupProbe"] + ([] if AUTO_LOADS else ["axolotl_blob.BlobPlugin"]), ()),
        ("without", ["probe.SetupProbe"], (hidden_package(tmp_path),)),
    ):
        workdir = tmp_path / name
        workdir.mkdir()
        config = short_run(tiny_model_dir, completion_data, workdir / "out", adapter="lora", plugins=plugins)
        del config["blob"]
        run_axolotl(config, workdir, path_first=path_first)
        log = (workdir / "axolotl.log").read_text()
        loaded = "Plugin loaded successfully: axolotl_blob.BlobPlugin" in log
        assert loaded == (name == "with"), log[-3000:]
        setups[name] = json.loads((workdir / "out" / "probe_setup.json").read_text())
    assert setups["with"]["patched"] == setups["without"]["patched"] == []
    assert setups["with"]["environment"] == setups["without"]["environment"]
    assert setups["with"]["trainer_cls"] == setups["without"]["trainer_cls"]
    assert setups["with"]["training_args"] == setups["without"]["training_args"]


@pytest.mark.parametrize(
    "adapter, load_in_4bit, fsdp, expected",
    [("blob", True, True, True), ("adalora", True, True, True), ("qlora", True, True, True),
     ("blob", False, True, False), ("blob", True, False, False), ("lora", False, True, False)],
)  # fmt: skip
def test_blob_in_4bit_under_fsdp_takes_axolotls_qlora_placement(adapter, load_in_4bit, fsdp, expected):
    """The one property Axolotl's QLoRA + FSDP device placement reads, as Axolotl asks it of a loader."""
    from axolotl.loaders.model import ModelLoader
    from axolotl.utils.dict import DictDefault

    from axolotl_blob.compat import patch_model_loader

    patch_model_loader()
    cfg = DictDefault(adapter=adapter, load_in_4bit=load_in_4bit, fsdp_config={"fsdp_version": 2} if fsdp else None)
    loader = object.__new__(ModelLoader)
    loader.cfg = cfg
    assert loader.is_qlora_and_fsdp_enabled is expected
