"""Post-hoc baselines of the calibration study: MC dropout draws and temperature scaling."""

import pytest
import torch

from axolotl_blob.calibration.scoring import ordered_choice_probabilities
from axolotl_blob.calibration.temperature import TemperatureScaled, choice_log_probs, fit_temperature
from axolotl_blob.sampling import DeterministicSampler, DropoutSampler


def test_fitted_temperature_is_the_nll_minimum_and_recovers_the_generating_one():
    generator = torch.Generator().manual_seed(0)
    logits = 4.0 * torch.randn(4000, 3, generator=generator, dtype=torch.float64)
    answers = torch.multinomial(torch.softmax(logits / 2.5, -1), 1, generator=generator).squeeze(-1)
    fitted = fit_temperature(logits, answers)
    grid = torch.linspace(1.0, 5.0, 4001, dtype=torch.float64)
    nll = torch.stack([torch.nn.functional.cross_entropy(logits / t, answers) for t in grid])
    assert fitted == pytest.approx(grid[nll.argmin()].item(), abs=2e-3)
    assert fitted == pytest.approx(2.5, rel=0.05)  # 4000 draws: the generating temperature within 5 %
    with_missing_letter = torch.cat([logits, torch.full((4000, 1), float("-inf"), dtype=torch.float64)], -1)
    assert fit_temperature(with_missing_letter, answers) == pytest.approx(fitted, rel=1e-6)


def test_temperature_scaled_model_divides_the_logits():
    class Logits(torch.nn.Module):
        def forward(self, x):
            return type("Out", (), {"logits": x.clone()})()

    x = torch.randn(2, 3, 5)
    torch.testing.assert_close(TemperatureScaled(Logits(), 2.0)(x).logits, x / 2.0)


def test_choices_scoring_of_a_temperature_scaled_model_is_the_softmax_of_log_probs_over_t(tiny_model_dir):
    """Scoring restricts the wrapped model's output layer to the answer position, through the wrapper."""
    from transformers import AutoTokenizer

    model, tokenizer = lora_with_dropout(tiny_model_dir, 0.0), AutoTokenizer.from_pretrained(tiny_model_dir)
    examples = [{"question": f"Question: {w}", "choices": ["no", "yes", "maybe"][: 2 + i % 2]} for i, w in enumerate("ab cd ef gh".split())]
    log_probs = choice_log_probs(model, tokenizer, examples, batch_size=3)
    scaled, _ = ordered_choice_probabilities(TemperatureScaled(model, 2.5), tokenizer, examples, DeterministicSampler(), 0, batch_size=3)
    torch.testing.assert_close(scaled, torch.softmax(log_probs / 2.5, dim=-1), rtol=1e-5, atol=1e-6)
    assert (scaled[0::2, 2] == 0).all() and not torch.allclose(scaled, log_probs.exp())


def lora_with_dropout(tiny_model_dir, p: float):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=p, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), config).eval()


@torch.no_grad()
def test_mc_dropout_draws_differ_and_n_zero_is_the_plain_model(tiny_model_dir):
    model = lora_with_dropout(tiny_model_dir, 0.3)
    ids = torch.arange(4, 20).reshape(2, 8)
    plain = model(input_ids=ids).logits
    sampler = DropoutSampler(model)
    draws = [model(input_ids=ids).logits for _ in sampler.draws(3)]
    assert len(draws) == 3 and sampler.samples_used(3) == 3
    assert not torch.allclose(draws[0], draws[1]) and not torch.allclose(draws[0], plain)
    assert all(not m.training for m in sampler.dropouts)  # back to eval after the draws
    torch.testing.assert_close(model(input_ids=ids).logits, plain, rtol=0, atol=0)
    (mean_pass,) = [model(input_ids=ids).logits for _ in sampler.draws(0)]
    torch.testing.assert_close(mean_pass, plain, rtol=0, atol=0)


def test_mc_dropout_needs_dropout(tiny_model_dir):
    with pytest.raises(ValueError, match="lora_dropout > 0"):
        DropoutSampler(lora_with_dropout(tiny_model_dir, 0.0))
