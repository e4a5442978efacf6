"""The ``lipmargin`` command on a tiny fake MNIST: certify a trained run and a user model,
and the one-line errors (exit status 2, no traceback)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
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


# --------------------------------------------------------------------------- the console script
#
# Every error path of issue 13 through the real `lipmargin` console script: exit status 2, one
# line on stderr, no traceback, nothing half-written.

TINY = str(REPO / "configs" / "tiny.toml")


def _script() -> list[str]:
    exe = shutil.which("lipmargin", path=str(Path(sys.executable).parent))
    exe = exe or shutil.which("lipmargin")
    return [exe] if exe else [sys.executable, "-m", "lipmargin"]


def _cli(*args: object, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [*_script(), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        env=env,
    )


def _assert_one_line(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("lipmargin: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


ERROR_CASES = {
    # run folder
    "train into an existing run": (
        ["train", "--config", TINY, "--out", "{run}", "--data-dir", "{data}"],
        "already holds a run",
    ),
    "resume without checkpoint (typo in --out)": (
        ["train", "--config", TINY, "--out", "{tmp}/typo", "--resume", "--data-dir", "{data}"],
        "no checkpoint",
    ),
    "resume with another activation": (
        ["train", "--out", "{run}", "--resume", "--set", 'model_kwargs={"activation": "maxmin"}'],
        "changes model_kwargs",
    ),
    "resume with another optimizer": (
        ["train", "--out", "{run}", "--resume", "--set", "epochs=3", "--set", 'optimizer="sgd"'],
        "changes optimizer",
    ),
    "the old README resume line": (
        ["train", "--out", "{run}", "--resume", "--set", "epochs=5", "--set", "c=0.25"],
        "changes c ",
    ),
    "resume and overwrite": (["train", "--resume", "--overwrite"], "not allowed with"),
    "unwritable run folder": (
        ["train", "--config", TINY, "--out", "{file}/run", "--data-dir", "{data}"],
        "cannot write run folder",
    ),
    # config values
    "lr=NaN": (["train", "--set", "lr=NaN", "--out", "{tmp}/x"], "lr"),
    "negative weight_decay": (["train", "--set", "weight_decay=-1", "--out", "{tmp}/x"], "weight_"),
    "negative momentum": (["train", "--set", "momentum=-0.5", "--out", "{tmp}/x"], "momentum"),
    "negative lr_gamma": (["train", "--set", "lr_gamma=-0.1", "--out", "{tmp}/x"], "lr_gamma"),
    "device=gpu": (["train", "--set", 'device="gpu"', "--out", "{tmp}/x"], "device"),
    "eval_eps=0": (["train", "--set", "eval_eps=0", "--out", "{tmp}/x"], "eval_eps"),
    "release_factor as a word": (
        ["train", "--set", "release_factor=yes", "--out", "{tmp}/x"],
        "release_factor",
    ),
    "name=123": (["train", "--set", "name=123", "--out", "{tmp}/x"], "name"),
    # counts and radii
    "certify --n 0": (["certify", "{run}", "--n", "0"], "--n"),
    "certify --n -5": (["certify", "{run}", "--n", "-5"], "--n"),
    "certify --batch-size 0": (["certify", "{run}", "--batch-size", "0"], "--batch-size"),
    "certify --eps nan": (["certify", "{run}", "--eps", "nan"], "--eps"),
    "analyze --n 0": (["analyze", "{run}", "--n", "0"], "--n"),
    "audit --n 0": (["audit", "{run}", "--n", "0"], "--n"),
    # unwritable outputs, refused before any computation
    "certify --json": (
        ["certify", "{run}", "--data-dir", "{data}", "--json", "{file}/c.json"],
        "--json",
    ),
    "certify --plot": (
        ["certify", "{run}", "--data-dir", "{data}", "--plot", "{file}/c.png"],
        "--plot",
    ),
    "audit --json": (
        ["audit", "{run}", "--data-dir", "{data}", "--json", "{file}/a.json"],
        "--json",
    ),
    "analyze --json": (
        ["analyze", "{run}", "--data-dir", "{data}", "--json", "{file}/t.json"],
        "--json",
    ),
    "report --out": (
        ["report", "{run}", "--data-dir", "{data}", "--out", "{file}/rep"],
        "report folder",
    ),
    "data fetch --data-dir": (["data", "fetch", "--data-dir", "{file}/data"], "data folder"),
    # report on a missing run
    "report on a missing run": (
        ["report", "{tmp}/missing", "--data-dir", "{data}", "--out", "{tmp}/rep"],
        "not found",
    ),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_console_script_error_is_one_line(case, tmp_path, run_dir, data_dir) -> None:
    args, needle = ERROR_CASES[case]
    (tmp_path / "file").write_text("a regular file, not a folder\n")
    subs = {"{run}": run_dir, "{data}": data_dir, "{tmp}": tmp_path, "{file}": tmp_path / "file"}

    def fill(arg: str) -> str:
        for key, value in subs.items():
            arg = arg.replace(key, str(value))
        return arg

    before_run = _snapshot(run_dir)
    before_tmp = sorted(p.name for p in tmp_path.iterdir())
    _assert_one_line(_cli(*map(fill, args), cwd=tmp_path), needle)
    assert _snapshot(run_dir) == before_run  # nothing in the run folder changed
    assert sorted(p.name for p in tmp_path.iterdir()) == before_tmp  # nothing new, no empty folder


def test_console_script_cuda_on_cpu_build(tmp_path, data_dir) -> None:
    if torch.cuda.is_available():
        pytest.skip("this torch build has CUDA")
    proc = _cli(
        "train", "--config", TINY, "--set", 'device="cuda"', "--out", tmp_path / "r",
        "--data-dir", data_dir,
    )  # fmt: skip
    _assert_one_line(proc, "CUDA")
    assert not (tmp_path / "r").exists()


def _copy_run(run_dir: Path, dest: Path) -> Path:
    shutil.copytree(run_dir, dest)
    return dest


def test_console_script_edited_sidecar_is_refused(tmp_path, run_dir, data_dir) -> None:
    """relu -> maxmin in last.json keeps every shape; the fingerprint in the tensors tells."""
    run = _copy_run(run_dir, tmp_path / "run")
    meta = json.loads((run / "last.json").read_text())
    meta["config"]["model_kwargs"] = {"activation": "maxmin"}
    (run / "last.json").write_text(json.dumps(meta))
    proc = _cli("certify", run, "--data-dir", data_dir, "--n", "10")
    _assert_one_line(proc, "different network", "activation")


def test_console_script_pickled_model_and_mismatched_weights(tmp_path, data_dir) -> None:
    path = _write_user_model(tmp_path)
    torch.save(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10)), tmp_path / "m.pt")
    common = ["--dataset", "mnist", "--data-dir", data_dir, "--n", "10"]
    proc = _cli("certify", f"{path}:factory", "--weights", tmp_path / "m.pt", *common)
    _assert_one_line(proc, "pickled", "state_dict()")
    torch.save({"1.weight": torch.zeros(10, 784), "2.bias": torch.zeros(10)}, tmp_path / "w.pt")
    proc = _cli("certify", f"{path}:factory", "--weights", tmp_path / "w.pt", *common)
    _assert_one_line(proc, "missing 1 key(s): 1.bias", "unexpected 1 key(s): 2.bias")


def test_console_script_resume_says_nothing_to_train(tmp_path, run_dir) -> None:
    """--resume without --config continues with the run's own config; at the finished epoch it
    says so (exit 0) and writes nothing."""
    run = _copy_run(run_dir, tmp_path / "run")
    before = _snapshot(run)
    proc = _cli("train", "--out", run, "--resume")
    assert proc.returncode == 0, proc.stderr
    assert "nothing to train" in proc.stdout
    assert _snapshot(run) == before


def test_resume_with_more_epochs_from_the_runs_own_config(
    tmp_path, run_dir, data_dir, capsys
) -> None:
    """--resume without --config: the run's config plus the --set changes; --quiet prints no
    epoch lines and no progress bars, only the resume line, the record and the folder."""
    run = _copy_run(run_dir, tmp_path / "run")
    code = main(["train", "--out", str(run), "--resume", "--set", "epochs=2", "--quiet",
                 "--data-dir", str(data_dir)])  # fmt: skip
    assert code == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert len(lines) == 3 and lines[0].startswith("resuming") and "epochs 1 -> 2" in lines[0]
    assert json.loads(lines[1])["epoch"] == 2 and lines[2] == f"run folder: {run}"
    assert captured.err == ""
    log = [json.loads(ln) for ln in (run / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]
    meta = json.loads((run / "last.json").read_text())
    assert meta["resumes"] == [{"at_epoch": 1, "changes": {"epochs": [1, 2]}}]
    assert meta["config"]["train_subset"] == 200 and meta["config"]["lr"] == 0.003


@pytest.mark.parametrize("layout", ["state_dict", "module", "compiled"])
def test_user_weights_in_common_layouts(tmp_path, data_dir, layout) -> None:
    """{"state_dict": ...}, DataParallel's module. prefixes and a torch.compile'd factory whose
    state dict carries _orig_mod. prefixes all certify like the plain state dict."""
    path = tmp_path / "net.py"
    compiled = "torch.compile(net)" if layout == "compiled" else "net"
    path.write_text(
        "import torch\nfrom torch import nn\n\n\ndef factory():\n"
        f"    net = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))\n    return {compiled}\n"
    )
    weights = _linear_weights(seed=2)
    saved = {
        "state_dict": {"state_dict": weights},
        "module": {f"module.{k}": v for k, v in weights.items()},
        "compiled": {f"_orig_mod.{k}": v for k, v in weights.items()},
    }[layout]
    torch.save(saved, tmp_path / "w.pt")
    js = tmp_path / "u.json"
    code = main(
        ["certify", f"{path}:factory", "--weights", str(tmp_path / "w.pt"), "--dataset", "mnist",
         "--data-dir", str(data_dir), "--n", "60", "--json", str(js)]
    )  # fmt: skip
    assert code == 0
    _check_linear_report(json.loads(js.read_text()), weights, data_dir, 60)


def test_certify_layers_shows_exact_norm_of_dense_layers(run_dir, data_dir, capsys) -> None:
    code = main(["certify", str(run_dir), "--data-dir", str(data_dir), "--n", "10", "--layers"])
    assert code == 0
    out = capsys.readouterr().out
    model, bound, _, _, _ = load_run(run_dir)
    for name in ("fc1", "fc2"):
        weight = getattr(model, name).weight.detach().double()
        sigma = float(torch.linalg.matrix_norm(weight, ord=2))
        line = next(ln for ln in out.splitlines() if ln.strip().startswith(name))
        assert "(exact " in line and "power iteration" not in line
        assert float(line.split("(exact ")[1].rstrip(")")) == pytest.approx(sigma, rel=1e-5)


def test_audit_is_seeded(tmp_path, run_dir, data_dir) -> None:
    outs = []
    for i, seed in enumerate((0, 0, 1)):
        js = tmp_path / f"a{i}.json"
        code = main(
            ["audit", str(run_dir), "--data-dir", str(data_dir), "--n", "40", "--no-cw",
             "--pgd-steps", "3", "--seed", str(seed), "--json", str(js)]
        )  # fmt: skip
        assert code in (0, 1)
        outs.append(json.loads(js.read_text()))
    assert outs[0] == outs[1]
    assert outs[0]["n_certified"] > 0
    assert outs[0] != outs[2]  # the seed does reach the attacks


def test_help_documents_every_option() -> None:
    from lipmargin import __version__
    from lipmargin.cli import build_parser
    from lipmargin.config import TrainConfig

    parser = build_parser()
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    seen = 0
    todo = [parser]
    while todo:
        p = todo.pop()
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                todo.extend(action.choices.values())
                continue
            assert action.help, (p.prog, action.dest)
            seen += 1
        if p.prog.split()[-1] in ("train", "certify", "audit", "analyze", "report", "fetch"):
            assert "--quiet" in p.format_help(), p.prog
    assert subparsers and seen > 40
    train_help = " ".join(
        parser._subparsers._group_actions[0].choices["train"].format_help().split()
    )
    for f in dataclasses.fields(TrainConfig):
        assert f.name in train_help, f.name
    choices = parser._subparsers._group_actions[0].choices
    assert "(default: 1000)" in " ".join(choices["certify"].format_help().split())
    assert "random starts (default: 0)" in " ".join(choices["audit"].format_help().split())
    proc = _cli("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"lipmargin {__version__}"
