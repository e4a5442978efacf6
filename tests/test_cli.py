"""The ``lipmargin`` command on a tiny fake MNIST: certify a trained run and a user model,
and the one-line errors (exit status 2, no traceback)."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fakedata import write_fake_mnist
from lipmargin.bounds import LipschitzBound
from lipmargin.certify import certify
from lipmargin.cli import main
from lipmargin.data import load_dataset
from lipmargin.runs import load_run

REPO = Path(__file__).resolve().parents[1]
MNIST_RADII = [0.5, 1.0, 1.58, 2.0]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_fake_mnist(tmp_path_factory.mktemp("data"), n_test=120)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, data_dir) -> Path:
    out = tmp_path_factory.mktemp("runs") / "tiny"
    code = main(
        [
            "train",
            "--config",
            str(REPO / "configs" / "tiny.toml"),
            "--set",
            "train_subset=200",
            "--set",
            "eval_n=50",
            "--set",
            "lr=0.003",
            "--out",
            str(out),
            "--data-dir",
            str(data_dir),
        ]
    )
    assert code == 0
    return out


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("lipmargin: error: ")
    assert "Traceback" not in err
    return lines[0]


# --------------------------------------------------------------------------- certify a run


def test_certify_run_json_and_plot(tmp_path, run_dir, data_dir, capsys) -> None:
    js, png = tmp_path / "out" / "c.json", tmp_path / "out" / "c.png"
    js.parent.mkdir()
    code = main(
        [
            "certify",
            str(run_dir),
            "--dataset",
            "mnist",
            "--data-dir",
            str(data_dir),
            "--json",
            str(js),
            "--plot",
            str(png),
            "--n",
            "100",
            "--batch-size",
            "30",
            "--layers",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "median certified radius" in out and "conv1" in out
    data = json.loads(js.read_text())
    for key in (
        "clean_accuracy",
        "certified_accuracy",
        "median_radius",
        "curve",
        "n",
        "lipschitz_bound",
        "layers",
    ):
        assert key in data, key
    assert data["n"] == 100
    assert [float(k) for k in data["certified_accuracy"]] == MNIST_RADII

    # Independently: the first 100 test points, the run's model, radii from certify and
    # brute-force counting.
    model, bound, _, _, _ = load_run(run_dir)
    x, y = load_dataset("mnist", "test", data_dir)
    x, y = x[:100], y[:100]
    with torch.no_grad():
        pred = model(x).argmax(1)
    assert data["clean_accuracy"] == pytest.approx(float((pred == y).double().mean()))
    radii = certify(model, x, y, bound).tolist()
    for eps in MNIST_RADII:
        assert data["certified_accuracy"][str(eps)] == pytest.approx(
            sum(r >= eps for r in radii) / 100
        )
    assert data["median_radius"] == pytest.approx(float(np.median(radii)), abs=1e-12)
    assert data["lipschitz_bound"] == pytest.approx(bound.certified().value)
    curve = data["curve"]
    assert curve[0] == [0.0, data["clean_accuracy"]]
    accs = [a for _, a in curve]
    assert all(b <= a for a, b in zip(accs, accs[1:], strict=False))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 1024


def test_certify_custom_eps_and_checkpoint_file(tmp_path, run_dir, data_dir) -> None:
    js = tmp_path / "c.json"
    code = main(
        [
            "certify",
            str(run_dir / "last.safetensors"),
            "--data-dir",
            str(data_dir),
            "--eps",
            "0.01",
            "0.05",
            "--n",
            "40",
            "--json",
            str(js),
        ]
    )
    assert code == 0
    data = json.loads(js.read_text())
    assert data["dataset"] == "mnist"  # taken from the run's config
    assert list(data["certified_accuracy"]) == ["0.01", "0.05"]
    assert data["n"] == 40


# --------------------------------------------------------------------------- errors


def test_missing_data_dir_is_one_line_error(tmp_path, run_dir, capsys) -> None:
    code = main(["certify", str(run_dir), "--data-dir", str(tmp_path / "nothing"), "--n", "10"])
    assert code == 2
    _one_line_error(capsys)


def test_corrupt_checkpoint_is_one_line_error(tmp_path, run_dir, data_dir, capsys) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(run_dir, bad)
    data = (bad / "last.safetensors").read_bytes()
    (bad / "last.safetensors").write_bytes(data[:1000])
    code = main(["certify", str(bad), "--data-dir", str(data_dir), "--n", "10"])
    assert code == 2
    msg = _one_line_error(capsys)
    assert "last.safetensors" in msg
    code = main(["certify", str(tmp_path / "no_run"), "--data-dir", str(data_dir)])
    assert code == 2
    _one_line_error(capsys)


def test_unknown_model_is_one_line_error(tmp_path, data_dir, capsys) -> None:
    code = main(
        [
            "train",
            "--config",
            str(REPO / "configs" / "tiny.toml"),
            "--set",
            "model=no_such_net",
            "--out",
            str(tmp_path / "r"),
            "--data-dir",
            str(data_dir),
        ]
    )
    assert code == 2
    assert "no_such_net" in _one_line_error(capsys)
    code = main(["train", "--set", "bogus_key=1", "--out", str(tmp_path / "r2")])
    assert code == 2
    assert "bogus_key" in _one_line_error(capsys)


def _write_user_model(folder: Path) -> Path:
    path = folder / "user_net.py"
    path.write_text(
        "from torch import nn\n\n\n"
        "def factory():\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(784, 10))\n"
    )
    return path


def test_user_model_without_weights_is_one_line_error(tmp_path, data_dir, capsys) -> None:
    path = _write_user_model(tmp_path)
    code = main(["certify", f"{path}:factory", "--dataset", "mnist", "--data-dir", str(data_dir)])
    assert code == 2
    assert "--weights" in _one_line_error(capsys)
    weights = tmp_path / "w.pt"
    torch.save({"1.weight": torch.zeros(10, 784), "1.bias": torch.zeros(10)}, weights)
    code = main(
        ["certify", f"{path}:factory", "--weights", str(weights), "--data-dir", str(data_dir)]
    )  # no --dataset
    assert code == 2
    _one_line_error(capsys)
    code = main(
        [
            "certify",
            f"{path}:nothing",
            "--weights",
            str(weights),
            "--dataset",
            "mnist",
            "--data-dir",
            str(data_dir),
        ]
    )
    assert code == 2
    _one_line_error(capsys)


# --------------------------------------------------------------------------- user models


def _linear_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "1.weight": torch.randn(10, 784, generator=g) * 0.05,
        "1.bias": torch.randn(10, generator=g) * 0.1,
    }


def _check_linear_report(data: dict, weights: dict, data_dir: Path, n: int) -> None:
    """The JSON figures against the exact radii of the linear model, in float64."""
    x, y = load_dataset("mnist", "test", data_dir)
    x = x[:n].reshape(n, -1).double()
    y = y[:n]
    w = weights["1.weight"].double()
    b = weights["1.bias"].double()
    z = x @ w.T + b
    exact = []
    for j in range(n):
        t = int(y[j])
        if int(z[j].argmax()) != t:
            exact.append(0.0)
            continue
        exact.append(
            min(float(z[j, t] - z[j, i]) / float((w[t] - w[i]).norm()) for i in range(10) if i != t)
        )
    correct = sum(int(z[j].argmax()) == int(y[j]) for j in range(n))
    assert correct > 0
    assert data["clean_accuracy"] == pytest.approx(correct / n)
    assert data["median_radius"] == pytest.approx(float(np.median(exact)), rel=1e-3, abs=1e-6)
    assert data["lipschitz_bound"] == pytest.approx(float(np.linalg.norm(w.numpy(), 2)), rel=1e-6)


def test_user_model_with_torch_weights_certifies(tmp_path, data_dir) -> None:
    path = _write_user_model(tmp_path)
    weights = _linear_weights()
    torch.save(weights, tmp_path / "w.pt")
    js = tmp_path / "u.json"
    code = main(
        [
            "certify",
            f"{path}:factory",
            "--weights",
            str(tmp_path / "w.pt"),
            "--dataset",
            "mnist",
            "--data-dir",
            str(data_dir),
            "--n",
            "100",
            "--json",
            str(js),
        ]
    )
    assert code == 0
    _check_linear_report(json.loads(js.read_text()), weights, data_dir, 100)


def test_user_model_with_safetensors_weights_certifies(tmp_path, data_dir, capsys) -> None:
    """README: ``lipmargin certify my_model.py:factory --weights w.safetensors``, with weights
    saved by ``safetensors.torch.save_file`` (no lipmargin JSON sidecar)."""
    from safetensors.torch import save_file

    path = _write_user_model(tmp_path)
    weights = _linear_weights(seed=1)
    save_file(weights, tmp_path / "w.safetensors")
    js = tmp_path / "u.json"
    code = main(
        [
            "certify",
            f"{path}:factory",
            "--weights",
            str(tmp_path / "w.safetensors"),
            "--dataset",
            "mnist",
            "--data-dir",
            str(data_dir),
            "--n",
            "100",
            "--json",
            str(js),
        ]
    )
    assert code == 0, capsys.readouterr().err
    _check_linear_report(json.loads(js.read_text()), weights, data_dir, 100)


def test_user_model_bound_matches_library(tmp_path) -> None:
    """Sanity of the helper above: the library's bound of the linear user model is ||W||_2."""
    weights = _linear_weights()
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
    model.load_state_dict(weights)
    value = LipschitzBound(model, (1, 28, 28)).certified().value
    sigma = float(np.linalg.norm(weights["1.weight"].double().numpy(), 2))
    assert sigma <= value <= sigma * (1 + 1e-6)
    assert math.isfinite(value)


# --------------------------------------------------------------------------- the module


def test_python_m_lipmargin_help() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "lipmargin", "--help"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0
    for cmd in ("train", "certify", "audit", "analyze", "data"):
        assert cmd in proc.stdout


def test_python_m_lipmargin_error_has_no_traceback(tmp_path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lipmargin",
            "certify",
            str(tmp_path / "missing_run"),
            "--data-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("lipmargin: error: ")
