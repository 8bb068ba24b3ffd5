"""Calibration inside `axolotl.cli.train` on the tiny model, and the post-hoc command reproducing it."""

from __future__ import annotations

import json
import math

import pytest

from conftest import base_config, color_questions, multiple_choice_config, run_axolotl, run_module, write_jsonl

pytestmark = pytest.mark.slow
METRICS = ("acc", "ece", "mce", "nll", "brier", "entropy", "mutual_info")


@pytest.fixture(scope="module")
def calibrated_run(tiny_model_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("calibration")
    train = write_jsonl(workdir / "train.jsonl", color_questions(80, seed=0))
    val = write_jsonl(workdir / "val.jsonl", color_questions(24, seed=1))
    config = multiple_choice_config(
        tiny_model_dir,
        train,
        workdir / "out",
        test_datasets=[{"path": str(val), "type": "axolotl_blob.multiple_choice", "split": "train"}],
        max_steps=12,
        eval_steps=6,
        save_steps=12,
        calibration={"datasets": [{"path": str(val), "name": "colors"}], "n_bins": 10, "samples": 0},
    )
    run_axolotl(config, workdir)
    return workdir, config


def test_training_logs_calibration_metrics_and_writes_reports(calibrated_run):
    workdir, _ = calibrated_run
    out = workdir / "out"
    history = json.loads((out / "checkpoint-12" / "trainer_state.json").read_text())["log_history"]
    calibration_logs = [entry for entry in history if "eval_ece" in entry]
    assert [entry["step"] for entry in calibration_logs] == [0, 6, 12]
    for entry in calibration_logs:
        assert all(math.isfinite(entry[f"eval_{m}"]) for m in METRICS)
        assert 0 <= entry["eval_ece"] <= entry["eval_mce"] + 1e-12 <= 1 + 1e-12 and 0 <= entry["eval_acc"] <= 1
    report = json.loads((out / "calibration" / "step-12.json").read_text())
    assert report["n_bins"] == 10 and report["n_samples"] == 0 and "max_k p_k" in report["confidence"]
    colors = report["datasets"]["colors"]
    assert colors["n"] == 24 and sum(b["count"] for b in colors["bins"]) == 24 and len(colors["bins"]) == 10
    assert colors["ece"] == pytest.approx(calibration_logs[-1]["eval_ece"])
    png = (out / "calibration" / "colors-step-12.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5_000


def test_post_hoc_evaluation_reproduces_the_final_numbers(calibrated_run, tmp_path):
    workdir, _ = calibrated_run
    out = workdir / "out"
    summary = tmp_path / "summary.json"
    args = [str(workdir / "config.yml"), "--adapter", str(out), "--json", str(summary)]
    result = run_module("axolotl_blob.evaluate", args, workdir)
    assert "calibration (posterior samples N = 0)" in result.stdout
    assert '"base_model"' not in result.stdout  # the report only: no config dump
    posthoc = json.loads(summary.read_text())["colors"]
    final = json.loads((out / "calibration" / "step-12.json").read_text())["datasets"]["colors"]
    for metric in METRICS:
        assert posthoc[metric] == pytest.approx(final[metric], abs=1e-4), metric


def test_token_mode_scores_the_eval_split_with_posterior_samples(tiny_model_dir, completion_data, tmp_path):
    config = base_config(
        tiny_model_dir,
        completion_data,
        tmp_path / "out",
        max_steps=4,
        eval_steps=4,
        save_steps=4,
        calibration={"mode": "tokens", "samples": 3, "plots": False},
    )
    config["blob"]["init_std"] = 0.5  # σ in [0.125, 0.25]: draws that visibly disagree
    run_axolotl(config, tmp_path)
    history = json.loads((tmp_path / "out" / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
    final = [entry for entry in history if "eval_ece" in entry][-1]
    assert final["step"] == 4 and final["eval_mutual_info"] > 1e-6  # draws disagree (B starts at 0, so only a little)
    report = json.loads((tmp_path / "out" / "calibration" / "step-4.json").read_text())
    assert report["mode"] == "tokens" and report["n_samples"] == 3
    assert report["datasets"]["tokens"]["n"] > 100 and not list((tmp_path / "out" / "calibration").glob("*.png"))


def test_without_an_eval_loop_calibration_runs_once_at_the_end(tiny_model_dir, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", color_questions(40, seed=2))
    val = write_jsonl(tmp_path / "val.jsonl", color_questions(12, seed=3))
    config = multiple_choice_config(
        tiny_model_dir,
        train,
        tmp_path / "out",
        max_steps=5,
        save_steps=5,
        eval_steps=None,
        calibration={"datasets": [{"path": str(val)}], "samples": 2},
    )
    run_axolotl(config, tmp_path)
    reports = sorted((tmp_path / "out" / "calibration").glob("step-*.json"))
    assert [p.name for p in reports] == ["step-5.json"]
    report = json.loads(reports[0].read_text())
    assert report["n_samples"] == 2 and report["datasets"]["val"]["n"] == 12
    assert "calibration (posterior samples N = 2)" in (tmp_path / "axolotl.log").read_text()
