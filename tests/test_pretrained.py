"""Shipped certified models (issue 15): each loads, matches its card's sha256, and, where MNIST
is available (``make test`` fetches it; CI does), certifies the FULL test set with the figures
of its card to within 0.05 points, so an engine change that moves a certificate is caught."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from lipmargin import LipschitzBound, pretrained
from lipmargin.certify import batches, evaluate
from lipmargin.data import load_dataset
from lipmargin.errors import CheckpointError

NAMES = pretrained.list()
DATA = Path(os.environ.get("LIPMARGIN_DATA_DIR", "data"))
HAS_MNIST = (DATA / "mnist" / "t10k-images-idx3-ubyte").exists() or (
    DATA / "mnist" / "t10k-images-idx3-ubyte.gz"
).exists()


def test_models_are_shipped() -> None:
    assert NAMES, "no pretrained model in src/lipmargin/pretrained"


@pytest.mark.parametrize("name", NAMES)
def test_card_and_weights(name) -> None:
    card = pretrained.card(name)
    for key in ("config", "training_command", "training_minutes", "test_set", "audit", "sha256"):
        assert key in card, key
    assert card["sha256"] == pretrained.sha256(pretrained.path(name))
    assert card["audit"]["broken"] == 0
    model, loaded = pretrained.load(f"pretrained:{name}")
    assert loaded == card and not model.training
    out = model(torch.zeros(2, *card["input_shape"]))
    assert out.shape == (2, 10)


def test_unknown_name_is_a_clear_error() -> None:
    with pytest.raises(CheckpointError, match="no pretrained model"):
        pretrained.load("no-such-model")


@pytest.mark.skipif(not HAS_MNIST, reason=f"MNIST not found in {DATA} (make test fetches it)")
@pytest.mark.parametrize("name", NAMES)
def test_full_test_set_matches_the_card(name) -> None:
    card = pretrained.card(name)
    model, _ = pretrained.load(name)
    x, y = load_dataset("mnist", "test", DATA)
    bound = LipschitzBound(model, tuple(card["input_shape"]))
    eps = [float(e) for e in card["test_set"]["certified_accuracy"]]
    report = evaluate(model, bound, batches(x, y, 1000), eps)
    expected = card["test_set"]
    assert report.n == expected["n"] == 10000
    assert abs(report.clean_accuracy - expected["clean_accuracy"]) <= 5e-4
    for e in eps:
        got, want = report.certified_accuracy[e], expected["certified_accuracy"][str(e)]
        assert abs(got - want) <= 5e-4, (e, got, want)
    assert report.median_radius == pytest.approx(expected["median_radius"], rel=1e-3)
