"""IVON's cost relative to AdamW, measured in the same process, interleaved.

    python bench/ivon_vs_adamw.py [--model assets/smollm2-135m-instruct] [--steps 50] [--rounds 3] [--before REV]
        [--json out.json]

1. Optimizer step alone, on the LoRA parameters of SmolLM2-135M (r 8 on q_proj, v_proj: 0.46 M parameters) with
   fixed gradients: torch AdamW (foreach), our IVON (flat state buffers, the default, and one tensor at a time),
   with `--before REV` the IVON of that git revision (e.g. c3445ca, per-parameter multi-tensor state), and the
   reference ivon-opt (if installed). An IVON step includes drawing the weight sample and restoring the mean, as in
   training.
2. A whole training step (forward, backward, optimizer step; batch 8 × 64 tokens, bf16 autocast on CPU), AdamW vs
   our IVON sampling around forward and backward as the Trainer integration does.
"""

from __future__ import annotations

import argparse
import subprocess
import types
from pathlib import Path

import torch

from axolotl_blob.ivon import IVON
from common import (
    DEFAULT_MODEL,
    AutocastFactory,
    bf16_autocast,
    emit,
    forward_backward,
    interleaved_seconds,
    lora_model,
    summarise,
    token_batch,
)

IVON_KWARGS = dict(lr=0.03, ess=1e6, hess_init=3e-4, weight_decay=0.0, clip_radius=1e-3, rescale_lr=False)


def ivon_at_revision(revision: str) -> type:
    """The IVON class as it was at a git revision of this repository (its optimizer module imports torch only)."""
    source = subprocess.run(
        ["git", "show", f"{revision}:axolotl_blob/ivon/optimizer.py"], capture_output=True, text=True, check=True
    ).stdout
    module = types.ModuleType(f"ivon_at_{revision}")
    exec(compile(source, f"{revision}:axolotl_blob/ivon/optimizer.py", "exec"), module.__dict__)
    return module.IVON


def optimizer_only_arms(params: list[torch.Tensor], before: str | None) -> dict:
    generator = torch.Generator().manual_seed(0)
    grads = [torch.randn(p.shape, generator=generator).to(p.device) * 1e-3 for p in params]

    def set_grads() -> None:
        for p, g in zip(params, grads):
            p.grad = g.clone()

    def plain(optimizer):
        def step() -> None:
            set_grads()
            optimizer.step()

        return step

    def sampled(optimizer):
        def step() -> None:
            with optimizer.sampled_params(train=True):
                set_grads()
            optimizer.step()

        return step

    arms = {
        "adamw": plain(torch.optim.AdamW(params, lr=3e-4, foreach=True)),
        "ivon": sampled(IVON(params, **IVON_KWARGS)),
        "ivon_per_tensor": sampled(IVON(params, foreach=False, **IVON_KWARGS)),
    }
    if before is not None:
        arms[f"ivon_at_{before}"] = sampled(ivon_at_revision(before)(params, **IVON_KWARGS))
    try:
        import ivon  # the GPLv3 reference, a test/bench-only dependency

        arms["ivon_opt_reference"] = sampled(ivon.IVON(params, **IVON_KWARGS))
    except ImportError:
        pass
    return arms


def training_arms(
    adamw_model: torch.nn.Module, ivon_model: torch.nn.Module, batch: torch.Tensor, autocast: AutocastFactory
) -> dict:
    """A whole training step of each: AdamW, and IVON sampling the weights around forward and backward."""
    adamw = torch.optim.AdamW([p for p in adamw_model.parameters() if p.requires_grad], lr=3e-4)
    ivon_opt = IVON([p for p in ivon_model.parameters() if p.requires_grad], grad_reduction="sum", **IVON_KWARGS)

    def adamw_step() -> None:
        forward_backward(adamw_model, batch, autocast)
        adamw.step()
        adamw_model.zero_grad(set_to_none=True)

    def ivon_step() -> None:
        with ivon_opt.sampled_params(train=True):
            forward_backward(ivon_model, batch, autocast)
        ivon_opt.step()
        ivon_model.zero_grad(set_to_none=True)

    return {"adamw": adamw_step, "ivon": ivon_step}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--train-steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--before", metavar="REV", default=None, help="also time the IVON of this git revision")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    params = [p for p in lora_model(args.model).parameters() if p.requires_grad]
    result = {
        "lora_parameters": sum(p.numel() for p in params),
        "optimizer_step": summarise(interleaved_seconds(optimizer_only_arms(params, args.before), args.steps, args.rounds), "adamw"),
        "training_step": summarise(
            interleaved_seconds(
                training_arms(lora_model(args.model), lora_model(args.model), token_batch(), bf16_autocast("cpu")),
                args.train_steps,
                args.rounds,
            ),
            "adamw",
        ),
    }
    emit({"benchmark": "IVON vs AdamW", **result}, args.json)


if __name__ == "__main__":
    main()
