"""Pruning criteria: how important each weight entry is.

A policy is a pure function ``score(masked) -> Tensor`` (same shape as the
parameter, higher = more worth keeping). Turning scores and a sparsity goal
into a mask is the job of :mod:`fxprune.masks`, so criteria and mask patterns
combine freely. A new policy is one small file plus one line here.
"""
from __future__ import annotations

from typing import Callable

import torch

from fxprune.masked import MaskedParameter
from fxprune.policies.magnitude import magnitude_scores

__all__ = ["POLICIES", "Policy"]

Policy = Callable[[MaskedParameter], torch.Tensor]

POLICIES: dict[str, Policy] = {
    "magnitude": magnitude_scores,
}
