"""The cloze answer format (`type: axolotl_blob.cloze`): tokens, the row layout and its expansion, the K-way loss by
hand, training equal to scoring, one question at a time equal to batched, the question count, and Axolotl end to end."""

import json
import math
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from axolotl_blob.calibration.scoring import ChoiceScoring
from axolotl_blob.cloze import (
    ClozeLikelihood,
    QuestionCountMixin,
    cloze_prompt,
    cloze_token_ids,
    expand_questions,
    mean_token_log_likelihood,
    question_row,
)
from axolotl_blob.multiple_choice import IGNORE_INDEX
from axolotl_blob.sampling import BlobSampler, DeterministicSampler
from conftest import (
    TORCHRUN_2,
    assert_identical_tensors,
    color_questions,
    multiple_choice_config,
    run_axolotl,
    run_module,
    tiny_blob_model,
    write_jsonl,
)
from test_config_errors import validate

QUESTIONS = [
    {"question": "Which word is a color?", "choices": ["cat", "red", "a much longer answer", "dog"], "answer": 1},
    {"question": "Pick the last one", "choices": ["one", "two", "three", "four five six"], "answer": 3},
    {"question": "And the first?", "choices": ["first", "second", "third", "fourth"], "answer": 0},
]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_continuations_are_the_tokens_that_follow_the_prompt(tokenizer):
    prompt_ids, continuations = cloze_token_ids(tokenizer, "Which word is a color?", ["red", "a long one"])
    for choice, tokens in zip(["red", "a long one"], continuations):
        whole = tokenizer(cloze_prompt("Which word is a color?") + " " + choice)["input_ids"]
        assert whole == prompt_ids + tokens


def test_an_empty_choice_is_named(tokenizer):
    with pytest.raises(ValueError, match="choice 1 \\(' '\\) is empty"):
        cloze_token_ids(tokenizer, "q?", ["red", " "])


def test_a_row_puts_the_answer_first_and_expands_back_to_k_sequences(tokenizer):
    rows = []
    for q in QUESTIONS[:2]:
        prompt, continuations = cloze_token_ids(tokenizer, q["question"], q["choices"])
        rows.append((prompt, continuations, question_row(prompt, continuations, q["answer"])))
    row = rows[0][2]
    prompt, continuations = rows[0][0], rows[0][1]
    assert row["input_ids"] == prompt + continuations[1] + continuations[0] + continuations[2] + continuations[3]
    assert row["labels"][: len(prompt)] == [IGNORE_INDEX] * len(prompt) and row["labels"][len(prompt):] == row["input_ids"][len(prompt):]
    # collate two rows as Axolotl does (right padding; position_ids padded with 0) and expand
    longest = max(len(r["input_ids"]) for _, _, r in rows)
    padded = {key: torch.tensor([r[key] + [pad] * (longest - len(r[key])) for _, _, r in rows])
              for key, pad in (("input_ids", 3), ("labels", IGNORE_INDEX), ("position_ids", 0), ("attention_mask", 0))}  # fmt: skip
    batch = expand_questions(padded, 4, pad_id=3)
    assert batch["input_ids"].shape[0] == 8
    for q, ((prompt, continuations, _), question) in enumerate(zip(rows, QUESTIONS)):
        order = [question["answer"], *(k for k in range(4) if k != question["answer"])]
        for j, k in enumerate(order):
            length = len(prompt) + len(continuations[k])
            assert batch["input_ids"][4 * q + j, :length].tolist() == prompt + continuations[k]
            assert batch["attention_mask"][4 * q + j].sum() == length
            assert batch["labels"][4 * q + j].tolist()[len(prompt) : length] == continuations[k]
            assert (batch["labels"][4 * q + j, :len(prompt)] == IGNORE_INDEX).all()
    with pytest.raises(ValueError, match="has 4 choices, the training data 3"):
        expand_questions(padded, 3, pad_id=3)


def test_the_loss_is_the_hand_computed_k_way_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(4, 6, 9)  # one question, K = 4 sequences, the answer's first
    labels = torch.full((4, 6), IGNORE_INDEX)
    spans = {0: [(2, 5)], 1: [(3, 1), (4, 7)], 2: [(2, 0), (3, 2), (4, 8)], 3: [(5, 6)]}  # row: [(position, token)]
    for row, tokens in spans.items():
        for position, token in tokens:
            labels[row, position] = token
    scores = []
    for row, tokens in spans.items():
        log_probs = [torch.log_softmax(logits[row, position - 1], -1)[token].item() for position, token in tokens]
        scores.append(sum(log_probs) / len(log_probs))  # mean over the choice's tokens
    by_hand = -(scores[0] - math.log(sum(math.exp(s) for s in scores)))
    assert mean_token_log_likelihood(logits, labels).tolist() == pytest.approx(scores, rel=1e-5)
    loss = ClozeLikelihood(4)(SimpleNamespace(logits=logits), labels)
    assert loss.item() == pytest.approx(by_hand, rel=1e-5)
    two = ClozeLikelihood(4)(SimpleNamespace(logits=torch.cat([logits, logits])), torch.cat([labels, labels]), num_items_in_batch=torch.tensor(5))
    assert two.item() == pytest.approx(2 * by_hand / 5, rel=1e-5)  # summed, over the accumulated batch's questions


def test_training_scores_what_evaluation_scores(tiny_model_dir, tokenizer):
    """The collated, expanded training batch through the model and ClozeLikelihood gives the same K-way
    log-probabilities as the scorers (in the question's own choice order)."""
    model = tiny_blob_model(tiny_model_dir).eval()
    with torch.no_grad():
        scored = ChoiceScoring(model, tokenizer, BlobSampler(model), 0, 2, answer_format="cloze").ordered_draw_log_probs(QUESTIONS)[0]
        rows = [question_row(*cloze_token_ids(tokenizer, q["question"], q["choices"]), q["answer"]) for q in QUESTIONS]
        longest = max(len(r["input_ids"]) for r in rows)
        padded = {key: torch.tensor([r[key] + [pad] * (longest - len(r[key])) for r in rows])
                  for key, pad in (("input_ids", 3), ("labels", IGNORE_INDEX), ("position_ids", 0), ("attention_mask", 0))}  # fmt: skip
        batch = expand_questions(padded, 4, pad_id=3)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        trained, answers = ClozeLikelihood(4).choice_log_probs(logits, batch["labels"])
    assert answers.tolist() == [0, 0, 0]
    for q, question in enumerate(QUESTIONS):
        order = [question["answer"], *(k for k in range(4) if k != question["answer"])]
        torch.testing.assert_close(trained[q].double(), scored[q, order], rtol=1e-4, atol=1e-5)


def test_one_question_at_a_time_equals_batched(tiny_model_dir, tokenizer):
    model = tiny_blob_model(tiny_model_dir)
    cloze = ChoiceScoring(model, tokenizer, DeterministicSampler(), 0, batch_size=3, answer_format="cloze")
    batched, _ = cloze.ordered_probabilities(QUESTIONS)
    alone = torch.cat([replace(cloze, batch_size=1).ordered_probabilities([q])[0] for q in QUESTIONS])
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-7)
    assert torch.allclose(batched.sum(-1), torch.ones(3, dtype=torch.float64))
    letters, _ = replace(cloze, answer_format="letters").ordered_probabilities(QUESTIONS)
    assert not torch.allclose(batched, letters)  # another question put to the model


def test_temperature_divides_each_draws_scores_before_the_average(tiny_model_dir, tokenizer):
    model = tiny_blob_model(tiny_model_dir)
    torch.manual_seed(1)
    scoring = ChoiceScoring(model, tokenizer, BlobSampler(model), 3, batch_size=3, answer_format="cloze")
    draws = scoring.ordered_draw_log_probs(QUESTIONS)
    torch.manual_seed(1)
    probs, _ = scoring.ordered_probabilities(QUESTIONS, temperature=2.0)
    assert draws.shape == (3, 3, 4)
    torch.testing.assert_close(probs, torch.softmax(draws / 2.0, -1).mean(0))


class _Counter:
    def _get_num_items_in_batch(self, batch_samples, device):
        return sum((batch["labels"][..., 1:] != IGNORE_INDEX).sum() for batch in batch_samples)


def test_the_loss_normaliser_counts_questions():
    counter = type("Counter", (QuestionCountMixin, _Counter), {"n_choices": 4})()
    labels = torch.full((8, 6), IGNORE_INDEX)
    labels[:, 3:] = 5  # two questions of 4 sequences, 3 choice tokens each
    assert int(counter._get_num_items_in_batch([{"labels": labels}, {"labels": labels[:4]}], "cpu")) == 3


@pytest.fixture(scope="module")
def questions(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("cloze") / "train.jsonl", color_questions(48, seed=2))


def cloze_config(model_dir, train, output_dir, **overrides) -> dict:
    config = multiple_choice_config(model_dir, train, output_dir, **overrides)
    config["datasets"] = [{"path": str(train), "type": "axolotl_blob.cloze"}]
    return config


@pytest.mark.slow
@pytest.mark.parametrize("adapter", ["lora", "blob"])
def test_training_learns_the_choices_and_calibration_scores_them(adapter, questions, tiny_model_dir, tmp_path):
    """Through Axolotl: the logged loss is the K-way NLL (near log 4 at the start for a random tiny model) and falls;
    the calibration block scores the same questions in the cloze format."""
    config = cloze_config(
        tiny_model_dir, questions, tmp_path / "out", adapter=adapter, max_steps=24, save_steps=24, eval_steps=0,
        learning_rate=0.01, logging_steps=1, calibration={"datasets": [{"path": str(questions), "name": "train"}], "samples": 2},
    )  # fmt: skip
    if adapter == "lora":
        config.pop("blob")
    run_axolotl(config, tmp_path)
    log = (tmp_path / "axolotl.log").read_text()
    assert "cloze: training on the 4-way cross-entropy" in log
    history = json.loads((tmp_path / "out" / "checkpoint-24" / "trainer_state.json").read_text())["log_history"]
    losses = [entry["loss"] for entry in history if "loss" in entry]
    assert 0.5 * math.log(4) < losses[0] < 2 * math.log(4)
    assert sum(losses[-4:]) / 4 < 0.7 * losses[0]
    report = json.loads(sorted((tmp_path / "out" / "calibration").glob("step-*.json"))[-1].read_text())
    assert report["datasets"]["train"]["acc"] > 0.6  # the color questions, learnt


@pytest.mark.slow
def test_two_ddp_ranks_train_one_adapter_and_score_as_one_process(questions, tiny_model_dir, tmp_path):
    """Cloze under `torchrun --nproc_per_node 2` (gloo): DDP averages the K-way gradient, so both ranks end with the
    same adapter; the calibration block's sharded scoring (each rank its questions, all K continuations of one
    question on one rank) gives the numbers one process gets with `evaluate` on the saved adapter."""
    val = write_jsonl(tmp_path / "val.jsonl", color_questions(15, seed=3))  # odd: the ranks score 8 and 7 questions
    config = cloze_config(
        tiny_model_dir, questions, tmp_path / "out", max_steps=6, save_steps=6, eval_steps=0, learning_rate=0.01,
        ddp_backend="gloo", plugins=["axolotl_blob.BlobPlugin", "probe.ProbePlugin"],
        calibration={"datasets": [{"path": str(val), "name": "colors"}], "samples": 0, "plots": False},
    )  # fmt: skip
    run_axolotl(config, tmp_path, launcher=TORCHRUN_2)
    out = tmp_path / "out"
    rank0, rank1 = load_file(out / "rank0_adapter.safetensors"), load_file(out / "rank1_adapter.safetensors")
    assert any("blob_G" in key for key in rank0)
    assert_identical_tensors(rank1, rank0)
    history = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())["log_history"]
    assert history[-1]["epoch"] == pytest.approx(6 / 6)  # 48 questions, 4 per rank and step: one epoch is 6 steps
    trained = json.loads((out / "calibration" / "step-6.json").read_text())["datasets"]["colors"]
    summary = tmp_path / "summary.json"
    run_module("axolotl_blob.evaluate", [str(tmp_path / "config.yml"), "--adapter", str(out), "--json", str(summary)], tmp_path)
    alone = json.loads(summary.read_text())["colors"]
    assert trained["n"] == alone["n"] == 15
    for metric in ("acc", "ece", "nll", "brier", "confidence"):
        assert trained[metric] == pytest.approx(alone[metric], abs=1e-4), metric


BAD_INPUTS = [
    ("letters likelihood", {"multiple_choice": {"likelihood": "vocabulary"}}, "remove multiple_choice.likelihood 'vocabulary'"),
    ("sample packing", {"sample_packing": True}, "cannot be combined with 'sample_packing'"),
    ("train on inputs", {"train_on_inputs": True}, "cannot be combined with 'train_on_inputs'"),
]


@pytest.mark.parametrize("case, overrides, message", BAD_INPUTS, ids=[row[0] for row in BAD_INPUTS])
def test_bad_input_is_rejected(case, overrides, message, questions, tiny_model_dir, tmp_path):
    with pytest.raises(Exception, match=message):
        validate(tmp_path, cloze_config(tiny_model_dir, questions, tmp_path / "out", **overrides))


def test_formats_are_not_mixed(questions, tiny_model_dir, tmp_path):
    config = cloze_config(tiny_model_dir, questions, tmp_path / "out")
    config["datasets"].append({"path": str(questions), "type": "axolotl_blob.multiple_choice"})
    with pytest.raises(Exception, match="datasets\\[1\\] has type 'axolotl_blob.multiple_choice'; use 'type: axolotl_blob.cloze'"):
        validate(tmp_path, config)
