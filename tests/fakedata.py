"""Tiny MNIST-shaped IDX files shared by the training, CLI and report tests (no real data)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def idx_bytes(array: np.ndarray) -> bytes:
    """A uint8 array in the IDX format (magic 0x08, big-endian dimensions)."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    return header + array.astype(np.uint8).tobytes()


def write_fake_mnist(root: Path, n_train: int = 200, n_test: int = 100, seed: int = 0) -> Path:
    """MNIST-shaped IDX files under ``root/mnist``: class k is a bright 8x4 block at a place
    that depends on k, over uniform noise, so a few steps of training already learn something."""
    rng = np.random.default_rng(seed)
    folder = root / "mnist"
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        for j, k in enumerate(labels):
            r, c = divmod(int(k), 5)
            images[j, 4 + 10 * r : 12 + 10 * r, 2 + 5 * c : 6 + 5 * c] = 230
        (folder / f"{prefix}-images-idx3-ubyte").write_bytes(idx_bytes(images))
        (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(idx_bytes(labels))
    return root
