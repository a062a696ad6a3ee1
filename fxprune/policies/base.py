"""The policy interface: scores from a weight and the state kept next to it.

Most criteria are a pure function of the weight (magnitude). Some need
evidence gathered while the model runs: movement pruning sums ``-w * grad``
over training steps, Wanda needs the norms of each weight's input features.
That evidence is *state*, and fxprune keeps all state in the prepared model's
``state_dict()`` so that a resumed run scores exactly like an uninterrupted
one. A policy therefore has three parts:

- :meth:`Policy.attach` -- once per weight at ``prepare``: register the
  policy's state module on the weight's :class:`~fxprune.masked.MaskedParameter`
  (keys such as ``fc.weight.movement.score``). It goes away with the mask at
  ``convert``.
- :meth:`Policy.observe_gradients` -- after each optimizer step, while
  ``param.grad`` still holds that step's gradient (gradient-based policies).
- :meth:`Policy.scores` -- pure: weight + state -> scores (higher = keep).

Calling a policy object is the same as calling :meth:`Policy.scores`, so the
registry keeps its old shape ``POLICIES[name](masked) -> scores``.
"""
from __future__ import annotations

import torch
from torch import nn

from fxprune.errors import PruningError
from fxprune.masked import MaskedParameter

__all__ = ["Policy", "PolicyNotReady", "PolicyState"]


class PolicyNotReady(PruningError):
    """A policy was asked for scores before it gathered its evidence (no training step, no calibration).

    Raised without the weight's name; the Pruner re-raises it as a
    :class:`~fxprune.errors.PruningError` naming the weight and the pruner.
    """


class PolicyState(nn.Module):
    """Base of the per-weight state modules: buffers follow ``.to(device)`` but keep their dtype.

    ``model.to(torch.bfloat16)`` or ``.half()`` converts every floating
    buffer; accumulated statistics would lose their precision (and a float64
    sum of squares could overflow in fp16), so only the device changes here.
    """

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        saved = dict(self._buffers)
        super()._apply(fn, recurse)
        for name, old in saved.items():
            new = self._buffers[name]
            if old is not None and new is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(device=new.device)
        return self


class Policy:
    """A pruning criterion. Subclasses override :meth:`scores` and, if they keep state, the other two hooks."""

    #: The key under which pruners of this policy are declared in the config (``pruning.<name>.<pruner>``).
    name: str = ""

    def attach(self, masked: MaskedParameter) -> None:
        """Register this policy's state on ``masked`` (default: the policy has none)."""

    def observe_gradients(self, masked: MaskedParameter) -> None:
        """Fold the gradient of the optimizer step that just ran into the state (default: ignore it)."""

    def scores(self, masked: MaskedParameter) -> torch.Tensor:
        """Importance of every entry (same shape as the parameter; higher = keep)."""
        raise NotImplementedError

    def __call__(self, masked: MaskedParameter) -> torch.Tensor:
        return self.scores(masked)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
