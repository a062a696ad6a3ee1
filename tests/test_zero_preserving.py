"""Optimizer mode skips the re-zeroing after a step only where it provably changes nothing.

The property: whatever a training loop does between forward and step
(clipping, gradient noise, assigned gradients, accumulation, mask updates
between backward and step, weight edits, loading an optimizer state from
before pruning), the run with the skip is bit-identical to the same run
forced to re-zero after every step, and pruned weights are exactly zero after
every step. The forced run uses a subclass of the optimizer: the skip trusts
only the exact ``torch.optim`` classes.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fxprune
from fxprune.zero_preserving import ZERO_PRESERVING
from training_helpers import TinyNet, assert_identical, batches, loss_fn, pruned_entries_are_zero, snapshot, step_config

OPTIMIZERS = {
    "SGD": dict(lr=0.05, momentum=0.9, weight_decay=1e-3, nesterov=True, foreach=True),
    "Adam": dict(lr=1e-2, weight_decay=1e-3, foreach=True),
    "AdamW": dict(lr=1e-2, weight_decay=0.1, amsgrad=True),
    "Adagrad": dict(lr=0.05, initial_accumulator_value=0.1, weight_decay=1e-3),
    "Adamax": dict(lr=1e-2),
    "NAdam": dict(lr=1e-2, weight_decay=1e-3, decoupled_weight_decay=True),
    "RAdam": dict(lr=1e-2, weight_decay=1e-3),
    "RMSprop": dict(lr=1e-3, momentum=0.5, centered=True, weight_decay=1e-3),
    "Adadelta": dict(lr=1.0, weight_decay=1e-3),
}

DISTURBANCES = ("none", "clip", "noise", "assign", "keep_grad", "accumulate", "mask_update", "mask_update_forward",
                "edit_weight", "load_dense_state", "double_forward")


def prune_half(masked) -> None:
    mask = masked.mask.clone()
    mask.view(-1)[: mask.numel() // 2] = False
    masked.set_mask(mask)


def _untrusted(cls: type) -> type:
    return type("Untrusted" + cls.__name__, (cls,), {})  # same step(), but not an exact torch.optim class


def run(name: str, disturbances: list[str], *, trusted: bool, config: dict | None = None):
    cls = getattr(torch.optim, name)
    # the last scheduled mask update (which re-zeroes everything) is at step 5: later steps rely on the skip
    config = config or step_config(start_step=1, end_step=5, frequency_steps=2)
    prepared = fxprune.prepare(TinyNet(), config)
    opt = (cls if trusted else _untrusted(cls))(prepared.parameters(), **OPTIMIZERS[name])
    prepared.pruner.attach(opt)
    steps = prepared.pruner._optimizers[0].steps
    dense_state = None
    gen = torch.Generator().manual_seed(0)
    always_zero = True
    for (x, y), what in zip(batches(len(disturbances)), disturbances):
        if what == "keep_grad":
            opt.zero_grad(set_to_none=False)
        else:
            opt.zero_grad()
        loss = loss_fn(prepared, x, y)
        if what == "double_forward":
            loss = loss + loss_fn(prepared, y.new_ones(x.shape), y)
        if what == "mask_update_forward":  # between forward and backward: momentum is not zeroed there
            prune_half(prepared.pruner.targets[1].masked)
        loss.backward()
        if what == "accumulate":
            loss_fn(prepared, x * 2, y).backward()
        params = [t.masked.param for t in prepared.pruner.targets]
        if what == "clip":
            torch.nn.utils.clip_grad_norm_(prepared.parameters(), 0.1)
        elif what == "noise":
            for p in params:
                p.grad.add_(torch.randn(p.shape, generator=gen))
        elif what == "assign":
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
        elif what == "mask_update":  # prune more between backward and step: the gradient is masked by the old mask
            prune_half(prepared.pruner.targets[0].masked)
        elif what == "edit_weight":
            with torch.no_grad():
                params[1].add_(0.5)
        elif what == "load_dense_state":
            if dense_state is None:
                # a state from before pruning, in the prepared model's parameter order
                dense = fxprune.prepare(TinyNet(), step_config(start_step=100, end_step=200))
                dense_opt = cls(dense.parameters(), **OPTIMIZERS[name])
                loss_fn(dense, x, y).backward()
                dense_opt.step()
                dense_state = dense_opt.state_dict()
            opt.load_state_dict(dense_state)
        opt.step()
        always_zero &= pruned_entries_are_zero(prepared)
    return prepared, steps, always_zero


def test_the_trusted_optimizers_exist():
    assert {getattr(torch.optim, n) for n in OPTIMIZERS} == set(ZERO_PRESERVING)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_plain_loop_skips_and_equals_always_rezeroing(name):
    plain = ["none"] * 12
    fast, steps, zero = run(name, plain, trusted=True)
    slow, slow_steps, slow_zero = run(name, plain, trusted=False)
    assert zero and slow_zero
    assert slow_steps.skipped == 0
    # every step on three weights, except right after attach (state unknown until the first zeroing)
    # and the steps that follow a mask update's re-zeroing
    assert steps.skipped >= 2 * len(plain), (steps.skipped, steps.done)
    assert_identical(snapshot(fast), snapshot(slow))


@settings(max_examples=25, deadline=None)
@given(
    name=st.sampled_from(list(OPTIMIZERS)),
    disturbances=st.lists(st.sampled_from(DISTURBANCES), min_size=6, max_size=14),
)
def test_any_loop_is_bit_identical_to_always_rezeroing(name, disturbances):
    fast, _, zero = run(name, disturbances, trusted=True)
    slow, _, slow_zero = run(name, disturbances, trusted=False)
    assert zero and slow_zero
    assert_identical(snapshot(fast), snapshot(slow))


FORCING = ("clip", "noise", "assign", "mask_update", "mask_update_forward", "edit_weight")
#: The gradient is masked after each accumulation, so these still end in a masked gradient.
STILL_SKIPPING = ("keep_grad", "accumulate", "double_forward")


@pytest.mark.parametrize("what", FORCING)
def test_each_disturbance_forces_the_rezeroing(what):
    """Plain steps skip every re-zeroing; a step after a disturbance really re-zeroes."""
    once = step_config(start_step=0, end_step=0, init_sparsity=0.5, target_sparsity=0.5)
    for disturbances, skipped, forced in ((["none"] * 4, 12, 0), (["none"] * 3 + [what], 9, 1)):
        prepared, steps, zero = run("SGD", disturbances, trusted=True, config=once)
        assert zero
        assert steps.skipped >= skipped and steps.done >= forced, (what, steps.skipped, steps.done)
        if forced:
            assert steps.skipped < 12


@pytest.mark.parametrize("what", STILL_SKIPPING)
def test_accumulated_gradients_still_skip(what):
    """Accumulating into a kept or zeroed gradient ends in a masked gradient: no re-zeroing needed."""
    once = step_config(start_step=0, end_step=0, init_sparsity=0.5, target_sparsity=0.5)
    prepared, steps, zero = run("SGD", ["none"] * 2 + [what] * 2, trusted=True, config=once)
    assert zero
    assert steps.skipped == 12 and steps.done == 0, (what, steps.skipped, steps.done)


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
@pytest.mark.parametrize("mode", ["attach", "hooks"])
def test_fused_optimizers_keep_pruned_weights_at_zero(name, mode):
    """A fused step writes the weights without moving their version counters: nothing may take them as clean."""
    kwargs = {"lr": 1e-2, "fused": True, **({"momentum": 0.9} if name == "SGD" else {})}
    prepared = fxprune.prepare(TinyNet(), step_config(start_step=0, end_step=4, frequency_steps=2))
    opt = getattr(torch.optim, name)(prepared.parameters(), **kwargs)
    pruner = prepared.pruner
    if mode == "attach":
        pruner.attach(opt)
    gen = torch.Generator().manual_seed(0)
    for x, y in batches(8):
        if mode == "hooks":
            pruner.on_batch_begin()
        opt.zero_grad()
        loss_fn(prepared, x, y).backward()
        for p in prepared.parameters():  # noise on every gradient: pruned entries would move
            p.grad.add_(1e-2 * torch.randn(p.shape, generator=gen))
        opt.step()
        if mode == "hooks":
            pruner.on_batch_end()
        assert pruned_entries_are_zero(prepared)
        prepared.eval()
        torch.testing.assert_close(prepared(x), fxprune.convert(prepared)(x))
        prepared.train()
