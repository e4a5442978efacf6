"""Crash-safe checkpoints: a ``.safetensors`` file plus a JSON sidecar, never pickle.

``save_checkpoint("runs/a/last.safetensors", model.state_dict(), {"epoch": 3})`` writes

* ``runs/a/last.safetensors``: the tensors (contiguous CPU clones, so shared storage is fine),
  with optional string entries of the caller's in its header (covered by the sha256);
* ``runs/a/last.json``: the caller's metadata plus a reserved ``"_checkpoint"`` entry holding the
  format version, the lipmargin/torch/python versions, the size and the sha256 of the tensors file.

Each file is written to a temporary file in the same folder, flushed, ``fsync``-ed and moved into
place with ``os.replace``; the JSON goes last. If saving raises, the previous pair is put back. If
the process dies between the two moves, the sidecar's sha256 no longer matches and
:func:`load_checkpoint` reports it instead of returning mismatched data.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save
from torch import Tensor, nn

from lipmargin import __version__
from lipmargin.errors import CheckpointError, InputError

__all__ = [
    "CHECKPOINT_KEY",
    "FORMAT_VERSION",
    "LAST_NAME",
    "load_checkpoint",
    "load_into",
    "resolve_checkpoint_path",
    "save_checkpoint",
    "sidecar_path",
]

#: Key of the JSON sidecar entry lipmargin fills in (sha256, versions, ...).
CHECKPOINT_KEY = "_checkpoint"
#: Version of the checkpoint layout.
FORMAT_VERSION = 1
#: File loaded when :func:`load_checkpoint` is given a run folder.
LAST_NAME = "last.safetensors"
_SUFFIX = ".safetensors"


def sidecar_path(path: str | os.PathLike[str]) -> Path:
    """The JSON sidecar of a ``.safetensors`` checkpoint file."""
    return Path(path).with_suffix(".json")


def resolve_checkpoint_path(path: str | os.PathLike[str]) -> Path:
    """The ``.safetensors`` file meant by ``path``: the file itself, its ``.json`` or a run folder.

    Raises:
        CheckpointError: if nothing exists at ``path`` or its suffix is neither of the two.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        return p / LAST_NAME
    if p.suffix == ".json":
        return p.with_suffix(_SUFFIX)
    if p.suffix == _SUFFIX:
        return p
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    raise CheckpointError(
        f"not a checkpoint: {p} (expected a .safetensors file, its .json sidecar or a run folder)"
    )


def _versions() -> dict[str, str]:
    return {
        "lipmargin": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def _prepare_tensors(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    if not isinstance(state_dict, Mapping):
        raise InputError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
    tensors: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise InputError(f"state_dict keys must be strings, got {key!r}")
        if not isinstance(value, Tensor):
            raise InputError(f"state_dict[{key!r}] is a {type(value).__name__}, not a tensor")
        # A fresh contiguous CPU copy per entry: no shared or strided storage reaches safetensors.
        tensors[key] = value.detach().to("cpu").contiguous().clone()
    return tensors


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable where the platform allows opening folders."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_temp(folder: Path, name: str, data: bytes) -> Path:
    """Write ``data`` to a new temporary file next to ``name``, flushed and fsync-ed."""
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a checkpoint is an ordinary file
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return Path(tmp)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _backup(target: Path) -> Path | None:
    """A hard link (or copy) of the current ``target`` to restore it if the save fails."""
    if not target.exists():
        return None
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".bak", dir=target.parent)
    os.close(fd)
    os.unlink(tmp)
    try:
        os.link(target, tmp)
    except OSError:
        shutil.copyfile(target, tmp)
    return Path(tmp)


def save_checkpoint(
    path: str | os.PathLike[str],
    state_dict: Mapping[str, Tensor],
    meta: Mapping[str, Any],
    header: Mapping[str, str] | None = None,
) -> None:
    """Write ``state_dict`` to ``path`` (``.safetensors``) and ``meta`` to its ``.json`` sidecar.

    ``meta`` must be JSON-serialisable; an incoming ``"_checkpoint"`` entry (from a loaded
    checkpoint) is replaced. ``header`` (string keys and values) goes into the safetensors
    header, so the sidecar's sha256 covers it; :func:`load_checkpoint` returns it as
    ``meta["_checkpoint"]["tensor_metadata"]``. The parent folder is created if needed. Both
    files get mode 0666 minus the umask, like any other file of the run.

    Raises:
        InputError: a non-tensor value, a non-string key or metadata JSON cannot encode.
        CheckpointError: ``path`` does not end with ``.safetensors``, or writing failed (the
            previous checkpoint, if any, is left in place).
    """
    target = Path(path).expanduser()
    if target.suffix != _SUFFIX:
        raise CheckpointError(f"checkpoint path must end with {_SUFFIX}: {target}")
    if not isinstance(meta, Mapping):
        raise InputError(f"meta must be a mapping, got {type(meta).__name__}")
    tensors = _prepare_tensors(state_dict)
    extra = dict(header or {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in extra.items()):
        raise InputError("checkpoint header entries must be strings")
    try:
        data = _st_save(tensors, metadata={"format": "pt", **extra})
    except Exception as exc:  # e.g. a dtype safetensors cannot store
        raise InputError(f"cannot serialise the state dict: {exc}") from exc
    sidecar = sidecar_path(target)
    record = {k: v for k, v in meta.items() if k != CHECKPOINT_KEY}
    record[CHECKPOINT_KEY] = {
        "format_version": FORMAT_VERSION,
        "file": target.name,
        "size_bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "num_tensors": len(tensors),
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": _versions(),
    }
    try:
        text = json.dumps(record, indent=2, sort_keys=True, allow_nan=True) + "\n"
    except (TypeError, ValueError) as exc:
        raise InputError(f"checkpoint meta is not JSON-serialisable: {exc}") from exc

    folder = target.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(f"cannot create checkpoint folder {folder}: {exc}") from exc

    tmp_tensors: Path | None = None
    tmp_json: Path | None = None
    backup: Path | None = None
    replaced = False
    try:
        tmp_tensors = _write_temp(folder, target.name, data)
        tmp_json = _write_temp(folder, sidecar.name, text.encode("utf-8"))
        backup = _backup(target)
        os.replace(tmp_tensors, target)
        tmp_tensors = None
        replaced = True
        os.replace(tmp_json, sidecar)
        tmp_json = None
        _fsync_dir(folder)
    except BaseException as exc:
        if replaced:
            # Put the previous tensors back so they match the untouched previous sidecar.
            with contextlib.suppress(OSError):
                if backup is not None:
                    os.replace(backup, target)
                    backup = None
                else:
                    os.unlink(target)
        if isinstance(exc, OSError):
            raise CheckpointError(f"saving checkpoint {target} failed: {exc}") from exc
        raise
    finally:
        for leftover in (tmp_tensors, tmp_json, backup):
            if leftover is not None:
                with contextlib.suppress(OSError):
                    os.unlink(leftover)


def _read_sidecar(sidecar: Path) -> dict[str, Any]:
    if not sidecar.is_file():
        raise CheckpointError(f"checkpoint sidecar missing: {sidecar}")
    try:
        meta = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint sidecar {sidecar} is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint sidecar {sidecar} must hold a JSON object")
    info = meta.get(CHECKPOINT_KEY)
    if (
        not isinstance(info, dict)
        or not isinstance(info.get("sha256"), str)
        or not isinstance(info.get("size_bytes"), int)
    ):
        raise CheckpointError(
            f"checkpoint sidecar {sidecar} lacks the {CHECKPOINT_KEY!r} entry with sha256 and "
            "size_bytes (not written by lipmargin.save_checkpoint?)"
        )
    version = info.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {sidecar} has format version {version!r}; this lipmargin reads "
            f"versions up to {FORMAT_VERSION}"
        )
    return meta


def load_checkpoint(path: str | os.PathLike[str]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Load and verify a checkpoint written by :func:`save_checkpoint`.

    Args:
        path: the ``.safetensors`` file, its ``.json`` sidecar, or a run folder (then
            ``last.safetensors`` inside it).

    Returns:
        ``(state_dict, meta)``: CPU tensors, and the sidecar's JSON object (the caller's metadata
        plus the ``"_checkpoint"`` entry with versions and hash).

    Raises:
        CheckpointError: a missing file or sidecar, invalid JSON, a size or sha256 mismatch
            (truncated, corrupted, or an interrupted save), or an unreadable safetensors file.
    """
    tensors_path = resolve_checkpoint_path(path)
    if not tensors_path.is_file():
        raise CheckpointError(f"checkpoint not found: {tensors_path}")
    sidecar = sidecar_path(tensors_path)
    meta = _read_sidecar(sidecar)
    info = meta[CHECKPOINT_KEY]
    try:
        data = tensors_path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {tensors_path}: {exc}") from exc
    if len(data) != info["size_bytes"]:
        raise CheckpointError(
            f"checkpoint {tensors_path} has {len(data)} bytes but its sidecar records "
            f"{info['size_bytes']}: the file is truncated or does not belong to {sidecar.name} "
            "(interrupted save?)"
        )
    digest = hashlib.sha256(data).hexdigest()
    if digest != info["sha256"]:
        raise CheckpointError(
            f"checkpoint {tensors_path} is corrupt: sha256 {digest} does not match "
            f"{info['sha256']} recorded in {sidecar.name}"
        )
    try:
        state_dict = _st_load(data)
    except Exception as exc:  # safetensors raises its own error types for malformed headers
        raise CheckpointError(
            f"checkpoint {tensors_path} is not a valid safetensors file: {exc}"
        ) from exc
    info["tensor_metadata"] = _header_metadata(data)
    return state_dict, meta


def _header_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` entries of a safetensors file's JSON header (already validated)."""
    n = int.from_bytes(data[:8], "little")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}
    extra = header.get("__metadata__") or {}
    return {k: v for k, v in extra.items() if k != "format"}


def load_into(
    model: nn.Module, state_dict: Mapping[str, Tensor], strict: bool = True
) -> tuple[list[str], list[str]]:
    """``model.load_state_dict`` with a :class:`CheckpointError` that names what does not fit.

    Shape mismatches are always errors; missing and unexpected keys are errors when ``strict``.

    Returns:
        ``(missing_keys, unexpected_keys)`` (both empty when ``strict``).

    Raises:
        CheckpointError: listing missing keys, unexpected keys and shape mismatches.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state_dict.items()
        if k in own and isinstance(v, Tensor) and tuple(v.shape) != tuple(own[k].shape)
    ]
    problems = []
    if mismatched:
        problems.append(f"shape mismatch for {len(mismatched)} tensor(s): {_listing(mismatched)}")
    if strict and missing:
        problems.append(f"missing {len(missing)} key(s): {_listing(missing)}")
    if strict and unexpected:
        problems.append(f"unexpected {len(unexpected)} key(s): {_listing(unexpected)}")
    if problems:
        raise CheckpointError(
            f"checkpoint does not fit {type(model).__name__}: " + "; ".join(problems)
        )
    try:
        result = model.load_state_dict(dict(state_dict), strict=strict)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint does not fit {type(model).__name__}: {exc}") from exc
    return list(result.missing_keys), list(result.unexpected_keys)


def _listing(items: list[str], limit: int = 10) -> str:
    shown = ", ".join(items[:limit])
    return shown if len(items) <= limit else f"{shown}, ... ({len(items) - limit} more)"
