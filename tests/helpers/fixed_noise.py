"""Test-only Axolotl plugin: BLoB's noise draws (both paths) replaced by a fixed one (ε = 1, every sign +1, so ΔA = σ).

Two runs that split the same batch differently into micro-batches then see the same noise, and their gradients
can be compared exactly; G still gets an NLL gradient through σ."""

import torch.nn.functional as F
from axolotl.integrations.base import BasePlugin

import axolotl_blob.blob.layer as blob_layer


def fixed_noise(x, std):
    return F.linear(x, std.to(x.dtype))


class FixedNoisePlugin(BasePlugin):
    def register(self, cfg):
        for path in blob_layer.NOISE_PATHS:
            blob_layer.NOISE_PATHS[path] = fixed_noise
