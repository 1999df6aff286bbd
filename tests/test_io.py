"""Atomic writes: the target is replaced whole or left untouched, and no temp files survive a failure."""

from __future__ import annotations

import os

import pytest
import torch

from dkm_palett import io
from dkm_palett.io import atomic_path, atomic_write_text


def _names(folder):
    return sorted(p.name for p in folder.iterdir())


def test_atomic_write_bytes_and_text_replace(tmp_path):
    target = tmp_path / "a.bin"
    io.atomic_write_bytes(target, b"one")
    io.atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    io.atomic_write_text(tmp_path / "b.txt", "héllo")
    assert (tmp_path / "b.txt").read_text(encoding="utf-8") == "héllo"
    assert _names(tmp_path) == ["a.bin", "b.txt"]


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_atomic_path_failure_keeps_old_file_and_removes_temp(tmp_path, exc):
    target = tmp_path / "ckpt.pt"
    target.write_bytes(b"old")
    with pytest.raises(type(exc)):
        with io.atomic_path(target) as tmp:
            assert tmp.parent == tmp_path and tmp.suffix == ".pt" and tmp != target
            tmp.write_bytes(b"half-written")
            raise exc
    assert target.read_bytes() == b"old"
    assert _names(tmp_path) == ["ckpt.pt"]


def test_atomic_path_requires_a_written_file_and_existing_folder(tmp_path):
    with pytest.raises(RuntimeError, match="nothing was written"):
        with io.atomic_path(tmp_path / "x.bin"):
            pass
    assert _names(tmp_path) == []
    with pytest.raises(ValueError, match="does not exist"):
        io.atomic_write_bytes(tmp_path / "missing" / "x.bin", b"1")


def test_atomic_torch_save_roundtrip_and_failure(tmp_path):
    target = tmp_path / "model.ckpt"
    state = {"w": torch.arange(6.0).reshape(2, 3), "step": 7}
    io.atomic_torch_save(state, target)
    loaded = torch.load(target)
    assert torch.equal(loaded["w"], state["w"]) and loaded["step"] == 7

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError, match="cannot pickle"):
        io.atomic_torch_save({"bad": Unpicklable()}, target)
    assert torch.equal(torch.load(target)["w"], state["w"])
    assert _names(tmp_path) == ["model.ckpt"]


def test_atomic_directory_creates_and_replaces(tmp_path):
    target = tmp_path / "m.mlpackage"
    with io.atomic_directory(target, create=True) as tmp:
        assert tmp.is_dir() and tmp.suffix == ".mlpackage" and not target.exists()
        (tmp / "v1").write_text("1")
    assert _names(target) == ["v1"]
    with io.atomic_directory(target) as tmp:
        tmp.mkdir()
        (tmp / "v2").write_text("2")
    assert _names(target) == ["v2"]
    assert _names(tmp_path) == ["m.mlpackage"]


@pytest.mark.parametrize("exc", [OSError("disk full"), KeyboardInterrupt()])
def test_atomic_directory_failure_leaves_old_dir(tmp_path, exc):
    target = tmp_path / "m.mlpackage"
    target.mkdir()
    (target / "old").write_text("keep")
    with pytest.raises(type(exc)):
        with io.atomic_directory(target, create=True) as tmp:
            (tmp / "sub").mkdir()
            (tmp / "sub" / "partial").write_text("x")
            raise exc
    assert _names(target) == ["old"]
    assert _names(tmp_path) == ["m.mlpackage"]


def test_atomic_directory_failure_without_old_target_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="nothing was written"):
        with io.atomic_directory(tmp_path / "m.mlpackage"):
            pass
    with pytest.raises(ValueError):
        with io.atomic_directory(tmp_path / "m.mlpackage", create=True):
            raise ValueError("conversion failed")
    assert _names(tmp_path) == []


def test_atomic_writes_keep_normal_permissions_even_when_the_writer_makes_0600_files(tmp_path):
    import stat

    from safetensors.torch import save_file

    mask = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "model.safetensors") as tmp:
            save_file({"w": torch.zeros(2)}, str(tmp))  # safetensors itself creates 0600 files
        atomic_write_text(tmp_path / "report.json", "{}")
    finally:
        os.umask(mask)
    for name in ("model.safetensors", "report.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name


def test_ensure_writable_dir_names_the_field(tmp_path):
    from dkm_palett.io import ensure_writable_dir

    assert ensure_writable_dir(tmp_path / "a" / "b", "export.dir").is_dir()
    assert not list((tmp_path / "a" / "b").iterdir())  # the write check leaves nothing behind
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"export\.dir='.*file/sub' is not a writable folder \(.*\); choose"):
        ensure_writable_dir(tmp_path / "file" / "sub", "export.dir")
