"""Guard against emptied layers: warn when a mask update leaves a tensor with (almost) no weights.

A layer pruned to nothing is never what a user wants, and with ``scope:
global`` it happens without anyone asking (one threshold over layers of very
different sizes: resnet50's ``fc`` at 70% kept 25 of 2,048,000 weights). The
default cap that prevents it is :func:`fxprune.config.default_max_sparsity`;
this module says so out loud whenever a tensor reaches that cap or goes above
:data:`HIGH_SPARSITY`, once per update that prunes it further.
"""
from __future__ import annotations

import math
import warnings
from typing import Any

import torch

__all__ = ["HighSparsityWarning", "HIGH_SPARSITY", "warn_high_sparsity", "collapse_findings", "emit_high_sparsity"]


class HighSparsityWarning(UserWarning):
    """A mask update left a tensor with (almost) nothing: above 0.99 sparsity, or held at a global pruner's default cap.

    A layer pruned that far usually means one global threshold over layers of
    very different sizes, not a deliberate choice; filter this category to
    silence it once you are sure.
    """


#: Sparsity above which every mask update that prunes a tensor further warns.
HIGH_SPARSITY = 0.99


def warn_high_sparsity(pruner: Any, names: list[str], old: list[torch.Tensor], new: list[torch.Tensor],
                       default_cap: float | None) -> None:
    """Warn about the tensors this update (``old`` -> ``new`` keep-masks) took above 0.99 or to the default cap.

    ``default_cap`` is the cap of a global pruner whose ``max_sparsity`` is
    unset (None otherwise: an explicit cap is the user's choice).
    """
    emit_high_sparsity(pruner, *collapse_findings(names, old, new, default_cap), default_cap)


def collapse_findings(names: list[str], old: list[torch.Tensor], new: list[torch.Tensor],
                      default_cap: float | None) -> tuple[list[str], list[str]]:
    """The tensors an update took above 0.99 (``high``) or to the default cap (``capped``), as report lines.

    Separate from the warning so that an update done one tensor at a time
    (:func:`fxprune.masks.select_masks_per_tensor`) still warns once, naming all of them.
    """
    high, capped = [], []
    for name, before_mask, mask in zip(names, old, new):
        n = mask.numel()
        pruned, before = n - int(torch.count_nonzero(mask)), n - int(torch.count_nonzero(before_mask))
        if not n or pruned <= before:
            continue
        if pruned / n > HIGH_SPARSITY:
            high.append(f"{name} {pruned / n:.4f} ({n - pruned} of {n} weights left)")
        elif default_cap is not None and pruned >= math.floor(default_cap * n + 1e-9):
            capped.append(f"{name} {pruned / n:.4f}")
    return high, capped


def emit_high_sparsity(pruner: Any, high: list[str], capped: list[str], default_cap: float | None) -> None:
    """One warning per kind for one pruner's update (see :func:`collapse_findings`)."""
    if high:
        warnings.warn(
            f"{pruner.key_path}: pruned above {HIGH_SPARSITY} sparsity: {'; '.join(high)}. A layer this empty "
            "rarely works; lower the target or bound the layer (scope: global takes max_sparsity)",
            HighSparsityWarning,
            stacklevel=4,
        )
    if capped:
        warnings.warn(
            f"{pruner.key_path}: held at the default per-tensor cap max_sparsity {default_cap:g} of scope: global "
            f"(the global threshold would prune them further): {'; '.join(capped)}. Other tensors are pruned more "
            "to keep the overall count; set max_sparsity (1.0 for no cap) to choose",
            HighSparsityWarning,
            stacklevel=4,
        )
