"""The paper-protocol study harness (bench/paper_protocol_study.py): the held-out split, the configs it trains, the
deep ensemble's metrics, the table and the goals; and (slow) a whole smoke study on the tiny model."""

import json
import math
import random
import statistics
import sys
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import paper_protocol_study as study  # noqa: E402
from conftest import color_questions, write_jsonl  # noqa: E402


@pytest.fixture
def assets(tmp_path) -> Path:
    """A task 'colors' (50 training, 30 test questions) and a shift set 'far' (12)."""
    directory = tmp_path / "assets"
    directory.mkdir()
    write_jsonl(directory / "colors_train.jsonl", color_questions(50, seed=0))
    write_jsonl(directory / "colors_test.jsonl", color_questions(30, seed=1))
    write_jsonl(directory / "far_test.jsonl", color_questions(12, seed=2))
    return directory


def protocol(assets: Path, tmp_path: Path, **kwargs) -> study.Protocol:
    return study.Protocol(**{"steps": 25, "task": "colors", "shifts": ("far",), "assets": assets, "work": tmp_path / "work", **kwargs})


def test_the_held_out_slice_is_a_seeded_fifth_of_the_training_file_written_once(assets, tmp_path):
    lines = (assets / "colors_train.jsonl").read_text().splitlines()
    train, held_out = study.held_out_split(protocol(assets, tmp_path))
    shuffled = lines.copy()
    random.Random(0).shuffle(shuffled)
    assert held_out.read_text().splitlines() == shuffled[40:] and train.read_text().splitlines() == shuffled[:40]
    assert held_out == tmp_path / "work" / "splits" / "colors" / "held_out.jsonl"
    write_jsonl(assets / "colors_train.jsonl", color_questions(50, seed=9))  # a changed source: the split stays
    assert study.held_out_split(protocol(assets, tmp_path))[1].read_text().splitlines() == shuffled[40:]


def test_a_large_test_file_is_scored_on_a_fixed_seeded_subset_in_file_order(assets, tmp_path):
    sets = study.eval_sets(protocol(assets, tmp_path, eval_size=20))
    assert [(s["name"], s.get("ood", False)) for s in sets] == [("colors", False), ("far", True)]
    assert sets[1]["path"] == str(assets / "far_test.jsonl")  # 12 ≤ 20: the file itself
    lines = (assets / "colors_test.jsonl").read_text().splitlines()
    keep = sorted(random.Random(0).sample(range(30), 20))
    assert Path(sets[0]["path"]).read_text().splitlines() == [lines[i] for i in keep]


def test_each_training_is_its_recipe_with_the_protocol_on_top(assets, tmp_path):
    p = protocol(assets, tmp_path)
    rank_signs = study.training_config("blob_rank_signs", 2, p)
    recipe = yaml.safe_load(study.BLOB_CONFIG.read_text())
    assert rank_signs["blob"] == {**recipe["blob"], "noise": "rank_signs"} and rank_signs["adapter"] == "blob"
    assert rank_signs["multiple_choice"] == recipe["multiple_choice"] == {"likelihood": "choices"}
    # 40 training questions, batch 4: 10 steps an epoch; 3 epochs so that max_steps 25 binds (warm-up: 6 % of 25)
    assert (rank_signs["max_steps"], rank_signs["num_epochs"], rank_signs["warmup_ratio"]) == (25, 3, 0.06)
    assert rank_signs["datasets"] == [{"path": str(study.held_out_split(p)[0]), "type": "axolotl_blob.cloze"}]
    assert rank_signs["calibration"]["datasets"] == study.eval_sets(p) and rank_signs["calibration"]["at_end"] is False
    assert rank_signs["seed"] == 2 and rank_signs["output_dir"] == str(p.runs / "blob_rank_signs-seed2" / "out")
    dropout = study.training_config("lora_dropout", 1, protocol(assets, tmp_path, answer_format="letters"))
    assert dropout["adapter"] == "lora" and dropout["lora_dropout"] == 0.1 and dropout["datasets"][0]["type"] == "axolotl_blob.multiple_choice"
    assert study.Protocol(steps=1).member_seeds(2) == [2, 5, 8]  # seeds 1-3: disjoint member sets


RECOMMENDED_CONFIG = study.ROOT / "example_configs" / "lora-temperature-arc-easy.yml"  # the README's recommendation
STUDY_AS_RUN = "study --task arc_easy --steps 1000 --eval-size 300 --member-stride 1 --tfb-tolerance 0.0133"


def test_the_recommended_config_trains_what_the_study_measured(tmp_path):
    """The shipped recipe is the study's training of its arm, key for key: only where the data live (the same
    questions under the assets' names), where it writes, and the calibration block (whole test files) differ."""
    if not (study.ROOT / "assets" / "arc_easy_train.jsonl").is_file():
        pytest.skip("assets/arc_easy_train.jsonl not built (python -m axolotl_blob.assets --out assets)")
    p = study.protocol(study.build_parser().parse_args([*STUDY_AS_RUN.split(), "--work", str(tmp_path)]))
    measured = study.training_config(study.ARMS["lora_temperature"].training, 1, p)
    shipped = yaml.safe_load(RECOMMENDED_CONFIG.read_text())
    where = {"datasets", "calibration", "output_dir", "dataset_prepared_path"}
    assert {k: v for k, v in shipped.items() if k not in where} == {
        k: v for k, v in measured.items() if k not in where | {"multiple_choice"}  # cloze's only likelihood: choices
    }
    assert measured["multiple_choice"] == {"likelihood": "choices"}

    def text(path: str) -> str:
        return (study.ROOT / path).read_text()

    train, held_out = study.held_out_split(p)
    assert shipped["datasets"] == [{"path": shipped["datasets"][0]["path"], "type": measured["datasets"][0]["type"]}]
    assert text(shipped["datasets"][0]["path"]) == train.read_text()
    assert text(shipped["calibration"]["fit_temperature"]) == held_out.read_text()
    names = [(d["name"], d.get("ood", False)) for d in shipped["calibration"]["datasets"]]
    assert names == [(d["name"], d.get("ood", False)) for d in measured["calibration"]["datasets"]]


def test_the_loss_curve_is_read_from_the_trainers_log_lines(tmp_path):
    (tmp_path / "config.yml").write_text(yaml.safe_dump({"logging_steps": 25, "max_steps": 60}))
    entries = [{"loss": f"{loss}", "grad_norm": "1.0", "epoch": "0.5"} for loss in (1.3, 0.9, 0.2)]
    log = " 5%|| 25/60 [00:01<00:02] ".join(str(entry) for entry in entries)
    (tmp_path / "train.log").write_text(log + "\n{'train_runtime': '3.0', 'train_loss': '0.8', 'epoch': '1.5'}\n")
    assert study.loss_curve(tmp_path) == [[25, 1.3], [50, 0.9], [60, 0.2]]


def entropy(*p: float) -> float:
    return -sum(x * math.log(x) for x in p)


def test_the_ensemble_averages_member_probabilities_and_scores_them_with_the_package(tmp_path):
    members = [[[0.8, 0.2], [0.4, 0.6], [0.9, 0.1], [0.1, 0.9]], [[0.6, 0.4], [0.2, 0.8], [0.1, 0.9], [0.9, 0.1]]]
    files = [write_jsonl(tmp_path / f"m{i}.jsonl", [{"id": None, "probabilities": p} for p in rows]) for i, rows in enumerate(members)]
    probs = [dict(zip(("id", "shift"), study.member_probabilities(f, [2, 2]))) for f in files]
    labels = {"id": torch.tensor([0, 0]), "shift": torch.tensor([1, 0])}
    datasets = study.ensemble_metrics(probs, labels, {"shift"})
    ours = datasets["id"]  # mean probabilities (0.7, 0.3) and (0.3, 0.7): one right at 0.7, one wrong at 0.7
    assert ours["shift"] is False and not any(k.startswith("ood_auroc") for k in ours)
    assert ours["acc"] == 0.5 and ours["confidence"] == pytest.approx(0.7) and ours["ece"] == pytest.approx(0.2)
    assert ours["nll"] == pytest.approx(-(math.log(0.7) + math.log(0.3)) / 2)
    assert ours["brier"] == pytest.approx((0.3**2 + 0.3**2 + 0.7**2 + 0.7**2) / 2)
    mutual_info = entropy(0.7, 0.3) - (entropy(0.8, 0.2) + entropy(0.6, 0.4)) / 2  # H(mean) − mean H, both questions
    assert ours["mutual_info"] == pytest.approx(mutual_info) and ours["n_samples"] == 2 and ours["n"] == 2
    shifted = datasets["shift"]  # the members disagree: (0.5, 0.5) twice, MI ln 2 − H(0.9, 0.1)
    assert shifted["shift"] is True and shifted["nll"] == pytest.approx(math.log(2))
    assert shifted["mutual_info"] == pytest.approx(math.log(2) - entropy(0.9, 0.1))
    assert shifted["ood_auroc_by_confidence"] == 1.0 and shifted["ood_auroc_by_mutual_info"] == 1.0


def fake_row(arm: str, seed: int, acc: float, ece: float, nll: float, shift_ece: float, shift_nll: float, far_mi: float = 0.5) -> dict:
    def scores(a, e, n, **extra):
        return {"acc": a, "ece": e, "nll": n, **extra}

    return {"arm": arm, "seed": seed, "task": "colors", "answer_format": "cloze", "steps": 25, "farthest": "far",
            "datasets": {"colors": {"shift": False, **scores(acc, ece, nll)},
                         "near": {"shift": True, **scores(acc - 0.1, shift_ece - 0.05, shift_nll - 0.1, ood_auroc_by_mutual_info=0.5)},
                         "far": {"shift": True, **scores(acc - 0.2, shift_ece + 0.05, shift_nll + 0.1, ood_auroc_by_mutual_info=far_mi)}}}  # fmt: skip


FAKE = [
    *(fake_row("lora", s, acc, ece, 1.0 + ece, 0.3, 1.6) for s, acc, ece in ((1, 0.50, 0.20), (2, 0.52, 0.22), (3, 0.54, 0.24))),
    *(fake_row("lora_temperature", s, 0.52, ece, 0.9, 0.20, 1.3) for s, ece in ((1, 0.05), (2, 0.06), (3, 0.07))),
    *(fake_row("tfb_reference", s, 0.52, ece, 1.0 + ece, 0.3, 1.6) for s, ece in ((1, 0.21), (2, 0.23), (3, 0.25))),
    *(fake_row("blob_reference", s, 0.51, 0.10, 0.95, 0.15, 1.2, far_mi=0.6) for s in (1, 2, 3)),
]


def test_the_table_is_mean_and_sd_over_seeds_in_arm_order():
    header, _, *lines = study.markdown(FAKE[::-1]).splitlines()
    assert header == "| arm | seeds | ID acc | ID ECE | ID NLL | shift acc | shift ECE | shift NLL | AUROC(MI), farthest |"
    assert [line.split(" | ")[0] for line in lines] == ["| `lora`", "| `lora_temperature`", "| `tfb_reference`", "| `blob_reference`"]
    sd = statistics.stdev([0.50, 0.52, 0.54])
    assert lines[0] == (f"| `lora` | 3 | 0.520 ± {sd:.3f} | 0.220 ± {sd:.3f} | 1.220 ± {sd:.3f} | 0.370 ± {sd:.3f} | "
                        "0.300 ± 0.000 | 1.600 ± 0.000 | 0.500 ± 0.000 |")  # fmt: skip


def test_the_goals_are_judged_on_the_seeds_means():
    one, two, three, four, five = study.goals(FAKE, "blob_reference")
    assert one == "1. plain LoRA heavily over-confident: met: LoRA's ID ECE 0.220 vs ≥ 0.15 (by +0.070)"
    se = 0.02 / math.sqrt(3)  # |Δacc| 0.010 within the standard error of the difference, ECE cut 1 − 0.10 / 0.22
    assert two.startswith("2. BLoB halves LoRA's ID ECE at equal accuracy: met: ID ECE 0.220 → 0.100, cut 55% vs ≥ 50 %")
    assert two.endswith(f"|Δ| 0.010 vs one standard error {se:.3f}")
    assert three.startswith("3. `blob_reference` beats LoRA + temperature scaling under shift: missed: shift-mean ECE 0.150 vs 0.200")
    assert "ID ECE 0.100 vs 0.060 (+0.040, one sd 0.010)" in three  # lower under shift, worse than one sd in-distribution
    assert four == ("4. TFB moves ECE or NLL beyond LoRA's seed spread: missed: ID ECE +0.010 vs LoRA's sd 0.020, ID NLL "
                    "+0.010 vs LoRA's sd 0.020, shift ECE +0.000 vs LoRA's sd 0.000, shift NLL +0.000 vs LoRA's sd 0.000")
    assert study.goals(FAKE)[2] == (  # the default arm: BLoB + temperature scaling
        "3. `blob_reference_temperature` beats LoRA + temperature scaling under shift: not evaluable: no runs of blob_reference_temperature")
    assert five.endswith("met: AUROC by mutual information on far 0.600 vs > 0.5 (by +0.100)")
    one_seed = [row for row in FAKE if row["seed"] == 1]  # no spread to beat: not judged
    assert study.goals(one_seed, "blob_reference")[1] == (
        "2. BLoB halves LoRA's ID ECE at equal accuracy: not evaluable: the accuracies' standard error needs at least 2 seeds of each")
    assert study.goals(one_seed, "blob_reference")[3] == "4. TFB moves ECE or NLL beyond LoRA's seed spread: not evaluable: LoRA's seed spread needs at least 2 seeds"
    assert study.goals(FAKE[:3], "blob_reference")[1] == "2. BLoB halves LoRA's ID ECE at equal accuracy: not evaluable: no runs of blob_reference"


def test_the_default_noise_path_switches_only_within_seed_noise():
    signs = [fake_row("blob_rank_signs", s, acc, 0.10, 0.95, 0.15, 1.2) for s, acc in ((1, 0.50), (2, 0.51), (3, 0.52))]
    verdict = study.noise_path(FAKE + signs)  # accuracy 0.510 on both, sd 0.010 vs 0; every other column equal
    assert verdict.startswith("default noise path: rank_signs (within seed noise of flipout on every column): ID acc +0.000 vs sd 0.010")
    worse = [fake_row("blob_rank_signs", s, 0.51, 0.10 + 0.01 * s, 0.95, 0.15, 1.2) for s in (1, 2, 3)]  # ID ECE 0.12 ± 0.01
    verdict = study.noise_path(FAKE + worse)
    assert verdict.startswith("default noise path: flipout (rank_signs differs beyond seed noise)") and "ID ECE +0.020 vs sd 0.010" in verdict
    assert study.noise_path(FAKE + signs[:1]) == "default noise path: not decided: fewer than 2 seeds of blob_rank_signs"


def test_each_eval_set_gets_its_own_table_with_every_metric_the_runs_hold():
    sections = study.per_dataset_markdown(FAKE).split("\n\n")
    assert sections[0] == "**colors** (in-distribution)" and sections[2] == "**near** (shift)" and sections[4] == "**far** (shift)"
    header, _, lora, *_ = sections[5].splitlines()
    assert header == "| arm | acc | ECE | NLL | Brier | confidence | AUROC(max prob) | AUROC(MI) |"
    sd = statistics.stdev([0.50, 0.52, 0.54])  # far: acc − 0.2, ECE 0.3 + 0.05, NLL 1.6 + 0.1; no Brier in the fakes
    assert lora == f"| `lora` | 0.320 ± {sd:.3f} | 0.350 ± 0.000 | 1.700 ± 0.000 | — | — | — | 0.500 ± 0.000 |"


def test_render_writes_the_tables_the_goals_the_figures_and_the_readme_block(tmp_path):
    curve = {"training": "lora", "train_loss_curve": [[10, 1.2], [20, 0.4]]}
    rows = [{**row, **curve} if row["arm"] in ("lora", "tfb_reference") else row for row in FAKE]
    results = write_jsonl(tmp_path / "study.jsonl", rows)
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{study.README_START}\nold table\n{study.README_END}\nafter\n")
    study.render(results, "blob_reference", readme)
    text = results.with_suffix(".md").read_text()
    assert text.startswith(study.markdown(rows)) and study.goals(rows, "blob_reference")[-1] in text
    assert text.rstrip().endswith(study.per_dataset_markdown(rows))
    assert results.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "study_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert readme.read_text() == f"intro\n{study.README_START}\n{study.markdown(rows)}\n{study.README_END}\nafter\n"
    readme.write_text("no block\n")
    with pytest.raises(SystemExit, match="no <!-- paper-protocol-table:start -->"):
        study.render(results, "blob_reference", readme)


def test_a_results_file_holds_one_protocol(tmp_path):
    p = study.Protocol(steps=25, task="colors", results=tmp_path / "r.jsonl")
    study.check_results_file(FAKE, p)
    with pytest.raises(SystemExit, match=r"\('colors', 'cloze', 25\)\]?, this study is \('colors', 'cloze', 30\)"):
        study.check_results_file(FAKE, study.Protocol(steps=30, task="colors", results=tmp_path / "r.jsonl"))


@pytest.mark.slow
def test_a_smoke_study_runs_every_kind_of_arm_once_and_resumes(assets, tiny_model_dir, tmp_path):
    arms = ["lora", "lora_temperature", "lora_ensemble", "tfb_reference", "blob_reference_temperature"]
    argv = ["study", "--smoke", "--task", "colors", "--shift", "far", "--assets", str(assets), "--base-model",
            str(tiny_model_dir), "--work", str(tmp_path / "work"), "--arms", *arms]  # fmt: skip
    study.main(argv)
    p = tmp_path / "work"
    runs = p / "colors-cloze-4steps"
    rows = study.read_results(p / "study.jsonl")
    assert [row["arm"] for row in rows] == arms and {row["seed"] for row in rows} == {1}
    assert sorted(d.name for d in runs.iterdir() if (d / "trained.json").is_file()) == ["blob-seed1", "lora-seed1", "lora-seed2"]
    for row in rows:
        assert row["datasets"]["colors"]["shift"] is False and row["datasets"]["colors"]["n"] == 8  # 8 of the 30
        assert not any(k.startswith("ood_auroc") for k in row["datasets"]["colors"])
        assert row["datasets"]["far"]["shift"] is True and 0 <= row["datasets"]["far"]["ood_auroc_by_mutual_info"] <= 1
    by_arm = {row["arm"]: row for row in rows}
    assert by_arm["lora_temperature"]["temperature"] > 0 and by_arm["blob_reference_temperature"]["temperature"] > 0
    assert not list(runs.glob("*/out/temperature.json"))  # a fitted T never reaches the arms that share the training
    assert [step for step, _ in by_arm["lora"]["train_loss_curve"]] == [1, 2, 3, 4]
    assert by_arm["lora_ensemble"]["members"] == [1, 2] and by_arm["lora_ensemble"]["datasets"]["far"]["n_samples"] == 2
    held_out = runs.parent / "splits" / "colors" / "held_out.jsonl"
    tfb_config = yaml.safe_load((runs / "lora-seed1" / "tfb-config.yml").read_text())
    assert tfb_config["datasets"][0]["path"] == str(held_out)  # TFB's anchors: the held-out slice, all 10
    assert json.loads((runs / "lora-seed1" / "tfb" / "tfb.json").read_text())["anchors"] == 10
    assert json.loads((runs / "lora-seed1" / "tfb" / "blob_config.json").read_text())["noise"] == "flipout"  # as the rows ran
    # predict + the ensemble's metrics on one member reproduce `evaluate` of that adapter
    smoke = study.Protocol(steps=4, task="colors", shifts=("far",), eval_size=8, assets=assets, work=p)
    questions = [Path(s["path"]) for s in study.eval_sets(smoke)]  # 8 of each set
    sizes = [study.count_lines(q) for q in questions]
    member = dict(zip(("colors", "far"), study.member_probabilities(runs / "lora-seed1" / "predictions.jsonl", sizes)))
    labels = {name: torch.tensor([json.loads(line)["answer"] for line in q.read_text().splitlines()]) for name, q in zip(("colors", "far"), questions)}
    alone = study.ensemble_metrics([member], labels, {"far"})
    for name in ("colors", "far"):
        for metric in ("acc", "ece", "nll", "brier", "confidence"):
            assert alone[name][metric] == pytest.approx(by_arm["lora"]["datasets"][name][metric], abs=1e-5), (name, metric)
    assert alone["far"]["ood_auroc_by_confidence"] == pytest.approx(by_arm["lora"]["datasets"]["far"]["ood_auroc_by_confidence"])

    marker = (runs / "lora-seed1" / "trained.json").stat().st_mtime_ns
    study.main(argv)  # everything done: nothing trains or evaluates again
    assert study.read_results(p / "study.jsonl") == rows and (runs / "lora-seed1" / "trained.json").stat().st_mtime_ns == marker
