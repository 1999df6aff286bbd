"""DKMPalettizationCallback on a real LightningModule (sklearn digits): fit -> finalized weights, exports that read
back exactly, logged metrics, resume == uninterrupted, interruption leaves a resumable state, config forms."""

from __future__ import annotations

import csv
import logging
import signal
import warnings

import numpy as np
import pytest
import torch

L = pytest.importorskip("lightning")

from lightning.pytorch.callbacks import Callback, ModelCheckpoint  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402

from dkm_palett.callbacks import DKMPalettizationCallback  # noqa: E402
from dkm_palett.config.training import DKMPalettizerConfig, ModuleDKMPalettizerConfig  # noqa: E402
from dkm_palett.palettized_weight import palettized_tensors  # noqa: E402
from dkm_palett.palettizer import fake_palettizers  # noqa: E402
from helpers_lightning import DigitsClassifier, DigitsDataModule, quiet_trainer_kwargs  # noqa: E402

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
logging.getLogger("coremltools").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", module="coremltools")

# 2-bit everywhere; the hidden Linear waits 3 optimizer steps (milestone), the classifier head uses 3 bits.
CONFIG = {
    "global_config": {"n_bits": 2, "weight_threshold": 100},
    "module_name_configs": {
        "net.1": {"n_bits": 2, "weight_threshold": 100, "milestone": 3},
        "net.3": {"n_bits": 3, "weight_threshold": 100},
    },
}
CNN_CONFIG = {
    "global_config": {"n_bits": 2, "weight_threshold": 100},
    "module_name_configs": {"net.4": {"n_bits": 2, "weight_threshold": 100, "milestone": 3},
                            "net.6": {"n_bits": 3, "weight_threshold": 100}},
}


def _fit(module, callbacks, datamodule=None, ckpt_path=None, **kwargs):
    trainer = L.Trainer(**quiet_trainer_kwargs(callbacks=callbacks, **kwargs))
    trainer.fit(module, datamodule or DigitsDataModule(), ckpt_path=ckpt_path)
    return trainer


def _records(module) -> dict:
    return {name: rec for name, _, _, rec in palettized_tensors(module)}


class Raise(Callback):
    """Raise ``error`` right after optimizer step ``at`` (after the DKM callback's own batch-end hook)."""

    def __init__(self, at: int, error: type = RuntimeError):
        self.at, self.error = at, error

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.at:
            raise self.error(f"stop at step {self.at}")


# ----------------------------------------------------------------------------------------------- full flow


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One fit of the digits CNN with exports and a CSV logger, shared by the flow tests."""
    root = tmp_path_factory.mktemp("flow")
    module = DigitsClassifier(arch="cnn")
    callback = DKMPalettizationCallback(config=CNN_CONFIG, export_dir=root / "artifacts")
    trainer = _fit(module, [callback], max_epochs=2, logger=CSVLogger(root / "logs", name="run"),
                   log_every_n_steps=1, limit_val_batches=2)
    return module, callback, trainer, root


def test_fit_finalizes_weights_into_luts(trained):
    module, callback, trainer, _ = trained
    assert callback.finalized and not any(True for _ in fake_palettizers(module))
    assert not any("parametrizations" in k for k in module.state_dict())
    records = _records(module)
    assert sorted(records) == ["net.0.weight", "net.4.weight", "net.6.weight"]
    for name, rec in records.items():
        weight = module.get_parameter(name).detach()
        assert torch.equal(weight, rec.to_dense())
        assert weight.unique().numel() <= 2 ** rec.n_bits
        assert rec.n_bits == (3 if name == "net.6.weight" else 2)
    # one DKM step per optimizer step
    assert callback.step_count == trainer.global_step == 16
    assert set(callback.report) == set(records) and all(r["palettized"] for r in callback.report.values())


def test_coreml_export_reads_back_finalized_weights(trained):
    pytest.importorskip("coremltools")
    from dkm_palett.export import read_back_lut_weights

    module, callback, _, root = trained
    path = root / "artifacts" / "model.mlpackage"
    assert callback.export_paths["coreml"] == path and path.is_dir()
    entries = {e["name"]: e for e in read_back_lut_weights(path)}
    records = _records(module)
    assert len(entries) == len(records)
    for name, rec in records.items():
        entry = entries[name.replace(".", "_")]
        dense = module.get_parameter(name).detach().numpy()
        np.testing.assert_array_equal(entry["dense"].astype(np.float32), dense)
        np.testing.assert_array_equal(entry["indices"], rec.coreml_indices().numpy())
        assert np.unique(entry["lut"]).size <= 2 ** rec.n_bits


def test_safetensors_export_round_trip_is_bit_exact(trained):
    from dkm_palett.export import load_compressed

    module, callback, _, root = trained
    path = root / "artifacts" / "model.safetensors"
    assert callback.export_paths["safetensors"] == path
    fresh = load_compressed(path, DigitsClassifier(arch="cnn", seed=7))
    expected, got = module.state_dict(), fresh.state_dict()
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    fresh_records = _records(fresh)
    for name, rec in _records(module).items():
        assert torch.equal(fresh_records[name].lut, rec.lut) and torch.equal(fresh_records[name].indices, rec.indices)
    assert (root / "artifacts" / "model.report.json").is_file()


def test_logged_metrics(trained):
    _, _, _, root = trained
    files = list((root / "logs").rglob("metrics.csv"))
    assert len(files) == 1
    with open(files[0]) as handle:
        rows = list(csv.DictReader(handle))
    step_rows = [r for r in rows if r.get("dkm/step")]
    assert len(step_rows) == 16
    waiting = [float(r["dkm/waiting_layers"]) for r in step_rows]
    active = [float(r["dkm/active_layers"]) for r in step_rows]
    # net.4 (milestone 3) waits for DKM steps 1 and 2, then all three layers are active
    assert waiting[:2] == [1.0, 1.0] and set(waiting[2:]) == {0.0}
    assert active[:2] == [2.0, 2.0] and set(active[2:]) == {3.0}
    for layer in ("net.0.weight", "net.4.weight", "net.6.weight"):
        errors = [float(r[f"dkm/{layer}/error"]) for r in step_rows if r[f"dkm/{layer}/error"]]
        assert errors and all(np.isfinite(errors)) and all(e >= 0 for e in errors)
        final = [r[f"dkm_final/{layer}/rms_error"] for r in rows if r.get(f"dkm_final/{layer}/rms_error")]
        assert len(final) == 1 and float(final[0]) > 0
    # net.4 is enabled by DKM step 3 (after that batch's forward ran without DKM): errors from batch 4 on
    assert [bool(r["dkm/net.4.weight/error"]) for r in step_rows] == [False] * 3 + [True] * 13


def test_validate_test_predict_use_finalized_model(trained):
    module, _, trainer, _ = trained
    dm = DigitsDataModule()
    dm.setup()
    x, y = dm.val_set.tensors
    module.eval()
    with torch.no_grad():
        logits = module(x)
    expected_acc = (logits.argmax(-1) == y).float().mean().item()
    result = trainer.test(module, dm, verbose=False)[0]
    assert result["test_acc"] == pytest.approx(expected_acc, abs=1e-6)
    preds = torch.cat(trainer.predict(module, dm))
    assert torch.equal(preds, logits.argmax(-1))
    assert _records(module) and not any(True for _ in fake_palettizers(module))  # still finalized


# ----------------------------------------------------------------------------------------------- config


def test_config_forms_are_equivalent(tmp_path):
    yaml_path = tmp_path / "dkm.yaml"
    yaml_path.write_text("global_config:\n  n_bits: 2\n  weight_threshold: 100\n"
                         "module_name_configs:\n  net.1:\n    n_bits: 2\n    weight_threshold: 100\n"
                         "    milestone: 3\n  net.3:\n    n_bits: 3\n    weight_threshold: 100\n")
    from_dict = DKMPalettizationCallback(CONFIG).config
    assert DKMPalettizationCallback(str(yaml_path)).config == from_dict
    assert DKMPalettizationCallback(yaml_path).config == from_dict
    assert DKMPalettizationCallback(DKMPalettizerConfig.from_dict(CONFIG)).config == from_dict
    assert DKMPalettizationCallback(None).config == DKMPalettizerConfig()
    assert DKMPalettizationCallback().config.global_config == ModuleDKMPalettizerConfig()


def test_bad_arguments_fail_at_construction(tmp_path):
    with pytest.raises(ValueError, match="n_bits"):
        DKMPalettizationCallback({"global_config": {"n_bits": 5}})
    with pytest.raises(ValueError, match="weight_treshold"):
        DKMPalettizationCallback({"global_config": {"weight_treshold": 5}})
    with pytest.raises(ValueError, match="does not exist"):
        DKMPalettizationCallback(str(tmp_path / "missing.yaml"))
    with pytest.raises(TypeError, match="config"):
        DKMPalettizationCallback(42)
    with pytest.raises(ValueError, match="exports.*'coreml', 'safetensors'"):
        DKMPalettizationCallback(exports=("onnx",))
    with pytest.raises(ValueError, match="coreml_options.*minimum_deployment_targt"):
        DKMPalettizationCallback(coreml_options={"minimum_deployment_targt": "iOS18"})
    with pytest.raises(TypeError, match="export_dir"):
        DKMPalettizationCallback(export_dir=3)


def test_config_none_uses_defaults_and_palettizes():
    module = DigitsClassifier(hidden=64)  # 64x64 hidden weight > default weight_threshold 2048; the head is not
    callback = DKMPalettizationCallback()
    _fit(module, [callback], max_steps=3)
    records = _records(module)
    assert list(records) == ["net.1.weight"]
    assert records["net.1.weight"].n_bits == 4 and module.net[1].weight.unique().numel() <= 16


def test_export_problems_are_reported_before_training(tmp_path):
    module = DigitsClassifier()
    module.example_input_array = None
    callback = DKMPalettizationCallback(CONFIG, export_dir=tmp_path, exports="coreml")
    trainer = L.Trainer(**quiet_trainer_kwargs(callbacks=[callback], max_steps=2))
    with pytest.raises(ValueError, match="example_input_array"):
        trainer.fit(module, DigitsDataModule())
    assert trainer.global_step == 0 and not any(True for _ in fake_palettizers(module))  # checked before prepare
    with pytest.raises(ValueError, match="export_module='head'"):
        _fit(DigitsClassifier(), [DKMPalettizationCallback(CONFIG, export_dir=tmp_path, export_module="head")],
             max_steps=2)
    # safetensors only needs no example input; export_module picks the submodule
    callback = DKMPalettizationCallback(CONFIG, export_dir=tmp_path, exports=["safetensors"], export_module="net",
                                        file_stem="net")
    _fit(module, [callback], max_steps=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.report.json", "net.safetensors"]
    from dkm_palett.export import load_compressed

    fresh = load_compressed(tmp_path / "net.safetensors", DigitsClassifier(seed=3).net)
    expected = module.net.state_dict()
    assert all(torch.equal(value, expected[key]) for key, value in fresh.state_dict().items())


# ----------------------------------------------------------------------------------------------- steps


class Spy(Callback):
    """Record, after each batch, the optimizer step and whether the milestone layer (net.1) is enabled."""

    def __init__(self):
        self.seen = []
        self.parametrizations_per_weight = []

    def on_train_start(self, trainer, pl_module):
        self.parametrizations_per_weight.append(
            {name: len(getattr(m.parametrizations, p)) for name, m, p, _ in fake_palettizers(pl_module)})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        fps = {name: fp for name, _, _, fp in fake_palettizers(pl_module)}
        self.seen.append((trainer.global_step, bool(fps["net.1.weight"].enabled)))


def test_one_step_per_optimizer_step_with_gradient_accumulation():
    spy = Spy()
    callback = DKMPalettizationCallback(CONFIG)
    trainer = _fit(DigitsClassifier(), [callback, spy], max_epochs=1, accumulate_grad_batches=2)
    assert trainer.global_step == 4 and callback.step_count == 4  # 8 batches, 2 per optimizer step
    assert spy.seen == [(0, False), (1, False), (1, False), (2, False), (2, False), (3, True), (3, True), (4, True)]


class SensitivitySpy(Callback):
    """After each batch (and the DKM callback's step): each layer's sensitivity folds and leftover pending sum."""

    def __init__(self):
        self.seen = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen.append({name: (int(fp.sensitivity_folds), float(fp.sensitivity_pending_cols.abs().sum()))
                          for name, _, _, fp in fake_palettizers(pl_module)})


def test_sensitivity_estimate_folds_once_per_optimizer_step():
    """sensitivity_weighted through the callback: the squared gradients of both accumulated batches are folded at
    the optimizer step (none left pending), once per step; the milestone layer starts folding when it is enabled."""
    config = {**CONFIG, "global_config": {**CONFIG["global_config"], "sensitivity_weighted": True},
              "module_name_configs": {k: {**v, "sensitivity_weighted": True}
                                      for k, v in CONFIG["module_name_configs"].items()}}
    spy = SensitivitySpy()
    module = DigitsClassifier()
    _fit(module, [DKMPalettizationCallback(config), spy], max_epochs=1, accumulate_grad_batches=2)
    assert len(spy.seen) == 8
    mid, end = spy.seen[2], spy.seen[-1]  # batch 3: accumulating, step 1 done; batch 8: step 4 done
    assert mid["net.3.weight"][0] == 1 and mid["net.3.weight"][1] > 0  # one fold, a batch pending
    assert end["net.3.weight"] == (4, 0.0) and end["net.1.weight"] == (1, 0.0)  # net.1 enabled from step 3
    assert _records(module)  # finalized as usual


def test_fit_twice_does_not_double_prepare():
    module, callback, spy = DigitsClassifier(), DKMPalettizationCallback(CONFIG), Spy()
    with pytest.raises(RuntimeError, match="stop at step 2"):
        _fit(module, [callback, spy, Raise(2)], max_epochs=1)
    assert callback.step_count == 2 and not callback.finalized
    _fit(module, [callback, spy], max_epochs=1)  # same module and callback again: continues, no second prepare
    assert callback.step_count == 2 + 8 and callback.finalized
    _fit(module, [callback, spy], max_epochs=1)  # after finalize: DKM again from the palettized weights
    assert callback.step_count == 2 + 8 + 8 and callback.finalized
    one_each = {"net.1.weight": 1, "net.3.weight": 1}
    assert spy.parametrizations_per_weight == [one_each] * 3
    for name, rec in _records(module).items():
        assert module.get_parameter(name).unique().numel() <= 2 ** rec.n_bits


# ----------------------------------------------------------------------------------------------- resume


def _final_state(module) -> dict:
    state = {k: v.clone() for k, v in module.state_dict().items()}
    for name, rec in _records(module).items():
        state[f"{name}::lut"], state[f"{name}::indices"] = rec.lut.clone(), rec.indices.clone()
    return state


# net.1 starts before the checkpoint (step 8), net.3 after it (milestone 10)
RESUME_CONFIG = {**CONFIG, "module_name_configs": {**CONFIG["module_name_configs"],
                                                   "net.3": {"n_bits": 3, "weight_threshold": 100, "milestone": 10}}}


def test_resume_equals_uninterrupted(tmp_path):
    reference_cb = DKMPalettizationCallback(RESUME_CONFIG)
    reference = DigitsClassifier()
    _fit(reference, [reference_cb], max_epochs=3)

    # interrupted after 11 steps (mid epoch 2); a checkpoint was written at the end of epoch 1 (step 8)
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, save_on_train_epoch_end=True)
    module, callback = DigitsClassifier(), DKMPalettizationCallback(RESUME_CONFIG)
    with pytest.raises(RuntimeError, match="stop at step 11"):
        _fit(module, [callback, ckpt_cb, Raise(11)], max_epochs=3, enable_checkpointing=True)
    assert not callback.finalized and callback.step_count == 11
    ckpt = tmp_path / "epoch=0-step=8.ckpt"
    assert ckpt.is_file()
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)  # only tensors and primitives
    assert saved["callbacks"]["DKMPalettizationCallback"]["step_count"] == 8
    enabled = {k: bool(v) for k, v in saved["state_dict"].items() if k.endswith(".enabled")}
    assert enabled == {"net.1.parametrizations.weight.0.enabled": True, "net.3.parametrizations.weight.0.enabled": False}
    assert any(k.endswith("parametrizations.weight.0.centroids") for k in saved["state_dict"])

    resumed, resumed_cb = DigitsClassifier(seed=123), DKMPalettizationCallback(RESUME_CONFIG)
    _fit(resumed, [resumed_cb], max_epochs=3, ckpt_path=str(ckpt))
    assert resumed_cb.step_count == reference_cb.step_count == 24
    expected, got = _final_state(reference), _final_state(resumed)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key  # bit-exact: same data order, restored optimizer + DKM
    for name in _records(reference):
        assert torch.equal(expected[f"{name}::indices"], got[f"{name}::indices"])


def test_interruption_leaves_resumable_state(tmp_path):
    module, callback = DigitsClassifier(), DKMPalettizationCallback(CONFIG)
    trainer = L.Trainer(**quiet_trainer_kwargs(callbacks=[callback, Raise(5, KeyboardInterrupt)], max_epochs=2))
    try:
        with pytest.raises(SystemExit):  # Lightning turns Ctrl+C into a graceful shutdown + exit(1)
            trainer.fit(module, DigitsDataModule())
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    assert trainer.interrupted and not callback.finalized and callback.step_count == 5
    fps = {name: fp for name, _, _, fp in fake_palettizers(module)}
    assert sorted(fps) == ["net.1.weight", "net.3.weight"] and not _records(module)
    assert bool(fps["net.1.weight"].enabled) and bool(fps["net.1.weight"].initialized)

    ckpt = tmp_path / "interrupted.ckpt"
    trainer.save_checkpoint(ckpt)
    state = {k: v.clone() for k, v in module.state_dict().items()}

    # a fresh module loads the prepared checkpoint (outside of fit) ...
    loaded = DKMPalettizationCallback.load_prepared(DigitsClassifier(seed=5), ckpt)
    assert loaded.state_dict().keys() == state.keys()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())
    final = DKMPalettizationCallback.load_prepared(DigitsClassifier(seed=5), ckpt, finalize=True)
    assert sorted(_records(final)) == ["net.1.weight", "net.3.weight"]

    # ... and fit resumes from it: same DKM state and step count at the restart, finalized at the end
    class Check(Callback):
        def on_train_start(self, trainer, pl_module):
            self.step_count = resumed_cb.step_count
            self.same = all(torch.equal(pl_module.state_dict()[k], v) for k, v in state.items())

    resumed, resumed_cb, check = DigitsClassifier(seed=5), DKMPalettizationCallback(CONFIG), Check()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # mid-epoch resume warning
        trainer = _fit(resumed, [resumed_cb, check], max_epochs=2, ckpt_path=str(ckpt))
    assert check.step_count == 5 and check.same
    assert resumed_cb.finalized and resumed_cb.step_count == trainer.global_step
    for name, rec in _records(resumed).items():
        assert resumed.get_parameter(name).unique().numel() <= 2 ** rec.n_bits
