"""Rank scheduling end to end through `axolotl.cli.train` on the tiny model: AdaLoRA + AdamW + sensitivity,
AdaLoRA + IVON + SNR and BLoB + SNR reach the target budget on the cubic schedule, save the final pattern with
the adapter, and the reloaded adapters reproduce the trained model's outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TORCHRUN_2, assert_identical_tensors, base_config, resume_dir, run_axolotl
from helpers.probe import PROBE_INPUT

MODULES = 4  # q_proj and v_proj in 2 layers
SCHEDULE = {"target_r": 2, "t_init": 2, "t_final": 4, "delta_t": 2}
STEPS = 12


def rank_config(model_dir, data, out: Path, importance: str, **overrides) -> dict:
    config = base_config(
        model_dir,
        data,
        out,
        adapter="adalora",
        lora_r=4,
        max_steps=STEPS,
        eval_steps=6,
        save_steps=6,
        learning_rate=0.01,
        rank_scheduler={"importance": importance, **SCHEDULE},
        plugins=["axolotl_blob.BlobPlugin", "probe.ProbePlugin"],
        bf16=False,
        fp16=False,  # fp32 throughout, so a reload can be compared exactly (Axolotl's CPU default would be fp16)
    )
    del config["blob"]
    config.update(overrides)
    return config


def train_logs(out: Path) -> list[dict]:
    history = json.loads((out / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())["log_history"]
    return [entry for entry in history if "loss" in entry]


def assert_follows_budget(out: Path) -> None:
    """T = 12, t_init 2, t_final 4, ΔT 2, 16 → 8: b(t) = 8 + ⌊8 (1 − (t − 2)/6)³⌋ falls 12, 10, 9, 8 over steps 3–6;
    allocations after steps 4, 6 and 8 (the final mask)."""
    logs = train_logs(out)
    assert [entry["step"] for entry in logs] == list(range(1, STEPS + 1))
    assert [entry["rank_budget"] for entry in logs] == [16, 16, 12, 10, 9, 8, 8, 8, 8, 8, 8, 8]
    assert [entry["active_rank"] for entry in logs] == [16, 16, 16, 10, 10, 8, 8, 8, 8, 8, 8, 8]


def reloaded_logits(base_model: Path, adapter_dir: Path) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_model), str(adapter_dir)).eval()
    with torch.no_grad():
        return model(input_ids=PROBE_INPUT).logits


def assert_saved_pattern(out: Path, target_total: int) -> dict:
    report = json.loads((out / "rank_pattern.json").read_text())
    assert report["total_rank"] == target_total and sum(report["ranks"].values()) == target_total
    assert report["initial_rank"] == 4 and len(report["ranks"]) == MODULES
    assert (out / "rank_pattern.png").stat().st_size > 5000
    return report["ranks"]


@pytest.fixture(scope="module")
def adalora_sensitivity_run(tiny_model_dir, completion_data, tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("adalora-sensitivity")
    run_axolotl(rank_config(tiny_model_dir, completion_data, workdir / "out", "sensitivity"), workdir)
    return workdir / "out"


@pytest.mark.slow
def test_adalora_adamw_sensitivity_reaches_target_and_reloads(adalora_sensitivity_run, tiny_model_dir):
    out = adalora_sensitivity_run
    assert_follows_budget(out)
    ranks = assert_saved_pattern(out, 2 * MODULES)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADALORA" and config["total_step"] == STEPS
    assert {k.removesuffix(".lora_E"): sum(v) for k, v in config["rank_pattern"].items()} == ranks
    adapter = load_file(out / "adapter_model.safetensors")
    saved_ranks = {k.removeprefix("base_model.model.").removesuffix(".lora_E.weight").removesuffix(".lora_E"): v.shape[0]
                   for k, v in adapter.items() if "lora_E" in k}
    assert saved_ranks == ranks  # pruned rows are gone from the file
    orth = [entry["orth_penalty"] for entry in train_logs(out)]
    assert orth[-1] < orth[0]  # the regulariser pulls P and Q towards orthonormal
    trained = load_file(out / "rank0_logits.safetensors")["logits"]
    torch.testing.assert_close(reloaded_logits(tiny_model_dir, out), trained, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_adalora_resume_restores_the_scheduler(adalora_sensitivity_run, tiny_model_dir, completion_data, tmp_path):
    out = resume_dir(adalora_sensitivity_run, "checkpoint-6", tmp_path)
    config = rank_config(tiny_model_dir, completion_data, out, "sensitivity", resume_from_checkpoint=str(out / "checkpoint-6"))
    run_axolotl(config, tmp_path)
    assert json.loads((out / "rank_pattern.json").read_text()) == json.loads((adalora_sensitivity_run / "rank_pattern.json").read_text())
    assert_identical_tensors(load_file(out / "adapter_model.safetensors"), load_file(adalora_sensitivity_run / "adapter_model.safetensors"))


@pytest.mark.slow
def test_adalora_ivon_snr_reaches_target_and_reloads(tiny_model_dir, completion_data, tmp_path):
    out = tmp_path / "out"
    config = rank_config(
        tiny_model_dir, completion_data, out, "snr",
        optimizer="ivon", learning_rate=0.05, ivon={"ess": 2000.0, "hess_init": 0.01, "clip_radius": 0.01},
    )  # fmt: skip
    run_axolotl(config, tmp_path)
    assert_follows_budget(out)
    ranks = assert_saved_pattern(out, 2 * MODULES)
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "ADALORA"
    trained = load_file(out / "rank0_logits.safetensors")["logits"]
    torch.testing.assert_close(reloaded_logits(tiny_model_dir, out), trained, rtol=0, atol=1e-5)
    assert len(ranks) == MODULES


@pytest.mark.slow
def test_blob_snr_reaches_target_and_reloads(tiny_model_dir, completion_data, tmp_path):
    from axolotl_blob.evaluate import load_adapter_model
    from axolotl.utils.dict import DictDefault

    out = tmp_path / "out"
    config = rank_config(tiny_model_dir, completion_data, out, "snr_abs", adapter="blob", blob={"eval_samples": 2, "kl_lr": 0.01})
    run_axolotl(config, tmp_path)
    assert_follows_budget(out)
    ranks = assert_saved_pattern(out, 2 * MODULES)
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA"
    assert {k: v for k, v in adapter_config["rank_pattern"].items()} == {k: max(r, 1) for k, r in ranks.items()}
    # plain PEFT rebuilds the pruned LoRA (posterior mean) exactly
    trained = load_file(out / "rank0_logits.safetensors")["logits"]
    torch.testing.assert_close(reloaded_logits(tiny_model_dir, out), trained, rtol=0, atol=1e-5)
    # and the full posterior reloads at the pruned ranks
    model = load_adapter_model(DictDefault(base_model=str(tiny_model_dir)), out)
    reloaded = {k: v for k, v in model.state_dict().items() if "lora_" in k or "blob_G" in k}
    assert_identical_tensors(reloaded, load_file(out / "rank0_adapter.safetensors"))


@pytest.mark.slow
def test_schedule_longer_than_the_run_fails_before_training(tiny_model_dir, completion_data, tmp_path):
    """Without max_steps the step count is the Trainer's (216 examples / batch 4 = 54); checked before step 1."""
    config = rank_config(tiny_model_dir, completion_data, tmp_path / "out", "sensitivity", num_epochs=1)
    del config["max_steps"]
    config["rank_scheduler"].update(t_init=30, t_final=30)
    result = run_axolotl(config, tmp_path, expect_success=False)
    assert "t_init + rank_scheduler.t_final = 30 + 30 = 60 must be smaller than the run's 54 optimizer steps" in result.stderr
    assert "'loss'" not in result.stdout + result.stderr  # no training step ran


@pytest.mark.slow
def test_two_ranks_prune_alike(tiny_model_dir, completion_data, tmp_path):
    """DDP (2 processes, gloo): IVON's synced posterior gives both ranks the same scores, masks and final adapter."""
    out = tmp_path / "out"
    config = rank_config(
        tiny_model_dir, completion_data, out, "snr", optimizer="ivon", learning_rate=0.05, ddp_backend="gloo",
        ivon={"ess": 2000.0, "hess_init": 0.01, "clip_radius": 0.01},
    )  # fmt: skip
    run_axolotl(config, tmp_path, launcher=TORCHRUN_2)
    assert_identical_tensors(load_file(out / "rank1_adapter.safetensors"), load_file(out / "rank0_adapter.safetensors"))
    state = json.loads((out / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    assert state["log_history"][-1]["epoch"] == pytest.approx(STEPS / 27)  # 216 rows, 4 per rank and step: real DDP
    assert_saved_pattern(out, 2 * MODULES)
