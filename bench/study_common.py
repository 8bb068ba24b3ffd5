"""The study harnesses' shared bookkeeping: config overrides, offline subprocesses, one training per directory,
the held-out split, and the results file (one JSON line per finished run, so a stopped study continues where it was).

Used by `calibration_study.py` and `paper_protocol_study.py`; nothing here imports torch or Axolotl (the split is
`axolotl_blob.paper_tasks.held_out_split`, the one `python -m axolotl_blob.assets` writes each task's files with).
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

from axolotl_blob.paper_tasks import held_out_split

ROOT = Path(__file__).resolve().parent.parent
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "AXOLOTL_DO_NOT_TRACK": "1", "WANDB_MODE": "disabled"}
DONE_MARKER = "trained.json"


def deep_merge(base: dict, overrides: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        merged[key] = deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def set_path(overrides: dict, path: str, value) -> dict:
    """{"a": {"b": value}} for path "a.b", merged into a copy of `overrides`."""
    keys = path.split(".")
    nested = value
    for key in reversed(keys):
        nested = {key: nested}
    return deep_merge(overrides, nested)


def run(command: list[str], log: Path) -> float:
    """Run from the repo root (the example configs' paths are relative to it), offline; seconds taken."""
    start = time.time()
    with log.open("w") as f:
        result = subprocess.run(command, cwd=ROOT, env={**os.environ, **OFFLINE_ENV}, stdout=f, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}); see {log}")
    return time.time() - start


def split_file(source: Path, directory: Path) -> tuple[Path, Path]:
    """(train_split.jsonl, held_out.jsonl) in `directory`: the lines of `source` split as the assets split each task
    (`held_out_split`'s fraction and seed). Written once; every later call (every seed and arm) reads the same two files."""
    train_split, held_out = directory / "train_split.jsonl", directory / "held_out.jsonl"
    if not held_out.is_file():
        kept, held = held_out_split([line for line in source.read_text().splitlines() if line.strip()])
        directory.mkdir(parents=True, exist_ok=True)
        train_split.write_text("\n".join(kept) + "\n")
        held_out.write_text("\n".join(held) + "\n")
    return train_split, held_out


def train_once(config: dict, directory: Path) -> dict:
    """Train `config` through `python -m axolotl.cli.train` into `directory` (config.yml, train.log), unless the
    directory's done marker says a finished training is there; {"train_seconds": …} either way."""
    done = directory / DONE_MARKER
    if done.is_file():
        return json.loads(done.read_text())
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    print(f"training {directory.name} …", flush=True)
    seconds = run([sys.executable, "-m", "axolotl.cli.train", str(directory / "config.yml")], directory / "train.log")
    info = {"train_seconds": round(seconds, 1)}
    done.write_text(json.dumps(info))
    return info


def read_results(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def append_result(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(row, allow_nan=False) + "\n")


def commit() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()


def mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"
