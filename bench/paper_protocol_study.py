"""The paper's protocol at 135M (issue 24): over-trained LoRA and BLoB on one task, scored in-distribution and under
distribution shift, against temperature scaling, a LoRA deep ensemble, MC dropout and TFB. One JSON line per
finished (arm, seed).

    python bench/paper_protocol_study.py study --steps S [--task openbookqa] [--seeds 1 2 3] [--arms ARM ...]
    python bench/paper_protocol_study.py render [--results FILE]   # tables, figures, the five goals, README's table

The study as run (task, format and step count chosen by the pilot on training data only,
bench/results/paper_protocol_pilot.json; TFB's tolerance keeps the reference's 150 % total NLL change at this
held-out slice's 113 anchors; ensemble member sets overlap, seeds s, s + 1, s + 2 of LoRA seeds 1–5)::

    python bench/paper_protocol_study.py study --task arc_easy --steps 1000 --eval-size 300 --member-stride 1 \
        --tfb-tolerance 0.0133 --seeds 1 2 3

Every arm trains from `example_configs/{lora,blob}-reference-recipe.yml` on the same 80 % of the task's training file
(`assets/<task>_train.jsonl`, split once with seed 0 under outputs/paper_protocol/splits/); the other 20 % is the only
data for temperature fitting and TFB's anchors. The in-distribution test file and the shift sets (each a fixed
seeded subset of at most --eval-size questions) are scored once, at the end: by `python -m axolotl_blob.evaluate`
(the shift sets marked `ood: true`, so their AUROCs against the in-distribution test come with them), the ensemble
by averaging its members' `python -m axolotl_blob.predict` probabilities and scoring them with the package's metrics.

Trainings are shared where honest: LoRA, LoRA + temperature scaling and TFB are one training per seed, so are BLoB
and BLoB + temperature scaling; the ensemble of seed s averages the LoRA trainings of seeds s, s + 3, s + 6 (disjoint
member sets across seeds 1–3). A training whose directory holds its done marker is not trained again, an (arm, seed)
already in the results file is not run again, and runs go seed by seed, so a stopped study leaves whole seeds.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import random
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from study_common import ROOT, append_result, commit, deep_merge, mean_sd, read_results, run, split_file, train_once

RESULTS = ROOT / "bench" / "results" / "paper_protocol_study.jsonl"
WORK = ROOT / "outputs" / "paper_protocol"
LORA_CONFIG = ROOT / "example_configs" / "lora-reference-recipe.yml"
BLOB_CONFIG = ROOT / "example_configs" / "blob-reference-recipe.yml"
SHIFTS = {  # the farthest last
    "openbookqa": ("arc_easy", "arc_challenge", "mmlu_chemistry", "mmlu_physics"),  # the paper's
    "arc_easy": ("arc_challenge", "openbookqa", "mmlu_chemistry", "mmlu_physics"),  # the study's (the pilot's task)
}
DATASET_TYPES = {"letters": "axolotl_blob.multiple_choice", "cloze": "axolotl_blob.cloze"}  # the training data's `type:`
N_BINS = 15  # the recipes' calibration.n_bins, for the ensemble's metrics too
LOSS_ENTRY = re.compile(r"\{'loss': [^{}]*\}")  # a Trainer log line of train.log


@dataclass(frozen=True)
class Training:
    """One way to train: a reference recipe and the overrides on top of it."""

    config: Path
    overrides: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Arm:
    label: str
    training: str
    sampled: bool = False  # N = --samples posterior draws (else one pass: N = 0)
    flags: tuple[str, ...] = ()  # extra `evaluate` flags
    temperature: bool = False  # evaluate --fit-temperature on the held-out slice
    tfb: bool = False  # bayesianize the training's LoRA adapter first (anchors: the held-out slice)
    ensemble: bool = False  # average the LoRA trainings of the member seeds


TRAININGS = {
    "lora": Training(LORA_CONFIG),
    "lora_dropout": Training(LORA_CONFIG, {"lora_dropout": 0.1}),  # the reference's MC-dropout rate
    "blob": Training(BLOB_CONFIG),
    "blob_rank_signs": Training(BLOB_CONFIG, {"blob": {"noise": "rank_signs"}}),
}
ARMS = {  # in the order a seed runs them (trainings shared by neighbours) and the table lists them
    "lora": Arm("LoRA (MLE)", "lora"),
    "lora_temperature": Arm("LoRA + temperature scaling", "lora", temperature=True),
    "lora_ensemble": Arm("LoRA deep ensemble", "lora", ensemble=True),
    "lora_mc_dropout": Arm("LoRA + MC dropout 0.1", "lora_dropout", sampled=True, flags=("--mc-dropout",)),
    "tfb_reference": Arm("TFB (reference rule) on the LoRA adapters", "lora", sampled=True, tfb=True),
    "blob_reference": Arm("BLoB, reference recipe", "blob", sampled=True),
    "blob_reference_temperature": Arm("BLoB + temperature scaling", "blob", sampled=True, temperature=True),
    "blob_rank_signs": Arm("BLoB, noise rank_signs", "blob_rank_signs", sampled=True),
}


@dataclass
class Protocol:
    """The study's fixed choices (task, format, length, evaluation sizes) and where it writes."""

    steps: int
    task: str = "openbookqa"
    shifts: tuple[str, ...] = SHIFTS["openbookqa"]
    answer_format: str = "cloze"
    eval_size: int = 500  # questions per test / shift set at most (a seeded subset of a larger file)
    samples: int = 10  # N of the sampled arms
    members: int = 3  # ensemble members
    member_stride: int = 3  # member seeds s, s + stride, …: disjoint sets for seeds 1..stride
    tfb_flags: tuple[str, ...] = ()  # extra `bayesianize` flags
    assets: Path = ROOT / "assets"
    work: Path = WORK
    results: Path = RESULTS
    extra: dict = field(default_factory=dict)  # overrides on every training (smoke: base_model, logging_steps)

    @property
    def runs(self) -> Path:
        return self.work / f"{self.task}-{self.answer_format}-{self.steps}steps"

    @property
    def farthest(self) -> str:
        return self.shifts[-1]

    def member_seeds(self, seed: int) -> list[int]:
        return [seed + k * self.member_stride for k in range(self.members)]


# --------------------------------------------------------------------------- data


def held_out_split(p: Protocol) -> tuple[Path, Path]:
    """(the 80 % every arm trains on, the 20 % held out), the same for every seed and arm."""
    return split_file(p.assets / f"{p.task}_train.jsonl", p.work / "splits" / p.task)


def seeded_subset(path: Path, size: int, directory: Path, seed: int = 0) -> Path:
    """`path` itself if it has at most `size` questions, else `size` of them drawn with `seed`, in file order."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if len(lines) <= size:
        return path
    out = directory / f"{path.stem}-{size}.jsonl"
    if not out.is_file():
        keep = sorted(random.Random(seed).sample(range(len(lines)), size))
        directory.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(lines[i] for i in keep) + "\n")
    return out


def eval_sets(p: Protocol) -> list[dict]:
    """The calibration block's datasets: the in-distribution test first, then the shift sets (`ood: true`)."""
    def path(name: str) -> str:
        return str(seeded_subset(p.assets / f"{name}_test.jsonl", p.eval_size, p.work / "eval"))

    return [{"path": path(p.task), "name": p.task}, *({"path": path(s), "name": s, "ood": True} for s in p.shifts)]


def count_lines(path: Path) -> int:
    return sum(1 for line in path.read_text().splitlines() if line.strip())


# --------------------------------------------------------------------------- trainings


def protocol_overrides(training: Training, p: Protocol) -> dict:
    """What this study changes in the recipe besides the data (recorded in every row): the training's own keys and
    the length. num_epochs is raised until max_steps binds, so Axolotl's 6 % warm-up is 6 % of the real step count."""
    recipe = yaml.safe_load(training.config.read_text())
    per_epoch = math.ceil(count_lines(held_out_split(p)[0]) / (recipe["micro_batch_size"] * recipe["gradient_accumulation_steps"]))
    return deep_merge(training.overrides, {"max_steps": p.steps, "num_epochs": math.ceil(p.steps / per_epoch), **p.extra})


def training_config(name: str, seed: int, p: Protocol) -> dict:
    training = TRAININGS[name]
    config = deep_merge(yaml.safe_load(training.config.read_text()), protocol_overrides(training, p))
    directory = p.runs / f"{name}-seed{seed}"
    config["datasets"] = [{**config["datasets"][0], "path": str(held_out_split(p)[0]), "type": DATASET_TYPES[p.answer_format]}]
    config["calibration"] = {**config["calibration"], "datasets": eval_sets(p), "at_end": False}  # scored by evaluate
    return deep_merge(config, {"seed": seed, "output_dir": str(directory / "out"), "dataset_prepared_path": str(p.runs / "prepared")})


def train(name: str, seed: int, p: Protocol) -> tuple[Path, dict]:
    config = training_config(name, seed, p)
    directory = Path(config["output_dir"]).parent
    return directory, train_once(config, directory)


def loss_curve(directory: Path) -> list[list[float]]:
    """[[step, training loss], …] from the Trainer's log lines in train.log: one every logging_steps, and the last."""
    config = yaml.safe_load((directory / "config.yml").read_text())
    every, steps = config["logging_steps"], config["max_steps"]
    entries = [ast.literal_eval(entry) for entry in LOSS_ENTRY.findall((directory / "train.log").read_text())]
    return [[min((k + 1) * every, steps), float(entry["loss"])] for k, entry in enumerate(entries)]


# --------------------------------------------------------------------------- evaluation


def tfb_adapter(directory: Path, p: Protocol) -> tuple[Path, float]:
    """The TFB adapter of a LoRA training (bayesianize --metric nll_reference), its anchors the held-out slice: the
    config bayesianize reads names that slice as its training data. tfb.json, written last, marks it done."""
    out = directory / "tfb"
    if (out / "tfb.json").is_file():
        return out, 0.0
    config = yaml.safe_load((directory / "config.yml").read_text())
    config["datasets"] = [{**config["datasets"][0], "path": str(held_out_split(p)[1])}]
    config["blob"] = {"noise": "flipout"}  # the reference's noise path, which the tfb_reference rows searched under
    tfb_config = directory / "tfb-config.yml"
    tfb_config.write_text(yaml.safe_dump(config, sort_keys=False))
    command = [sys.executable, "-m", "axolotl_blob.bayesianize", str(tfb_config), "--adapter", str(directory / "out"),
               "--out", str(out), "--metric", "nll_reference", *p.tfb_flags]  # fmt: skip
    return out, run(command, directory / "tfb.log")


def linked_adapter(directory: Path, arm_name: str) -> Path:
    """The training's adapter as a directory of links of the arm's own, for an arm that writes beside its adapter
    (`evaluate --fit-temperature` saves temperature.json there, which `evaluate` and `predict` then apply by
    default): the training's own out/ stays as trained for the arms that share it."""
    linked = directory / f"out-{arm_name}"
    linked.mkdir(exist_ok=True)
    for path in (directory / "out").iterdir():
        if path.is_file() and path.name != "temperature.json" and not (linked / path.name).exists():
            (linked / path.name).symlink_to(path)
    return linked


def dataset_rows(summary: dict[str, dict], p: Protocol) -> dict[str, dict]:
    """{name: {"shift": …, metrics}} from `evaluate --json` (numbers only: the temperature goes on the row)."""
    return {
        name: {"shift": name in p.shifts, **{k: v for k, v in metrics.items() if k != "temperature" and not isinstance(v, str)}}
        for name, metrics in summary.items()
    }


def evaluate(arm_name: str, directory: Path, p: Protocol) -> tuple[dict, dict, float]:
    """(datasets, extra row fields, seconds) of one arm on one training."""
    arm, adapter, seconds, extra = ARMS[arm_name], directory / "out", 0.0, {}
    if arm.tfb:
        adapter, seconds = tfb_adapter(directory, p)
        extra["sigma_q"] = json.loads((adapter / "tfb.json").read_text())["sigma_q"]
    flags = [*arm.flags, "--samples", str(p.samples if arm.sampled else 0)]
    if arm.temperature:
        adapter = linked_adapter(directory, arm_name)
        flags += ["--fit-temperature", str(held_out_split(p)[1])]
    out = directory / f"eval-{arm_name}.json"
    command = [sys.executable, "-m", "axolotl_blob.evaluate", str(directory / "config.yml"), "--adapter", str(adapter)]
    seconds += run([*command, *flags, "--json", str(out)], directory / f"eval-{arm_name}.log")
    summary = json.loads(out.read_text())
    if arm.temperature:
        extra["temperature"] = next(iter(summary.values()))["temperature"]
    return dataset_rows(summary, p), extra, seconds


def member_probabilities(predictions: Path, sizes: list[int]):
    """Per eval set, the (questions, K) probabilities of one member's `predict` output over the concatenated sets."""
    import torch

    rows = [json.loads(line)["probabilities"] for line in predictions.read_text().splitlines() if line.strip()]
    width = max(len(r) for r in rows)
    probs = torch.tensor([r + [0.0] * (width - len(r)) for r in rows], dtype=torch.float64)
    return list(torch.split(probs, sizes))


def ensemble_metrics(members: list[dict], labels: dict, shifts: set[str], n_bins: int = N_BINS) -> dict[str, dict]:
    """The deep ensemble's metrics per eval set, by the package's own code: the members' probabilities averaged,
    draw_entropy = the members' mean entropy (so mutual information = H(mean) − mean H), and the shift sets' AUROCs
    against the (first) in-distribution set, as `evaluate` reports them. `members`: per member {set: (n, K)}."""
    import torch

    from axolotl_blob.calibration.metrics import CalibrationState, entropy
    from axolotl_blob.calibration.ood import OOD_SCORES, ood_metrics
    from axolotl_blob.calibration.report import dataset_report, scalar_metrics

    states = {}
    for name, answers in labels.items():
        stacked = torch.stack([member[name] for member in members])  # (M, n, K)
        states[name] = CalibrationState(n_bins)
        states[name].update(stacked.mean(0), answers, entropy(stacked).mean(0))
    records = {name: {score: state.record(score) for score in OOD_SCORES} for name, state in states.items()}
    in_distribution = records[next(name for name in labels if name not in shifts)]
    datasets = {}
    for name, state in states.items():
        datasets[name] = {"shift": name in shifts, **scalar_metrics(dataset_report(state, len(members)))}
        if name in shifts:
            datasets[name].update(ood_metrics(in_distribution, records[name]))
    return datasets


def evaluate_ensemble(seed: int, p: Protocol) -> tuple[dict, dict, float]:
    """The ensemble of `seed`: its members trained (or reused), each predicting every eval set in one pass."""
    import torch

    sets = eval_sets(p)
    questions = [[json.loads(line) for line in Path(s["path"]).read_text().splitlines() if line.strip()] for s in sets]
    questions_file = p.runs / "ensemble-questions.jsonl"
    if not questions_file.is_file():
        questions_file.parent.mkdir(parents=True, exist_ok=True)
        questions_file.write_text("".join(json.dumps(q) + "\n" for qs in questions for q in qs))
    members, train_seconds, seconds = [], 0.0, 0.0
    for member_seed in p.member_seeds(seed):
        directory, info = train("lora", member_seed, p)
        train_seconds += info["train_seconds"]
        predictions = directory / "predictions.jsonl"
        if not predictions.is_file():  # predict writes it whole, at the end
            command = [sys.executable, "-m", "axolotl_blob.predict", str(directory / "config.yml"), "--adapter",
                       str(directory / "out"), "--input", str(questions_file), "--output", str(predictions),
                       "--samples", "0", "--batch-size", "16"]  # fmt: skip
            seconds += run(command, directory / "predict.log")
        probs = member_probabilities(predictions, [len(qs) for qs in questions])
        members.append({s["name"]: member for s, member in zip(sets, probs)})
    labels = {s["name"]: torch.tensor([q["answer"] for q in qs]) for s, qs in zip(sets, questions)}
    datasets = ensemble_metrics(members, labels, set(p.shifts))
    return datasets, {"members": p.member_seeds(seed), "train_seconds": round(train_seconds, 1)}, seconds


# --------------------------------------------------------------------------- the study


def check_results_file(rows: list[dict], p: Protocol) -> None:
    """One results file holds one protocol: rows of another task, format or length would be skipped as done."""
    other = {(r["task"], r["answer_format"], r["steps"]) for r in rows} - {(p.task, p.answer_format, p.steps)}
    if other:
        raise SystemExit(f"{p.results} holds runs of (task, answer_format, steps) {sorted(other)}, this study is "
                         f"{(p.task, p.answer_format, p.steps)}: give it its own --results file")  # fmt: skip


def run_study(arms: list[str], seeds: list[int], p: Protocol) -> None:
    rows = read_results(p.results)
    check_results_file(rows, p)
    done = {(row["arm"], row["seed"]) for row in rows}
    for seed in seeds:  # seed-major: a stopped study has whole seeds
        for arm_name in [a for a in ARMS if a in arms]:
            if (arm_name, seed) in done:
                print(f"skip {arm_name} seed {seed}: in {p.results.name}")
                continue
            arm = ARMS[arm_name]
            row = {"arm": arm_name, "label": arm.label, "seed": seed, "task": p.task, "answer_format": p.answer_format,
                   "steps": p.steps, "training": arm.training, "samples": p.samples if arm.sampled else 0,
                   "farthest": p.farthest}  # fmt: skip
            if arm.ensemble:
                datasets, extra, eval_seconds = evaluate_ensemble(seed, p)
                row["samples"] = p.members
            else:
                directory, info = train(arm.training, seed, p)
                datasets, extra, eval_seconds = evaluate(arm_name, directory, p)
                extra = {**info, **extra, "train_loss_curve": loss_curve(directory)}
            row.update(datasets=datasets, **extra, eval_seconds=round(eval_seconds, 1), commit=commit(),
                       overrides=protocol_overrides(TRAININGS[arm.training], p))  # fmt: skip
            append_result(p.results, row)
            scores = datasets[p.task]
            print(f"{arm_name} seed {seed}: {p.task} acc {scores['acc']:.4f} ece {scores['ece']:.4f} nll {scores['nll']:.4f}", flush=True)


# --------------------------------------------------------------------------- table, figure, goals

COLUMNS = {  # key: header
    "id_acc": "ID acc", "id_ece": "ID ECE", "id_nll": "ID NLL", "shift_acc": "shift acc", "shift_ece": "shift ECE",
    "shift_nll": "shift NLL", "far_auroc_mi": "AUROC(MI), farthest",
}  # fmt: skip


def run_values(row: dict) -> dict[str, float]:
    """One run's table entries: the in-distribution set's, the mean over the shift sets, the farthest set's AUROC."""
    datasets = row["datasets"]
    in_distribution = next(d for d in datasets.values() if not d["shift"])
    shifted = [d for d in datasets.values() if d["shift"]]
    values = {f"id_{m}": in_distribution[m] for m in ("acc", "ece", "nll")}
    values.update({f"shift_{m}": statistics.mean(d[m] for d in shifted) for m in ("acc", "ece", "nll")})
    values["far_auroc_mi"] = datasets[row["farthest"]]["ood_auroc_by_mutual_info"]
    return values


def summary(rows: list[dict]) -> dict[str, dict[str, list[float]]]:
    """{arm: {column: values over seeds}}, arms in the order of ARMS."""
    by_arm: dict[str, list[dict]] = {}
    for row in sorted(rows, key=lambda r: r["seed"]):
        by_arm.setdefault(row["arm"], []).append(run_values(row))
    order = [a for a in ARMS if a in by_arm] + [a for a in by_arm if a not in ARMS]
    return {arm: {c: [v[c] for v in by_arm[arm]] for c in COLUMNS} for arm in order}


def markdown(rows: list[dict]) -> str:
    lines = ["| arm | seeds | " + " | ".join(COLUMNS.values()) + " |", "| --- | --- |" + " --- |" * len(COLUMNS)]
    for arm, values in summary(rows).items():
        seeds = len(values["id_acc"])
        lines.append(f"| `{arm}` | {seeds} | " + " | ".join(mean_sd(values[c]) for c in COLUMNS) + " |")
    return "\n".join(lines)


DATASET_COLUMNS = {  # key: header, per eval set
    "acc": "acc", "ece": "ECE", "nll": "NLL", "brier": "Brier", "confidence": "confidence",
    "ood_auroc_by_confidence": "AUROC(max prob)", "ood_auroc_by_mutual_info": "AUROC(MI)",
}  # fmt: skip


def per_dataset_markdown(rows: list[dict]) -> str:
    """One table per eval set (the in-distribution test first): every metric the issue asks for, mean ± sd over seeds;
    the AUROCs tell that shift set from the in-distribution test (the latter has none: "—")."""
    arms, rows = list(summary(rows)), sorted(rows, key=lambda r: r["seed"])
    sections = []
    for name in rows[0]["datasets"]:
        shift = rows[0]["datasets"][name]["shift"]
        lines = [f"**{name}** ({'shift' if shift else 'in-distribution'})", "",
                 "| arm | " + " | ".join(DATASET_COLUMNS.values()) + " |", "| --- |" + " --- |" * len(DATASET_COLUMNS)]  # fmt: skip
        for arm in arms:
            runs = [row["datasets"][name] for row in rows if row["arm"] == arm]
            cells = [mean_sd([run[key] for run in runs]) if key in runs[0] else "—" for key in DATASET_COLUMNS]
            lines.append(f"| `{arm}` | " + " | ".join(cells) + " |")
        sections.append("\n".join(lines))
    return "\n\n".join(sections)


def pyplot():
    """matplotlib's pyplot on the file-only backend (no display here)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def figure(rows: list[dict], path: Path) -> None:
    """ECE and NLL per arm, in-distribution beside the shift sets' mean (mean ± sd over seeds)."""
    plt = pyplot()
    table = summary(rows)
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.5 * len(table) + 1.8), sharey=True)
    height = 0.38
    for ax, metric in zip(axes, ("ece", "nll")):
        for offset, (where, color) in zip((-height / 2, height / 2), (("id", "tab:blue"), ("shift", "tab:orange"))):
            values = [table[arm][f"{where}_{metric}"] for arm in table]
            means = [statistics.mean(v) for v in values]
            errors = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
            label = "in-distribution test" if where == "id" else "shift sets (mean)"
            ax.barh([i + offset for i in range(len(table))], means, height, xerr=errors, color=color, capsize=3, label=label)
        ax.set_title(f"{metric.upper()} (mean ± sd over seeds)")
        ax.invert_yaxis()
    axes[0].set_yticks(range(len(table)), list(table), fontsize=8)
    axes[1].legend(fontsize=8, loc="lower right")
    save_figure(fig, path)


def curves_figure(rows: list[dict], path: Path) -> None:
    """Each training's loss curve (mean over its seeds) beside its in-distribution test NLL at the end: the gap between
    them is the over-training the regime is chosen for. One line per training (arms that share one share its curve)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    trainings = {}  # training: its first arm in the table's order (the plain one: untempered, not TFB's)
    for arm in summary(rows):
        row = next(row for row in rows if row["arm"] == arm)
        if "train_loss_curve" in row:
            trainings.setdefault(row["training"], arm)
    for (training, arm), color in zip(trainings.items(), plt.rcParams["axes.prop_cycle"].by_key()["color"]):
        runs = [row for row in rows if row["arm"] == arm]
        steps = [step for step, _ in runs[0]["train_loss_curve"]]
        losses = [statistics.mean(run["train_loss_curve"][k][1] for run in runs) for k in range(len(steps))]
        ax.plot(steps, losses, color=color, label=f"{training}: training loss ({len(runs)} seed{'s' if len(runs) > 1 else ''})")
        test_nll = statistics.mean(run_values(run)["id_nll"] for run in runs)
        ax.axhline(test_nll, color=color, linestyle="--", label=f"{arm}: test NLL at the end {test_nll:.3f}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("K-way NLL")
    ax.legend(fontsize=7)
    save_figure(fig, path)


def _stats(values: list[float]) -> tuple[float, float, int]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values)


def goals(rows: list[dict], bayesian_arm: str = "blob_reference_temperature") -> list[str]:
    """The issue's five goals on the seeds' means, each met or missed and by how much."""
    table = summary(rows)

    def need(*arms: str) -> str | None:
        missing = [a for a in arms if a not in table]
        return f"not evaluable: no runs of {', '.join(missing)}" if missing else None

    def verdict(met: bool) -> str:
        return "met" if met else "missed"

    out = []
    if not (why := need("lora")):
        ece = _stats(table["lora"]["id_ece"])[0]
        why = f"{verdict(ece >= 0.15)}: LoRA's ID ECE {ece:.3f} vs ≥ 0.15 (by {ece - 0.15:+.3f})"
    out.append(f"1. plain LoRA heavily over-confident: {why}")

    why = need("lora", "blob_reference")
    if not why and min(len(table[arm]["id_acc"]) for arm in ("lora", "blob_reference")) < 2:
        why = "not evaluable: the accuracies' standard error needs at least 2 seeds of each"
    if not why:
        (lora_ece, _, _), (blob_ece, _, _) = _stats(table["lora"]["id_ece"]), _stats(table["blob_reference"]["id_ece"])
        (lora_acc, lora_sd, n_l), (blob_acc, blob_sd, n_b) = _stats(table["lora"]["id_acc"]), _stats(table["blob_reference"]["id_acc"])
        cut = 1 - blob_ece / lora_ece
        se = math.sqrt(lora_sd**2 / n_l + blob_sd**2 / n_b)  # the standard error of the difference of the two means
        why = (f"{verdict(cut >= 0.5 and abs(blob_acc - lora_acc) <= se)}: ID ECE {lora_ece:.3f} → {blob_ece:.3f}, cut "
               f"{cut:.0%} vs ≥ 50 %; accuracy {lora_acc:.3f} → {blob_acc:.3f}, |Δ| {abs(blob_acc - lora_acc):.3f} vs one "
               f"standard error {se:.3f}")  # fmt: skip
    out.append(f"2. BLoB halves LoRA's ID ECE at equal accuracy: {why}")

    if not (why := need("lora_temperature", bayesian_arm)):
        ours, theirs = table[bayesian_arm], table["lora_temperature"]
        shift = {m: (_stats(ours[f"shift_{m}"])[0], _stats(theirs[f"shift_{m}"])[0]) for m in ("ece", "nll")}
        in_dist = {m: (_stats(ours[f"id_{m}"])[0], *_stats(theirs[f"id_{m}"])[:2]) for m in ("ece", "nll")}
        met = all(a < b for a, b in shift.values()) and all(a <= b + sd for a, b, sd in in_dist.values())
        why = (f"{verdict(met)}: shift-mean " + ", ".join(f"{m.upper()} {a:.3f} vs {b:.3f} ({a - b:+.3f})" for m, (a, b) in shift.items())
               + "; ID " + ", ".join(f"{m.upper()} {a:.3f} vs {b:.3f} ({a - b:+.3f}, one sd {sd:.3f})" for m, (a, b, sd) in in_dist.items()))  # fmt: skip
    out.append(f"3. `{bayesian_arm}` beats LoRA + temperature scaling under shift: {why}")

    why = need("lora", "tfb_reference")
    if not why and len(table["lora"]["id_ece"]) < 2:
        why = "not evaluable: LoRA's seed spread needs at least 2 seeds"
    if not why:
        columns = {"ID ECE": "id_ece", "ID NLL": "id_nll", "shift ECE": "shift_ece", "shift NLL": "shift_nll"}
        moves = {name: (_stats(table["tfb_reference"][c])[0] - _stats(table["lora"][c])[0], _stats(table["lora"][c])[1])
                 for name, c in columns.items()}  # fmt: skip
        met = any(abs(delta) > sd for delta, sd in moves.values())
        why = f"{verdict(met)}: " + ", ".join(f"{name} {delta:+.3f} vs LoRA's sd {sd:.3f}" for name, (delta, sd) in moves.items())
    out.append(f"4. TFB moves ECE or NLL beyond LoRA's seed spread: {why}")

    if not (why := need(bayesian_arm)):
        auroc = _stats(table[bayesian_arm]["far_auroc_mi"])[0]
        farthest = rows[0]["farthest"]
        why = f"{verdict(auroc > 0.5)}: AUROC by mutual information on {farthest} {auroc:.3f} vs > 0.5 (by {auroc - 0.5:+.3f})"
    out.append(f"5. `{bayesian_arm}`'s mutual information separates the farthest shift set: {why}")
    return out


def noise_path(rows: list[dict]) -> str:
    """The issue's rule for the default `blob.noise`: switch to rank_signs (LoRA's cost) if its row is within seed
    noise of Flipout's. Fixed before its seeds were in: on every column but the AUROC, the two means differ by no more
    than the larger of the two arms' seed sds."""
    table = summary(rows)
    missing = [arm for arm in ("blob_reference", "blob_rank_signs") if len(table.get(arm, {}).get("id_acc", [])) < 2]
    if missing:
        return f"default noise path: not decided: fewer than 2 seeds of {', '.join(missing)}"
    columns = [c for c in COLUMNS if c != "far_auroc_mi"]
    gaps = {}
    for c in columns:
        (flipout, flipout_sd, _), (signs, signs_sd, _) = _stats(table["blob_reference"][c]), _stats(table["blob_rank_signs"][c])
        gaps[c] = (signs - flipout, max(flipout_sd, signs_sd))
    within = all(abs(delta) <= sd for delta, sd in gaps.values())
    verdict = "rank_signs (within seed noise of flipout on every column)" if within else "flipout (rank_signs differs beyond seed noise)"
    return f"default noise path: {verdict}: " + ", ".join(f"{COLUMNS[c]} {d:+.3f} vs sd {sd:.3f}" for c, (d, sd) in gaps.items())


README_START, README_END = "<!-- paper-protocol-table:start -->", "<!-- paper-protocol-table:end -->"


def write_readme_table(readme: Path, table: str) -> None:
    """Replace the README's rendered block (between the two markers) with `table`, so its numbers are the file's."""
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        raise SystemExit(f"{readme}: no {README_START} … {README_END} block to write the table into")
    head, rest = text.split(README_START, 1)
    readme.write_text(f"{head}{README_START}\n{table}\n{README_END}{rest.split(README_END, 1)[1]}")


def render(results: Path, bayesian_arm: str, readme: Path | None = None) -> None:
    rows = read_results(results)
    if not rows:
        raise SystemExit(f"{results}: no finished runs yet")
    lines = goals(rows, bayesian_arm)
    table = markdown(rows)
    text = (table + "\n\nGoals (mean over seeds):\n\n" + "\n".join(lines) + "\n\n" + noise_path(rows)
            + "\n\nPer eval set:\n\n" + per_dataset_markdown(rows))  # fmt: skip
    print(text)
    results.with_suffix(".md").write_text(text + "\n")
    curves = results.with_name(results.stem + "_curves.png")
    figure(rows, results.with_suffix(".png"))
    curves_figure(rows, curves)
    print(f"wrote {results.with_suffix('.md')}, {results.with_suffix('.png')} and {curves}")
    if readme is not None:
        write_readme_table(readme, table)
        print(f"wrote the table into {readme}")


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=("study", "render"))
    parser.add_argument("--steps", type=int, default=None, help="study: optimizer steps of every training (required)")
    parser.add_argument("--task", default="openbookqa", help="assets/<task>_train.jsonl and _test.jsonl")
    parser.add_argument("--shift", nargs="+", default=None, metavar="SET",
                        help="shift sets assets/<SET>_test.jsonl, the farthest last (default for openbookqa: "
                             f"{' '.join(SHIFTS['openbookqa'])})")  # fmt: skip
    parser.add_argument("--answer-format", choices=tuple(DATASET_TYPES), default="cloze", help="the training data's format")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="default: 1 2 3 (smoke: 1)")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--eval-size", type=int, default=500, help="questions per test / shift set at most (seeded subset)")
    parser.add_argument("--samples", type=int, default=10, help="N of the sampled arms")
    parser.add_argument("--members", type=int, default=3, help="ensemble members")
    parser.add_argument("--member-stride", type=int, default=3, help="member seeds s, s + stride, …")
    parser.add_argument("--tfb-tolerance", type=float, default=None, help="bayesianize --tolerance (default: its own)")
    parser.add_argument("--assets", type=Path, default=ROOT / "assets")
    parser.add_argument("--base-model", default=None, help="instead of the recipes' (smoke tests)")
    parser.add_argument("--work", type=Path, default=None, help="default: outputs/paper_protocol (smoke: …/smoke)")
    parser.add_argument("--results", type=Path, default=None, help="default: bench/results/paper_protocol_study.jsonl")
    parser.add_argument("--bayesian-arm", default="blob_reference_temperature", choices=list(ARMS),
                        help="render: the recommended Bayesian recipe, which goals 3 and 5 judge")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md", help="render: the file whose marked block gets the table")
    parser.add_argument("--smoke", action="store_true",
                        help="4 steps in fp32, 8 questions per set, N = 2, a 2-member ensemble, seed 1, results under outputs/")  # fmt: skip
    return parser


def protocol(args: argparse.Namespace) -> Protocol:
    if args.steps is None and not args.smoke:
        raise SystemExit("study: give --steps (the pilot decides the step count)")
    shifts = tuple(args.shift or SHIFTS.get(args.task, ()))
    if not shifts:
        raise SystemExit(f"no default shift sets for task {args.task!r}: give --shift")
    p = Protocol(steps=args.steps or 4, task=args.task, shifts=shifts, answer_format=args.answer_format,
                 eval_size=args.eval_size, samples=args.samples, members=args.members, member_stride=args.member_stride,
                 assets=args.assets, work=args.work or WORK)  # fmt: skip
    if args.tfb_tolerance is not None:
        p.tfb_flags = ("--tolerance", str(args.tfb_tolerance))
    if args.base_model:
        p.extra["base_model"] = args.base_model
    if args.smoke:  # only the plumbing: 4 steps leave B near 0, where any σ_q moves the answers (TFB's tolerance 10)
        p.work = args.work or WORK / "smoke"
        p.eval_size, p.samples, p.members, p.member_stride = 8, 2, 2, 1
        p.tfb_flags = ("--tolerance", "10", "--samples", "2")
        p.extra.update(logging_steps=1, bf16=False, calibration={"batch_size": 8, "plots": False})  # fp32: the same
        # scores from evaluate and predict whatever their batches
    p.results = args.results or (p.work / "study.jsonl" if args.smoke else RESULTS)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.mode == "render":
        render(args.results or RESULTS, args.bayesian_arm, args.readme)
        return
    run_study(args.arms, args.seeds or ([1] if args.smoke else [1, 2, 3]), protocol(args))


if __name__ == "__main__":
    main()
