"""A run's config: the plugin's blocks as their settings, and the config read back by the commands that load a
trained adapter (predict, evaluate, bayesianize).

Those commands need the base model, the dtype and autocast training used, the tokenizer and the plugin's blocks, not
Axolotl's training stack: the YAML is read as written (Axolotl validated it when the run trained), without the set-up
of a run (a debug log in output_dir, environment variables, plugin registration) or the log of the whole config, and
the few values Axolotl derives from it are derived here the same way.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
import yaml

from axolotl_blob.args import BlobSettings, CalibrationSettings, IvonSettings
from axolotl_blob.calibration.evaluator import CalibrationEvaluator
from axolotl_blob.cloze import CLOZE_TYPE
from axolotl_blob.multiple_choice import AnswerFormat

TOKENIZER_FILE = "tokenizer_config.json"  # written beside the adapter by Axolotl's final save and every checkpoint-N


class RunConfig(dict):
    """The YAML mapping with attribute access, None for a missing key, nested mappings alike (Axolotl's DictDefault)."""

    def __init__(self, mapping: dict | None = None):
        super().__init__({key: _wrapped(value) for key, value in (mapping or {}).items()})

    def __getattr__(self, name: str) -> Any:
        return self.get(name)


def _wrapped(value: Any) -> Any:
    if isinstance(value, dict):
        return RunConfig(value)
    if isinstance(value, list):
        return [_wrapped(item) for item in value]
    return value


def read_config(path: str | Path) -> RunConfig:
    """The config at `path`; ValueError naming the file when it is missing, not a mapping, or has no base_model."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such config file")
    with path.open(encoding="utf-8") as f:
        data = yaml.safe_load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a YAML mapping of Axolotl settings, got {type(data).__name__}")
    cfg = RunConfig({"bf16": "auto", **data})  # Axolotl's default, the one of its defaults the values below depend on
    if not cfg.base_model:
        raise ValueError(f"{path}: no 'base_model' (the model the adapter was trained on)")
    return cfg


def trains_in_bf16(cfg: Any) -> bool:
    """Axolotl's reading of `bf16`: true, or `auto` where a GPU supports bf16 (and `fp16` is not set)."""
    if cfg.bf16 == "auto":
        from transformers.utils import is_torch_bf16_gpu_available

        return not cfg.fp16 and is_torch_bf16_gpu_available()
    return cfg.bf16 is True


def model_dtype(cfg: Any) -> torch.dtype:
    """The dtype Axolotl loads the base model in (its normalize_config): bf16, else fp16 (also `bf16: auto` without a
    bf16 GPU, unless fp16 is set false), else fp32."""
    if trains_in_bf16(cfg) or cfg.bfloat16:
        return torch.bfloat16
    fp16_by_auto = cfg.bf16 == "auto" and cfg.fp16 is None and not cfg.float16
    if cfg.load_in_8bit or cfg.fp16 or cfg.float16 or fp16_by_auto:
        return torch.float16
    return torch.float32


def inference_device_and_autocast(cfg: Any):
    """The GPU when there is one, and bf16 autocast when the config trains in bf16 (as training scored)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    autocast = (lambda: torch.autocast(device, dtype=torch.bfloat16)) if trains_in_bf16(cfg) else contextlib.nullcontext
    return device, autocast


def load_tokenizer(cfg: Any, adapter_dir: Path):
    """The tokenizer training saved beside the adapter (Axolotl's, with any tokens it added), else the config's
    (`tokenizer_config`, else the base model's)."""
    from transformers import AutoTokenizer

    source = adapter_dir if (adapter_dir / TOKENIZER_FILE).is_file() else cfg.tokenizer_config or cfg.base_model
    return AutoTokenizer.from_pretrained(str(source), trust_remote_code=bool(cfg.trust_remote_code))


def blob_settings(cfg: Any) -> BlobSettings:
    return BlobSettings(**dict(cfg.blob or {}))


def ivon_settings(cfg: Any) -> IvonSettings:
    return IvonSettings(**dict(cfg.ivon or {}))


def answer_format(cfg: Any) -> AnswerFormat:
    """How the run puts questions to the model: `cloze` when it trains on `type: axolotl_blob.cloze` data (args.py
    refuses a mix of formats), else answer letters. Its scorers (calibration, evaluate, predict, TFB) follow it."""
    entries = [*(cfg.datasets or []), *(cfg.test_datasets or [])]
    return "cloze" if any((entry or {}).get("type") == CLOZE_TYPE for entry in entries) else "letters"


def calibration_evaluator(cfg: Any, samples: int | None = None) -> CalibrationEvaluator:
    """The `calibration:` block with its sample count resolved: explicit, else the posterior source's own."""
    settings = CalibrationSettings(**dict(cfg.calibration))
    if samples is None:
        samples = settings.samples
    if samples is None:
        if cfg.optimizer == "ivon":
            samples = ivon_settings(cfg).eval_samples
        else:
            samples = blob_settings(cfg).eval_samples if cfg.adapter == "blob" else 0
    return CalibrationEvaluator(settings, samples, answer_format(cfg))
