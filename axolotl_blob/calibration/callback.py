"""Calibration as part of every evaluation of the HF Trainer, and once at the end of training."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

from axolotl_blob.blob.layer import EvalDraws
from axolotl_blob.calibration.evaluator import CalibrationEvaluator
from axolotl_blob.calibration.report import format_table
from axolotl_blob.calibration.temperature_file import TEMPERATURE_FILE, write_temperature
from axolotl_blob.sampling import sampler_for

LOG = logging.getLogger(__name__)


def autocast_for(trainer: Trainer):
    """The Trainer's mixed precision for our own forward passes (bf16 autocast is what makes CPU runs fast)."""
    args = trainer.args
    dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None
    if dtype is None:
        return contextlib.nullcontext
    device_type = trainer.args.device.type
    return lambda: torch.autocast(device_type, dtype=dtype)


class CalibrationCallback(TrainerCallback):
    """Adds `eval_acc`, `eval_ece`, … to the Trainer's log and writes `output_dir/calibration/`."""

    def __init__(self, trainer: Trainer, evaluator: CalibrationEvaluator, draws: EvalDraws):
        self.trainer = trainer
        self.evaluator = evaluator
        self.draws = draws  # blob.eval_draws: how a BLoB posterior is sampled
        self.last_step: int | None = None
        self.last_reports: dict[str, dict] = {}

    def run(self, step: int) -> dict[str, float]:
        trainer = self.trainer
        model = trainer.accelerator.unwrap_model(trainer.model)
        batches = trainer.get_eval_dataloader() if self.evaluator.settings.mode == "tokens" else None
        sampler = sampler_for(model, trainer.optimizer, self.draws)
        # The posterior draws come from the Trainer's seeded generators; forked, so that the training after this
        # evaluation draws what it would have drawn without it (calibration observes the run, never changes it).
        device = trainer.args.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            reports = self.evaluator.evaluate(model, trainer.processing_class, sampler, batches, autocast_for(trainer))
        self.last_step, self.last_reports = step, reports
        if trainer.is_world_process_zero():
            self.evaluator.save(reports, Path(trainer.args.output_dir) / "calibration", step)
            print(format_table(reports), flush=True)
        metrics = self.evaluator.metric_names(reports)
        trainer.log(metrics)
        return metrics

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self.last_step != state.global_step:  # several eval sets evaluate one after another
            calibration = self.run(state.global_step)
            if metrics is not None:
                metrics.update(calibration)

    def on_train_end(self, args, state, control, **kwargs):
        """Runs inside trainer.train(), before Axolotl saves the model: a failure here must not lose the model."""
        try:
            if self.evaluator.settings.at_end and self.last_step != state.global_step:
                self.run(state.global_step)
            self.save_temperature(state.global_step)
        except Exception:  # noqa: BLE001  (logged with its traceback; the adapter is saved next)
            LOG.exception("calibration at the end of training failed; the trained model is still saved")

    def save_temperature(self, final_step: int) -> None:
        """The T fitted at the final step goes beside the adapter (global rank 0 writes), where evaluate and
        predict apply it by default; a T of an earlier model would not calibrate this one, so none is written."""
        fit = self.evaluator.last_fit
        if fit is None or not self.trainer.is_world_process_zero():
            return
        if self.last_step != final_step:
            LOG.warning(f"calibration.fit_temperature: no {TEMPERATURE_FILE} written: the last T was fitted at step "
                        f"{self.last_step}, not at the final step {final_step} (set calibration.at_end: true)")  # fmt: skip
            return
        path = write_temperature(self.trainer.args.output_dir, fit)
        LOG.info(f"temperature T = {fit.temperature:.4f} (fitted on {fit.fitted_on}, N = {fit.samples}) saved to {path}")
