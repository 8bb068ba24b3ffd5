"""Post-hoc baselines of the calibration study: MC dropout draws (temperature scaling: test_temperature.py)."""

import pytest
import torch

from axolotl_blob.sampling import DropoutSampler


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
