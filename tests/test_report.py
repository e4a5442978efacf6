"""The Markdown report over training runs: two tiny runs on a fake MNIST in tmp_path, every
figure a real non-blank PNG, every link resolving, and the numbers matching an independent
evaluation."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

from fakedata import write_fake_mnist
from lipmargin.audit import PAPER_RATIOS
from lipmargin.bounds import LipschitzBound
from lipmargin.certify import batches, evaluate
from lipmargin.config import config_from_dict
from lipmargin.data import dataset_info, load_dataset
from lipmargin.errors import CheckpointError, InputError
from lipmargin.report import _pick_examples, _plot_examples, _Run, layer_comparison, write_report
from lipmargin.runs import load_run
from lipmargin.train import train

N, ANALYZE_N = 50, 20
FIGURES = [
    "training_curves.png",
    "certified_accuracy.png",
    "radius_histograms.png",
    "layer_bounds_1-t.png",
    "layer_bounds_2-t-plain.png",
    "certified_examples_1-t.png",
    "certified_examples_2-t-plain.png",
]


TINY = {
    "name": "t",
    "epochs": 2,
    "batch_size": 50,
    "train_subset": 200,
    "eval_n": 50,
    "lr": 3e-3,
    "c": 0.5,
    "eval_eps": 0.1,
}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    data_dir = write_fake_mnist(root / "data")
    run, run2 = root / "lmt", root / "plain"
    train(config_from_dict(TINY), run, data_dir=data_dir, progress=False)
    # same config name: the report must tell the two runs apart by folder
    train(config_from_dict({**TINY, "method": "plain"}), run2, data_dir=data_dir, progress=False)
    md = write_report([run, run2], root / "out", data_dir=data_dir, n=N, analyze_n=ANALYZE_N)
    return md, [run, run2], data_dir


def _section(text: str, title: str) -> str:
    return text.split(f"## {title}", 1)[1].split("\n## ", 1)[0]


def _row(text: str, label: str) -> list[str]:
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == label:
            return cells
    raise AssertionError(f"no table row for {label!r}")


def test_report_written(built) -> None:
    md, _, _ = built
    assert md.name == "report.md" and md.is_file()
    text = md.read_text()
    for title in (
        "Summary",
        "Training curves",
        "Certified accuracy against radius",
        "Certified radii",
        "Per-layer Lipschitz bounds",
        "Certified examples under attack",
        "Tightness analysis",
    ):
        assert f"## {title}" in text, title


def test_figures_are_real_pictures(built) -> None:
    import matplotlib.image as mpimg

    md, _, _ = built
    for name in FIGURES:
        path = md.parent / name
        assert path.is_file(), name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        img = mpimg.imread(path)
        assert img.ndim == 3 and img.shape[0] >= 200 and img.shape[1] >= 300, (name, img.shape)
        assert float(img[..., :3].std()) > 0.01, f"{name} is a flat picture"


def test_every_link_resolves_and_every_figure_is_linked(built) -> None:
    md, _, _ = built
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md.read_text())
    assert sorted(links) == sorted(FIGURES)
    for link in links:
        assert not Path(link).is_absolute()
        assert (md.parent / link).is_file(), link
    assert sorted(p.name for p in md.parent.glob("*.png")) == sorted(FIGURES)


def test_summary_matches_independent_evaluation(built) -> None:
    md, runs, data_dir = built
    summary = _section(md.read_text(), "Summary")
    radii = dataset_info("mnist")["radii"]
    x, y = load_dataset("mnist", "test", data_dir)
    x, y = x[:N], y[:N]
    for run, label, method in zip(runs, ("t", "t (plain)"), ("lmt", "plain"), strict=True):
        model, bound, cfg, _, _ = load_run(run)
        with torch.no_grad():
            clean = float((model(x).argmax(1) == y).double().mean())
        rep = evaluate(model, bound, batches(x, y, 17), radii)
        assert rep.clean_accuracy == clean
        cells = _row(summary, label)
        assert cells[1:6] == ["mnist", method, "2", str(N), f"{clean:.4f}"]
        assert cells[6 : 6 + len(radii)] == [f"{rep.certified_accuracy[r]:.4f}" for r in radii]
        assert cells[-2] == f"{rep.median_radius:.4f}"
        assert float(cells[-1]) == pytest.approx(bound.certified().value, rel=1e-4)


def test_certified_examples_keep_their_prediction(built) -> None:
    md, _, _ = built
    section = _section(md.read_text(), "Certified examples under attack")
    assert section.count("prediction unchanged on all 8 images") == 2
    assert "CHANGED" not in section


def test_tightness_table_beside_paper(built) -> None:
    md, _, _ = built
    section = _section(md.read_text(), "Tightness analysis")
    assert f"first {ANALYZE_N} test points" in section
    for label in ("t", "t (plain)"):
        cells = _row(section, label)
        ratios = [float(c) for c in cells[1:4]]
        assert all(r > 0 for r in ratios), cells
        assert 0 < int(cells[4]) <= ANALYZE_N
    for name, paper in PAPER_RATIOS.items():
        cells = _row(section, f"paper: {'LMT' if name == 'lmt' else name}")
        assert [float(c) for c in cells[1:4]] == [paper["B/A"], paper["C/B"], paper["D/C"]]


def test_labels_and_skipped_analysis(built, tmp_path) -> None:
    _, runs, data_dir = built
    with pytest.raises(InputError, match="labels"):
        write_report(runs, tmp_path / "bad", data_dir=data_dir, labels=["only one"])
    with pytest.raises(InputError, match="no run"):
        write_report([], tmp_path / "bad", data_dir=data_dir)
    md = write_report(
        runs[:1], tmp_path / "one", data_dir=data_dir, n=20, analyze_n=0, labels=["mine | x"]
    )
    text = md.read_text()
    assert "Skipped (analyze_n = 0)." in text
    assert "| mine \\| x | mnist |" in text  # a pipe in a label does not break the table
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
        assert (md.parent / link).is_file(), link


def test_pick_examples_prefers_distinct_classes() -> None:
    radii = torch.tensor([0.0, 0.9, 0.8, 0.7, 0.1, 0.0, 0.5], dtype=torch.float64)
    labels = torch.tensor([0, 1, 1, 1, 2, 3, 4])
    assert _pick_examples(radii, labels, 3) == [1, 4, 6]  # best of classes 1, 2, 4
    assert _pick_examples(radii, labels, 10) == [1, 2, 3, 4, 6]  # never an uncertified point
    assert _pick_examples(torch.zeros(3, dtype=torch.float64), labels[:3], 8) == []


def test_colour_examples_figure(tmp_path) -> None:
    """The Fig. 5 picture for RGB inputs (a linear model: certificates are easy to get)."""
    import matplotlib.image as mpimg

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10)).eval()
    bound = LipschitzBound(model, (3, 8, 8))
    x = torch.rand(40, 3, 8, 8)
    with torch.no_grad():
        y = model(x).argmax(1)
    rep = evaluate(model, bound, batches(x, y, 40), [0.01])
    cfg = config_from_dict({"dataset": "cifar10"})
    run = _Run("rgb", "1-rgb", tmp_path, model, bound, cfg, {}, [], x, y, rep)
    path, caption = _plot_examples(run, tmp_path / "ex.png")
    assert path is not None and "prediction unchanged on all 8 images" in caption
    img = mpimg.imread(path)
    assert float(img[..., :3].std()) > 0.01


def test_layer_comparison_is_exact_for_dense_layers(built) -> None:
    """The last nn.Linear's power-iteration vector is never updated under the pairwise bound:
    its 'estimate' must not be shown; dense layers show their exact spectral norm."""
    _, runs, _ = built
    model, bound, _, _, _ = load_run(runs[0])
    rows = {r.name: r for r in bound.certified().layers}
    for name in ("fc1", "fc2"):
        value, what = layer_comparison(rows[name])
        exact = float(torch.linalg.matrix_norm(getattr(model, name).weight.detach().double(), 2))
        assert what == "exact" and value == pytest.approx(exact, rel=1e-6)
    value, what = layer_comparison(rows["conv1"])
    assert what == "power-iteration estimate" and value == rows["conv1"].estimate


def test_report_on_missing_run_creates_nothing(tmp_path, built) -> None:
    _, runs, data_dir = built
    with pytest.raises(CheckpointError):
        write_report([runs[0], tmp_path / "missing"], tmp_path / "out", data_dir=data_dir, n=N)
    assert not (tmp_path / "out").exists()
