"""Progress bars on the long operations: ``progress=True`` shows them (on stderr), ``False`` hides them, ``None``
(the default) hides them when the session is not interactive, as under pytest; the results do not change."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dkm_palett import (
    DKMPalettizer,
    DKMPalettizerConfig,
    KMeansPalettizer,
    ModuleDKMPalettizerConfig,
    OpPalettizerConfig,
    OptimizationConfig,
    SensitiveKMeansPalettizer,
    palettize_weights,
)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 96), nn.ReLU(), nn.Linear(96, 32), nn.ReLU(), nn.Linear(32, 4))


def _dkm_run(progress):
    model = _model()
    config = DKMPalettizerConfig(global_config=ModuleDKMPalettizerConfig(n_bits=2, weight_threshold=1000))
    palettizer = DKMPalettizer(model, config, progress=progress)
    palettizer.prepare(inplace=True)
    model.train()
    model(torch.randn(8, 32)).sum().backward()  # the first forward initialises both selected layers
    palettizer.finalize(inplace=True)
    return model


@pytest.mark.parametrize("progress", [False, None])
def test_dkm_bars_follow_the_switch(capsys, progress):
    shown = [p.detach().clone() for p in _dkm_run(True).parameters()]
    err = capsys.readouterr().err
    assert "DKM k-means init" in err and "2/2" in err and "DKM finalize" in err
    hidden = [p.detach().clone() for p in _dkm_run(progress).parameters()]
    assert capsys.readouterr().err == ""
    assert all(torch.equal(a, b) for a, b in zip(shown, hidden))


@pytest.mark.parametrize("progress", [False, None])
def test_post_training_bars_follow_the_switch(capsys, progress):
    config = OptimizationConfig(global_config=OpPalettizerConfig(mode="kmeans", nbits=3, weight_threshold=1000))
    shown = palettize_weights(_model(), config, progress=True)
    assert "post-training k-means" in capsys.readouterr().err
    hidden = palettize_weights(_model(), config, progress=progress)
    assert capsys.readouterr().err == ""
    assert torch.equal(shown[0].weight, hidden[0].weight) and torch.equal(shown[2].weight, hidden[2].weight)
    KMeansPalettizer(_model()).prepare(progress=True)
    assert "post-training k-means" in capsys.readouterr().err
    KMeansPalettizer(_model()).prepare(progress=progress)
    assert capsys.readouterr().err == ""


def test_sensitivity_calibration_bar_counts_batches(capsys):
    batches = [(torch.randn(4, 32), torch.randint(0, 4, (4,))) for _ in range(5)]

    def loss_fn(model, batch):
        return nn.functional.cross_entropy(model(batch[0]), batch[1])

    SensitiveKMeansPalettizer(_model()).compress(batches, loss_fn, num_batches=3, progress=True)
    err = capsys.readouterr().err
    assert "sensitivity calibration" in err and "3/3" in err and "post-training k-means" in err
    SensitiveKMeansPalettizer(_model()).compress(batches, loss_fn, num_batches=3, progress=False)
    assert capsys.readouterr().err == ""


def test_bad_progress_value_is_named():
    with pytest.raises(TypeError, match=r"progress must be True, False or None"):
        palettize_weights(_model(), OpPalettizerConfig(mode="kmeans", nbits=2), progress="yes")
    with pytest.raises(TypeError, match=r"progress must be True, False or None"):
        DKMPalettizer(_model(), progress=1)


def test_coreml_export_bar_follows_the_switch(capsys, tmp_path):
    pytest.importorskip("coremltools")
    from dkm_palett import export_coreml

    model = palettize_weights(_model(), OpPalettizerConfig(mode="kmeans", nbits=2, weight_threshold=1000),
                              progress=False)
    export_coreml(model, torch.zeros(1, 32), tmp_path / "shown.mlpackage", progress=True)
    err = capsys.readouterr().err
    assert "Core ML export" in err and "4/4" in err and "convert" in err
    export_coreml(model, torch.zeros(1, 32), tmp_path / "hidden.mlpackage", progress=False)
    assert capsys.readouterr().err == ""
    assert (tmp_path / "shown.mlpackage").is_dir() and (tmp_path / "hidden.mlpackage").is_dir()
