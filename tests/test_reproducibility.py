"""Faults and reproducibility: the same config and seed give bit-identical runs for every feature, another seed
another initialisation; a run killed with SIGKILL right after a checkpoint resumes to the uninterrupted result;
truncated, mismatched or incomplete files fail with errors naming the file and the fix; every JSON is strict."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import assert_identical_tensors, base_config, run_axolotl, run_module, subprocess_env

STEPS, SAVE = 20, 10
PROBE = ["axolotl_blob.BlobPlugin", "probe.ProbePlugin"]
LORA_ON_CPU = {"lora_mlp_kernel": False, "lora_qkv_kernel": False, "lora_o_kernel": False}


def reject_constant(name: str):
    raise ValueError(f"not JSON: {name}")


def strict_json(path: Path):
    """json.loads as a strict parser (jq, JavaScript) reads: NaN / Infinity are errors."""
    return json.loads(path.read_text(), parse_constant=reject_constant)


def blob_config(model_dir, data, out: Path, **overrides) -> dict:
    config = base_config(
        model_dir, data, out, max_steps=STEPS, save_steps=SAVE, eval_steps=SAVE, plugins=PROBE,
        calibration={"mode": "tokens", "plots": True},
    )  # fmt: skip
    config["blob"] = {"eval_samples": 2, "kl_lr": 0.01, "kl_cycle_steps": 5}
    config.update(overrides)
    return config


def adalora_ivon_config(model_dir, data, out: Path) -> dict:
    config = base_config(
        model_dir, data, out, adapter="adalora", max_steps=12, save_steps=6, eval_steps=6, plugins=PROBE,
        optimizer="ivon", learning_rate=0.05, bf16=False, fp16=False,
        ivon={"ess": 2000.0, "hess_init": 0.01, "clip_radius": 0.01},
        rank_scheduler={"importance": "snr", "target_r": 2, "t_init": 2, "t_final": 4, "delta_t": 2},
    )  # fmt: skip
    del config["blob"]
    return config


def ivon_lora_config(model_dir, data, out: Path) -> dict:
    config = base_config(
        model_dir, data, out, adapter="lora", **LORA_ON_CPU, optimizer="ivon", learning_rate=0.2,
        gradient_accumulation_steps=2, max_steps=6, eval_steps=3, save_steps=3, plugins=PROBE, bf16=True,
        ivon={"ess": 2000.0, "hess_init": 0.01, "clip_radius": 0.01, "eval_samples": 3},
        calibration={"mode": "tokens", "plots": False},
    )  # fmt: skip
    del config["blob"]
    return config


def train_twice(config_for, tmp_path_factory, name: str) -> tuple[Path, Path]:
    outs = []
    for run in ("first", "second"):
        workdir = tmp_path_factory.mktemp(f"{name}-{run}")
        run_axolotl(config_for(workdir / "out"), workdir)
        outs.append(workdir / "out")
    return outs[0], outs[1]


def assert_identical_state(actual, expected, where: str = "") -> None:
    """Nested optimizer / RNG states equal to the bit (tensors, generator states, numbers, strings)."""
    assert type(actual) is type(expected), where
    if isinstance(actual, dict):
        assert actual.keys() == expected.keys(), where
        for key in actual:
            assert_identical_state(actual[key], expected[key], f"{where}.{key}")
    elif isinstance(actual, (list, tuple)):
        assert len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_identical_state(a, e, f"{where}[{i}]")
    elif isinstance(actual, torch.Tensor):
        assert actual.dtype == expected.dtype and torch.equal(actual, expected), where
    elif hasattr(actual, "__array__"):  # numpy RNG state
        assert (actual == expected).all(), where
    else:
        assert actual == expected, where


def assert_identical_checkpoints(first: Path, second: Path, names: list[str]) -> None:
    """Every safetensors / optimizer / scheduler / RNG file and every plugin report of two runs, bit for bit."""
    compared = 0
    for directory in [Path("."), *sorted(p.relative_to(first) for p in first.glob("checkpoint-*"))]:
        for name in names:
            a, b = first / directory / name, second / directory / name
            if not a.exists():
                continue
            assert b.exists(), b
            if name.endswith(".safetensors"):
                assert_identical_tensors(load_file(a), load_file(b))
            elif name.endswith((".pt", ".pth")):
                assert_identical_state(torch.load(a, weights_only=False), torch.load(b, weights_only=False), str(a))
            else:
                assert a.read_bytes() == b.read_bytes(), a
            compared += 1
    assert compared >= len(names), f"only {compared} files compared"


def assert_identical_reports(first: Path, second: Path, pattern: str) -> None:
    reports = sorted(p.relative_to(first) for p in first.glob(pattern))
    assert reports
    for report in reports:
        assert (first / report).read_bytes() == (second / report).read_bytes(), report


def training_log(out: Path) -> list[dict]:
    """The logged numbers of every step and evaluation, without the wall-clock and memory ones."""
    checkpoint = max(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    history = json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
    measured = ("runtime", "per_sec", "memory/")
    return [{k: v for k, v in entry.items() if not any(m in k for m in measured)} for entry in history]


CHECKPOINT_FILES = ["adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth"]


@pytest.fixture(scope="module")
def blob_runs(tiny_model_dir, completion_data, tmp_path_factory) -> tuple[Path, Path]:
    return train_twice(lambda out: blob_config(tiny_model_dir, completion_data, out), tmp_path_factory, "blob")


@pytest.mark.slow
def test_blob_same_seed_gives_bit_identical_runs(blob_runs):
    first, second = blob_runs
    assert_identical_tensors(load_file(first / "rank0_initial_adapter.safetensors"), load_file(second / "rank0_initial_adapter.safetensors"))
    assert_identical_checkpoints(first, second, [*CHECKPOINT_FILES, "blob_posterior.safetensors", "blob_config.json"])
    assert_identical_reports(first, second, "calibration/*")  # JSON reports and reliability diagrams
    assert training_log(first) == training_log(second)


@pytest.mark.slow
def test_another_seed_gives_another_initialisation(blob_runs, tiny_model_dir, completion_data, tmp_path):
    out = tmp_path / "out"
    run_axolotl(blob_config(tiny_model_dir, completion_data, out, seed=43, max_steps=1, eval_steps=0, calibration=None), tmp_path)
    seed42 = load_file(blob_runs[0] / "rank0_initial_adapter.safetensors")
    seed43 = load_file(out / "rank0_initial_adapter.safetensors")
    assert seed42.keys() == seed43.keys()
    for key in seed42:
        if "lora_B" in key:  # B starts at zero whatever the seed
            assert not seed43[key].any()
        else:  # lora_A and BLoB's σ factor redrawn (drawn at the fp16 base's precision: a few entries coincide)
            assert (seed42[key] != seed43[key]).double().mean() > 0.95, key


@pytest.mark.slow
def test_calibration_observes_the_run_without_changing_it(blob_runs, tiny_model_dir, completion_data, tmp_path):
    """The calibration at step 10 draws BLoB samples from the Trainer's generators; the steps after it, the checkpoint
    at step 20 and its saved RNG state are those of a run without the calibration block."""
    out = tmp_path / "out"
    run_axolotl(blob_config(tiny_model_dir, completion_data, out, calibration=None), tmp_path)
    assert not (out / "calibration").exists()
    assert_identical_checkpoints(blob_runs[0], out, [*CHECKPOINT_FILES, "blob_posterior.safetensors"])


@pytest.mark.slow
def test_adalora_snr_with_ivon_same_seed_gives_bit_identical_runs(tiny_model_dir, completion_data, tmp_path_factory):
    first, second = train_twice(
        lambda out: adalora_ivon_config(tiny_model_dir, completion_data, out), tmp_path_factory, "adalora"
    )
    assert_identical_tensors(load_file(first / "rank0_initial_adapter.safetensors"), load_file(second / "rank0_initial_adapter.safetensors"))
    assert_identical_checkpoints(first, second, [*CHECKPOINT_FILES, "rank_scheduler.safetensors", "rank_pattern.json", "rank_pattern.png"])
    assert training_log(first) == training_log(second)
    assert strict_json(first / "rank_pattern.json")["total_rank"] == 8


@pytest.mark.slow
def test_ivon_on_lora_same_seed_gives_bit_identical_runs(tiny_model_dir, completion_data, tmp_path_factory):
    first, second = train_twice(lambda out: ivon_lora_config(tiny_model_dir, completion_data, out), tmp_path_factory, "ivon")
    assert_identical_tensors(load_file(first / "rank0_initial_adapter.safetensors"), load_file(second / "rank0_initial_adapter.safetensors"))
    assert_identical_checkpoints(first, second, [*CHECKPOINT_FILES, "rank0_ivon.safetensors"])
    assert_identical_reports(first, second, "calibration/*.json")  # BMA over IVON draws
    assert training_log(first) == training_log(second)


def complete(checkpoint: Path) -> bool:
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())  # the Trainer writes it last
        return True
    except (OSError, ValueError):
        return False


@pytest.mark.slow
def test_sigkill_after_a_checkpoint_then_auto_resume_matches_the_uninterrupted_run(
    blob_runs, tiny_model_dir, completion_data, tmp_path
):
    out = tmp_path / "out"
    config_path = tmp_path / "config.yml"
    config_path.write_text(yaml.safe_dump(blob_config(tiny_model_dir, completion_data, out, auto_resume_from_checkpoints=True)))
    env = subprocess_env()  # the caller's PYTHONPATH kept: the killed run and its resume import the same plugin
    with open(tmp_path / "killed.log", "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "axolotl.cli.train", str(config_path)], cwd=tmp_path, env=env, stdout=log, stderr=log
        )
        try:
            deadline = time.monotonic() + 600
            while not complete(out / f"checkpoint-{SAVE}"):
                assert process.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
                assert time.monotonic() < deadline
                time.sleep(0.01)
            os.kill(process.pid, signal.SIGKILL)
            assert process.wait(timeout=60) == -signal.SIGKILL  # it was still training when killed
        finally:
            if process.poll() is None:
                process.kill()
    assert not (out / f"checkpoint-{STEPS}").exists() and not (out / "adapter_model.safetensors").exists()

    run_axolotl(yaml.safe_load(config_path.read_text()), tmp_path)  # the same config: auto_resume_from_checkpoints
    assert f"resume from checkpoint at {out / f'checkpoint-{SAVE}'}" in (tmp_path / "axolotl.log").read_text()
    uninterrupted = blob_runs[0]
    for name in ("adapter_model.safetensors", "blob_posterior.safetensors"):
        assert_identical_tensors(load_file(out / name), load_file(uninterrupted / name))
    assert_identical_checkpoints(out / f"checkpoint-{STEPS}", uninterrupted / f"checkpoint-{STEPS}", CHECKPOINT_FILES)
    assert (out / "calibration" / f"step-{STEPS}.json").read_bytes() == (uninterrupted / "calibration" / f"step-{STEPS}.json").read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize(
    "damage, problem",
    [
        ("trainer_state.json", "trainer_state.json is missing"),
        ("blob_posterior.safetensors", "blob_posterior.safetensors does not read back (SafetensorError"),
    ],
)
def test_an_incomplete_newest_checkpoint_names_the_previous_complete_one(
    damage, problem, blob_runs, tiny_model_dir, completion_data, tmp_path
):
    """As the process left it when it died while saving checkpoint-20: trainer_state.json not yet written, or
    (without our whole-file writes) a posterior cut short."""
    out = tmp_path / "out"
    for name in (f"checkpoint-{SAVE}", f"checkpoint-{STEPS}", "prepared"):
        shutil.copytree(blob_runs[0] / name, out / name)
    damaged = out / f"checkpoint-{STEPS}" / damage
    if damage == "trainer_state.json":
        damaged.unlink()
    else:
        damaged.write_bytes(damaged.read_bytes()[:-7])
    config = blob_config(tiny_model_dir, completion_data, out, auto_resume_from_checkpoints=True)
    result = run_axolotl(config, tmp_path, expect_success=False)
    assert (
        f"cannot resume from {out / f'checkpoint-{STEPS}'}: the checkpoint is incomplete ({problem}"
    ) in result.stderr
    assert f"The previous complete checkpoint is {out / f'checkpoint-{SAVE}'}: delete {out / f'checkpoint-{STEPS}'}" in result.stderr
    assert not (out / "rank0_initial_adapter.safetensors").exists()  # refused before the model loaded


@pytest.mark.slow
def test_a_truncated_posterior_in_lora_model_dir_fails_before_weights_load(blob_runs, tiny_model_dir, completion_data, tmp_path):
    saved = tmp_path / "saved"
    shutil.copytree(blob_runs[0], saved, ignore=shutil.ignore_patterns("checkpoint-*", "prepared", "calibration"))
    posterior = saved / "blob_posterior.safetensors"
    posterior.write_bytes(posterior.read_bytes()[:-7])  # as a copy or a write cut short leaves it
    config = blob_config(tiny_model_dir, completion_data, tmp_path / "out", lora_model_dir=str(saved), calibration=None)
    result = run_axolotl(config, tmp_path, expect_success=False)
    assert f"{posterior} is truncated or corrupt (Error while deserializing header" in result.stderr
    assert "Resume from an earlier checkpoint, or point lora_model_dir at an intact output" in result.stderr
    assert not (tmp_path / "out" / "rank0_initial_adapter.safetensors").exists()  # before the model loaded


@pytest.mark.slow
def test_every_json_the_plugin_writes_is_strict(blob_runs, tiny_model_dir, tmp_path):
    first = blob_runs[0]
    config = yaml.safe_load((first.parent / "config.yml").read_text())
    config["calibration"] = {"datasets": [{"path": str(write_color_questions(tmp_path))}], "plots": False}
    (tmp_path / "config.yml").write_text(yaml.safe_dump(config))
    run_module("axolotl_blob.evaluate", [str(tmp_path / "config.yml"), "--adapter", str(first), "--json", "eval.json"], tmp_path)
    written = [tmp_path / "eval.json", *first.glob("calibration/*.json"), *first.glob("**/blob_config.json")]
    reports = [strict_json(path) for path in written]
    assert len(written) >= 2 + 3 and reports[0]["val"]["n"] == 12
    bins = [b for report in reports[1:] if "datasets" in report for d in report["datasets"].values() for b in d["bins"]]
    assert any(b["count"] == 0 and b["accuracy"] is None and b["confidence"] is None for b in bins)  # empty: null


def write_color_questions(directory: Path) -> Path:
    from conftest import color_questions, write_jsonl

    return write_jsonl(directory / "val.jsonl", color_questions(12, seed=5))


# ---- unit tests: no training run ------------------------------------------------------------------------------


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path):
    from axolotl_blob.io import replaced_whole, write_text

    target = tmp_path / "report.json"
    write_text(target, "old")
    with pytest.raises(RuntimeError):
        with replaced_whole(target) as temporary:
            temporary.write_text("half")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_the_json_writer_refuses_non_finite_numbers(tmp_path):
    from axolotl_blob.io import non_finite_as_null, write_json

    with pytest.raises(ValueError, match=f"{tmp_path / 'x.json'}: refusing to write a non-finite number"):
        write_json(tmp_path / "x.json", {"ece": float("nan")})
    assert not (tmp_path / "x.json").exists()
    write_json(tmp_path / "x.json", non_finite_as_null({"bins": [{"accuracy": float("nan")}, {"x": float("-inf")}], "n": 3}))
    assert strict_json(tmp_path / "x.json") == {"bins": [{"accuracy": None}, {"x": None}], "n": 3}


def test_the_reliability_diagram_draws_a_report_read_back_from_json(tmp_path):
    from axolotl_blob.calibration.metrics import CalibrationState
    from axolotl_blob.calibration.report import dataset_report, reliability_diagram, write_json

    state = CalibrationState(n_bins=10)
    state.update(torch.tensor([[0.95, 0.05], [0.58, 0.42], [0.45, 0.55]]), torch.tensor([0, 1, 1]))
    write_json(tmp_path / "step-1.json", 1, 10, "choices", {"val": dataset_report(state, 0)})
    report = strict_json(tmp_path / "step-1.json")["datasets"]["val"]
    assert [b["count"] for b in report["bins"]] == [0, 0, 0, 0, 0, 2, 0, 0, 0, 1]
    assert report["bins"][0]["accuracy"] is None and report["bins"][5]["accuracy"] == 0.5
    reliability_diagram(report, "read back", tmp_path / "diagram.png")
    assert (tmp_path / "diagram.png").stat().st_size > 5000


@pytest.fixture
def saved_posterior(tiny_model_dir, tmp_path) -> Path:
    from axolotl_blob.blob.model import PosteriorSpec, save_posterior

    save_posterior(tiny_blob_model_of(tiny_model_dir), tmp_path, PosteriorSpec(prior_std=0.2, init_std=0.5))
    return tmp_path


def tiny_blob_model_of(model_dir: Path, rank: int = 4):
    from conftest import tiny_blob_model

    if rank == 4:
        return tiny_blob_model(model_dir)
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from axolotl_blob.blob.model import bayesianize

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), LoraConfig(r=rank, target_modules=["q_proj", "v_proj"]))
    bayesianize(model, init_std=0.5)
    return model


def test_a_truncated_posterior_fails_naming_the_file_and_the_fix(saved_posterior, tiny_model_dir):
    from axolotl_blob.blob.model import PosteriorFileError, load_posterior

    path = saved_posterior / "blob_posterior.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(PosteriorFileError, match=rf"{path} is truncated or corrupt \(.*\): .* Resume from an earlier checkpoint"):
        load_posterior(tiny_blob_model_of(tiny_model_dir), saved_posterior)


def test_a_corrupt_posterior_config_fails_naming_the_file(saved_posterior, tiny_model_dir):
    from axolotl_blob.blob.model import PosteriorFileError, load_posterior

    path = saved_posterior / "blob_config.json"
    path.write_text('{"prior_std": 0.2, "init_')
    with pytest.raises(PosteriorFileError, match=rf"{path} is not a valid BLoB posterior config"):
        load_posterior(tiny_blob_model_of(tiny_model_dir), saved_posterior)


def test_a_posterior_of_another_shape_fails_before_copying_anything(saved_posterior, tiny_model_dir):
    from axolotl_blob.blob.model import PosteriorFileError, load_posterior, posterior_state_dict

    model = tiny_blob_model_of(tiny_model_dir, rank=2)
    before = posterior_state_dict(model)
    with pytest.raises(PosteriorFileError, match=r"blob_posterior.safetensors: .*blob_G has shape \(4, 64\), the model's is \(2, 64\): .*lora_r"):
        load_posterior(model, saved_posterior)
    assert_identical_tensors(posterior_state_dict(model), before)


def fake_checkpoint(output_dir: Path, step: int, state: str | None = "{}") -> Path:
    from safetensors.torch import save_file

    checkpoint = output_dir / f"checkpoint-{step}"
    checkpoint.mkdir(parents=True)
    save_file({"w": torch.zeros(2)}, checkpoint / "adapter_model.safetensors")
    if state is not None:
        (checkpoint / "trainer_state.json").write_text(state)
    return checkpoint


def test_the_previous_complete_checkpoint_skips_incomplete_ones(tmp_path):
    from axolotl_blob.checkpoints import check_resumable, resume_checkpoint

    complete_one = fake_checkpoint(tmp_path, 5)
    fake_checkpoint(tmp_path, 10, state='{"global_step": 1')  # cut short
    newest = fake_checkpoint(tmp_path, 15, state=None)
    assert resume_checkpoint(None, True, tmp_path) == newest and resume_checkpoint(None, False, tmp_path) is None
    with pytest.raises(ValueError, match=rf"incomplete \(trainer_state.json is missing\).*The previous complete checkpoint is {complete_one}:"):
        check_resumable(newest)
    with pytest.raises(ValueError, match=r"trainer_state.json does not read back \(JSONDecodeError"):
        check_resumable(tmp_path / "checkpoint-10")
    with pytest.raises(ValueError, match=rf"incomplete \(blob_posterior.safetensors is missing\).*No earlier complete checkpoint is in {tmp_path}"):
        check_resumable(complete_one, ["blob_posterior.safetensors"])
    check_resumable(complete_one)  # complete: no error
