"""dkm-palett-train's command line around Hydra: one clear line for bad keys and unwritable folders, what a failed
run leaves behind, and the console of a run whose output is not a terminal."""

from __future__ import annotations

import pytest

pytest.importorskip("hydra")
pytest.importorskip("lightning")

import torch  # noqa: E402

from test_recipes import FAST, NO_EXPORT, cli  # noqa: E402


def _error_lines(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.strip()]


def test_typo_in_a_palettization_key_gets_the_did_you_mean_message_at_once(tmp_path):
    proc = cli("palettization.nbits=4", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 2
    lines = _error_lines(proc)
    assert len(lines) == 1 and lines[0].startswith(
        "error: palettization: unknown key(s) 'nbits' (did you mean 'n_bits'?). Allowed keys: ")
    assert "+palettization" not in proc.stderr and not (tmp_path / "run").exists()


@pytest.mark.parametrize("flag, field", [("hydra.run.dir", "hydra.run.dir"), ("hydra.sweep.dir", "hydra.sweep.dir")])
def test_unwritable_hydra_output_dir_is_one_line(flag, field, tmp_path):
    args = ("-m",) if field == "hydra.sweep.dir" else ()
    proc = cli(*args, f"{flag}=/proc/forbidden/run", cwd=tmp_path)
    assert proc.returncode == 2
    lines = _error_lines(proc)
    assert len(lines) == 1 and lines[0].startswith(f"error: {field}='/proc/forbidden/run' is not a writable folder (")
    assert "Traceback" not in proc.stderr


def test_failed_run_records_the_error_in_train_log(tmp_path):
    bad = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"fc.weight": torch.zeros(2, 2)}}, bad)  # not this model's weights
    run_dir = tmp_path / "run"
    proc = cli(*FAST, *NO_EXPORT, f"baseline.checkpoint={bad}", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 2
    lines = _error_lines(proc)
    assert len(lines) == 1 and "does not match the model" in lines[0] and "train.log" in lines[0]
    log = (run_dir / "train.log").read_text()
    assert "run failed: ValueError: baseline.checkpoint=" in log and "Traceback" in log
