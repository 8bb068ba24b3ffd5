"""The GPU check (bench/gpu_check.py) runs its every code path on a tiny model on the CPU, so it cannot rot between
the rare sessions that have a GPU; its time guard and error capture keep partial results."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import gpu_check  # noqa: E402

ARMS = {"lora", "blob_flipout", "blob_rank_signs"}


# Not on the GPU machine's image (Python 3.12, torch, transformers, peft, accelerate): the check must not need them.
ABSENT_THERE = ("axolotl", "pydantic", "datasets", "deepspeed", "bitsandbytes", "torchao", "kernels", "flash_attn", "ivon")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[dict, str]:
    """`PYTHONPATH=. python bench/gpu_check.py --device cpu --tiny --out DIR` from the checkout, as documented, in a
    Python where the packages the GPU image lacks cannot be imported (a `sitecustomize` marks them absent)."""
    out, site = tmp_path_factory.mktemp("gpu_check"), tmp_path_factory.mktemp("absent")
    (site / "sitecustomize.py").write_text(f"import sys\n\nfor name in {ABSENT_THERE!r}:\n    sys.modules[name] = None\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}
    command = [sys.executable, "bench/gpu_check.py", "--device", "cpu", "--tiny", "--out", str(out)]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads((out / "gpu_check.json").read_text()), (out / "gpu_check.md").read_text()


@pytest.mark.slow
def test_the_dry_run_measures_every_section_and_its_checks_pass(dry_run):
    payload, summary = dry_run
    sections = payload["sections"]
    assert list(sections) == ["correctness", "blob_vs_lora", "ivon_vs_adamw", "bma"]
    assert all(section["status"] == "done" for section in sections.values())

    checks = sections["correctness"]["pieces"]
    assert payload["checks_passed"] is True and all(checks[name]["passed"] for name in checks)
    for path in ("flipout", "rank_signs", "whole_weights"):
        assert checks["layer_moments"][path]["max_variance_error_over_allowance"] <= 1
    kernels = checks["attention_kernels"]
    assert set(kernels["relative_difference_to_sdpa"]) == {"eager", "sdpa_math", "sdpa_flash"}  # flash_attn needs CUDA
    for kernel in kernels["relative_difference_to_sdpa"].values():
        assert kernel["sampled"] <= kernel["allowance"] and 10 * kernel["sampled"] < kernels["relative_difference_of_another_draw"]
    for noise in ("flipout", "rank_signs"):
        run = checks["training_loss_falls"][noise]
        assert len(run["losses"]) == 30 and run["last_5_mean"] < run["first"]

    timing = sections["blob_vs_lora"]["pieces"]
    assert timing["flash_attention_2"]["status"] == "unavailable: flash_attention_2 needs a CUDA device"
    for key in ("sdpa 4x64", "sdpa 1x256"):
        assert timing[key]["status"] == "done" and timing[key]["rounds"] == 2
        assert set(timing[key]["ratio_to_lora"]) == ARMS and timing[key]["ratio_to_lora"]["lora"] == 1.0
        assert "peak_memory_gib" not in timing[key]  # CUDA memory only
    ivon = sections["ivon_vs_adamw"]["pieces"]
    assert set(ivon["optimizer_step"]["ratio_to_adamw"]) == {"adamw", "ivon", "ivon_per_tensor"}  # no reference ivon-opt
    assert set(ivon["training_step"]["ratio_to_adamw"]) == {"adamw", "ivon"}
    scoring = sections["bma"]["pieces"]["choices_scoring"]
    assert scoring["bma_10_over_10_mean_passes"] > 0 and scoring["max_probability_change"] > 0  # the draws move answers

    goals = {row["goal"]: row for row in payload["goals"]}
    assert goals["BMA N = 10 ≤ 10× one mean pass"]["value"] == scoring["bma_10_over_10_mean_passes"]
    assert sum("BLoB rank_signs step" in goal for goal in goals) == 2
    assert "**CPU dry run**" in summary and "| correctness | attention_kernels | done |" in summary


def test_a_section_without_time_left_is_skipped_and_still_reported(tmp_path):
    payload = gpu_check.run(gpu_check.setup_for("cpu", tiny=True), ["bma", "correctness"], 0.0, tmp_path, [])
    written = json.loads((tmp_path / "gpu_check.json").read_text())
    assert written["sections"] == payload["sections"] == {
        "bma": {"status": "skipped: time", "pieces": {}},
        "correctness": {"status": "skipped: time", "pieces": {}},
    }
    assert written["checks_passed"] is None and written["goals"] == []


def test_a_piece_past_its_deadline_or_failing_is_recorded_and_the_rest_go_on():
    saves = []
    record: dict = {}
    late = gpu_check.Guard(deadline=0.0, save=lambda: saves.append(1))
    late.piece(record, "late", lambda: pytest.fail("a piece past the deadline must not run"))
    guard = gpu_check.Guard(deadline=float("inf"), save=lambda: saves.append(1))
    guard.piece(record, "broken", lambda: 1 / 0)
    guard.piece(record, "fine", lambda: {"value": 2})
    assert record["late"] == {"status": "skipped: time"}
    assert record["broken"]["status"] == "error: ZeroDivisionError: division by zero" and "1 / 0" in record["broken"]["traceback"]
    assert record["fine"]["status"] == "done" and record["fine"]["value"] == 2
    assert len(saves) == 3
