"""DKMPalettizationCallback configured from YAML through LightningCLI (jsonargparse): ``config`` as an inline dict
or a YAML path, the exports written at fit end, and a bad ``n_bits`` failing with the config's one-line error."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
import yaml

pytest.importorskip("lightning")
pytest.importorskip("jsonargparse", reason="LightningCLI needs the dev extra's jsonargparse[signatures]")

from lightning.pytorch.cli import LightningCLI  # noqa: E402

from dkm_palett import load_compressed  # noqa: E402
from dkm_palett.callbacks import DKMPalettizationCallback  # noqa: E402
from helpers_lightning import DigitsClassifier, DigitsDataModule  # noqa: E402

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
logging.getLogger("coremltools").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", module="coremltools")

CALLBACK_PATH = "dkm_palett.callbacks.DKMPalettizationCallback"
BAD_N_BITS = "n_bits=5 is not allowed; allowed values: 1, 2, 3, 4, 6, 8."


def _write_cli_yaml(tmp_path, callback_args: dict):
    """A LightningCLI config: one quiet CPU epoch of the digits classifier with the DKM callback."""
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_epochs": 1, "logger": False, "enable_checkpointing": False,
            "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0,
            "default_root_dir": str(tmp_path),
            "callbacks": [{"class_path": CALLBACK_PATH, "init_args": callback_args}],
        },
        "model": {"arch": "mlp", "hidden": 64},
    }
    path = tmp_path / "cli.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _fit(config_path) -> LightningCLI:
    return LightningCLI(DigitsClassifier, DigitsDataModule, args=["fit", "--config", str(config_path)],
                        save_config_callback=None)


def _dkm_callback(cli: LightningCLI) -> DKMPalettizationCallback:
    found = [cb for cb in cli.trainer.callbacks if isinstance(cb, DKMPalettizationCallback)]
    assert len(found) == 1
    return found[0]


def _lut_sizes(safetensors_path) -> dict:
    """Distinct values of every palettized weight, read back from the portable export into a fresh model."""
    model = DigitsClassifier(arch="mlp", hidden=64)
    load_compressed(safetensors_path, model)
    return {name: int(torch.unique(param).numel()) for name, param in model.named_parameters() if param.dim() == 2}


def test_cli_inline_dict_config_fits_and_exports(tmp_path):
    out = tmp_path / "artifacts"
    # weight_threshold=512 selects both Linear weights (4096 and 640 elements); the default (2048) would skip one.
    path = _write_cli_yaml(tmp_path, {"config": {"global_config": {"n_bits": 2, "weight_threshold": 512}},
                                      "export_dir": str(out), "exports": ["coreml", "safetensors"]})
    cli = _fit(path)
    cb = _dkm_callback(cli)
    assert cb.finalized and cb.config.global_config.n_bits == 2 and cb.config.global_config.weight_threshold == 512
    assert (out / "model.mlpackage").is_dir()
    assert (out / "model.safetensors").is_file() and (out / "model.report.json").is_file()
    assert _lut_sizes(out / "model.safetensors") == {"net.1.weight": 4, "net.3.weight": 4}


def test_cli_config_from_yaml_path(tmp_path):
    dkm_yaml = tmp_path / "dkm.yaml"
    dkm_yaml.write_text(yaml.safe_dump({"global_config": {"n_bits": 3, "weight_threshold": 512},
                                        "module_name_configs": {"net.3": None}}))
    out = tmp_path / "artifacts"
    path = _write_cli_yaml(tmp_path, {"config": str(dkm_yaml), "export_dir": str(out), "exports": "safetensors"})
    cb = _dkm_callback(_fit(path))
    assert cb.config.global_config.n_bits == 3 and cb.config.module_name_configs == {"net.3": None}
    sizes = _lut_sizes(out / "model.safetensors")
    assert sizes["net.1.weight"] == 8 and sizes["net.3.weight"] > 8  # the head was left in float
    assert not (out / "model.mlpackage").exists()


def test_cli_bad_n_bits_fails_with_one_line_error_before_fit(tmp_path):
    out = tmp_path / "artifacts"
    path = _write_cli_yaml(tmp_path, {"config": {"global_config": {"n_bits": 5}}, "export_dir": str(out)})
    with pytest.raises(ValueError) as info:
        _fit(path)
    lines = [line.strip().lstrip("- ") for line in str(info.value).splitlines()]
    assert BAD_N_BITS in lines
    assert not any(entry.name == "fit" for entry in info.traceback)  # raised while building the Trainer
    assert not out.exists()


def test_readme_lightning_cli_yaml_runs_as_written(tmp_path, monkeypatch):
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    blocks = [b for b in readme.split("```yaml\n")[1:] if "DKMPalettizationCallback" in b]
    assert len(blocks) == 1
    callbacks = yaml.safe_load(blocks[0].split("```")[0])["trainer"]["callbacks"]
    assert callbacks[0]["class_path"] == CALLBACK_PATH
    monkeypatch.chdir(tmp_path)  # export_dir: artifacts/ is relative
    path = _write_cli_yaml(tmp_path, callbacks[0]["init_args"])
    cb = _dkm_callback(_fit(path))
    assert cb.config.global_config.n_bits == 4
    assert (tmp_path / "artifacts" / "model.mlpackage").is_dir()
    assert (tmp_path / "artifacts" / "model.safetensors").is_file()
