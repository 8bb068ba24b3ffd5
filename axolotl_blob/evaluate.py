"""Post-hoc calibration evaluation of a saved adapter (BLoB or plain LoRA) on a config's calibration datasets.

    python -m axolotl_blob.evaluate CONFIG --adapter DIR [--samples N] [--json OUT]

The base model and tokenizer come from the config, exactly as training loaded them; a BLoB adapter directory
(one with blob_posterior.safetensors) is evaluated with its full posterior, anything else as a point estimate.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

from axolotl_blob.blob.model import bayesianize, load_posterior, missing_posterior_files, read_posterior_spec
from axolotl_blob.calibration.report import format_table, scalar_metrics
from axolotl_blob.io import non_finite_as_null, write_json
from axolotl_blob.sampling import sampler_for


def load_adapter_model(cfg, adapter_dir: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(cfg.base_model, dtype=cfg.torch_dtype or torch.float32)
    model = PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    if not missing_posterior_files(adapter_dir):
        bayesianize(model, read_posterior_spec(adapter_dir).init_std)
        load_posterior(model, adapter_dir)
    return model


def inference_device_and_autocast(cfg):
    """The GPU when there is one, and bf16 autocast when the config trains in bf16 (as training scored)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    autocast = (lambda: torch.autocast(device, dtype=torch.bfloat16)) if cfg.bf16 is True else contextlib.nullcontext
    return device, autocast


def main(argv: list[str] | None = None) -> dict[str, dict]:
    parser = argparse.ArgumentParser(prog="python -m axolotl_blob.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="the Axolotl YAML config (its calibration: block names the datasets)")
    parser.add_argument("--adapter", required=True, type=Path, help="directory of the saved adapter")
    parser.add_argument("--samples", type=int, default=None, help="posterior samples; 0 = posterior mean")
    parser.add_argument("--json", type=Path, default=None, help="write {dataset: {acc, ece, …, aurc_by_confidence, …, ood_auroc_by_mutual_info}}")
    args = parser.parse_args(argv)

    from axolotl.cli.config import load_cfg
    from axolotl.loaders import load_tokenizer

    from axolotl_blob.plugin import calibration_evaluator

    cfg = load_cfg(args.config)
    if not cfg.calibration:
        parser.error(f"{args.config} has no 'calibration:' block naming datasets to evaluate")
    if not (args.adapter / "adapter_config.json").is_file():
        parser.error(f"--adapter {args.adapter}: no adapter_config.json there")
    evaluator = calibration_evaluator(cfg, args.samples)
    if evaluator.settings.mode != "choices":
        parser.error("post-hoc evaluation scores multiple-choice datasets: set calibration.mode: choices")
    if args.samples is not None and args.samples < 0:
        parser.error("--samples must be >= 0")

    torch.manual_seed(cfg.seed or 0)
    device, autocast = inference_device_and_autocast(cfg)
    model = load_adapter_model(cfg, args.adapter).to(device)
    reports = evaluator.evaluate(model, load_tokenizer(cfg), sampler_for(model), autocast=autocast)
    print(format_table(reports))
    summary = {name: scalar_metrics(report) for name, report in reports.items()}
    if args.json:
        write_json(args.json, non_finite_as_null(summary))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
