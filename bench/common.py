"""Shared pieces of the benchmarks: the LoRA models they train, BLoB's training step, and interleaved timing.

Every benchmark times its arms in the same process, alternating round by round so that drift of the machine's
speed hits every arm alike, and reports medians and ratios against the plain baseline.

Only torch, transformers, peft and the project's science modules are imported here, so the GPU check
(`gpu_check.py`) runs on a machine image without Axolotl.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

from axolotl_blob.blob.model import bayesianize, posterior_parameters
from axolotl_blob.blob.optimizer import BlobOptimizer, set_kl_weight

SMOLLM2_SHAPE = dict(
    model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, tie_word_embeddings=True,
)  # fmt: skip
LLAMA_1B_SHAPE = dict(
    model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
    num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, tie_word_embeddings=True,
)  # fmt: skip  # Llama-3.2-1B's shapes: 1.24 B parameters
TINY_SHAPE = dict(
    model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=1024, max_position_embeddings=512, tie_word_embeddings=True,
)  # fmt: skip
DEFAULT_MODEL = Path("assets/smollm2-135m-instruct")
AutocastFactory = Callable[[], contextlib.AbstractContextManager]
Timer = Callable[[Callable[[], object], int], float]

# arm name → BLoB noise path (None: plain LoRA)
BLOB_ARMS = {"lora": None, "blob_flipout": "flipout", "blob_rank_signs": "rank_signs"}


def with_lora(base: torch.nn.Module) -> torch.nn.Module:
    """LoRA r 8 / alpha 16 on q_proj, v_proj (PEFT keeps the adapters in fp32 over a bf16 base), in train mode."""
    return get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])).train()


def lora_model(path: Path | None) -> torch.nn.Module:
    """SmolLM2-135M (its weights when at hand, else the same shapes at random) with LoRA."""
    torch.manual_seed(0)
    if path is not None and path.is_dir():
        return with_lora(AutoModelForCausalLM.from_pretrained(path))
    return with_lora(AutoModelForCausalLM.from_config(AutoConfig.for_model(**SMOLLM2_SHAPE)))


def random_lora_model(
    shape: dict, device: str = "cpu", dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"
) -> torch.nn.Module:
    """A model of `shape` with random weights, made directly on `device` in `dtype` (no download, no host copy of a
    GPU model), with LoRA."""
    torch.manual_seed(0)
    with torch.device(device):
        base = AutoModelForCausalLM.from_config(
            AutoConfig.for_model(**shape), dtype=dtype, attn_implementation=attn_implementation
        )
    return with_lora(base)


@torch.no_grad()
def trained_looking(model: torch.nn.Module, std: float = 0.02) -> torch.nn.Module:
    """LoRA's B drawn non-zero, as after training: the adapter (and BLoB's noise through it) then moves the outputs."""
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.normal_(std=std)
    return model


def token_batch(batch_size: int = 8, length: int = 64, high: int = 40_000, low: int = 10) -> torch.Tensor:
    return torch.randint(low, high, (batch_size, length), generator=torch.Generator().manual_seed(0))


def bf16_autocast(device: str) -> AutocastFactory:
    return lambda: torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def arm_optimizer(model: torch.nn.Module, noise: str | None, lr: float = 3e-4) -> torch.optim.Optimizer:
    """AdamW over the LoRA parameters; with a `noise` path the model is first made a BLoB model and the AdamW put
    inside BLoB's optimizer (the reference σ update and the closed-form KL step), as in training."""
    if noise is not None:
        bayesianize(model, init_std=0.05, noise=noise)
    means, sigmas = posterior_parameters(model)
    excluded = {id(g) for g in sigmas}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad and id(p) not in excluded], lr=lr)
    if noise is None:
        return optimizer
    optimizer = BlobOptimizer(optimizer, means, sigmas, kl_lr=0.002, prior_std=0.2)
    set_kl_weight(optimizer.param_groups, 0.01)
    return optimizer


def forward_backward(model: torch.nn.Module, batch: torch.Tensor, autocast: AutocastFactory) -> torch.Tensor:
    """The language-model loss of `batch` on itself, backpropagated; returns the loss (detached, no host sync)."""
    with autocast():
        loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    return loss.detach()


def training_step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: torch.Tensor, autocast: AutocastFactory
) -> Callable[[], torch.Tensor]:
    def step() -> torch.Tensor:
        loss = forward_backward(model, batch, autocast)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def wall_seconds(call: Callable[[], object], times: int) -> float:
    """Seconds per call by the host's clock."""
    start = time.perf_counter()
    for _ in range(times):
        call()
    return (time.perf_counter() - start) / times


def cuda_event_seconds(call: Callable[[], object], times: int) -> float:
    """Seconds per call between two CUDA events: the GPU's own clock, from the first call's work to the last's."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(times):
        call()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1000 / times


def interleaved_seconds(
    arms: dict[str, Callable[[], object]],
    steps: int,
    rounds: int,
    warmup: int = 3,
    timer: Timer = wall_seconds,
    deadline: float | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of each arm, one value per round; arms alternate within every round. Past `deadline` (a
    `time.monotonic()` value) no further round starts, so a slow machine returns fewer rounds (at least one)."""
    for arm in arms.values():
        for _ in range(warmup):
            arm()
    seconds: dict[str, list[float]] = {name: [] for name in arms}
    for done in range(rounds):
        if done and deadline is not None and time.monotonic() > deadline:
            break
        for name, arm in arms.items():
            seconds[name].append(timer(arm, steps))
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
