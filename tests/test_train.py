"""The training loop on a tiny fake MNIST written in tmp_path (real IDX files, learnable
pattern): run folder contents, resume, every method, errors, and DDP against one process."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fakedata import write_fake_mnist
from lipmargin import runs
from lipmargin.certify import batches, evaluate
from lipmargin.checkpoint import load_checkpoint
from lipmargin.config import config_from_dict, load_config
from lipmargin.data import load_dataset
from lipmargin.errors import CheckpointError, ConfigError, RunFolderError
from lipmargin.runs import load_run
from lipmargin.train import train

REPO = Path(__file__).resolve().parents[1]
LOG_KEYS = {
    "epoch",
    "step",
    "loss",
    "train_accuracy",
    "clean_accuracy",
    "certified_accuracy",
    "eval_eps",
    "median_radius",
    "bound",
    "train_estimate",
    "guaranteed_max",
    "c",
    "lr",
    "seconds",
}


# --------------------------------------------------------------------------- fake MNIST


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_fake_mnist(tmp_path_factory.mktemp("data"))


BASE = {
    "name": "t",
    "epochs": 2,
    "batch_size": 50,
    "eval_n": 50,
    "lr": 3e-3,
    "c": 0.5,
    "eval_eps": 0.1,
}


def cfg_of(**overrides):
    return config_from_dict({**BASE, **overrides})


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, data_dir):
    run = tmp_path_factory.mktemp("straight")
    record = train(cfg_of(), run, data_dir=data_dir, progress=False)
    return run, record


def _state(run: Path) -> dict[str, torch.Tensor]:
    tensors, _ = load_checkpoint(run)
    return tensors


# --------------------------------------------------------------------------- run folder


def test_run_folder_contents(straight_run, data_dir) -> None:
    run, record = straight_run
    for name in ("last.safetensors", "last.json", "log.jsonl", "config.json"):
        assert (run / name).is_file(), name
    lines = [json.loads(ln) for ln in (run / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]
    assert [r["step"] for r in lines] == [4, 8]  # 200 images / 50
    for r in lines:
        assert set(r) == LOG_KEYS
        assert math.isfinite(r["loss"]) and r["loss"] > 0
        assert 0 <= r["clean_accuracy"] <= 1 and 0 <= r["certified_accuracy"] <= 1
        assert r["certified_accuracy"] <= r["clean_accuracy"]
        assert r["c"] == 0.5 and r["lr"] == 3e-3 and r["eval_eps"] == 0.1
        # the training estimate and the guaranteed largest K[t, i] are both logged
        assert 0 < r["train_estimate"] and math.isfinite(r["train_estimate"])
        assert 0 < r["guaranteed_max"] <= r["bound"] * math.sqrt(2) * (1 + 1e-6)
    assert lines[1]["loss"] < lines[0]["loss"]  # learnable data: the loss goes down
    assert record == lines[-1]
    assert json.loads((run / "config.json").read_text()) == cfg_of().to_dict()
    meta = json.loads((run / "last.json").read_text())
    assert meta["epoch"] == 2 and meta["step"] == 8
    assert meta["config"] == cfg_of().to_dict()
    assert meta["input_shape"] == [1, 28, 28]


def test_load_run_reproduces_logged_evaluation(straight_run, data_dir) -> None:
    run, record = straight_run
    model, bound, cfg, tensors, meta = load_run(run)
    assert cfg == cfg_of()
    assert not model.training
    # The weights are those evaluated at the end of training: the guaranteed bound (float64,
    # deterministic) and the figures on the held-out points come out the same.
    assert bound.certified().value == record["bound"]
    x, y = load_dataset("mnist", "test", data_dir)
    x, y = x[:50], y[:50]
    with torch.no_grad():
        pred = model(x).argmax(1)
    assert float((pred == y).double().mean()) == record["clean_accuracy"]
    report = evaluate(model, bound, batches(x, y, 500), [0.1])
    assert report.median_radius == record["median_radius"]
    assert report.certified_accuracy[0.1] == record["certified_accuracy"]
    # and the state dict equals the stored tensors bit for bit
    for k, v in model.state_dict().items():
        assert torch.equal(v, tensors["model." + k]), k
    # the loaded bound keeps the trained power-iteration vectors
    for k, v in bound.state_dict().items():
        assert torch.equal(v, tensors["bound." + k]), k
        assert torch.isfinite(v).all() and float(v.norm()) == pytest.approx(1.0, rel=1e-4)


def test_resume_matches_straight_run(tmp_path, straight_run, data_dir) -> None:
    run_b, _ = straight_run
    run_a = tmp_path / "resumed"
    train(cfg_of(epochs=1), run_a, data_dir=data_dir, progress=False)
    assert len((run_a / "log.jsonl").read_text().splitlines()) == 1
    record = train(cfg_of(), run_a, resume=True, data_dir=data_dir, progress=False)
    assert record["epoch"] == 2 and record["step"] == 8
    a, b = _state(run_a), _state(run_b)
    assert set(a) == set(b)
    assert any(k.startswith("optim.") for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    lines_a = [json.loads(ln) for ln in (run_a / "log.jsonl").read_text().splitlines()]
    lines_b = [json.loads(ln) for ln in (run_b / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines_a] == [1, 2]
    for ra, rb in zip(lines_a, lines_b, strict=True):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-6)
        assert ra["bound"] == pytest.approx(rb["bound"], rel=1e-6)


def test_resume_adversarial_matches_straight_run(tmp_path, data_dir) -> None:
    """PGD's random starts draw from the global RNG: a resumed run must see the same draws."""
    cfg = {**SMALL, "epochs": 2, "method": "adversarial", "adv_steps": 2, "adv_eps": 0.5}
    train(cfg_of(**cfg), tmp_path / "straight", data_dir=data_dir, progress=False)
    train(cfg_of(**{**cfg, "epochs": 1}), tmp_path / "resumed", data_dir=data_dir, progress=False)
    train(cfg_of(**cfg), tmp_path / "resumed", resume=True, data_dir=data_dir, progress=False)
    a, b = _state(tmp_path / "resumed"), _state(tmp_path / "straight")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def test_resume_without_checkpoint_is_refused(tmp_path, data_dir) -> None:
    """A typo in --out with --resume must not train from scratch with exit 0."""
    run = tmp_path / "fresh"
    cfg = cfg_of(epochs=1, train_subset=50, eval_n=10)
    with pytest.raises(RunFolderError, match="no checkpoint"):
        train(cfg, run, resume=True, data_dir=data_dir, progress=False)
    assert not run.exists()


def _small_run(tmp_path, data_dir, name="run", **overrides):
    run = tmp_path / name
    cfg = cfg_of(**{"epochs": 1, "train_subset": 50, "eval_n": 10, **overrides})
    train(cfg, run, data_dir=data_dir, progress=False)
    return run, cfg


def test_existing_run_is_refused_without_resume_or_overwrite(tmp_path, data_dir) -> None:
    run, cfg = _small_run(tmp_path, data_dir)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    with pytest.raises(RunFolderError, match="--resume.*--overwrite"):
        train(cfg, run, data_dir=data_dir, progress=False)
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # nothing touched


def test_overwrite_keeps_the_old_run_aside(tmp_path, data_dir, capsys) -> None:
    run, cfg = _small_run(tmp_path, data_dir)
    old_ckpt = (run / "last.safetensors").read_bytes()
    old_log = (run / "log.jsonl").read_text()
    train(replace(cfg, seed=1), run, overwrite=True, data_dir=data_dir, progress=False)
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(aside) == 1
    assert (aside[0] / "last.safetensors").read_bytes() == old_ckpt
    assert (aside[0] / "log.jsonl").read_text() == old_log
    assert str(aside[0]) in capsys.readouterr().out
    assert json.loads((run / "config.json").read_text())["seed"] == 1
    with pytest.raises(RunFolderError, match="exclude"):
        train(cfg, run, resume=True, overwrite=True, data_dir=data_dir, progress=False)


def test_resume_with_fewer_or_equal_epochs_says_so(tmp_path, data_dir, capsys) -> None:
    run, cfg = _small_run(tmp_path, data_dir, epochs=2)
    files = {p.name: p.read_bytes() for p in run.iterdir()}
    record = train(cfg, run, resume=True, data_dir=data_dir, progress=False)
    assert "nothing to train" in capsys.readouterr().out
    assert record["epoch"] == 2
    with pytest.raises(RunFolderError, match="already trained 2 epochs"):
        train(replace(cfg, epochs=1), run, resume=True, data_dir=data_dir, progress=False)
    assert {p.name: p.read_bytes() for p in run.iterdir()} == files  # config.json untouched


@pytest.mark.parametrize(
    ("change", "keys"),
    [
        ({"model_kwargs": {"activation": "maxmin"}}, "model_kwargs"),
        ({"model": "c6f2"}, "model"),
        ({"optimizer": "sgd"}, "optimizer"),
        ({"c": 0.25, "method": "plain"}, "c, method"),
    ],
)
def test_resume_refuses_incompatible_config(tmp_path, data_dir, change, keys) -> None:
    run, cfg = _small_run(tmp_path, data_dir)
    files = {p.name: p.read_bytes() for p in run.iterdir()}
    with pytest.raises(RunFolderError, match=f"changes {keys} "):
        train(replace(cfg, epochs=2, **change), run, resume=True, data_dir=data_dir, progress=False)
    assert {p.name: p.read_bytes() for p in run.iterdir()} == files


def test_resume_allows_and_records_schedule_changes(tmp_path, data_dir, capsys) -> None:
    run, cfg = _small_run(tmp_path, data_dir)
    new = replace(cfg, epochs=2, lr=1e-3, lr_milestones=[1])
    record = train(new, run, resume=True, data_dir=data_dir, progress=False)
    assert record["epoch"] == 2 and record["lr"] == pytest.approx(1e-4)
    assert "lr 0.003 -> 0.001" in capsys.readouterr().out
    meta = json.loads((run / "last.json").read_text())
    changes = {"epochs": [1, 2], "lr": [3e-3, 1e-3], "lr_milestones": [[], [1]]}
    assert meta["resumes"] == [{"at_epoch": 1, "changes": changes}]
    assert json.loads((run / "config.json").read_text()) == new.to_dict()
    assert [r["epoch"] for r in runs.read_log(run)] == [1, 2]


def test_resume_may_change_the_cost_knobs_of_the_bound(tmp_path, data_dir) -> None:
    """power_every and bound_every (issue 16) trade training time against tracking; a
    resumed run may change them, and bound_every = 0 is refused."""
    run, cfg = _small_run(tmp_path, data_dir)
    new = replace(cfg, epochs=2, power_every=2, bound_every=3)
    record = train(new, run, resume=True, data_dir=data_dir, progress=False)
    assert record["epoch"] == 2
    assert json.loads((run / "config.json").read_text())["bound_every"] == 3
    with pytest.raises(ConfigError, match="bound_every"):
        replace(cfg, bound_every=0).validate()


def test_checkpoint_files_have_ordinary_mode(tmp_path, data_dir) -> None:
    run, _ = _small_run(tmp_path, data_dir)
    mask = os.umask(0o022)
    os.umask(mask)
    for name in ("last.safetensors", "last.json", "config.json", "log.jsonl"):
        assert (run / name).stat().st_mode & 0o777 == 0o666 & ~mask, name


def test_edited_sidecar_architecture_is_detected(tmp_path, data_dir) -> None:
    """relu -> maxmin keeps every shape: only the fingerprint in the tensors file tells."""
    run, _ = _small_run(tmp_path, data_dir)
    meta = json.loads((run / "last.json").read_text())
    meta["config"]["model_kwargs"] = {"activation": "maxmin"}
    (run / "last.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="different network.*activation"):
        load_run(run)


def test_user_model_run_certifies_from_another_directory(tmp_path, data_dir, monkeypatch) -> None:
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "net.py").write_text(
        "from torch import nn\n\n\ndef factory():\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(784, 10))\n"
    )
    monkeypatch.chdir(tmp_path)
    run, _ = _small_run(tmp_path, data_dir, model="models/net.py:factory")
    monkeypatch.chdir(tmp_path / "models")
    model, _, cfg, _, _ = load_run(run)
    assert Path(cfg.model.rsplit(":", 1)[0]).is_absolute()


# --------------------------------------------------------------------------- methods


METHODS = {
    "lmt_pairwise": {"method": "lmt", "lmt_form": "pairwise"},
    "lmt_global": {"method": "lmt", "lmt_form": "global"},
    "lmt_no_release": {"method": "lmt", "release_factor": False, "c0": 0.01, "c_warmup_epochs": 1},
    "plain": {"method": "plain"},
    "weight_decay": {"method": "weight_decay", "weight_decay": 1e-3},
    "snr": {"method": "snr", "snr_lambda": 0.01},
    "parseval": {"method": "parseval", "parseval_beta": 1e-3},
    "adversarial": {"method": "adversarial", "adv_steps": 2, "adv_eps": 0.5},
}
SMALL = {"epochs": 1, "train_subset": 100, "eval_n": 20}


@pytest.mark.parametrize("key", list(METHODS))
def test_every_method_trains_one_epoch(tmp_path, data_dir, key) -> None:
    cfg = cfg_of(**SMALL, **METHODS[key])
    record = train(cfg, tmp_path / key, data_dir=data_dir, progress=False)
    assert record["epoch"] == 1 and record["step"] == 2
    for name in ("loss", "bound", "median_radius", "clean_accuracy"):
        assert math.isfinite(record[name]), name
    model, bound, loaded, tensors, _ = load_run(tmp_path / key)
    assert loaded == cfg
    for k, v in tensors.items():
        assert torch.isfinite(v).all(), k
    if key == "lmt_no_release":
        # warm-up over one epoch of 2 steps: c(2) is the final c
        assert record["c"] == pytest.approx(0.5)


def test_lmt_with_c_zero_trains_exactly_like_plain(tmp_path, data_dir) -> None:
    """c = 0 makes the LMT loss the cross-entropy; the bound's power iteration must not touch the
    weights, so the trajectories coincide. The power-iteration vectors stay finite unit vectors."""
    lmt = train(
        cfg_of(**SMALL, method="lmt", c=0.0), tmp_path / "lmt", data_dir=data_dir, progress=False
    )
    plain = train(
        cfg_of(**SMALL, method="plain"), tmp_path / "plain", data_dir=data_dir, progress=False
    )
    a, b = _state(tmp_path / "lmt"), _state(tmp_path / "plain")
    for k in a:
        if k.startswith(("model.", "optim.")):
            assert torch.equal(a[k], b[k]), k
    assert lmt["loss"] == plain["loss"]
    for k, v in a.items():
        if k.startswith("bound."):
            assert torch.isfinite(v).all(), k
            assert float(v.norm()) == pytest.approx(1.0, rel=1e-4), k
    # with c > 0 the LMT trajectory is different (the test above can fail)
    other = train(
        cfg_of(**SMALL, method="lmt", c=1.0), tmp_path / "lmt1", data_dir=data_dir, progress=False
    )
    assert other["loss"] != plain["loss"]


def test_lr_milestones_logged(tmp_path, data_dir) -> None:
    cfg = cfg_of(
        epochs=2,
        train_subset=50,
        eval_n=10,
        lr_milestones=[1],
        lr_gamma=0.5,
        optimizer="sgd",
        method="plain",
    )
    train(cfg, tmp_path / "ms", data_dir=data_dir, progress=False)
    lines = [json.loads(ln) for ln in (tmp_path / "ms" / "log.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in lines] == [pytest.approx(3e-3), pytest.approx(1.5e-3)]


# --------------------------------------------------------------------------- errors


def test_corrupt_checkpoint_raises(tmp_path, straight_run) -> None:
    import shutil

    run, _ = straight_run
    bad = tmp_path / "bad"
    shutil.copytree(run, bad)
    data = (bad / "last.safetensors").read_bytes()
    (bad / "last.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        load_run(bad)
    flipped = bytearray(data)
    flipped[-10] ^= 0xFF
    (bad / "last.safetensors").write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError):
        load_run(bad)
    (bad / "last.safetensors").write_bytes(data)
    (bad / "last.json").unlink()
    with pytest.raises(CheckpointError):
        load_run(bad)
    with pytest.raises(CheckpointError):
        load_run(tmp_path / "nowhere")


@pytest.mark.parametrize(
    "overrides",
    [
        ['method="foo"'],
        ["lr=-1"],
        ["no_such_key=1"],
        ['optimizer="rmsprop"'],
        ['lmt_form="both"'],
        ["epochs=0"],
        ["batch_size=0"],
        ['c="big"'],
        ["c=-0.5"],
        ["train_subset=0"],
        ["nokeyvalue"],
        ["lr=nan"],
        ["lr=NaN"],
        ["lr=inf"],
        ["weight_decay=-1"],
        ["momentum=-0.5"],
        ["lr_gamma=-0.1"],
        ['device="gpu"'],
        ["eval_eps=0"],
        ['release_factor="False"'],
        ["release_factor=1"],
        ["name=123"],
        ['model="wong_kolter"', "dataset=7"],
    ],
)
def test_invalid_config_raises(overrides) -> None:
    with pytest.raises(ConfigError):
        load_config(None, overrides)


@pytest.mark.parametrize(
    "overrides",
    [
        ["batch_size=2.5"],
        ["epochs=1.5"],
        ["train_subset=2.5"],
        ["lr_milestones=3"],
        ['c0="x"', "c_warmup_epochs=1"],
    ],
)
def test_wrongly_typed_config_raises_config_error(overrides) -> None:
    """Values of the wrong type must be refused when the config is read, not crash the
    training loop later with a TypeError (a traceback from the CLI)."""
    with pytest.raises(ConfigError):
        load_config(None, overrides)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("lr=.001", 0.001),
        ("lr=1.", 1.0),
        ("lr=1e-3", 1e-3),
        ("release_factor=False", False),
        ("release_factor=false", False),
        ("release_factor=True", True),
        ("lr_milestones=[1, 2]", [1, 2]),
        ("name=foo", "foo"),
        ("name='foo'", "foo"),
        ("c0=None", None),
    ],
)
def test_set_values_parse_like_toml_json_and_python(text, value) -> None:
    key = text.split("=", 1)[0]
    cfg = load_config(None, [text])
    assert getattr(cfg, key) == value
    assert type(getattr(cfg, key)) is type(value)


def test_config_file_errors(tmp_path) -> None:
    with pytest.raises(ConfigError):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("epochs = = 3\n")
    with pytest.raises(ConfigError):
        load_config(bad)
    good = tmp_path / "good.toml"
    good.write_text('method = "plain"\nepochs = 3\nc0 = 0.1\n')
    cfg = load_config(good, ["epochs=5", 'name="x"'])
    assert (cfg.method, cfg.epochs, cfg.c0, cfg.name) == ("plain", 5, 0.1, "x")


def test_shipped_configs_parse() -> None:
    files = sorted((REPO / "configs").glob("*.toml"))
    assert files
    for f in files:
        load_config(f)


# --------------------------------------------------------------------------- DDP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_two_processes_match_single_process(tmp_path, data_dir) -> None:
    """2 gloo ranks, each taking half of every global batch of 50 (a DistributedSampler read
    through a DataLoader; the single process indexes its in-memory split).

    The loss is a per-sample mean and the LMT term is linear in the per-sample coefficients, so
    the all-reduced average of the two half-batch gradients is the full-batch gradient; the
    power-iteration vectors see the same weights on every rank. The runs differ only by float32
    summation order (~1e-7 relative per step). SGD keeps those differences at that scale (Adam
    would turn a near-zero gradient of either sign into a full +-lr step), so after 8 steps
    with lr 0.05 a tolerance of 1e-5 absolute / 1e-4 relative has a wide margin.
    """
    settings = {**BASE, "optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "eval_n": 20}
    toml = tmp_path / "tiny.toml"
    lines = []
    for k, v in settings.items():
        lines.append(f"{k} = {json.dumps(v)}")
    toml.write_text("\n".join(lines) + "\n")
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(_free_port())}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "lipmargin",
        "train",
        "--config",
        str(toml),
        "--set",
        "seed=0",
        "--set",
        "loader=dataloader",
        "--out",
        str(out),
        "--data-dir",
        str(data_dir),
    ]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    single = tmp_path / "single"
    train(config_from_dict(settings), single, data_dir=data_dir, progress=False)
    m_ddp, b_ddp, cfg_ddp, t_ddp, _ = load_run(out)
    m_one, b_one, cfg_one, t_one, _ = load_run(single)
    assert cfg_ddp.loader == "dataloader"
    assert replace(cfg_ddp, loader=cfg_one.loader) == cfg_one
    for k, v in m_one.state_dict().items():
        torch.testing.assert_close(m_ddp.state_dict()[k], v, rtol=1e-4, atol=1e-5, msg=k)
    for k, v in b_one.state_dict().items():
        torch.testing.assert_close(b_ddp.state_dict()[k], v, rtol=1e-3, atol=1e-4, msg=k)
    # and the DDP run did move the weights (8 steps) the same way
    log = [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines()]
    log1 = [json.loads(ln) for ln in (single / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [4, 8]
    assert log[-1]["bound"] == pytest.approx(log1[-1]["bound"], rel=1e-4)
    # the logged loss and training accuracy are all-reduced over the ranks, not rank 0's shard
    for r, r1 in zip(log, log1, strict=True):
        assert r["loss"] == pytest.approx(r1["loss"], rel=1e-4)
        assert r["train_accuracy"] == pytest.approx(r1["train_accuracy"], abs=1e-9)
    # and only rank 0 prints the final record
    assert proc.stdout.count('"epoch": 2') == 1, proc.stdout


def test_run_checkpoint_round_trip_with_batch_norm(tmp_path, monkeypatch) -> None:
    """BatchNorm's 0-dim num_batches_tracked buffer goes into the fingerprint, and a saved run
    checkpoint of such a model loads back with the architecture check passing."""
    (tmp_path / "bn.py").write_text(
        "from torch import nn\n\n\ndef factory():\n"
        "    return nn.Sequential(nn.Conv2d(1, 2, 3, stride=2), nn.BatchNorm2d(2), nn.ReLU(),\n"
        "                         nn.Flatten(), nn.Linear(2 * 13 * 13, 10))\n"
    )
    monkeypatch.chdir(tmp_path)
    cfg = cfg_of(model=f"{tmp_path / 'bn.py'}:factory")
    model, shape = runs.build_model(cfg)
    model.eval()
    bound = runs.LipschitzBound(model, shape)
    path = tmp_path / "run" / "last.safetensors"
    runs.save_run_checkpoint(path, model, bound, None, {"config": cfg.to_dict()}, cfg)
    loaded, _, _, _, meta = load_run(path)
    x = torch.rand(3, 1, 28, 28)
    torch.testing.assert_close(loaded(x), model(x))
    assert len(meta["fingerprint"]) == 64


# --------------------------------------------------------------------------- weight averaging


def test_weight_averaging_saves_and_certifies_the_averaged_model(tmp_path, data_dir) -> None:
    """Issue 15: with ema_decay the checkpoint's model is the average (what load_run returns,
    what was evaluated and logged, with a guaranteed bound of its own), the training weights
    are kept apart for resume, and a resumed run equals a straight one."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    record = train(cfg_of(ema_decay=0.5), straight, data_dir=data_dir, progress=False)
    model, bound, _, tensors, _ = load_run(straight)
    training = {k[6:]: v for k, v in tensors.items() if k.startswith(runs.TRAINING_PREFIX)}
    assert set(training) == set(model.state_dict())
    assert any(not torch.equal(v, training[k]) for k, v in model.state_dict().items())
    assert bound.certified().value == record["bound"]
    x, y = load_dataset("mnist", "test", data_dir)
    report = evaluate(model, bound, batches(x[:50], y[:50], 500), [0.1])
    assert report.clean_accuracy == record["clean_accuracy"]
    assert report.median_radius == record["median_radius"]
    train(cfg_of(ema_decay=0.5, epochs=1), resumed, data_dir=data_dir, progress=False)
    train(cfg_of(ema_decay=0.5), resumed, resume=True, data_dir=data_dir, progress=False)
    a, b = _state(straight), _state(resumed)
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def test_weight_average_is_the_exponential_moving_average() -> None:
    from lipmargin.train import WeightAverage

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    avg = WeightAverage(model, 0.75, (1, 2, 2))
    w0 = model[1].weight.detach().clone()
    avg.update()  # the first update copies
    with torch.no_grad():
        model[1].weight.add_(1.0)
    avg.update()
    torch.testing.assert_close(avg.model[1].weight, 0.75 * w0 + 0.25 * (w0 + 1.0))


@pytest.mark.parametrize("bad", [-0.1, 1.0, 2, True, "0.9"])
def test_ema_decay_validated(bad) -> None:
    with pytest.raises(ConfigError, match="ema_decay"):
        cfg_of(ema_decay=bad)
