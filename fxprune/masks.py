"""Scores + sparsity goal -> keep-mask.

Masks are monotone: an entry pruned once stays pruned, so a new mask only
adds pruned entries to the old one. Ties are broken by flat index (lowest
index pruned first), so the same weights always give the same mask.
"""
from __future__ import annotations

import math

import torch

from fxprune.config import PrunerConfig
from fxprune.masked import MaskedParameter

__all__ = ["count_to_prune", "local_unstructured_mask", "select_masks"]


def count_to_prune(sparsity: float, numel: int) -> int:
    """Entries to prune for ``sparsity`` of ``numel``: nearest integer, halves rounded up."""
    return min(numel, int(math.floor(sparsity * numel + 0.5)))


def local_unstructured_mask(scores: torch.Tensor, mask: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the lowest-scored entries of one tensor until exactly ``sparsity`` of it is pruned.

    If more entries are already pruned than the goal asks (a goal that went
    down, or a loaded mask), the old mask is kept: masks never shrink.
    """
    k = count_to_prune(sparsity, mask.numel())
    keep = mask.reshape(-1)
    already = int((~keep).sum())
    if k <= already:
        return mask.clone()
    s = torch.nan_to_num(scores.detach().reshape(-1), nan=math.inf).clone()
    s[~keep] = -math.inf
    kth = torch.kthvalue(s, k).values
    prune = s < kth
    need = k - int(prune.sum())
    if need > 0:
        ties = torch.nonzero(s == kth).reshape(-1)[:need]
        prune[ties] = True
    return (~prune).reshape(mask.shape)


def select_masks(
    pruner: PrunerConfig, group: list[MaskedParameter], scores: list[torch.Tensor], goal: float
) -> list[torch.Tensor]:
    """New masks for one pruner's weights at sparsity ``goal``, per the pruner's scope and pattern.

    The one place where mask patterns are chosen; the Pruner calls nothing else.
    """
    return [local_unstructured_mask(s, m.mask, goal) for m, s in zip(group, scores)]
