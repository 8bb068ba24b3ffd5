"""Selective prediction (risk–coverage, AURC) and OOD AUROC against hand computations and torchmetrics; the
per-example records gathered across two processes give the single-process numbers."""

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torchmetrics.classification import BinaryAUROC

from axolotl_blob.args import CalibrationSettings
from axolotl_blob.calibration.evaluator import CalibrationEvaluator
from axolotl_blob.calibration.metrics import CalibrationState
from axolotl_blob.calibration.ood import auroc, ood_metrics
from axolotl_blob.calibration.report import format_table
from axolotl_blob.calibration.scoring import synchronize_state
from axolotl_blob.calibration.selective import accuracy_at_coverage, aurc, risk_coverage
from axolotl_blob.sampling import BlobSampler
from conftest import color_questions, tiny_blob_model, write_jsonl


def test_aurc_equals_a_hand_computation():
    scores = torch.tensor([0.6, 0.9, 0.7, 0.8])  # ranked: 0.9 (right), 0.8 (wrong), 0.7 (right), 0.6 (wrong)
    correct = torch.tensor([0, 1, 1, 0])
    coverage, risk = risk_coverage(scores, correct)
    assert coverage.tolist() == [0.25, 0.5, 0.75, 1.0]
    assert risk.tolist() == pytest.approx([0, 1 / 2, 1 / 3, 2 / 4])
    assert aurc(scores, correct) == pytest.approx((0 + 1 / 2 + 1 / 3 + 1 / 2) / 4)
    assert accuracy_at_coverage(scores, correct, 0.5) == pytest.approx(0.5)
    assert accuracy_at_coverage(scores, correct, 0.8) == pytest.approx(1 - 2 / 4)  # ⌈0.8·4⌉ = 4 kept


def test_ties_count_as_their_expected_value_over_random_orders():
    scores, correct = torch.tensor([0.9, 0.9, 0.5]), torch.tensor([1, 0, 1])
    # k = 1: half an error expected; k = 2: one error; k = 3: one error
    assert risk_coverage(scores, correct)[1].tolist() == pytest.approx([0.5, 0.5, 1 / 3])
    assert aurc(scores, correct) == pytest.approx((0.5 + 0.5 + 1 / 3) / 3)
    # a constant score (the mutual information of a point estimate) is abstaining at random: the error rate
    generator = torch.Generator().manual_seed(0)
    correct = (torch.rand(200, generator=generator) < 0.7).long()
    assert aurc(torch.zeros(200), correct) == pytest.approx(1 - correct.double().mean().item())


def test_accuracy_at_80_and_90_percent_coverage_keeps_the_most_confident():
    confidence = torch.linspace(0.5, 1.0, 10)  # the two least confident are the only errors
    correct = torch.tensor([0, 0, 1, 1, 1, 1, 1, 1, 1, 1])
    state = CalibrationState(10)
    probs = torch.stack([confidence, 1 - confidence], dim=1)
    state.update(probs, 1 - correct)  # label 0 where correct
    metrics = state.compute()
    assert metrics["acc_cov80_by_confidence"] == 1.0
    assert metrics["acc_cov90_by_confidence"] == pytest.approx(8 / 9)
    assert metrics["acc"] == pytest.approx(0.8)
    assert metrics["aurc_by_mutual_info"] == pytest.approx(0.2)  # no draws: MI is 0 everywhere


def test_auroc_equals_torchmetrics_on_crafted_scores_with_ties():
    generator = torch.Generator().manual_seed(1)
    in_distribution = torch.randint(0, 6, (40,), generator=generator).double() / 5
    out_of_distribution = torch.randint(2, 8, (25,), generator=generator).double() / 5
    expected = BinaryAUROC()(
        torch.cat([in_distribution, out_of_distribution]).float(),
        torch.cat([torch.zeros(40), torch.ones(25)]).long(),
    ).item()
    assert auroc(in_distribution, out_of_distribution) == pytest.approx(expected, abs=1e-6)
    # by hand: P(ood > id) + ½ P(ood = id)
    pairs = out_of_distribution[:, None] - in_distribution[None, :]
    assert auroc(in_distribution, out_of_distribution) == pytest.approx(
        ((pairs > 0).double().mean() + 0.5 * (pairs == 0).double().mean()).item()
    )
    assert auroc(torch.tensor([0.1, 0.2]), torch.tensor([0.3, 0.4])) == 1.0


def test_ood_scores_are_oriented_so_that_uncertain_means_ood():
    confident = {"confidence": torch.tensor([0.99, 0.95]), "entropy": torch.tensor([0.05, 0.2]), "mutual_info": torch.tensor([0.0, 0.01])}
    unsure = {"confidence": torch.tensor([0.55, 0.6]), "entropy": torch.tensor([0.68, 0.67]), "mutual_info": torch.tensor([0.1, 0.2])}
    assert ood_metrics(confident, unsure) == {
        "ood_auroc_by_confidence": 1.0, "ood_auroc_by_entropy": 1.0, "ood_auroc_by_mutual_info": 1.0
    }  # fmt: skip


def random_state_inputs(n: int = 37, k: int = 3):
    generator = torch.Generator().manual_seed(2)
    draws = torch.softmax(torch.randn(4, n, k, generator=generator) * 2, dim=-1)
    from axolotl_blob.calibration.metrics import entropy

    return draws.mean(0), torch.randint(0, k, (n,), generator=generator), entropy(draws).mean(0)


def _two_process_worker(rank: int, init_file: str, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    probs, labels, draw_entropy = random_state_inputs()
    state = CalibrationState(10)
    positions = torch.arange(rank, len(labels), 2)  # the shard ChoiceScoring.calibration_state gives this rank, in two updates
    for chunk in (positions[:5], positions[5:]):
        state.update(probs[chunk], labels[chunk], draw_entropy[chunk], indices=chunk)
    synchronize_state(state)
    results[rank] = (state.compute(), state.records)
    dist.destroy_process_group()


def test_two_processes_gather_the_records_into_the_single_process_numbers(tmp_path):
    probs, labels, draw_entropy = random_state_inputs()
    single = CalibrationState(10)
    single.update(probs, labels, draw_entropy)
    results = mp.Manager().dict()
    mp.spawn(_two_process_worker, args=(str(tmp_path / "init"), results), nprocs=2)
    for rank in (0, 1):
        metrics, records = results[rank]
        torch.testing.assert_close(records, single.records, rtol=0, atol=0)
        assert metrics == pytest.approx(single.compute(), abs=1e-12)
    assert math.isfinite(single.compute()["aurc_by_mutual_info"])


def test_ood_dataset_must_use_the_in_distribution_label_set(tmp_path):
    val = write_jsonl(tmp_path / "val.jsonl", color_questions(4, seed=0))  # 4 choices
    binary = write_jsonl(tmp_path / "binary.jsonl", [{"question": "q?", "choices": ["no", "yes"], "answer": 1}])
    eight = [{"question": "q?", "choices": [str(i) for i in range(8)], "answer": 0}]
    with pytest.raises(ValueError, match=r"OOD file '.*eight.jsonl' has questions with \[8\] choices, the in-distribution datasets only \[4\]"):
        CalibrationSettings(datasets=[{"path": str(val)}, {"path": str(write_jsonl(tmp_path / "eight.jsonl", eight)), "ood": True}])
    with pytest.raises(ValueError, match="every dataset is 'ood: true'"):
        CalibrationSettings(datasets=[{"path": str(binary), "ood": True}])
    with pytest.raises(ValueError, match=r"unknown key 'calibration.datasets\[\].odd'. Did you mean 'calibration.datasets\[\].ood'"):
        CalibrationSettings(datasets=[{"path": str(val), "odd": True}])
    with pytest.raises(ValueError, match=r"has questions with \[2\] choices"):  # max p over 2 is not over 4
        CalibrationSettings(datasets=[{"path": str(val)}, {"path": str(binary), "ood": True}])
    CalibrationSettings(datasets=[{"path": str(val)}, {"path": str(other_colors(tmp_path)), "ood": True}])


def other_colors(tmp_path):
    return write_jsonl(tmp_path / "colors2.jsonl", color_questions(3, seed=5))


def test_evaluator_reports_ood_auroc_from_the_scored_records(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    val = write_jsonl(tmp_path / "val.jsonl", color_questions(10, seed=0))
    other = write_jsonl(tmp_path / "other.jsonl", color_questions(6, seed=1))
    settings = CalibrationSettings(datasets=[{"path": str(val)}, {"path": str(other), "name": "shifted", "ood": True}])
    model, tokenizer = tiny_blob_model(tiny_model_dir, init_std=0.3).eval(), AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    reports = CalibrationEvaluator(settings, n_samples=3).evaluate(model, tokenizer, BlobSampler(model))
    assert "ood" not in reports["val"] and reports["shifted"]["ood"] is True
    assert 0 <= reports["shifted"]["ood_auroc_by_mutual_info"] <= 1
    assert {"aurc_by_confidence", "acc_cov90_by_mutual_info"} <= reports["val"].keys()
    assert len(reports["val"]["risk_coverage"]["risk_by_confidence"]) == 50
    table = format_table(reports)
    assert "out-of-distribution detection" in table and "shifted" in table.split("out-of-distribution")[1]
    logged = CalibrationEvaluator(settings, 3).metric_names(reports)
    assert "eval_shifted_ood_auroc_by_entropy" in logged and "eval_val_aurc_by_confidence" in logged
    assert all(isinstance(v, float | int) for v in logged.values())
