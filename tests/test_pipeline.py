"""The data pipeline (issue 17): index order, DataLoader against the in-memory path, augmentation,
the npz and image-folder sources, and training through each of them (CPU, small files)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fakedata import write_fake_mnist
from lipmargin import runs
from lipmargin.cli import main
from lipmargin.config import config_from_dict, load_config
from lipmargin.data import (
    ImageFolderDataset,
    TensorPairDataset,
    augment_batch,
    dataset_info,
    epoch_batches,
    get_dataset,
    load_dataset,
    make_loader,
)
from lipmargin.errors import ConfigError, DataError, RunFolderError
from lipmargin.train import train


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_fake_mnist(tmp_path_factory.mktemp("data"), n_train=120, n_test=40)


BASE = {"name": "p", "epochs": 1, "batch_size": 20, "eval_n": 20, "lr": 3e-3, "c": 0.5}
BASE.update({"eval_eps": 0.1, "device": "cpu"})


# --------------------------------------------------------------------------- index order


def test_epoch_order_is_the_seeded_permutation() -> None:
    """One process: torch.randperm(n) from a generator seeded with seed + epoch, in batches."""
    got = torch.cat([torch.tensor(b) for b in epoch_batches(23, 5, seed=7, epoch=3)])
    want = torch.randperm(23, generator=torch.Generator().manual_seed(10))
    assert torch.equal(got, want)
    assert [len(b) for b in epoch_batches(23, 5, seed=7, epoch=3)] == [5, 5, 5, 5, 3]


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_together_read_the_single_process_batches(world) -> None:
    """DistributedSampler order: batch i of all ranks together is batch i of one process."""
    single = list(epoch_batches(40, 8, seed=1, epoch=2))
    per_rank = [
        list(epoch_batches(40, 8, seed=1, epoch=2, rank=r, world=world)) for r in range(world)
    ]
    for i, batch in enumerate(single):
        union = sorted(j for r in range(world) for j in per_rank[r][i])
        assert union == sorted(batch)


def test_batch_size_must_divide_by_world() -> None:
    with pytest.raises(DataError, match="multiple"):
        epoch_batches(40, 7, seed=0, epoch=0, world=2)


@pytest.mark.parametrize("workers", [0, 1])
def test_dataloader_gives_the_in_memory_batches(workers) -> None:
    """The same seed gives the same batches (and the same augmentation) on both paths."""
    x, y = torch.rand(37, 1, 6, 6), torch.randint(0, 10, (37,))
    ds = TensorPairDataset(x, y)
    memory = [ds[idx] for idx in epoch_batches(37, 8, seed=3, epoch=1)]
    loader = make_loader(ds, epoch_batches(37, 8, seed=3, epoch=1), num_workers=workers)
    through = list(loader)
    assert len(through) == len(memory) == 5
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    for (xa, ya), (xb, yb) in zip(memory, through, strict=True):
        assert torch.equal(ya, yb)
        assert torch.equal(augment_batch(xa, "crop-flip", g1), augment_batch(xb, "crop-flip", g2))


def test_training_through_dataloader_equals_in_memory(tmp_path, data_dir) -> None:
    """Same seed: the DataLoader path (worker process) trains bit-identical weights."""
    out = {}
    for loader, workers in (("memory", 0), ("dataloader", 1)):
        cfg = config_from_dict(
            {**BASE, "loader": loader, "num_workers": workers, "augment": "shift"}
        )
        train(cfg, tmp_path / loader, data_dir=data_dir, progress=False)
        out[loader] = runs.load_run(tmp_path / loader, device="cpu")[0].state_dict()
    for k, v in out["memory"].items():
        assert torch.equal(v, out["dataloader"][k]), k


# --------------------------------------------------------------------------- augmentation


def _reference(x: torch.Tensor, kind: str, gen: torch.Generator) -> torch.Tensor:
    pad = 2 if kind == "shift" else 4
    n, _, h, w = x.shape
    off = torch.randint(0, 2 * pad + 1, (2, n), generator=gen)
    flip = torch.rand(n, generator=gen) < 0.5 if kind == "crop-flip" else torch.zeros(n, dtype=bool)
    xp = torch.nn.functional.pad(x, (pad,) * 4)
    out = []
    for i in range(n):
        crop = xp[i, :, off[0, i] : off[0, i] + h, off[1, i] : off[1, i] + w]
        out.append(crop.flip(-1) if flip[i] else crop)
    return torch.stack(out)


@pytest.mark.parametrize("kind", ["shift", "crop", "crop-flip"])
def test_augment_batch_against_a_loop(kind) -> None:
    x = torch.rand(16, 3, 9, 7)
    got = augment_batch(x, kind, torch.Generator().manual_seed(5))
    want = _reference(x, kind, torch.Generator().manual_seed(5))
    assert got.shape == x.shape
    assert torch.equal(got, want)


def test_augment_none_and_refusals() -> None:
    x = torch.rand(4, 1, 5, 5)
    assert augment_batch(x, "none", torch.Generator()) is x
    with pytest.raises(DataError, match="image batches"):
        augment_batch(torch.rand(4, 10), "shift", torch.Generator())
    with pytest.raises(DataError, match="augment"):
        augment_batch(x, "rotate", torch.Generator())


def test_crop_flip_does_flip_and_shift() -> None:
    x = torch.arange(36.0).view(1, 1, 6, 6).repeat(64, 1, 1, 1)
    out = augment_batch(x, "crop-flip", torch.Generator().manual_seed(0))
    flipped = sum(bool(torch.equal(o[0], x[0, 0].flip(-1))) for o in out)
    same = sum(bool(torch.equal(o[0], x[0, 0])) for o in out)
    assert flipped > 0 and same > 0
    assert sum(bool((o[0] == 0).any()) for o in out) > 32  # most are shifted (zero border)


# --------------------------------------------------------------------------- npz source


def _write_npz(path: Path, n: int = 60, layout: str = "nhwc", seed: int = 0, **extra) -> None:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = rng.integers(0, 50, (n, 16, 16, 3)).astype(np.uint8)
    for i, k in enumerate(y):
        x[i, 4 * k : 4 * k + 4, :, k] = 250  # class k: a bright band in channel k
    if layout == "nchw":
        x = x.transpose(0, 3, 1, 2)
    np.savez(path, x=x, y=y, **extra)


def test_npz_source(tmp_path) -> None:
    _write_npz(tmp_path / "d.npz")
    spec = f"npz:{tmp_path / 'd.npz'}"
    info = dataset_info(spec)
    assert info["shape"] == (3, 16, 16) and info["num_classes"] == 3
    x, y = load_dataset(spec, "test")
    raw = np.load(tmp_path / "d.npz")
    assert x.shape == (60, 3, 16, 16) and x.dtype == torch.float32
    torch.testing.assert_close(x, torch.from_numpy(raw["x"].transpose(0, 3, 1, 2) / 255.0).float())
    assert torch.equal(y, torch.from_numpy(raw["y"]).long())
    # NCHW, per-split arrays, {split} in the path
    _write_npz(tmp_path / "c.npz", layout="nchw")
    assert torch.equal(load_dataset(f"npz:{tmp_path / 'c.npz'}", "train")[0], x)
    np.savez(tmp_path / "s.npz", x_train=raw["x"][:40], y_train=raw["y"][:40],
             x_test=raw["x"][40:], y_test=raw["y"][40:], num_classes=5)  # fmt: skip
    assert load_dataset(f"npz:{tmp_path / 's.npz'}", "test")[0].shape[0] == 20
    assert dataset_info(f"npz:{tmp_path / 's.npz'}")["num_classes"] == 5
    _write_npz(tmp_path / "train.npz", n=30)
    _write_npz(tmp_path / "test.npz", n=10, seed=1)
    assert load_dataset(f"npz:{tmp_path}/{{split}}.npz", "test")[0].shape[0] == 10


def test_npz_errors(tmp_path) -> None:
    with pytest.raises(DataError, match="not found"):
        load_dataset(f"npz:{tmp_path / 'none.npz'}", "train")
    np.savez(tmp_path / "k.npz", images=np.zeros((2, 1, 4, 4)))
    with pytest.raises(DataError, match="expected arrays"):
        load_dataset(f"npz:{tmp_path / 'k.npz'}", "train")
    np.savez(tmp_path / "f.npz", x=np.full((2, 1, 4, 4), 3.0), y=np.array([0, 1]))
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        load_dataset(f"npz:{tmp_path / 'f.npz'}", "train")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="cannot read"):
        load_dataset(f"npz:{tmp_path / 'bad.npz'}", "train")


# --------------------------------------------------------------------------- image folders


def _write_folder(root: Path, mode: str = "RGB", size: tuple[int, int] = (16, 16)) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 3)):
        for k, cls in enumerate(("cat", "dog")):
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
                arr = rng.integers(0, 256, shape).astype(np.uint8)
                arr[..., k * 4 : k * 4 + 4] = 255
                suffix = ".png" if i % 2 else ".jpg"
                Image.fromarray(arr, mode).save(root / split / cls / f"{i}{suffix}")
    return root


def test_image_folder_source(tmp_path) -> None:
    from PIL import Image

    root = _write_folder(tmp_path / "imgs")
    spec = f"folder:{root}"
    info = dataset_info(spec)
    assert info["shape"] == (3, 16, 16) and info["num_classes"] == 2
    x, y = load_dataset(spec, "train")
    assert x.shape == (12, 3, 16, 16) and y.tolist() == [0] * 6 + [1] * 6
    first = sorted((root / "train" / "cat").iterdir())[0]
    want = np.asarray(Image.open(first).convert("RGB")).transpose(2, 0, 1) / 255.0
    torch.testing.assert_close(x[0], torch.from_numpy(want).float())
    lazy = ImageFolderDataset(root, "test")
    assert lazy.classes == ("cat", "dog") and len(lazy) == 6
    xt, yt = load_dataset(spec, "test")
    xi, yi = lazy[3]
    assert torch.equal(xi, xt[3]) and int(yi) == int(yt[3])
    assert torch.equal(lazy[[0, 5]][0], xt[[0, 5]])
    # a lazy Dataset through a DataLoader gives the in-memory batches
    batches = list(make_loader(lazy, epoch_batches(6, 4, seed=0, epoch=0)))
    memory = [(xt[i], yt[i]) for i in epoch_batches(6, 4, seed=0, epoch=0)]
    for (a, b), (c, d) in zip(batches, memory, strict=True):
        assert torch.equal(a, c) and torch.equal(b, d)
    assert isinstance(get_dataset(spec, "train", lazy=True), ImageFolderDataset)


def test_greyscale_folder_without_splits(tmp_path) -> None:
    root = _write_folder(tmp_path / "g", mode="L")
    flat = tmp_path / "flat"
    (root / "train").rename(flat)
    x, y = load_dataset(f"folder:{flat}", "test")  # no split folders: every split is the tree
    assert x.shape == (12, 1, 16, 16)


def test_image_folder_errors(tmp_path) -> None:
    from PIL import Image

    root = _write_folder(tmp_path / "e")
    Image.fromarray(np.zeros((10, 16, 3), np.uint8)).save(root / "test" / "dog" / "odd.png")
    with pytest.raises(DataError, match="resize"):
        load_dataset(f"folder:{root}", "test")
    (root / "test" / "bird").mkdir()
    with pytest.raises(DataError, match="not among the train classes"):
        load_dataset(f"folder:{root}", "test")
    with pytest.raises(DataError, match="not found"):
        load_dataset(f"folder:{tmp_path / 'missing'}", "train")
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="no .png"):
        load_dataset(f"folder:{tmp_path / 'empty'}", "train")


# --------------------------------------------------------------------------- training on them


def test_train_and_certify_on_npz_with_crop_flip(tmp_path, monkeypatch, capsys) -> None:
    _write_npz(tmp_path / "d.npz", n=80)
    monkeypatch.chdir(tmp_path)
    cfg = config_from_dict(
        {**BASE, "dataset": "npz:d.npz", "augment": "crop-flip", "loader": "dataloader"}
    )
    record = train(cfg, tmp_path / "run", progress=False)
    assert record["epoch"] == 1 and math_finite(record["loss"])
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["dataset"] == f"npz:{tmp_path / 'd.npz'}"  # absolute: found from anywhere
    monkeypatch.chdir("/")
    code = main(["certify", str(tmp_path / "run"), "--device", "cpu", "--n", "20"])
    assert code == 0, capsys.readouterr().err
    assert "certified" in capsys.readouterr().out


def test_train_on_image_folder_reads_lazily(tmp_path, monkeypatch) -> None:
    root = _write_folder(tmp_path / "imgs")
    read = []
    original = ImageFolderDataset._image

    def spy(self, i):
        read.append(i)
        return original(self, i)

    monkeypatch.setattr(ImageFolderDataset, "_image", spy)
    cfg = config_from_dict({**BASE, "dataset": f"folder:{root}", "batch_size": 4, "eval_n": 6})
    record = train(cfg, tmp_path / "run", progress=False)  # loader auto: DataLoader for folders
    assert record["epoch"] == 1
    assert len(read) >= 12  # the 12 training images went through ImageFolderDataset


def math_finite(v: float) -> bool:
    return v == v and abs(v) != float("inf")


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "overrides",
    [
        ['augment="rotate"'],
        ["augment=1"],
        ['loader="fast"'],
        ['amp="fp8"'],
        ["num_workers=-1"],
        ['num_workers="2"'],
        ["num_workers=1.5"],
        ['sync_batchnorm="yes"'],
        ['device="tpu"'],
    ],
)
def test_pipeline_config_is_validated(overrides) -> None:
    with pytest.raises(ConfigError):
        load_config(None, overrides)


def test_resume_may_change_loader_and_workers_not_augmentation(tmp_path, data_dir) -> None:
    cfg = config_from_dict(BASE)
    train(cfg, tmp_path / "r", data_dir=data_dir, progress=False)
    with pytest.raises(RunFolderError, match="augment"):
        train(config_from_dict({**BASE, "epochs": 2, "augment": "shift"}), tmp_path / "r",
              resume=True, data_dir=data_dir, progress=False)  # fmt: skip
    more = {**BASE, "epochs": 2, "loader": "dataloader", "num_workers": 0}
    record = train(config_from_dict(more), tmp_path / "r", resume=True, data_dir=data_dir,
                   progress=False)  # fmt: skip
    assert record["epoch"] == 2


def test_data_info_reads_an_npz(tmp_path, capsys) -> None:
    _write_npz(tmp_path / "d.npz", n=12)
    assert main(["data", "info", f"npz:{tmp_path / 'd.npz'}"]) == 0
    out = capsys.readouterr().out
    assert "x (12, 3, 16, 16)" in out and "3 classes" in out
