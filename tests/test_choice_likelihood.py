"""`multiple_choice.likelihood: choices`: the K-way cross-entropy over the answer letters, by hand and through
Axolotl for adapter: lora and adapter: blob; its config errors."""

import json
import math
from types import SimpleNamespace

import pytest
import torch

from axolotl_blob.multiple_choice import ChoiceLikelihood, choice_count
from conftest import base_config, color_questions, multiple_choice_config, run_axolotl, write_jsonl
from test_config_errors import validate


def test_the_loss_is_the_hand_computed_k_way_cross_entropy():
    torch.manual_seed(0)
    label_ids = [7, 3, 11]
    logits = torch.randn(2, 5, 13)
    labels = torch.full((2, 5), -100)
    labels[0, 3], labels[1, 4] = 3, 11  # answers B (predicted at position 2) and C (at position 3)
    by_hand = 0.0
    for row, position, answer in ((0, 2, 1), (1, 3, 2)):
        letters = [logits[row, position, i].item() for i in label_ids]
        by_hand += -(letters[answer] - math.log(sum(math.exp(v) for v in letters)))
    loss = ChoiceLikelihood(label_ids)(SimpleNamespace(logits=logits), labels)
    assert loss.item() == pytest.approx(by_hand / 2, rel=1e-6)
    full_vocabulary = torch.nn.functional.cross_entropy(logits[[0, 1], [2, 3]], torch.tensor([3, 11]))
    assert loss.item() < full_vocabulary.item()  # K letters share the mass the vocabulary would spread
    summed = ChoiceLikelihood(label_ids)(SimpleNamespace(logits=logits), labels, num_items_in_batch=torch.tensor(8))
    assert summed.item() == pytest.approx(by_hand / 8, rel=1e-6)  # normalised over the whole accumulated batch


def test_a_supervised_token_that_is_no_answer_letter_is_an_error():
    labels = torch.full((1, 4), -100)
    labels[0, 2] = 5
    with pytest.raises(ValueError, match="not an answer letter"):
        ChoiceLikelihood([7, 3])(SimpleNamespace(logits=torch.randn(1, 4, 9)), labels)


def test_choice_count_needs_one_k(tmp_path):
    uniform = write_jsonl(tmp_path / "a.jsonl", color_questions(5, seed=1))
    assert choice_count([uniform]) == 4
    mixed = write_jsonl(tmp_path / "b.jsonl", [{"question": "q", "choices": ["x", "y"], "answer": 0}])
    with pytest.raises(ValueError, match=r"different numbers of choices \(2 at .*b.jsonl:1, 4 at .*a.jsonl:1\)"):
        choice_count([uniform, mixed])


@pytest.fixture(scope="module")
def questions(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("mc") / "train.jsonl", color_questions(48, seed=2))


@pytest.mark.slow
@pytest.mark.parametrize("adapter", ["lora", "blob"])
def test_training_logs_the_k_way_loss(adapter, questions, tiny_model_dir, tmp_path):
    """At the start (B = 0: the base model's logits) the logged loss must be the K-way NLL, below log of the
    vocabulary and near log 4 for a random tiny model, for lora and blob alike."""
    config = multiple_choice_config(
        tiny_model_dir, questions, tmp_path / "out", adapter=adapter, max_steps=2, save_steps=2, eval_steps=0,
        learning_rate=0.0, multiple_choice={"likelihood": "choices"},
    )  # fmt: skip
    if adapter == "lora":
        config.pop("blob")
    run_axolotl(config, tmp_path)
    log = (tmp_path / "axolotl.log").read_text()
    assert "training on the 4-way cross-entropy over the answer-letter tokens" in log
    history = json.loads((tmp_path / "out" / "checkpoint-2" / "trainer_state.json").read_text())["log_history"]
    losses = [entry["loss"] for entry in history if "loss" in entry]
    assert losses and all(0.5 * math.log(4) < loss < 2 * math.log(4) for loss in losses)


BAD_INPUTS = [
    ("choices on completion data", {"multiple_choice": {"likelihood": "choices"}},
     "multiple_choice.likelihood 'choices' trains on one multiple-choice format: datasets\\[0\\] has type 'completion'"),
    ("misspelt key", {"multiple_choice": {"likelyhood": "choices"}}, "Did you mean 'multiple_choice.likelihood'?"),
    ("unknown sigma update", {"blob": {"sigma_update": "adam"}}, "Input should be 'reference' or 'optimizer'"),
    ("unknown cycle name", {"blob": {"kl_cycle_steps": "rescale"}}, "Input should be 'rescaled'"),
]


@pytest.mark.parametrize("case, overrides, message", BAD_INPUTS, ids=[row[0] for row in BAD_INPUTS])
def test_bad_input_is_rejected(case, overrides, message, tiny_model_dir, completion_data, tmp_path):
    with pytest.raises(Exception, match=message):
        validate(tmp_path, {**base_config(tiny_model_dir, completion_data, tmp_path / "out"), **overrides})


def test_choices_with_train_on_inputs_is_rejected(questions, tiny_model_dir, tmp_path):
    config = multiple_choice_config(tiny_model_dir, questions, tmp_path / "out", train_on_inputs=True, multiple_choice={"likelihood": "choices"})
    with pytest.raises(Exception, match="cannot be combined with 'train_on_inputs'"):
        validate(tmp_path, config)
