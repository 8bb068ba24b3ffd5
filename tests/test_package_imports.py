"""The package's science imports without Axolotl (torch, transformers, peft and safetensors suffice), and the plugin
still loads, by name and through its entry point, where Axolotl is installed."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys

import pytest
import yaml
from conftest import color_questions, subprocess_env, tiny_blob_model, write_jsonl

import axolotl_blob
from axolotl_blob.blob.model import PosteriorSpec, save_posterior

SCIENCE = (
    "axolotl_blob.ivon",
    "axolotl_blob.ivon.trainer",
    "axolotl_blob.blob.layer",
    "axolotl_blob.blob.kl",
    "axolotl_blob.blob.optimizer",
    "axolotl_blob.blob.model",
    "axolotl_blob.blob.trainer",
    "axolotl_blob.blob.tfb",
    "axolotl_blob.calibration.metrics",
    "axolotl_blob.calibration.scoring",
    "axolotl_blob.calibration.evaluator",
    "axolotl_blob.sampling",
    "axolotl_blob.multiple_choice",
    "axolotl_blob.rank.scheduler",
    "axolotl_blob.rank.trainer",
)

COMMANDS = (  # and what they import when they run
    "axolotl_blob.predict", "axolotl_blob.evaluate", "axolotl_blob.bayesianize", "axolotl_blob.run_config",
    "axolotl_blob.ivon.checkpoint", "axolotl_blob.saved_adapter", "axolotl_blob.calibration.temperature",
)  # fmt: skip

# Run with `python -c`: the packages named in ABSENT cannot be imported; then the modules named on the command line are.
IMPORTS = """
import importlib, json, sys

class Absent:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ABSENT:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, Absent())
try:
    import axolotl
    raise SystemExit("axolotl was importable")
except ModuleNotFoundError:
    pass
for module in sys.argv[1:]:
    importlib.import_module(module)
"""

# Axolotl and pydantic (which only the config schema needs) absent: the science imports, and IVON trains.
WITHOUT_AXOLOTL = 'ABSENT = ("axolotl", "pydantic")' + IMPORTS + """

import torch
from axolotl_blob import IVON
from axolotl_blob.ivon.trainer import IvonSampler
from axolotl_blob.sampling import sampler_for

torch.manual_seed(0)
x = torch.randn(64, 4)
y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1 * torch.randn(64)
model = torch.nn.Linear(4, 1)
optimizer = IVON(model.parameters(), lr=0.1, ess=64, hess_init=0.1)
mse = lambda: torch.nn.functional.mse_loss(model(x).squeeze(-1), y)
losses = []
for _ in range(30):
    with torch.no_grad():
        losses.append(mse().item())  # at the posterior mean
    with optimizer.sampled_params(train=True):
        optimizer.zero_grad()
        mse().backward()
    optimizer.step()
sampler = sampler_for(model, optimizer)
with torch.no_grad():
    draws = [mse().item() for _ in sampler.draws(3)]
print(json.dumps({"losses": losses, "draws": draws, "ivon_sampler": isinstance(sampler, IvonSampler),
                  "axolotl_loaded": any(m.partition(".")[0] == "axolotl" for m in sys.modules)}))
"""


def test_science_imports_and_ivon_trains_without_axolotl(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_AXOLOTL, *SCIENCE],
        cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    losses = report["losses"]
    assert not report["axolotl_loaded"]
    assert report["ivon_sampler"]
    assert losses[-1] < 0.2 * losses[0], losses
    assert len(set(report["draws"])) == 3  # three distinct weight samples around the mean


def test_predict_runs_without_axolotl_and_prints_json_lines_only(tiny_model_dir, tmp_path):
    model = tiny_blob_model(tiny_model_dir, init_std=0.3)
    model.save_pretrained(tmp_path / "adapter")
    save_posterior(model, tmp_path / "adapter", PosteriorSpec(prior_std=0.2, init_std=0.3))
    config = {"base_model": str(tiny_model_dir), "adapter": "blob", "bf16": False, "blob": {"eval_samples": 2}}
    (tmp_path / "config.yml").write_text(yaml.safe_dump(config))
    unanswered = [{key: value for key, value in q.items() if key != "answer"} for q in color_questions(3, seed=1)]
    questions = write_jsonl(tmp_path / "q.jsonl", unanswered)
    argv = ["predict", str(tmp_path / "config.yml"), "--adapter", str(tmp_path / "adapter"), "--input", str(questions)]
    run = f"import runpy; sys.argv = {argv!r}; runpy.run_module('axolotl_blob.predict', run_name='__main__')"
    script = 'ABSENT = ("axolotl",)' + IMPORTS + run
    result = subprocess.run(
        [sys.executable, "-c", script, *COMMANDS],
        cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    lines = [json.loads(line) for line in result.stdout.splitlines()]  # stdout holds the answers and nothing else
    assert [line["id"] for line in lines] == ["color-1-0", "color-1-1", "color-1-2"]
    assert "3 questions, N = 2" in result.stderr


def test_plugin_by_name_and_entry_point():
    from axolotl.integrations.base import BasePlugin

    from axolotl_blob.plugin import BlobPlugin

    assert axolotl_blob.BlobPlugin is BlobPlugin
    assert issubclass(BlobPlugin, BasePlugin)
    (entry_point,) = importlib.metadata.entry_points(group="axolotl.plugins", name="blob")
    assert entry_point.load() is BlobPlugin
    assert {"IVON", "BlobPlugin"} <= set(dir(axolotl_blob))


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="has no attribute 'Nothing'"):
        axolotl_blob.Nothing  # noqa: B018
