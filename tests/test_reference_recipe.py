"""example_configs/blob-reference-recipe.yml trains through `axolotl.cli.train` on the tiny model with every key it
ships; only the model, the data paths, the outputs (a checkpoint at the end, for its Trainer state) and the length of
the run are swapped."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from conftest import color_questions, run_axolotl, write_jsonl

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "example_configs" / "blob-reference-recipe.yml"
STEPS = 17  # 10 steps per epoch of 40 questions, num_epochs 40: Axolotl's warm-up is int(0.06 * 17) = 1, made 2
WARMUP = 2


@pytest.fixture(scope="module")
def recipe_run(tiny_model_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("recipe")
    train = write_jsonl(workdir / "train.jsonl", color_questions(40, seed=0))
    test = write_jsonl(workdir / "test.jsonl", color_questions(12, seed=1))
    config = yaml.safe_load(RECIPE.read_text())
    config.update(
        base_model=str(tiny_model_dir),
        datasets=[{**config["datasets"][0], "path": str(train)}],
        dataset_prepared_path=str(workdir / "prepared"),
        output_dir=str(workdir / "out"),
        max_steps=STEPS,
        logging_steps=1,
        save_strategy="steps",
        save_steps=STEPS,
        bf16=False,  # fp32 on the tiny model: exact comparisons below
    )
    config["calibration"] = {**config["calibration"], "datasets": [{"path": str(test), "name": "colors"}], "plots": False}
    config["blob"] = {**config["blob"], "eval_samples": 2}
    run_axolotl(config, workdir)
    return workdir, config


def test_the_recipe_reaches_the_trainer(recipe_run):
    import torch

    workdir, _ = recipe_run
    args = torch.load(workdir / "out" / f"checkpoint-{STEPS}" / "training_args.bin", weights_only=False)
    assert args.max_grad_norm == 0 and args.adam_epsilon == 1e-6 and args.weight_decay == 0
    assert args.learning_rate == 1e-4 and str(args.lr_scheduler_type) in ("linear", "SchedulerType.LINEAR")
    assert args.warmup_steps == WARMUP and args.per_device_train_batch_size == 4 and args.gradient_accumulation_steps == 1
    assert args.curriculum_sampling is True  # Axolotl's sequential sampler: no shuffling
    log = (workdir / "axolotl.log").read_text()
    assert "training on the 4-way cross-entropy over the answer-letter tokens" in log


def test_the_learning_rate_warms_up_over_6_percent_then_decays_linearly(recipe_run):
    workdir, _ = recipe_run
    history = json.loads((workdir / "out" / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())["log_history"]
    logged = [entry["learning_rate"] for entry in history if "loss" in entry]

    def rate(step: int) -> float:  # the reference's schedule: linear warm-up to 1e-4, linear decay to 0 at the end
        return 1e-4 * (step / WARMUP if step < WARMUP else (STEPS - step) / (STEPS - WARMUP))

    assert logged == pytest.approx([rate(step) for step in range(STEPS)])  # each step logs the rate it used


def test_blob_on_lm_head_and_attention_is_saved_and_scored(recipe_run):
    from safetensors.torch import load_file

    workdir, _ = recipe_run
    out = workdir / "out"
    posterior = load_file(out / "blob_posterior.safetensors")
    assert {name.split(".blob_G")[0].rsplit(".", 1)[-1] for name in posterior if "blob_G" in name} == {"q_proj", "v_proj", "lm_head"}
    report = json.loads((out / "calibration" / f"step-{STEPS}.json").read_text())
    assert report["n_samples"] == 2 and report["datasets"]["colors"]["n"] == 12
    assert all(math.isfinite(report["datasets"]["colors"][metric]) for metric in ("acc", "ece", "nll"))
