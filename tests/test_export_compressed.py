"""Portable compressed format: real size reduction and a bit-exact round trip for every LUT layout."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from dkm_palett import lut as lut_mod
from dkm_palett import palettized_weight as pw_mod
from dkm_palett.export.compressed import FORMAT_VERSION, load_compressed, save_compressed
from dkm_palett.spec import LUT_DTYPES, PalettizationSpec, PerGroupedChannelGranularity


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(32, 16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.conv = nn.Conv2d(16, 8, 3)
        self.fc = nn.Linear(16, 8)
        self.norm = nn.LayerNorm(8)
        self.register_buffer("running", torch.arange(5.0))


def _palettize(module, param, spec, per_channel_scale=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = getattr(module, param).detach()
    groups = w.shape[spec.axis] // spec.group_size_for(tuple(w.shape))
    scale = lut_mod.channel_scale(w, spec.axis) if per_channel_scale else None
    spread = 1.0 if per_channel_scale else float(w.abs().max())
    lut = (torch.rand(groups, 2 ** spec.n_bits, spec.cluster_dim, generator=gen) * 2 - 1) * spread
    pw_mod.attach(module, param, lut_mod.palettize_with_lut(w, lut, spec, scale))


def _net(spec, per_channel_scale=False, seed=0) -> Net:
    torch.manual_seed(seed)
    net = Net()
    for i, (module, param) in enumerate([(net.emb, "weight"), (net.attn, "in_proj_weight"),
                                         (net.conv, "weight"), (net.fc, "weight")]):
        _palettize(module, param, spec, per_channel_scale, seed=i)
    return net


def _read(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}


def _assert_same(a: nn.Module, b: nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    ra = {n: r for n, _, _, r in pw_mod.palettized_tensors(a)}
    rb = {n: r for n, _, _, r in pw_mod.palettized_tensors(b)}
    assert ra.keys() == rb.keys() and len(ra) == 4
    for n in ra:
        x, y = ra[n], rb[n]
        assert torch.equal(x.to_dense(), y.to_dense())
        assert torch.equal(x.lut, y.lut) and torch.equal(x.indices, y.indices)
        assert (x.shape, x.axis, x.group_size, x.n_bits, x.lut_dtype, x.dtype) == \
               (y.shape, y.axis, y.group_size, y.n_bits, y.lut_dtype, y.dtype)
        assert (x.scale is None) == (y.scale is None)
        if x.scale is not None:
            assert torch.equal(x.scale, y.scale)
        if x.lut_quant is not None:
            assert torch.equal(x.lut_quant.q, y.lut_quant.q)


@pytest.mark.parametrize("lut_dtype", LUT_DTYPES)
def test_round_trip_is_bit_exact_for_every_lut_dtype(tmp_path, lut_dtype):
    src = _net(PalettizationSpec(n_bits=4, lut_dtype=lut_dtype))
    path = tmp_path / "m.safetensors"
    save_compressed(src, path)
    dst = load_compressed(path, Net())
    _assert_same(src, dst)
    # the loaded model saves again to the same tensors and metadata
    save_compressed(dst, tmp_path / "again.safetensors")
    first, again = _read(path), _read(tmp_path / "again.safetensors")
    assert first[0] == again[0] and first[1].keys() == again[1].keys()
    assert all(torch.equal(first[1][k], again[1][k]) for k in first[1])


@pytest.mark.parametrize(
    "kw, pcs",
    [
        (dict(n_bits=2, granularity=PerGroupedChannelGranularity(axis=0, group_size=8)), False),
        (dict(n_bits=3, cluster_dim=2), False),
        (dict(n_bits=2, cluster_dim=4, lut_dtype="f16"), True),
        (dict(n_bits=6, lut_dtype="i8", granularity=PerGroupedChannelGranularity(axis=0, group_size=8)), True),
        (dict(n_bits=1, lut_dtype="u8", cluster_dim=2,
              granularity=PerGroupedChannelGranularity(axis=0, group_size=4)), False),
        (dict(n_bits=8, lut_dtype="bf16"), True),
    ],
    ids=["grouped", "vector2", "vector4_scale", "i8_grouped_scale", "u8_grouped_vector_1bit", "bf16_8bit_scale"],
)
def test_round_trip_layouts(tmp_path, kw, pcs):
    src = _net(PalettizationSpec(**kw), per_channel_scale=pcs)
    save_compressed(src, tmp_path / "m.safetensors")
    _assert_same(src, load_compressed(tmp_path / "m.safetensors", Net()))


@pytest.mark.parametrize("n_bits", [2, 4, 8])
def test_size_is_about_n_over_32_of_float(tmp_path, n_bits):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 512, bias=False))
    _palettize(model[0], "weight", PalettizationSpec(n_bits=n_bits))
    sizes = save_compressed(model, tmp_path / "m.safetensors")
    numel = 512 * 512
    assert sizes["palettized_float_bytes"] == numel * 4
    assert sizes["palettized_compressed_bytes"] == numel * n_bits // 8 + 2 ** n_bits * 4
    assert sizes["compressed_fraction"] == pytest.approx(n_bits / 32, rel=0.01)
    assert sizes["file_bytes"] == (tmp_path / "m.safetensors").stat().st_size
    assert sizes["file_bytes"] < numel * 4 * (n_bits / 32) * 1.02 + 4096
    assert sizes["n_palettized"] == 1


def test_grouped_int8_lut_overhead_is_counted(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256))
    _palettize(model[0], "weight", PalettizationSpec(
        n_bits=4, lut_dtype="i8", granularity=PerGroupedChannelGranularity(axis=0, group_size=16)))
    sizes = save_compressed(model, tmp_path / "m.safetensors")
    # packed 4-bit indices + 16 LUTs x 16 int8 entries + 16 float32 scales + 16 int32 zero points
    assert sizes["palettized_compressed_bytes"] == 256 * 256 // 2 + 16 * 16 + 16 * 4 + 16 * 4
    assert sizes["compressed_fraction"] < 0.13


def test_tied_weights_are_stored_once(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(64, 32), nn.Linear(32, 64, bias=False))
    model[1].weight = model[0].weight
    _palettize(model[0], "weight", PalettizationSpec(n_bits=4))
    save_compressed(model, tmp_path / "m.safetensors")
    fresh = nn.Sequential(nn.Embedding(64, 32), nn.Linear(32, 64, bias=False))
    fresh[1].weight = fresh[0].weight
    load_compressed(tmp_path / "m.safetensors", fresh)
    assert torch.equal(fresh[1].weight, model[0].weight)


def test_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    save_compressed(_net(PalettizationSpec(n_bits=2)), path)
    old = path.read_bytes()

    import safetensors.torch as st

    def broken(tensors, filename, metadata=None):
        open(filename, "wb").write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(st, "save_file", broken)
    with pytest.raises(KeyboardInterrupt):
        save_compressed(_net(PalettizationSpec(n_bits=4), seed=1), path)
    assert path.read_bytes() == old
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_mismatched_model_names_the_parameters(tmp_path):
    path = tmp_path / "m.safetensors"
    save_compressed(_net(PalettizationSpec(n_bits=2)), path)

    class Other(Net):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(16, 4)
            self.extra = nn.Linear(2, 2)

    with pytest.raises(ValueError, match=r"'fc\.weight' has shape \(4, 16\) in the model but \(8, 16\).*extra\.weight"):
        load_compressed(path, Other())
    with pytest.raises(ValueError, match=r"does not match the model"):
        load_compressed(path, nn.Linear(3, 3))


def test_wrong_corrupt_and_version_mismatched_files(tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01 not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_compressed(garbage, Net())
    with pytest.raises(FileNotFoundError):
        load_compressed(tmp_path / "nope.safetensors", Net())

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(ValueError, match="not a dkm_palett compressed model"):
        load_compressed(foreign, Net())

    good = tmp_path / "good.safetensors"
    save_compressed(_net(PalettizationSpec(n_bits=2)), good)
    from safetensors import safe_open

    with safe_open(str(good), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    newer = tmp_path / "newer.safetensors"
    save_file(tensors, str(newer), metadata={**meta, "format_version": str(FORMAT_VERSION + 1)})
    with pytest.raises(ValueError, match=f"format version '{FORMAT_VERSION + 1}'"):
        load_compressed(newer, Net())

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(ValueError, match="wrong or corrupt"):
        load_compressed(truncated, Net())

    short = dict(tensors)
    short["fc.weight::indices"] = short["fc.weight::indices"][:-1].clone()
    bad = tmp_path / "bad.safetensors"
    save_file(short, str(bad), metadata=meta)
    with pytest.raises(ValueError, match=r"packed indices of 'fc\.weight'"):
        load_compressed(bad, Net())
    info = json.loads(meta["palettized"])
    assert info["fc.weight"]["n_bits"] == 2 and info["fc.weight"]["shape"] == [8, 16]


@pytest.mark.parametrize("n_bits", [1, 2, 3, 4, 6, 8])
def test_packing_in_chunks_writes_the_one_shot_bitstream(n_bits):
    """pack_indices works a chunk at a time (bounded temporaries); the bytes must be the one-shot little-endian
    bitstream (index i's bit j at stream bit i * n_bits + j) for any length, and unpack must invert it."""
    import numpy as np

    from dkm_palett.lut import pack_indices, unpack_indices

    g = torch.Generator().manual_seed(n_bits)
    for count in (1, 7, 8, 1000, 1003):
        idx = torch.randint(0, 2 ** n_bits, (count,), generator=g, dtype=torch.int64)
        bits = ((idx.numpy()[:, None] >> np.arange(n_bits)) & 1).astype(np.uint8)
        expected = np.packbits(bits.reshape(-1), bitorder="little")
        for chunk in (8, 64, 1 << 20):
            packed = pack_indices(idx.to(torch.uint8), n_bits, chunk=chunk)
            assert np.array_equal(packed.numpy(), expected)
            assert torch.equal(unpack_indices(packed, n_bits, count, chunk=chunk), idx)
