"""`blob.eval_draws`: how evaluation samples a BLoB posterior, saved with it and read back (an older file without
the key reads as whole weights, what evaluation drew before the setting existed)."""

import json

import pytest
import torch

from axolotl_blob.args import BlobSettings
from axolotl_blob.blob.model import POSTERIOR_CONFIG_FILE, read_posterior_spec, save_posterior, saved_eval_draws
from axolotl_blob.blob.trainer import posterior_spec
from axolotl_blob.sampling import BlobSampler, DeterministicSampler, sampler_for
from conftest import tiny_blob_model


@pytest.mark.parametrize("draws", ["per_token", "whole_weights"])
def test_the_setting_is_saved_with_the_posterior_and_read_back(draws, tiny_model_dir, tmp_path):
    model = tiny_blob_model(tiny_model_dir)
    save_posterior(model, tmp_path, posterior_spec(BlobSettings(eval_draws=draws)))
    assert json.loads((tmp_path / POSTERIOR_CONFIG_FILE).read_text())["eval_draws"] == draws
    assert read_posterior_spec(tmp_path).eval_draws == draws == saved_eval_draws(tmp_path)


def test_a_posterior_saved_before_the_setting_reads_as_whole_weights(tiny_model_dir, tmp_path):
    save_posterior(tiny_blob_model(tiny_model_dir), tmp_path, posterior_spec(BlobSettings(eval_draws="per_token")))
    (tmp_path / POSTERIOR_CONFIG_FILE).write_text('{"prior_std": 0.2, "init_std": 0.05, "sigma": "G**2", "noise": "flipout"}')
    assert saved_eval_draws(tmp_path) == "whole_weights"
    assert saved_eval_draws(tmp_path / "plain-lora") == "whole_weights"  # no posterior: nothing to sample


@pytest.mark.parametrize("draws", ["per_token", "whole_weights"])
def test_the_sampler_draws_as_the_setting_says(draws, tiny_model_dir):
    """per_token: the training noise path (Flipout: every token its own perturbation); whole_weights: one A per layer
    and forward, so two positions holding the same token see the same draw."""
    model = tiny_blob_model(tiny_model_dir).eval()
    sampler = sampler_for(model, draws=draws)
    assert isinstance(sampler, BlobSampler) and sampler.whole_weights == (draws == "whole_weights")
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(1, 1, layer.in_features).expand(1, 6, -1)  # one input at six positions
    torch.manual_seed(0)
    with torch.no_grad():
        for _ in sampler.draws(1):
            out = layer(x)
    with torch.no_grad():
        for _ in sampler.draws(0):
            mean = layer(x)
    draw_effect = (out - mean).abs().max()
    spread_over_positions = (out - out[:, :1]).abs().max()
    assert draw_effect > 1e-2  # a draw, not the mean
    # Not bitwise: a CPU matmul may round rows in different kernel blocks differently (CI saw it).
    same_draw_everywhere = spread_over_positions < 1e-4 * draw_effect
    assert same_draw_everywhere == (draws == "whole_weights")


def test_a_point_estimate_has_nothing_to_draw():
    assert isinstance(sampler_for(torch.nn.Linear(2, 2), draws="per_token"), DeterministicSampler)
