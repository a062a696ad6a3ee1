"""Magnitude pruning: small weights matter least (Han et al. 2015; the seed's only policy)."""
from __future__ import annotations

import torch

from fxprune.masked import MaskedParameter
from fxprune.policies.base import Policy

__all__ = ["magnitude_scores", "MagnitudePolicy"]


def magnitude_scores(masked: MaskedParameter) -> torch.Tensor:
    """|w|, in at least float32 so that ties and rounding do not depend on the training dtype."""
    w = masked.param.detach()
    return w.abs().float() if w.dtype in (torch.float16, torch.bfloat16) else w.abs()


class MagnitudePolicy(Policy):
    """|w|: stateless, so it works at any time, with or without training."""

    name = "magnitude"

    def scores(self, masked: MaskedParameter) -> torch.Tensor:
        return magnitude_scores(masked)
