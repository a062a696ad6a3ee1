"""The ``lamp`` policy (layer-adaptive magnitude scores, Lee et al. 2021).

Scores are checked against the paper's formula evaluated entry by entry in
float64 (an O(n^2) oracle), and through ``prepare``: within one tensor LAMP
ranks exactly like magnitude, across tensors it keeps the largest entry of
every tensor that a global magnitude threshold would empty.
"""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxprune
from fxprune.masks import count_to_prune
from fxprune.policies import POLICIES
from fxprune.policies.lamp import lamp_scores


def oracle(w: torch.Tensor) -> torch.Tensor:
    """score(u) = w_u^2 / sum of w_v^2 over v at or after u in the stable ascending order of w^2."""
    flat = w.double().reshape(-1).square().tolist()
    order = sorted(range(len(flat)), key=lambda i: (flat[i], i))
    rank = {i: r for r, i in enumerate(order)}
    out = []
    for i, v in enumerate(flat):
        tail = sum(flat[j] for j in order[rank[i]:])
        out.append(v / tail if tail > 0 else 0.0)
    return torch.tensor(out, dtype=torch.float64).reshape(w.shape)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(-4, 4, allow_nan=False, width=32), min_size=1, max_size=40),
    st.integers(0, 6),
)
def test_scores_match_formula(values, n_zero):
    w = torch.tensor(values + [0.0] * n_zero, dtype=torch.float32)  # zeros: pruned entries
    got = lamp_scores(w).double()
    torch.testing.assert_close(got, oracle(w), rtol=1e-5, atol=1e-30)
    if bool((w != 0).any()):
        assert float(got.max()) == 1.0  # the largest entry of a tensor always scores 1
        assert float(w.abs()[got.argmax()]) == float(w.abs().max())
    # Within one tensor the order is the magnitude order.
    a = w.abs()
    i, j = torch.meshgrid(torch.arange(len(a)), torch.arange(len(a)), indexing="ij")
    assert bool(((a[i] < a[j]) <= (got[i] <= got[j])).all())


def test_policy_is_registered_and_shape_preserving():
    w = torch.randn(5, 3, 2, dtype=torch.float64)
    s = lamp_scores(w)
    assert s.shape == w.shape and s.dtype == torch.float64
    assert "lamp" in POLICIES and POLICIES["lamp"].name == "lamp"


class Skewed(nn.Module):
    """A small layer with large weights next to a big layer with tiny ones (the case LAMP is for)."""

    def __init__(self) -> None:
        super().__init__()
        self.small = nn.Linear(4, 4)
        self.big = nn.Linear(4, 64)
        with torch.no_grad():
            self.small.weight.copy_(torch.linspace(1.0, 2.0, 16).reshape(4, 4))
            self.big.weight.copy_(torch.linspace(0.001, 0.01, 256).reshape(64, 4))

    def forward(self, x):
        return self.big(self.small(x))


def _prune(policy: str, scope: str, sparsity: float, **bounds: float) -> dict[str, torch.Tensor]:
    cfg = {"pruning": {policy: {"p": {"scope": scope, "weights": ["small.weight", "big.weight"], **bounds}},
                       "start_epoch": 0, "end_epoch": 0, "target_sparsity": sparsity, "schedule": "oneshot"}}
    prepared = fxprune.prepare(Skewed(), cfg)
    prepared.pruner.on_epoch_begin(0)
    return {n: getattr(prepared, n).weight.mask.clone() for n in ("small", "big")}


def test_global_lamp_keeps_every_layer_where_magnitude_empties_one():
    mag = _prune("magnitude", "global", 0.95, max_sparsity=1.0)  # no per-tensor cap
    lamp = _prune("lamp", "global", 0.95, max_sparsity=1.0)
    assert int(mag["big"].sum()) == 0  # one threshold over raw |w|: the big layer is gone
    kept = {n: int(m.sum()) for n, m in lamp.items()}
    assert kept["big"] > 0 and kept["small"] > 0
    assert sum(kept.values()) == 272 - count_to_prune(0.95, 272)  # exact overall count, like any global pruner
    # Within each tensor the kept entries are the largest ones.
    for n, m in lamp.items():
        w = Skewed().get_submodule(n).weight.detach().abs()
        if bool(m.any()) and bool((~m).any()):
            assert float(w[m].min()) >= float(w[~m].max())


def test_local_lamp_equals_local_magnitude():
    torch.manual_seed(0)
    for s in (0.3, 0.75):
        a, b = _prune("lamp", "local", s), _prune("magnitude", "local", s)
        assert all(torch.equal(a[n], b[n]) for n in a)
