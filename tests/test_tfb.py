"""TFB: the SVD re-parameterisation keeps the mean model, the sampled weight noise is isotropic σ_q within span(U)
and zero outside it, and the σ_q search returns the largest σ_q within tolerance."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from axolotl_blob.blob.layer import posterior_std
from axolotl_blob.blob.model import bayesianize, blob_layers, posterior_sampling
from axolotl_blob.blob.tfb import largest_within_tolerance, prediction_change, set_noise_scale, svd_reparameterize


def trained_lora(model_dir):
    """The tiny Llama with a LoRA whose B is non-zero (as after training), fp32."""
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), config).eval()


def test_svd_reparameterisation_keeps_the_mean_model(tiny_model_dir):
    model = trained_lora(tiny_model_dir)
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    before = model(input_ids=ids).logits
    products = {n: m.lora_B["default"].weight @ m.lora_A["default"].weight for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    inverse = svd_reparameterize(model)
    torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=1e-5)
    for name, module in model.named_modules():
        if name in products:
            b = module.lora_B["default"].weight
            torch.testing.assert_close(b @ module.lora_A["default"].weight, products[name], rtol=0, atol=1e-6)
            gram = b.T @ b  # B' = U diag(d): orthogonal columns of norms d_i
            torch.testing.assert_close(gram, torch.diag(gram.diagonal()), rtol=0, atol=1e-5)
            key = name.removeprefix("base_model.model.")
            torch.testing.assert_close(inverse[key].float(), 1 / gram.diagonal().sqrt(), rtol=1e-5, atol=0)
    assert len(inverse) == 4  # q_proj and v_proj of two layers


def test_sampled_weight_noise_is_sigma_q_within_span_u_and_zero_outside(tiny_model_dir):
    model = trained_lora(tiny_model_dir)
    inverse = svd_reparameterize(model)
    bayesianize(model, init_std=0.05)
    sigma_q = 0.01
    set_noise_scale(model, inverse, sigma_q)
    name, layer, _ = next(blob_layers(model))
    b = layer.lora_B["default"].weight.detach()
    u = b / b.norm(dim=0)  # span(U): B' = U diag(d)
    torch.testing.assert_close(posterior_std(layer.blob_G["default"])[:, 0], sigma_q * inverse[name.removeprefix("base_model.model.")].float())
    basis = torch.eye(layer.in_features)[None]  # token j reads column j of the weight
    with torch.no_grad(), posterior_sampling(model, False):
        mean = layer(basis)[0]
    torch.manual_seed(3)
    within, outside = [], []
    with torch.no_grad(), posterior_sampling(model, True):
        for _ in range(60):
            weight_noise = (layer(basis)[0] - mean).T / layer.scaling["default"]  # (d_out, d_in), LoRA scaling off
            within.append(u.T @ weight_noise)
            outside.append(weight_noise - u @ (u.T @ weight_noise))
    within = torch.stack(within)  # 60 × 4 × 64 = 15 360 entries that should be i.i.d. N(0, σ_q²)
    assert within.std().item() == pytest.approx(sigma_q, rel=0.03)
    assert within.mean().abs().item() < 3 * sigma_q / within.numel() ** 0.5 + 1e-4
    per_direction = within.std(dim=(0, 2))  # isotropic: every direction of span(U) has the same std
    assert per_direction.min().item() > 0.9 * sigma_q and per_direction.max().item() < 1.1 * sigma_q
    assert torch.stack(outside).abs().max().item() < 1e-6


def test_zero_singular_values_get_no_noise_and_keep_the_model_finite(tiny_model_dir):
    model = trained_lora(tiny_model_dir)
    layers = [m for m in model.modules() if hasattr(m, "lora_B") and "default" in m.lora_B]
    with torch.no_grad():
        layers[0].lora_B["default"].weight.zero_()  # an untrained layer: B = 0, every d_i = 0
        b = layers[1].lora_B["default"].weight
        b[:, 2:] = b[:, :2] @ torch.tensor([[1.0, 2.0], [-1.0, 0.5]])  # rank 2 of 4
    ids = torch.randint(0, 100, (1, 8), generator=torch.Generator().manual_seed(2))
    before = model(input_ids=ids).logits
    inverse = svd_reparameterize(model)
    assert (inverse["model.layers.0.self_attn.q_proj"] == 0).all()
    assert (inverse["model.layers.0.self_attn.v_proj"] == 0).sum() == 2
    bayesianize(model, init_std=0.05)
    set_noise_scale(model, inverse, 0.01)
    assert all(torch.isfinite(layer.blob_G[a]).all() for _, layer, a in blob_layers(model))
    with torch.no_grad(), posterior_sampling(model, False):
        torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=1e-5)
    with torch.no_grad(), posterior_sampling(model, True):
        assert torch.isfinite(model(input_ids=ids).logits).all()


def test_bisection_returns_the_largest_sigma_within_tolerance_on_a_monotone_change():
    boundary, tolerance, low, high, steps = 1.3e-4, 0.003, 1e-5, 0.015, 6
    change = lambda sigma: tolerance * (sigma / boundary) ** 2  # noqa: E731  (crosses the tolerance at `boundary`)
    result = largest_within_tolerance(change, low, high, tolerance, steps)
    factor = (high / low) ** (1 / 2**steps)  # geometric bisection: relative precision
    assert boundary / factor <= result.sigma <= boundary and change(result.sigma) <= tolerance
    assert len(result.trace) == 1 + steps and result.trace[0][0] == high
    assert result.trace[1][0] == pytest.approx((low * high) ** 0.5)
    assert result.sigma == max(s for s, c in result.trace if c <= tolerance)  # the largest σ seen to pass
    assert largest_within_tolerance(change, low, 1e-4, tolerance).sigma == 1e-4  # the top passes: no search
    with pytest.raises(ValueError, match="even σ_q = 0.0001 changes the predictions"):
        largest_within_tolerance(lambda s: 1.0, 1e-4, 1e-2, tolerance)


def test_prediction_change_measures_against_the_mean_models_own_answers():
    mean = torch.tensor([[0.8, 0.2], [0.4, 0.6]], dtype=torch.float64)  # ŷ = (0, 1), the labels do not matter
    bma = torch.tensor([[0.7, 0.3], [0.55, 0.45]], dtype=torch.float64)
    base = -(torch.log(torch.tensor(0.8)) + torch.log(torch.tensor(0.6))) / 2
    moved = -(torch.log(torch.tensor(0.7)) + torch.log(torch.tensor(0.45))) / 2
    assert prediction_change(mean, bma, "nll") == pytest.approx(((moved - base).abs() / base).item(), rel=1e-6)
    assert prediction_change(mean, bma, "flip") == 0.5
