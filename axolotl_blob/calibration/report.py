"""What an evaluation leaves behind: a JSON report, a reliability diagram, and a printed table."""

from __future__ import annotations

from pathlib import Path

from axolotl_blob.calibration.metrics import CalibrationState
from axolotl_blob.io import non_finite_as_null, replaced_whole, write_json as write_strict_json

TABLE_METRICS = ("acc", "ece", "mce", "nll", "brier", "confidence", "entropy", "mutual_info")
CONFIDENCE_DEFINITION = "top-label probability max_k p_k of the posterior-averaged predictive distribution"


def dataset_report(state: CalibrationState, n_samples: int) -> dict:
    """Metrics, per-bin statistics and N, the number of posterior samples actually averaged (0: one pass at the
    posterior mean or a point estimate)."""
    return {**state.compute(), "n_samples": n_samples, "bins": state.bins()}


def write_json(path: Path, step: int, n_bins: int, mode: str, reports: dict[str, dict]) -> None:
    payload = {
        "step": step,
        "mode": mode,
        "n_samples": next(iter(reports.values()))["n_samples"],
        "n_bins": n_bins,
        "confidence": CONFIDENCE_DEFINITION,
        "datasets": reports,
    }
    write_strict_json(path, non_finite_as_null(payload))  # statistics of empty bins are null


def reliability_diagram(report: dict, title: str, path: Path) -> None:
    """Per-bin accuracy against mean confidence, bars on the diagonal, with the bin counts written on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bins = report["bins"]
    width = bins[0]["upper"] - bins[0]["lower"]
    centres = [b["lower"] + width / 2 for b in bins]
    accuracy = [b["accuracy"] if b["count"] else 0.0 for b in bins]  # an empty bin's NaN (null in the JSON)
    figure, axis = plt.subplots(figsize=(4.8, 4.8))
    axis.bar(centres, accuracy, width=width * 0.95, color="#4477aa", edgecolor="black", label="accuracy")
    gaps = [(c, b["confidence"]) for c, b in zip(centres, bins) if b["count"]]
    axis.scatter([c for c, _ in gaps], [conf for _, conf in gaps], color="#cc3311", zorder=3, s=14, label="mean confidence")
    axis.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    for centre, b, acc in zip(centres, bins, accuracy):
        if b["count"]:
            axis.text(centre, min(acc, 0.93) + 0.02, str(b["count"]), ha="center", fontsize=7)
    axis.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy")
    axis.set_title(f"{title}\nacc {report['acc']:.3f}  ECE {report['ece']:.3f}  NLL {report['nll']:.3f}", fontsize=9)
    axis.legend(loc="upper left", fontsize=7)
    figure.tight_layout()
    with replaced_whole(path) as temporary:
        figure.savefig(temporary, dpi=120)
    plt.close(figure)


def format_table(reports: dict[str, dict]) -> str:
    header = ["dataset", "n", *TABLE_METRICS]
    rows = [[name, str(r["n"]), *(f"{r[m]:.4f}" for m in TABLE_METRICS)] for name, r in reports.items()]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [f"calibration (posterior samples N = {next(iter(reports.values()))['n_samples']})"]
    for row in [header, *rows]:
        lines.append("  ".join(cell.rjust(width) for cell, width in zip(row, widths)))
    return "\n".join(lines)
