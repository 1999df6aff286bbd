"""DKMPalettizationCallback across Lightning's hook order and repeated fits: layers built in ``configure_model``,
a second Trainer on a still-prepared module, a failed resume, manual optimization with several optimizers."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

L = pytest.importorskip("lightning")

from dkm_palett import DKMPalettizer  # noqa: E402
from dkm_palett.callbacks import DKMPalettizationCallback  # noqa: E402
from dkm_palett.palettized_weight import palettized_tensors  # noqa: E402
from dkm_palett.palettizer import fake_palettizers  # noqa: E402
from helpers_lightning import DigitsClassifier, DigitsDataModule, make_net, quiet_trainer_kwargs  # noqa: E402

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

# net.1 starts at optimizer step 3, net.3 at once
CONFIG = {"global_config": {"n_bits": 2, "weight_threshold": 100},
          "module_name_configs": {"net.1": {"n_bits": 2, "weight_threshold": 100, "milestone": 3}}}


def _fit(module, callbacks, ckpt_path=None, **kwargs):
    trainer = L.Trainer(**quiet_trainer_kwargs(callbacks=callbacks, **kwargs))
    trainer.fit(module, DigitsDataModule(), ckpt_path=ckpt_path)
    return trainer


def _enabled(module) -> dict:
    return {name: bool(fp.enabled) for name, _, _, fp in fake_palettizers(module)}


class LazyClassifier(DigitsClassifier):
    """Builds its network in ``configure_model`` (where large models are built), not in ``__init__``."""

    def __init__(self):
        super().__init__()
        self.net = None

    def configure_model(self):
        if self.net is None:
            torch.manual_seed(0)
            self.net = make_net()


def test_layers_built_in_configure_model_are_palettized():
    module, callback = LazyClassifier(), DKMPalettizationCallback(CONFIG)
    _fit(module, [callback], max_steps=4)
    assert callback.finalized and callback.step_count == 4
    records = {name: rec for name, _, _, rec in palettized_tensors(module)}
    assert sorted(records) == ["net.1.weight", "net.3.weight"]
    assert module.net[1].weight.unique().numel() <= 4
    assert "configure_model" not in vars(module)  # the class's own hook is back


def test_second_trainer_continues_from_the_prepared_module():
    """A fit that stopped early leaves the module prepared; a fresh callback in a second Trainer continues."""
    prepared = DigitsClassifier()
    stopper = DKMPalettizationCallback(CONFIG)

    class Stop(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 5:
                raise KeyError("stop")

    with pytest.raises(KeyError):
        _fit(prepared, [stopper, Stop()], max_steps=20)
    assert _enabled(prepared) == {"net.1.weight": True, "net.3.weight": True} and stopper.step_count == 5

    class Seen(L.Callback):
        def on_train_start(self, trainer, pl_module):
            self.enabled = _enabled(pl_module)

    fresh, seen = DKMPalettizationCallback(CONFIG), Seen()
    _fit(prepared, [fresh, seen], max_steps=2)
    assert seen.enabled == {"net.1.weight": True, "net.3.weight": True}  # not disabled again
    assert fresh.step_count == 5 + 2 and fresh.finalized


def test_prepared_module_of_unknown_step_count_fails_clearly():
    module = DigitsClassifier()
    palettizer = DKMPalettizer(module, CONFIG)
    palettizer.prepare(inplace=True)
    for _ in range(4):
        palettizer.step()
    del palettizer  # nothing records the step count of this module now
    import gc

    gc.collect()
    with pytest.raises(ValueError, match=r"net\.1\.weight is past its milestone \(3\).*ckpt_path"):
        _fit(module, [DKMPalettizationCallback(CONFIG)], max_steps=2)


def test_failed_resume_leaves_a_finalized_module_finalized(tmp_path):
    module = DigitsClassifier()
    _fit(module, [DKMPalettizationCallback(CONFIG)], max_steps=4)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    records = {name: rec for name, _, _, rec in palettized_tensors(module)}
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        _fit(module, [DKMPalettizationCallback(CONFIG)], max_steps=4, ckpt_path=str(tmp_path / "missing.ckpt"))
    assert not any(True for _ in fake_palettizers(module))
    assert {name: rec for name, _, _, rec in palettized_tensors(module)} == records
    after = module.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


class TwoOptimizers(DigitsClassifier):
    """Manual optimization: one optimizer per layer, both stepped every batch (two optimizer steps per batch)."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        for opt in self.optimizers():
            opt.zero_grad()
        self.manual_backward(loss)
        for opt in self.optimizers():
            opt.step()

    def configure_optimizers(self):
        return [torch.optim.Adam(self.net[1].parameters(), lr=self.lr),
                torch.optim.Adam(self.net[3].parameters(), lr=self.lr)]


def test_manual_optimization_counts_trainer_steps_not_optimizer_steps():
    callback = DKMPalettizationCallback(CONFIG)
    trainer = _fit(TwoOptimizers(), [callback], max_epochs=1, limit_train_batches=5)
    assert trainer.global_step == 10  # Lightning counts each optimizer.step()
    assert callback.step_count == 5  # DKM counts training batches that stepped


def test_plain_load_from_checkpoint_of_a_prepared_module_names_load_prepared(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    module = DigitsClassifier()
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1)
    _fit(module, [DKMPalettizationCallback(CONFIG), ckpt], max_steps=3, enable_checkpointing=True)
    assert not any("load_prepared" in key for key in module.state_dict())  # finalized: no marker left
    path = tmp_path / "epoch=0-step=2.ckpt"
    with pytest.raises(RuntimeError, match=r'Unexpected key\(s\) in state_dict: '
                                           r'"dkm_palett_prepared__load_with__DKMPalettizationCallback_load_prepared"'):
        DigitsClassifier.load_from_checkpoint(path)
    loaded = DKMPalettizationCallback.load_prepared(DigitsClassifier(), path, finalize=True)
    assert sorted(name for name, _, _, _ in palettized_tensors(loaded)) == ["net.1.weight", "net.3.weight"]
    assert not any("load_prepared" in key for key in loaded.state_dict())
