"""End to end on the tiny model: a plain LoRA trained by Axolotl, Bayesianized by TFB, evaluated, predicted with,
continued as `lora_model_dir`; IVON predicts from a checkpoint's optimizer state; bad inputs fail clearly."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors import safe_open

from axolotl_blob.saved_adapter import check_lora_adapter
from conftest import color_questions, multiple_choice_config, run_axolotl, run_module, write_jsonl

pytestmark = pytest.mark.slow


def animal_questions(n: int, seed: int) -> list[dict]:
    """Out of distribution for a model trained on colour questions: the same four-choice format, another question."""
    return [{**q, "question": "Which word names the brightest thing in the sky?"} for q in color_questions(n, seed)]


def lora_config(model_dir, workdir, **overrides):
    train = write_jsonl(workdir / "train.jsonl", color_questions(48, seed=0))
    val = write_jsonl(workdir / "val.jsonl", color_questions(16, seed=1))
    ood = write_jsonl(workdir / "ood.jsonl", animal_questions(12, seed=2))
    datasets = [{"path": str(val), "name": "colors"}, {"path": str(ood), "name": "sky", "ood": True}]
    settings = {
        "adapter": "lora", "max_steps": 8, "save_steps": 8, "eval_steps": None,
        "calibration": {"datasets": datasets, "samples": 0},
        **overrides,
    }  # fmt: skip
    config = multiple_choice_config(model_dir, train, workdir / "out", **settings)
    if config["adapter"] != "blob":
        config.pop("blob")
    return config


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("tfb")
    run_axolotl(lora_config(tiny_model_dir, workdir), workdir)
    return workdir


@pytest.fixture(scope="module")
def tfb_adapter(lora_run):
    out = lora_run / "tfb"
    args = [str(lora_run / "config.yml"), "--adapter", str(lora_run / "out"), "--out", str(out), "--samples", "4", "--anchors", "32"]
    result = run_module("axolotl_blob.bayesianize", args, lora_run, log="bayesianize.log")
    assert "TFB: σ_q = " in result.stdout
    return out


def evaluate(workdir, adapter, samples, name, *flags):
    args = [str(workdir / "config.yml"), "--adapter", str(adapter), "--samples", str(samples), "--json", f"{name}.json", *flags]
    run_module("axolotl_blob.evaluate", args, workdir, log=f"{name}.log")
    return json.loads((workdir / f"{name}.json").read_text())["colors"]


def test_training_reports_selective_prediction_and_ood_auroc(lora_run):
    calibration = lora_run / "out" / "calibration"
    report = json.loads((calibration / "step-8.json").read_text())["datasets"]
    assert report["sky"]["ood"] is True and report["sky"]["n"] == 12 and "ood" not in report["colors"]
    assert report["sky"]["ood_auroc_by_mutual_info"] == 0.5  # a point estimate has no epistemic uncertainty
    assert 0 <= report["sky"]["ood_auroc_by_confidence"] <= 1
    curves = report["colors"]["risk_coverage"]
    assert curves["coverage"][-1] == 1.0 and curves["risk_by_confidence"][-1] == pytest.approx(1 - report["colors"]["acc"])
    assert 0 <= report["colors"]["aurc_by_confidence"] <= 1
    for png in ("colors-step-8-risk-coverage.png", "colors-step-8.png", "sky-step-8-risk-coverage.png"):
        assert (calibration / png).read_bytes().startswith(b"\x89PNG")
    table = (lora_run / "axolotl.log").read_text().split("out-of-distribution detection")[1]
    assert f"{report['sky']['ood_auroc_by_confidence']:.4f}" in table.splitlines()[2]


def test_tfb_writes_a_blob_adapter_with_the_same_mean_model(lora_run, tfb_adapter):
    record = json.loads((tfb_adapter / "tfb.json").read_text())
    assert 1e-3 <= record["sigma_q"] <= 0.015 and record["anchors"] == 32 and record["layers"] == 4
    passing = [s["sigma_q"] for s in record["search"] if s["change"] <= record["tolerance"]]
    assert record["sigma_q"] == max(passing) and len(record["search"]) in (1, 6, 7)
    assert record["eval_draws"] == "per_token" == json.loads((tfb_adapter / "blob_config.json").read_text())["eval_draws"]
    with safe_open(str(tfb_adapter / "adapter_model.safetensors"), framework="pt") as f:
        assert all(".lora_A." in k or ".lora_B." in k for k in f.keys()) and len(list(f.keys())) == 8
    assert (tfb_adapter / "blob_posterior.safetensors").is_file() and (tfb_adapter / "blob_config.json").is_file()
    lora_mean, tfb_mean = evaluate(lora_run, lora_run / "out", 0, "lora"), evaluate(lora_run, tfb_adapter, 0, "tfb0")
    for metric in ("acc", "nll", "ece", "brier", "aurc_by_confidence"):
        assert tfb_mean[metric] == pytest.approx(lora_mean[metric], abs=1e-4), metric
    sampled = evaluate(lora_run, tfb_adapter, 4, "tfb4")
    assert sampled["n_samples"] == 4 and sampled["mutual_info"] > 0 and lora_mean["mutual_info"] == 0
    assert {"acc_cov80_by_confidence", "acc_cov90_by_mutual_info", "aurc_by_mutual_info"} <= sampled.keys()


def test_the_reference_rule_and_the_draws_reach_the_search_the_posterior_and_evaluate(lora_run):
    out = lora_run / "tfb-reference"
    args = [str(lora_run / "config.yml"), "--adapter", str(lora_run / "out"), "--out", str(out), "--samples", "4",
            "--anchors", "32", "--metric", "nll_reference", "--draws", "whole_weights"]  # fmt: skip
    run_module("axolotl_blob.bayesianize", args, lora_run, log="bayesianize-reference.log")
    record = json.loads((out / "tfb.json").read_text())
    sigmas = [step["sigma_q"] for step in record["search"]]
    assert record["tolerance"] == 0.003 and len(sigmas) == 5 and sigmas[0] == pytest.approx(0.008)  # (0.001 + 0.015) / 2
    over = [step["sigma_q"] for step in record["search"] if step["change"] > record["tolerance"]]
    assert record["sigma_q"] == pytest.approx(min(over, default=0.015))  # the top of the final bracket
    assert record["eval_draws"] == "whole_weights" == json.loads((out / "blob_config.json").read_text())["eval_draws"]
    saved, per_token = evaluate(lora_run, out, 4, "ref-saved"), evaluate(lora_run, out, 4, "ref-per-token", "--draws", "per_token")
    assert saved["eval_draws"] == "whole_weights" and per_token["eval_draws"] == "per_token"
    assert saved["nll"] != per_token["nll"]  # the same seed, other draws


def test_predict_with_the_tfb_adapter_writes_one_line_per_question(lora_run, tfb_adapter):
    questions = write_jsonl(lora_run / "questions.jsonl", [{k: v for k, v in q.items() if k != "answer"} for q in color_questions(11, seed=4)])
    args = [str(lora_run / "config.yml"), "--adapter", str(tfb_adapter), "--input", str(questions), "--samples", "3",
            "--abstain-below", "0.3", "--output", str(lora_run / "predictions.jsonl"), "--batch-size", "4"]  # fmt: skip
    result = run_module("axolotl_blob.predict", args, lora_run, log="predict.log")
    lines = [json.loads(line) for line in (lora_run / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 11 and "11 questions, N = 3" in result.stderr
    for line in lines:
        assert sum(line["probabilities"]) == pytest.approx(1.0) and line["probability"] == max(line["probabilities"])
        assert line["abstained"] == (line["probability"] < 0.3) and line["mutual_info"] >= 0 and "correct" not in line
    assert any(line["mutual_info"] > 0 for line in lines)


def test_tfb_output_continues_training_as_lora_model_dir(tiny_model_dir, lora_run, tfb_adapter, tmp_path):
    config = lora_config(tiny_model_dir, tmp_path, adapter="blob", lora_model_dir=str(tfb_adapter), max_steps=2, save_steps=2)
    run_axolotl(config, tmp_path)
    assert "BLoB: restored the posterior of 4 layers" in (tmp_path / "axolotl.log").read_text()


def test_ivon_predicts_from_its_checkpoint_and_says_why_not_without_one(tiny_model_dir, tmp_path):
    config = lora_config(tiny_model_dir, tmp_path, optimizer="ivon", bf16=False, learning_rate=0.05, ivon={"ess": 1000.0})
    run_axolotl(config, tmp_path)
    questions = write_jsonl(tmp_path / "questions.jsonl", color_questions(6, seed=5))
    base = [str(tmp_path / "config.yml"), "--input", str(questions)]
    sampled = run_module("axolotl_blob.predict", [*base, "--adapter", str(tmp_path / "out" / "checkpoint-8"), "--samples", "3"], tmp_path)
    lines = [json.loads(line) for line in sampled.stdout.splitlines()]
    assert len(lines) == 6 and any(line["mutual_info"] > 0 for line in lines) and "N = 3" in sampled.stderr
    mean = run_module("axolotl_blob.predict", [*base, "--adapter", str(tmp_path / "out")], tmp_path)
    assert "has no optimizer.pt" in mean.stderr and "N = 0" in mean.stderr
    refused = run_module("axolotl_blob.predict", [*base, "--adapter", str(tmp_path / "out"), "--samples", "2"], tmp_path, expect_success=False)
    assert "IVON's posterior lives" in refused.stderr


def test_bad_inputs_fail_with_the_file_and_line_before_weights_load(tiny_model_dir, lora_run, tmp_path):
    config = str(lora_run / "config.yml")
    bad = write_jsonl(tmp_path / "questions.jsonl", [{"question": "q?", "choices": ["a", "b"]}, {"question": "no choices"}])
    result = run_module("axolotl_blob.predict", [config, "--adapter", str(lora_run / "out"), "--input", str(bad)], tmp_path, expect_success=False)
    assert f"{bad}:2: missing field 'choices'" in result.stderr
    missing = tmp_path / "nowhere"
    result = run_module("axolotl_blob.bayesianize", [config, "--adapter", str(missing), "--out", str(tmp_path / "x")], tmp_path, expect_success=False)
    assert f"--adapter {missing}: no such directory" in result.stderr
    with pytest.raises(FileNotFoundError, match="no adapter_config.json .it holds a full model"):
        check_lora_adapter(tiny_model_dir, str(tiny_model_dir))
    not_lora = shutil.copytree(lora_run / "out", tmp_path / "ia3", ignore=shutil.ignore_patterns("checkpoint-*"))
    adapter_config = json.loads((not_lora / "adapter_config.json").read_text())
    (not_lora / "adapter_config.json").write_text(json.dumps({**adapter_config, "peft_type": "IA3"}))
    with pytest.raises(ValueError, match=r"ia3/adapter_config.json: peft_type is 'IA3', not 'LORA'"):
        check_lora_adapter(not_lora, str(tiny_model_dir))


def test_an_adapter_of_another_base_model_is_named_as_such(lora_run, tmp_path):
    import torch
    from transformers import AutoConfig, LlamaForCausalLM

    config = AutoConfig.from_pretrained(json.loads((lora_run / "out" / "adapter_config.json").read_text())["base_model_name_or_path"])
    config.hidden_size, config.intermediate_size = 32, 64
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "narrow")
    with pytest.raises(ValueError, match=r"adapter_model.safetensors: '.*q_proj.lora_A.weight' has shape \[4, 64\], but '.*q_proj' of base model .*narrow is 32 → 64: the adapter was trained on another model"):
        check_lora_adapter(lora_run / "out", str(tmp_path / "narrow"))
