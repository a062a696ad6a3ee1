"""fxprune.sensitivity: per-weight sweeps against a manual prune-and-evaluate oracle."""
from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxprune
from fxprune.sensitivity import SensitivityTable


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc1 = nn.Linear(4 * 4 * 4, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(torch.relu(self.conv(x)).flatten(1))))


def _setup():
    torch.manual_seed(0)
    model = Net().double()
    x = torch.randn(32, 1, 6, 6, dtype=torch.float64)
    y = model(x).detach() + 0.01 * torch.randn(32, 3, dtype=torch.float64)

    def eval_fn(m: nn.Module) -> float:
        with torch.no_grad():
            return float(nn.functional.mse_loss(m(x), y))

    return model, eval_fn


def _oracle(model: nn.Module, eval_fn, name: str, sparsity: float) -> float:
    """Prune one weight by hand: zero its round(s*n) smallest |w| (halves up), evaluate a copy."""
    m = copy.deepcopy(model)
    p = m.get_parameter(name)
    k = int(sparsity * p.numel() + 0.5)
    with torch.no_grad():
        flat = p.view(-1)
        flat[torch.argsort(flat.abs())[:k]] = 0
    return eval_fn(m)


def test_table_equals_manual_oracle_and_model_is_untouched():
    model, eval_fn = _setup()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    versions = {n: p._version for n, p in model.named_parameters()}
    seen: list[nn.Module] = []

    def spy(m):
        seen.append(m)
        return eval_fn(m)

    sparsities = [0.3, 0.6, 0.9]
    table = fxprune.sensitivity(model, spy, sparsities)
    assert all(m is not model for m in seen)  # eval_fn only ever sees a private copy
    assert len(seen) == 1 + 3 * 3
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert {n: p._version for n, p in model.named_parameters()} == versions  # not even modified and restored

    assert list(table.values) == ["conv.weight", "fc1.weight", "fc2.weight"]  # default: prunable weights, no biases
    assert table.baseline == pytest.approx(eval_fn(model), rel=0, abs=0)
    for name in table.values:
        for s, v in zip(sparsities, table.values[name]):
            assert v == pytest.approx(_oracle(model, eval_fn, name, s), rel=1e-12), (name, s)
    assert table.numels == {"conv.weight": 36, "fc1.weight": 1024, "fc2.weight": 48}
    # Pruning more hurts more here (a fitted model, noise-free metric).
    for name in table.values:
        assert list(table.values[name]) == sorted(table.values[name])


def test_weights_selection_and_errors():
    model, eval_fn = _setup()
    table = fxprune.sensitivity(model, eval_fn, [0.5], weights=["fc*"])
    assert list(table.values) == ["fc1.weight", "fc2.weight"]
    with pytest.raises(ValueError, match=r"sensitivity\(weights=\.\.\.\).*did you mean 'fc1.weight'"):
        fxprune.sensitivity(model, eval_fn, [0.5], weights=["fc1.wieght"])
    for bad in ([], [0.5, 0.3], [0.0], [1.0], [0.5, 0.5]):
        with pytest.raises(ValueError, match="sparsities must be"):
            fxprune.sensitivity(model, eval_fn, bad)
    with pytest.raises(TypeError, match="eval_fn must return a number"):
        fxprune.sensitivity(model, lambda m: "loss", [0.5])
    prepared = fxprune.prepare(model, {"magnitude": {"p": {}}})
    with pytest.raises(TypeError, match="plain model"):
        fxprune.sensitivity(prepared, eval_fn, [0.5])


def test_model_restored_even_when_eval_fn_raises():
    model, eval_fn = _setup()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []

    def failing(m):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return eval_fn(m)

    with pytest.raises(RuntimeError, match="boom"):
        fxprune.sensitivity(model, failing, [0.5, 0.9])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def _table(values: dict[str, list[float]], sparsities=(0.25, 0.5, 0.75), baseline=1.0, higher=False):
    return SensitivityTable(baseline, tuple(sparsities), {k: tuple(v) for k, v in values.items()},
                            {k: 100 for k in values}, higher)


def test_targets_stop_at_the_first_failure():
    t = _table({"a": [1.01, 1.02, 1.5], "b": [1.2, 1.0, 1.0], "c": [1.0, 1.0, 1.04]})
    assert t.targets(0.05) == {"a": 0.5, "b": 0.0, "c": 0.75}
    acc = _table({"a": [0.9, 0.89, 0.5]}, baseline=0.9, higher=True)
    assert acc.degradation("a") == pytest.approx((0.0, 0.01, 0.4))
    assert acc.targets(0.02) == {"a": 0.5}


@given(
    st.lists(st.floats(0.0, 3.0, allow_nan=False), min_size=3, max_size=3),
    st.floats(0.0, 1.0),
)
@settings(max_examples=60, deadline=None)
def test_targets_property(values, tol):
    t = _table({"w": values})
    target = t.targets(tol)["w"]
    reached = [s for s, v in zip(t.sparsities, values) if s <= target]
    assert all(v - 1.0 <= tol for v in values[: len(reached)])
    if len(reached) < len(values):
        assert values[len(reached)] - 1.0 > tol


def test_to_config_loads_and_prepares_with_per_layer_targets():
    model, eval_fn = _setup()
    table = fxprune.sensitivity(model, eval_fn, [0.25, 0.5, 0.75, 0.9])
    tol = sorted(d for n in table.values for d in table.degradation(n))[5]  # some layers pass, some do not
    targets = table.targets(tol)
    cfg = table.to_config(tol, end_epoch=0, start_epoch=0, schedule="oneshot")
    loaded = fxprune.load_config(cfg)
    by_weight = {w: p.target_sparsity for p in loaded.pruners for w in p.weights}
    assert by_weight == {n: s for n, s in targets.items() if s > 0}
    assert all(p.schedule == "oneshot" for p in loaded.pruners)

    per_layer = fxprune.load_config(table.to_config(tol, group=False))
    assert {p.weights[0]: p.target_sparsity for p in per_layer.pruners} == by_weight
    assert all(len(p.weights) == 1 for p in per_layer.pruners)

    prepared = fxprune.prepare(model, cfg)
    prepared.pruner.on_epoch_begin(0)
    report = fxprune.sparsity_report(prepared)
    for name, s in by_weight.items():
        assert report[name].sparsity == pytest.approx(s, abs=1 / report[name].numel)

    with pytest.raises(ValueError, match="no weight stays within"):
        table.to_config(-1.0)
    with pytest.raises(ValueError, match="target_sparsity is set per layer"):
        table.to_config(tol, target_sparsity=0.5)
    with pytest.raises(fxprune.ConfigError, match="schedule"):
        table.to_config(tol, schedule="cubicc")


def test_str_to_dict_and_plot(tmp_path):
    model, eval_fn = _setup()
    table = fxprune.sensitivity(model, eval_fn, [0.5, 0.9], weights=["fc2.weight"])
    text = str(table)
    assert "fc2.weight" in text and "(dense baseline)" in text and "0.9" in text
    d = table.to_dict()
    assert d["sparsities"] == [0.5, 0.9] and list(d["values"]) == ["fc2.weight"]
    assert d["values"]["fc2.weight"] == list(table.values["fc2.weight"])
    pytest.importorskip("matplotlib")
    path = tmp_path / "sens.png"
    fig = table.plot(str(path))
    assert path.stat().st_size > 1000 and len(fig.axes[0].lines) == 2
