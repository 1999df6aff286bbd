"""The palettized weight is recomputed in backward instead of kept: bit-identical to the stored path."""

import copy

import pytest
import torch
from torch import nn

from dkm_palett import DKMPalettizer, DKMPalettizerConfig, FakePalettize, ModuleDKMPalettizerConfig
from dkm_palett import recompute


class Net(nn.Module):
    """Embedding -> Linear -> MultiheadAttention (in_proj + out_proj) -> Conv1d -> Linear head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(64, 32)
        self.fc = nn.Linear(32, 64)
        self.attn = nn.MultiheadAttention(64, 4, batch_first=True)
        self.conv = nn.Conv1d(64, 48, 3, padding=1)
        self.head = nn.Linear(48, 16)

    def forward(self, tokens):
        h = torch.relu(self.fc(self.embed(tokens)))
        h, _ = self.attn(h, h, h, need_weights=False)
        h = torch.relu(self.conv(h.transpose(1, 2))).transpose(1, 2)
        return self.head(h)


def _train(model_cfg, recompute_on: bool, steps: int = 3, calls: list | None = None):
    torch.manual_seed(0)
    model = Net()
    tokens = torch.randint(0, 64, (4, 12))
    target = torch.randint(0, 16, (4, 12))
    pal = DKMPalettizer(model, DKMPalettizerConfig(global_config=ModuleDKMPalettizerConfig(**model_cfg)))
    model = pal.prepare(inplace=True)
    for _, _, _, fp in _layers(model):
        fp.recompute = recompute_on
        if calls is not None:
            original = fp._replay
            fp._replay = lambda *a, _orig=original, **k: calls.append(1) or _orig(*a, **k)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    history = []
    for _ in range(steps):
        opt.zero_grad()
        out = model(tokens)
        loss = nn.functional.cross_entropy(out.reshape(-1, 16), target.reshape(-1))
        loss.backward()
        history.append((out.detach().clone(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        opt.step()
        pal.step()
    return pal, model, history


def _layers(model):
    from dkm_palett.palettizer import fake_palettizers

    return list(fake_palettizers(model))


CONFIGS = {
    "binned": dict(n_bits=2, weight_threshold=0, dkm_impl="binned", dkm_bins=64),
    "dense": dict(n_bits=2, weight_threshold=0, dkm_impl="dense"),  # exact: the fused kernels on CPU
    "fused-4bit-lambda": dict(n_bits=4, weight_threshold=0, palett_lambda=0.3, enforce_zero=True),
    "scaled-grouped": dict(n_bits=2, weight_threshold=0, enable_per_channel_scale=True,
                           granularity="per_grouped_channel", group_size=16),
    "vector-gsm": dict(n_bits=2, weight_threshold=0, cluster_dim=2, palett_mode="gsm"),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_recomputed_weight_is_bit_identical_to_stored(name):
    calls: list = []
    _, model_r, rec = _train(CONFIGS[name], True, calls=calls)
    _, model_s, stored = _train(CONFIGS[name], False)
    assert len(_layers(model_r)) == 6  # embed, fc, attn.in_proj, attn.out_proj, conv, head
    # every layer whose output a matmul/conv saves was rebuilt in backward (the embedding's output is not saved)
    assert len(calls) == 3 * 5
    for (out_r, grads_r), (out_s, grads_s) in zip(rec, stored):
        assert torch.equal(out_r, out_s)
        assert grads_r.keys() == grads_s.keys()
        for key in grads_r:
            assert torch.equal(grads_r[key], grads_s[key]), key
    for (n, _, _, fp_r), (_, _, _, fp_s) in zip(_layers(model_r), _layers(model_s)):
        assert torch.equal(fp_r.centroids, fp_s.centroids), n


def test_fused_recompute_runs_only_the_output_pass(monkeypatch):
    """The fused engine's replay rebuilds W_p from the forward's last centroids: one output pass per replayed
    layer, no k-means iteration again (test_recomputed_weight_is_bit_identical_to_stored checks the values)."""
    from dkm_palett import dkm_fused_kernels

    counts = {}
    for name in ("_sums_kernel", "_table_kernel"):
        kernel = getattr(dkm_fused_kernels, name)
        monkeypatch.setattr(dkm_fused_kernels, name, lambda *a, _k=kernel, _n=name: counts.__setitem__(
            _n, counts.get(_n, 0) + 1) or _k(*a))
    per_mode = {}
    for recompute_on in (True, False):
        counts.clear()
        calls: list = []
        _train(CONFIGS["dense"], recompute_on, steps=2, calls=calls if recompute_on else None)
        per_mode[recompute_on] = (dict(counts), len(calls))
    (on, replays), (off, _) = per_mode[True], per_mode[False]
    assert replays == 2 * 5
    assert on["_sums_kernel"] == off["_sums_kernel"]
    assert on["_table_kernel"] == off["_table_kernel"] + replays


def test_binned_recompute_runs_only_the_output_pass(monkeypatch):
    """The binned engine's replay interpolates the forward's per-bin table again: no histogram and no k-means
    again in backward (the values: test_recomputed_weight_is_bit_identical_to_stored)."""
    from dkm_palett import dkm_binned

    counts = {"power_sums": 0, "interpolate": 0}  # power_sums: the histogram pass of both per-point stages
    for name in counts:
        method = getattr(dkm_binned._Grid, name)
        monkeypatch.setattr(dkm_binned._Grid, name, lambda self, *a, _m=method, _n=name: counts.__setitem__(
            _n, counts[_n] + 1) or _m(self, *a))
    per_mode = {}
    for recompute_on in (True, False):
        counts.update(power_sums=0, interpolate=0)
        calls: list = []
        _train(CONFIGS["binned"], recompute_on, steps=2, calls=calls if recompute_on else None)
        per_mode[recompute_on] = (dict(counts), len(calls))
    (on, replays), (off, _) = per_mode[True], per_mode[False]
    assert replays == 2 * 5
    assert on["power_sums"] == off["power_sums"] > 0
    assert on["interpolate"] == off["interpolate"] + replays


def test_stored_path_keeps_one_weight_copy_per_layer_and_recompute_keeps_none(monkeypatch):
    """What autograd keeps between forward and backward: with recompute no saved tensor of a palettized weight's
    shape (the saved views of W_p become Replays); the stored path keeps one per Linear/Conv/attention weight."""
    pack = recompute._pack
    for recompute_on, expected in ((True, 0), (False, 5)):
        torch.manual_seed(0)
        model = DKMPalettizer(Net(), DKMPalettizerConfig(global_config=ModuleDKMPalettizerConfig(
            **CONFIGS["binned"]))).prepare()
        for _, _, _, fp in _layers(model):
            fp.recompute = recompute_on
        weights = {tuple(sorted(p.shape)) for n, p in model.named_parameters() if n.endswith("original")}
        kept = []
        monkeypatch.setattr(recompute, "_pack", lambda t: kept.append(pack(t)) or kept[-1])
        model(torch.randint(0, 64, (2, 5)))
        full = [t for t in kept if isinstance(t, torch.Tensor) and tuple(sorted(t.shape)) in weights
                and t.is_floating_point()]
        replays = [t for t in kept if isinstance(t, recompute.Replay)]
        assert len(full) == expected
        assert len(replays) == 5 - expected


def test_weight_changed_before_backward_is_a_clear_error():
    torch.manual_seed(0)
    model = DKMPalettizer(nn.Sequential(nn.Linear(16, 32)), DKMPalettizerConfig(
        global_config=ModuleDKMPalettizerConfig(n_bits=2, weight_threshold=0))).prepare()
    loss = model(torch.randn(3, 16, requires_grad=True)).square().sum()
    with torch.no_grad():
        model[0].parametrizations.weight.original.add_(0.1)
    with pytest.raises(RuntimeError, match="modified in place between forward and backward"):
        loss.backward()


def test_finalize_removes_the_hooks():
    pal = DKMPalettizer(Net(), DKMPalettizerConfig(global_config=ModuleDKMPalettizerConfig(n_bits=2,
                                                                                           weight_threshold=0)))
    model = pal.prepare()
    assert recompute._enter in model.fc._forward_pre_hooks.values()
    final = pal.finalize()
    for module in final.modules():
        assert recompute._enter not in module._forward_pre_hooks.values()
        assert recompute._exit not in module._forward_hooks.values()
    assert isinstance(copy.deepcopy(final), Net)
    assert FakePalettize.recompute is True
