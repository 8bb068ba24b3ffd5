"""The calibration study of BLoB against strong baselines: arms × seeds, one JSON line per finished run.

    python bench/calibration_study.py study  [--seeds 1 2 3] [--arms ARM ...]   # train and evaluate, skip done runs
    python bench/calibration_study.py search [--grid KNOB=V1,V2 ...]            # hyperparameters, training file only
    python bench/calibration_study.py render [--results FILE]                    # README table + figure from the file

Every run trains through ``python -m axolotl.cli.train`` from an example config (``example_configs/lora-…`` or
``blob-smollm2-sarcasm.yml``) with overrides, one training at a time, and is evaluated by
``python -m axolotl_blob.evaluate`` on the config's calibration datasets (the 300 validation headlines, and any OOD
set the block lists) — except IVON, whose posterior lives in its optimizer state, scored by the run's own
at-end calibration. A run already in the results file is skipped, so the study can be stopped and continued.

``search`` never sees the validation headlines: it trains on 80 % of the training file and scores the other 20 %
(the slice temperature scaling is fitted on too), varying one knob at a time around the example config unless
``--grid`` says otherwise. Its lines go to ``bench/results/calibration_search.jsonl``. A knob of the evaluation alone
(``blob.eval_draws``) re-scores the training of the point without it instead of training again.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from study_common import ROOT, append_result, commit, deep_merge, mean_sd, read_results, run, set_path, split_file, train_once

RESULTS = ROOT / "bench" / "results" / "calibration_study.jsonl"
SEARCH_RESULTS = ROOT / "bench" / "results" / "calibration_search.jsonl"
WORK = ROOT / "outputs" / "calibration_study"
LORA_CONFIG = ROOT / "example_configs" / "lora-smollm2-sarcasm.yml"
BLOB_CONFIG = ROOT / "example_configs" / "blob-smollm2-sarcasm.yml"
METRICS = ("acc", "ece", "nll", "brier", "confidence", "mutual_info")


@dataclass(frozen=True)
class Training:
    """One way to train: an example config and the overrides on top of it."""

    config: Path
    overrides: dict = field(default_factory=dict)
    held_out_split: bool = False  # train on the 80 % slice (temperature scaling fits T on the other 20 %)
    scored_in_training: bool = False  # IVON: its own at-end calibration holds the BMA over its optimizer state


@dataclass(frozen=True)
class Arm:
    label: str
    training: str
    samples: int
    flags: tuple[str, ...] = ()  # extra `evaluate` flags
    tfb: bool = False  # bayesianize the training's LoRA adapter first


TRAININGS = {
    "lora": Training(LORA_CONFIG),
    "lora_weight_decay": Training(LORA_CONFIG, {"weight_decay": 0.1}),
    "lora_dropout": Training(LORA_CONFIG, {"lora_dropout": 0.1}),  # the reference's MC-dropout rate
    "lora_held_out": Training(LORA_CONFIG, held_out_split=True),
    "ivon": Training(
        LORA_CONFIG,
        {"optimizer": "ivon", "learning_rate": 1.0, "ivon": {"ess": 4000.0, "hess_init": 1.0, "clip_radius": 0.01, "eval_samples": 10},
         "calibration": {"samples": 10}},
        scored_in_training=True,
    ),  # the IVON settings of example_configs/adalora-ivon-snr-smollm2-sarcasm.yml
    "blob_reference": Training(BLOB_CONFIG, {"blob": {"sigma_update": "reference"}}),
    "blob_optimizer": Training(BLOB_CONFIG, {"blob": {"sigma_update": "optimizer"}}),
}
ARMS = {
    "lora": Arm("LoRA (MLE)", "lora", 0),
    "lora_map": Arm("LoRA + weight decay 0.1 (MAP)", "lora_weight_decay", 0),
    "lora_mc_dropout": Arm("LoRA + MC dropout 0.1, N = 10", "lora_dropout", 10, ("--mc-dropout",)),
    "lora_temperature": Arm("LoRA + temperature scaling (T on 20 % of the training file)", "lora_held_out", 0),
    "ivon": Arm("IVON on LoRA, BMA N = 10", "ivon", 10),
    "blob_reference": Arm("BLoB, reference σ update, N = 10", "blob_reference", 10),
    "blob_reference_mean": Arm("BLoB, reference σ update, N = 0 (mean)", "blob_reference", 0),
    "blob_optimizer": Arm("BLoB, σ in the Trainer's optimizer (0.x routing), N = 10", "blob_optimizer", 10),
    "tfb": Arm("TFB on the LoRA (MLE) adapters, N = 10", "lora", 10, tfb=True),
}
SEARCH_KNOBS = {  # knob → (config path, values tried one at a time around the example config)
    "kl_lr": ("blob.kl_lr", [0.001, 0.005, 0.01]),  # the example has 0.002; 0.01 is the paper's
    "prior_std": ("blob.prior_std", [0.1, 0.15]),
    "init_std": ("blob.init_std", [0.02, 0.1]),
    "kl_cycle_steps": ("blob.kl_cycle_steps", ["rescaled"]),
    "sigma_update": ("blob.sigma_update", ["optimizer"]),
    "likelihood": ("multiple_choice.likelihood", ["choices"]),
    "lm_head": ("lora_target_modules", [["q_proj", "v_proj", "lm_head"]]),
    "eval_draws": ("blob.eval_draws", ["per_token", "whole_weights"]),
}
EVAL_KNOBS = {"blob.eval_draws": "--draws"}  # config path → the `evaluate` flag that sets it; no training of its own


# --------------------------------------------------------------------------- configs and processes


def splits(train_file: Path) -> tuple[Path, Path]:
    """80 % / 20 % of the training file, shuffled with seed 0 (the same slices for every seed and arm)."""
    return split_file(train_file, WORK / "splits")


def truncated(path: Path, limit: int | None) -> Path:
    """The first `limit` examples of a JSONL file (smoke runs), else the file itself."""
    if limit is None:
        return path
    out = WORK / "smoke-data" / path.name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join([line for line in path.read_text().splitlines() if line.strip()][:limit]) + "\n")
    return out


@dataclass
class Setting:
    """Where runs go and how they are cut down (smoke tests)."""

    results: Path
    work: Path
    extra: dict = field(default_factory=dict)  # overrides on every training (e.g. max_steps for a smoke test)
    eval_limit: int | None = None
    search: bool = False  # train on the 80 % slice, score the 20 % slice: never the validation headlines


def train_file(training: Training) -> Path:
    return ROOT / yaml.safe_load(training.config.read_text())["datasets"][0]["path"]


def training_config(name: str, training: Training, seed: int, setting: Setting, knobs: dict | None = None) -> dict:
    config = yaml.safe_load(training.config.read_text())
    config = deep_merge(config, training.overrides)
    config = deep_merge(config, knobs or {})
    train_split, held_out = splits(train_file(training))
    if training.held_out_split or setting.search:
        config["datasets"][0]["path"] = str(train_split)
    if setting.search:
        config["calibration"]["datasets"] = [{"path": str(truncated(held_out, setting.eval_limit)), "name": "held_out"}]
    else:
        for dataset in config["calibration"]["datasets"]:
            dataset["path"] = str(truncated(ROOT / dataset["path"], setting.eval_limit))
    config["calibration"]["at_end"] = training.scored_in_training
    directory = setting.work / f"{name}-seed{seed}"
    config = deep_merge(config, {
        "seed": seed, "output_dir": str(directory / "out"), "dataset_prepared_path": str(setting.work / "prepared"),
        **setting.extra,
    })  # fmt: skip
    return config


def train(name: str, training: Training, seed: int, setting: Setting, knobs: dict | None = None) -> tuple[Path, dict]:
    """Train once per (training, seed); a finished training is reused by every arm that evaluates it."""
    config = training_config(name, training, seed, setting, knobs)
    directory = Path(config["output_dir"]).parent
    return directory, train_once(config, directory)


def scalar(report: dict) -> dict:
    return {k: v for k, v in report.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def in_training_metrics(directory: Path) -> dict:
    reports = sorted((directory / "out" / "calibration").glob("step-*.json"), key=lambda p: int(p.stem.split("-")[1]))
    if not reports:
        raise RuntimeError(f"{directory}: the run wrote no calibration report")
    return {name: scalar(report) for name, report in json.loads(reports[-1].read_text())["datasets"].items()}


def evaluate(arm_name: str, arm: Arm, directory: Path, setting: Setting, extra_flags: tuple[str, ...] = ()) -> tuple[dict, float]:
    config, adapter = directory / "config.yml", directory / "out"
    seconds = 0.0
    if arm.tfb:
        tfb_dir = directory / "tfb"
        if not (tfb_dir / "adapter_config.json").is_file():
            # smoke: 3 steps leave B near 0, where any σ_q moves the answers; only the plumbing is checked
            anchors = ["--anchors", str(setting.eval_limit), "--tolerance", "10"] if setting.eval_limit else []
            command = [sys.executable, "-m", "axolotl_blob.bayesianize", str(config), "--adapter", str(adapter), "--out", str(tfb_dir)]
            seconds += run(command + anchors, directory / "tfb.log")
        adapter = tfb_dir
    flags = [*arm.flags, *extra_flags]
    training = TRAININGS[arm.training]
    if training.held_out_split:
        flags += ["--fit-temperature", str(truncated(splits(train_file(training))[1], setting.eval_limit))]
    out = directory / f"eval-{arm_name}.json"
    command = [sys.executable, "-m", "axolotl_blob.evaluate", str(config), "--adapter", str(adapter)]
    seconds += run(command + ["--samples", str(arm.samples), "--json", str(out), *flags], directory / f"eval-{arm_name}.log")
    return json.loads(out.read_text()), seconds


# --------------------------------------------------------------------------- the study and the search


def run_study(arms: list[str], seeds: list[int], setting: Setting) -> None:
    done = {(row["arm"], row["seed"]) for row in read_results(setting.results)}
    for seed, arm_name in itertools.product(seeds, arms):  # seed-major: a stopped study has whole seeds
        if (arm_name, seed) in done:
            print(f"skip {arm_name} seed {seed}: in {setting.results.name}")
            continue
        arm = ARMS[arm_name]
        training = TRAININGS[arm.training]
        directory, info = train(arm.training, training, seed, setting)
        if training.scored_in_training:
            metrics, eval_seconds = in_training_metrics(directory), 0.0
        else:
            metrics, eval_seconds = evaluate(arm_name, arm, directory, setting)
        row = {
            "arm": arm_name, "label": arm.label, "seed": seed, "training": arm.training, "samples": arm.samples,
            "metrics": metrics, **info, "eval_seconds": round(eval_seconds, 1), "commit": commit(),
            "overrides": {**training.overrides, **setting.extra},
        }  # fmt: skip
        append_result(setting.results, row)
        print(f"{arm_name} seed {seed}: " + ", ".join(f"{k} {v:.4f}" for k, v in first_dataset(metrics).items() if k in METRICS))


def search_points(grid: list[str]) -> list[dict]:
    """Overrides per search run: the example config itself, then each knob value alone; or a full --grid."""
    if grid:
        axes = []
        for spec in grid:
            knob, values = spec.split("=", 1)
            path = SEARCH_KNOBS[knob][0] if knob in SEARCH_KNOBS else knob
            axes.append([(path, yaml.safe_load(v)) for v in values.split(",")])
        return [{path: value for path, value in point} for point in itertools.product(*axes)]
    return [{}] + [{path: value} for path, values in SEARCH_KNOBS.values() for value in values]


def run_search(grid: list[str], seeds: list[int], setting: Setting) -> None:
    done = {(json.dumps(row["knobs"], sort_keys=True), row["seed"]) for row in read_results(setting.results)}
    for seed, point in itertools.product(seeds, search_points(grid)):
        key = json.dumps(point, sort_keys=True)
        if (key, seed) in done:
            print(f"skip {key} seed {seed}")
            continue
        trained = {path: value for path, value in point.items() if path not in EVAL_KNOBS}
        scored = {path: value for path, value in point.items() if path in EVAL_KNOBS}
        knobs = {}
        for path, value in trained.items():
            knobs = set_path(knobs, path, value)
        name = "search-" + ("-".join(f"{p.split('.')[-1]}={v}" for p, v in trained.items()) or "example").replace("/", "_")
        name = name.replace("[", "").replace("]", "").replace("'", "").replace(", ", "+")
        directory, info = train(name, TRAININGS["blob_reference"], seed, setting, knobs)
        flags = tuple(arg for path, value in scored.items() for arg in (EVAL_KNOBS[path], str(value)))
        label = "held_out" + "".join(f"-{p.split('.')[-1]}={v}" for p, v in scored.items())
        metrics, eval_seconds = evaluate(label, ARMS["blob_reference"], directory, setting, flags)
        append_result(setting.results, {"knobs": point, "seed": seed, "metrics": metrics, **info, "eval_seconds": round(eval_seconds, 1), "commit": commit()})
        print(f"{key} seed {seed}: " + ", ".join(f"{k} {v:.4f}" for k, v in first_dataset(metrics).items() if k in METRICS))


# --------------------------------------------------------------------------- table and figure


def is_ood(dataset_metrics: dict) -> bool:
    return any(k.startswith("ood_auroc") for k in dataset_metrics)


def first_dataset(metrics: dict) -> dict:
    """The table's metrics of one run: the first in-distribution dataset's, plus each OOD dataset's AUROCs as
    `ood_auroc_by_… (name)` (the report puts them on the OOD dataset, whose own accuracy is not the task's)."""
    in_distribution = next(m for m in metrics.values() if not is_ood(m))
    ood = {f"{k} ({name})": v for name, m in metrics.items() if is_ood(m) for k, v in m.items() if k.startswith("ood_auroc")}
    return {**in_distribution, **ood}


def summary(rows: list[dict]) -> list[tuple[str, int, dict[str, list[float]]]]:
    """(label, seeds, {metric: values over seeds}) per arm, in the order of ARMS."""
    by_arm: dict[str, list[dict]] = {}
    for row in rows:
        by_arm.setdefault(row["arm"], []).append(row)
    table = []
    for arm in [a for a in ARMS if a in by_arm] + [a for a in by_arm if a not in ARMS]:
        metrics = [first_dataset(row["metrics"]) for row in by_arm[arm]]
        keys = [k for k in (*METRICS, *sorted({k for m in metrics for k in m if k.startswith("ood_auroc")})) if all(k in m for m in metrics)]
        table.append((by_arm[arm][0]["label"], len(metrics), {k: [m[k] for m in metrics] for k in keys}))
    return table


def markdown(rows: list[dict]) -> str:
    table = summary(rows)
    columns = list(dict.fromkeys(k for _, _, values in table for k in values))
    lines = ["| arm | seeds | " + " | ".join(columns) + " |", "| --- | --- |" + " --- |" * len(columns)]
    for label, seeds, values in table:
        lines.append(f"| {label} | {seeds} | " + " | ".join(mean_sd(values[c]) if c in values else "" for c in columns) + " |")
    return "\n".join(lines)


def figure(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = summary(rows)
    panels = [m for m in ("acc", "ece", "nll") if all(m in values for _, _, values in table)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 0.45 * len(table) + 1.5), sharey=True)
    for ax, metric in zip(axes if len(panels) > 1 else [axes], panels):
        means = [statistics.mean(values[metric]) for _, _, values in table]
        errors = [statistics.stdev(values[metric]) if len(values[metric]) > 1 else 0.0 for _, _, values in table]
        ax.barh(range(len(table)), means, xerr=errors, color="tab:blue", alpha=0.7, capsize=3)
        ax.set_title(f"{metric} (mean ± sd over seeds)")
        ax.invert_yaxis()
    axes_list = axes if len(panels) > 1 else [axes]
    axes_list[0].set_yticks(range(len(table)), [label for label, _, _ in table], fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def render(results: Path) -> None:
    rows = read_results(results)
    if not rows:
        raise SystemExit(f"{results}: no finished runs yet")
    if "knobs" in rows[0]:  # a search file: one line per knob setting, best held-out NLL first
        grouped: dict[str, list[dict]] = {}
        for row in rows:
            grouped.setdefault(json.dumps(row["knobs"], sort_keys=True), []).append(first_dataset(row["metrics"]))
        ranked = sorted(grouped.items(), key=lambda item: statistics.mean(m["nll"] for m in item[1]))
        print("| knobs (on top of the example config) | seeds | " + " | ".join(METRICS) + " |")
        print("| --- | --- |" + " --- |" * len(METRICS))
        for knobs, metrics in ranked:
            print(f"| `{knobs}` | {len(metrics)} | " + " | ".join(mean_sd([m[k] for m in metrics]) if all(k in m for m in metrics) else "" for k in METRICS) + " |")
        return
    text = markdown(rows)
    print(text)
    results.with_suffix(".md").write_text(text + "\n")
    figure(rows, results.with_suffix(".png"))
    print(f"wrote {results.with_suffix('.md')} and {results.with_suffix('.png')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=("study", "search", "render"))
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="study: 1 2 3; search: 1")
    parser.add_argument("--grid", nargs="*", default=[], metavar="KNOB=V1,V2", help=f"search: a full grid over knobs ({', '.join(SEARCH_KNOBS)} or a config path)")
    parser.add_argument("--results", type=Path, default=None, help="the JSONL results file (default: bench/results/…)")
    parser.add_argument("--smoke", action="store_true", help="3 training steps, 16 evaluation examples, results under outputs/")
    args = parser.parse_args()
    search = args.mode == "search"
    results = args.results or (SEARCH_RESULTS if search else RESULTS)
    setting = Setting(results=results, work=WORK / ("search" if search else "study"), search=search)
    if args.smoke:
        setting.work = WORK / "smoke"
        setting.results = args.results or setting.work / f"{args.mode}.jsonl"
        setting.extra = {"max_steps": 3, "warmup_steps": 1, "calibration": {"batch_size": 16}}
        setting.eval_limit = 16
    if args.mode == "render":
        render(results)
    elif search:
        run_search(args.grid, args.seeds or [1], setting)
    else:
        run_study(args.arms, args.seeds or [1, 2, 3], setting)


if __name__ == "__main__":
    main()
