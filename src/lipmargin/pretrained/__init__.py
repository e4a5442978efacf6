"""Certified MNIST models that ship with the package, each with a model card.

>>> from lipmargin import pretrained
>>> pretrained.list()                        # names of the shipped models
>>> model, card = pretrained.load(name)      # model in eval mode, its card (a dict)

A card records the config, the training command and time, clean and certified accuracy on the
full MNIST test set at radii 0.5 / 1.0 / 1.58 / 2.0 (guaranteed bound), the median certified
radius, the result of ``lipmargin audit`` and the sha256 of the weights file. The command line
accepts ``pretrained:NAME`` wherever it takes a run folder:
``lipmargin certify pretrained:NAME --data-dir data``. Cards are written by
``scripts/ship_pretrained.py``; the test suite re-certifies every shipped model and compares
with its card, so an engine change that moves a certificate is caught.
"""

from __future__ import annotations

import builtins
import hashlib
import json
from pathlib import Path
from typing import Any

from ..errors import CheckpointError

DIR = Path(__file__).resolve().parent
PREFIX = "pretrained:"


def list() -> builtins.list[str]:  # noqa: A001 - the natural name for the API
    """Names of the shipped models (sorted)."""
    return sorted(p.name[: -len(".card.json")] for p in DIR.glob("*.card.json"))


def path(name: str) -> Path:
    """The ``.safetensors`` checkpoint of a shipped model.

    Raises:
        CheckpointError: no shipped model of that name.
    """
    name = name[len(PREFIX) :] if name.startswith(PREFIX) else name
    file = DIR / f"{name}.safetensors"
    if name not in list() or not file.is_file():
        known = ", ".join(list()) or "none"
        raise CheckpointError(f"no pretrained model {name!r} (shipped: {known})")
    return file


def card(name: str) -> dict[str, Any]:
    """The model card of a shipped model (a dict; see the module docstring)."""
    path(name)
    name = name[len(PREFIX) :] if name.startswith(PREFIX) else name
    return json.loads((DIR / f"{name}.card.json").read_text())


def sha256(file: Path) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load(name: str, device: str = "cpu"):
    """``(model in eval mode, card)`` of a shipped model; the weights' sha256 is checked
    against the card.

    Raises:
        CheckpointError: unknown name, or weights that do not match their card.
    """
    from ..runs import load_run

    file = path(name)
    info = card(name)
    if sha256(file) != info["sha256"]:
        raise CheckpointError(f"pretrained model {name!r}: weights do not match their card")
    model, _, _, _, _ = load_run(file, device=device)
    return model, info
