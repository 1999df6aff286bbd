"""The distribution installs one top-level import name, ``dkm_palett``, and its CLI runs from any folder."""

from __future__ import annotations

import os
import site
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _sh(cmd: list[str], cwd: Path, env: dict | None = None, timeout: int = 600) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    _sh([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(REPO)],
        cwd=out)
    (whl,) = out.glob("dkm_palett-*.whl")
    return whl


def test_wheel_has_one_top_level_name(wheel):
    with zipfile.ZipFile(wheel) as zf:
        (top_level,) = [n for n in zf.namelist() if n.endswith(".dist-info/top_level.txt")]
        assert zf.read(top_level).decode().split() == ["dkm_palett"]
        roots = {n.split("/", 1)[0] for n in zf.namelist() if not n.split("/", 1)[0].endswith(".dist-info")}
        names = set(zf.namelist())
    assert roots == {"dkm_palett"}
    for must in ("dkm_palett/callbacks/__init__.py", "dkm_palett/recipes/train.py", "dkm_palett/conf/config.yaml",
                 "dkm_palett/conf/experiment/digits_cnn.yaml", "dkm_palett/recipes/data/digits.py"):
        assert must in names, f"{must} is missing from the wheel"


@pytest.mark.slow
def test_wheel_in_a_fresh_venv_runs_the_cli_from_another_folder(wheel, tmp_path):
    """A fresh venv gets the wheel (not the source tree); its dependencies come from this interpreter's
    site-packages through a ``.pth`` line, which adds the folder but not the editable install's finder."""
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    py = env_dir / "bin" / "python"
    purelib = Path(_sh([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp_path)
                   .strip())
    (purelib / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    _sh([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index", "-q", str(wheel)],
        cwd=tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = _sh([str(py), "-c", "import dkm_palett.callbacks, dkm_palett.recipes.config as c;"
                 "print(dkm_palett.callbacks.__file__); print(c.conf_dir())"], cwd=elsewhere, env=env)
    assert all(line.startswith(str(purelib)) for line in where.split()), where
    help_text = _sh([str(env_dir / "bin" / "dkm-palett-train"), "--help"], cwd=elsewhere, env=env)
    assert "experiment: charlm, compare, custom, digits_cnn, mnist5k_cnn" in help_text
    job = _sh([str(env_dir / "bin" / "dkm-palett-train"), "--cfg", "job"], cwd=elsewhere, env=env)
    assert "_target_: dkm_palett.callbacks.DKMPalettizationCallback" in job
