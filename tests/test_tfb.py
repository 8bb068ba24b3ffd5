"""TFB: the SVD re-parameterisation keeps the mean model, the sampled weight noise is isotropic σ_q within span(U)
and zero outside it, and the σ_q search: the largest σ_q within tolerance (`nll`, `flip`), or the reference code's
top of the final bracket (`nll_reference`)."""

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from axolotl_blob.blob.layer import posterior_std
from axolotl_blob.blob.model import bayesianize, blob_layers, posterior_sampling
from axolotl_blob.blob import tfb
from axolotl_blob.blob.tfb import (
    bayesianize_tfb,
    largest_within_tolerance,
    prediction_change,
    set_noise_scale,
    svd_reparameterize,
    top_of_final_bracket,
)


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


def test_prediction_change_of_the_reference_divides_by_the_number_of_anchors():
    mean = torch.tensor([[0.8, 0.2], [0.4, 0.6]], dtype=torch.float64)
    bma = torch.tensor([[0.7, 0.3], [0.55, 0.45]], dtype=torch.float64)
    assert prediction_change(mean, bma, "nll_reference") == pytest.approx(prediction_change(mean, bma, "nll") / 2, rel=1e-12)


def test_the_reference_search_keeps_the_top_of_the_final_bracket():
    change = lambda sigma: sigma * 100  # noqa: E731  (passes 0.003 up to σ = 3e-5)
    assert top_of_final_bracket(change, 0.001, 0.015, 0.003, 5).sigma == pytest.approx(0.001 + 0.014 / 32)  # every midpoint over
    assert top_of_final_bracket(lambda sigma: 0.0, 0.001, 0.015, 0.003, 5).sigma == 0.015  # every midpoint within: the top, never tried
    with pytest.raises(ValueError, match="0 < low < high"):
        top_of_final_bracket(change, 0.015, 0.001, 0.003)


ANCHORS, P_MEAN, SCALE = 500, 0.9, 0.01
MEAN_PROBS = torch.tensor([[P_MEAN, 1 - P_MEAN]] * ANCHORS, dtype=torch.float64)  # ŷ = choice 0 on every anchor


def fake_bma_probs(sigma: float) -> torch.Tensor:
    """A fake NLL of σ: −log p(ŷ) = NLL_0 · (1 + (σ/0.01)²), i.e. a relative change (σ/0.01)²."""
    p = math.exp(math.log(P_MEAN) * (1 + (sigma / SCALE) ** 2))
    return torch.tensor([[p, 1 - p]] * ANCHORS, dtype=torch.float64)


# Hand-computed. nll_reference passes while (σ/0.01)² / 500 ≤ 0.003, i.e. σ ≤ 0.01·√1.5 = 0.012247; arithmetic
# midpoints of [0.001, 0.015]: 0.008 (0.64/500, within) → 0.0115 (1.3225/500, within) → 0.01325 (1.7556/500, over)
# → 0.012375 (1.5314/500, over) → 0.0119375 (1.4250/500, within); the final bracket is [0.0119375, 0.012375] and its
# top, 0.012375 (over the tolerance), is σ_q. nll passes while (σ/0.01)² ≤ 0.003, i.e. σ ≤ 5.477e-4; geometric
# midpoints of [1e-5, 0.015] after the top (0.015, over): 3.873e-4 (within), 2.410e-3, 9.662e-4, 6.117e-4 (over),
# 4.868e-4, 5.457e-4 (within): σ_q = 5.457e-4, the largest σ seen within.
TRACES = {
    "nll_reference": ([0.008, 0.0115, 0.01325, 0.012375, 0.0119375], 0.012375),
    "nll": ([0.015, 3.873e-4, 2.4103e-3, 9.662e-4, 6.117e-4, 4.868e-4, 5.457e-4], 5.457e-4),
}


@pytest.mark.parametrize("metric", TRACES)
def test_the_sigma_q_search_of_each_rule_on_a_fake_nll(metric, monkeypatch):
    """bayesianize_tfb with its metric's defaults (tolerance, bracket, steps) against the hand-computed traces."""
    current, draws_used = {}, set()
    monkeypatch.setattr(tfb, "svd_reparameterize", lambda model: {})
    monkeypatch.setattr(tfb, "set_noise_scale", lambda model, inverse, sigma_q: current.update(sigma=sigma_q))

    def anchor_probabilities(scoring, anchors):
        draws_used.add(scoring.sampler.whole_weights)
        return (MEAN_PROBS if scoring.n_samples == 0 else fake_bma_probs(current["sigma"])), None

    monkeypatch.setattr(tfb.ChoiceScoring, "ordered_probabilities", anchor_probabilities)
    result = bayesianize_tfb(None, None, [{}] * ANCHORS, metric=metric, draws="per_token")
    sigmas, chosen = TRACES[metric]
    assert [sigma for sigma, _ in result.trace] == pytest.approx(sigmas, rel=1e-3)
    assert result.sigma_q == pytest.approx(chosen, rel=1e-3) and current["sigma"] == result.sigma_q
    assert draws_used == {False}  # per-token draws, as asked
