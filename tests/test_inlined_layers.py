"""Layers that ``prepare`` inlines (``x @ W.T + b`` linear subclasses) are still channel-pruned on a recorded root."""
from __future__ import annotations

import warnings

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxprune
from fxprune.structured import channel_report


class MatmulLinear(nn.Linear):
    """Falcon's ``FalconLinear`` shape: an ``nn.Linear`` whose forward is the matrix product, not ``F.linear``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x @ self.weight.T
        return out if self.bias is None else out + self.bias


class ScaledLinear(nn.Linear):
    """Not a plain linear layer (it doubles): must stay as recorded, never folded into a layer call."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.weight.T) * 2.0


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int, bias: bool, layer: type):
        super().__init__()
        self.up, self.down = layer(width, hidden, bias=bias), layer(hidden, width, bias=bias)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


class Net(nn.Module):
    """Its root branches on a value, so fx cannot trace it: prepare captures the MLP alone, the analysis records."""

    def __init__(self, width: int, hidden: int, bias: bool, layer: type):
        super().__init__()
        self.inp, self.mlp, self.out = nn.Linear(6, width), Mlp(width, hidden, bias, layer), nn.Linear(width, 3)

    def forward(self, x):
        h = self.inp(x)
        if float(h.sum()) > 1e9:  # never true; it only makes the root untraceable
            h = h * 0
        return self.out(h + self.mlp(h))


def _prune(model: nn.Module, x: torch.Tensor):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = fxprune.prepare(model.eval(), {"magnitude": {"p": {
            "pattern": "channel", "target_sparsity": 0.5, "schedule": "oneshot",
            "weights": ["mlp.*.weight"]}}, "start_epoch": 0, "end_epoch": 0}, example_inputs=(x,))
        prepared.pruner.on_epoch_begin(0)
        report = str(channel_report(prepared))
        return prepared.eval(), report, fxprune.convert(prepared, physical=True).eval()


@settings(max_examples=4, deadline=None)
@given(width=st.integers(2, 6), hidden=st.integers(2, 12), bias=st.booleans(), seed=st.integers(0, 99))
def test_matmul_linear_units_are_cut_and_exact(width, hidden, bias, seed):
    torch.manual_seed(seed)
    x = torch.randn(4, 6)
    prepared, report, shrunk = _prune(Net(width, hidden, bias, MatmulLinear), x)
    assert not prepared.pruner.prepare_report.traced  # the recorded route is the one under test
    kept = hidden - min(int(0.5 * hidden + 0.5), hidden - 1)  # the channel goal's rounding, one unit always kept
    assert shrunk.mlp.up.weight.shape[0] == kept == shrunk.mlp.down.weight.shape[1]
    assert "mlp.up.weight" not in report
    with torch.no_grad():
        for inp in (x, torch.randn(3, 6)):
            torch.testing.assert_close(shrunk(inp), prepared(inp), atol=1e-5, rtol=1e-4)


def test_a_layer_that_is_not_plain_linear_is_not_folded():
    torch.manual_seed(0)
    x = torch.randn(4, 6)
    prepared, report, shrunk = _prune(Net(4, 8, True, ScaledLinear), x)
    assert shrunk.mlp.up.weight.shape == (8, 4)  # left whole, and said so
    assert "mlp.up.weight" in report
    with torch.no_grad():
        torch.testing.assert_close(shrunk(x), prepared(x))
