"""Tables and plots of certification results (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from .certify import CertificationReport


def certified_table(report: CertificationReport, title: str = "") -> str:
    """A plain-text table: clean accuracy, certified accuracy per radius, median radius."""
    lines = [f"certification{f' of {title}' if title else ''}: {report.n} points"]
    lines.append(f"  Lipschitz bound (whole logit map) {report.lipschitz:.6g}")
    lines.append(f"  {'radius':>10s}  {'certified accuracy':>18s}")
    lines.append(f"  {'0 (clean)':>10s}  {report.clean_accuracy:18.4f}")
    for eps, acc in report.certified_accuracy.items():
        lines.append(f"  {eps:10.4g}  {acc:18.4f}")
    lines.append(f"  median certified radius (zeros counted) {report.median_radius:.4f}")
    return "\n".join(lines)


def plot_certified_curve(
    reports: Mapping[str, CertificationReport], path: str | Path, max_radius: float | None = None
) -> Path:
    """Certified accuracy against radius, one line per report, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = max_radius or max(float(r.radii.max()) for r in reports.values()) * 1.05 or 1.0
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, rep in reports.items():
        xs, ys = zip(*rep.curve(points=300, max_radius=top), strict=True)
        ax.plot(xs, ys, label=f"{label} (median r {rep.median_radius:.3f})")
    ax.set_xlabel("L2 radius")
    ax.set_ylabel("certified accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
