"""Group importance and channel selection: which channels of a group go, as weight masks.

A channel's importance is the L1 (default) or L2 norm of its policy scores
over *every* coupled weight slice it owns -- producer rows, depthwise
kernels, consumer columns -- summed across the group's layers, so that a
residual channel that matters to any block of the stream is kept. With the
``magnitude`` policy the scores are ``|w|``, i.e. the classic L1/L2 filter
norm (Li et al. 2017) extended to the coupled slices.

Selection is per group: ``round(goal * channels)`` channels are removed
(never all of them), the lowest-importance first, ties by channel order.
Masks stay monotone: a channel pruned once stays pruned. Grouped
convolutions need an equal number removed from each conv group; the
analysis splits such groups into equal *cells* and the goal is met per cell.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from fxprune.structured.dependency import IN, IN_BLOCK, IN_GROUPED, OUT, ChannelGroup, Slice

if TYPE_CHECKING:
    from fxprune.config import PrunerConfig
    from fxprune.masked import MaskedParameter
    from fxprune.structured.analysis import ChannelPlan

__all__ = ["channel_masks", "group_importance", "select_channels", "kept_entries", "NORMS"]

NORMS = {"l1": 1, "l2": 2}


def _per_position(t: torch.Tensor, s: Slice) -> torch.Tensor:
    """Reduce ``t`` to one value per position of the slice: sum over the other entries (``any`` for masks)."""
    reduce = (lambda x, dims: x.any(dim=dims)) if t.dtype == torch.bool else (lambda x, dims: x.sum(dim=dims))
    if s.kind == OUT or s.kind == IN:
        others = tuple(d for d in range(t.dim()) if d != s.dim)
        return reduce(t, others) if others else t
    if s.kind == IN_BLOCK:
        return reduce(t.reshape(t.shape[0], t.shape[1] // s.block, s.block), (0, 2))
    if s.kind == IN_GROUPED:
        g = s.groups
        return reduce(t.reshape(g, t.shape[0] // g, t.shape[1], -1), (1, 3)).reshape(-1)
    raise AssertionError(s.kind)


def _slice_values(group: ChannelGroup, values: dict[str, torch.Tensor], power: int = 1) -> torch.Tensor:
    """Sum over the group's slices of per-position sums of ``values[tensor] ** power``, per local channel."""
    out = torch.zeros(group.size, dtype=torch.float64)
    for s in group.slices:
        v = values.get(s.tensor)
        if v is None:
            continue
        v = v.detach()
        if v.dtype != torch.bool and power != 1:
            v = v.float() ** power
        per = _per_position(v, s).to(torch.float64)[s.positions]
        out.index_add_(0, group.local(s.channels), per)
    return out


def kept_entries(plan: "ChannelPlan", group: ChannelGroup) -> torch.Tensor:
    """How many masked slices of each channel still keep an entry (0 = the channel is removed)."""
    masks = {s.tensor: plan.masked[s.tensor].mask for s in group.slices if s.tensor in plan.masked}
    if not any(getattr(plan.masked[n], "_has_pruned", True) for n in masks):
        return torch.ones(group.size, dtype=torch.float64)  # nothing pruned yet anywhere in the group
    return _slice_values(group, masks)


def group_importance(group: ChannelGroup, scores: dict[str, torch.Tensor], p: int = 1) -> torch.Tensor:
    """Per-channel L_p norm of ``scores`` over all the group's slices in ``scores`` (float64, local order)."""
    imp = _slice_values(group, scores, p)
    return imp.clamp_min(0) ** (1.0 / p) if p != 1 else imp


def select_channels(
    importance: torch.Tensor,
    removed: torch.Tensor,
    goal: float,
    cells: list[list[int]] | None,
    keep_one: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Channels to remove (bool, local): ``round(goal * n)`` per cell (at least one kept), lowest first.

    ``removed`` (bool, local) are already-pruned channels: they stay removed
    and count towards the goal. ``keep_one`` lists the channels of each
    layer slice (a concatenation input, say); none may lose all of them.
    """
    n = importance.numel()
    cell_list = [list(range(n))] if cells is None else cells
    out = removed.clone()
    for cell in cell_list:
        idx = torch.tensor(cell, dtype=torch.long)
        k = min(int(math.floor(goal * len(cell) + 0.5)), len(cell) - 1)
        already = int(removed[idx].sum())
        if k <= already:
            continue
        key = importance[idx].clone()
        key[removed[idx]] = -math.inf
        order = sorted(range(len(cell)), key=lambda i: (float(key[i]), i))
        out[idx[order[:k]]] = True
    if cells is None:  # every layer keeps a channel: un-remove its most important one (goal slightly missed)
        for members in keep_one or ():
            if bool(out[members].all()) and not bool(removed[members].all()):
                cand = members[~removed[members]]
                out[cand[importance[cand].argmax()]] = False
    return out


def _mask_out(mask: torch.Tensor, s: Slice, channels: torch.Tensor) -> None:
    """Set ``False`` at the positions of ``channels`` (global ids) in one slice of ``mask``, in place."""
    hit = torch.isin(s.channels, channels)
    pos = s.positions[hit]
    if not len(pos):
        return
    if s.kind in (OUT, IN):
        mask.index_fill_(s.dim, pos, False)
    elif s.kind == IN_BLOCK:
        cols = (pos[:, None] * s.block + torch.arange(s.block)).reshape(-1)
        mask.index_fill_(1, cols, False)
    elif s.kind == IN_GROUPED:
        g, per_in = s.groups, mask.shape[1]
        view = mask.view(g, mask.shape[0] // g, per_in, -1)
        for p in pos.tolist():
            view[p // per_in, :, p % per_in] = False
    else:  # pragma: no cover
        raise AssertionError(s.kind)


def channel_masks(
    pruner: "PrunerConfig",
    group: list["MaskedParameter"],
    scores: list[torch.Tensor],
    goal: float,
    norm: str = "l1",
) -> list[torch.Tensor]:
    """New masks for one channel pruner's weights: ``goal`` of the channels of each prunable group removed.

    Weights outside every prunable group (see
    :func:`fxprune.structured.channel_report`) keep their masks unchanged.
    """
    from fxprune.structured.analysis import _ATTR  # noqa: PLC0415

    plan = next((m.__dict__.get(_ATTR) for m in group if _ATTR in m.__dict__), None)
    if plan is None:
        from fxprune.errors import PruningError  # noqa: PLC0415

        raise PruningError(
            f"pruner {pruner.name!r} has pattern 'channel' but its model has no channel plan; "
            "prepare the model with fxprune.prepare()"
        )
    p = NORMS[norm]
    name_of = {id(m): n for n, m in plan.masked.items()}
    score_by_name = {name_of[id(m)]: s for m, s in zip(group, scores) if id(m) in name_of}
    groups = plan.groups_of(pruner.name)
    touched = {s.tensor for grp in groups for s in grp.slices}
    new = {name_of[id(m)]: m.mask.clone() for m in group if name_of.get(id(m)) in touched}
    for grp in groups:
        imp = group_importance(grp, score_by_name, p)
        removed = kept_entries(plan, grp) == 0
        layers = [grp.local(s.channels).unique() for s in grp.slices if s.is_weight]
        drop = select_channels(imp, removed, goal, grp.cells, layers)
        chans = torch.tensor(grp.channels, dtype=torch.long)[drop]
        for s in grp.slices:
            if s.tensor in new:
                _mask_out(new[s.tensor], s, chans)
    return [new.get(name_of.get(id(m), ""), m.mask.clone()) for m in group]
