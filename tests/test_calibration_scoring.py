"""The two scoring modes against direct computations on the tiny model."""

import pytest
import torch
from transformers import AutoTokenizer

from axolotl_blob.calibration.metrics import CalibrationState
from axolotl_blob.calibration.scoring import ChoiceScoring, score_tokens
from axolotl_blob.multiple_choice import format_prompt, label_token_ids, prompt_token_ids
from axolotl_blob.sampling import BlobSampler, DeterministicSampler
from conftest import tiny_blob_model

EXAMPLES = [
    {"question": "Which is a color?", "choices": ["red", "cat", "one"], "answer": 0},
    {"question": "Which is an animal? Pick the animal from the list", "choices": ["sun", "dog"], "answer": 1},
    {"question": "Which is a number?", "choices": ["tree", "moon", "star", "two"], "answer": 3},
]


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir):
    return tiny_blob_model(tiny_model_dir, init_std=0.3).eval(), AutoTokenizer.from_pretrained(tiny_model_dir)


class ScaledAdapterSampler:
    """Deterministic 'draws': draw k scales every lora_B by (k + 1), so batching cannot change a draw."""

    def __init__(self, model):
        self.weights = [p for n, p in model.named_parameters() if "lora_B" in n]

    def draws(self, n_samples):
        for k in range(n_samples):
            with torch.no_grad():
                for w in self.weights:
                    w.mul_(k + 1)
            yield
            with torch.no_grad():
                for w in self.weights:
                    w.div_(k + 1)

    def samples_used(self, n_samples):
        return n_samples


def one_at_a_time(model, tokenizer, draws: int, sampler=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: each example alone, no padding, probabilities over its own labels averaged over draws."""
    rows = []
    sampler = sampler or BlobSampler(model)
    for example in EXAMPLES:
        ids = torch.tensor([prompt_token_ids(tokenizer, format_prompt(example["question"], example["choices"]))])
        labels = label_token_ids(tokenizer, len(example["choices"]))
        per_draw = []
        for _ in sampler.draws(draws):
            per_draw.append(torch.softmax(model(input_ids=ids).logits[0, -1, labels].float(), -1))
        probs = torch.stack(per_draw).mean(0)
        rows.append(torch.nn.functional.pad(probs, (0, 4 - len(probs))))
    return torch.stack(rows), torch.tensor([e["answer"] for e in EXAMPLES])


def test_batched_right_padded_scoring_equals_one_example_at_a_time(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    probs, labels = one_at_a_time(model, tokenizer, draws=0)
    expected = CalibrationState(10)
    expected.update(probs, labels)
    got = ChoiceScoring(model, tokenizer, BlobSampler(model), n_samples=0, batch_size=2).calibration_state(EXAMPLES, n_bins=10)
    assert got.compute() == pytest.approx(expected.compute(), abs=1e-5)


def test_scoring_averages_the_probabilities_of_the_draws(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    sampler = ScaledAdapterSampler(model)
    with torch.no_grad():
        probs, labels = one_at_a_time(model, tokenizer, draws=3, sampler=sampler)
    expected = CalibrationState(10)
    expected.update(probs, labels)
    got = ChoiceScoring(model, tokenizer, sampler, n_samples=3, batch_size=2).calibration_state(EXAMPLES, n_bins=10).compute()
    metrics = expected.compute()
    for name in ("acc", "ece", "nll", "brier", "confidence", "entropy"):
        assert got[name] == pytest.approx(metrics[name], abs=1e-5), name
    assert got["mutual_info"] > 0


def test_blob_sampled_scoring_differs_from_the_mean_and_has_epistemic_uncertainty(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    torch.manual_seed(5)
    sampled = ChoiceScoring(model, tokenizer, BlobSampler(model), n_samples=3).calibration_state(EXAMPLES).compute()
    mean = ChoiceScoring(model, tokenizer, BlobSampler(model), n_samples=0).calibration_state(EXAMPLES).compute()
    assert sampled["nll"] != pytest.approx(mean["nll"], abs=1e-6)  # sampling changed the predictions
    assert sampled["mutual_info"] > 0 and mean["mutual_info"] == 0
    deterministic = ChoiceScoring(model, tokenizer, DeterministicSampler(), n_samples=10).calibration_state(EXAMPLES)
    assert deterministic.compute() == pytest.approx(mean, abs=1e-6)  # eval mode without forcing = the mean


def test_token_scoring_matches_a_direct_computation(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    ids = torch.tensor([tokenizer("red cat dog one red.")["input_ids"], tokenizer("sun moon star two sun.")["input_ids"][:6]])
    labels = ids.clone()
    labels[0, :2] = -100
    state = score_tokens(model, [{"input_ids": ids, "labels": labels}], DeterministicSampler(), n_samples=0)
    logits = model(input_ids=ids).logits[:, :-1]
    targets = labels[:, 1:]
    mask = targets != -100
    probs = torch.softmax(logits[mask].float(), -1)
    expected = CalibrationState(15)
    expected.update(probs, targets[mask])
    assert state.compute() == pytest.approx(expected.compute(), abs=1e-6)
    assert state.compute()["n"] == int(mask.sum())


def test_the_output_layer_projects_only_the_selected_positions(model_and_tokenizer):
    """Inside selected_position_logits the model returns (selections, 1, vocabulary) logits, equal to the full
    forward's at the given (row, position) pairs (several per row, as the cloze format selects); outside it, every
    position again."""
    from axolotl_blob.calibration.scoring import selected_position_logits

    model, _ = model_and_tokenizer
    ids = torch.randint(4, 100, (3, 9))
    rows, positions = torch.tensor([0, 1, 2, 2]), torch.tensor([8, 2, 5, 6])
    with torch.no_grad():
        full = model(input_ids=ids).logits
        with selected_position_logits(model, rows, positions):
            selected = model(input_ids=ids).logits
        after = model(input_ids=ids).logits
    assert selected.shape == (4, 1, full.shape[-1]) and after.shape == full.shape
    torch.testing.assert_close(selected[:, 0], full[rows, positions], rtol=1e-5, atol=1e-6)


def test_length_sorted_batches_cover_every_position_once_shortest_first():
    from axolotl_blob.calibration.scoring import length_sorted_batches

    assert length_sorted_batches([5, 2, 9, 2, 7], 2) == [[1, 3], [0, 4], [2]]


def test_linear_weights_cast_once_score_as_autocast_casting_them_at_every_forward(tiny_model_dir, monkeypatch):
    """Under bf16 autocast an fp32 model's fixed Linear weights are cast once per scoring, not per forward: the
    scores of N = 3 whole-weight draws are bit-equal to those of autocast casting at every forward. The output layer
    is tied to the embedding (as SmolLM2's), which must keep its fp32 weight for the lookup."""
    from axolotl_blob.calibration import scoring

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = tiny_blob_model(tiny_model_dir, init_std=0.3).eval()
    inner = model.get_base_model()
    inner.lm_head.weight = inner.model.embed_tokens.weight
    fixed = scoring._fixed_linear_weights(model)
    assert "base_model.model.lm_head.weight" in fixed
    assert sum(name.endswith("q_proj.base_layer.weight") for name in fixed) == 2  # one per layer
    assert not [name for name in fixed if "lora_" in name or "embed_tokens" in name]
    bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    ids = torch.tensor([tokenizer("red cat dog one red.")["input_ids"]])

    def scores():
        torch.manual_seed(3)
        probs = scoring.ChoiceScoring(model, tokenizer, BlobSampler(model), 3, 2, bf16).ordered_probabilities(EXAMPLES)[0]
        tokens = score_tokens(model, [{"input_ids": ids, "labels": ids}], BlobSampler(model), 2, autocast=bf16)
        return probs, tokens.compute()

    cast_once = scores()
    monkeypatch.setattr(scoring, "_fixed_linear_weights", lambda model: {})
    every_forward = scores()
    assert torch.equal(cast_once[0], every_forward[0])
    assert cast_once[1] == every_forward[1]
    assert all(p.dtype == torch.float32 for p in model.parameters())
