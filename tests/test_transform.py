"""Properties of prepare -> hooks -> convert over generated models, configs and schedules."""
from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import fxprune
from fxprune.masks import count_to_prune
from fxprune.schedules import sparsity_at
from generated import GeneratedMLP, MLPSpec, build, config_for, model_specs, schedules

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def effective_masks(prepared) -> dict[str, torch.Tensor]:
    return {t.name: t.masked.mask.clone() for t in prepared.pruner.targets}


def pruned_count(prepared, name: str) -> int:
    t = next(t for t in prepared.pruner.targets if t.name == name)
    return int((~t.masked.mask).sum())


@SETTINGS
@given(spec=model_specs, schedule=schedules())
def test_zero_sparsity_preserves_forward(spec, schedule):
    model, x = build(spec)
    model.eval()
    prepared = fxprune.prepare(model, config_for(schedule))
    prepared.eval()
    torch.testing.assert_close(prepared(x), model(x), rtol=0, atol=1e-6)


@SETTINGS
@given(spec=model_specs, schedule=schedules())
def test_each_update_reaches_goal_and_masks_grow(spec, schedule):
    model, _ = build(spec)
    prepared = fxprune.prepare(model, config_for(schedule))
    previous = effective_masks(prepared)
    for epoch in range(schedule["end_epoch"] + 3):
        prepared.pruner.on_epoch_begin(epoch)
        goal = sparsity_at(
            epoch,
            start=schedule["start_epoch"],
            end=schedule["end_epoch"],
            frequency=schedule["frequency"],
            init=schedule["init_sparsity"],
            target=schedule["target_sparsity"],
        )
        assert prepared.pruner.current_goals()["prune1"] == pytest.approx(goal)
        masks = effective_masks(prepared)
        for t in prepared.pruner.targets:
            n = t.masked.mask.numel()
            assert abs(pruned_count(prepared, t.name) - goal * n) <= 1, t.name
            assert pruned_count(prepared, t.name) == count_to_prune(goal, n)
            # monotone: what was pruned stays pruned
            assert not (masks[t.name] & ~previous[t.name]).any(), t.name
            # the pruned entries are the smallest in magnitude among the weights
            w = t.masked.param.detach().abs()
            if (~masks[t.name]).any() and masks[t.name].any() and epoch == schedule["start_epoch"]:
                assert w[~masks[t.name]].max() <= w[masks[t.name]].min()
        previous = masks


@SETTINGS
@given(spec=model_specs, schedule=schedules(), epochs=st.integers(0, 8))
def test_convert_equals_prepared_and_loads_into_original_class(spec, schedule, epochs):
    model, x = build(spec)
    prepared = fxprune.prepare(model, config_for(schedule))
    for e in range(epochs):
        prepared.pruner.on_epoch_begin(e)
    prepared.eval()
    converted = fxprune.convert(prepared)
    assert type(converted) is type(model)
    assert list(converted.state_dict()) == list(model.state_dict())
    fresh = type(model)(spec)
    fresh.load_state_dict(converted.state_dict(), strict=True)
    torch.testing.assert_close(converted(x), prepared(x), rtol=0, atol=1e-6)
    fresh.eval()
    torch.testing.assert_close(fresh(x), prepared(x), rtol=0, atol=1e-6)
    for m in converted.modules():
        assert not isinstance(m, (fxprune.MaskedParameter, fxprune.Pruner))
        assert not m._forward_hooks and not m._forward_pre_hooks
    assert not any("mask" in k or k.startswith("pruner") for k in converted.state_dict())
    # sparsity survives into the plain weights, as +0.0 (a multiply by the mask leaves -0.0 where a weight was
    # negative: not the same bits, so not the same file or hash)
    report = fxprune.sparsity_report(converted)
    for t in prepared.pruner.targets:
        assert report[t.name].zeros >= int((~t.masked.mask).sum())
        pruned = converted.get_parameter(t.name).detach()[~t.masked.mask]
        assert not torch.signbit(pruned).any() and not pruned.any(), t.name


@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-3),
    lambda p: torch.optim.Adam(p, lr=0.01),
    lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
], ids=["sgd-momentum-wd", "adam", "adamw"])
@settings(max_examples=10, deadline=None)
@given(spec=model_specs)
def test_pruned_entries_stay_zero_through_training(make_opt, spec):
    model, x = build(spec)
    schedule = {"start_epoch": 0, "end_epoch": 2, "frequency": 1, "init_sparsity": 0.3, "target_sparsity": 0.7}
    prepared = fxprune.prepare(model, config_for(schedule))
    prepared.train()
    opt = make_opt(prepared.parameters())
    pruner = prepared.pruner
    for epoch in range(4):
        pruner.on_epoch_begin(epoch)
        for batch in range(3):
            pruner.on_batch_begin(batch)
            loss = prepared(x).pow(2).mean()
            loss = pruner.on_minibatch_end(prepared, loss)
            opt.zero_grad()
            loss.backward()
            for t in pruner.targets:
                grad = t.masked.param.grad
                if grad is not None:
                    assert (grad[~t.masked.mask] == 0).all(), t.name
            opt.step()
            pruner.on_batch_end()
            for t in pruner.targets:
                assert (t.masked.param[~t.masked.mask] == 0).all(), t.name
        pruner.on_epoch_end(epoch)
    for t in pruner.targets:
        assert pruned_count(prepared, t.name) == count_to_prune(0.7, t.masked.mask.numel())


def test_effective_weight_is_masked_even_without_hooks():
    """A step with momentum moves stored pruned entries; the forward must still see zeros."""
    spec = MLPSpec(widths=(6, 6, 4), kinds=("module", "functional"), seed=0)
    model, x = build(spec)
    prepared = fxprune.prepare(model, config_for({"start_epoch": 0, "end_epoch": 0, "target_sparsity": 0.5}))
    opt = torch.optim.SGD(prepared.parameters(), lr=0.1, momentum=0.9)
    for _ in range(2):  # build momentum before pruning
        opt.zero_grad()
        prepared(x).pow(2).sum().backward()
        opt.step()
    prepared.pruner.on_epoch_begin(0)
    opt.zero_grad()
    prepared(x).pow(2).sum().backward()
    opt.step()  # momentum drives stored pruned entries away from 0; no hook re-zeroes them
    moved = any((t.masked.param[~t.masked.mask] != 0).any() for t in prepared.pruner.targets)
    assert moved, "test premise: momentum moved pruned entries"
    prepared.eval()
    reference = fxprune.convert(prepared)
    torch.testing.assert_close(prepared(x), reference(x), rtol=0, atol=1e-6)
    prepared.pruner.on_batch_end()
    assert all((t.masked.param[~t.masked.mask] == 0).all() for t in prepared.pruner.targets)


def _train(prepared, x, epochs, opt, start=0):
    for epoch in range(start, start + epochs):
        prepared.pruner.on_epoch_begin(epoch)
        for batch in range(2):
            prepared.pruner.on_batch_begin(batch)
            loss = prepared.pruner.on_minibatch_end(prepared, prepared(x + batch).pow(2).mean())
            opt.zero_grad()
            loss.backward()
            opt.step()
            prepared.pruner.on_batch_end()
        prepared.pruner.on_epoch_end(epoch)


@settings(max_examples=10, deadline=None)
@given(spec=model_specs, split=st.integers(1, 4))
def test_state_dict_round_trip_resumes_exactly(spec, split):
    schedule = {"start_epoch": 0, "end_epoch": 5, "frequency": 1, "init_sparsity": 0.1, "target_sparsity": 0.8}
    model, x = build(spec)
    a = fxprune.prepare(model, config_for(schedule))
    opt_a = torch.optim.SGD(a.parameters(), lr=0.01, momentum=0.9)
    _train(a, x, split, opt_a)
    saved = copy.deepcopy(a.state_dict())
    saved_opt = copy.deepcopy(opt_a.state_dict())
    _train(a, x, 6 - split, opt_a, start=split)

    other, _ = build(type(spec)(**{**spec.__dict__, "seed": spec.seed + 1}))  # different initial weights
    b = fxprune.prepare(other, config_for(schedule))
    b.load_state_dict(saved)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.01, momentum=0.9)
    opt_b.load_state_dict(saved_opt)
    assert int(b.pruner.epoch) == split - 1 and b.pruner.current_goals() == pytest.approx(
        {"prune1": sparsity_at(split - 1, start=0, end=5, frequency=1, init=0.1, target=0.8)}
    )
    _train(b, x, 6 - split, opt_b, start=split)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


def test_tied_weights_get_one_mask_and_stay_tied():
    spec = MLPSpec(widths=(6, 6, 6, 3), kinds=("module", "tied", "functional"), seed=1)
    model, x = build(spec)
    prepared = fxprune.prepare(model, config_for({"start_epoch": 0, "end_epoch": 0, "target_sparsity": 0.5}))
    names = [t.name for t in prepared.pruner.targets]
    assert names.count("layers.0.weight") == 1 and "layers.1.weight" not in names
    assert prepared.layers[0].weight is prepared.layers[1].weight
    prepared.pruner.on_epoch_begin(0)
    converted = fxprune.convert(prepared)
    assert converted.layers[0].weight is converted.layers[1].weight
    assert int((converted.layers[0].weight == 0).sum()) == 18


def test_original_model_is_not_modified():
    spec = MLPSpec(widths=(4, 5, 3), kinds=("module", "functional"), seed=3)
    model, x = build(spec)
    before = copy.deepcopy(model.state_dict())
    prepared = fxprune.prepare(model, config_for({"start_epoch": 0, "end_epoch": 0, "target_sparsity": 0.9}))
    prepared.pruner.on_epoch_begin(0)
    fxprune.convert(prepared, inplace=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert all(isinstance(p, nn.Parameter) for p in model.parameters())


def test_several_pruners_with_own_windows_and_targets():
    spec = MLPSpec(widths=(8, 8, 8, 4), kinds=("module", "module", "functional"), seed=2)
    model, _ = build(spec)
    cfg = {
        "pruning": {
            "magnitude": {
                "early": {"weights": ["layers.0.weight"], "start_epoch": 0, "end_epoch": 2, "target_sparsity": 0.5},
                "late": {"weights": ["layers.1.*"], "start_epoch": 3, "end_epoch": 4, "target_sparsity": 0.75},
                "rest": {"init_sparsity": 0.1, "target_sparsity": 0.2},
            },
            "start_epoch": 1,
            "end_epoch": 1,
            "frequency": 1,
        }
    }
    prepared = fxprune.prepare(model, cfg)
    owner = {t.name: t.pruner for t in prepared.pruner.targets}
    assert owner == {"layers.0.weight": "early", "layers.1.weight": "late", "raw.0": "rest"}
    seen = []
    for epoch in range(6):
        prepared.pruner.on_epoch_begin(epoch)
        seen.append({n: pruned_count(prepared, n) for n in owner})
    assert [s["layers.0.weight"] for s in seen] == [0, 16, 32, 32, 32, 32]
    assert [s["layers.1.weight"] for s in seen] == [0, 0, 0, 0, 48, 48]
    assert [s["raw.0"] for s in seen] == [0, 6, 6, 6, 6, 6]


def test_apply_masks_force_after_a_write_through_data():
    """Writes through .data do not move version counters: apply_masks(force=True) re-zeroes anyway."""
    spec = MLPSpec(widths=(6, 6, 4), kinds=("module", "functional"), seed=0)
    model, x = build(spec)
    prepared = fxprune.prepare(model, config_for({"start_epoch": 0, "end_epoch": 0, "target_sparsity": 0.5}))
    prepared.pruner.on_epoch_begin(0)
    params = [t.masked.param for t in prepared.pruner.targets]
    torch.nn.utils.vector_to_parameters(torch.nn.utils.parameters_to_vector(params) + 1.0, params)
    prepared.pruner.apply_masks()
    assert not all((t.masked.param[~t.masked.mask] == 0).all() for t in prepared.pruner.targets)  # premise
    prepared.pruner.apply_masks(force=True)
    assert all((t.masked.param[~t.masked.mask] == 0).all() for t in prepared.pruner.targets)
    prepared.eval()
    torch.testing.assert_close(prepared(x), fxprune.convert(prepared)(x))
