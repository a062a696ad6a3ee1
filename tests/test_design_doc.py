"""docs/design.md shows the real generated forward of a tiny model before/after prepare and after convert."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import fxprune

DOC = Path(__file__).resolve().parent.parent / "docs" / "design.md"


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 8)
        self.bn = nn.BatchNorm1d(8)
        self.proj = nn.Parameter(torch.randn(3, 8))

    def forward(self, x):
        return F.linear(torch.relu(self.bn(self.fc(x))), self.proj)


def test_design_doc_listings_are_current():
    doc = DOC.read_text()
    model = Tiny()
    prepared = fxprune.prepare(model, {"magnitude": {"prune1": {}}})
    converted = fxprune.convert(prepared)
    assert type(converted) is Tiny
    for code in (fx.symbolic_trace(model).code, prepared.code, fx.symbolic_trace(converted).code):
        listing = "\n".join(line.rstrip() for line in code.strip("\n").splitlines()).strip()
        assert listing in doc, f"docs/design.md is out of date; expected:\n{listing}"
