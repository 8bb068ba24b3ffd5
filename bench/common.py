"""Shared pieces of the benchmarks: the SmolLM2-135M-shaped LoRA model and interleaved timing.

Every benchmark times its arms in the same process, alternating round by round so that drift of the machine's
speed hits every arm alike, and reports medians and ratios against the plain baseline.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

SMOLLM2_SHAPE = dict(
    model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, tie_word_embeddings=True,
)  # fmt: skip
DEFAULT_MODEL = Path("assets/smollm2-135m-instruct")


def lora_model(path: Path | None) -> torch.nn.Module:
    """SmolLM2-135M (its weights when at hand, else the same shapes at random) with LoRA r 8 on q_proj, v_proj."""
    torch.manual_seed(0)
    if path is not None and path.is_dir():
        base = AutoModelForCausalLM.from_pretrained(path)
    else:
        base = AutoModelForCausalLM.from_config(AutoConfig.for_model(**SMOLLM2_SHAPE))
    return get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])).train()


def token_batch(batch_size: int = 8, length: int = 64) -> torch.Tensor:
    return torch.randint(10, 40_000, (batch_size, length), generator=torch.Generator().manual_seed(0))


def interleaved_seconds(arms: dict[str, Callable[[], None]], steps: int, rounds: int, warmup: int = 3) -> dict[str, list[float]]:
    """Seconds per call of each arm, one value per round; arms alternate within every round."""
    for arm in arms.values():
        for _ in range(warmup):
            arm()
    seconds: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(rounds):
        for name, arm in arms.items():
            start = time.perf_counter()
            for _ in range(steps):
                arm()
            seconds[name].append((time.perf_counter() - start) / steps)
    return seconds


def summarise(seconds: dict[str, list[float]], baseline: str) -> dict:
    """Median seconds per call and, per arm, the median over rounds of (arm time / baseline time)."""
    return {
        "threads": torch.get_num_threads(),
        "seconds_per_call": {name: statistics.median(values) for name, values in seconds.items()},
        f"ratio_to_{baseline}": {
            name: statistics.median(a / b for a, b in zip(values, seconds[baseline])) for name, values in seconds.items()
        },
    }


def emit(result: dict, json_path: Path | None) -> None:
    print(json.dumps(result, indent=2))
    if json_path:
        json_path.write_text(json.dumps(result, indent=2) + "\n")
