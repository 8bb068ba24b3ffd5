"""bench/ece_floor.py: the ECE a perfectly calibrated model would score, against the binomial closed form."""

import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import ece_floor  # noqa: E402


def write_predictions(path: Path, groups: dict[str, tuple[int, list[float], float]]) -> None:
    """groups: {eval set: (questions, probabilities of every question, fraction answered right)}."""
    lines = []
    for name, (n, probabilities, right) in groups.items():
        for i in range(n):
            lines.append(json.dumps({"id": f"{name}-q{i}", "probabilities": probabilities, "correct": i < round(right * n)}))
    path.write_text("\n".join(lines) + "\n")


def expected_abs_gap(n: int, p: float) -> float:
    """E|k/n − p| for k ~ Binomial(n, p): the ECE of a calibrated model whose questions all fall in one bin."""
    return sum(math.comb(n, k) * p**k * (1 - p) ** (n - k) * abs(k / n - p) for k in range(n + 1))


def test_a_calibrated_models_ece_matches_the_binomial_closed_form_and_a_real_gap_stands_out(tmp_path):
    path = tmp_path / "predictions.jsonl"
    # "calibrated": confidence 0.7 and 70 % right; "overconfident": confidence 0.9 and 50 % right; one bin each
    write_predictions(path, {"calibrated": (300, [0.7, 0.2, 0.1], 0.7), "overconfident": (200, [0.9, 0.1], 0.5)})
    result = ece_floor.floor(path, n_draws=1000, n_bins=15, seed=0)

    calibrated = result["calibrated"]
    assert calibrated["n"] == 300 and abs(calibrated["acc"] - 0.7) < 1e-12 and abs(calibrated["confidence"] - 0.7) < 1e-12
    assert calibrated["ece"] < 1e-12  # the real answers match the confidence exactly
    closed_form = expected_abs_gap(300, 0.7)  # 0.0211: the floor is far above zero on 300 questions
    assert abs(calibrated["calibrated_ece_mean"] - closed_form) < 0.0015, (calibrated, closed_form)
    assert calibrated["calibrated_ece_p95"] > 1.5 * closed_form

    overconfident = result["overconfident"]
    assert abs(overconfident["ece"] - 0.4) < 1e-12
    assert abs(overconfident["calibrated_ece_mean"] - expected_abs_gap(200, 0.9)) < 0.0015
    assert overconfident["ece"] > 5 * overconfident["calibrated_ece_p95"]
