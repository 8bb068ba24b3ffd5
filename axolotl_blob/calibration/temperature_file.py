"""temperature.json: the temperature fitted for an adapter, saved beside it, and which T evaluate / predict apply.

`evaluate --fit-temperature FILE` writes it into the adapter directory, the calibration block's `fit_temperature`
into output_dir at the end of training; `evaluate` and `predict` apply a saved one by default (`--temperature none`
ignores it, `--temperature 1.7` sets T instead), so a calibrated adapter stays calibrated wherever it is used.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

from axolotl_blob.calibration.temperature import FittedTemperature
from axolotl_blob.io import write_json

TEMPERATURE_FILE = "temperature.json"
NO_TEMPERATURE = "none"  # --temperature none: ignore a saved temperature


def check_temperature(value: object, source: str) -> float:
    """`value` as a temperature; anything but a finite number > 0 is a ValueError naming `source`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{source}: a temperature must be a finite number > 0, got {value!r}")
    return float(value)


def write_temperature(directory: str | Path, fit: FittedTemperature) -> Path:
    """Write `fit` as `directory`/temperature.json (replacing one there) and return its path."""
    check_temperature(fit.temperature, "the fitted temperature")
    path = Path(directory) / TEMPERATURE_FILE
    write_json(path, dataclasses.asdict(fit))
    return path


def read_temperature(directory: str | Path) -> FittedTemperature | None:
    """The temperature saved in `directory`, None if there is none; a malformed file is a ValueError naming it."""
    path = Path(directory) / TEMPERATURE_FILE
    if not path.is_file():
        return None
    fix = "refit it (evaluate --fit-temperature), or delete it"
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not JSON ({exc.msg}, line {exc.lineno}); {fix}") from None
    fields = [field.name for field in dataclasses.fields(FittedTemperature)]
    missing = [name for name in fields if not isinstance(data, dict) or name not in data]
    if missing:
        raise ValueError(f"{path}: missing {', '.join(missing)}; {fix}")
    check_temperature(data["temperature"], f"{path}: temperature")
    return FittedTemperature(**{name: data[name] for name in fields})


def temperature_flag(text: str) -> float | str:
    """argparse type of --temperature: 'none', or T > 0."""
    if text.strip().lower() == NO_TEMPERATURE:
        return NO_TEMPERATURE
    try:
        return check_temperature(float(text), "--temperature")
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--temperature: a temperature must be a finite number > 0, or 'none' for no temperature; got {text!r}"
        ) from None


def add_temperature_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--temperature", type=temperature_flag, default=None, metavar="T|none",
        help=f"divide each posterior draw's choice logits by T before the draws are averaged; 'none': no scaling "
             f"(default: the T saved in the adapter directory's {TEMPERATURE_FILE}, if there is one, else none)",
    )  # fmt: skip


def applied_temperature(flag: float | str | None, adapter: Path) -> tuple[float | None, FittedTemperature | None]:
    """The T to apply (None: no scaling) and the saved fit it comes from: --temperature's value, else the adapter's
    temperature.json (said on stderr), else none."""
    if flag == NO_TEMPERATURE:
        return None, None
    if flag is not None:
        return float(flag), None
    saved = read_temperature(adapter)
    if saved is None:
        return None, None
    print(f"temperature T = {saved.temperature:.4f} from {Path(adapter) / TEMPERATURE_FILE} (fitted on {saved.examples} "
          f"examples of {saved.fitted_on}); --temperature none ignores it", file=sys.stderr)  # fmt: skip
    return saved.temperature, saved


def warn_on_other_draws(saved: FittedTemperature | None, samples: int, eval_draws: str | None) -> None:
    """A saved T calibrates the draws it was fitted with; say so on stderr where it is applied to others."""
    if saved is not None and (saved.samples, saved.eval_draws) != (samples, eval_draws):
        print(f"note: T was fitted on N = {saved.samples} ({saved.eval_draws or 'one pass'}) and is applied to "
              f"N = {samples} ({eval_draws or 'one pass'}); refit it for these draws with evaluate --fit-temperature",
              file=sys.stderr)  # fmt: skip
