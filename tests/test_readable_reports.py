"""Reports a person can read (issue 9, item 4): channel report, schedule table, sparsity table, fallback warning."""
from __future__ import annotations

import io
import json
import warnings

import pytest
import torch
from torch import nn

import fxprune
from fxprune.trace import CallSpec

CHANNEL = {"magnitude": {"p": {"pattern": "channel", "target_sparsity": 0.5, "schedule": "oneshot"}},
           "start_epoch": 0, "end_epoch": 0}


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.norm = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.conv2(x).mean((2, 3))
        return self.fc(self.norm(x))


def test_channel_report_is_a_table_in_plain_words():
    torch.manual_seed(0)
    prepared = fxprune.prepare(SmallCNN(), CHANNEL)
    prepared.pruner.on_epoch_begin(0)
    reports = fxprune.structured.channel_report(prepared)
    text = str(reports)
    assert "ChannelReport(" not in text and "{" not in text
    header = next(line for line in text.splitlines() if line.startswith("group"))
    assert header.split() == ["group", "kept/total", "layers", "why", "not", "pruned"]
    assert "model input" in text and "model output" in text
    assert "come from outside the analysed graph" not in text
    rows = [line for line in text.splitlines() if line.split()[-1] == "-"]  # conv1 + bn1; conv2 + norm + fc
    assert len(rows) == 2 and all("4/8 channels" in row for row in rows)
    assert "conv1" in rows[0] and "conv2, fc" in rows[1]  # the LayerNorm's stream is pruned (issue 11)
    # still a dict of ChannelReport for programs, and plain data with the full reasons
    assert isinstance(reports, dict) and isinstance(reports["p"], fxprune.structured.ChannelReport)
    data = reports.to_dict()
    json.dumps(data)
    assert [(g["kept"], g["total"], g["unit"]) for g in data["p"]["prunable"]] == [(4, 8, "channels")] * 2
    plain = [p for e in data["p"]["excluded"] for p in e["plain"]]
    assert "model input" in plain
    raw = [r for e in data["p"]["excluded"] for r in e["reasons"]]
    assert any(r.startswith("model input: read by node") for r in raw)


def test_schedule_table_prints_and_stays_a_list():
    prepared = fxprune.prepare(nn.Sequential(nn.Linear(4, 4)), {
        "magnitude": {"a": {"target_sparsity": 0.8}}, "start_epoch": 1, "end_epoch": 3, "frequency": 1})
    table = prepared.pruner.schedule_table(5)
    assert table == [{"epoch": 0, "a": 0.0}, {"epoch": 1, "a": 0.0}, {"epoch": 2, "a": 0.4},
                     {"epoch": 3, "a": 0.8}, {"epoch": 4, "a": 0.8}]
    assert table[2]["a"] == 0.4 and len(table) == 5 and isinstance(table, list)
    lines = str(table).splitlines()
    assert lines[0].split() == ["epoch", "a"] and set(lines[1]) == {"-"}
    assert [line.split() for line in lines[2:]] == [["0", "0.0000"], ["1", "0.0000"], ["2", "0.4000"],
                                                    ["3", "0.8000"], ["4", "0.8000"]]


def _listed(report) -> list[str]:
    return [r.name for r in report.listed()]


def test_sparsity_table_lists_pruned_weights_and_convert_remembers_them():
    torch.manual_seed(0)
    model = SmallCNN()
    prepared = fxprune.prepare(model, {"magnitude": {"p": {}}, "start_epoch": 0, "end_epoch": 0})
    prepared.pruner.on_epoch_begin(0)
    report = fxprune.sparsity_report(prepared)
    pruned = ["conv1.weight", "conv2.weight", "fc.weight"]
    assert _listed(report) == pruned
    text = str(report)
    assert "bn1.weight" not in text and "norm.bias" not in text and "TOTAL (pruned weights)" in text
    assert f"TOTAL (all {len(report.rows)} parameters)" in text and "all_parameters=True" in text
    full = fxprune.sparsity_report(prepared, all_parameters=True)
    assert _listed(full) == [n for n, _ in model.named_parameters()] and "bn1.weight" in str(full)

    converted = fxprune.convert(prepared)
    for m in (converted, torch.load(_saved(converted), weights_only=False)):  # torch.save(model) keeps the record
        r = fxprune.sparsity_report(m)
        assert [row.name for row in r.rows if row.pruned] == pruned and "-" not in str(r).split()
        assert str(r) == text
        assert not any(isinstance(x, (fxprune.MaskedParameter, fxprune.Pruner)) for x in m.modules())
        assert not any("fxprune" in k for k in m.state_dict())
    # A model rebuilt from a state_dict cannot know: `-`, and the weights fxprune would prune are listed.
    fresh = SmallCNN()
    fresh.load_state_dict(converted.state_dict())
    plain = fxprune.sparsity_report(fresh)
    assert all(r.pruned is None for r in plain.rows) and _listed(plain) == pruned
    assert "TOTAL (prunable weights)" in str(plain)


def _saved(model: nn.Module) -> io.BytesIO:
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return buf


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x, mask=None, scale=1.0):
        if mask is not None:
            x = x * mask
        return torch.relu(self.fc(x)) * scale


class Root(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = Block()

    def forward(self, x, mask=None, scale=2.0):
        if x.sum() > 1e6:  # data-dependent: the root stays Python, the block is captured on its own
            x = x * 0
        return self.block(x, mask=mask, scale=scale)


def test_fallback_warning_says_what_differed_and_how_to_avoid_it():
    torch.manual_seed(0)
    x = torch.randn(3, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = fxprune.prepare(Root(), {"magnitude": {"p": {}}, "start_epoch": 0, "end_epoch": 0},
                                   example_inputs=(x,))
    with pytest.warns(UserWarning, match=r"this call differs: mask is a tensor where the example passed NoneType "
                                         r"None\..*example_inputs.*keyword arguments"):
        prepared(x, mask=torch.ones(3, 4))
    block = prepared.block.__dict__["forward"]
    block.missed = 0
    with pytest.warns(UserWarning, match=r"scale is float 3\.0 where the example passed float 2\.0"):
        prepared(x, scale=3.0)


def test_call_spec_difference_names_the_argument():
    spec = CallSpec.of(nn.Identity(), (torch.ones(2),), {"mask": None, "n": 3})
    assert spec.difference((torch.ones(2),), {"mask": None}) == "called without n"
    assert spec.difference((torch.ones(2),), {"mask": None, "n": 3, "labels": torch.ones(1)}) == (
        "called with labels (not in the example)")
    assert spec.difference((torch.ones(2), 1), {"mask": None, "n": 3}) == (
        "2 positional argument(s) where the example passed 1")
    assert spec.difference((5,), {"mask": None, "n": 3}) == "args[0] is int 5 where the example passed a tensor"
    assert spec.difference((torch.ones(2),), {"mask": None, "n": 4}) == "n is int 4 where the example passed int 3"
    assert spec.difference((torch.ones(2),), {"mask": torch.ones(2), "n": 3}) == (
        "mask is a tensor where the example passed NoneType None")
