"""The BLoB layer against plain PEFT LoRA, the Flipout statistics, gradients, the KL step, save/load."""

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from axolotl_blob.blob.kl import gaussian_kl
from axolotl_blob.blob.layer import posterior_std
from axolotl_blob.blob.model import (
    PosteriorSpec,
    bayesianize,
    blob_layers,
    kl_divergence,
    load_posterior,
    posterior_sampling,
    save_posterior,
)

D_IN, D_OUT, RANK, ALPHA = 12, 6, 4, 8


class TwoLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(D_IN, D_OUT)
        self.v_proj = nn.Linear(D_IN, D_OUT)

    def forward(self, x):
        return self.q_proj(x) + self.v_proj(x)


def base_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return TwoLinear()


def lora_model(seed: int = 0) -> nn.Module:
    model = get_peft_model(base_model(seed), LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["q_proj", "v_proj"]))
    for name, param in model.named_parameters():  # non-zero B so the adapter path matters
        if "lora_B" in name:
            nn.init.normal_(param, std=0.5)
    return model


def blob_model(seed: int = 0, init_std: float = 0.3, noise: str = "flipout") -> nn.Module:
    model = lora_model(seed)
    bayesianize(model, init_std=init_std, noise=noise)
    return model


def test_posterior_mean_equals_plain_lora_exactly():
    plain, blob = lora_model(), blob_model()
    x = torch.randn(3, 5, D_IN)
    plain.eval(), blob.eval()
    torch.testing.assert_close(blob(x), plain(x), rtol=0, atol=0)
    blob.train()
    with posterior_sampling(blob, enabled=False):
        torch.testing.assert_close(blob(x), plain(x), rtol=0, atol=0)


def test_sampling_follows_train_mode_unless_forced():
    model = blob_model()
    x = torch.randn(2, D_IN)
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))
    with posterior_sampling(model, enabled=True):
        assert not torch.equal(model(x), model(x))
    assert torch.equal(model(x), model(x))


def test_initial_sigma_range():
    model = blob_model(init_std=0.05)
    for _, layer, adapter in blob_layers(model):
        sigma = posterior_std(layer.blob_G[adapter])
        assert sigma.min() >= 0.05**2 / 2 - 1e-9 and sigma.max() <= 0.05**2 + 1e-9
        assert sigma.shape == layer.lora_A[adapter].weight.shape


@pytest.mark.parametrize("noise", ["flipout", "rank_signs"])
def test_noise_path_mean_and_variance_match_the_analytic_ones(noise):
    """One token, many draws: mean → N = 0 output; variance → s² Σ_k B_ik² Σ_j σ_kj² x_j² (per linear).

    Rows of one call share the Gaussian draw E and differ by their signs, so draws are pooled over many calls.
    """
    model = blob_model(init_std=0.4, noise=noise)
    layer = model.base_model.model.q_proj
    x = torch.randn(1, D_IN)
    layer.eval()
    mean_output = layer(x)
    calls, rows = 5_000, 8
    draws = calls * rows
    with posterior_sampling(model, enabled=True), torch.no_grad():
        samples = torch.cat([layer(x.expand(rows, D_IN)) for _ in range(calls)])
    sigma = posterior_std(layer.blob_G["default"])
    weight_b, scale = layer.lora_B["default"].weight, layer.scaling["default"]
    per_rank_variance = (sigma**2 * x**2).sum(dim=1)
    analytic_variance = scale**2 * (weight_b**2 * per_rank_variance).sum(dim=1)
    empirical_mean, empirical_variance = samples.mean(0), samples.var(0)
    standard_error = (analytic_variance / draws).sqrt()
    assert torch.all((empirical_mean - mean_output[0]).abs() < 5 * standard_error)
    torch.testing.assert_close(empirical_variance, analytic_variance.detach(), rtol=0.05, atol=0)


@pytest.mark.parametrize("noise", ["flipout", "rank_signs"])
def test_tokens_of_one_call_get_uncorrelated_perturbations(noise):
    """Two identical tokens in one call share E: their perturbations must still be uncorrelated (covariance 0 per
    output, within 5 standard errors of the sample covariance), and each keeps the full variance."""
    model = blob_model(init_std=0.4, noise=noise)
    layer = model.base_model.model.q_proj
    x = torch.randn(1, D_IN)
    layer.eval()
    mean_output = layer(x)[0]
    calls = 20_000
    with posterior_sampling(model, enabled=True), torch.no_grad():
        pairs = torch.stack([layer(x.expand(2, D_IN)) for _ in range(calls)]) - mean_output  # (calls, 2, D_OUT)
    first, second = pairs[:, 0], pairs[:, 1]
    covariance = (first * second).mean(0)
    standard_error = (first.square() * second.square()).mean(0).sqrt() / calls**0.5
    assert torch.all(covariance.abs() < 5 * standard_error)
    torch.testing.assert_close(first.var(0), second.var(0), rtol=0.1, atol=0)


def test_rank_signs_equal_a_per_token_weight_computation():
    """rank_signs: token n computes s·B(M + diag(r_n) E)x_n with E = σ ⊙ ε; output and every gradient equal that
    reference built from the same draws (ε first, then the signs)."""
    model = blob_model(init_std=0.4, noise="rank_signs")
    layer = model.base_model.model.q_proj
    a, b, g = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.blob_G["default"]
    x = torch.randn(5, D_IN)
    with posterior_sampling(model, enabled=True):
        torch.manual_seed(7)
        out = layer(x)
    grads = torch.autograd.grad(out.square().sum(), (a, b, g))
    torch.manual_seed(7)
    epsilon = torch.randn_like(g)
    signs = torch.randint(0, 2, (5, RANK)).float().mul(2).sub(1)
    noise = posterior_std(g) * epsilon
    per_token_a = a + signs[:, :, None] * noise  # (tokens, r, d_in)
    hidden = torch.einsum("nrd,nd->nr", per_token_a, x)
    expected = layer.base_layer(x) + hidden @ b.T * layer.scaling["default"]
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    for got, want in zip(grads, torch.autograd.grad(expected.square().sum(), (a, b, g))):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_whole_weight_draws_equal_one_sampled_a_for_the_whole_batch():
    """Prediction's draws: every token of every row computes s·B(M + σ ⊙ ε)x with one ε per layer and forward,
    the draw made from the same generator state; the sampling context restores the training noise path."""
    model = blob_model(init_std=0.4)
    layer = model.base_model.model.q_proj
    a, b, g = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.blob_G["default"]
    x = torch.randn(2, 3, D_IN)
    with posterior_sampling(model, enabled=True, whole_weights=True), torch.no_grad():
        torch.manual_seed(7)
        out = layer(x)
        torch.manual_seed(7)
        sampled_a = a + posterior_std(g) * torch.randn_like(g)
        expected = layer.base_layer(x) + x @ sampled_a.T @ b.T * layer.scaling["default"]
        torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
        identical = layer(x[:1, :1].expand(2, 3, D_IN))
        # one A for all six tokens (to rounding: a CPU matmul may round rows in different kernel blocks differently)
        torch.testing.assert_close(identical, identical[:1, :1].expand_as(identical), rtol=1e-6, atol=1e-6)
        assert not torch.equal(layer(x), out)  # a fresh A per forward
    assert layer.blob_sampling is None and layer.blob_weight_draws is False


def test_whole_weight_draws_match_the_analytic_mean_and_variance():
    """One draw per forward: across forwards the mean → N = 0 output and the variance → s² Σ_k B_ik² Σ_j σ_kj² x_j²,
    the same marginal as the training noise paths."""
    model = blob_model(init_std=0.4)
    layer = model.base_model.model.q_proj
    x = torch.randn(1, D_IN)
    layer.eval()
    mean_output = layer(x)[0]
    draws = 20_000
    with posterior_sampling(model, enabled=True, whole_weights=True), torch.no_grad():
        samples = torch.cat([layer(x) for _ in range(draws)])
    sigma = posterior_std(layer.blob_G["default"])
    weight_b, scale = layer.lora_B["default"].weight, layer.scaling["default"]
    analytic_variance = scale**2 * (weight_b**2 * (sigma**2 * x**2).sum(dim=1)).sum(dim=1)
    standard_error = (analytic_variance / draws).sqrt()
    assert torch.all((samples.mean(0) - mean_output).abs() < 5 * standard_error)
    torch.testing.assert_close(samples.var(0), analytic_variance.detach(), rtol=0.05, atol=0)


def test_an_unknown_noise_path_is_refused():
    with pytest.raises(ValueError, match="unknown BLoB noise path 'gaussian'"):
        blob_model(noise="gaussian")


def test_identical_tokens_get_different_perturbations():
    model = blob_model()
    token = torch.randn(D_IN)
    batch = token.expand(2, 3, D_IN).clone()
    model.train()
    out = model(batch)
    assert not torch.allclose(out[0, 0], out[0, 1])
    assert not torch.allclose(out[0, 0], out[1, 0])


def test_gradients_reach_mean_b_and_g():
    model = blob_model()
    model.train()
    model(torch.randn(4, D_IN)).square().sum().backward()
    for _, layer, adapter in blob_layers(model):
        for param in (layer.lora_A[adapter].weight, layer.lora_B[adapter].weight, layer.blob_G[adapter]):
            assert param.grad is not None and param.grad.abs().sum() > 0


def test_model_kl_is_the_sum_of_layer_kls():
    model = blob_model()
    expected = sum(
        gaussian_kl(layer.lora_A[a].weight, posterior_std(layer.blob_G[a]), 0.2) for _, layer, a in blob_layers(model)
    )
    torch.testing.assert_close(kl_divergence(model, 0.2), expected)


def test_save_and_load_round_trip_restores_identical_samples(tmp_path):
    model = blob_model(seed=3)
    with torch.no_grad():
        for _, layer, adapter in blob_layers(model):
            layer.blob_G[adapter].mul_(1.7)  # something init would not reproduce
    model.save_pretrained(tmp_path)
    save_posterior(model, tmp_path, PosteriorSpec(prior_std=0.2, init_std=0.3))

    restored = PeftModel.from_pretrained(base_model(seed=3), tmp_path, is_trainable=True)
    bayesianize(restored, init_std=0.3)
    load_posterior(restored, tmp_path)
    x = torch.randn(5, D_IN)
    model.train(), restored.train()
    torch.manual_seed(11)
    expected = model(x)
    torch.manual_seed(11)
    torch.testing.assert_close(restored(x), expected, rtol=0, atol=0)


def test_plain_peft_loads_the_adapter_as_the_posterior_mean(tmp_path):
    model = blob_model(seed=4)
    model.save_pretrained(tmp_path)
    save_posterior(model, tmp_path, PosteriorSpec(prior_std=0.2, init_std=0.3))
    plain = PeftModel.from_pretrained(base_model(seed=4), tmp_path)
    x = torch.randn(3, D_IN)
    model.eval()
    torch.testing.assert_close(plain(x), model(x), rtol=0, atol=0)
    assert not any("blob" in name for name, _ in plain.named_parameters())


def test_loading_a_mismatched_posterior_fails_clearly(tmp_path):
    model = blob_model()
    save_posterior(model, tmp_path, PosteriorSpec(prior_std=0.2, init_std=0.3))
    other = get_peft_model(TwoLinear(), LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["q_proj"]))
    bayesianize(other, init_std=0.3)
    with pytest.raises(ValueError, match="does not match the model's BLoB layers"):
        load_posterior(other, tmp_path)
    with pytest.raises(FileNotFoundError, match="blob_posterior.safetensors"):
        load_posterior(other, tmp_path / "nowhere")


def test_bayesianize_without_lora_layers_fails():
    with pytest.raises(ValueError, match="lora_target_modules"):
        bayesianize(TwoLinear(), init_std=0.05)


def test_merging_folds_in_the_posterior_mean():
    model = blob_model(seed=5)
    x = torch.randn(3, D_IN)
    model.eval()
    expected = model(x)
    merged = model.merge_and_unload()
    torch.testing.assert_close(merged(x), expected, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_forward_and_backward():
    model = blob_model()
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, D_IN))
    out.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for n, p in model.named_parameters() if p.requires_grad)


def test_gradient_checkpointing_replays_the_same_noise(tiny_model_dir):
    """Recomputation in backward must redraw the identical Flipout sample (checkpointing preserves the RNG)."""
    from transformers import AutoModelForCausalLM

    def gradients(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        torch.manual_seed(0)
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        bayesianize(model, init_std=0.3)
        model.train()
        ids = torch.randint(4, 100, (2, 12))
        torch.manual_seed(1)
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = gradients(False), gradients(True)
    assert plain.keys() == checkpointed.keys() and any("blob_G" in name for name in plain)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_sampled_outputs_do_not_depend_on_the_attention_implementation(tiny_model_dir):
    """The posterior lives in the linear layers, so eager and sdpa attention see the same draws."""
    from transformers import AutoModelForCausalLM

    outputs = {}
    for implementation in ("eager", "sdpa"):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=implementation)
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        bayesianize(model, init_std=0.3)
        ids = torch.randint(4, 100, (2, 10), generator=torch.Generator().manual_seed(1))
        torch.manual_seed(2)
        with posterior_sampling(model, enabled=True):
            outputs[implementation] = model(input_ids=ids).logits
    torch.testing.assert_close(outputs["eager"], outputs["sdpa"], rtol=1e-4, atol=1e-4)


def test_the_noise_path_is_saved_with_the_posterior_and_restored_by_evaluate(tiny_model_dir, tmp_path):
    """An adapter trained with rank_signs is evaluated with rank_signs (the same draws for the same seed); a
    posterior config written before `noise` existed reads as Flipout."""
    from axolotl.utils.dict import DictDefault
    from transformers import AutoModelForCausalLM

    from axolotl_blob.blob.model import POSTERIOR_CONFIG_FILE, read_posterior_spec
    from axolotl_blob.evaluate import load_adapter_model

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=4, target_modules=["q_proj"]))
    bayesianize(model, init_std=0.3, noise="rank_signs")
    model.save_pretrained(tmp_path)
    save_posterior(model, tmp_path, PosteriorSpec(prior_std=0.2, init_std=0.3, noise="rank_signs"))
    restored = load_adapter_model(DictDefault(base_model=str(tiny_model_dir)), tmp_path)
    assert {layer.lora_variant[a].noise for _, layer, a in blob_layers(restored)} == {"rank_signs"}
    ids = torch.randint(4, 100, (2, 9))
    outputs = []
    for candidate in (model, restored):
        with torch.no_grad(), posterior_sampling(candidate, enabled=True):
            torch.manual_seed(5)
            outputs.append(candidate(input_ids=ids).logits)
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=0)
    (tmp_path / POSTERIOR_CONFIG_FILE).write_text('{"prior_std": 0.2, "init_std": 0.3, "sigma": "G**2"}')
    assert read_posterior_spec(tmp_path).noise == "flipout"
