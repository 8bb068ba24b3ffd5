"""Rank scheduling by posterior SNR (IVON) against AdaLoRA's sensitivity (AdamW), measured in one run.

    python bench/rank_snr_vs_sensitivity.py [--model assets/smollm2-135m-instruct] [--steps 100] [--json out.json]

1. Scheduler overhead per run, in process: SmolLM2-135M with AdaLoRA init_r 12 on q_proj and v_proj (60 modules),
   the scheduler called after each of T optimizer steps exactly as in training (score bookkeeping every step up to
   T − t_final, an allocation every ΔT steps, the final mask after), `sensitivity` reading fixed gradients and
   `snr` reading an IVON state. Arms alternate round by round; medians.
2. End to end: `axolotl.cli.train` on the two example configs (AdaLoRA + IVON + snr and AdaLoRA + AdamW +
   sensitivity), shortened to --steps optimizer steps with the schedule scaled to match and no calibration pass;
   wall time of the process, the Trainer's train_runtime, and the mean train loss; --e2e-rounds runs of each,
   alternating, medians.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from peft import AdaLoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

from axolotl_blob.ivon import IVON
from axolotl_blob.rank.budget import BudgetSchedule
from axolotl_blob.rank.importance import SensitivityImportance, SnrImportance
from axolotl_blob.rank.modules import adapted_modules
from axolotl_blob.rank.scheduler import RankScheduler
from common import DEFAULT_MODEL, SMOLLM2_SHAPE, emit

CONFIGS = {
    "adalora_ivon_snr": Path("example_configs/adalora-ivon-snr-smollm2-sarcasm.yml"),
    "adalora_adamw_sensitivity": Path("example_configs/adalora-sensitivity-smollm2-sarcasm.yml"),
}


def adalora_model(path: Path | None, total_steps: int) -> torch.nn.Module:
    torch.manual_seed(0)
    if path is not None and path.is_dir():
        base = AutoModelForCausalLM.from_pretrained(path)
    else:
        base = AutoModelForCausalLM.from_config(AutoConfig.for_model(**SMOLLM2_SHAPE))
    config = AdaLoraConfig(init_r=12, target_r=8, target_modules=["q_proj", "v_proj"], total_step=total_steps)
    return get_peft_model(base, config)


def scheduler_overhead(model_path: Path | None, total_steps: int, rounds: int) -> dict:
    model = adalora_model(model_path, total_steps)
    modules = adapted_modules(model)
    params = [p for p in model.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(0)
    grads = [torch.randn(p.shape, generator=generator) * 1e-3 for p in params]
    ivon = IVON(params, lr=0.1, ess=4000.0)
    with ivon.sampled_params(train=True):  # one real step, so the posterior state exists
        for p, g in zip(params, grads):
            p.grad = g.clone()
    ivon.step()
    for p, g in zip(params, grads):
        p.grad = g  # what the sensitivity score reads after every step
    t_init, t_final = total_steps // 10, total_steps * 3 // 10
    schedule = BudgetSchedule(12 * len(modules), 8 * len(modules), total_steps, t_init, t_final, delta_t=10)
    arms = {
        "sensitivity": lambda: RankScheduler(modules, schedule, SensitivityImportance(0.85, 0.85)),
        "snr": lambda: RankScheduler(modules, schedule, SnrImportance(folded=False, posterior=ivon), ivon),
        "snr_abs": lambda: RankScheduler(modules, schedule, SnrImportance(folded=True, posterior=ivon), ivon),
    }
    seconds: dict[str, list[float]] = {name: [] for name in arms}
    state_bytes = {}
    for _ in range(rounds):
        for name, make in arms.items():
            scheduler = make()
            start = time.perf_counter()
            for step in range(1, total_steps + 1):
                scheduler.step(step)
            seconds[name].append(time.perf_counter() - start)
            state_bytes[name] = sum(t.numel() * t.element_size() for t in scheduler.state_dict().values())
    return {
        "modules": len(modules),
        "adapter_parameters": sum(p.numel() for p in params),
        "total_steps": total_steps,
        "schedule": {"t_init": t_init, "t_final": t_final, "delta_t": 10},
        "seconds_per_run": {name: statistics.median(v) for name, v in seconds.items()},
        "ratio_to_sensitivity": {
            name: statistics.median(a / b for a, b in zip(v, seconds["sensitivity"])) for name, v in seconds.items()
        },
        "scheduler_state_bytes": state_bytes,
    }


def shortened_config(path: Path, steps: int, output_dir: Path) -> dict:
    config = yaml.safe_load(path.read_text())
    scale = steps / 500  # the examples run 500 steps
    config.update(max_steps=steps, output_dir=str(output_dir), logging_steps=max(steps // 4, 1))
    config.pop("calibration", None)
    schedule = config["rank_scheduler"]
    schedule.update(t_init=round(schedule["t_init"] * scale), t_final=round(schedule["t_final"] * scale),
                    delta_t=max(round(schedule["delta_t"] * scale), 1))  # fmt: skip
    return config


def run_config(name: str, path: Path, steps: int, workdir: Path) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "AXOLOTL_DO_NOT_TRACK": "1", "WANDB_MODE": "disabled"}
    config_path = workdir / f"{name}.yml"
    config_path.write_text(yaml.safe_dump(shortened_config(path, steps, workdir / name)))
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "axolotl.cli.train", str(config_path)], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    log = run.stdout + run.stderr
    if run.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{log[-3000:]}")
    active = re.findall(r"'active_rank': '?([0-9]+)", log)
    return {
        "wall_seconds": wall,
        "train_runtime_seconds": float(re.findall(r"'train_runtime': '?([0-9.]+)", log)[-1]),
        "train_loss": float(re.findall(r"'train_loss': '?([0-9.]+)", log)[-1]),
        "final_active_rank": int(active[-1]) if active else None,
    }


def end_to_end(steps: int, rounds: int, workdir: Path) -> dict:
    runs: dict[str, list[dict]] = {name: [] for name in CONFIGS}
    for _ in range(rounds):
        for name, path in CONFIGS.items():
            runs[name].append(run_config(name, path, steps, workdir))
    ours, base = runs["adalora_ivon_snr"], runs["adalora_adamw_sensitivity"]

    def median_ratio(key: str) -> float:
        return round(statistics.median(a[key] / b[key] for a, b in zip(ours, base)), 3)

    return {
        "steps": steps,
        "rounds": rounds,
        "runs": runs,
        "ratio_ivon_snr_to_adamw_sensitivity": {"wall": median_ratio("wall_seconds"), "train_runtime": median_ratio("train_runtime_seconds")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps of the end-to-end runs")
    parser.add_argument("--scheduler-steps", type=int, default=500, help="steps of the simulated scheduler run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--e2e-rounds", type=int, default=2)
    parser.add_argument("--skip-e2e", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    result = {"benchmark": "rank scheduling: SNR (IVON) vs sensitivity (AdamW)", "threads": torch.get_num_threads()}
    result["scheduler_overhead"] = scheduler_overhead(args.model, args.scheduler_steps, args.rounds)
    if not args.skip_e2e:
        with tempfile.TemporaryDirectory() as workdir:
            result["end_to_end"] = end_to_end(args.steps, args.e2e_rounds, Path(workdir))
    emit(result, args.json)


if __name__ == "__main__":
    main()
