"""palett_max_mem bounds the DKM memory of the whole model, not of each layer in turn."""

import torch
from torch import nn

from dkm_palett import DKMPalettizer, DKMPalettizerConfig, ModuleDKMPalettizerConfig
from dkm_palett import budget as budget_mod
from dkm_palett.palettizer import fake_palettizers

AVAILABLE = 2 ** 20  # what the layers are told is available (monkeypatched)
CACHE = 64 * 32 * 4 * 4 * 3  # one Linear(64, 64)'s dense attention cache: 2048 pairs x K x 4 B x 3 iterations = 96 KiB


def _model(fraction: float):
    torch.manual_seed(0)
    net = nn.Sequential(*[nn.Linear(64, 64) for _ in range(4)])
    # vectors (cluster_dim=2) run the dense engine, the one that keeps its attention for backward
    # 3 iterations (not the default 1), so that one layer's cache is large against the budget
    cfg = ModuleDKMPalettizerConfig(n_bits=2, cluster_dim=2, weight_threshold=0, palett_max_mem=fraction,
                                    kmeans_max_iter=3)
    pal = DKMPalettizer(net, DKMPalettizerConfig(global_config=cfg))
    return pal.prepare()


def test_layers_share_one_budget(monkeypatch):
    monkeypatch.setattr(budget_mod, "available_memory_bytes", lambda device: AVAILABLE)
    model = _model(0.25)  # 256 KiB: half of it would let each of the 4 layers cache its 96 KiB (384 KiB in all)
    budgets = {id(fp.memory_budget) for *_, fp in fake_palettizers(model)}
    assert len(budgets) == 1
    shared = next(fake_palettizers(model))[3].memory_budget
    x = torch.randn(8, 64, requires_grad=True)
    out = model(x)
    # held from forward to backward: a layer caches only when half of what the others left covers its cache, so
    # the first layer caches (128 KiB >= 96 KiB) and the others (half of 160 KiB < 96 KiB) recompute
    assert shared.held == CACHE
    assert shared.held <= 0.25 * AVAILABLE
    out.square().sum().backward()
    assert shared.held == 0  # every engine released its cache in backward
    grads = [p.grad.clone() for p in model.parameters()]

    monkeypatch.setattr(budget_mod, "available_memory_bytes", lambda device: 0)  # no cache, smallest chunks
    model2 = _model(0.25)
    model2(x).square().sum().backward()
    # the same gradients up to float32 summation order (other chunk sizes)
    assert all((a - b.grad).norm() <= 1e-4 * a.norm() for a, b in zip(grads, model2.parameters()))


def test_forward_without_backward_releases_the_budget(monkeypatch):
    monkeypatch.setattr(budget_mod, "available_memory_bytes", lambda device: AVAILABLE)
    model = _model(0.25)
    shared = next(fake_palettizers(model))[3].memory_budget
    out = model(torch.randn(8, 64, requires_grad=True))
    assert shared.held > 0
    del out  # the graph and its engines go away without a backward
    assert shared.held == 0
