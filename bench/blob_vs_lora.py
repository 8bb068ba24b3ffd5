"""Training-step cost of BLoB relative to plain LoRA, measured in the same process, interleaved.

    python bench/blob_vs_lora.py [--model assets/smollm2-135m-instruct] [--steps 20] [--rounds 3] [--json out.json]

Both arms: the same base model, LoRA r 8 / alpha 16 on q_proj and v_proj, AdamW, batch 8 × 64 tokens, bf16
autocast on CPU. The BLoB arm adds the Flipout noise path in every adapted layer and the closed-form KL step after
each optimizer step. Arms alternate round by round so drift of the machine's speed hits both alike; the reported
ratio is the median over rounds of (BLoB time / LoRA time).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

from axolotl_blob.blob.model import bayesianize, kl_sgd_step

SMOLLM2_SHAPE = dict(
    model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, tie_word_embeddings=True,
)  # fmt: skip


def base_model(path: Path | None) -> torch.nn.Module:
    if path is not None and path.is_dir():
        return AutoModelForCausalLM.from_pretrained(path)
    torch.manual_seed(0)  # no weights at hand: the same shapes with random weights cost the same
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(**SMOLLM2_SHAPE))


def build_arm(path: Path | None, blob: bool):
    model = get_peft_model(base_model(path), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    if blob:
        bayesianize(model, init_std=0.05)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-4)
    return model.train(), optimizer


def time_steps(model, optimizer, batch: torch.Tensor, steps: int, blob: bool) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        if blob:
            kl_sgd_step(model, prior_std=0.2, step_size=1e-4)
        optimizer.zero_grad(set_to_none=True)
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=Path("assets/smollm2-135m-instruct"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    torch.manual_seed(0)
    batch = torch.randint(10, 40_000, (8, 64))
    arms = {"lora": build_arm(args.model, blob=False), "blob": build_arm(args.model, blob=True)}
    for name, (model, optimizer) in arms.items():  # warm-up: allocator, autocast caches
        time_steps(model, optimizer, batch, 3, blob=name == "blob")
    seconds = {name: [] for name in arms}
    for _ in range(args.rounds):
        for name, (model, optimizer) in arms.items():
            seconds[name].append(time_steps(model, optimizer, batch, args.steps, blob=name == "blob"))
    ratios = [b / lo for b, lo in zip(seconds["blob"], seconds["lora"])]
    result = {
        "threads": torch.get_num_threads(),
        "steps_per_round": args.steps,
        "seconds_per_step": {name: statistics.median(values) for name, values in seconds.items()},
        "blob_over_lora": statistics.median(ratios),
        "ratios_per_round": ratios,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
