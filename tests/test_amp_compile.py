"""AMP (CPU bf16 autocast, GradScaler skipped steps), dtype/device moves, and torch.compile == eager."""
from __future__ import annotations

import pytest
import torch

import fxprune
from fxprune.masks import count_to_prune
from training_helpers import TinyNet, batches, epoch_config, loss_fn, pruned_entries_are_zero, snapshot, step_config


def test_bf16_autocast_training_prunes_in_optimizer_mode():
    prepared = fxprune.prepare(TinyNet(), step_config(start_step=0, end_step=6, frequency_steps=2))
    opt = torch.optim.AdamW(prepared.parameters(), lr=1e-2)
    prepared.pruner.attach(opt)
    for x, y in batches(8):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = prepared(x)
            assert out.dtype == torch.bfloat16
            loss = torch.nn.functional.mse_loss(out.float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert pruned_entries_are_zero(prepared)
    assert int(prepared.pruner.step) == 8
    for t in prepared.pruner.targets:
        assert t.masked.param.dtype == torch.float32  # autocast does not touch stored weights
        assert int((~t.masked.mask).sum()) == count_to_prune(0.7, t.masked.mask.numel())


def _scaled_step(prepared, opt, scaler, x, y, poison: bool) -> None:
    loss = loss_fn(prepared, x, y)
    if poison:
        loss = loss * float("inf")  # inf/NaN gradients: GradScaler must skip this step
    opt.zero_grad()
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_grad_scaler_skipped_step_does_not_advance_or_corrupt_the_schedule(fused):
    # step windows with an update at every step: a counted skipped step would prune early
    prepared = fxprune.prepare(TinyNet(), step_config(start_step=0, end_step=6, frequency_steps=1))
    opt = torch.optim.Adam(prepared.parameters(), lr=1e-2, fused=fused)
    prepared.pruner.attach(opt)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    data = batches(6)

    _scaled_step(prepared, opt, scaler, *data[0], poison=False)
    assert int(prepared.pruner.step) == 1
    before = snapshot(prepared)
    scale_before = scaler.get_scale()

    _scaled_step(prepared, opt, scaler, *data[1], poison=True)
    assert scaler.get_scale() < scale_before  # the scaler did see the overflow and skip
    after = snapshot(prepared)
    assert int(prepared.pruner.step) == 1
    for k in before:  # weights, masks, goals, counters: nothing moved
        assert torch.equal(before[k], after[k]), k

    for x, y in data[2:]:
        _scaled_step(prepared, opt, scaler, x, y, poison=False)
        assert pruned_entries_are_zero(prepared)
    assert int(prepared.pruner.step) == 5
    assert prepared.pruner.current_goals() == pytest.approx(prepared.pruner.goal_at(step=5))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_dtype_move_keeps_bool_masks_and_exact_goals(dtype):
    prepared = fxprune.prepare(TinyNet(), epoch_config(init_sparsity=0.3))
    prepared.pruner.on_epoch_begin(0)
    masks = {t.name: t.masked.mask.clone() for t in prepared.pruner.targets}
    goals = prepared.pruner.goals.clone()
    x, _ = batches(1)[0]
    reference = prepared(x)

    prepared.to(dtype)
    for t in prepared.pruner.targets:
        assert t.masked.param.dtype == dtype
        assert t.masked.mask.dtype == torch.bool and torch.equal(t.masked.mask, masks[t.name])
        assert bool((t.masked.param.detach()[~t.masked.mask] == 0).all())
    assert prepared.pruner.goals.dtype == torch.float64 and torch.equal(prepared.pruner.goals, goals)
    assert prepared.pruner.epoch.dtype == torch.long
    torch.testing.assert_close(prepared(x.to(dtype)).float(), reference, rtol=2e-2, atol=2e-2)
    # the goal bookkeeping is unharmed: the next epoch prunes exactly to its goal
    prepared.pruner.on_epoch_begin(1)
    for t in prepared.pruner.targets:
        assert int((~t.masked.mask).sum()) == count_to_prune(prepared.pruner.goal_at(1)["prune1"], t.masked.mask.numel())


def test_device_move_keeps_masks_beside_their_parameters():
    prepared = fxprune.prepare(TinyNet(), epoch_config())
    prepared.to("meta")  # the one non-CPU device every machine has
    for t in prepared.pruner.targets:
        assert t.masked.mask.device == t.masked.param.device == torch.device("meta")
    assert prepared.pruner.goals.device.type == "meta" and prepared.pruner.goals.dtype == torch.float64


def _train_some(prepared, opt, data):
    for x, y in data:
        loss = loss_fn(prepared, x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_torch_compile_matches_eager_forward_and_backward():
    torch.manual_seed(0)
    prepared = fxprune.prepare(TinyNet(), epoch_config())
    opt = torch.optim.SGD(prepared.parameters(), lr=0.05, momentum=0.9)
    prepared.pruner.attach(opt, steps_per_epoch=2)
    _train_some(prepared, opt, batches(3))  # epoch 1: masks pruned to 0.4
    assert all((~t.masked.mask).any() for t in prepared.pruner.targets)

    compiled = torch.compile(prepared, backend="inductor", fullgraph=True)
    x, y = batches(1, seed=7)[0]
    eager_out = prepared(x)
    compiled_out = compiled(x)
    torch.testing.assert_close(compiled_out, eager_out, rtol=1e-5, atol=1e-6)

    eager_grads = torch.autograd.grad(loss_fn(prepared, x, y), [t.masked.param for t in prepared.pruner.targets])
    compiled_grads = torch.autograd.grad(
        torch.nn.functional.mse_loss(compiled(x), y), [t.masked.param for t in prepared.pruner.targets]
    )
    for t, ge, gc in zip(prepared.pruner.targets, eager_grads, compiled_grads):
        torch.testing.assert_close(gc, ge, rtol=1e-5, atol=1e-6)
        assert bool((gc[~t.masked.mask] == 0).all()), t.name

    # training the compiled model in optimizer mode keeps pruning; output still equals eager
    for x2, y2 in batches(4, seed=3):
        loss = torch.nn.functional.mse_loss(compiled(x2), y2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert pruned_entries_are_zero(prepared)
    assert int(prepared.pruner.epoch) == 3 and prepared.pruner.current_goals()["prune1"] == pytest.approx(0.8)
    torch.testing.assert_close(compiled(x), prepared(x), rtol=1e-5, atol=1e-6)
