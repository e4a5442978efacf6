"""Files a user asks for (JSON results, plots, reports): checked writable before any
computation, written atomically (temporary file in the same folder, then ``os.replace``)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from .errors import InputError


def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_writable(path: str | os.PathLike[str], *, what: str = "output") -> Path:
    """Make sure ``path`` can be written, creating nothing that stays.

    ``path`` must not be an existing folder; its nearest existing ancestor must be a folder in
    which a file can be created (probed with a temporary file, removed at once; this also
    catches read-only file systems, where permission bits alone do not tell).

    Raises:
        InputError: one line naming the path and the reason.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        raise InputError(f"cannot write {what} {p}: it is a folder")
    base = _nearest_existing(p.parent)
    if not base.is_dir():
        raise InputError(f"cannot write {what} {p}: {base} is not a folder")
    if p.exists() and not os.access(p, os.W_OK):
        raise InputError(f"cannot write {what} {p}: permission denied")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".lipmargin-probe-", dir=base)
    except OSError as exc:
        raise InputError(f"cannot write {what} {p}: {exc.strerror or exc} ({base})") from exc
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(tmp)
    return p


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file and ``os.replace`` (the parent is
    created); the file gets the usual mode (0666 minus the umask)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return p


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """:func:`write_bytes_atomic` for UTF-8 text."""
    return write_bytes_atomic(path, text.encode("utf-8"))
