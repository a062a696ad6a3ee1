"""Checkpoints: a mid-schedule state_dict resumes bit-identically; pickle and deepcopy keep everything."""
from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

import fxprune
from training_helpers import TinyNet, assert_identical, batches, epoch_config, loss_fn, snapshot, step_config

STEPS_PER_EPOCH = 4
EPOCHS = 5


def train(prepared, opt, data, start_step: int, stop_step: int) -> None:
    for i in range(start_step, stop_step):
        x, y = data[i % len(data)]  # deterministic data order, a function of the global step
        loss = loss_fn(prepared, x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def fresh(config):
    prepared = fxprune.prepare(TinyNet(), config)
    opt = torch.optim.Adam(prepared.parameters(), lr=1e-2)
    return prepared, opt


def save(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def load(data: bytes):
    return torch.load(io.BytesIO(data), weights_only=True)


@pytest.mark.parametrize("config", [epoch_config(), step_config()], ids=["epochs", "steps"])
@pytest.mark.parametrize("split", [3, 6, 9, 13])
def test_optimizer_mode_resume_is_bit_identical(config, split):
    data = batches(STEPS_PER_EPOCH)
    total = STEPS_PER_EPOCH * EPOCHS

    ref, ref_opt = fresh(config)
    ref.pruner.attach(ref_opt, steps_per_epoch=STEPS_PER_EPOCH)
    train(ref, ref_opt, data, 0, total)

    first, first_opt = fresh(config)
    first.pruner.attach(first_opt, steps_per_epoch=STEPS_PER_EPOCH)
    train(first, first_opt, data, 0, split)
    checkpoint = save({"model": first.state_dict(), "optimizer": first_opt.state_dict()})
    goals_at_split = first.pruner.current_goals()
    del first, first_opt

    resumed, resumed_opt = fresh(config)
    state = load(checkpoint)
    resumed.load_state_dict(state["model"])
    resumed_opt.load_state_dict(state["optimizer"])
    resumed.pruner.attach(resumed_opt, steps_per_epoch=STEPS_PER_EPOCH)
    assert int(resumed.pruner.step) == split
    assert resumed.pruner.current_goals() == goals_at_split
    train(resumed, resumed_opt, data, split, total)

    assert_identical(snapshot(resumed), snapshot(ref))


def test_hook_style_resume_is_bit_identical():
    data = batches(STEPS_PER_EPOCH)

    def run(prepared, opt, epochs):
        for epoch in epochs:
            prepared.pruner.on_epoch_begin(epoch)
            for x, y in data:
                prepared.pruner.on_batch_begin()
                loss = loss_fn(prepared, x, y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                prepared.pruner.on_batch_end()
            prepared.pruner.on_epoch_end(epoch)

    ref, ref_opt = fresh(epoch_config())
    run(ref, ref_opt, range(EPOCHS))
    first, first_opt = fresh(epoch_config())
    run(first, first_opt, range(2))
    checkpoint = save({"model": first.state_dict(), "optimizer": first_opt.state_dict()})
    resumed, resumed_opt = fresh(epoch_config())
    state = load(checkpoint)
    resumed.load_state_dict(state["model"])
    resumed_opt.load_state_dict(state["optimizer"])
    assert int(resumed.pruner.epoch) == 1
    run(resumed, resumed_opt, range(2, EPOCHS))
    assert_identical(snapshot(resumed), snapshot(ref))


def test_state_dict_holds_masks_and_schedule_state():
    prepared, opt = fresh(epoch_config())
    prepared.pruner.attach(opt, steps_per_epoch=2)
    train(prepared, opt, batches(2), 0, 5)
    sd = prepared.state_dict()
    assert int(sd["pruner.step"]) == 5 and int(sd["pruner.epoch"]) == 2
    assert sd["pruner.goals"].dtype == torch.float64
    for name in ("fc1.weight", "fc2.weight", "proj"):
        assert sd[f"{name}.mask"].dtype == torch.bool
        assert bool((sd[f"{name}.param"][~sd[f"{name}.mask"]] == 0).all())
        assert int((~sd[f"{name}.mask"]).sum()) > 0


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_copies_of_a_prepared_model_keep_masks_state_and_keep_pruning(how):
    data = batches(3)
    prepared, opt = fresh(epoch_config())
    prepared.pruner.attach(opt, steps_per_epoch=3)
    train(prepared, opt, data, 0, 4)  # mid-schedule: epoch 1, goal 0.4

    if how == "deepcopy":
        clone = copy.deepcopy(prepared)
    elif how == "pickle":
        clone = pickle.loads(pickle.dumps(prepared))
    else:
        clone = torch.load(io.BytesIO(save(prepared)), weights_only=False)
    assert_identical(snapshot(clone), snapshot(prepared))
    assert clone.pruner.optimizers == []  # a copy is not attached to the original's optimizer
    assert prepared.pruner.optimizers == [opt]
    x, _ = data[0]
    assert torch.equal(clone(x), prepared(x))
    for t in clone.pruner.targets:  # the copy's pruner drives the copy's own masked parameters
        assert any(t.masked is m for m in clone.modules())

    # both continue the schedule the same way, each with its own optimizer
    clone_opt = torch.optim.Adam(clone.parameters(), lr=1e-2)
    clone_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # load_state_dict would share the tensors
    clone.pruner.attach(clone_opt, steps_per_epoch=3)
    train(prepared, opt, data, 4, 12)
    train(clone, clone_opt, data, 4, 12)
    assert_identical(snapshot(clone), snapshot(prepared))
    assert clone.pruner.current_goals() == pytest.approx({"prune1": 0.8})
    converted = fxprune.convert(clone)
    assert isinstance(converted, TinyNet)
    assert torch.equal(converted(x), clone(x))


def test_loading_a_state_at_the_same_epoch_is_pruned_again():
    """update_masks skips a second call at the same step; a loaded state (same epoch, other goals) is not skipped."""
    config = epoch_config(start_epoch=0, end_epoch=0, init_sparsity=0.5, target_sparsity=0.5)
    prepared, _ = fresh(config)
    prepared.pruner.on_epoch_begin(2)
    unpruned, _ = fresh(config)
    unpruned.pruner.epoch.fill_(2)  # epoch 2, goals and masks from before any update
    prepared.load_state_dict(unpruned.state_dict())
    assert all(bool(t.masked.mask.all()) for t in prepared.pruner.targets)
    assert prepared.pruner.update_masks()
    assert prepared.pruner.current_goals() == {"prune1": 0.5}
    assert not prepared.pruner.update_masks()  # nothing more to do at epoch 2
