"""End to end through `python -m axolotl.cli.train` on a tiny random Llama: train, save, resume, reload, 2 ranks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from axolotl_blob.blob.kl import kl_weight
from conftest import (
    TORCHRUN_2,
    assert_identical_tensors,
    base_config,
    color_questions,
    multiple_choice_config,
    resume_dir,
    run_axolotl,
    run_module,
    write_jsonl,
)

pytestmark = pytest.mark.slow
CYCLE = 5


def blob_config(model_dir, data, out: Path, **overrides) -> dict:
    config = base_config(model_dir, data, out, **overrides)
    config["blob"] = {"eval_samples": 2, "kl_lr": 0.01, "kl_cycle_steps": CYCLE, **overrides.get("blob", {})}
    return config


def saved_tensors(directory: Path) -> dict[str, torch.Tensor]:
    return {**load_file(directory / "adapter_model.safetensors"), **load_file(directory / "blob_posterior.safetensors")}


@pytest.fixture(scope="module")
def trained(tiny_model_dir, completion_data, tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("blob-run")
    run_axolotl(blob_config(tiny_model_dir, completion_data, workdir / "out"), workdir)
    return workdir / "out"


def test_training_logs_kl_and_writes_adapter_and_posterior(trained):
    history = json.loads((trained / "checkpoint-20" / "trainer_state.json").read_text())["log_history"]
    train_logs = [entry for entry in history if "loss" in entry]
    assert len(train_logs) == 20
    for entry in train_logs:
        assert math.isfinite(entry["loss"]) and math.isfinite(entry["kl"]) and entry["kl"] > 0
        assert entry["kl_weight"] == pytest.approx(kl_weight(entry["step"], CYCLE, "reweight"))
    assert [entry["step"] for entry in history if "eval_loss" in entry] == [0, 10, 20]
    for directory in (trained, trained / "checkpoint-10", trained / "checkpoint-20"):
        assert {"adapter_config.json", "adapter_model.safetensors", "blob_posterior.safetensors", "blob_config.json"} <= {
            p.name for p in directory.iterdir()
        }
    assert_identical_tensors(saved_tensors(trained), saved_tensors(trained / "checkpoint-20"))
    assert json.loads((trained / "blob_config.json").read_text()) == {"prior_std": 0.2, "init_std": 0.05, "sigma": "G**2", "noise": "rank_signs", "eval_draws": "per_token"}


def test_the_kl_step_pulls_sigma_from_its_small_init_towards_the_prior(trained):
    """σ starts in [ε²/2, ε²] = [0.00125, 0.0025]; −∂KL/∂σ = 1/σ − σ/β² > 0 there, so σ must grow, below β."""
    history = json.loads((trained / "checkpoint-20" / "trainer_state.json").read_text())["log_history"]
    sigmas = [entry["sigma_mean"] for entry in history if "sigma_mean" in entry]
    assert 0.00125 < sigmas[0] < 0.0025
    assert sigmas[0] < sigmas[-1] < 0.2


def test_resume_from_checkpoint_matches_the_uninterrupted_run(trained, tiny_model_dir, completion_data, tmp_path):
    out = resume_dir(trained, "checkpoint-10", tmp_path)
    config = blob_config(tiny_model_dir, completion_data, out, resume_from_checkpoint=str(out / "checkpoint-10"))
    run_axolotl(config, tmp_path)
    assert_identical_tensors(saved_tensors(out), saved_tensors(trained))


def test_plain_peft_loads_the_result_as_the_posterior_mean(trained, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from axolotl_blob.blob.model import bayesianize, load_posterior

    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), trained).eval()
    blob = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), trained).eval()
    bayesianize(blob, init_std=0.05)
    load_posterior(blob, trained)
    ids = torch.tensor([[1, 5, 9, 12, 20, 7]])
    torch.testing.assert_close(blob(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=0, atol=0)
    assert not any("blob" in name for name, _ in plain.named_parameters())


def test_continue_training_from_lora_model_dir_restores_the_posterior(trained, tiny_model_dir, completion_data, tmp_path):
    config = blob_config(
        tiny_model_dir, completion_data, tmp_path / "out", lora_model_dir=str(trained), max_steps=2, eval_steps=0
    )
    config["blob"]["kl_lr"] = 0.0
    config["learning_rate"] = 0.0
    run_axolotl(config, tmp_path)
    log = (tmp_path / "axolotl.log").read_text()
    assert f"restored the posterior of 4 layers from {trained}" in log
    continued, original = load_file(tmp_path / "out" / "blob_posterior.safetensors"), load_file(trained / "blob_posterior.safetensors")
    assert_identical_tensors(continued, original)


def test_two_processes_end_with_identical_adapters(tiny_model_dir, completion_data, tmp_path):
    config = blob_config(
        tiny_model_dir,
        completion_data,
        tmp_path / "out",
        max_steps=6,
        save_steps=6,
        eval_steps=3,
        ddp_backend="gloo",
        plugins=["axolotl_blob.BlobPlugin", "probe.ProbePlugin"],
    )
    run_axolotl(config, tmp_path, launcher=TORCHRUN_2)
    rank0 = load_file(tmp_path / "out" / "rank0_adapter.safetensors")
    rank1 = load_file(tmp_path / "out" / "rank1_adapter.safetensors")
    assert any("blob_G" in key for key in rank0)
    assert_identical_tensors(rank1, rank0)
    history = json.loads((tmp_path / "out" / "checkpoint-6" / "trainer_state.json").read_text())["log_history"]
    assert all(math.isfinite(entry["kl"]) for entry in history if "loss" in entry)
    assert [entry["step"] for entry in history if "eval_loss" in entry] == [0, 3, 6]
    # 216 training rows, 4 per rank and step: with real DDP an epoch is 27 steps (54 if ranks ran alone)
    assert history[-1]["epoch"] == pytest.approx(6 / 27)


@pytest.mark.parametrize("quantization, layer", [("load_in_8bit", "Linear8bitLt"), ("load_in_4bit", "Linear4bit")])
def test_quantized_base_is_loaded_like_adapter_lora(quantization, layer, tiny_model_dir, completion_data, tmp_path):
    config = blob_config(
        tiny_model_dir,
        completion_data,
        tmp_path / "out",
        **{quantization: True},
        max_steps=4,
        eval_steps=2,
        save_steps=4,
        plugins=["axolotl_blob.BlobPlugin", "probe.ProbePlugin"],
    )
    run_axolotl(config, tmp_path)
    assert json.loads((tmp_path / "out" / "probe_layers.json").read_text()) == [layer]
    assert "converting PEFT model w/ prepare_model_for_kbit_training" in (tmp_path / "axolotl.log").read_text()
    history = json.loads((tmp_path / "out" / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
    assert all(math.isfinite(entry["loss"]) and entry["kl"] > 0 for entry in history if "loss" in entry)
    assert (tmp_path / "out" / "blob_posterior.safetensors").is_file()


def test_axolotl_merge_lora_merges_the_posterior_mean(trained, tiny_model_dir, tmp_path):
    import yaml
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = yaml.safe_load((trained.parent / "config.yml").read_text())
    config["output_dir"] = str(tmp_path / "merge-out")
    (tmp_path / "config.yml").write_text(yaml.safe_dump(config))
    run_module("axolotl.cli.merge_lora", [str(tmp_path / "config.yml"), f"--lora_model_dir={trained}"], tmp_path)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merge-out" / "merged").eval()
    mean = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), trained).eval()
    ids = torch.tensor([[1, 5, 9, 12, 20, 7]])
    torch.testing.assert_close(merged(input_ids=ids).logits, mean(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_gradient_accumulation_2_equals_accumulation_1_on_the_doubled_batch(tiny_model_dir, tmp_path):
    """The reference σ update steps G on the gradient the Trainer accumulated. Axolotl 0.19 scales each micro-batch's
    mean loss by 1/accumulation steps, so 2 micro-batches of 4 give the update of one batch of 8 when every example
    has as many supervised tokens: multiple-choice data (one answer letter each), fp32. The KL weight is ~0 here
    (uniform over 10⁹ steps) so G moves by its NLL gradient alone, with fixed noise (tests/helpers/fixed_noise.py)
    so both runs see the same draws."""
    train = write_jsonl(tmp_path / "questions.jsonl", color_questions(64, seed=5))
    runs = {}
    for micro_batch, accumulation in ((8, 1), (4, 2)):
        out = tmp_path / f"mb{micro_batch}"
        out.mkdir()
        config = multiple_choice_config(
            tiny_model_dir, train, out / "out", micro_batch_size=micro_batch, gradient_accumulation_steps=accumulation,
            max_steps=4, save_steps=4, eval_steps=0, learning_rate=0.01, bf16=False, fp16=False,
            plugins=["axolotl_blob.BlobPlugin", "probe.ProbePlugin", "fixed_noise.FixedNoisePlugin"],
            blob={"init_std": 0.5, "kl_lr": 0.5, "kl_weighting": "uniform", "kl_cycle_steps": 10**9},
        )  # fmt: skip
        run_axolotl(config, out)
        runs[micro_batch] = out / "out"
    final = {mb: load_file(out / "rank0_adapter.safetensors") for mb, out in runs.items()}
    assert final[8].keys() == final[4].keys() and any("blob_G" in key for key in final[8])
    for key in final[8]:
        torch.testing.assert_close(final[4][key], final[8][key], rtol=1e-5, atol=1e-6, msg=key)
    initial = load_file(runs[8] / "rank0_initial_adapter.safetensors")
    moved = max((final[8][k] - initial[k]).abs().max().item() for k in initial if "blob_G" in k)
    assert moved > 1e-3  # G's NLL step is far above the tolerance: a factor 2 in its scaling would show


def test_a_diverging_sigma_update_stops_training_with_the_setting_to_change(tiny_model_dir, completion_data, tmp_path):
    config = blob_config(
        tiny_model_dir, completion_data, tmp_path / "out", max_steps=3, eval_steps=0, save_steps=3,
        blob={"kl_lr": 1.0e38, "kl_cycle_steps": 1},
    )  # fmt: skip
    result = run_axolotl(config, tmp_path, expect_success=False)
    assert "holds NaN or inf after optimizer step 2" in result.stderr  # step 1 is the warm-up's lr 0
    assert "Lower blob.kl_lr (now 1e+38)" in result.stderr
