"""When an attached optimizer's step provably keeps pruned weights at zero, skip re-zeroing them.

Re-zeroing after ``optimizer.step()`` is one full pass over every pruned
weight (about 2.5% of an MLP training step on CPU, as much as masking the
gradient). It changes nothing when all of these hold, and
:class:`ZeroPreservingSteps` checks each of them per parameter and per step,
re-zeroing as before when any fails:

1. the stored pruned entries were exactly zero right before the step (the
   parameter's version counter had not moved since the last re-zeroing);
2. the gradient the optimizer reads is exactly the one the masked
   parameter's hook masked in place after autograd accumulated it, under the
   current mask (:meth:`MaskedParameter.grad_is_masked`: the hook stamps the
   gradient's object and version and the mask's version; clipping, AMP
   unscaling, added noise, an assignment or a mask update since void it);
3. the optimizer's per-entry state (momentum, Adam moments) is zero at the
   pruned entries of the current mask: the pruner zeroes it at attach, at
   every mask update and after ``optimizer.load_state_dict``, and it stays
   zero only through steps that meet 1 and 2 (one step on an unmasked
   gradient, or with weight decay on a nonzero pruned weight, puts values
   there until the next zeroing; a mask installed by other means leaves the
   newly pruned entries' state as it was);
4. the optimizer's update maps (weight 0, gradient 0, state 0) to weight 0:
   true of the plain ``torch.optim`` classes in :data:`ZERO_PRESERVING`
   whatever their options (momentum, Nesterov, weight decay, AMSGrad,
   foreach/fused), checked by exact type because a subclass may change
   ``step()``.

Only optimizer mode (``pruner.attach`` / ``prepare(..., optimizer=)``) can
know these; in hook style the pruner never sees the optimizer and always
re-zeroes.
"""
from __future__ import annotations

from typing import Iterable

import torch

from fxprune.masked import MaskedParameter

__all__ = ["ZERO_PRESERVING", "ZeroPreservingSteps"]

#: Optimizers whose step leaves an entry at exactly 0 when its weight, gradient and state are 0.
ZERO_PRESERVING: frozenset[type] = frozenset(
    getattr(torch.optim, name)
    for name in ("SGD", "Adam", "AdamW", "Adagrad", "Adamax", "NAdam", "RAdam", "RMSprop", "Adadelta")
    if hasattr(torch.optim, name)
)


class ZeroPreservingSteps:
    """The re-zeroing after each step of one attached optimizer, skipped where provably a no-op."""

    def __init__(self, optimizer: torch.optim.Optimizer, masked: list[MaskedParameter]):
        self.optimizer = optimizer
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        self.masked = [m for m in masked if id(m.param) in held]
        self.not_held = [m for m in masked if id(m.param) not in held]  # re-zeroed by the pruner after each step
        self.optimizer_preserves_zeros = type(optimizer) in ZERO_PRESERVING
        for m in self.masked:
            m.optimizer_watched += 1
        self._clean_before: list[bool] = []
        # id(param) -> the mask version at which the state was last known zero at the pruned entries
        self._state_zero: dict[int, int | None] = {id(m.param): None for m in self.masked}
        self.skipped = 0  # re-zeroings skipped so far (for tests and benchmarks)
        self.done = 0  # re-zeroings done

    @torch.no_grad()
    def zero_state(self, masked: Iterable[MaskedParameter] | None = None) -> None:
        """Zero this optimizer's per-entry state (momentum, Adam moments) at the pruned entries of ``masked``
        (default: every weight it holds).

        Every state tensor shaped like the parameter is masked, so no stale
        moment pushes a pruned weight again; from here on the state is known
        to be zero there (condition 3).
        """
        for m in self.masked if masked is None else masked:
            for value in self.optimizer.state.get(m.param, {}).values():
                if torch.is_tensor(value) and value.shape == m.mask.shape:
                    value.mul_(m.mask)
            if id(m.param) in self._state_zero:
                self._state_zero[id(m.param)] = m.mask._version

    def before_step(self) -> None:
        self._clean_before = [m.is_clean() for m in self.masked]
        if any(group.get("fused") for group in self.optimizer.param_groups):
            # A fused step writes the weights without moving their version counters: after it, a weight
            # is clean only where the skip proves it.
            for m in self.masked:
                m.forget_clean()

    def release(self) -> None:
        """Stop watching (detach): the weights go back to being re-zeroed whenever they have a gradient."""
        for m in self.masked:
            m.optimizer_watched -= 1

    def after_step(self) -> None:
        """Re-zero what the step may have moved, except where that provably changes nothing."""
        clean_before = self._clean_before or [False] * len(self.masked)
        for m, clean in zip(self.masked, clean_before):
            if m.is_clean():
                continue
            key = id(m._parameters["param"])
            provable = clean and self.optimizer_preserves_zeros and m.grad_is_masked()
            if provable and self._state_zero[key] == m._buffers["mask"]._version:
                m.mark_clean()
                self.skipped += 1
            else:
                if not provable:
                    self._state_zero[key] = None  # the step may have put values into the state there
                m.apply_mask()
                self.done += 1
        self._clean_before = []
