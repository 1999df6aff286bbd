"""The DKM report in notebooks: ``_repr_html_`` holds the same table as ``str(report)``, and ``plot()`` draws each
palettized weight's float histogram with its LUT entries, also after finalize."""

from __future__ import annotations

from html.parser import HTMLParser

import pytest
import torch
from torch import nn

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")

from dkm_palett import DKMPalettizer, DKMPalettizerConfig, ModuleDKMPalettizerConfig  # noqa: E402


def _finalized_report():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 64), nn.ReLU(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 3))
    config = DKMPalettizerConfig(global_config=ModuleDKMPalettizerConfig(n_bits=2, weight_threshold=1000))
    palettizer = DKMPalettizer(model, config, progress=False)
    palettizer.prepare(inplace=True)
    model(torch.randn(4, 40)).sum().backward()
    palettizer.finalize(inplace=True)
    return palettizer.report(), model


class _Cells(HTMLParser):
    def __init__(self):
        super().__init__()
        self.rows, self._cell = [], None

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = ""

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.rows[-1].append(self._cell)
            self._cell = None


def _text_rows(report) -> list[list[str]]:
    rows = []
    for line in str(report).splitlines()[2:]:  # after the header and the rule
        name, rest = line.split(None, 1)
        rows.append([name, rest] if rest.startswith("skipped") else [name, *rest.split()])
    return rows


def test_html_table_matches_the_text_table():
    report, _ = _finalized_report()
    parser = _Cells()
    parser.feed(report._repr_html_())
    assert parser.rows[0] == ["weight"] + [title for _, title in report.COLUMNS]
    assert parser.rows[1:] == _text_rows(report)
    assert [row[0] for row in parser.rows[1:]] == ["0.weight", "2.weight", "4.weight"]  # 4.weight: skipped
    assert parser.rows[3][1].startswith("skipped: ")


def test_plot_draws_float_histograms_and_the_luts():
    report, _ = _finalized_report()
    fig = report.plot()
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title().split("\n")[0] for ax in panels] == ["0.weight", "2.weight"]
    for ax, name in zip(panels, ("0.weight", "2.weight")):
        record = report.records[name]
        lut_lines = sorted(line.get_xdata()[0] for line in ax.get_lines())
        assert lut_lines == pytest.approx(sorted(record.lut.reshape(-1).tolist()))
        counts, _ = report.histograms[name]
        assert float(counts.sum()) == record.numel
        # drawn from the float weights kept at finalize, not from the 4 palettized values
        assert int((counts > 0).sum()) > 16
        drawn = ax.patches[0].get_path().vertices[:, 1]
        assert drawn.max() == pytest.approx(float(counts.max()))


def test_plot_without_palettized_weights_says_why():
    model = nn.Sequential(nn.Linear(4, 4))
    palettizer = DKMPalettizer(model, progress=False)
    palettizer.prepare(inplace=True)
    with pytest.raises(ValueError, match="nothing to plot"):
        palettizer.report().plot()


def test_record_stats_counts_the_lut_entries_each_group_uses():
    """``lut_entries_used_max``: the most distinct indices any one LUT group uses (2 groups of 4 channels here:
    3 and 5 of 16 entries)."""
    import torch

    from dkm_palett.lut import PalettizedTensor
    from dkm_palett.report import record_stats

    indices = torch.tensor([[0, 1, 2] * 4 + [2] * 4, [3, 4, 5, 6, 7] * 3 + [7]], dtype=torch.uint8)
    record = PalettizedTensor(lut=torch.linspace(-1, 1, 32).reshape(2, 16, 1), indices=indices, shape=(8, 4),
                              axis=0, group_size=4, n_bits=4)
    assert record_stats(record, None)["lut_entries_used_max"] == 5
