"""The package's science imports without Axolotl (torch, transformers, peft and safetensors suffice), and the plugin
still loads, by name and through its entry point, where Axolotl is installed."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys

import pytest
from conftest import subprocess_env

import axolotl_blob

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

# Run with `python -c`: Axolotl (and pydantic, which only the plugin's config schema needs) cannot be imported.
WITHOUT_AXOLOTL = """
import importlib, json, sys

class Absent:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("axolotl", "pydantic"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, Absent())
try:
    import axolotl
    raise SystemExit("axolotl was importable")
except ModuleNotFoundError:
    pass
for module in sys.argv[1:]:
    importlib.import_module(module)

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
