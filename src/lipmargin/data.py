"""Offline readers for the datasets lipmargin trains and certifies on.

Nothing here downloads anything: the files must already be on disk under
``<data_dir>/<name>/``.  MNIST and Fashion-MNIST can be obtained with
``lipmargin data fetch`` (see :mod:`lipmargin.fetch`); CIFAR-10 and SVHN have to be downloaded
by the user from their official sites.

Every loader returns the whole split in memory as ``(x, y)``: ``x`` a float32 tensor of shape
``(N, C, H, W)`` with values in ``[0, 1]`` and ``y`` an int64 tensor of shape ``(N,)``.
A missing, truncated or corrupt file raises :class:`lipmargin.errors.DataError` with a message
that says what was expected where.
"""

from __future__ import annotations

import gzip
import importlib
import math
import os
import pickle
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lipmargin.errors import DataError

__all__ = [
    "DATASETS",
    "IDX_FILES",
    "dataset_info",
    "default_data_dir",
    "find_idx_file",
    "load_dataset",
    "parse_idx",
    "read_idx",
    "read_idx_header",
]

DATASETS: tuple[str, ...] = ("mnist", "fashion-mnist", "cifar10", "svhn")

#: The (images, labels) IDX files of each split of MNIST and Fashion-MNIST.
IDX_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

_CIFAR_FILES: dict[str, tuple[str, ...]] = {
    "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
    "test": ("test_batch",),
}
_CIFAR_SUBDIR = "cifar-10-batches-py"

_SVHN_FILES: dict[str, str] = {
    "train": "train_32x32.mat",
    "test": "test_32x32.mat",
    "extra": "extra_32x32.mat",
}

_MNIST_RADII = [0.5, 1.0, 1.58, 2.0]
_COLOR_RADII = [36 / 255, 72 / 255, 108 / 255]

_INFO: dict[str, dict[str, Any]] = {
    "mnist": {
        "shape": (1, 28, 28),
        "num_classes": 10,
        "radii": _MNIST_RADII,
        "splits": ("train", "test"),
    },
    "fashion-mnist": {
        "shape": (1, 28, 28),
        "num_classes": 10,
        "radii": _MNIST_RADII,
        "splits": ("train", "test"),
    },
    "cifar10": {
        "shape": (3, 32, 32),
        "num_classes": 10,
        "radii": _COLOR_RADII,
        "splits": ("train", "test"),
    },
    "svhn": {
        "shape": (3, 32, 32),
        "num_classes": 10,
        "radii": _COLOR_RADII,
        "splits": ("train", "test", "extra"),
    },
}

_PRETTY = {
    "mnist": "MNIST",
    "fashion-mnist": "Fashion-MNIST",
    "cifar10": "CIFAR-10",
    "svhn": "SVHN",
}


# --------------------------------------------------------------------------------------------
# Public helpers
# --------------------------------------------------------------------------------------------


def default_data_dir() -> Path:
    """Return ``$LIPMARGIN_DATA_DIR`` if set and non-empty, else ``./data`` (relative)."""
    env = os.environ.get("LIPMARGIN_DATA_DIR")
    return Path(env) if env else Path("data")


def _canonical_name(name: str) -> str:
    key = str(name).strip().lower().replace("_", "-")
    aliases = {"fmnist": "fashion-mnist", "fashionmnist": "fashion-mnist", "cifar-10": "cifar10"}
    key = aliases.get(key, key)
    if key not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    return key


def dataset_info(name: str) -> dict[str, Any]:
    """Describe a dataset.

    Returns a new dict with ``name``, ``shape`` (C, H, W), ``num_classes``, ``radii`` (the
    default L2 certification radii, in the [0, 1] pixel scale) and ``splits``.
    """
    key = _canonical_name(name)
    info = _INFO[key]
    return {
        "name": key,
        "shape": tuple(info["shape"]),
        "num_classes": int(info["num_classes"]),
        "radii": list(info["radii"]),
        "splits": tuple(info["splits"]),
    }


def load_dataset(
    name: str, split: str = "train", data_dir: str | os.PathLike[str] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load a whole dataset split into memory.

    Args:
        name: one of :data:`DATASETS`.
        split: ``"train"`` or ``"test"`` (SVHN also has ``"extra"``).
        data_dir: the folder holding ``<name>/``; defaults to :func:`default_data_dir`.

    Returns:
        ``(x, y)``: float32 images ``(N, C, H, W)`` in ``[0, 1]`` and int64 labels ``(N,)``.

    Raises:
        DataError: unknown name or split, missing, truncated or corrupt files.
    """
    key = _canonical_name(name)
    splits = _INFO[key]["splits"]
    if split not in splits:
        raise DataError(
            f"{_PRETTY[key]} has no split {split!r}; available splits: {', '.join(splits)}"
        )
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    directory = root / key
    if key in ("mnist", "fashion-mnist"):
        images, labels = _load_idx_split(key, split, directory, root)
    elif key == "cifar10":
        images, labels = _load_cifar_split(split, directory)
    else:
        images, labels = _load_svhn_split(split, directory)
    return _to_tensors(images, labels)


def _to_tensors(images: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 NCHW -> float32 in [0, 1]; labels -> int64 (both freshly allocated, writable)."""
    x = images.astype(np.float32, order="C")  # one copy, also for transposed views
    np.divide(x, np.float32(255.0), out=x)
    y = np.array(labels, dtype=np.int64, order="C", copy=True)
    return torch.from_numpy(x), torch.from_numpy(y)


# --------------------------------------------------------------------------------------------
# IDX (MNIST, Fashion-MNIST)
# --------------------------------------------------------------------------------------------

# IDX type byte -> big-endian numpy dtype
_IDX_DTYPES: dict[int, str] = {
    0x08: "u1",
    0x09: "i1",
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}


def find_idx_file(directory: str | os.PathLike[str], base: str) -> Path | None:
    """Return ``directory/base`` if it exists, else ``directory/base.gz``, else ``None``.

    The uncompressed file wins when both exist.
    """
    directory = Path(directory)
    for candidate in (directory / base, directory / f"{base}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _read_bytes(path: Path, limit: int | None = None) -> bytes:
    """Read a file (transparently gunzipping ``*.gz``); at most ``limit`` bytes when given."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read() if limit is None else f.read(limit)
        with open(path, "rb") as f:
            return f.read() if limit is None else f.read(limit)
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        raise DataError(f"cannot read {path}: {exc} (the file is corrupt or truncated)") from exc


def _parse_idx_header(head: bytes, source: str) -> tuple[np.dtype, tuple[int, ...], int]:
    if len(head) < 4:
        raise DataError(f"{source}: truncated IDX file ({len(head)} bytes, no header)")
    if head[0] != 0 or head[1] != 0 or head[2] not in _IDX_DTYPES:
        magic = int.from_bytes(head[:4], "big")
        raise DataError(
            f"{source}: not an IDX file (bad magic number 0x{magic:08x}); "
            "the file is corrupt or not the expected dataset file"
        )
    ndim = head[3]
    offset = 4 + 4 * ndim
    if len(head) < offset:
        raise DataError(f"{source}: truncated IDX file (header cut short)")
    dims = tuple(int(d) for d in np.frombuffer(head, dtype=">u4", count=ndim, offset=4))
    return np.dtype(_IDX_DTYPES[head[2]]), dims, offset


def parse_idx(data: bytes, source: str = "<bytes>") -> np.ndarray:
    """Parse the bytes of an IDX file into an array of the shape its header declares.

    The result is a read-only view into ``data`` (no copy). ``source`` names the file in errors.

    Raises:
        DataError: bad magic number, or a byte length that does not match the header.
    """
    dtype, dims, offset = _parse_idx_header(data, source)
    count = math.prod(dims)  # Python ints: no overflow on absurd headers
    expected = offset + count * dtype.itemsize
    if len(data) < expected:
        raise DataError(
            f"{source}: truncated IDX file: header declares shape {dims} "
            f"({expected} bytes) but the file has {len(data)} bytes"
        )
    if len(data) > expected:
        raise DataError(
            f"{source}: corrupt IDX file: {len(data) - expected} unexpected trailing bytes "
            f"after the data of shape {dims}"
        )
    return np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(dims)


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a raw or gzipped (``*.gz``) IDX file into a numpy array (see :func:`parse_idx`)."""
    path = Path(path)
    return parse_idx(_read_bytes(path), str(path))


def read_idx_header(path: str | os.PathLike[str]) -> tuple[np.dtype, tuple[int, ...]]:
    """Read only the header of a raw or gzipped IDX file: ``(dtype, dims)``."""
    path = Path(path)
    head = _read_bytes(path, limit=4 + 4 * 255)
    dtype, dims, _ = _parse_idx_header(head, str(path))
    return dtype, dims


def _missing_message(key: str, directory: Path, missing: list[str], how: str) -> str:
    files = ", ".join(missing)
    return f"{_PRETTY[key]} data not found: missing {files} in {directory.resolve()}. {how}"


def _load_idx_split(
    key: str, split: str, directory: Path, root: Path
) -> tuple[np.ndarray, np.ndarray]:
    image_base, label_base = IDX_FILES[split]
    image_path = find_idx_file(directory, image_base)
    label_path = find_idx_file(directory, label_base)
    missing = [
        f"{base} (or {base}.gz)"
        for base, path in ((image_base, image_path), (label_base, label_path))
        if path is None
    ]
    if missing or image_path is None or label_path is None:
        how = (
            f"Run `lipmargin data fetch --data-dir {root}` to obtain MNIST and Fashion-MNIST "
            "(or place the four IDX files there yourself)."
        )
        raise DataError(_missing_message(key, directory, missing, how))

    images = read_idx(image_path)
    labels = read_idx(label_path)
    if images.dtype != np.uint8 or images.ndim != 3:
        raise DataError(
            f"{image_path}: expected uint8 images of shape (N, H, W), "
            f"got {images.dtype} of shape {images.shape}"
        )
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise DataError(
            f"{label_path}: expected uint8 labels of shape (N,), "
            f"got {labels.dtype} of shape {labels.shape}"
        )
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{_PRETTY[key]} {split}: {images.shape[0]} images in {image_path.name} but "
            f"{labels.shape[0]} labels in {label_path.name}"
        )
    _check_labels(labels, 10, str(label_path))
    return images[:, None, :, :], labels


def _check_labels(labels: np.ndarray, num_classes: int, source: str) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(
            f"{source}: labels must lie in [0, {num_classes - 1}], "
            f"found values in [{labels.min()}, {labels.max()}]"
        )


# --------------------------------------------------------------------------------------------
# CIFAR-10 (python pickle batches)
# --------------------------------------------------------------------------------------------


def _numpy_attr(modules: tuple[str, ...], name: str) -> Any:
    for module in modules:
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
    raise DataError(f"this numpy version lacks {name}")  # pragma: no cover


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """Stand-in for ``_codecs.encode`` (Python 3 pickles of bytes at protocol < 3)."""
    if not isinstance(text, str) or encoding.lower().replace("-", "") != "latin1":
        raise DataError("refusing pickle: unexpected use of _codecs.encode")
    return text.encode("latin1")


# (module, name) -> a zero-argument resolver of the object to hand to the unpickler.
_MULTIARRAY = ("numpy._core.multiarray", "numpy.core.multiarray")
_NUMERIC = ("numpy._core.numeric", "numpy.core.numeric")
_ALLOWED_GLOBALS: dict[tuple[str, str], Callable[[], Any]] = {
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): lambda: _numpy_attr(_MULTIARRAY, "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"): lambda: _numpy_attr(_MULTIARRAY, "_reconstruct"),
    ("numpy.core.multiarray", "scalar"): lambda: _numpy_attr(_MULTIARRAY, "scalar"),
    ("numpy._core.multiarray", "scalar"): lambda: _numpy_attr(_MULTIARRAY, "scalar"),
    ("numpy.core.numeric", "_frombuffer"): lambda: _numpy_attr(_NUMERIC, "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"): lambda: _numpy_attr(_NUMERIC, "_frombuffer"),
    ("_codecs", "encode"): lambda: _latin1_encode,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays, dtypes and scalars; anything else is refused.

    CIFAR-10 batches are pickles, and unpickling an arbitrary file can run arbitrary code. Only
    the few numpy reconstruction functions an array pickle needs are resolvable here.
    """

    def find_class(self, module: str, name: str) -> Any:
        resolver = _ALLOWED_GLOBALS.get((module, name))
        if resolver is None:
            raise DataError(
                f"refusing to unpickle {module}.{name}: a CIFAR-10 batch may only contain "
                "numpy arrays, lists and plain values (the file is corrupt or not a CIFAR-10 batch)"
            )
        return resolver()

    def persistent_load(self, pid: Any) -> Any:
        raise DataError("refusing pickle with persistent ids (not a CIFAR-10 batch)")


def _restricted_load(path: Path) -> Any:
    try:
        with open(path, "rb") as f:
            return _RestrictedUnpickler(f, encoding="bytes").load()
    except DataError as exc:
        raise DataError(f"{path}: {exc}") from exc
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
        KeyError,
        MemoryError,
        RecursionError,
        OSError,
    ) as exc:
        raise DataError(
            f"{path}: cannot read CIFAR-10 batch ({exc}); corrupt or truncated"
        ) from exc


def _cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    obj = _restricted_load(path)
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a dict, got {type(obj).__name__}")

    def get(key: str) -> Any:
        for k in (key.encode(), key):
            if k in obj:
                return obj[k]
        raise DataError(f"{path}: CIFAR-10 batch has no {key!r} entry")

    data = get("data")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8:
        raise DataError(f"{path}: 'data' must be a uint8 numpy array")
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: 'data' must have shape (N, 3072), got {data.shape}")
    raw_labels = get("labels")
    try:
        labels = np.asarray(raw_labels)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{path}: 'labels' is not a list of integers") from exc
    if labels.ndim != 1 or (labels.size and not np.issubdtype(labels.dtype, np.integer)):
        raise DataError(f"{path}: 'labels' must be a flat list of integers")
    if labels.shape[0] != data.shape[0]:
        raise DataError(f"{path}: {data.shape[0]} images but {labels.shape[0]} labels")
    labels = labels.astype(np.int64)
    _check_labels(labels, 10, str(path))
    return data.reshape(-1, 3, 32, 32), labels


def _load_cifar_split(split: str, directory: Path) -> tuple[np.ndarray, np.ndarray]:
    names = _CIFAR_FILES[split]
    candidates = (directory, directory / _CIFAR_SUBDIR)
    folder = next((d for d in candidates if all((d / n).is_file() for n in names)), None)
    if folder is None:
        missing = [n for n in names if not (directory / n).is_file()]
        how = (
            "Download the CIFAR-10 python version (cifar-10-python.tar.gz) yourself from the "
            "official site https://www.cs.toronto.edu/~kriz/cifar.html and extract it there "
            f"(the files may also sit in {directory.resolve() / _CIFAR_SUBDIR})."
        )
        raise DataError(_missing_message("cifar10", directory, missing, how))
    parts = [_cifar_batch(folder / n) for n in names]
    images = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
    labels = np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
    return images, labels


# --------------------------------------------------------------------------------------------
# SVHN (MATLAB .mat files, cropped digits format)
# --------------------------------------------------------------------------------------------


def _load_svhn_split(split: str, directory: Path) -> tuple[np.ndarray, np.ndarray]:
    path = directory / _SVHN_FILES[split]
    if not path.is_file():
        how = (
            "Download the cropped-digits files (Format 2: train_32x32.mat, test_32x32.mat and "
            "optionally extra_32x32.mat) yourself from the official site "
            "http://ufldl.stanford.edu/housenumbers/ and place them there."
        )
        raise DataError(_missing_message("svhn", directory, [path.name], how))
    import scipy.io

    try:
        mat = scipy.io.loadmat(path, variable_names=["X", "y"])
    except Exception as exc:  # scipy raises many types (MatReadError, ValueError, OSError...)
        raise DataError(
            f"{path}: cannot read SVHN .mat file ({exc}); corrupt or truncated"
        ) from exc
    if "X" not in mat or "y" not in mat:
        raise DataError(f"{path}: SVHN .mat file must contain variables 'X' and 'y'")
    x, y = mat["X"], mat["y"]
    if not isinstance(x, np.ndarray) or x.ndim != 4 or x.shape[:3] != (32, 32, 3):
        raise DataError(f"{path}: 'X' must have shape (32, 32, 3, N), got {np.shape(x)}")
    if x.dtype != np.uint8:
        if not np.issubdtype(x.dtype, np.number) or x.size and (x.min() < 0 or x.max() > 255):
            raise DataError(f"{path}: 'X' must hold uint8 pixels, got {x.dtype}")
        x = x.astype(np.uint8)
    y = np.asarray(y).reshape(-1)
    if not np.issubdtype(y.dtype, np.number):
        raise DataError(f"{path}: 'y' must hold integer labels, got {y.dtype}")
    if y.shape[0] != x.shape[3]:
        raise DataError(f"{path}: {x.shape[3]} images but {y.shape[0]} labels")
    labels = y.astype(np.int64)
    labels[labels == 10] = 0  # SVHN stores digit 0 as label 10
    _check_labels(labels, 10, str(path))
    # (H, W, C, N) -> (N, C, H, W); a view, made contiguous by the float conversion
    return x.transpose(3, 2, 0, 1), labels
