"""One-shot without a training loop: ``pruner.prune_now()`` and convert's warning (issue 9, item 3)."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxprune
from fxprune.masks import count_to_prune
from training_helpers import TinyNet


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.c2(torch.relu(self.c1(x))))
        return self.fc(x.mean((2, 3)))


def _config(**keys):
    return {"pruning": {"magnitude": {"p": {}}, **keys}}


def _unapplied(record):
    return [w for w in record if issubclass(w.category, fxprune.UnappliedGoalWarning)]


def test_channel_oneshot_without_a_hook_warns_then_prune_now_shrinks():
    x = torch.randn(2, 3, 8, 8)
    prepared = fxprune.prepare(ConvNet(), _config(pattern="channel", schedule="oneshot", target_sparsity=0.5),
                               example_inputs=(x,))
    dense = sum(p.numel() for p in ConvNet().parameters())
    with pytest.warns(fxprune.UnappliedGoalWarning, match=r"pruning\.magnitude\.p: goal 0\.5000 now.*never updated"):
        unpruned = fxprune.convert(prepared, physical=True)
    assert sum(p.numel() for p in unpruned.parameters()) == dense  # what the warning is about
    assert prepared.pruner.prune_now() == {"p": 0.5}
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        shrunk = fxprune.convert(prepared, physical=True)
    assert not _unapplied(record)
    assert sum(p.numel() for p in shrunk.parameters()) < dense
    prepared.eval()
    shrunk.eval()
    assert torch.allclose(shrunk(x), prepared(x), atol=1e-5)


@settings(max_examples=15, deadline=None)
@given(
    schedule=st.sampled_from(["oneshot", "linear", "cubic"]),
    start=st.integers(0, 3),
    length=st.integers(0, 3),
    epoch=st.integers(-1, 6),
    target=st.sampled_from([0.3, 0.5, 0.8]),
)
def test_prune_now_equals_the_hook_update_at_the_current_epoch(schedule, start, length, epoch, target):
    cfg = _config(schedule=schedule, start_epoch=start, end_epoch=start + length, init_sparsity=0.1,
                  target_sparsity=target)
    a = fxprune.prepare(TinyNet(), cfg)
    b = fxprune.prepare(TinyNet(), cfg)
    if epoch >= 0:
        a.pruner.epoch.fill_(epoch)  # the clock set without an update (e.g. a resumed counter)
        b.pruner.epoch.fill_(epoch)
    goals = a.pruner.prune_now()
    # the oracle: the schedule at the current epoch (epoch 0 before any is set), the target for oneshot
    at = max(epoch, 0)
    want = target if schedule == "oneshot" else b.pruner.goal_at(at)["p"]
    assert goals == {"p": pytest.approx(want)}
    assert int(a.pruner.epoch) == epoch  # the clock is left alone
    b.pruner.epoch.fill_(max(at, start + length) if schedule == "oneshot" else at)
    b.pruner.update_masks()
    for ta, tb in zip(a.pruner.targets, b.pruner.targets):
        assert torch.equal(ta.masked.mask, tb.masked.mask), ta.name
        assert int((~ta.masked.mask).sum()) == count_to_prune(want, ta.masked.mask.numel())
        assert bool((ta.masked.param[~ta.masked.mask] == 0).all())
    assert a.pruner.unapplied_goals() == {}
    assert a.pruner.prune_now() == goals  # a second call has nothing to do


def test_prune_now_under_a_step_schedule_and_nm():
    cfg = _config(schedule="oneshot", pattern="2:4", target_sparsity=0.5, start_step=5, end_step=5)
    prepared = fxprune.prepare(TinyNet(), cfg)
    prepared.pruner.prune_now()
    for t in prepared.pruner.targets:
        groups = t.masked.mask.reshape(-1, 4)
        assert bool((groups.sum(1) == 2).all()), t.name


def test_prune_now_zeroes_the_optimizer_state_of_newly_pruned_entries():
    prepared = fxprune.prepare(TinyNet(), _config(schedule="oneshot", target_sparsity=0.5))
    opt = torch.optim.SGD(prepared.parameters(), lr=0.1, momentum=0.9)
    prepared.pruner.attach(opt, steps_per_epoch=100)  # epoch 0 goal: the oneshot already applies at attach
    prepared.pruner.detach()
    fresh = fxprune.prepare(TinyNet(), _config(schedule="oneshot", target_sparsity=0.5, start_epoch=3, end_epoch=3))
    opt = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    fresh.pruner.attach(opt, steps_per_epoch=100)
    x = torch.randn(8, 12)
    fresh(x).sum().backward()
    opt.step()
    fresh.pruner.prune_now()
    for t in fresh.pruner.targets:
        buf = opt.state[t.masked.param]["momentum_buffer"]
        assert bool((buf[~t.masked.mask] == 0).all()), t.name


def test_convert_is_quiet_when_the_masks_follow_the_schedule():
    prepared = fxprune.prepare(TinyNet(), _config(start_epoch=0, end_epoch=4, target_sparsity=0.6))
    for epoch in range(2):  # stopped mid-schedule: the goal of epoch 1 is applied, nothing lags
        prepared.pruner.on_epoch_begin(epoch)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fxprune.convert(prepared)
        fxprune.convert(fxprune.prepare(TinyNet(), _config(start_epoch=2, end_epoch=4, target_sparsity=0.6)))
    assert not _unapplied(record)


def test_convert_warns_when_the_masks_lag_behind_the_clock():
    cfg = _config(start_epoch=0, end_epoch=2, init_sparsity=0.2, target_sparsity=0.6)
    prepared = fxprune.prepare(TinyNet(), cfg)
    prepared.pruner.on_epoch_begin(0)
    prepared.pruner.epoch.fill_(2)  # the clock moved without an update
    with pytest.warns(fxprune.UnappliedGoalWarning, match=r"goal 0\.6000 now, but its masks are at 0\.2000"):
        fxprune.convert(copy.deepcopy(prepared))
