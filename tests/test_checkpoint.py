"""Checkpoints: safetensors + JSON sidecar, integrity checks, crash safety, load_into."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

import lipmargin
from lipmargin import models
from lipmargin.checkpoint import (
    CHECKPOINT_KEY,
    load_checkpoint,
    load_into,
    resolve_checkpoint_path,
    save_checkpoint,
    sidecar_path,
)
from lipmargin.errors import CheckpointError, InputError


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.clone() for k, v in models.build("wong_kolter").state_dict().items()}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "run" / "last.safetensors"
    state = _state()
    meta = {"epoch": 3, "model": "wong_kolter", "eps": 0.1, "history": [1.0, 0.5]}
    save_checkpoint(path, state, meta)
    assert path.is_file() and sidecar_path(path).is_file()
    assert sidecar_path(path) == tmp_path / "run" / "last.json"

    loaded, loaded_meta = load_checkpoint(path)
    _assert_same(loaded, state)
    assert {k: loaded_meta[k] for k in meta} == meta
    info = loaded_meta[CHECKPOINT_KEY]
    assert info["versions"]["lipmargin"] == lipmargin.__version__
    assert info["versions"]["torch"] == torch.__version__
    assert "python" in info["versions"]
    assert len(info["sha256"]) == 64
    assert info["size_bytes"] == path.stat().st_size

    # The .json sidecar and the run folder name the same checkpoint.
    for alias in (sidecar_path(path), path.parent, str(path)):
        again, again_meta = load_checkpoint(alias)
        _assert_same(again, state)
        assert again_meta == loaded_meta
    # Only the pair is left in the folder: no temporary files.
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.json", "last.safetensors"]


def test_round_trip_dtypes_shared_and_strided(tmp_path: Path) -> None:
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    state = {
        "a": base,
        "tied": base,  # the same tensor twice (weight tying)
        "view": base[1:],  # shares storage, offset
        "t": base.t(),  # non-contiguous
        "half": torch.randn(5).half(),
        "long": torch.arange(4),
        "flag": torch.tensor([True, False]),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
    }
    path = tmp_path / "x.safetensors"
    save_checkpoint(path, state, {})
    loaded, _ = load_checkpoint(path)
    _assert_same(loaded, {k: v.contiguous() for k, v in state.items()})
    assert all(t.device.type == "cpu" for t in loaded.values())


def test_model_round_trip_with_load_into(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = models.build("wrn", depth=10, width=1).eval()
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    save_checkpoint(tmp_path / "last.safetensors", model.state_dict(), {"name": "wrn"})
    torch.manual_seed(1)
    other = models.build("wrn", depth=10, width=1).eval()
    state, meta = load_checkpoint(tmp_path)
    assert load_into(other, state) == ([], [])
    torch.testing.assert_close(other(x), expected)
    # Saving a loaded meta again replaces the reserved entry instead of failing.
    save_checkpoint(tmp_path / "last.safetensors", other.state_dict(), meta)
    _, meta2 = load_checkpoint(tmp_path)
    assert meta2["name"] == "wrn"


def test_overwrite_replaces_previous(tmp_path: Path) -> None:
    path = tmp_path / "last.safetensors"
    save_checkpoint(path, _state(0), {"epoch": 1})
    save_checkpoint(path, _state(1), {"epoch": 2})
    loaded, meta = load_checkpoint(path)
    _assert_same(loaded, _state(1))
    assert meta["epoch"] == 2


def test_missing_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path)  # a folder without last.safetensors
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")
    path = tmp_path / "last.safetensors"
    save_checkpoint(path, _state(), {})
    sidecar_path(path).unlink()
    with pytest.raises(CheckpointError, match="sidecar missing"):
        load_checkpoint(path)


def test_truncated_file(tmp_path: Path) -> None:
    path = tmp_path / "last.safetensors"
    save_checkpoint(path, _state(), {})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(path)


def test_flipped_byte_fails_hash(tmp_path: Path) -> None:
    path = tmp_path / "last.safetensors"
    save_checkpoint(path, _state(), {})
    data = bytearray(path.read_bytes())
    data[-10] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(path)


def test_garbage_with_matching_sidecar_is_rejected(tmp_path: Path) -> None:
    """A file whose hash matches but is not safetensors still gives a CheckpointError."""
    import hashlib

    path = tmp_path / "last.safetensors"
    save_checkpoint(path, _state(), {})
    garbage = b"\xff" * 64
    path.write_bytes(garbage)
    meta = json.loads(sidecar_path(path).read_text())
    meta[CHECKPOINT_KEY]["size_bytes"] = len(garbage)
    meta[CHECKPOINT_KEY]["sha256"] = hashlib.sha256(garbage).hexdigest()
    sidecar_path(path).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="not a valid safetensors"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    "content",
    ['{"epoch": 1,', "[1, 2]", '{"epoch": 1}', '{"_checkpoint": {"sha256": 3}}'],
    ids=["invalid-json", "not-object", "no-checkpoint-entry", "bad-entry"],
)
def test_bad_sidecar(tmp_path: Path, content: str) -> None:
    path = tmp_path / "last.safetensors"
    save_checkpoint(path, _state(), {})
    sidecar_path(path).write_text(content)
    with pytest.raises(CheckpointError, match="sidecar"):
        load_checkpoint(path)


def test_newer_format_version_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "last.safetensors"
    save_checkpoint(path, _state(), {})
    meta = json.loads(sidecar_path(path).read_text())
    meta[CHECKPOINT_KEY]["format_version"] = 99
    sidecar_path(path).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="format version"):
        load_checkpoint(path)


@pytest.mark.parametrize("fail_on", [1, 2])
def test_failed_save_keeps_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail_on: int
) -> None:
    path = tmp_path / "last.safetensors"
    old = _state(0)
    save_checkpoint(path, old, {"epoch": 1})

    real_replace = os.replace
    calls = {"n": 0}

    def flaky_replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        calls["n"] += 1
        if calls["n"] == fail_on:
            raise OSError("simulated crash in os.replace")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", flaky_replace)
    with pytest.raises(CheckpointError, match="simulated crash"):
        save_checkpoint(path, _state(1), {"epoch": 2})
    monkeypatch.setattr(os, "replace", real_replace)

    loaded, meta = load_checkpoint(path)
    _assert_same(loaded, old)
    assert meta["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.json", "last.safetensors"]


def test_failed_first_save_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_replace = os.replace
    calls = {"n": 0}

    def flaky_replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("simulated crash")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", flaky_replace)
    with pytest.raises(CheckpointError):
        save_checkpoint(tmp_path / "last.safetensors", _state(), {})
    assert list(tmp_path.iterdir()) == []


def test_hard_crash_between_the_two_files_is_detected(tmp_path: Path) -> None:
    """A kill after the tensors moved but before the sidecar did: new tensors, old sidecar."""
    path = tmp_path / "a" / "last.safetensors"
    save_checkpoint(path, _state(0), {"epoch": 1})
    newer = tmp_path / "b" / "last.safetensors"
    save_checkpoint(newer, _state(1), {"epoch": 2})
    shutil.copyfile(newer, path)
    with pytest.raises(CheckpointError, match="sha256|truncated"):
        load_checkpoint(path)


def test_loading_never_unpickles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "last.safetensors"
    save_checkpoint(path, _state(), {})

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("torch.load must not be used")

    monkeypatch.setattr(torch, "load", forbidden)
    load_checkpoint(path)


def test_save_input_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=".safetensors"):
        save_checkpoint(tmp_path / "model.pt", _state(), {})
    with pytest.raises(InputError, match="not a tensor"):
        save_checkpoint(tmp_path / "x.safetensors", {"a": [1, 2]}, {})  # type: ignore[dict-item]
    with pytest.raises(InputError, match="JSON"):
        save_checkpoint(tmp_path / "x.safetensors", _state(), {"bad": object()})
    assert list(tmp_path.iterdir()) == []


def test_resolve_checkpoint_path(tmp_path: Path) -> None:
    assert resolve_checkpoint_path(tmp_path) == tmp_path / "last.safetensors"
    assert resolve_checkpoint_path(tmp_path / "e3.json") == tmp_path / "e3.safetensors"
    assert resolve_checkpoint_path(tmp_path / "e3.safetensors") == tmp_path / "e3.safetensors"
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        resolve_checkpoint_path(tmp_path / "weights.bin")


def test_load_into_reports_mismatches() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    good = {k: v.clone() for k, v in model.state_dict().items()}
    assert load_into(model, good) == ([], [])

    missing = dict(good)
    del missing["2.bias"]
    with pytest.raises(CheckpointError, match=r"missing 1 key\(s\): 2\.bias"):
        load_into(model, missing)
    assert load_into(model, missing, strict=False) == (["2.bias"], [])

    extra = dict(good, **{"3.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r"unexpected 1 key\(s\): 3\.weight"):
        load_into(model, extra)
    assert load_into(model, extra, strict=False) == ([], ["3.weight"])

    wrong = dict(good, **{"0.weight": torch.zeros(5, 4)})
    with pytest.raises(CheckpointError, match=r"0\.weight: checkpoint \(5, 4\) vs model \(3, 4\)"):
        load_into(model, wrong)
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_into(model, wrong, strict=False)


def test_files_have_ordinary_mode(tmp_path: Path) -> None:
    """mkstemp creates 0600 files; a checkpoint must get 0666 minus the umask like the rest."""
    mask = os.umask(0o022)
    os.umask(mask)
    path = tmp_path / "last.safetensors"
    save_checkpoint(path, _state(), {})
    for p in (path, sidecar_path(path)):
        assert p.stat().st_mode & 0o777 == 0o666 & ~mask, p.name


def test_header_entries_round_trip_and_are_hashed(tmp_path: Path) -> None:
    path = tmp_path / "last.safetensors"
    save_checkpoint(path, _state(), {"epoch": 1}, header={"arch": '{"act": "relu"}'})
    _, meta = load_checkpoint(path)
    assert meta[CHECKPOINT_KEY]["tensor_metadata"] == {"arch": '{"act": "relu"}'}
    data = path.read_bytes()
    path.write_bytes(data.replace(b'"relu', b'"tanh'))  # same length, edited header
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(path)
    with pytest.raises(InputError, match="strings"):
        save_checkpoint(path, _state(), {}, header={"n": 3})  # type: ignore[dict-item]
