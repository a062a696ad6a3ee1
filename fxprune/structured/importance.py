"""Group importance and channel selection: which channels of a group go, as weight masks.

A channel's importance is the L1 (default) or L2 norm of its policy scores
over *every* coupled weight slice it owns -- producer rows, depthwise
kernels, consumer columns -- summed across the group's layers, so that a
residual channel that matters to any block of the stream is kept. With the
``magnitude`` policy the scores are ``|w|``, i.e. the classic L1/L2 filter
norm (Li et al. 2017) extended to the coupled slices. The aggregate over a
group is stated once: ``importance[c] = (sum over slices s of sum_i
|score_s[c, i]| ** p) ** (1/p)`` -- one norm over all the channel's entries
in every layer of the group (an LLM's hidden channel: its embedding column,
every q/k/v/gate/up input column, every o/down output row, the lm_head
column), not a sum of per-layer norms, so a layer counts by how many weights
it holds. Norm weights and biases are not scored (they are not pruned weights).

Selection is per group: ``round(goal * channels)`` channels are removed
(never all of them), the lowest-importance first, ties by channel order --
and per *segment* where the group is a concatenation of different layers'
outputs (SqueezeNet's expand1x1 | expand3x3, a DenseNet block, an Inception
module): channels produced by different layers are ranked within their own
layer, so each producer loses the goal of its channels (:func:`segments`).
One ranking across them would compare a 1x1 filter's norm with a 3x3
filter's (nine times the entries) and empty the cheap layer while the
expensive one stays whole.
``min_channels`` and ``round_to`` (pruner keys) then raise or round the
number kept (:func:`kept_count`; attention head groups are exempt: their
widths are already multiples of the head size).
Masks stay monotone: a channel pruned once stays pruned. Grouped
convolutions need an equal number removed from each conv group; the
analysis splits such groups into equal *cells* and the goal is met per cell.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from fxprune.structured.dependency import IN, IN_BLOCK, IN_GROUPED, OUT, OUT_BLOCK, ChannelGroup, Slice
from fxprune.structured.norms import set_kept

if TYPE_CHECKING:
    from fxprune.config import PrunerConfig
    from fxprune.masked import MaskedParameter
    from fxprune.structured.analysis import ChannelPlan

__all__ = ["channel_masks", "group_importance", "select_channels", "segments", "kept_count", "kept_entries", "NORMS"]

NORMS = {"l1": 1, "l2": 2}


def _per_position(t: torch.Tensor, s: Slice) -> torch.Tensor:
    """One value per position of the slice: the sum of ``t`` over its other entries (``any`` for masks).

    Every reduction runs over a contiguous 2-D view -- along rows, or down
    the columns -- and masks are read as bytes with ``amax``: on CPU that is
    10-50x faster than ``any``/``sum`` over the strided kernel dims of a
    conv weight, and this runs for every slice of every group on each mask
    update and again in ``convert(physical=True)``.
    """
    if t.dtype == torch.bool and t.numel():
        t = t.view(torch.uint8)

        def reduce(x: torch.Tensor, dim: int) -> torch.Tensor:
            return x.amax(dim=dim)
    else:
        def reduce(x: torch.Tensor, dim: int) -> torch.Tensor:
            return x.sum(dim=dim)

    t = t.contiguous()
    if s.kind == OUT and s.dim != 0:  # e.g. a layer scale shaped (1, C, 1, 1)
        t = t.movedim(s.dim, 0).contiguous()
    if s.kind == OUT:
        return reduce(t.reshape(t.shape[0], -1), 1) if t.dim() > 1 else t
    if s.kind == OUT_BLOCK:  # rows [c*block, (c+1)*block) of a projection, or entries of its bias
        return reduce(t.reshape(t.shape[0] // s.block, -1), 1)
    rows = reduce(t.reshape(t.shape[0], -1), 0)  # (columns * kernel entries)
    if s.kind == IN:
        return reduce(rows.reshape(t.shape[1], -1), 1)
    if s.kind == IN_BLOCK:
        return reduce(rows.reshape(t.shape[1] // s.block, -1), 1)
    if s.kind == IN_GROUPED:  # input p = column p % (C/g) of the rows of block p // (C/g)
        g = s.groups
        per_block = reduce(t.reshape(g, t.shape[0] // g, -1), 1)  # (g, C/g * kernel entries)
        return reduce(per_block.reshape(g * t.shape[1], -1), 1)
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


def segments(group: ChannelGroup) -> list[torch.Tensor]:
    """The group's channels (local, sorted) split by the set of weights that hold them.

    A residual stream or a head group is one segment (every channel lives
    in the same layers); the inputs of a concatenation are one segment each
    (each channel's producer differs). Keyed by every weight slice, not only
    the producers', because a slice's kind names a tensor dim, and which dim
    is the output depends on the layer (a ``Conv1D`` holds ``(in, out)``).
    """
    holders: list[set[str]] = [set() for _ in range(group.size)]
    for s in group.slices:
        if s.is_weight:
            for c in group.local(s.channels).tolist():
                holders[c].add(s.tensor)
    by_key: dict[frozenset[str], list[int]] = {}
    for c, key in enumerate(holders):
        by_key.setdefault(frozenset(key), []).append(c)
    return [torch.tensor(v, dtype=torch.long) for v in by_key.values()]


def _select_by_segment(importance: torch.Tensor, removed: torch.Tensor, goal: float, parts: list[torch.Tensor],
                       keep_one: list[torch.Tensor], min_channels: int, round_to: int) -> torch.Tensor:
    """:func:`select_channels` within each segment (``min_channels`` / ``round_to`` per segment: one layer's width)."""
    out = removed.clone()
    for seg in parts:
        local = [torch.searchsorted(seg, m[torch.isin(m, seg)]) for m in keep_one]
        out[seg] = select_channels(importance[seg], removed[seg], goal, None, [m for m in local if len(m)],
                                   min_channels, round_to)
    return out


def select_channels(
    importance: torch.Tensor,
    removed: torch.Tensor,
    goal: float,
    cells: list[list[int]] | None,
    keep_one: list[torch.Tensor] | None = None,
    min_channels: int = 1,
    round_to: int = 1,
) -> torch.Tensor:
    """Channels to remove (bool, local): ``round(goal * n)`` per cell (at least one kept), lowest first.

    ``min_channels`` and ``round_to`` then adjust the count kept (see
    :func:`kept_count`).

    ``removed`` (bool, local) are already-pruned channels: they stay removed
    and count towards the goal. ``keep_one`` lists the channels of each
    layer slice (a concatenation input, say); none may lose all of them.
    Where the lowest channels would empty a layer, the next ones go instead;
    with ``cells`` (grouped convolutions need the same number removed from
    every cell) the count per cell is lowered until every cell reaches it
    without emptying a layer, so the result is always shrinkable.
    """
    n = importance.numel()
    cell_idx = [torch.arange(n)] if cells is None else [torch.tensor(c, dtype=torch.long) for c in cells]
    orders = []
    for idx in cell_idx:
        key = importance[idx].clone()
        key[removed[idx]] = -math.inf  # already removed: first in line, they count towards k
        orders.append(idx[torch.sort(key, stable=True).indices])  # ties by channel order
    k = max(min(int(math.floor(goal * len(idx) + 0.5)), len(idx) - 1) for idx in cell_idx)  # cells: equal sizes
    per = len(cell_idx[0])
    k = per - kept_count(per, per - k, len(cell_idx), min_channels, round_to)

    out = removed.clone()
    for order in orders:
        out[order[:k]] = True
    layers = [m for m in keep_one or () if len(m) and not bool(removed[m].all())]
    if not any(bool(out[m].all()) for m in layers):
        return out
    return _select_keeping_layers(orders, removed, k, layers, exact_cells=cells is not None)


def kept_count(per_cell: int, kept: int, cells: int = 1, min_channels: int = 1, round_to: int = 1) -> int:
    """Channels each cell keeps once ``min_channels`` and ``round_to`` apply to the group's total.

    The group keeps ``kept * cells`` channels; that total is raised to at
    least ``min_channels`` and then moved to the nearest multiple of
    ``round_to`` that is still at least ``min_channels`` (halves up), per
    cell in equal steps. A group with fewer channels than it must keep keeps them all, and
    so does one too small to hold a single multiple of ``round_to``, and one
    whose goal removes nothing yet.
    """
    if kept >= per_cell:
        return per_cell
    step = round_to // math.gcd(round_to, cells)  # kept per cell must be a multiple of this
    low = max(-(-min_channels // cells), 1)
    want = max(kept, low)
    allowed = range(-(-low // step) * step, per_cell + 1, step)
    if not allowed:
        return per_cell
    return min(allowed, key=lambda c: (abs(c - want), -c))


def _select_keeping_layers(orders: list[torch.Tensor], removed: torch.Tensor, k: int, layers: list[torch.Tensor],
                           exact_cells: bool) -> torch.Tensor:
    """Greedy, lowest first, skipping a channel whose removal would empty a layer; the slow path, rarely taken."""
    layers_of: dict[int, list[int]] = {}
    for li, m in enumerate(layers):
        for c in m.tolist():
            layers_of.setdefault(c, []).append(li)
    was = removed.tolist()
    for target in range(k, -1, -1):
        out = list(was)
        left = [sum(1 for c in m.tolist() if not was[c]) for m in layers]
        reached = True
        for order in orders:
            need = target - sum(1 for c in order.tolist() if was[c])
            for c in order.tolist():
                if need <= 0:
                    break
                if out[c] or any(left[li] <= 1 for li in layers_of.get(c, ())):
                    continue
                out[c] = True
                for li in layers_of.get(c, ()):
                    left[li] -= 1
                need -= 1
            reached &= need <= 0
        if reached or not exact_cells:  # without cells, a shortfall is fine: the goal is slightly missed
            return torch.tensor(out, dtype=torch.bool)
    return removed.clone()


def _mask_out(mask: torch.Tensor, s: Slice, channels: torch.Tensor) -> None:
    """Set ``False`` at the positions of ``channels`` (global ids) in one slice of ``mask``, in place."""
    hit = torch.isin(s.channels, channels)
    pos = s.positions[hit]
    if not len(pos):
        return
    if s.kind in (OUT, IN):
        mask.index_fill_(s.dim, pos, False)
    elif s.kind in (IN_BLOCK, OUT_BLOCK):
        idx = (pos[:, None] * s.block + torch.arange(s.block)).reshape(-1)
        mask.index_fill_(1 if s.kind == IN_BLOCK else 0, idx, False)
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
    min_channels, round_to = getattr(pruner, "min_channels", 1), getattr(pruner, "round_to", 1)
    name_of = {id(m): n for n, m in plan.masked.items()}
    score_by_name = {name_of[id(m)]: s for m, s in zip(group, scores) if id(m) in name_of}
    groups = plan.groups_of(pruner.name)
    touched = {s.tensor for grp in groups for s in grp.slices}
    new = {name_of[id(m)]: m.mask.clone() for m in group if name_of.get(id(m)) in touched}
    for grp in groups:
        imp = group_importance(grp, score_by_name, p)
        removed = kept_entries(plan, grp) == 0
        layers = [grp.local(s.channels).unique() for s in grp.slices if s.is_weight]
        heads = any(s.kind == OUT_BLOCK for s in grp.slices)  # head counts: not channels, not rounded
        rounding = (1, 1) if heads else (min_channels, round_to)
        parts = segments(grp) if grp.cells is None else []
        if len(parts) > 1:
            drop = _select_by_segment(imp, removed, goal, parts, layers, *rounding)
        else:
            drop = select_channels(imp, removed, goal, grp.cells, layers, *rounding)
        chans = grp.id_tensor()[drop]
        for s in grp.slices:
            if s.tensor in new:
                _mask_out(new[s.tensor], s, chans)
        for module, _, norm_chans, gid in plan.norms.values():
            if gid == grp.index:
                set_kept(module, ~torch.isin(norm_chans, chans))
    return [new.get(name_of.get(id(m), ""), m.mask.clone()) for m in group]
