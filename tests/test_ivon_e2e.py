"""`optimizer: ivon` end to end through `axolotl.cli.train` on the tiny model: gradient accumulation, BMA
calibration, bit-identical resume, two ranks with identical means and Hessians, and the config errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TORCHRUN_2, assert_identical_tensors, base_config, resume_dir, run_axolotl


def ivon_config(model_dir, data, out: Path, **overrides) -> dict:
    config = base_config(
        model_dir,
        data,
        out,
        adapter="lora",
        lora_mlp_kernel=False,
        lora_qkv_kernel=False,
        lora_o_kernel=False,
        optimizer="ivon",
        learning_rate=0.2,
        gradient_accumulation_steps=2,
        max_steps=6,
        eval_steps=3,
        save_steps=3,
        ivon={"ess": 2000.0, "hess_init": 0.01, "clip_radius": 0.01, "eval_samples": 3},
        calibration={"mode": "tokens", "plots": False},
        plugins=["axolotl_blob.BlobPlugin", "probe.ProbePlugin"],
        bf16=True,  # CPU autocast: the sampled weights and the update must survive it
    )
    del config["blob"]
    config.update(overrides)
    return config


@pytest.fixture(scope="module")
def ivon_run(tiny_model_dir, completion_data, tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("ivon-run")
    run_axolotl(ivon_config(tiny_model_dir, completion_data, workdir / "out"), workdir)
    return workdir / "out"


@pytest.mark.slow
def test_ivon_trains_with_accumulation_and_reports_bma_calibration(ivon_run):
    assert "IVON: ess=2000, hess_init=0.01, mc_samples=1" in (ivon_run.parent / "axolotl.log").read_text()
    history = json.loads((ivon_run / "checkpoint-6" / "trainer_state.json").read_text())["log_history"]
    losses = [entry["loss"] for entry in history if "loss" in entry]
    assert len(losses) == 6 and all(math.isfinite(loss) for loss in losses)
    calibration = [entry for entry in history if "eval_ece" in entry]
    assert [entry["step"] for entry in calibration] == [0, 3, 6]
    assert all(entry["eval_mutual_info"] > 0 for entry in calibration)  # 3 posterior draws that disagree
    assert json.loads((ivon_run / "calibration" / "step-6.json").read_text())["n_samples"] == 3
    state = torch.load(ivon_run / "checkpoint-6" / "optimizer.pt", weights_only=True)
    assert "ivon" in state and state["param_groups"][0]["ess"] == 2000.0
    per_param = list(state["state"].values())
    assert per_param and all(float(s["step"]) == 6 for s in per_param)
    hessians = torch.cat([s["hess"].flatten() for s in per_param])
    assert (hessians > 0).all() and not torch.allclose(hessians, torch.full_like(hessians, 0.01))


@pytest.mark.slow
def test_ivon_resume_is_bit_identical(ivon_run, tiny_model_dir, completion_data, tmp_path):
    out = resume_dir(ivon_run, "checkpoint-3", tmp_path)
    run_axolotl(ivon_config(tiny_model_dir, completion_data, out, resume_from_checkpoint=str(out / "checkpoint-3")), tmp_path)
    assert_identical_tensors(load_file(out / "rank0_ivon.safetensors"), load_file(ivon_run / "rank0_ivon.safetensors"))
    assert_identical_tensors(load_file(out / "adapter_model.safetensors"), load_file(ivon_run / "adapter_model.safetensors"))


@pytest.mark.slow
def test_two_ranks_end_with_identical_means_and_hessians(tiny_model_dir, completion_data, tmp_path):
    config = ivon_config(tiny_model_dir, completion_data, tmp_path / "out", ddp_backend="gloo", save_steps=6)
    run_axolotl(config, tmp_path, launcher=TORCHRUN_2)
    rank0 = load_file(tmp_path / "out" / "rank0_ivon.safetensors")
    rank1 = load_file(tmp_path / "out" / "rank1_ivon.safetensors")
    assert any(key.startswith("hess.") for key in rank0)
    assert_identical_tensors(rank1, rank0)
    history = json.loads((tmp_path / "out" / "checkpoint-6" / "trainer_state.json").read_text())["log_history"]
    assert history[-1]["epoch"] == pytest.approx(6 / 13.5)  # 216 rows, 4 × 2 accumulation × 2 ranks per step: DDP
    assert [entry["step"] for entry in history if "eval_ece" in entry] == [0, 3, 6]  # BMA calibration on both ranks
