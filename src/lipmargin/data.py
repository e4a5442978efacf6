"""Offline readers for the datasets lipmargin trains and certifies on.

Nothing here downloads anything: the files must already be on disk under
``<data_dir>/<name>/``.  MNIST and Fashion-MNIST can be obtained with
``lipmargin data fetch`` (see :mod:`lipmargin.fetch`); CIFAR-10 and SVHN have to be downloaded
by the user from their official sites.

Every loader returns the whole split in memory as ``(x, y)``: ``x`` a float32 tensor of shape
``(N, C, H, W)`` with values in ``[0, 1]`` and ``y`` an int64 tensor of shape ``(N,)``.
A missing, truncated or corrupt file raises :class:`lipmargin.errors.DataError` with a message
that says what was expected where.

Besides the named datasets, two generic sources are read from a path given in the name:

* ``npz:PATH``: a NumPy ``.npz`` with arrays ``x`` (``(N, C, H, W)``, ``(N, H, W)`` or
  ``(N, H, W, C)`` with C in 1, 3, 4; uint8 pixels or floats in [0, 1]) and ``y`` (integer
  labels). Per split, ``x_<split>`` / ``y_<split>`` are used when present; a ``{split}`` in PATH
  is replaced by the split name (``npz:data/{split}.npz``). An optional scalar ``num_classes``
  fixes the number of classes (else the largest label of the train split + 1).
* ``folder:ROOT``: an ImageFolder-style tree of PNG / JPEG files, ``ROOT/<split>/<class>/*.png``
  or, without split folders, ``ROOT/<class>/*.png`` for every split. Classes are the sorted
  folder names (of the train split); every image must have the size of the first one (no
  resizing: certificates depend on the input size); greyscale files give one channel, anything
  else RGB. Read with Pillow, lazily per image by :class:`ImageFolderDataset`.

The training pipeline (:func:`epoch_batches`, :func:`make_loader`, :func:`augment_batch`) turns
a split into the same sequence of mini-batches whether it is indexed in memory or read by a
``torch.utils.data.DataLoader`` with worker processes.
"""

from __future__ import annotations

import functools
import gzip
import importlib
import math
import os
import pickle
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler

from lipmargin.errors import DataError

__all__ = [
    "AUGMENTATIONS",
    "DATASETS",
    "ImageFolderDataset",
    "TensorPairDataset",
    "absolute_dataset_spec",
    "augment_batch",
    "epoch_batches",
    "get_dataset",
    "make_loader",
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
    if _source(name) is not None:
        return absolute_dataset_spec(name)
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
    if key not in _INFO:
        return _source_info(key)
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
    if key not in _INFO:
        return _load_source(key, split)
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


# --------------------------------------------------------------------------------------------
# Generic sources: npz:PATH and folder:ROOT
# --------------------------------------------------------------------------------------------

_SOURCE_KINDS = ("npz", "folder")
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_SOURCE_SPLITS = ("train", "test", "extra")


def _source(name: str) -> tuple[str, str] | None:
    """``(kind, path)`` for ``npz:PATH`` / ``folder:ROOT``, else None."""
    text = str(name)
    for kind in _SOURCE_KINDS:
        if text.startswith(kind + ":"):
            path = text[len(kind) + 1 :]
            if not path:
                raise DataError(f"dataset {text!r}: give a path after '{kind}:'")
            return kind, path
    return None


def absolute_dataset_spec(name: str) -> str:
    """``npz:PATH`` / ``folder:ROOT`` with the path made absolute (named datasets unchanged), so
    a run's config finds its data from another working directory."""
    src = _source(name)
    if src is None:
        return name
    kind, path = src
    return f"{kind}:{Path(path).expanduser().resolve()}"


def _check_split(key: str, split: str) -> None:
    if split not in _SOURCE_SPLITS:
        raise DataError(f"{key}: unknown split {split!r}; use one of {', '.join(_SOURCE_SPLITS)}")


def _npz_file(path: str, split: str) -> Path:
    return Path(path.replace("{split}", split)) if "{split}" in path else Path(path)


@functools.lru_cache(maxsize=8)
def _read_npz(path: str, mtime: float, split: str) -> tuple[np.ndarray, np.ndarray, int | None]:
    """``(x NCHW, y int64, num_classes or None)`` of one split of an ``.npz`` (cached by path and
    modification time)."""
    del mtime  # part of the cache key only
    try:
        with np.load(path, allow_pickle=False) as z:
            names = set(z.files)
            xk, yk = (f"x_{split}", f"y_{split}") if f"x_{split}" in names else ("x", "y")
            if xk not in names or yk not in names:
                raise DataError(
                    f"{path}: expected arrays 'x' and 'y' (or 'x_{split}' and 'y_{split}'), "
                    f"found {sorted(names)}"
                )
            x, y = z[xk], z[yk]
            k = int(z["num_classes"]) if "num_classes" in names else None
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: cannot read .npz file ({exc}); corrupt or not an .npz") from exc
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
        x = x.transpose(0, 3, 1, 2)  # NHWC -> NCHW
    if x.ndim != 4:
        raise DataError(f"{path}: '{xk}' must have shape (N, C, H, W), got {x.shape}")
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{path}: '{yk}' must be a 1-D array of integer labels")
    if x.shape[0] != y.shape[0]:
        raise DataError(f"{path}: {x.shape[0]} images in '{xk}' but {y.shape[0]} labels")
    if x.dtype != np.uint8:
        if not np.issubdtype(x.dtype, np.floating):
            raise DataError(f"{path}: '{xk}' must be uint8 or float, got {x.dtype}")
        if x.size and (not np.isfinite(x).all() or x.min() < 0 or x.max() > 1):
            raise DataError(f"{path}: float images in '{xk}' must lie in [0, 1]")
    if y.size and y.min() < 0:
        raise DataError(f"{path}: labels must be non-negative")
    return x, y.astype(np.int64), k


def _npz_split(path: str, split: str) -> tuple[np.ndarray, np.ndarray, int | None]:
    _check_split(f"npz:{path}", split)
    f = _npz_file(path, split)
    if not f.is_file():
        raise DataError(f"dataset file not found: {f} (for npz:{path}, split {split!r})")
    return _read_npz(str(f), f.stat().st_mtime, split)


def _split_root(root: Path, split: str) -> Path:
    return root / split if (root / split).is_dir() else root


def _class_dirs(folder: Path) -> list[str]:
    return sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def _folder_index(
    root: str, split: str
) -> tuple[tuple[str, ...], tuple[Path, ...], tuple[int, ...]]:
    """``(classes, files, labels)`` of one split of an ImageFolder-style tree."""
    _check_split(f"folder:{root}", split)
    base = Path(root)
    if not base.is_dir():
        raise DataError(f"image folder not found: {base}")
    classes = _class_dirs(_split_root(base, "train"))
    folder = _split_root(base, split)
    if folder == base and split != "train" and (base / "train").is_dir():
        raise DataError(f"image folder {base} has a train/ folder but no {split}/ folder")
    if not classes:
        raise DataError(
            f"image folder {folder}: no class folders (expected {folder}/<class>/*.png)"
        )
    files: list[Path] = []
    labels: list[int] = []
    for name in _class_dirs(folder):
        if name not in classes:
            raise DataError(f"{folder / name}: class {name!r} is not among the train classes")
        for f in sorted((folder / name).iterdir()):
            if f.suffix.lower() in _IMAGE_SUFFIXES and f.is_file():
                files.append(f)
                labels.append(classes.index(name))
    if not files:
        raise DataError(f"image folder {folder}: no .png / .jpg / .jpeg files in its class folders")
    return tuple(classes), tuple(files), tuple(labels)


def _read_image(path: Path, mode: str | None) -> np.ndarray:
    """One image as uint8 ``(C, H, W)``; ``mode`` "L" or "RGB" (None: from the file)."""
    try:
        from PIL import Image
    except ImportError as exc:  # pragma: no cover
        raise DataError("reading image folders needs Pillow: pip install pillow") from exc
    try:
        with Image.open(path) as im:
            if mode is None:
                mode = "L" if im.mode in ("1", "L", "LA", "I", "I;16", "F") else "RGB"
            arr = np.asarray(im.convert(mode), dtype=np.uint8)
    except (OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"{path}: cannot read image ({exc})") from exc
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _folder_format(root: str) -> tuple[str, tuple[int, int, int], int]:
    """``(Pillow mode, (C, H, W), classes)`` from the first training image."""
    classes, files, _ = _folder_index(root, "train")
    first = _read_image(files[0], None)
    return ("L" if first.shape[0] == 1 else "RGB"), tuple(first.shape), len(classes)


class ImageFolderDataset(Dataset):
    """One split of ``folder:ROOT``, read lazily: item ``i`` is ``(x float32 (C, H, W) in
    [0, 1], label)``; a list of indices gives a whole batch ``(x (B, C, H, W), y (B,))``."""

    def __init__(self, root: str | os.PathLike[str], split: str = "train") -> None:
        self.root = str(Path(root).expanduser().resolve())
        self.classes, self.files, labels = _folder_index(self.root, split)
        self.mode, self.shape, _ = _folder_format(self.root)
        self.labels = torch.tensor(labels, dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.files)

    def _image(self, i: int) -> np.ndarray:
        arr = _read_image(self.files[i], self.mode)
        if tuple(arr.shape) != self.shape:
            raise DataError(
                f"{self.files[i]}: image of shape {tuple(arr.shape)} (C, H, W) but the first "
                f"image is {self.shape}; resize the images to one size first"
            )
        return arr

    def __getitem__(self, index: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(index, (int, np.integer)) or (
            isinstance(index, torch.Tensor) and index.dim() == 0
        ):
            i = int(index)
            x, y = _to_tensors(self._image(i)[None], self.labels[i : i + 1].numpy())
            return x[0], y[0]
        idx = [int(i) for i in index]
        images = np.stack([self._image(i) for i in idx]) if idx else np.zeros((0, *self.shape))
        return _to_tensors(images.astype(np.uint8), self.labels[idx].numpy())


def _source_info(key: str) -> dict[str, Any]:
    kind, path = _source(key)  # type: ignore[misc]
    if kind == "npz":
        x, y, k = _npz_split(path, "train")
        shape = tuple(int(d) for d in x.shape[1:])
        num_classes = k if k is not None else int(y.max()) + 1 if y.size else 0
    else:
        _, shape, num_classes = _folder_format(path)
    if num_classes < 2:
        raise DataError(f"{key}: at least two classes are needed, found {num_classes}")
    return {
        "name": key,
        "shape": shape,
        "num_classes": int(num_classes),
        "radii": list(_MNIST_RADII if shape[0] == 1 else _COLOR_RADII),
        "splits": _SOURCE_SPLITS,
    }


def _load_source(key: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    kind, path = _source(key)  # type: ignore[misc]
    if kind == "folder":
        ds = ImageFolderDataset(path, split)
        return ds[range(len(ds))]
    x, y, _ = _npz_split(path, split)
    k = _source_info(key)["num_classes"]
    _check_labels(y, k, f"{key} ({split})")
    if x.dtype == np.uint8:
        return _to_tensors(x, y)
    return torch.from_numpy(np.array(x, dtype=np.float32)), torch.from_numpy(y.copy())


# --------------------------------------------------------------------------------------------
# The training pipeline: Dataset objects, index order, DataLoader, augmentation
# --------------------------------------------------------------------------------------------

#: ``augment`` values: none; "shift": random translations by up to 2 pixels (zero padding,
#: MNIST-like data); "crop-flip": random 4-pixel-padded crop and horizontal flip (CIFAR-10 /
#: SVHN-like data; note that flipping digits is questionable: SVHN papers often use crop only).
AUGMENTATIONS = ("none", "shift", "crop", "crop-flip")


class TensorPairDataset(Dataset):
    """A split held in memory: item ``i`` is ``(x[i], y[i])``; a list or tensor of indices gives
    the whole batch at once (one gather, no per-item collation)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if x.shape[0] != y.shape[0]:
            raise DataError(f"{x.shape[0]} images but {y.shape[0]} labels")
        self.x, self.y = x, y

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __getitem__(self, index: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(index, list):
            index = torch.as_tensor(index, dtype=torch.int64)
        return self.x[index], self.y[index]


def get_dataset(
    name: str,
    split: str = "train",
    data_dir: str | os.PathLike[str] | None = None,
    *,
    lazy: bool = False,
    subset: int | None = None,
) -> Dataset:
    """A split as a ``torch.utils.data.Dataset``: :class:`ImageFolderDataset` for ``folder:``
    sources when ``lazy`` (files read per item, in DataLoader workers), else
    :class:`TensorPairDataset` over :func:`load_dataset`. ``subset``: the first N items."""
    key = _canonical_name(name)
    src = _source(key)
    if lazy and src is not None and src[0] == "folder":
        ds: Dataset = ImageFolderDataset(src[1], split)
        if subset is not None and subset < len(ds):  # type: ignore[arg-type]
            ds = torch.utils.data.Subset(ds, range(subset))
        return ds
    x, y = load_dataset(key, split, data_dir)
    if subset is not None:
        x, y = x[:subset], y[:subset]
    return TensorPairDataset(x, y)


def epoch_batches(
    n: int, batch_size: int, *, seed: int, epoch: int, rank: int = 0, world: int = 1
) -> BatchSampler:
    """The index batches of one epoch for one rank.

    The order is ``torch.distributed.DistributedSampler``'s: ``torch.randperm(n)`` from a
    generator seeded with ``seed + epoch``, padded to a multiple of ``world``, rank ``r`` taking
    positions ``r, r + world, ...``, cut into batches of ``batch_size // world``. So batch ``i``
    of all ranks together is exactly batch ``i`` of one process with ``batch_size``: DDP and a
    single process train on the same global batches (``batch_size`` must divide by ``world``).
    """
    if batch_size % world:
        raise DataError(
            f"batch_size {batch_size} must be a multiple of the number of processes ({world})"
        )
    sampler = DistributedSampler(
        range(n), num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=False
    )
    sampler.set_epoch(epoch)
    return BatchSampler(sampler, batch_size // world, drop_last=False)


def make_loader(
    dataset: Dataset,
    batches: Iterator[list[int]] | BatchSampler,
    *,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """A ``DataLoader`` that yields ``dataset[batch]`` for each index batch of ``batches``
    (whole batches fetched at once; ``num_workers`` processes; pinned memory for fast,
    asynchronous copies to a GPU)."""
    return DataLoader(
        dataset,
        sampler=batches,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory,
    )


def augment_batch(x: torch.Tensor, kind: str, generator: torch.Generator) -> torch.Tensor:
    """Randomly augment a batch ``(N, C, H, W)`` on its own device.

    ``"shift"``: zero-pad by 2 and take a random ``H x W`` crop (translations by up to 2 pixels);
    ``"crop"``: the same with padding 4; ``"crop-flip"``: padding 4 and a horizontal flip with
    probability 1/2. The random numbers come from ``generator`` and are drawn on its device
    (give one on the batch's device: no host-device copy, no synchronisation per step).
    """
    if kind == "none":
        return x
    if kind not in AUGMENTATIONS:
        raise DataError(f"augment must be one of {AUGMENTATIONS}, got {kind!r}")
    if x.dim() != 4:
        raise DataError(f"augment={kind!r} needs image batches (N, C, H, W), got {tuple(x.shape)}")
    pad = 2 if kind == "shift" else 4
    n, _, h, w = x.shape
    dev = generator.device
    offsets = torch.randint(0, 2 * pad + 1, (2, n), generator=generator, device=dev)
    rows = offsets[0][:, None] + torch.arange(h, device=dev)
    cols = offsets[1][:, None] + torch.arange(w, device=dev)
    if kind == "crop-flip":
        flip = torch.rand(n, generator=generator, device=dev) < 0.5
        cols = torch.where(flip[:, None], cols.flip(1), cols)
    rows, cols = rows.to(x.device), cols.to(x.device)
    padded = F.pad(x, (pad, pad, pad, pad))
    batch = torch.arange(n, device=x.device)[:, None, None]
    out = padded[batch, :, rows[:, :, None], cols[:, None, :]]  # (N, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()
