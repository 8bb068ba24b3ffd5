"""predict's probabilities are the calibration evaluator's for the same prompts and posterior draws."""

import json
import math

import pytest
import torch
from transformers import AutoTokenizer

from axolotl_blob.calibration.scoring import ChoiceScoring
from axolotl_blob.multiple_choice import read_examples
from axolotl_blob.predict import predict
from axolotl_blob.sampling import BlobSampler
from conftest import color_questions, tiny_blob_model, write_jsonl

QUESTIONS = color_questions(7, seed=3) + [
    {"question": "Which is an animal?", "choices": ["sun", "dog"], "answer": 1},
    {"id": "no-answer", "question": "Which is a number?", "choices": ["tree", "two", "star"]},
]


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir):
    return tiny_blob_model(tiny_model_dir, init_std=0.3).eval(), AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.mark.parametrize("n_samples", [0, 3])
def test_predict_equals_the_calibration_evaluator(model_and_tokenizer, n_samples):
    model, tokenizer = model_and_tokenizer
    graded = QUESTIONS[:-1]
    torch.manual_seed(7)
    state = ChoiceScoring(model, tokenizer, BlobSampler(model), n_samples, batch_size=3).calibration_state(graded)
    torch.manual_seed(7)
    predictions = list(predict(ChoiceScoring(model, tokenizer, BlobSampler(model), n_samples, batch_size=3), graded))
    assert [p.probability for p in predictions] == pytest.approx(state.record("confidence").tolist(), abs=1e-12)
    assert [p.entropy for p in predictions] == pytest.approx(state.record("entropy").tolist(), abs=1e-12)
    assert [p.mutual_info for p in predictions] == pytest.approx(state.record("mutual_info").clamp(min=0).tolist(), abs=1e-12)
    assert [float(p.correct) for p in predictions] == state.record("correct").tolist()
    nll = -sum(math.log(p.probabilities[q["answer"]]) for p, q in zip(predictions, graded)) / len(graded)
    assert nll == pytest.approx(state.compute()["nll"], abs=1e-12)
    assert (max(p.mutual_info for p in predictions) > 0) == (n_samples > 0)


def test_predictions_hold_every_choice_and_abstain_below_the_threshold(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    predictions = list(predict(ChoiceScoring(model, tokenizer, BlobSampler(model), 0), QUESTIONS, abstain_below=0.3))
    for prediction, question in zip(predictions, QUESTIONS):
        assert len(prediction.probabilities) == len(question["choices"])
        assert sum(prediction.probabilities) == pytest.approx(1.0)
        assert prediction.probability == max(prediction.probabilities)
        assert prediction.predicted_text == question["choices"][prediction.predicted]
        assert prediction.predicted_label == "ABCD"[prediction.predicted]
        assert prediction.abstained == (prediction.probability < 0.3)
    record = json.loads(predictions[-1].to_json())
    assert record["id"] == "no-answer" and "correct" not in record and record["mutual_info"] == 0.0


def test_an_input_line_without_choices_names_the_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "questions.jsonl", [{"question": "q?", "choices": ["a", "b"]}, {"question": "q2?"}])
    with pytest.raises(ValueError, match=r"questions.jsonl:2: missing field 'choices'"):
        read_examples(path, require_answer=False)
    with pytest.raises(ValueError, match=r"questions.jsonl:1: missing field 'answer'"):
        read_examples(path)  # calibration data still needs the answer
