"""Physical removal: cut pruned channels out of every tensor that holds them.

Runs on the folded model that :func:`fxprune.convert` produces (the user's
own class), using the channel plan recorded at ``prepare`` time and the
masks of the prepared model (a channel is removed where every one of its
masked slices is fully pruned). Every slice of a removed channel goes: conv
and linear rows and columns, biases, BatchNorm weights, biases and running
statistics, layer-scale entries, flatten blocks of a classifier's columns,
and the per-conv-group columns of grouped convolutions. Module attributes
that forwards read (``in_channels``, ``out_channels``, ``groups``,
``in_features``, ``out_features``, ``num_features``, head counts) are updated
to match; an ``nn.MultiheadAttention`` that lost heads is replaced by
:class:`~fxprune.structured.multihead.PrunedMultiheadAttention`, which holds
the same tensors (its forward does not tie the head size to the width).

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

from fxprune.errors import PruningError
from fxprune.structured.analysis import ChannelPlan
from fxprune.structured.attention import set_head_attributes
from fxprune.structured.head_layout import is_conv1d
from fxprune.structured.dependency import IN, IN_BLOCK, IN_GROUPED, OUT, OUT_BLOCK, Slice
from fxprune.structured.norms import resize_norm
from fxprune.structured.multihead import replace_multihead_attention

__all__ = ["removed_channels", "shrink"]


def removed_channels(plan: ChannelPlan) -> dict[int, torch.Tensor]:
    """Group index -> global ids of its removed channels, read from the prepared model's masks.

    Raises :class:`~fxprune.errors.PruningError` before anything is changed
    if cutting them would leave a layer without channels, or a grouped
    convolution with unequal conv groups (masks loaded from elsewhere, say;
    the channel pattern itself never selects such a set).
    """
    out = {}
    for gid in plan.eligible:
        grp = plan.channels.groups[gid]
        local = plan.removed(grp)
        if len(local):
            out[gid] = grp.id_tensor()[local]
            _check_shrinkable(plan, grp, out[gid])
    _check_shared_head_counts(plan, out)
    return out


def _check_shared_head_counts(plan: ChannelPlan, removed: dict[int, torch.Tensor]) -> None:
    """Attention layers that read their head count from one shared config must all keep the same number."""
    module_of = {}
    for mod_name, spec in plan.channels.attention.items():
        shared = [a for a in spec.head_count_attrs if "." in a]
        if not shared:
            continue
        rows = f"{mod_name}.{spec.q}.weight"
        cut = 0
        for gid, chans in removed.items():
            for sl in plan.channels.groups[gid].slices:
                if sl.tensor == rows and sl.kind in (OUT_BLOCK, IN_BLOCK):
                    cut = max(cut, int(torch.isin(sl.channels.unique(), chans).sum()))
        for a in shared:
            module_of.setdefault(a, {})[mod_name] = spec.heads - cut * spec.group
    for attr, counts in module_of.items():
        if len(set(counts.values())) > 1:
            raise PruningError(
                f"convert(physical=True): the attention layers read their head count from one shared {attr}, but the "
                f"masks keep different numbers of heads in them ({_short_counts(counts)}); prune the same number of "
                "heads in every layer (one goal per group, no global ranking across these layers)")


def _short_counts(counts: dict[str, int]) -> str:
    items = [f"{n}: {c}" for n, c in counts.items()]
    return ", ".join(items[:4]) + (f", ... (+{len(items) - 4})" if len(items) > 4 else "")


def _check_shrinkable(plan: ChannelPlan, grp, chans: torch.Tensor) -> None:
    for s in grp.slices:
        if not s.is_weight:
            continue
        hit = torch.isin(s.channels, chans)
        shape = tuple(plan.masked[s.tensor].mask.shape) if s.tensor in plan.masked else None
        if s.kind == IN_GROUPED and shape is not None:
            per_block = torch.bincount(s.positions[hit] // shape[1], minlength=s.groups)
            if not bool((per_block == per_block[0]).all()) or int(per_block[0]) >= shape[1]:
                raise PruningError(
                    f"convert(physical=True): {s.tensor}: the pruned channels would leave the {s.groups} conv groups "
                    f"of this grouped convolution {[shape[1] - c for c in per_block.tolist()]} input channels; "
                    "each needs the same, non-zero number"
                )
        elif len(hit) and bool(hit.all()) and (shape is None or len(s.channels) * s.block == shape[s.dim]):
            raise PruningError(
                f"convert(physical=True): {s.tensor}: every one of its {'input' if s.kind != OUT else 'output'} "
                "channels is pruned; the layer would have no channels left"
            )


@torch.no_grad()
def shrink(model: nn.Module, plan: ChannelPlan, removed: dict[int, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """Cut ``removed`` channels out of ``model`` in place; returns ``{tensor: (old shape, new shape)}``."""
    n_channels = 1 + max((int(g.id_tensor()[-1]) for g in plan.channels.groups if g.size), default=-1)
    gone = torch.zeros(n_channels, dtype=torch.bool)  # global channel id -> removed?
    work: dict[str, list[Slice]] = {}  # tensor name -> its slices in groups that lose channels
    for gid, chans in removed.items():
        gone[chans] = True
        for s in plan.channels.groups[gid].slices:
            work.setdefault(s.tensor, []).append(s)
    changed: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    holders = _holders(model)
    for name, items in work.items():
        prefix, _, attr = name.rpartition(".")
        owner = model.get_submodule(prefix) if prefix else model
        t = getattr(owner, attr)
        new = t.detach()
        keep: dict[int, torch.Tensor] = {}  # dim -> bool keep vector over the original positions
        # Grouped-conv columns first: they are addressed per block of the original rows.
        for s in items:
            pos = s.positions[gone[s.channels]]
            if not len(pos):
                continue
            if s.kind == IN_GROUPED:
                new = _drop_grouped_columns(new, s.groups, pos, name)
                continue
            dim = 1 if s.kind == IN_BLOCK else s.dim
            if dim not in keep:
                keep[dim] = torch.ones(new.shape[dim], dtype=torch.bool)
            if s.kind in (IN_BLOCK, OUT_BLOCK):
                keep[dim].view(-1, s.block)[pos] = False
            else:
                assert s.kind in (OUT, IN)
                keep[dim][pos] = False
        for dim, k in keep.items():
            new = new.index_select(dim, k.nonzero().reshape(-1))
        if new.data_ptr() == t.data_ptr():  # nothing cut: still the old storage
            new = new.clone()
        new = new.contiguous()
        changed[name] = (tuple(t.shape), tuple(new.shape))
        if isinstance(t, nn.Parameter):  # one new Parameter for every holder: tied weights stay one object
            new = nn.Parameter(new, requires_grad=t.requires_grad)
        for mod, a in holders.get(id(t), [(owner, attr)]):
            if isinstance(t, nn.Parameter):
                mod._parameters[a] = new
            else:
                mod._buffers[a] = new
    _update_attributes(model, plan)
    for name, (_, spec, chans, _) in plan.norms.items():  # norms without affine tensors have only attributes
        resize_norm(model.get_submodule(name), spec, int((~gone[chans]).sum()))
    for name, kind in plan.channels.layer_attrs.items():
        if kind == "multihead":
            _replace_multihead(model, plan, name, gone)
    return changed


def _replace_multihead(model: nn.Module, plan: ChannelPlan, name: str, gone: torch.Tensor) -> None:
    """An ``nn.MultiheadAttention`` that lost heads or stream channels becomes a :class:`PrunedMultiheadAttention`.

    (Its own forward requires ``embed_dim`` features in, out and per head group.)
    """
    m = model.get_submodule(name)
    rows = next((s for g in plan.channels.groups for s in g.slices
                 if s.tensor == f"{name}.in_proj_weight" and s.kind == OUT_BLOCK), None)
    if rows is None or not isinstance(m, nn.MultiheadAttention):
        return
    heads = len(rows.channels) // 3  # the slice lists each head's query, key and value blocks
    kept = [h for h in range(heads) if not bool(gone[rows.channels[h]])]
    if len(kept) < heads or m.in_proj_weight.shape[1] != m.embed_dim or m.out_proj.weight.shape[0] != m.embed_dim:
        replace_multihead_attention(model, name, kept, heads)


def _drop_grouped_columns(w: torch.Tensor, groups: int, pos: torch.Tensor, name: str) -> torch.Tensor:
    """Grouped conv weight ``(out, in/g, ...)``: drop input ``p`` = column ``p % (in/g)`` of block ``p // (in/g)``."""
    per_in, per_out = w.shape[1], w.shape[0] // groups
    keep = torch.ones(groups, per_in, dtype=torch.bool)
    keep.view(-1)[pos] = False
    counts = keep.sum(1)
    if not bool((counts == counts[0]).all()) or int(counts[0]) == 0:
        raise PruningError(
            f"convert(physical=True): {name}: the channels removed would leave the conv groups of this grouped "
            f"convolution with {counts.tolist()} input channels; each group needs the same, non-zero number"
        )
    cols = keep.nonzero()[:, 1].reshape(groups, -1)  # kept columns of each block
    rows = torch.arange(w.shape[0]).reshape(groups, per_out)
    return w[rows[:, :, None], cols[:, None, :]].reshape(w.shape[0], -1, *w.shape[2:])


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
        elif kind == "embedding" and isinstance(m, nn.Embedding):
            m.num_embeddings, m.embedding_dim = m.weight.shape
        elif kind == "conv1d" and is_conv1d(m):  # Hugging Face Conv1D: weight (in, out), forward reads nf
            m.nx, m.nf = m.weight.shape
        elif kind == "bn" and isinstance(m, nn.modules.batchnorm._NormBase):
            ref = m.weight if m.weight is not None else m.running_mean
            m.num_features = ref.shape[0]
    for name, spec in plan.channels.attention.items():  # head counts that attention forwards read
        try:
            m = model.get_submodule(name)
        except AttributeError:
            continue
        set_head_attributes(m, spec)
