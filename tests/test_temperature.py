"""Temperature scaling of each posterior draw's choice logits: the fit, the saved file, and where it applies
(the calibration block, evaluate, predict)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from types import SimpleNamespace

import pytest
import torch
import yaml

from axolotl_blob.args import CalibrationSettings
from axolotl_blob.calibration.evaluator import CalibrationEvaluator
from axolotl_blob.calibration.scoring import ChoiceScoring
from axolotl_blob.calibration.temperature import FittedTemperature, fit_temperature
from axolotl_blob.calibration.temperature_file import (
    TEMPERATURE_FILE,
    read_temperature,
    temperature_flag,
    write_temperature,
)
from axolotl_blob.multiple_choice import read_examples
from axolotl_blob.sampling import BlobSampler, DeterministicSampler
from conftest import color_questions, multiple_choice_config, run_axolotl, run_module, tiny_blob_model, write_jsonl


def calibrated_rows(probabilities: list[float], counts: list[int], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """sum(counts) questions sharing `probabilities` whose answers occur exactly as often as those say: log
    probabilities (−inf beyond the question's choices, up to `width`) and answers."""
    log_p = torch.full((width,), float("-inf"), dtype=torch.float64)
    log_p[: len(probabilities)] = torch.tensor(probabilities, dtype=torch.float64).log()
    answers = torch.tensor([k for k, count in enumerate(counts) for _ in range(count)])
    return log_p.expand(len(answers), width), answers


def per_draw_nll(draws: torch.Tensor, answers: torch.Tensor, t: float) -> float:
    """The reference: −mean log of the averaged probabilities (1/N) Σ_n softmax(s_n / T), written out."""
    probs = sum(torch.softmax(draw / t, dim=-1) for draw in draws) / len(draws)
    return -probs[torch.arange(len(answers)), answers].log().mean().item()


def grid_argmin(nll, low: float = 0.05, high: float = 20.0, points: int = 200_001) -> float:
    grid = torch.logspace(math.log10(low), math.log10(high), points, dtype=torch.float64)
    return grid[int(torch.tensor([nll(t) for t in grid.tolist()], dtype=torch.float64).argmin())].item()


def test_one_draw_recovers_the_multiple_of_calibrated_logits():
    """Answers drawn exactly as often as p says: softmax(c log p / T) equals their frequencies at T = c only, where
    the NLL reaches its lower bound, the frequencies' entropy. A question with 2 of 3 choices (−inf) included."""
    three, three_answers = calibrated_rows([0.5, 0.3, 0.2], [5, 3, 2], 3)
    two, two_answers = calibrated_rows([0.75, 0.25], [3, 1], 3)
    log_p, answers = torch.cat([three, two]), torch.cat([three_answers, two_answers])
    shift = torch.linspace(-3, 3, len(answers), dtype=torch.float64)[:, None]  # a per-question constant cancels
    assert fit_temperature((2.5 * log_p + shift)[None], answers) == pytest.approx(2.5, rel=1e-6)
    assert fit_temperature((0.4 * log_p)[None], answers) == pytest.approx(0.4, rel=1e-6)
    assert fit_temperature((2.5 * log_p).expand(3, -1, -1), answers) == pytest.approx(2.5, rel=1e-6)  # 3 equal draws


def test_two_draws_are_scaled_before_the_average_not_after():
    """Draws p_1 = (0.9, 0.1), p_2 = (0.5, 0.5) average to (0.7, 0.3), the answers' frequencies: with logits
    c log p_n the per-draw T is c. Temperature scaling of the averaged probabilities finds another T: the average of
    the c-sharpened draws is (0.748, 0.252), whose log-odds shrink to ln(7/3) at T' = 1.284."""
    c = 2.5
    p = torch.tensor([[0.9, 0.1], [0.5, 0.5]], dtype=torch.float64)
    answers = torch.tensor([0] * 7 + [1] * 3)
    draws = (c * p.log())[:, None, :].expand(2, len(answers), 2)
    fitted = fit_temperature(draws, answers)
    assert fitted == pytest.approx(c, rel=1e-6)
    assert fitted == pytest.approx(grid_argmin(lambda t: per_draw_nll(draws, answers, t)), rel=1e-4)
    averaged = torch.softmax(draws, dim=-1).mean(0).log()
    after_average = fit_temperature(averaged[None], answers)
    log_odds = (averaged[0, 0] - averaged[0, 1]).item()
    assert after_average == pytest.approx(log_odds / math.log(7 / 3), rel=1e-6) and after_average == pytest.approx(1.284, abs=1e-3)


def test_two_uneven_draws_fit_the_grid_minimum_of_the_averaged_nll():
    """A hand-made 2-draw case with no closed form: the fit is the NLL's minimum on a fine grid, and differs from
    the fit of the averaged probabilities."""
    draws = torch.tensor(
        [
            [[3.0, 0.0, -1.0], [0.5, 2.0, 0.0], [1.0, 1.0, -2.0], [-1.0, 0.0, 4.0], [2.0, -1.0, float("-inf")]],
            [[0.0, 2.5, -1.0], [1.5, 1.0, 0.0], [4.0, 0.0, 0.0], [0.0, 0.5, 1.0], [-1.0, 1.0, float("-inf")]],
        ],
        dtype=torch.float64,
    ).log_softmax(-1)
    answers = torch.tensor([0, 1, 0, 2, 1])
    fitted = fit_temperature(draws, answers)
    assert fitted == pytest.approx(grid_argmin(lambda t: per_draw_nll(draws, answers, t)), rel=1e-4)
    after_average = fit_temperature(torch.softmax(draws, -1).mean(0).log()[None], answers)
    assert abs(math.log(fitted / after_average)) > 0.2


def test_fit_refuses_tensors_that_are_not_draws_by_examples_by_choices():
    with pytest.raises(ValueError, match=r"\(N draws, n examples, K\)"):
        fit_temperature(torch.zeros(4, 3), torch.zeros(4))


def test_ranks_score_their_shards_and_every_rank_gets_all_examples_in_order(monkeypatch):
    """Two ranks simulated: rank 0 scores questions 0, 2, 4 (2 choices each), rank 1 questions 1, 3 (3 and 2
    choices); the gathered rows, padded to 3 choices and put back in order, are what one process computes."""
    from axolotl_blob.calibration import temperature

    examples = [{"question": str(i), "choices": ["x"] * k, "answer": 0} for i, k in enumerate([2, 3, 2, 2, 2])]

    class TwoDrawScoring:  # stands in for ChoiceScoring: question q's draw n scores choice k as k·(q + n)
        n_samples = 2
        sampler = SimpleNamespace(samples_used=lambda n_samples: n_samples)

        def ordered_draw_log_probs(self, shard):
            out = torch.full((2, len(shard), max(len(e["choices"]) for e in shard)), float("-inf"), dtype=torch.float64)
            for i, example in enumerate(shard):
                for n in range(2):
                    k = len(example["choices"])
                    out[n, i, :k] = torch.arange(k, dtype=torch.float64).mul(int(example["question"]) + n).log_softmax(-1)
            return out

    alone = temperature.gathered_draw_log_probs(TwoDrawScoring(), examples)
    sent = []
    monkeypatch.setattr(temperature, "gather_rows", lambda rows: sent.append(rows) or torch.zeros(5, *rows.shape[1:]))
    for rank in (0, 1):
        monkeypatch.setattr(temperature, "rank_and_world", lambda rank=rank: (rank, 2))
        temperature.gathered_draw_log_probs(TwoDrawScoring(), examples)
    monkeypatch.setattr(temperature, "gather_rows", lambda rows: torch.cat(sent))
    gathered = temperature.gathered_draw_log_probs(TwoDrawScoring(), examples)
    assert [rows.shape for rows in sent] == [(3, 2, 3), (2, 2, 3)] and alone.shape == (2, 5, 3)
    torch.testing.assert_close(gathered, alone, rtol=0, atol=0)


FIT = FittedTemperature(1.7, "held.jsonl", 40, 10, "per_token", 0.91, 0.83)


def test_the_saved_temperature_reads_back_and_bad_files_are_refused(tmp_path):
    assert read_temperature(tmp_path) is None
    path = write_temperature(tmp_path, FIT)
    assert path == tmp_path / TEMPERATURE_FILE and read_temperature(tmp_path) == FIT
    assert json.loads(path.read_text()) == dataclasses.asdict(FIT)
    for bad in (0, -1.0, "2", True, None, float("nan"), float("inf")):
        path.write_text(json.dumps({**dataclasses.asdict(FIT), "temperature": bad}))
        with pytest.raises(ValueError, match=rf"{TEMPERATURE_FILE}: temperature: a temperature must be a finite number > 0"):
            read_temperature(tmp_path)
    path.write_text('{"temperature": 2}')
    with pytest.raises(ValueError, match="missing fitted_on, examples"):
        read_temperature(tmp_path)
    path.write_text("{")
    with pytest.raises(ValueError, match=rf"{TEMPERATURE_FILE}: not JSON .*evaluate --fit-temperature"):
        read_temperature(tmp_path)
    for bad in (float("nan"), float("inf"), 0.0):
        with pytest.raises(ValueError, match="finite number > 0"):
            write_temperature(tmp_path, dataclasses.replace(FIT, temperature=bad))


def test_the_temperature_flag_takes_none_or_a_positive_number():
    assert temperature_flag("none") == "none" and temperature_flag("None") == "none"
    assert temperature_flag("1.7") == 1.7
    for bad in ("0", "-2", "nan", "inf", "hot"):
        with pytest.raises(argparse.ArgumentTypeError, match="--temperature: a temperature must be a finite number > 0"):
            temperature_flag(bad)


def test_the_config_key_is_checked_when_the_config_is(tmp_path):
    held = write_jsonl(tmp_path / "held.jsonl", color_questions(4, seed=0))
    val = write_jsonl(tmp_path / "val.jsonl", color_questions(4, seed=1))
    datasets = [{"path": str(val)}]
    assert CalibrationSettings(datasets=datasets, fit_temperature=str(held)).fit_temperature == str(held)
    with pytest.raises(ValueError, match="calibration.fit_temperature: file '.*missing.jsonl' does not exist"):
        CalibrationSettings(datasets=datasets, fit_temperature=str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="calibration.fit_temperature: .* is also in calibration.datasets"):
        CalibrationSettings(datasets=datasets, fit_temperature=str(val))
    with pytest.raises(ValueError, match="calibration.fit_temperature scores multiple-choice questions: set calibration.mode: choices"):
        CalibrationSettings(mode="tokens", fit_temperature=str(held))
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "choices": ["a", "b"]}])
    with pytest.raises(ValueError, match="bad.jsonl:1: missing field 'answer'"):
        CalibrationSettings(datasets=datasets, fit_temperature=str(bad))


def test_the_calibration_block_fits_t_on_the_evaluations_own_draws(tiny_model_dir, tmp_path):
    """BLoB, N = 3: T is fitted on each of the 3 draws' choice logits of the held-out file, then the dataset is
    scored with it by the draws that follow."""
    from transformers import AutoTokenizer

    model, tokenizer = tiny_blob_model(tiny_model_dir, init_std=0.3).eval(), AutoTokenizer.from_pretrained(tiny_model_dir)
    held = write_jsonl(tmp_path / "held.jsonl", color_questions(12, seed=5))
    val = write_jsonl(tmp_path / "val.jsonl", color_questions(10, seed=6))
    settings = CalibrationSettings(datasets=[{"path": str(val), "name": "colors"}], fit_temperature=str(held), batch_size=5)
    evaluator = CalibrationEvaluator(settings, 3)
    torch.manual_seed(1)
    report = evaluator.evaluate(model, tokenizer, BlobSampler(model))["colors"]

    torch.manual_seed(1)
    held_out = read_examples(held)
    draws = ChoiceScoring(model, tokenizer, BlobSampler(model), 3, batch_size=5).ordered_draw_log_probs(held_out)
    answers = torch.tensor([e["answer"] for e in held_out])
    t = fit_temperature(draws, answers)
    scored = ChoiceScoring(model, tokenizer, BlobSampler(model), 3, batch_size=5).calibration_state(read_examples(val), temperature=t).compute()
    assert draws.shape == (3, 12, 4) and not torch.allclose(draws[0], draws[1])
    assert report["temperature"] == t and report["nll"] == pytest.approx(scored["nll"], abs=1e-12)
    fit = evaluator.last_fit
    assert (fit.temperature, fit.fitted_on, fit.examples, fit.samples, fit.eval_draws) == (t, str(held), 12, 3, "whole_weights")
    assert (fit.nll_before, fit.nll_after) == pytest.approx((per_draw_nll(draws, answers, 1.0), per_draw_nll(draws, answers, t)), abs=1e-12)
    assert evaluator.metric_names({"colors": report})["eval_temperature"] == t


# --------------------------------------------------------------------------- evaluate and predict


@pytest.fixture
def lora_adapter(tiny_model_dir, tmp_path):
    """A random LoRA adapter of the tiny model, a config whose calibration block scores colour questions in fp32,
    a held-out file, and the reference draw log-probabilities (N = 1) of the scored questions."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), config).save_pretrained(tmp_path / "adapter")
    val = write_jsonl(tmp_path / "val.jsonl", color_questions(10, seed=6))
    held = write_jsonl(tmp_path / "held.jsonl", color_questions(12, seed=5))
    cfg = {"base_model": str(tiny_model_dir), "adapter": "lora", "bf16": False, "fp16": False, "seed": 0,
           "calibration": {"datasets": [{"path": str(val), "name": "colors"}], "plots": False}}  # fmt: skip
    (tmp_path / "config.yml").write_text(yaml.safe_dump(cfg))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(tmp_path / "adapter")).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    reference = {name: ChoiceScoring(model, tokenizer, DeterministicSampler(), 0).ordered_draw_log_probs(read_examples(path))
                 for name, path in (("val", val), ("held", held))}  # fmt: skip
    return tmp_path, reference


def nll(log_probs: torch.Tensor, path, t: float) -> float:
    return per_draw_nll(log_probs, torch.tensor([e["answer"] for e in read_examples(path)]), t)


def test_evaluate_applies_the_saved_temperature_unless_told_otherwise(lora_adapter, capsys):
    from axolotl_blob import evaluate

    workdir, reference = lora_adapter
    adapter, val = workdir / "adapter", workdir / "val.jsonl"
    run = lambda *flags: evaluate.main([str(workdir / "config.yml"), "--adapter", str(adapter), *flags])["colors"]  # noqa: E731
    plain = run()
    assert "temperature" not in plain and plain["nll"] == pytest.approx(nll(reference["val"], val, 1.0), abs=1e-6)
    write_temperature(adapter, dataclasses.replace(FIT, temperature=2.5, samples=0, eval_draws=None))
    saved = run()
    assert saved["temperature"] == 2.5 and saved["nll"] == pytest.approx(nll(reference["val"], val, 2.5), abs=1e-6)
    assert abs(saved["nll"] - plain["nll"]) > 1e-3
    out = capsys.readouterr()
    assert f"temperature T = 2.5000 from {adapter / TEMPERATURE_FILE}" in out.err and "T = 2.5000" in out.out
    assert "note: T was fitted" not in out.err  # fitted on N = 0, applied to N = 0
    assert run("--temperature", "none") == plain
    forced = run("--temperature", "0.5")
    assert forced["temperature"] == 0.5 and forced["nll"] == pytest.approx(nll(reference["val"], val, 0.5), abs=1e-6)
    write_temperature(adapter, FIT)  # fitted on 10 per-token draws
    run()
    assert "note: T was fitted on N = 10 (per_token) and is applied to N = 0 (one pass)" in capsys.readouterr().err


def test_evaluate_fits_t_saves_it_beside_the_adapter_and_evaluates_with_it(lora_adapter, capsys):
    from axolotl_blob import evaluate

    workdir, reference = lora_adapter
    adapter, held = workdir / "adapter", workdir / "held.jsonl"
    summary = evaluate.main([str(workdir / "config.yml"), "--adapter", str(adapter), "--fit-temperature", str(held)])
    answers = torch.tensor([e["answer"] for e in read_examples(held)])
    t = fit_temperature(reference["held"], answers)
    assert summary["colors"]["temperature"] == pytest.approx(t, rel=1e-6)
    saved = read_temperature(adapter)
    assert (saved.fitted_on, saved.examples, saved.samples, saved.eval_draws) == (str(held), 12, 0, None)
    assert saved.nll_before == pytest.approx(nll(reference["held"], held, 1.0), abs=1e-6)
    assert saved.nll_after == pytest.approx(nll(reference["held"], held, t), abs=1e-6) and saved.nll_after < saved.nll_before
    assert f"saved to {adapter / TEMPERATURE_FILE}" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        evaluate.main([str(workdir / "config.yml"), "--adapter", str(adapter), "--fit-temperature", str(held), "--temperature", "2"])
    assert "--fit-temperature fits T and --temperature sets it" in capsys.readouterr().err


def test_predict_applies_the_saved_temperature(lora_adapter, capsys):
    from axolotl_blob import predict

    workdir, reference = lora_adapter
    adapter, val = workdir / "adapter", workdir / "val.jsonl"
    write_temperature(adapter, dataclasses.replace(FIT, temperature=0.5, samples=0, eval_draws=None))
    run = lambda *flags: predict.main([str(workdir / "config.yml"), "--adapter", str(adapter), "--input", str(val), *flags])  # noqa: E731
    scaled = torch.tensor([p.probabilities for p in run()], dtype=torch.float64)
    torch.testing.assert_close(scaled, torch.softmax(reference["val"][0] / 0.5, -1), rtol=0, atol=1e-6)
    assert "N = 0, T = 0.5:" in capsys.readouterr().err
    plain = torch.tensor([p.probabilities for p in run("--temperature", "none")], dtype=torch.float64)
    torch.testing.assert_close(plain, reference["val"][0].exp(), rtol=0, atol=1e-6)


@pytest.mark.slow
def test_training_fits_t_at_each_calibration_and_saves_the_last_beside_the_adapter(tiny_model_dir, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", color_questions(40, seed=0))
    held = write_jsonl(tmp_path / "held.jsonl", color_questions(12, seed=1))
    val = write_jsonl(tmp_path / "val.jsonl", color_questions(12, seed=2))
    calibration = {"datasets": [{"path": str(val), "name": "colors"}], "samples": 0, "plots": False, "fit_temperature": str(held)}
    config = multiple_choice_config(
        tiny_model_dir, train, tmp_path / "out", adapter="lora", max_steps=6, eval_steps=3, save_steps=6,
        test_datasets=[{"path": str(val), "type": "axolotl_blob.multiple_choice", "split": "train"}], calibration=calibration,
    )  # fmt: skip
    config.pop("blob")
    run_axolotl(config, tmp_path)
    out = tmp_path / "out"
    reports = [json.loads((out / "calibration" / f"step-{s}.json").read_text())["datasets"]["colors"] for s in (3, 6)]
    history = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())["log_history"]
    assert [e["eval_temperature"] for e in history if "eval_temperature" in e][-2:] == [r["temperature"] for r in reports]
    saved = read_temperature(out)
    assert saved.temperature == reports[-1]["temperature"] and (saved.fitted_on, saved.examples) == (str(held), 12)
    summary = tmp_path / "summary.json"
    run_module("axolotl_blob.evaluate", [str(tmp_path / "config.yml"), "--adapter", str(out), "--json", str(summary)], tmp_path)
    posthoc = json.loads(summary.read_text())["colors"]
    assert posthoc["temperature"] == saved.temperature
    for metric in ("acc", "ece", "nll", "brier"):
        assert posthoc[metric] == pytest.approx(reports[-1][metric], abs=1e-4), metric
