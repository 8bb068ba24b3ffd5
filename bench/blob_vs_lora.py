"""Training-step time and peak memory of BLoB relative to plain LoRA.

    python bench/blob_vs_lora.py [--model assets/smollm2-135m-instruct] [--steps 10] [--rounds 3] [--memory-lengths 64 512] [--json out.json]

Both arms: SmolLM2-135M with LoRA r 8 / alpha 16 on q_proj and v_proj, AdamW, batch 8 × 64 tokens, bf16 autocast on
CPU. A BLoB arm adds a noise path in every adapted layer (`flipout`, the reference's, or `rank_signs`) and BLoB's
optimizer (the reference σ update and the closed-form KL step around the same AdamW).

Time: the arms in one process, interleaved round by round. Memory: each arm and sequence length in a process of its
own, running two training steps; the peak resident set size (VmHWM) is reset once the model is built (loading the
weights peaks higher than training does), so the figure is the resident high-water mark of training, the model's
weights included; the ratio is over the LoRA process's at the same length.
"""

from __future__ import annotations

import argparse
import gc
import subprocess
import sys
from pathlib import Path

import torch

from common import (
    BLOB_ARMS,
    DEFAULT_MODEL,
    arm_optimizer,
    bf16_autocast,
    emit,
    interleaved_seconds,
    lora_model,
    summarise,
    token_batch,
    training_step,
)


def arm_step(arm: str, model_path: Path | None, batch: torch.Tensor):
    model = lora_model(model_path)
    return training_step(model, arm_optimizer(model, BLOB_ARMS[arm]), batch, bf16_autocast("cpu"))


def training_peak_rss_mb(arm: str, model_path: Path | None, length: int) -> float:
    """In this process: build the arm, reset the RSS high-water mark, run two steps at 8 × `length`, read it (MB)."""
    step = arm_step(arm, model_path, token_batch(8, length))
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM to the current RSS
    step()
    step()
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) / 1024


def peak_rss_mb(arm: str, model_path: Path | None, length: int) -> float:
    """Training's peak RSS (MB) in a fresh process of its own."""
    code = (
        "import sys; sys.path.insert(0, 'bench'); from pathlib import Path; import blob_vs_lora as b; "
        f"print(b.training_peak_rss_mb({arm!r}, Path({str(model_path)!r}), {length}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--memory-lengths", type=int, nargs="*", default=[64, 512])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    batch = token_batch()
    steps = {arm: arm_step(arm, args.model, batch) for arm in BLOB_ARMS}
    result = {"benchmark": "training step, BLoB vs LoRA", **summarise(interleaved_seconds(steps, args.steps, args.rounds), "lora")}
    for length in args.memory_lengths:
        peaks = {arm: peak_rss_mb(arm, args.model, length) for arm in BLOB_ARMS}
        result[f"peak_rss_mb_8x{length}"] = peaks
        result[f"peak_rss_ratio_to_lora_8x{length}"] = {arm: peak / peaks["lora"] for arm, peak in peaks.items()}
    emit(result, args.json)


if __name__ == "__main__":
    main()
