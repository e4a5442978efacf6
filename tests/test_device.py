"""Device plumbing (issue 17) without a GPU: the device argument reaches every command, the
bound's vectors follow the model, torchrun's LOCAL_RANK picks the GPU, mixed precision keeps the
bound in float32, and the GPU smoke script skips cleanly here."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
from torch import nn

from fakedata import write_fake_mnist
from lipmargin import cli, runs
from lipmargin import train as train_module
from lipmargin.bounds import LipschitzBound, observer
from lipmargin.certify import certify
from lipmargin.config import config_from_dict
from lipmargin.errors import ConfigError, InputError
from lipmargin.train import sync_batchnorm_view, train

REPO = Path(__file__).resolve().parents[1]
BASE = {"name": "d", "epochs": 1, "batch_size": 20, "eval_n": 20, "lr": 3e-3, "c": 0.5}
BASE.update({"eval_eps": 0.1, "train_subset": 60})


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_fake_mnist(tmp_path_factory.mktemp("data"), n_train=60, n_test=30)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, data_dir) -> Path:
    run = tmp_path_factory.mktemp("run")
    train(config_from_dict(BASE), run, data_dir=data_dir, progress=False)
    return run


def _small() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 8 * 8, 10))  # fmt: skip


# --------------------------------------------------------------------------- resolving


def test_resolve_device(monkeypatch) -> None:
    assert runs.resolve_device("auto") == torch.device(
        "cuda" if torch.cuda.is_available() else "cpu"
    )
    assert runs.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="device must be"):
        runs.resolve_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert runs.resolve_device(None) == torch.device("cuda")  # auto picks the GPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match="1 CUDA device"):
        runs.resolve_device("cuda:3")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a CPU-only build")
@pytest.mark.parametrize("command", ["certify", "audit", "analyze"])
def test_cuda_on_a_cpu_build_is_one_line(command, run_dir, data_dir, capsys) -> None:
    code = cli.main([command, str(run_dir), "--device", "cuda", "--data-dir", str(data_dir)])
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no usable CUDA" in err


@pytest.mark.parametrize(
    "argv",
    [
        ["certify", "{run}", "--n", "10"],
        ["audit", "{run}", "--n", "10", "--no-cw", "--pgd-steps", "2"],
        ["analyze", "{run}", "--n", "10"],
        ["report", "{run}", "--out", "{tmp}/rep", "--n", "10", "--analyze-n", "0"],
    ],
)
def test_device_option_reaches_the_model_and_every_batch(
    argv, run_dir, data_dir, tmp_path, monkeypatch
) -> None:
    """--device goes to load_run, and every input the model sees is on the model's device."""
    asked: list[str] = []
    seen: list[tuple[torch.device, torch.device]] = []
    real_load = runs.load_run

    def load(path, *, device="auto"):
        asked.append(str(device))
        out = real_load(path, device=device)
        out[0].register_forward_pre_hook(
            observer(lambda m, a: seen.append((a[0].device, next(m.parameters()).device)))
        )
        return out

    monkeypatch.setattr(runs, "load_run", load)
    args = [a.format(run=run_dir, tmp=tmp_path) for a in argv]
    assert cli.main([*args, "--device", "cpu", "--data-dir", str(data_dir), "--quiet"]) in (0, 1)
    assert asked == ["cpu"]
    assert seen and all(a == b for a, b in seen)


def test_certify_refuses_amp(run_dir, data_dir, capsys) -> None:
    code = cli.main(["certify", str(run_dir), "--amp", "bf16", "--data-dir", str(data_dir)])
    assert code == 2
    assert "float32" in capsys.readouterr().err


def test_train_device_and_amp_options_set_the_config(tmp_path, data_dir, monkeypatch) -> None:
    got = {}
    monkeypatch.setattr(train_module, "train", lambda cfg, run, **kw: got.update(cfg=cfg) or {})
    argv = ["train", "--out", str(tmp_path / "r"), "--device", "cpu", "--amp", "bf16"]
    assert cli.main(argv) == 0
    assert got["cfg"].device == "cpu" and got["cfg"].amp == "bf16"


# --------------------------------------------------------------------------- bound vs model


def test_bound_vectors_on_another_device_are_refused() -> None:
    """A bound whose vectors stayed behind when the model moved (here: moved to the meta
    device, shape only) is refused with both devices named; bound.to(device) fixes it."""
    model = _small().eval()
    bound = LipschitzBound(model, (1, 8, 8))
    runs.check_same_device(model, bound)
    bound.to("meta")
    with pytest.raises(InputError, match=r"on meta but the model is on cpu.*bound\.to\('cpu'\)"):
        runs.check_same_device(model, bound)
    bound.to_empty(device="cpu")
    runs.check_same_device(model, bound)


def test_load_run_puts_model_and_bound_on_the_device(run_dir) -> None:
    model, bound, _, _, _ = runs.load_run(run_dir, device="cpu")
    assert {b.device.type for b in bound.buffers()} == {"cpu"}
    assert runs.model_device(model) == torch.device("cpu")


# --------------------------------------------------------------------------- torchrun


def test_local_rank_picks_the_gpu_and_nccl(monkeypatch) -> None:
    """Under torchrun with CUDA, rank r uses cuda:LOCAL_RANK (set_device) and nccl (faked: no
    process group is started)."""
    calls = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.setdefault("set", d))
    monkeypatch.setattr(train_module.dist, "is_initialized", lambda: "init" in calls)
    monkeypatch.setattr(
        train_module.dist, "init_process_group", lambda b: calls.setdefault("init", b)
    )
    monkeypatch.setattr(train_module.dist, "get_rank", lambda: 1)
    rank, world, device = train_module._distributed(torch.device("cuda"))
    assert (rank, world, device) == (1, 2, torch.device("cuda", 1))
    assert calls == {"set": torch.device("cuda", 1), "init": "nccl"}
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(ConfigError, match="LOCAL_RANK 2"):
        train_module._distributed(torch.device("cuda"))


def test_cpu_ranks_use_gloo(monkeypatch) -> None:
    calls = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(train_module.dist, "is_initialized", lambda: "init" in calls)
    monkeypatch.setattr(
        train_module.dist, "init_process_group", lambda b: calls.setdefault("init", b)
    )
    monkeypatch.setattr(train_module.dist, "get_rank", lambda: 0)
    assert train_module._distributed(torch.device("cpu"))[2] == torch.device("cpu")
    assert calls == {"init": "gloo"}


def test_sync_batchnorm_view_shares_the_weights() -> None:
    model = _small()
    view = sync_batchnorm_view(model)
    assert isinstance(view[1], nn.SyncBatchNorm) and type(model[1]) is nn.BatchNorm2d
    assert view[1].weight is model[1].weight and view[1].running_var is model[1].running_var
    assert view[0].weight is model[0].weight
    x = torch.rand(3, 1, 8, 8)
    model.eval(), view.eval()
    torch.testing.assert_close(view(x), model(x))


def test_sync_batchnorm_on_cpu_ranks_is_refused(tmp_path, data_dir, monkeypatch) -> None:
    monkeypatch.setattr(train_module, "_distributed", lambda d: (0, 2, torch.device("cpu")))
    cfg = config_from_dict({**BASE, "sync_batchnorm": True})
    with pytest.raises(ConfigError, match="CUDA"):
        train(cfg, tmp_path / "r", data_dir=data_dir, progress=False)


# --------------------------------------------------------------------------- mixed precision


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_training_keeps_the_bound_in_float32(amp, tmp_path, data_dir, monkeypatch) -> None:
    dtypes = []
    real_loss = train_module.lmt_loss

    def spy(logits, y, k, c, **kw):
        dtypes.append((logits.dtype, k.dtype, torch.is_autocast_enabled("cpu")))
        return real_loss(logits, y, k, c, **kw)

    monkeypatch.setattr(train_module, "lmt_loss", spy)
    cfg = config_from_dict({**BASE, "amp": amp})
    record = train(cfg, tmp_path / amp, data_dir=data_dir, progress=False)
    assert record["bound"] > 0 and record["loss"] == record["loss"]
    assert set(dtypes) == {(torch.float32, torch.float32, False)}
    model, bound, _, _, _ = runs.load_run(tmp_path / amp, device="cpu")
    assert {t.dtype for t in [*model.parameters(), *bound.buffers()]} == {torch.float32}


def test_certify_refuses_autocast_and_half_inputs() -> None:
    model = _small().eval()
    bound = LipschitzBound(model, (1, 8, 8))
    x, y = torch.rand(4, 1, 8, 8), torch.randint(0, 10, (4,))
    with pytest.raises(InputError, match="autocast"), torch.autocast("cpu", dtype=torch.bfloat16):
        certify(model, x, y, bound)
    with pytest.raises(InputError, match="bfloat16"):
        certify(model, x.bfloat16(), y, bound)


# --------------------------------------------------------------------------- GPU smoke script


def test_gpu_check_skips_without_cuda(tmp_path) -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the script would really run")
    env = {**os.environ, "PYTHON": str(Path(os.sys.executable))}
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu_check.sh")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA device, skipped" in proc.stdout


def test_batch_size_not_divisible_by_ranks_is_refused(tmp_path, data_dir, monkeypatch) -> None:
    from lipmargin.errors import DataError

    monkeypatch.setattr(train_module, "_distributed", lambda d: (0, 3, torch.device("cpu")))
    with pytest.raises(DataError, match="multiple of the number of processes"):
        train(config_from_dict(BASE), tmp_path / "r", data_dir=data_dir, progress=False)
    assert not (tmp_path / "r" / "config.json").exists()  # refused before writing anything
