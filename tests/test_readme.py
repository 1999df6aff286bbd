"""Every ```python block of README.md runs as written, each in a fresh process and an empty folder."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), flags=re.S | re.M)


def test_readme_has_the_three_python_examples():
    blocks = python_blocks()
    assert len(blocks) == 3
    assert "DKMPalettizer(model, config)" in blocks[0]
    assert "DKMPalettizationCallback(" in blocks[1] and "load_prepared" in blocks[1]
    assert "palettize_weights(" in blocks[2]


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_python_block_runs(index, tmp_path):
    pytest.importorskip("lightning")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PL_", "LOCAL_RANK", "WORLD_SIZE"))}
    env["OMP_NUM_THREADS"] = "1"
    env.pop("PYTHONPATH", None)  # the installed package, as a user has it
    proc = subprocess.run([sys.executable, "-c", python_blocks()[index]], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"README block {index} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    if index == 1:
        assert proc.stdout.strip().splitlines()[-1] == "32"
        assert sorted(p.name for p in (tmp_path / "artifacts").iterdir()) == [
            "model.mlpackage", "model.report.json", "model.safetensors"]
    if index == 2:
        assert proc.stdout.strip().splitlines()[-1] == "True True"


@pytest.mark.parametrize("section,table,prefixes,count", [
    ("## Accuracy against coremltools", "benchmarks/results/quality.md", ("| charlm", "| mnist"), 10),
    ("## Speed", "benchmarks/README.md", ("| 1M |", "| 4M |"), 6),
    ("## Speed", "benchmarks/results/model_scale.md", ("| 125m |", "| 350m |", "| 1.1b |", "| resnet18 |", "| resnet50 |"), 5),
])
def test_readme_tables_quote_rows_of_the_committed_tables(section, table, prefixes, count):
    """The README's accuracy and speed tables quote the committed benchmark tables; every row must be one of
    theirs, unedited."""
    text = README.read_text(encoding="utf-8").split(section + "\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in text.splitlines() if line.startswith(prefixes)]
    committed = (README.parent / table).read_text(encoding="utf-8").splitlines()
    assert len(rows) >= count
    assert [row for row in rows if row not in committed] == []


def test_committed_quality_table_is_what_the_script_makes_of_its_rows():
    """benchmarks/results/quality.md is benchmarks/quality.py's table of the committed quality.jsonl, unedited."""
    import importlib.util
    import json

    bench = README.parent / "benchmarks"
    spec = importlib.util.spec_from_file_location("quality_bench", bench / "quality.py")
    quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quality)
    rows = [json.loads(line) for line in (bench / "results" / "quality.jsonl").read_text().splitlines() if line]
    committed = (bench / "results" / "quality.md").read_text(encoding="utf-8")
    assert committed == quality.TABLE_NOTE + "\n" + quality.table(rows)
