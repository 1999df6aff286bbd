"""Atomic file and directory writes: write to a temp sibling, then rename over the target.

A failure (any exception, KeyboardInterrupt included) removes the temp and leaves the target as it was.
"""

from __future__ import annotations

import contextlib
import os
import shutil
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
