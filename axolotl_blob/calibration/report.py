"""What an evaluation leaves behind: a JSON report, a reliability diagram, a risk–coverage curve, printed tables."""

from __future__ import annotations

from pathlib import Path

from axolotl_blob.calibration.metrics import CalibrationState
from axolotl_blob.io import non_finite_as_null, replaced_whole, write_json as write_strict_json

TABLE_METRICS = ("acc", "ece", "mce", "nll", "brier", "confidence", "entropy", "mutual_info")
SELECTIVE_COLUMNS = {  # printed header: report key
    "aurc(conf)": "aurc_by_confidence",
    "acc@80(conf)": "acc_cov80_by_confidence",
    "acc@90(conf)": "acc_cov90_by_confidence",
    "aurc(MI)": "aurc_by_mutual_info",
    "acc@80(MI)": "acc_cov80_by_mutual_info",
    "acc@90(MI)": "acc_cov90_by_mutual_info",
}
OOD_COLUMNS = {"auroc(conf)": "ood_auroc_by_confidence", "auroc(entropy)": "ood_auroc_by_entropy",
               "auroc(MI)": "ood_auroc_by_mutual_info"}  # fmt: skip
CONFIDENCE_DEFINITION = "top-label probability max_k p_k of the posterior-averaged predictive distribution"


def dataset_report(state: CalibrationState, n_samples: int) -> dict:
    """Metrics, per-bin statistics and N, the number of posterior samples actually averaged (0: one pass at the
    posterior mean or a point estimate)."""
    return {**state.compute(), "n_samples": n_samples, "bins": state.bins(), "risk_coverage": state.risk_coverage()}


def scalar_metrics(report: dict) -> dict[str, float]:
    """The report's numbers (metrics, n, n_samples), without the per-bin rows, curves and flags."""
    return {k: v for k, v in report.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


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


def risk_coverage_plot(report: dict, title: str, path: Path) -> None:
    """Selective risk against coverage, examples ranked by max probability and by mutual information."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = report["risk_coverage"]
    figure, axis = plt.subplots(figsize=(4.8, 4.8))
    rankings = (("confidence", "max probability", "#4477aa"), ("mutual_info", "mutual information", "#cc3311"))
    for name, label, colour in rankings:
        aurc = report[f"aurc_by_{name}"]
        axis.plot(curves["coverage"], curves[f"risk_by_{name}"], color=colour, label=f"by {label} (AURC {aurc:.3f})")
    axis.axhline(1 - report["acc"], linestyle="--", color="gray", label="answering everything")
    axis.set(xlim=(0, 1), ylim=(0, max(0.05, *curves["risk_by_confidence"], *curves["risk_by_mutual_info"]) * 1.1),
             xlabel="coverage (fraction answered)", ylabel="selective risk (error rate among answered)")  # fmt: skip
    at80, at90 = report["acc_cov80_by_confidence"], report["acc_cov90_by_confidence"]
    axis.set_title(f"{title}\nby max probability: acc@80 % {at80:.3f}  acc@90 % {at90:.3f}", fontsize=9)
    axis.legend(loc="best", fontsize=7)
    figure.tight_layout()
    with replaced_whole(path) as temporary:
        figure.savefig(temporary, dpi=120)
    plt.close(figure)


def _aligned(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return ["  ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in [header, *rows]]


def format_table(reports: dict[str, dict]) -> str:
    """The calibration metrics per dataset, then selective prediction, then OOD detection (if any dataset is OOD)."""
    rows = [[name, str(r["n"]), *(f"{r[m]:.4f}" for m in TABLE_METRICS)] for name, r in reports.items()]
    first = next(iter(reports.values()))
    lines = [f"calibration (posterior samples N = {first['n_samples']})"]
    if "temperature" in first:
        lines[0] += f", each draw's choice logits / T, T = {first['temperature']:.4f}"
    lines += _aligned(["dataset", "n", *TABLE_METRICS], rows)
    lines.append("selective prediction (ranked by max probability / by mutual information)")
    rows = [[name, *(f"{r[key]:.4f}" for key in SELECTIVE_COLUMNS.values())] for name, r in reports.items()]
    lines += _aligned(["dataset", *SELECTIVE_COLUMNS], rows)
    ood = {name: r for name, r in reports.items() if r.get("ood")}
    if ood:
        lines.append("out-of-distribution detection (AUROC against the in-distribution datasets)")
        rows = [[name, *(f"{r[key]:.4f}" for key in OOD_COLUMNS.values())] for name, r in ood.items()]
        lines += _aligned(["dataset", *OOD_COLUMNS], rows)
    return "\n".join(lines)
