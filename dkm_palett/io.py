"""Atomic file and directory writes: write to a temp sibling, then rename over the target.

A failure (any exception, KeyboardInterrupt included) removes the temp and leaves the target as it was.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterator, Union

PathLike = Union[str, os.PathLike]


def _temp_sibling(path: Path, tag: str) -> Path:
    """A fresh name next to ``path`` that keeps its suffix (some writers insist on ``.mlpackage``)."""
    return path.parent / f".{path.name}.{tag}-{uuid.uuid4().hex[:10]}{path.suffix}"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _fsync_file(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _normal_permissions(path: Path) -> None:
    """Give a finished temp file the mode a plain ``open(path, "w")`` would (writers such as safetensors create
    0600 files)."""
    with contextlib.suppress(OSError):
        os.chmod(path, 0o666 & ~_umask())


def ensure_writable_dir(path: PathLike, field: str) -> Path:
    """Create the folder ``path`` (and its parents) and check that a file can be written in it; else a ValueError
    that names ``field``. For output folders, before any long work starts."""
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as err:
        raise ValueError(f"{field}={str(path)!r} is not a writable folder ({err.strerror or err}); choose a folder "
                         "you can create and write to.") from None
    return folder


def _check_parent(path: Path) -> None:
    if not path.parent.is_dir():
        raise ValueError(f"cannot write {str(path)!r}: the folder {str(path.parent)!r} does not exist.")


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temp file path next to ``path``; on success it replaces ``path`` (``os.replace``).

    For writers that need a file name (``torch.save``, ``safetensors.torch.save_file``).
    """
    target = Path(path)
    _check_parent(target)
    tmp = _temp_sibling(target, "tmp")
    try:
        yield tmp
        if not tmp.is_file():
            raise RuntimeError(f"nothing was written to the temp file for {str(target)!r}.")
        _fsync_file(tmp)
        _normal_permissions(tmp)
        os.replace(tmp, target)
    except BaseException:
        _remove(tmp)
        raise


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    return Path(path)


def atomic_write_text(path: PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_torch_save(obj: Any, path: PathLike) -> Path:
    """``torch.save(obj, path)``, atomically (for checkpoints)."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


@contextlib.contextmanager
def atomic_directory(path: PathLike, create: bool = False) -> Iterator[Path]:
    """Yield a temp directory path next to ``path`` (created when ``create``); on success it becomes ``path``.

    An existing ``path`` (file or directory) is moved aside, the temp is renamed into place, then the old one is
    deleted; if the rename fails the old one is put back. On any failure the temp is removed.
    """
    target = Path(path)
    _check_parent(target)
    tmp = _temp_sibling(target, "tmp")
    if create:
        tmp.mkdir()
    try:
        yield tmp
        if not tmp.is_dir():
            raise RuntimeError(f"nothing was written to the temp directory for {str(target)!r}.")
        if target.exists() or target.is_symlink():
            backup = _temp_sibling(target, "old")
            os.replace(target, backup)
            try:
                os.replace(tmp, target)
            except BaseException:
                os.replace(backup, target)
                raise
            _remove(backup)
        else:
            os.replace(tmp, target)
    except BaseException:
        _remove(tmp)
        raise
