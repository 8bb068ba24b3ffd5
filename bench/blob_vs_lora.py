"""Training-step cost of BLoB relative to plain LoRA, measured in the same process, interleaved.

    python bench/blob_vs_lora.py [--model assets/smollm2-135m-instruct] [--steps 20] [--rounds 3] [--json out.json]

Both arms: SmolLM2-135M with LoRA r 8 / alpha 16 on q_proj and v_proj, AdamW, batch 8 × 64 tokens, bf16 autocast on
CPU. The BLoB arm adds the Flipout noise path in every adapted layer and BLoB's optimizer (the reference σ update
and the closed-form KL step around the same AdamW).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from axolotl_blob.blob.model import bayesianize
from axolotl_blob.blob.optimizer import BlobOptimizer, set_kl_weight
from axolotl_blob.blob.trainer import posterior_parameters
from common import DEFAULT_MODEL, emit, interleaved_seconds, lora_model, summarise, token_batch


def training_step(model, optimizer, batch):
    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    batch = token_batch()
    arms = {}
    for name in ("lora", "blob"):
        model = lora_model(args.model)
        if name == "blob":
            bayesianize(model, init_std=0.05)
        means, sigmas = posterior_parameters(model)
        excluded = {id(g) for g in sigmas}
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad and id(p) not in excluded], lr=3e-4)
        if name == "blob":
            optimizer = BlobOptimizer(optimizer, means, sigmas, kl_lr=0.01, prior_std=0.2)
            set_kl_weight(optimizer.param_groups, 0.01)
        arms[name] = training_step(model, optimizer, batch)
    emit({"benchmark": "training step, BLoB vs LoRA", **summarise(interleaved_seconds(arms, args.steps, args.rounds), "lora")}, args.json)


if __name__ == "__main__":
    main()
