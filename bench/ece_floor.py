"""How large an ECE is noise: the ECE a perfectly calibrated model with the same confidences would score.

On a few hundred questions the 15-bin ECE of even a perfectly calibrated model is well above zero, because each bin's
accuracy is a small sample. This draws every question's answer from the model's own predicted probabilities (so the
model is calibrated by construction), scores the draws with the package's `CalibrationState`, and reports the mean and
95th percentile of that ECE beside the ECE the real answers gave. An ECE inside the band is not evidence of
miscalibration.

    python bench/ece_floor.py outputs/paper_protocol/arc_easy-cloze-1000steps/lora-seed*/predictions.jsonl \
        --out bench/results/paper_protocol_ece_floor.json

Input: `python -m axolotl_blob.predict` output files (`probabilities`, `correct`, an `id` whose part before the last
"-" names the eval set); one result per file and eval set.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from axolotl_blob.calibration.metrics import CalibrationState


def read_sets(path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{eval set: ((n, K) probabilities, (n,) 1.0 where the prediction was right)} of one predictions file."""
    grouped: dict[str, list[dict]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            grouped.setdefault(row["id"].rsplit("-", 1)[0], []).append(row)
    out = {}
    for name, rows in grouped.items():
        k = max(len(row["probabilities"]) for row in rows)
        probs = torch.tensor([row["probabilities"] + [0.0] * (k - len(row["probabilities"])) for row in rows], dtype=torch.float64)
        out[name] = probs, torch.tensor([float(row["correct"]) for row in rows], dtype=torch.float64)
    return out


def ece_of(probs: torch.Tensor, labels: torch.Tensor, n_bins: int) -> float:
    state = CalibrationState(n_bins)
    state.update(probs, labels)
    return state.compute()["ece"]


def calibrated_eces(probs: torch.Tensor, n_draws: int, n_bins: int, generator: torch.Generator) -> torch.Tensor:
    """ECE of `n_draws` label sets, each question's label drawn from its own predicted distribution."""
    labels = torch.multinomial(probs, n_draws, replacement=True, generator=generator)  # (n, draws)
    return torch.tensor([ece_of(probs, labels[:, d], n_bins) for d in range(n_draws)], dtype=torch.float64)


def floor(path: Path, n_draws: int, n_bins: int, seed: int) -> dict[str, dict]:
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name, (probs, correct) in read_sets(path).items():
        predicted = probs.argmax(-1)
        # labels that reproduce the recorded correctness for the real ECE: the prediction where right, else another
        real_labels = torch.where(correct.bool(), predicted, (predicted + 1) % probs.shape[1])
        simulated = calibrated_eces(probs, n_draws, n_bins, generator)
        out[name] = {
            "n": len(probs),
            "acc": correct.mean().item(),
            "confidence": probs.max(-1).values.mean().item(),
            "ece": ece_of(probs, real_labels, n_bins),
            "calibrated_ece_mean": simulated.mean().item(),
            "calibrated_ece_p95": torch.quantile(simulated, 0.95).item(),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("predictions", nargs="+", type=Path, help="axolotl_blob.predict output files")
    parser.add_argument("--draws", type=int, default=2000, help="simulated label sets per file and eval set")
    parser.add_argument("--bins", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write {file: {eval set: figures}} here as JSON")
    args = parser.parse_args()
    results = {str(path): floor(path, args.draws, args.bins, args.seed) for path in args.predictions}
    for path, sets in results.items():
        for name, r in sets.items():
            print(f"{path} {name}: n {r['n']} acc {r['acc']:.3f} confidence {r['confidence']:.3f} ECE {r['ece']:.4f}; "
                  f"a calibrated model: {r['calibrated_ece_mean']:.4f} (95th percentile {r['calibrated_ece_p95']:.4f})")  # fmt: skip
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"command": "python " + " ".join(sys.argv),
                                        "draws": args.draws, "bins": args.bins, "seed": args.seed, "results": results}, indent=1) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
