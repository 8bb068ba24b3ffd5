"""The study harness's bookkeeping: overrides, search points, the results table (mean ± sd over seeds)."""

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import calibration_study as study  # noqa: E402
import pytest  # noqa: E402


def rows(arm: str, values: list[float]) -> list[dict]:
    return [
        {"arm": arm, "label": study.ARMS[arm].label, "seed": seed,
         "metrics": {"sarcasm": {"acc": v, "ece": v / 10, "nll": v / 2}, "aba": {"acc": 0.0, "ood_auroc_by_mutual_info": 1 - v}}}
        for seed, v in enumerate(values, start=1)
    ]  # fmt: skip


def test_table_is_mean_and_sd_over_seeds_of_the_in_distribution_dataset():
    text = study.markdown(rows("lora", [0.7, 0.8, 0.75]) + rows("blob_reference", [0.6]))
    header, _, lora, blob = text.splitlines()
    assert header == "| arm | seeds | acc | ece | nll | ood_auroc_by_mutual_info (aba) |"
    sd = statistics.stdev([0.7, 0.8, 0.75])
    assert lora == f"| LoRA (MLE) | 3 | 0.750 ± {sd:.3f} | 0.075 ± {sd / 10:.3f} | 0.375 ± {sd / 2:.3f} | 0.250 ± {sd:.3f} |"
    assert blob.startswith("| BLoB, reference σ update, N = 10 | 1 | 0.600 | 0.060 |")


def test_overrides_merge_deeply_and_search_varies_one_knob_at_a_time():
    assert study.deep_merge({"blob": {"kl_lr": 1, "prior_std": 2}, "seed": 1}, {"blob": {"kl_lr": 3}}) == {
        "blob": {"kl_lr": 3, "prior_std": 2}, "seed": 1,
    }  # fmt: skip
    assert study.set_path({}, "blob.kl_lr", 0.5) == {"blob": {"kl_lr": 0.5}}
    points = study.search_points([])
    assert points[0] == {} and {"blob.kl_cycle_steps": "rescaled"} in points and all(len(p) <= 1 for p in points)
    grid = study.search_points(["kl_lr=0.002,0.01", "likelihood=choices"])
    assert grid == [
        {"blob.kl_lr": 0.002, "multiple_choice.likelihood": "choices"},
        {"blob.kl_lr": 0.01, "multiple_choice.likelihood": "choices"},
    ]


@pytest.mark.skipif(not (study.ROOT / "assets" / "sarcasm_train.jsonl").is_file(), reason="needs the demo assets (python -m axolotl_blob.assets --out assets)")
def test_search_never_scores_the_validation_file(tmp_path, monkeypatch):
    monkeypatch.setattr(study, "WORK", tmp_path)
    setting = study.Setting(results=tmp_path / "r.jsonl", work=tmp_path / "search", search=True)
    config = study.training_config("x", study.TRAININGS["blob_reference"], 1, setting)
    assert [d["path"] for d in config["calibration"]["datasets"]] == [str(tmp_path / "splits" / "held_out.jsonl")]
    assert config["datasets"][0]["path"] == str(tmp_path / "splits" / "train_split.jsonl")
    train = (tmp_path / "splits" / "train_split.jsonl").read_text().splitlines()
    held_out = (tmp_path / "splits" / "held_out.jsonl").read_text().splitlines()
    validation = set((study.ROOT / "assets" / "sarcasm_val.jsonl").read_text().splitlines())
    assert len(held_out) == round(0.2 * (len(train) + len(held_out))) and not set(held_out) & set(train)
    assert not set(held_out) & validation


def test_a_knob_of_the_evaluation_alone_rescores_the_shared_training(tmp_path, monkeypatch):
    trainings, evaluations = [], []

    def train(name, training, seed, setting, knobs=None):
        trainings.append((name, knobs))
        return tmp_path / name, {"train_seconds": 1.0}

    def evaluate(arm_name, arm, directory, setting, extra_flags=()):
        evaluations.append((arm_name, directory.name, extra_flags))
        return {"held_out": {"nll": 0.5}}, 2.0

    monkeypatch.setattr(study, "train", train)
    monkeypatch.setattr(study, "evaluate", evaluate)
    setting = study.Setting(results=tmp_path / "r.jsonl", work=tmp_path, search=True)
    study.run_search(["eval_draws=per_token,whole_weights"], [1], setting)
    assert trainings == [("search-example", {}), ("search-example", {})]  # train() reuses a finished training
    assert evaluations == [
        ("held_out-eval_draws=per_token", "search-example", ("--draws", "per_token")),
        ("held_out-eval_draws=whole_weights", "search-example", ("--draws", "whole_weights")),
    ]
    assert [row["knobs"] for row in study.read_results(setting.results)] == [
        {"blob.eval_draws": "per_token"}, {"blob.eval_draws": "whole_weights"},
    ]  # fmt: skip
