"""Tables and plots of certification results (matplotlib, headless)."""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .certify import CertificationReport
from .errors import InputError
from .outputs import check_writable, write_text_atomic


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


# --------------------------------------------------------------------------------------------
# The Markdown report over one or more training runs
# --------------------------------------------------------------------------------------------

#: Class names shown in the certified-example figure (digits are their own names).
_CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "fashion-mnist": (
        "T-shirt", "trouser", "pullover", "dress", "coat",
        "sandal", "shirt", "sneaker", "bag", "boot",
    ),
    "cifar10": (
        "plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
    ),
}  # fmt: skip

#: PGD settings of the certified-example figure (per-example radius = certified radius).
EXAMPLE_PGD_STEPS = 100
EXAMPLE_PGD_RESTARTS = 3
EXAMPLE_COUNT = 8


@dataclass
class _Run:
    """Everything the report needs from one run folder."""

    label: str
    slug: str
    folder: Path
    model: Any
    bound: Any
    cfg: Any
    meta: dict[str, Any]
    log: list[dict[str, Any]]
    x: Any = None
    y: Any = None
    report: CertificationReport | None = None
    radii_eps: list[float] = field(default_factory=list)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    plt = _pyplot()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _slug(text: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")
    return s[:60] or "run"


def _md(text: object) -> str:
    """Text safe inside a Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    lines = ["| " + " | ".join(_md(h) for h in header) + " |"]
    lines.append("|" + "|".join("---" for _ in header) + "|")
    lines += ["| " + " | ".join(_md(c) for c in row) + " |" for row in rows]
    return lines


def _load_runs(
    runs: Sequence[str | Path], labels: Sequence[str] | None, device: Any = "auto"
) -> list[_Run]:
    from .runs import load_run, read_log

    if labels is not None and len(labels) != len(runs):
        raise InputError(f"{len(labels)} labels given for {len(runs)} runs")
    out: list[_Run] = []
    seen: set[str] = set()
    for i, path in enumerate(runs):
        path = Path(path)
        folder = path.parent if path.is_file() else path
        model, bound, cfg, _, meta = load_run(path, device=device)
        label = labels[i] if labels is not None else (cfg.name or folder.name)
        if labels is None and label in seen:  # two runs of one config: tell them apart
            label = f"{label} ({folder.name})"
        if label in seen:
            label = f"{label} #{i + 1}"
        seen.add(label)
        slug = f"{i + 1}-{_slug(label)}"
        out.append(_Run(label, slug, folder, model, bound, cfg, meta, read_log(folder)))
    return out


def _plot_training(runs: Sequence[_Run], path: Path) -> Path | None:
    logged = [r for r in runs if r.log]
    if not logged:
        return None
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    panels = [
        ("loss", "training loss", False),
        ("clean_accuracy", "clean accuracy (held-out points)", False),
        ("certified_accuracy", "certified accuracy at eval_eps", False),
        ("bound", "Lipschitz bound (whole logit map)", True),
    ]
    for ax, (key, title, log_scale) in zip(axes.flat, panels, strict=True):
        for run in logged:
            epochs = [rec["epoch"] for rec in run.log]
            values = [rec.get(key, float("nan")) for rec in run.log]
            label = run.label
            if key == "certified_accuracy":
                label = f"{run.label} (eps {run.log[-1].get('eval_eps', float('nan')):.4g})"
            ax.plot(epochs, values, "o-", markersize=3, label=label)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if log_scale:
            ax.set_yscale("log")
        elif key != "loss":
            ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def _plot_histograms(runs: Sequence[_Run], path: Path) -> Path:
    plt = _pyplot()
    fig, axes = plt.subplots(len(runs), 1, figsize=(7, 2.6 * len(runs)), squeeze=False)
    top = max(float(r.report.radii.max()) for r in runs if r.report is not None) or 1.0
    for ax, run in zip(axes[:, 0], runs, strict=True):
        rep = run.report
        assert rep is not None
        radii = rep.radii.double().numpy()
        ax.hist(radii, bins=40, range=(0.0, top), color="tab:blue", alpha=0.8)
        ax.axvline(rep.median_radius, color="tab:red", linestyle="--", linewidth=1.5)
        ax.text(
            rep.median_radius,
            0.95,
            f" median {rep.median_radius:.3f}",
            color="tab:red",
            transform=ax.get_xaxis_transform(),
            va="top",
            fontsize=8,
        )
        zero = float((rep.radii <= 0).double().mean())
        ax.set_title(f"{run.label}: {rep.n} points, radius 0 (wrong or uncertified) {zero:.1%}")
        ax.set_ylabel("points")
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("certified L2 radius")
    fig.tight_layout()
    return _save(fig, path)


#: Layer kinds whose guaranteed bound is the exact spectral norm (SVD in float64, inflated by a
#: relative 1e-9): nothing to estimate there.
EXACT_KINDS = ("linear",)


def layer_comparison(row: Any) -> tuple[float | None, str]:
    """The number shown beside a layer's guaranteed bound and what it is: the exact spectral
    norm where the bound is exact (dense layers; their power-iteration vector may never be
    updated, e.g. the last ``nn.Linear`` under the pairwise bound), else the power-iteration
    estimate (a lower estimate), else nothing."""
    if row.kind in EXACT_KINDS:
        return row.bound, "exact"
    if row.estimate is not None and row.estimate > 0:
        return row.estimate, "power-iteration estimate"
    return None, ""


def _plot_layers(run: _Run, path: Path) -> Path:
    import numpy as np

    plt = _pyplot()
    rows = run.bound.certified().layers
    fig, ax = plt.subplots(figsize=(max(5.0, 0.5 * len(rows) + 2), 4.2))
    pos = np.arange(len(rows))
    bounds = [r.bound if r.bound > 0 else np.nan for r in rows]
    shown = [layer_comparison(r)[0] for r in rows]
    est = [np.nan if v is None else v for v in shown]
    ax.bar(pos - 0.2, bounds, width=0.4, label="guaranteed upper bound", color="tab:blue")
    ax.bar(
        pos + 0.2,
        est,
        width=0.4,
        label="power-iteration estimate (exact for dense layers)",
        color="tab:orange",
    )
    ax.set_yscale("log")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xticks(pos)
    ax.set_xticklabels(
        [f"{r.name}\n{r.kind}" for r in rows], rotation=90 if len(rows) > 8 else 0, fontsize=7
    )
    ax.set_ylabel("Lipschitz constant (L2)")
    ax.set_title(f"{run.label}: per-layer bounds, whole network {run.report.lipschitz:.4g}")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7, loc="best", framealpha=0.8)
    fig.tight_layout()
    return _save(fig, path)


def _pick_examples(radii: Any, labels: Any, k: int) -> list[int]:
    """Up to k certified points: the largest radius of each class first, then the next largest."""
    order = [int(i) for i in radii.argsort(descending=True) if float(radii[int(i)]) > 0]
    picked: list[int] = []
    classes: set[int] = set()
    for i in order:
        if int(labels[i]) not in classes:
            picked.append(i)
            classes.add(int(labels[i]))
    picked = picked[:k]
    picked += [i for i in order if i not in picked][: k - len(picked)]
    return sorted(picked, key=lambda i: (int(labels[i]), -float(radii[i])))


def _plot_examples(run: _Run, path: Path) -> tuple[Path | None, str]:
    """The paper's Fig. 5: certified images and the strongest PGD perturbation within radius."""
    import torch

    from .attacks import pgd_l2

    rep = run.report
    assert rep is not None
    idx = _pick_examples(rep.radii, run.y, EXAMPLE_COUNT)
    if not idx:
        return None, f"{run.label}: no certified point among the {rep.n} evaluated, no figure."
    dev = next(iter(run.model.parameters())).device
    x, y = run.x[idx].to(dev), run.y[idx].to(dev)
    eps = rep.radii[idx].to(device=dev, dtype=x.dtype)
    gen = torch.Generator(device=dev).manual_seed(0)
    res = pgd_l2(
        run.model,
        x,
        y,
        eps,
        steps=EXAMPLE_PGD_STEPS,
        restarts=EXAMPLE_PGD_RESTARTS,
        generator=gen,
    )
    with torch.no_grad():
        pred = run.model(x).argmax(1)
        pred_adv = run.model(res.x_adv).argmax(1)
    changed = int((pred_adv != pred).sum())
    names = _CLASS_NAMES.get(run.cfg.dataset)

    def name(c: int) -> str:
        return names[c] if names is not None and c < len(names) else str(c)

    plt = _pyplot()
    k = len(idx)
    fig, axes = plt.subplots(
        3, k, figsize=(1.45 * k + 0.6, 6.0), squeeze=False, layout="constrained"
    )
    x, x_adv = x.cpu(), res.x_adv.detach().cpu()
    delta = x_adv - x
    for j in range(k):
        img = x[j].permute(1, 2, 0).clamp(0, 1).numpy()
        adv = x_adv[j].permute(1, 2, 0).clamp(0, 1).numpy()
        d = delta[j].permute(1, 2, 0).numpy()
        m = float(abs(d).max()) or 1.0
        if img.shape[2] == 1:
            axes[0, j].imshow(img[:, :, 0], cmap="gray", vmin=0, vmax=1)
            axes[1, j].imshow(adv[:, :, 0], cmap="gray", vmin=0, vmax=1)
            axes[2, j].imshow(d[:, :, 0], cmap="seismic", vmin=-m, vmax=m)
        else:
            axes[0, j].imshow(img)
            axes[1, j].imshow(adv)
            axes[2, j].imshow(d / (2 * m) + 0.5)
        ok = int(pred_adv[j]) == int(pred[j])
        axes[0, j].set_title(
            f"label {name(int(y[j]))}\npred {name(int(pred[j]))}\nr = {float(eps[j]):.3f}",
            fontsize=7,
        )
        axes[1, j].set_title(
            f"pred {name(int(pred_adv[j]))}\n|δ| = {float(res.norms[j]):.3f}"
            + ("" if ok else "\nCHANGED"),
            fontsize=7,
            color="black" if ok else "red",
        )
        axes[2, j].set_title(f"δ (±{m:.2f})", fontsize=7)
        for ax in axes[:, j]:
            ax.set_xticks([])
            ax.set_yticks([])
    for ax, text in zip(axes[:, 0], ("clean", "perturbed", "perturbation"), strict=True):
        ax.set_ylabel(text, fontsize=8)
    verdict = (
        f"prediction unchanged on all {k} images"
        if changed == 0
        else f"PREDICTION CHANGED on {changed} of {k} images: a broken certificate"
    )
    fig.suptitle(f"{run.label}: PGD inside the certified radius, {verdict}", fontsize=8)
    _save(fig, path)
    caption = (
        f"{run.label}: {k} certified test points (largest certified radius per class), "
        f"top row clean with label, prediction and certified radius r; middle row the same "
        f"image moved by the strongest perturbation L2 PGD found within the ball of radius r "
        f"({EXAMPLE_PGD_STEPS} steps, {EXAMPLE_PGD_RESTARTS} restarts, margin loss, pixels kept "
        f"in [0, 1]), with the prediction on it and the perturbation's norm; bottom row the "
        f"perturbation, its colour scale stretched to its own maximum. A sound certificate "
        f"means the prediction cannot change; here: {verdict}."
    )
    return path, caption


def _fmt(v: float | None, spec: str = ".4f") -> str:
    return "n/a" if v is None or v != v else format(v, spec)


def write_report(
    runs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    data_dir: str | Path | None = None,
    n: int = 1000,
    analyze_n: int = 200,
    labels: Sequence[str] | None = None,
    progress: bool = False,
    device: Any = "auto",
) -> Path:
    """Write ``out_dir/report.md`` and its PNG figures for one or more training runs.

    ``runs`` are run folders (or checkpoint files) written by ``lipmargin train``. Certification
    uses the first ``n`` test points of each run's dataset; the tightness analysis (paper
    Fig. 4, slow: C&W attacks) the first ``analyze_n`` (0 skips it). ``labels`` name the runs
    (default: the config's name). Models are certified on ``device`` (``"auto"``: cuda when
    available, else cpu). Returns the path of the Markdown file.
    """
    import torch

    from . import __version__
    from .audit import PAPER_RATIOS, tightness
    from .certify import batches, evaluate
    from .data import dataset_info, load_dataset

    if not runs:
        raise InputError("no run to report on")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InputError(f"n must be a positive integer, got {n!r}")
    if isinstance(analyze_n, bool) or not isinstance(analyze_n, int) or analyze_n < 0:
        raise InputError(f"analyze_n must be a non-negative integer, got {analyze_n!r}")
    out = Path(out_dir)
    check_writable(out / "report.md", what="report folder")
    t0 = time.perf_counter()

    def say(msg: str) -> None:
        if progress:
            print(f"[report {time.perf_counter() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

    from .runs import resolve_device

    device = resolve_device(device)
    # runs and data before the folder: a failure leaves nothing
    loaded = _load_runs(runs, labels, device)
    data: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for run in loaded:
        key = dataset_info(run.cfg.dataset)["name"]
        if key not in data:
            say(f"loading {key} test split")
            x, y = load_dataset(key, "test", data_dir)
            data[key] = (x[:n], y[:n])
        run.x, run.y = data[key]
        run.radii_eps = [float(r) for r in dataset_info(key)["radii"]]
        say(f"certifying {run.label} on {run.x.shape[0]} points")
        points = batches(run.x, run.y, 500, device)
        run.report = evaluate(run.model, run.bound, points, run.radii_eps)
    out.mkdir(parents=True, exist_ok=True)

    md: list[str] = [
        "# Certification report",
        "",
        f"lipmargin {__version__}, {len(loaded)} run(s). Certified figures on the first "
        f"{n} test points of each run's dataset; radii are L2 in the [0, 1] pixel scale, "
        "certified accuracy counts points that are correct and certified at that radius, the "
        "median radius counts wrong points as 0 (the paper's statistic).",
        "",
    ]

    # 7. summary table
    all_eps = sorted({e for run in loaded for e in run.radii_eps})
    header = ["run", "dataset", "method", "epochs", "points", "clean accuracy"]
    header += [f"certified @ {e:.4g}" for e in all_eps]
    header += ["median radius", "Lipschitz bound"]
    rows = []
    for run in loaded:
        rep = run.report
        assert rep is not None
        epochs = int(run.meta.get("epoch", len(run.log)))
        done = f"{epochs}" if epochs >= run.cfg.epochs else f"{epochs} of {run.cfg.epochs}"
        row: list[object] = [run.label, run.cfg.dataset, run.cfg.method, done, rep.n]
        row.append(_fmt(rep.clean_accuracy))
        row += [_fmt(rep.certified_accuracy.get(e)) for e in all_eps]
        row += [_fmt(rep.median_radius), _fmt(rep.lipschitz, ".5g")]
        rows.append(row)
    md += ["## Summary", "", *_table(header, rows), ""]
    md += [f"Run folders: {', '.join(f'`{r.folder}`' for r in loaded)}.", ""]

    # 1. training curves
    say("plotting")
    md += ["## Training curves", ""]
    fig_path = _plot_training(loaded, out / "training_curves.png")
    if fig_path is None:
        md += ["No run has a `log.jsonl`: no training curves.", ""]
    else:
        md += [
            f"![Training curves]({fig_path.name})",
            "",
            "Per epoch, from each run's `log.jsonl`: mean training loss, and clean accuracy, "
            "certified accuracy at the run's `eval_eps` and the guaranteed Lipschitz bound "
            "measured on the held-out points after the epoch.",
            "",
        ]
        missing = [r.label for r in loaded if not r.log]
        if missing:
            md += [f"No `log.jsonl` for: {', '.join(missing)}.", ""]

    # 2. certified accuracy curve
    curve = plot_certified_curve(
        {run.label: run.report for run in loaded if run.report is not None},
        out / "certified_accuracy.png",
    )
    md += [
        "## Certified accuracy against radius",
        "",
        f"![Certified accuracy against radius]({curve.name})",
        "",
        "Share of test points that are correctly classified with a certified radius at least "
        "the abscissa; at 0 it is the clean accuracy.",
        "",
    ]

    # 3. histograms of certified radii
    hist = _plot_histograms(loaded, out / "radius_histograms.png")
    md += [
        "## Certified radii",
        "",
        f"![Histograms of certified radii]({hist.name})",
        "",
        "Distribution of the certified radius per run (misclassified points have radius 0); "
        "the dashed line marks the median.",
        "",
    ]

    # 4. per-layer bounds
    md += [
        "## Per-layer Lipschitz bounds",
        "",
        "Each layer's guaranteed upper bound (used for certification) beside the "
        "power-iteration estimate of its spectral norm (a lower estimate: the gap shows how "
        "loose the guaranteed bound is), log scale. For dense layers (`nn.Linear`) the "
        "guaranteed bound is the exact spectral norm, shown in both bars.",
        "",
    ]
    for run in loaded:
        layer_fig = _plot_layers(run, out / f"layer_bounds_{run.slug}.png")
        md += [f"![Per-layer bounds of {_md(run.label)}]({layer_fig.name})", ""]

    # 5. certified examples under attack (paper Fig. 5)
    md += ["## Certified examples under attack (paper Fig. 5)", ""]
    for run in loaded:
        say(f"attacking certified examples of {run.label}")
        ex_fig, caption = _plot_examples(run, out / f"certified_examples_{run.slug}.png")
        if ex_fig is not None:
            md += [f"![Certified examples of {_md(run.label)}]({ex_fig.name})", ""]
        md += [caption, ""]

    # 6. tightness analysis (paper Fig. 4)
    md += ["## Tightness analysis (paper Fig. 4)", ""]
    if analyze_n == 0:
        md += ["Skipped (analyze_n = 0).", ""]
    else:
        md += [
            f"On the correctly classified points among the first {analyze_n} test points: "
            "(A) certified radius, (B) margin over a global Lipschitz estimate (largest "
            "input-gradient norm over the data), (C) margin over a local estimate (largest "
            "gradient norm near each point), (D) smallest adversarial perturbation found "
            "(DeepFool and C&W). Medians over points with A > 0; B/A near 1 means the bound "
            "is nearly as small as the gradients seen, D/C near 1 that the local estimate "
            "explains the attacks.",
            "",
        ]
        rows = []
        for run in loaded:
            say(f"tightness analysis of {run.label} on {analyze_n} points")
            x, y = run.x[:analyze_n], run.y[:analyze_n]
            ratios: dict[str, Any] = {}
            med: dict[str, float] = {}
            assert run.report is not None
            if bool(run.report.correct[:analyze_n].any()):  # else nothing to analyse
                res = tightness(run.model, run.bound, x.to(device), y.to(device))
                med = res.medians()
                try:
                    ratios = res.ratios()
                except InputError:  # no certified point with an adversarial example found
                    pass
            rows.append(
                [
                    run.label,
                    _fmt(ratios.get("B/A"), ".3g"),
                    _fmt(ratios.get("C/B"), ".3g"),
                    _fmt(ratios.get("D/C"), ".3g"),
                    ratios.get("points", 0),
                    *(_fmt(med.get(k)) for k in "ABCD"),
                ]
            )
        for name, paper in PAPER_RATIOS.items():
            pretty = {"lmt": "LMT", "unregularised": "unregularised"}.get(name, name)
            rows.append(
                [f"paper: {pretty}", paper["B/A"], paper["C/B"], paper["D/C"], "", "", "", "", ""]
            )
        header = ["run", "B/A", "C/B", "D/C", "points", "median A", "median B", "median C"]
        md += [*_table([*header, "median D"], rows), ""]

    md.append(f"Report written in {time.perf_counter() - t0:.1f} s.")
    path = write_text_atomic(out / "report.md", "\n".join(md) + "\n")
    say(f"wrote {path}")
    return path
