"""Physical removal: cut pruned channels out of every tensor that holds them.

Runs on the folded model that :func:`fxprune.convert` produces (the user's
own class), using the channel plan recorded at ``prepare`` time and the
masks of the prepared model (a channel is removed where every one of its
masked slices is fully pruned). Every slice of a removed channel goes: conv
and linear rows and columns, biases, BatchNorm weights, biases and running
statistics, layer-scale entries, flatten blocks of a classifier's columns,
and the per-conv-group columns of grouped convolutions. Module attributes
that forwards read (``in_channels``, ``out_channels``, ``groups``,
``in_features``, ``out_features``, ``num_features``) are updated to match.

The shrunk model is still an instance of the user's class, but its shapes
differ: it cannot load a ``state_dict`` of the original shapes (nor give one
that the original class constructor would accept). Save it whole
(``torch.save(model)``) or re-apply the channel plan.

Why outputs match the masked model exactly: the channel pattern masks the
consumer columns of every pruned channel (see
:mod:`fxprune.structured.dependency`), so the masked model never reads those
channels; dropping them changes only the summation order (about 1e-6).
"""
from __future__ import annotations

import torch
from torch import nn

from fxprune.structured.analysis import ChannelPlan
from fxprune.structured.dependency import IN, IN_BLOCK, IN_GROUPED, OUT

__all__ = ["removed_channels", "shrink"]


def removed_channels(plan: ChannelPlan) -> dict[int, torch.Tensor]:
    """Group index -> global ids of its removed channels, read from the prepared model's masks."""
    out = {}
    for gid in plan.eligible:
        grp = plan.channels.groups[gid]
        local = plan.removed(grp)
        if len(local):
            out[gid] = torch.tensor(grp.channels, dtype=torch.long)[local]
    return out


@torch.no_grad()
def shrink(model: nn.Module, plan: ChannelPlan, removed: dict[int, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """Cut ``removed`` channels out of ``model`` in place; returns ``{tensor: (old shape, new shape)}``."""
    # tensor name -> list of (slice, global channels to drop)
    work: dict[str, list] = {}
    for gid, chans in removed.items():
        for s in plan.channels.groups[gid].slices:
            work.setdefault(s.tensor, []).append((s, chans))
    changed: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    holders = _holders(model)
    for name, items in work.items():
        prefix, _, attr = name.rpartition(".")
        owner = model.get_submodule(prefix) if prefix else model
        t = getattr(owner, attr)
        new = t.detach()
        drop: dict[int, set[int]] = {}
        # Grouped-conv columns first: they are addressed per block of the original rows.
        for s, chans in items:
            pos = s.positions[torch.isin(s.channels, chans)]
            if not len(pos):
                continue
            if s.kind == IN_GROUPED:
                new = _drop_grouped_columns(new, s.groups, pos)
            elif s.kind == IN_BLOCK:
                cols = (pos[:, None] * s.block + torch.arange(s.block)).reshape(-1)
                drop.setdefault(1, set()).update(cols.tolist())
            else:
                assert s.kind in (OUT, IN)
                drop.setdefault(s.dim, set()).update(pos.tolist())
        for dim, idx in drop.items():
            keep = torch.tensor(sorted(set(range(new.shape[dim])) - idx), dtype=torch.long)
            new = new.index_select(dim, keep)
        new = new.contiguous().clone()
        changed[name] = (tuple(t.shape), tuple(new.shape))
        for mod, a in holders.get(id(t), [(owner, attr)]):
            if isinstance(t, nn.Parameter):
                mod._parameters[a] = nn.Parameter(new, requires_grad=t.requires_grad)
            else:
                mod._buffers[a] = new
    _update_attributes(model, plan)
    return changed


def _drop_grouped_columns(w: torch.Tensor, groups: int, pos: torch.Tensor) -> torch.Tensor:
    """Grouped conv weight ``(out, in/g, ...)``: drop input ``p`` = column ``p % (in/g)`` of block ``p // (in/g)``."""
    per_in = w.shape[1]
    per_out = w.shape[0] // groups
    by_block: dict[int, set[int]] = {}
    for p in pos.tolist():
        by_block.setdefault(p // per_in, set()).add(p % per_in)
    counts = {len(by_block.get(j, ())) for j in range(groups)}
    assert len(counts) == 1, "grouped conv: unequal removal per group (the plan's cells should prevent this)"
    blocks = []
    for j in range(groups):
        keep = torch.tensor(sorted(set(range(per_in)) - by_block.get(j, set())), dtype=torch.long)
        blocks.append(w[j * per_out:(j + 1) * per_out].index_select(1, keep))
    return torch.cat(blocks, 0)


def _holders(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """Every (module, attribute) that holds each tensor, so tied tensors stay tied."""
    out: dict[int, list[tuple[nn.Module, str]]] = {}
    for mod in model.modules():
        for a, t in list(mod._parameters.items()) + list(mod._buffers.items()):
            if t is not None:
                out.setdefault(id(t), []).append((mod, a))
    return out


def _update_attributes(model: nn.Module, plan: ChannelPlan) -> None:
    """Make the attributes that forwards read agree with the new tensor shapes."""
    for name, kind in plan.channels.layer_attrs.items():
        try:
            m = model.get_submodule(name)
        except AttributeError:
            continue
        if kind == "conv" and isinstance(m, nn.modules.conv._ConvNd):
            out_c, per_in = m.weight.shape[:2]
            if m.groups > 1 and m.groups == m.in_channels == m.out_channels:  # depthwise stays depthwise
                m.groups = out_c
            m.out_channels, m.in_channels = out_c, per_in * m.groups
        elif kind == "linear" and isinstance(m, nn.Linear):
            m.out_features, m.in_features = m.weight.shape
        elif kind == "bn" and isinstance(m, nn.modules.batchnorm._NormBase):
            ref = m.weight if m.weight is not None else m.running_mean
            m.num_features = ref.shape[0]
