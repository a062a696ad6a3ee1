"""The structured sweep's MACs count (torch's FLOP counter / 2) against a hand count, and its resumable rows."""
from __future__ import annotations

import importlib.util
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "sweep_measure.py"
_spec = importlib.util.spec_from_file_location("sweep_measure", _PATH)
measure = importlib.util.module_from_spec(_spec)
sys.modules["sweep_measure"] = measure
_spec.loader.exec_module(measure)


def test_macs_equal_the_hand_count_of_convs_and_linears():
    model = nn.Sequential(nn.Conv2d(3, 5, 3), nn.ReLU(), nn.Conv2d(5, 4, 1, groups=1), nn.Flatten(), nn.Linear(64, 7))
    x = (torch.randn(2, 3, 6, 6),)
    conv1 = 2 * 5 * 4 * 4 * 3 * 3 * 3  # batch * out channels * output positions * (in channels * kernel)
    conv2 = 2 * 4 * 4 * 4 * 5
    linear = 2 * 7 * 64
    assert measure.count_macs(model, x) == conv1 + conv2 + linear


def test_macs_of_a_grouped_conv_count_each_group_once():
    model = nn.Conv2d(8, 8, 3, groups=4, padding=1)
    assert measure.count_macs(model, (torch.randn(1, 8, 5, 5),)) == 8 * 25 * 2 * 9  # 2 input channels per group


@dataclass
class _Row:
    name: str
    ratio: float = math.nan
    reasons: list[tuple[str, int]] = field(default_factory=list)
    model: nn.Module | None = None


def test_rows_round_trip_and_a_torn_last_line_is_skipped(tmp_path):
    path = tmp_path / "rows.jsonl"
    measure.write_row(path, _Row("a", 0.25, [("model input", 1)], model=nn.Linear(2, 2)))
    measure.write_row(path, _Row("b"))
    with path.open("a") as f:
        f.write('{"name": "c", "ra')  # a run killed mid-write
    rows = list(measure.read_rows(path, _Row))
    assert [r.name for r in rows] == ["a", "b"]
    assert rows[0].ratio == 0.25 and rows[0].reasons == [("model input", 1)] and rows[0].model is None
    assert math.isnan(rows[1].ratio)
