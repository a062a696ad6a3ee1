"""scope: global must not silently empty a layer (issue 9, item 2).

One threshold over layers of very different sizes and scales can prune a
whole layer (resnet50's ``fc`` at 70% global: 25 of 2,048,000 weights left).
Under the default a global pruner caps every tensor (``default_max_sparsity``),
still meets the overall count exactly, and warns with ``HighSparsityWarning``
when a tensor is held at that cap or goes above 0.99.
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxprune
from fxprune.config import default_max_sparsity
from fxprune.layer_collapse import HIGH_SPARSITY
from fxprune.masks import count_to_prune


def _mlp(widths: list[int], scales: list[float], seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers = [nn.Linear(a, b) for a, b in zip(widths, widths[1:])]
    with torch.no_grad():
        for layer, s in zip(layers, scales):
            layer.weight.mul_(s)
    return nn.Sequential(*layers)


def _prune_once(model: nn.Module, body: dict, target: float):
    cfg = {"magnitude": {"all": {"scope": "global", "schedule": "oneshot", **body}},
           "target_sparsity": target, "start_epoch": 0, "end_epoch": 0}
    prepared = fxprune.prepare(model, cfg)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prepared.pruner.on_epoch_begin(0)
    report = fxprune.sparsity_report(prepared)
    return prepared, report, [w for w in caught if issubclass(w.category, fxprune.HighSparsityWarning)]


def test_a_small_scale_layer_is_not_wiped_out_by_default():
    # '1' is a big layer of tiny weights: plain global magnitude at 70% takes all of it.
    model = _mlp([64, 32, 512, 10], [1.0, 1e-3, 1.0])
    _, uncapped, _ = _prune_once(model, {"max_sparsity": 1.0}, 0.7)
    assert uncapped["1.weight"].sparsity == 1.0  # what the issue saw: the layer is gone

    _, report, caught = _prune_once(model, {}, 0.7)
    assert report["1.weight"].sparsity == pytest.approx(0.98, abs=1 / 16384 + 1e-9)
    pruned = [r for r in report if r.pruned]
    total = sum(r.numel for r in pruned)
    assert sum(r.zeros for r in pruned) == count_to_prune(0.7, total)  # the overall count is still exact
    messages = " ".join(str(w.message) for w in caught)
    assert "1.weight" in messages and "default per-tensor cap max_sparsity 0.98" in messages


def test_above_099_warns_naming_the_tensor():
    model = _mlp([64, 32, 512, 10], [1.0, 1e-3, 1.0])
    _, report, caught = _prune_once(model, {"max_sparsity": 1.0}, 0.7)
    assert len(caught) == 1
    assert "1.weight 1.0000 (0 of 16384 weights left)" in str(caught[0].message)
    # local scope too: a tensor pruned above 0.99 warns at every update that prunes it further
    prepared = fxprune.prepare(_mlp([32, 200, 4], [1.0, 1.0]), {"magnitude": {"p": {"schedule": "linear"}},
                               "target_sparsity": 0.995, "init_sparsity": 0.992, "start_epoch": 0,
                               "end_epoch": 2, "frequency": 1})
    for epoch, expect in ((0, 1), (1, 1), (2, 1), (3, 0)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            prepared.pruner.on_epoch_begin(epoch)
        got = [w for w in caught if issubclass(w.category, fxprune.HighSparsityWarning)]
        assert len(got) == expect, (epoch, [str(w.message) for w in caught])
        if expect:
            assert "0.weight" in str(got[0].message) and "1.weight" in str(got[0].message)


def test_default_cap_follows_high_targets_and_config_stays_consistent():
    assert default_max_sparsity(0.5) == 0.98
    assert default_max_sparsity(0.99) == pytest.approx(0.999)
    (p,) = fxprune.load_config({"magnitude": {"a": {"scope": "global"}}, "target_sparsity": 0.995}).pruners
    assert p.max_sparsity is None and p.tensor_cap == pytest.approx(0.9995)
    (p,) = fxprune.load_config({"magnitude": {"a": {"scope": "global", "max_sparsity": 1.0}}}).pruners
    assert p.tensor_cap == 1.0
    (p,) = fxprune.load_config({"magnitude": {"a": {}}}).pruners
    assert p.tensor_cap is None  # local: each tensor is at the goal
    # per-pruner beats global, and the bound is checked against the pruner's own target
    cfg = fxprune.load_config({"magnitude": {"a": {"scope": "global", "max_sparsity": 0.95}},
                               "max_sparsity": 0.5, "scope": "global", "target_sparsity": 0.9})
    assert cfg.pruners[0].tensor_cap == 0.95
    with pytest.raises(fxprune.ConfigError, match="max_sparsity.*below target_sparsity"):
        fxprune.load_config({"magnitude": {"a": {}}, "scope": "global", "max_sparsity": 0.5, "target_sparsity": 0.9})


@settings(max_examples=8, deadline=None)
@given(
    widths=st.lists(st.integers(2, 24), min_size=2, max_size=5),
    log_scales=st.lists(st.floats(-4, 1), min_size=4, max_size=4),
    target=st.floats(0.05, 0.999),
    seed=st.integers(0, 2**16),
)
def test_default_cap_holds_and_the_count_is_exact(widths, log_scales, target, seed):
    model = _mlp(widths, [10**s for s in log_scales], seed)
    _, report, caught = _prune_once(model, {}, target)
    cap = default_max_sparsity(target)
    pruned = [r for r in report if r.pruned]
    for r in pruned:  # bounds are rounded inward and relaxed by at most one element for exactness
        assert r.zeros <= math.ceil(cap * r.numel - 1e-9), (r.name, r.zeros, r.numel, cap)
    total = sum(r.numel for r in pruned)
    assert sum(r.zeros for r in pruned) == count_to_prune(target, total)
    for r in pruned:
        if r.sparsity > HIGH_SPARSITY:
            assert any(r.name in str(w.message) for w in caught), r.name
