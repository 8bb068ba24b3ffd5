"""Post-hoc calibration evaluation of a saved adapter (BLoB or plain LoRA) on a config's calibration datasets.

    python -m axolotl_blob.evaluate CONFIG --adapter DIR [--samples N] [--json OUT] [--draws per_token|whole_weights]
        [--mc-dropout] [--fit-temperature FILE | --temperature T|none]

The base model comes from the config, in the dtype training loaded it in, the tokenizer from the adapter directory
(where training saved it; else the config's); a BLoB adapter directory (one with blob_posterior.safetensors) is
evaluated with its full posterior, anything else as a point estimate. A temperature saved beside the adapter
(temperature.json) divides each posterior draw's choice logits unless --temperature says otherwise. stdout gets the
report only (the metrics table, and the fitted temperature); logs go to stderr.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from axolotl_blob.blob.model import (
    bayesianize,
    load_posterior,
    missing_posterior_files,
    read_posterior_spec,
    saved_eval_draws,
)
from axolotl_blob.calibration.report import format_table, scalar_metrics
from axolotl_blob.calibration.temperature import draws_kind
from axolotl_blob.calibration.temperature_file import (
    TEMPERATURE_FILE,
    add_temperature_flag,
    applied_temperature,
    warn_on_other_draws,
    write_temperature,
)
from axolotl_blob.cli import HelpFormatter, results_only_stdout
from axolotl_blob.io import non_finite_as_null, write_json
from axolotl_blob.run_config import (
    calibration_evaluator,
    inference_device_and_autocast,
    load_tokenizer,
    model_dtype,
    read_config,
)
from axolotl_blob.sampling import DropoutSampler, sampler_for


def load_adapter_model(cfg, adapter_dir: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(cfg.base_model, dtype=model_dtype(cfg))
    model = PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    if not missing_posterior_files(adapter_dir):
        spec = read_posterior_spec(adapter_dir)
        bayesianize(model, spec.init_std, noise=spec.noise)
        load_posterior(model, adapter_dir)
    return model


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m axolotl_blob.evaluate", description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter
    )
    parser.add_argument("config", help="the Axolotl YAML config (its calibration: block names the datasets)")
    parser.add_argument("--adapter", required=True, type=Path, help="directory of the saved adapter")
    parser.add_argument("--samples", type=int, default=None,
                        help="posterior samples; 0 = posterior mean (default: calibration.samples, else the posterior "
                             "source's eval_samples, 0 for a point estimate)")  # fmt: skip
    parser.add_argument("--json", type=Path, default=None,
                        help="write {dataset: {acc, ece, …, aurc_by_confidence, …, ood_auroc_by_mutual_info}} "
                             "(default: no file)")  # fmt: skip
    parser.add_argument("--draws", choices=("per_token", "whole_weights"), default=None,
                        help="how a BLoB posterior is sampled: per-token draws of its noise path, or one A per layer "
                             "and forward (default: as saved with it, blob_config.json's eval_draws)")  # fmt: skip
    parser.add_argument("--mc-dropout", action="store_true", help="MC dropout: the N samples keep the (LoRA) dropout on")
    parser.add_argument(
        "--fit-temperature", type=Path, default=None, metavar="FILE",
        help=f"temperature scaling: fit T on this multiple-choice JSONL (held-out training examples) with the "
             f"evaluation's own draws (T divides each draw's choice logits before they are averaged), save it as the "
             f"adapter directory's {TEMPERATURE_FILE} (replacing one there), and evaluate with it; the config's "
             f"calibration.fit_temperature is not refitted here (default: no fit)",
    )  # fmt: skip
    add_temperature_flag(parser)
    return parser


def main(argv: list[str] | None = None) -> dict[str, dict]:
    parser = build_parser()
    args = parser.parse_args(argv)
    with results_only_stdout() as results:
        return _run(parser, args, results)


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace, results) -> dict[str, dict]:
    try:
        cfg = read_config(args.config)
    except ValueError as exc:
        parser.error(str(exc))
    if not cfg.calibration:
        parser.error(f"{args.config} has no 'calibration:' block naming datasets to evaluate")
    if not (args.adapter / "adapter_config.json").is_file():
        parser.error(f"--adapter {args.adapter}: no adapter_config.json there")
    evaluator = calibration_evaluator(cfg, args.samples)
    if evaluator.settings.mode != "choices":
        parser.error("post-hoc evaluation scores multiple-choice datasets: set calibration.mode: choices")
    if args.samples is not None and args.samples < 0:
        parser.error("--samples must be >= 0")
    if args.fit_temperature and args.temperature is not None:
        parser.error("--fit-temperature fits T and --temperature sets it: give one of them")
    try:  # checked before any weights load
        evaluator.fit_temperature_on(args.fit_temperature)
        evaluator.temperature, saved = (None, None) if args.fit_temperature else applied_temperature(args.temperature, args.adapter)
    except (FileNotFoundError, ValueError) as exc:
        parser.error(str(exc))

    torch.manual_seed(cfg.seed or 0)
    device, autocast = inference_device_and_autocast(cfg)
    model, tokenizer = load_adapter_model(cfg, args.adapter).to(device), load_tokenizer(cfg, args.adapter)
    extra = {}
    draws = args.draws or saved_eval_draws(args.adapter)
    if not (args.mc_dropout or missing_posterior_files(args.adapter)):
        extra["eval_draws"] = draws  # a BLoB posterior's scores name how it was sampled
    sampler = DropoutSampler(model) if args.mc_dropout else sampler_for(model, draws=draws)
    used = sampler.samples_used(evaluator.n_samples)
    warn_on_other_draws(saved, used, draws_kind(sampler, used))
    reports = evaluator.evaluate(model, tokenizer, sampler, autocast=autocast)
    fit = evaluator.last_fit
    if fit is not None:
        path = write_temperature(args.adapter, fit)
        print(f"temperature T = {fit.temperature:.4f}, fitted on {fit.examples} examples of {fit.fitted_on} with "
              f"N = {fit.samples} (NLL there {fit.nll_before:.4f} -> {fit.nll_after:.4f}), saved to {path}", file=results)  # fmt: skip
    print(format_table(reports), file=results)
    summary = {name: {**scalar_metrics(report), **extra} for name, report in reports.items()}
    if args.json:
        write_json(args.json, non_finite_as_null(summary))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
