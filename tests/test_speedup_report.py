"""speedup_report: exact MACs and bytes for known layers, pattern detection, 2:4 eligibility, output forms."""
from __future__ import annotations

import json
import math

import torch
from torch import nn

import fxprune
from fxprune.masks import nm_mask
from fxprune.speedup import detect_pattern, semi_structured_eligibility


def _nm(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The pruner's own N:M keep-mask (fxprune.masks), at the pattern's sparsity."""
    return nm_mask(scores, torch.ones_like(scores, dtype=torch.bool), n, m, 1 - n / m).to(scores.dtype)


class _Known(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)  # on 1x2x5x5: 4x5x5 outputs x (2*3*3) MACs each = 1800
        self.fc = nn.Linear(100, 8)  # on 1x100: 8 x 100 = 800 MACs

    def forward(self, x):
        return self.fc(self.conv(x).flatten(1)[:, :100])


def _known():
    torch.manual_seed(0)
    m = _Known().eval()
    with torch.no_grad():
        m.conv.weight[1:3] = 0  # 2 of 4 output channels zero: pattern channel, skips half the MACs
        w = m.fc.weight
        w.mul_(_nm(w.abs(), 2, 4))  # 2:4 along the input: 400 of 800 weights kept
    return m


def test_known_layers_numbers_exactly():
    m = _known()
    report = fxprune.speedup_report(m, torch.randn(1, 2, 5, 5), measure=False)
    conv, fc = report.rows
    assert (conv.name, conv.shape, conv.input_shape, conv.pattern) == ("conv", (4, 2, 3, 3), (1, 2, 5, 5), "channel")
    assert conv.dense_macs == 4 * 5 * 5 * 2 * 3 * 3 == 1800 and conv.skippable_macs == 900
    assert conv.sparsity == 0.5 and conv.dense_bytes == 72 * 4
    assert conv.compact_bytes == 36 * 4 + math.ceil(72 / 8)  # nnz * itemsize + bitmask
    assert conv.semi_structured == "-"
    assert (fc.pattern, fc.dense_macs, fc.skippable_macs) == ("2:4", 800, 400)
    assert fc.dense_bytes == 3200 and fc.compact_bytes == 400 * 4 + 100
    assert fc.semi_structured.startswith("no:") and "device cpu" in fc.semi_structured
    d = report.to_dict()
    assert d["total"]["dense_macs"] == 2600 and d["total"]["skippable_macs"] == 1300
    assert d["total"]["dense_bytes"] == 288 + 3200 and d["total"]["compact_bytes"] == 153 + 1700
    json.dumps(d)  # plain data
    assert "2:4" in report.verdict and "compute capability >= 8.0" in report.verdict
    assert "convert(physical=True)" in report.verdict and "min_sparsity" in report.verdict
    text = str(report)
    assert "TOTAL" in text and "2,600" in text and text.splitlines()[-1].startswith("verdict: ")
    md = report.to_markdown()
    assert md.splitlines()[0].startswith("| layer |") and "| TOTAL |" in md


def test_pattern_detection():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 32, generator=g)
    assert detect_pattern(w) == "dense"
    assert detect_pattern(w * _nm(w.abs(), 2, 4)) == "2:4"
    assert detect_pattern(w * _nm(w.abs(), 1, 4)) == "1:4"
    rows = w.clone()
    rows[::2] = 0
    assert detect_pattern(rows) == "channel"
    high = w * (torch.rand(w.shape, generator=g) > 0.9)
    assert detect_pattern(high) == "unstructured"  # fits 4:8 by chance, but it is far sparser than 4:8
    conv = torch.randn(8, 8, 3, 3, generator=g)
    assert detect_pattern(conv * _nm(conv.abs(), 2, 4)) == "2:4"


def test_semi_structured_eligibility_reasons():
    lin = nn.Linear(64, 64).half()
    assert semi_structured_eligibility(lin, "unstructured") == "-"
    why = semi_structured_eligibility(lin, "2:4")
    assert why.startswith("no:") and "device cpu (needs CUDA" in why and "dtype" not in why
    odd = semi_structured_eligibility(nn.Linear(10, 6).half(), "2:4")
    assert "shape 6x10" in odd
    assert semi_structured_eligibility(nn.Conv2d(4, 4, 1), "2:4").startswith("no: Conv2d")
    assert "dtype float64" in semi_structured_eligibility(nn.Linear(64, 64).double(), "2:4")


def test_measured_report_and_plot(tmp_path):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    with torch.no_grad():
        for layer in (m[0], m[2]):
            layer.weight[torch.rand_like(layer.weight) < 0.95] = 0
    report = fxprune.speedup_report(m, torch.randn(4, 64), repeats=2)
    for row in report.rows:
        assert row.dense_s > 0 and row.chosen_s > 0 and row.chosen in ("dense", "csr")
    assert report.threads == torch.get_num_threads()
    report.plot(str(tmp_path / "latency.png"))
    assert (tmp_path / "latency.png").read_bytes()[:4] == b"\x89PNG"


def test_prepared_model_is_reported_as_converted():
    m = _known()
    cfg = {"pruning": {"magnitude": {"p": {"start_epoch": 0, "end_epoch": 0, "target_sparsity": 0.75}}}}
    prepared = fxprune.prepare(m, cfg)
    prepared.pruner.on_epoch_begin(0)
    report = fxprune.speedup_report(prepared, torch.randn(1, 2, 5, 5), measure=False)
    assert [round(r.sparsity, 2) for r in report.rows] == [0.75, 0.75]
