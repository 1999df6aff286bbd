"""The one LUT dtype table agrees with torch, and every spelling maps onto it."""

import pytest
import torch

from dkm_palett.lut import round_lut
from dkm_palett.spec import LUT_DTYPE_TABLE, LUT_DTYPES, canonical_lut_dtype, lut_dtype_info


@pytest.mark.parametrize("name", LUT_DTYPES)
def test_table_matches_torch(name):
    row = LUT_DTYPE_TABLE[name]
    info = torch.iinfo(row.torch_dtype) if row.is_integer else torch.finfo(row.torch_dtype)
    assert row.bits == info.bits
    assert row.max_abs == max(abs(info.min), info.max)
    for spelling in (name, row.torch_dtype, *row.aliases):
        assert canonical_lut_dtype(spelling) == name
    assert lut_dtype_info(row.torch_dtype) is row


@pytest.mark.parametrize("name", [n for n in LUT_DTYPES if not LUT_DTYPE_TABLE[n].is_integer and n != "f32"])
def test_round_lut_refuses_values_past_the_dtype_max(name):
    peak = LUT_DTYPE_TABLE[name].max_abs
    assert round_lut(torch.tensor([[[peak]]]), name).item() == peak
    with pytest.raises(ValueError, match=f"does not fit lut_dtype='{name}'"):
        round_lut(torch.tensor([[[peak * 1.01]]]), name)
