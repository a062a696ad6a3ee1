"""Pruning criteria: how important each weight entry is.

A policy is a :class:`~fxprune.policies.base.Policy`: ``POLICIES[name](masked)``
gives scores (same shape as the parameter, higher = more worth keeping), pure
given the weight and the policy's state; policies that need evidence
(gradients for movement, activations for wanda) keep it next to the weight,
in the prepared model's ``state_dict()`` (see :mod:`fxprune.policies.base`).
Turning scores and a sparsity goal into a mask is the job of
:mod:`fxprune.masks`, so criteria and mask patterns combine freely. A new
policy is one small file plus one line here.
"""
from __future__ import annotations

from fxprune.policies.base import Policy, PolicyNotReady
from fxprune.policies.lamp import LampPolicy
from fxprune.policies.magnitude import MagnitudePolicy
from fxprune.policies.movement import MovementPolicy
from fxprune.policies.wanda import WandaPolicy

__all__ = ["POLICIES", "Policy", "PolicyNotReady"]

POLICIES: dict[str, Policy] = {
    "magnitude": MagnitudePolicy(),
    "movement": MovementPolicy(),
    "wanda": WandaPolicy(),
    "lamp": LampPolicy(),
}
