"""DKMPalettizationCallback under DDP on CPU (gloo, 2 processes): every rank ends with identical LUTs/indices/weights,
only global rank 0 exports, and ``ddp_spawn`` hands the finalized weights with their LUT records back to the main
process.

Each strategy runs this file as a script in a subprocess (the ``ddp`` launcher re-executes the script for rank 1);
every rank saves what it holds after fit to ``<out>/rank<r>.pt`` and the test compares the files.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

L = pytest.importorskip("lightning")
from lightning.pytorch.callbacks import Callback  # noqa: E402

from dkm_palett.callbacks import DKMPalettizationCallback  # noqa: E402

HERE = Path(__file__).resolve().parent
CONFIG = {
    "global_config": {"n_bits": 2, "weight_threshold": 100},
    # net.3 is sensitivity-weighted: step() all-reduces its Fisher estimate on every rank, so this also shows the
    # collective runs under Lightning without a hang (tests/test_sensitivity_ddp.py checks the averaging itself)
    "module_name_configs": {"net.3": {"n_bits": 3, "weight_threshold": 100, "milestone": 2,
                                      "sensitivity_weighted": True}},
}
_DIST_ENV = ("LOCAL_RANK", "NODE_RANK", "GLOBAL_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK",
             "MASTER_ADDR", "MASTER_PORT")


# ----------------------------------------------------------------------------------------------- script side


class SaveRankState(Callback):
    """After the DKM callback finalized: save this rank's LUTs, indices, weights and step count."""

    def __init__(self, callback, out: Path):
        self.callback, self.out = callback, out

    def on_fit_end(self, trainer, pl_module):
        from dkm_palett.io import atomic_torch_save
        from dkm_palett.palettized_weight import palettized_tensors

        records = {name: {"lut": rec.lut, "indices": rec.indices} for name, _, _, rec in palettized_tensors(pl_module)}
        atomic_torch_save({"records": records, "state_dict": pl_module.state_dict(),
                           "step_count": self.callback.step_count, "global_step": trainer.global_step,
                           "world_size": trainer.world_size, "finalized": self.callback.finalized,
                           "exported": sorted(self.callback.export_paths)},
                          self.out / f"rank{trainer.global_rank}.pt")
        trainer.strategy.barrier("saved")


class FailingExport(DKMPalettizationCallback):
    """The export raises on rank 0; each rank writes what it leaves ``on_fit_end`` with to error<rank>.txt."""

    def export(self, pl_module):
        raise ValueError("converter crashed")

    def on_fit_end(self, trainer, pl_module):
        try:
            super().on_fit_end(trainer, pl_module)
        except Exception as err:
            (self.export_dir.parent / f"error{trainer.global_rank}.txt").write_text(f"{type(err).__name__}: {err}")
            raise


def run_failing_export(strategy: str, out: Path) -> None:
    """The export raises on rank 0 (as a coremltools error would); every rank must leave with the same error."""
    import torch

    from helpers_lightning import DigitsClassifier, DigitsDataModule

    torch.set_num_threads(1)
    callback = FailingExport(CONFIG, export_dir=out / "artifacts", exports=("safetensors",))
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[callback])
    try:
        trainer.fit(DigitsClassifier(), DigitsDataModule())
    except Exception as err:  # noqa: BLE001 - the launching process records what reached it
        (out / f"launcher{os.getpid()}.txt").write_text(f"{type(err).__name__}: {err}")
        sys.exit(3)


def run_training(strategy: str, out: Path) -> None:
    import torch

    from dkm_palett.io import atomic_torch_save
    from helpers_lightning import DigitsClassifier, DigitsDataModule

    torch.set_num_threads(1)
    callback = DKMPalettizationCallback(CONFIG, export_dir=out / "artifacts", exports=("safetensors",))
    module = DigitsClassifier()
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_epochs=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[callback, SaveRankState(callback, out)])
    trainer.fit(module, DigitsDataModule())
    if strategy == "ddp_spawn":  # the main process: the workers' finalized weights were loaded into ``module``
        from dkm_palett.palettized_weight import palettized_tensors

        records = {name: {"lut": rec.lut, "indices": rec.indices} for name, _, _, rec in palettized_tensors(module)}
        atomic_torch_save({"state_dict": module.state_dict(), "records": records}, out / "main.pt")


# ----------------------------------------------------------------------------------------------- test side


def _run_script(strategy: str, out: Path, mode: str = "train") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in _DIST_ENV and not k.startswith(("SLURM_", "PL_", "TORCHELASTIC_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])  # helpers_lightning
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), strategy, str(out), mode], cwd=str(out),
                          env=env, capture_output=True, text=True, timeout=180)  # a hang fails here
    if mode == "train":
        assert proc.returncode == 0, f"{strategy} run failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return proc


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "ddp_spawn"])
def test_failed_export_reaches_every_rank_with_the_same_error(strategy, tmp_path):
    torch = pytest.importorskip("torch")
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    proc = _run_script(strategy, tmp_path, mode="fail")
    assert proc.returncode == 3, proc.stderr[-4000:]
    expected = ("ExportError: DKMPalettizationCallback: the export to " + repr(str(tmp_path / "artifacts")) +
                " failed on global rank 0: ValueError: converter crashed")
    for rank in (0, 1):
        assert (tmp_path / f"error{rank}.txt").read_text() == expected, rank
    launchers = [p.read_text() for p in tmp_path.glob("launcher*.txt")]
    if strategy == "ddp":  # each rank runs the script: both leave fit with the same error
        assert launchers == [expected] * 2
    else:  # the main process (not a rank) gets the worker's error with its traceback
        assert len(launchers) == 1 and expected.split(": ", 1)[1] in launchers[0]
    assert "Connection closed by peer" not in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "ddp_spawn"])
def test_ddp_ranks_hold_identical_luts(strategy, tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("lightning")
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    from dkm_palett.export import load_compressed
    from helpers_lightning import DigitsClassifier

    _run_script(strategy, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for state in ranks:
        assert state["world_size"] == 2 and state["finalized"]
        assert state["step_count"] == state["global_step"] == 8  # 512 samples / 2 ranks / 64 per batch * 2 epochs
        assert sorted(state["records"]) == ["net.1.weight", "net.3.weight"]
        assert not any("parametrizations" in k for k in state["state_dict"])
    first, second = ranks
    for name, rec in first["records"].items():
        assert torch.equal(rec["lut"], second["records"][name]["lut"]), name
        assert torch.equal(rec["indices"], second["records"][name]["indices"]), name
        weight = first["state_dict"][name]
        assert weight.unique().numel() <= rec["lut"].shape[1]
    assert first["state_dict"].keys() == second["state_dict"].keys()
    for key, value in first["state_dict"].items():
        assert torch.equal(value, second["state_dict"][key]), key

    # only global rank 0 exported; the export holds rank 0's weights
    assert first["exported"] == ["report", "safetensors"] and second["exported"] == []
    assert sorted(p.name for p in (tmp_path / "artifacts").iterdir()) == ["model.report.json", "model.safetensors"]
    loaded = load_compressed(tmp_path / "artifacts" / "model.safetensors", DigitsClassifier(seed=1)).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in first["state_dict"].items())

    if strategy == "ddp_spawn":  # the main process holds rank 0's weights and LUT records, with no reload
        main = torch.load(tmp_path / "main.pt", weights_only=True)
        assert all(torch.equal(main["state_dict"][k], v) for k, v in first["state_dict"].items())
        assert sorted(main["records"]) == ["net.1.weight", "net.3.weight"]
        for name, rec in first["records"].items():
            assert torch.equal(rec["lut"], main["records"][name]["lut"]), name
            assert torch.equal(rec["indices"], main["records"][name]["indices"]), name


if __name__ == "__main__":
    sys.path[:0] = [str(HERE)]
    (run_failing_export if sys.argv[3:] == ["fail"] else run_training)(sys.argv[1], Path(sys.argv[2]).resolve())
