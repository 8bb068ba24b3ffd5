"""Keeping PEFT's adapter file a plain LoRA adapter (the posterior mean) on every supported PEFT.

PEFT ≤ 0.20 saved the tensors whose names contain ``lora_``; PEFT 0.21 saves every tensor under a tuner layer,
so BLoB's ``blob_G`` would land in ``adapter_model.safetensors`` too, and the file would no longer be the
LoRA adapter any consumer reads (they ignore unknown keys silently). The posterior belongs in its own sidecar
(:func:`axolotl_blob.blob.model.save_posterior`), so the adapter state PEFT collects drops it.
"""

from __future__ import annotations

import torch

from axolotl_blob.blob.layer import POSTERIOR_PARAM


def is_posterior_key(key: str) -> bool:
    return f".{POSTERIOR_PARAM}." in key or key.endswith(f".{POSTERIOR_PARAM}")


def keep_posterior_out_of_adapter_file() -> None:
    """Filter BLoB's factors out of the adapter state PEFT ≥ 0.21 saves; once per process, a no-op on older PEFT
    (whose state has no such keys) and for models without BLoB layers."""
    from peft.tuners.lora.model import LoraModel

    original = getattr(LoraModel, "_get_adapter_state_dict", None)
    if original is None or getattr(original, "_axolotl_blob_patched", False):
        return

    def without_posterior(cls, *args, **kwargs) -> dict[str, torch.Tensor]:
        state = original.__func__(cls, *args, **kwargs)
        return {key: value for key, value in state.items() if not is_posterior_key(key)}

    without_posterior._axolotl_blob_patched = True
    LoraModel._get_adapter_state_dict = classmethod(without_posterior)
