"""Structured (channel) pruning: dependency groups, group importance, physical shrinking.

``pattern: channel`` on a pruner removes whole channels. The pieces, in data-flow order:

* :mod:`~fxprune.structured.dependency` -- channel atoms, dependencies and groups over the fx graph
  (connected components by a vectorized union-find);
* :mod:`~fxprune.structured.record` -- a graph of the example run, for roots fx cannot trace whole;
* :mod:`~fxprune.structured.attention` -- multi-head attention modules recognised and proven, so that
  whole heads are channels; :mod:`~fxprune.structured.head_layout` -- where each head lives in separate
  or fused projections, and how one is cut;
* :mod:`~fxprune.structured.multihead` -- ``nn.MultiheadAttention`` with heads removed
  (:class:`PrunedMultiheadAttention`, what ``convert(physical=True)`` puts in its place);
* :mod:`~fxprune.structured.norms` -- LayerNorm/RMSNorm/GroupNorm recognised by behaviour, computed over
  the kept channels in the prepared model so that normalized residual streams are prunable;
* :mod:`~fxprune.structured.analysis` -- the plan of a prepared model: which pruner prunes which group,
  and a report of what cannot be pruned and why;
* :mod:`~fxprune.structured.importance` -- group importance (L1/L2 over coupled slices) and channel masks;
* :mod:`~fxprune.structured.shrink` -- ``convert(physical=True)``: cut the removed channels out;
* :mod:`~fxprune.structured.hf_config` -- a shrunk Hugging Face model's config states its new sizes.
"""
from __future__ import annotations

from fxprune.structured.analysis import (
    ChannelPlan,
    ChannelReport,
    ChannelReports,
    attach_channel_plan,
    channel_plan_of,
    channel_report,
)
from fxprune.structured.dependency import ChannelGraph, ChannelGroup, Slice, build_channel_graph
from fxprune.structured.importance import channel_masks, group_importance, select_channels
from fxprune.structured.multihead import PrunedMultiheadAttention
from fxprune.structured.shrink import removed_channels, shrink

__all__ = [
    "ChannelPlan",
    "ChannelReport",
    "ChannelReports",
    "ChannelGraph",
    "ChannelGroup",
    "PrunedMultiheadAttention",
    "Slice",
    "attach_channel_plan",
    "build_channel_graph",
    "channel_masks",
    "channel_plan_of",
    "channel_report",
    "group_importance",
    "removed_channels",
    "select_channels",
    "shrink",
]
