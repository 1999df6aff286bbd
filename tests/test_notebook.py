"""notebooks/finetune_dkm.ipynb: it runs top to bottom (fast mode), the reloaded compressed model has the accuracy the
notebook printed, the committed outputs come from a full run, and it imports only the public API.

Regenerate the committed outputs (a full run, a few minutes on 2 cores) with ``python tests/test_notebook.py``.
"""

from __future__ import annotations

import ast
import os
import re
import sys
import tempfile
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="the dev extra's nbformat reads the notebook")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "finetune_dkm.ipynb"
FAST_FLAG = "DKM_NOTEBOOK_FAST"


def execute_notebook(workdir: Path, fast: bool):
    """Run the notebook in ``workdir`` with nbclient (kernel ``python3`` of this interpreter); returns the executed
    notebook, streams coalesced so that progress bars keep only their final state."""
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    previous = os.environ.get(FAST_FLAG)
    os.environ[FAST_FLAG] = "1" if fast else "0"  # the kernel inherits this process's environment
    try:
        NotebookClient(nb, timeout=900, kernel_name="python3", coalesce_streams=True, record_timing=False,
                       resources={"metadata": {"path": str(workdir)}}).execute()
    finally:
        if previous is None:
            os.environ.pop(FAST_FLAG, None)
        else:
            os.environ[FAST_FLAG] = previous
    return nb


def _code_cells(nb) -> list:
    return [cell for cell in nb.cells if cell.cell_type == "code"]


def _text(cell) -> str:
    """Everything a cell printed or displayed as text."""
    parts = []
    for out in cell.get("outputs", []):
        if out.output_type == "stream":
            parts.append(out.text)
        elif "data" in out:
            parts.append(out.data.get("text/plain", ""))
    return "".join(parts)


def _printed_percent(nb, label: str) -> float:
    """The percentage printed after ``label:`` (the first cell that prints it)."""
    for cell in _code_cells(nb):
        match = re.search(re.escape(label) + r":\s+([0-9.]+)%", _text(cell))
        if match:
            return float(match.group(1))
    raise AssertionError(f"the notebook printed no {label!r} line")


@pytest.mark.slow
def test_notebook_runs_and_the_reloaded_model_keeps_its_accuracy(tmp_path):
    pytest.importorskip("nbclient", reason="the dev extra's nbclient and ipykernel run the notebook")
    nb = execute_notebook(tmp_path, fast=True)
    assert not [o for c in _code_cells(nb) for o in c.outputs if o.output_type == "error"]
    assert "fast (CI) run" in _text(_code_cells(nb)[0])
    assert _printed_percent(nb, "reloaded accuracy") == _printed_percent(nb, "DKM 2-bit accuracy")
    assert _printed_percent(nb, "DKM 2-bit accuracy") > 50.0  # 10 classes: chance is 10%
    out = tmp_path / "finetune_dkm_outputs"
    assert (out / "model.safetensors").is_file() and (out / "model.mlpackage").is_dir()
    # the printed sizes are the files' sizes; 2 bits per palettized weight make the file several times smaller
    sizes = dict(re.findall(r"^(\S+)\s+([0-9.]+) KB$", _text(_code_cells(nb)[-1]), flags=re.M))
    assert float(sizes["model.safetensors"]) == pytest.approx((out / "model.safetensors").stat().st_size / 1024,
                                                              abs=0.05)
    assert float(sizes["model.safetensors"]) < float(sizes["float.pt"]) / 8
    kinds = {o.output_type for c in _code_cells(nb) for o in c.outputs if "image/png" in o.get("data", {})}
    assert kinds == {"display_data"}  # the histograms and the accuracy plot render inline


def test_committed_outputs_are_from_a_full_run():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    cells = _code_cells(nb)
    assert [c.execution_count for c in cells] == list(range(1, len(cells) + 1)), "run top to bottom, then commit"
    assert not [o for c in cells for o in c.outputs if o.output_type == "error"]
    assert "full run" in _text(cells[0])
    assert _printed_percent(nb, "reloaded accuracy") == _printed_percent(nb, "DKM 2-bit accuracy")
    assert sum("image/png" in o.get("data", {}) for c in cells for o in c.outputs) >= 2


def test_notebook_imports_only_the_public_api():
    import dkm_palett

    nb = nbformat.read(NOTEBOOK, as_version=4)
    names = []
    for cell in _code_cells(nb):
        for node in ast.walk(ast.parse(cell.source)):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dkm_palett"):
                assert node.module == "dkm_palett", f"imports from the internal module {node.module}"
                names += [alias.name for alias in node.names]
            elif isinstance(node, ast.Import):
                assert not [a.name for a in node.names if a.name.startswith("dkm_palett.")]
    assert names and set(names) <= set(dkm_palett.__all__), set(names) - set(dkm_palett.__all__)


if __name__ == "__main__":  # regenerate the committed outputs from a full run
    with tempfile.TemporaryDirectory() as tmp:
        nbformat.write(execute_notebook(Path(tmp), fast=False), NOTEBOOK)
    print(f"wrote {NOTEBOOK}", file=sys.stderr)
