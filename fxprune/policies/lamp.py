"""LAMP: layer-adaptive magnitude scores (Lee, Park, Mo, Ahn & Shin 2021, "Layer-adaptive sparsity for
the magnitude-based pruning").

Global magnitude pruning compares raw ``|w|`` across layers whose weights live
on different scales (a 3x3 convolution with 9 inputs per filter starts with
weights ~10x larger than a 1024-input linear layer), so at extreme sparsity it
keeps most of the small layers and starves the large ones. LAMP rescales each
entry by the energy of the entries of its own tensor that are at least as
large::

    score(u) = w_u^2 / sum_{v : |w_v| >= |w_u|} w_v^2     (ties: in sorted order)

Within one tensor the order is exactly the magnitude order (so ``scope:
local`` and ``N:M`` masks equal magnitude's), but the scores are comparable
across tensors: the largest entry of every tensor scores 1 and is always kept
by a global threshold below 1, and a layer gives up weights only as far as
its own remaining energy allows. Use it with ``scope: global``. Pruned entries
are stored as zero, so they score 0 and take no share of the denominators.

Stateless, like magnitude: it works at any time, with or without training.
"""
from __future__ import annotations

import torch

from fxprune.masked import MaskedParameter
from fxprune.policies.base import Policy

__all__ = ["lamp_scores", "LampPolicy"]


def lamp_scores(masked: MaskedParameter | torch.Tensor) -> torch.Tensor:
    """LAMP score of every entry of the weight (same shape; in [0, 1]; the largest entry scores 1)."""
    w = masked.param.detach() if isinstance(masked, MaskedParameter) else masked.detach()
    flat = w.flatten().double() if w.dtype == torch.float64 else w.flatten().float()
    # Scores do not depend on scale; dividing by the largest |w| keeps tiny weights from squaring to 0
    # (a tensor of ~1e-23 weights would otherwise score 0 everywhere, its largest entry included).
    peak = flat.abs().max() if flat.numel() else flat.new_zeros(())
    w2 = (flat / peak).square() if float(peak) > 0 else flat.square()
    order = torch.argsort(w2, stable=True)  # ascending; equal entries keep index order
    s = w2[order]
    tail = torch.flip(torch.cumsum(torch.flip(s, (0,)), 0), (0,))  # energy of this entry and all later ones
    out = torch.empty_like(w2)
    # An all-zero tail (only pruned entries left) would be 0/0: those entries score 0.
    out[order] = s / tail.clamp_min(torch.finfo(s.dtype).tiny)
    return out.view(w.shape)


class LampPolicy(Policy):
    """Layer-adaptive magnitude: |w| ranking within a tensor, energy-normalized across tensors."""

    name = "lamp"

    def scores(self, masked: MaskedParameter) -> torch.Tensor:
        return lamp_scores(masked)
