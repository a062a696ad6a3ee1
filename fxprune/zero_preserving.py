"""When an attached optimizer's step provably keeps pruned weights at zero, skip re-zeroing them.

Re-zeroing after ``optimizer.step()`` is one full pass over every pruned
weight (about 2.5% of an MLP training step on CPU, as much as masking the
gradient). It changes nothing when all of these hold, and
:class:`ZeroPreservingSteps` checks each of them per parameter and per step,
re-zeroing as before when any fails:

1. the stored pruned entries were exactly zero right before the step (the
   parameter's version counter had not moved since the last re-zeroing);
2. the gradient the optimizer reads is exactly what autograd accumulated
   through the mask, so it is zero at every pruned entry: a
   post-accumulate-grad hook stamps it (object, version), and anything that
   touched it since -- clipping, AMP unscaling, added noise, a DDP copy-back,
   an assignment -- changes one of the two and voids the stamp;
3. the optimizer's per-entry state (momentum, Adam moments) is zero at the
   pruned entries: the pruner zeroes it at attach, at every mask update and
   after ``optimizer.load_state_dict``, and it stays zero only through steps
   that meet 1 and 2 (one step on an unmasked gradient, or with weight decay
   on a nonzero pruned weight, puts values there until the next zeroing);
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

import weakref
from typing import Iterable

import torch

from fxprune.masked import MaskedParameter

__all__ = ["ZERO_PRESERVING", "GradStamps", "ZeroPreservingSteps"]

#: Optimizers whose step leaves an entry at exactly 0 when its weight, gradient and state are 0.
ZERO_PRESERVING: frozenset[type] = frozenset(
    getattr(torch.optim, name)
    for name in ("SGD", "Adam", "AdamW", "Adagrad", "Adamax", "NAdam", "RAdam", "RMSprop", "Adadelta")
    if hasattr(torch.optim, name)
)


class GradStamps:
    """Which pruned parameters' ``.grad`` is exactly the masked gradient autograd accumulated.

    A stamp is taken right after each accumulation: a new gradient tensor at
    version 0 (autograd stored the masked gradient itself, the default with
    ``zero_grad(set_to_none=True)``), or the stamped tensor one version on (an
    in-place accumulation of one more masked gradient). Anything else -- a
    gradient the user assigned or edited, ``create_graph=True``, sparse
    gradients -- gives no stamp. Nor does a gradient built by a forward that
    ran under another mask than the current one (a mask update between
    forward and step): it is not zero at the newly pruned entries.
    """

    def __init__(self, masked: Iterable[MaskedParameter]):
        masked = list(masked)
        self._masked_of = {id(m.param): m for m in masked}
        self._stamps: dict[int, tuple[weakref.ref, int, int]] = {}
        self._handles = [m.param.register_post_accumulate_grad_hook(self._after_accumulate) for m in masked]

    def _after_accumulate(self, param: torch.Tensor) -> None:
        grad = param.grad
        key = id(param)
        masked = self._masked_of[key]
        old = self._stamps.pop(key, None)
        seen = masked.forward_mask_versions
        mask_version = masked._buffers["mask"]._version
        one_mask = len(seen) == 1 and mask_version in seen
        seen.clear()
        if grad is None or grad.is_sparse or torch.is_grad_enabled() or not one_mask:
            return
        fresh = grad._version == 0 and (old is None or old[0]() is not grad)
        accumulated = (old is not None and old[0]() is grad and grad._version == old[1] + 1
                       and old[2] == mask_version)
        if fresh or accumulated:
            self._stamps[key] = (weakref.ref(grad), grad._version, mask_version)

    def masked(self, param: torch.Tensor) -> bool:
        """True if ``param.grad`` is still the stamped gradient, masked by the current mask."""
        stamp = self._stamps.get(id(param))
        grad = param.grad
        return (stamp is not None and grad is not None and stamp[0]() is grad and grad._version == stamp[1]
                and self._masked_of[id(param)]._buffers["mask"]._version == stamp[2])

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._stamps.clear()


class ZeroPreservingSteps:
    """The re-zeroing after each step of one attached optimizer, skipped where provably a no-op."""

    def __init__(self, optimizer: torch.optim.Optimizer, masked: list[MaskedParameter]):
        self.optimizer = optimizer
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        self.masked = [m for m in masked if id(m.param) in held]
        self.optimizer_preserves_zeros = type(optimizer) in ZERO_PRESERVING
        self.stamps = GradStamps(self.masked) if self.optimizer_preserves_zeros else None
        self._clean_before: list[bool] = []
        self._state_zero = {id(m.param): False for m in self.masked}
        self.skipped = 0  # re-zeroings skipped so far (for tests and benchmarks)
        self.done = 0  # re-zeroings done

    @torch.no_grad()
    def zero_state(self, masked: Iterable[MaskedParameter]) -> None:
        """Zero this optimizer's per-entry state (momentum, Adam moments) at the pruned entries of ``masked``.

        Every state tensor shaped like the parameter is masked, so no stale
        moment pushes a pruned weight again; from here on the state is known
        to be zero there (condition 3).
        """
        for m in masked:
            for value in self.optimizer.state.get(m.param, {}).values():
                if torch.is_tensor(value) and value.shape == m.mask.shape:
                    value.mul_(m.mask)
            if id(m.param) in self._state_zero:
                self._state_zero[id(m.param)] = True

    def before_step(self) -> None:
        self._clean_before = [m.is_clean() for m in self.masked]

    def after_step(self) -> None:
        """Re-zero what the step may have moved, except where that provably changes nothing."""
        clean_before = self._clean_before or [False] * len(self.masked)
        for m, clean in zip(self.masked, clean_before):
            if m.is_clean():
                continue
            key = id(m.param)
            provable = clean and self.stamps is not None and self.stamps.masked(m.param)
            if provable and self._state_zero[key]:
                m.mark_clean()
                self.skipped += 1
            else:
                m.apply_mask()
                self.done += 1
                self._state_zero[key] = self._state_zero[key] and provable
        self._clean_before = []

    def remove(self) -> None:
        if self.stamps is not None:
            self.stamps.remove()
