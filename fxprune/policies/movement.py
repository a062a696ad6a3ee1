"""Movement pruning (Sanh, Wolf & Rush 2020, "Movement Pruning: Adaptive Sparsity by Fine-Tuning").

During fine-tuning, what matters is not how large a weight is but whether
training pushes it away from zero or towards it. Movement pruning scores each
entry by the sum over optimizer steps of ``-w * dL/dw``: positive when the
gradient step grows ``|w|`` (keep), negative when it shrinks it (prune).
That is the first-order importance score of the paper's "hard movement"
variant, with the scores accumulated directly instead of learned through a
straight-through estimator.

The sum starts at the first optimizer step after ``prepare``, so the first
mask update already ranks by movement. It lives in the prepared model's
``state_dict()`` (``<weight>.movement.score`` and ``<weight>.movement.steps``)
so that resuming continues the same sum. ``w`` is the weight after the
step and ``g`` the gradient of that step, as seen by
:meth:`fxprune.Pruner.observe_gradients` (``on_batch_end`` in hook style).
Pruned entries have zero gradient, so their score stops moving.
"""
from __future__ import annotations

import torch

from fxprune.masked import MaskedParameter
from fxprune.policies.base import Policy, PolicyNotReady, PolicyState

__all__ = ["MovementPolicy", "MovementState"]


class MovementState(PolicyState):
    """The accumulated movement score of one weight and the number of gradient steps it has seen."""

    def __init__(self, param: torch.Tensor):
        super().__init__()
        # float32 at least: a sum of many small products must not round away in bf16/fp16.
        dtype = torch.float64 if param.dtype == torch.float64 else torch.float32
        self.register_buffer("score", torch.zeros(param.shape, dtype=dtype, device=param.device))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long, device=param.device))

    def extra_repr(self) -> str:
        return f"steps={int(self.steps)}"


class MovementPolicy(Policy):
    """Score = sum over optimizer steps of ``-w * grad``; higher = keep."""

    name = "movement"

    def attach(self, masked: MaskedParameter) -> None:
        masked.add_module("movement", MovementState(masked.param))

    @torch.no_grad()
    def observe_gradients(self, masked: MaskedParameter) -> None:
        grad = masked.param.grad
        if grad is None:  # no backward since the last zero_grad(set_to_none=True): nothing moved
            return
        state: MovementState = masked.movement
        state.score.sub_(masked.param.detach().to(state.score.dtype) * grad.to(state.score.dtype))
        state.steps += 1

    def scores(self, masked: MaskedParameter) -> torch.Tensor:
        state: MovementState = masked.movement
        if int(state.steps) == 0:
            raise PolicyNotReady(
                "movement scores are empty: no optimizer step with a gradient has been observed since prepare. "
                "Call pruner.on_batch_end() after optimizer.step() and before the next optimizer.zero_grad(), "
                "and start pruning after at least one training step (e.g. start_epoch >= 1, or init_sparsity 0)"
            )
        return state.score.clone()
