"""Where each head of an attention module lives in its tensors, and how to cut one out.

An :class:`AttentionSpec` names the projections of one attention module and
their *layout*, the order of head blocks (``head_dim`` rows each) along
their output features:

* ``separate`` -- ``q``/``k``/``v`` are three layers (BERT, Llama, ViT):
  query heads ``0..H-1``, key/value heads ``0..KV-1``;
* ``qkv`` -- one fused layer, ``[q heads | k heads | v heads]`` (GPT-2's
  ``c_attn``, Phi3's ``qkv_proj``, ``nn.MultiheadAttention``'s ``in_proj``);
* ``interleaved`` -- one fused layer, per key/value group
  ``[its g query heads, its key, its value]`` (Falcon's ``query_key_value``,
  both the classic layout with ``g = 1`` and the new decoder architecture);
* ``shared_kv`` -- one fused layer, ``[q heads | one k | one v]`` (Falcon
  multi-query): a channel is one query head, the shared key and value stay.

A *channel* is one key/value group (``group`` query heads with their key and
value), a plain head when ``group == 1``. :func:`projection_rows` turns a
layout into (channel, block) pairs; the channel analysis records them as
slices and the proof (:mod:`fxprune.structured.attention`) cuts the same
blocks with :func:`cut_channel`, so both read one description. Hugging Face
``Conv1D`` layers hold their weight transposed, ``(in, out)``: their output
features are columns (``transposed``). Per-head tables (Swin's
``relative_position_bias_table``, one column per head) lose the columns of
the heads cut.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["AttentionSpec", "LAYOUTS", "cut_channel", "get_dotted", "is_conv1d", "projection_rows",
           "set_head_attributes"]

LAYOUTS = ("separate", "qkv", "interleaved", "shared_kv")


@dataclass(frozen=True)
class AttentionSpec:
    """How one attention module holds its heads (child names relative to the module)."""

    q: str
    k: str
    v: str  # q == k == v: one fused projection
    out: str | None  # output projection inside the module, or None: the next linear layer outside
    heads: int
    head_dim: int
    hidden: int  # input features
    returns_tuple: bool  # forward returns (output, ...) rather than a tensor
    head_count_attrs: tuple[str, ...]  # dotted paths allowed ("config.num_attention_heads")
    width_attrs: tuple[str, ...]
    group: int = 1  # query heads per key/value head (grouped-query attention); a channel is one such group
    kv_count_attrs: tuple[str, ...] = ()
    # Proven separately from the heads (see attention._reads_and_returns): whether the module's input reaches its
    # output only through q/k/v, and whether its output is the output projection's and nothing else.
    # ALBERT's attention returns LayerNorm(input + dense(context)): heads exact, input and output not free.
    input_only_qkv: bool = True
    output_is_projection: bool = True
    layout: str = "separate"
    transposed: tuple[str, ...] = ()  # projections with (in, out) weights (Hugging Face Conv1D)
    tables: tuple[str, ...] = ()  # the module's own per-head parameters, one entry per query head on the last dim

    @property
    def channels(self) -> int:
        """Prunable units: heads, or key/value groups (one k/v head and its ``group`` query heads)."""
        return self.heads // self.group

    @property
    def fused(self) -> bool:
        return self.q == self.k == self.v

    def projections(self) -> tuple[str, ...]:
        return (self.q,) if self.fused else (self.q, self.k, self.v)


def is_conv1d(m: nn.Module) -> bool:
    """Hugging Face's GPT-2 style ``Conv1D`` (a linear layer with an ``(in, out)`` weight), without importing it."""
    return type(m).__name__ == "Conv1D" and type(m).__module__.startswith("transformers.")


def projection_rows(spec: AttentionSpec) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """``(projection, channel of each block, position of each block)``; blocks are ``head_dim`` output features.

    Positions not listed (the shared key and value of ``shared_kv``) belong to no channel.
    """
    n, g = spec.channels, spec.group
    per_query = torch.repeat_interleave(torch.arange(n), g)  # the channel of each query head
    if spec.layout == "separate":
        kv = torch.arange(n)
        return [(spec.q, per_query, torch.arange(n * g)), (spec.k, kv, kv.clone()), (spec.v, kv, kv.clone())]
    if spec.layout == "qkv":
        chans = torch.cat([per_query, torch.arange(n), torch.arange(n)])
    elif spec.layout == "interleaved":
        chans = torch.repeat_interleave(torch.arange(n), g + 2)
    elif spec.layout == "shared_kv":
        chans = torch.arange(n)
    else:  # pragma: no cover
        raise AssertionError(spec.layout)
    return [(spec.q, chans, torch.arange(len(chans)))]


def _blocks(spec: AttentionSpec, proj: str) -> int:
    """Head blocks along the projection's outputs (including the shared key/value of ``shared_kv``)."""
    return spec.channels * (spec.group + 2) if spec.layout in ("qkv", "interleaved") else (
        spec.channels + 2 if spec.layout == "shared_kv" else (spec.heads if proj == spec.q else spec.channels))


def _cut(layer: nn.Module, dim: int, keep: torch.Tensor, bias_too: bool) -> None:
    layer.weight = nn.Parameter(layer.weight.index_select(dim, keep), requires_grad=False)
    if bias_too and getattr(layer, "bias", None) is not None:
        layer.bias = nn.Parameter(layer.bias.index_select(0, keep), requires_grad=False)
    if is_conv1d(layer):
        layer.nx, layer.nf = layer.weight.shape
    elif isinstance(layer, nn.Linear):
        layer.out_features, layer.in_features = layer.weight.shape


def cut_channel(module: nn.Module, spec: AttentionSpec, channel: int) -> None:
    """Cut one channel (a head, or a key/value group with its query heads) out of ``module``, in place."""
    d = spec.head_dim
    with torch.no_grad():
        for proj, chans, pos in projection_rows(spec):
            layer = module.get_submodule(proj)
            keep = torch.ones(_blocks(spec, proj), dtype=torch.bool)
            keep[pos[chans == channel]] = False
            rows = torch.repeat_interleave(keep, d).nonzero().reshape(-1)
            _cut(layer, 1 if proj in spec.transposed else 0, rows, bias_too=True)
        if spec.out is not None:
            keep = torch.ones(spec.heads * d, dtype=torch.bool)
            keep[channel * spec.group * d:(channel + 1) * spec.group * d] = False
            _cut(module.get_submodule(spec.out), 0 if spec.out in spec.transposed else 1, keep.nonzero().reshape(-1),
                 bias_too=False)
        query_heads = (torch.arange(spec.heads) // spec.group != channel).nonzero().reshape(-1)
        for t in spec.tables:
            owner, _, attr = t.rpartition(".")
            holder = module.get_submodule(owner) if owner else module
            p = getattr(holder, attr)
            setattr(holder, attr, nn.Parameter(p.index_select(p.dim() - 1, query_heads), requires_grad=False))
    set_head_attributes(module, spec)


def get_dotted(module: nn.Module, path: str) -> object:
    obj: object = module
    for part in path.split("."):
        obj = getattr(obj, part, None)
    return obj


def _set_dotted(module: nn.Module, path: str, value: int) -> None:
    owner, _, attr = path.rpartition(".")
    setattr(get_dotted(module, owner) if owner else module, attr, value)


def heads_left(module: nn.Module, spec: AttentionSpec) -> tuple[int, int]:
    """(query heads, key/value heads) that ``module``'s projection shapes hold now."""
    proj = module.get_submodule(spec.q)
    rows = proj.weight.shape[1 if spec.q in spec.transposed else 0] // spec.head_dim
    if spec.layout == "separate":
        kv = module.get_submodule(spec.k).weight.shape[1 if spec.k in spec.transposed else 0] // spec.head_dim
        return rows, kv
    if spec.layout == "shared_kv":
        return rows - 2, 1
    n = rows // (spec.group + 2)
    return n * spec.group, n


def set_head_attributes(module: nn.Module, spec: AttentionSpec) -> None:
    """After cutting heads out of the weights, make the head counts the forward reads agree.

    (The projections' own ``in_features``/``out_features`` are the cutter's business.)
    """
    heads, kv = heads_left(module, spec)
    for a in spec.head_count_attrs:
        _set_dotted(module, a, heads)
    for a in spec.kv_count_attrs:
        _set_dotted(module, a, kv)
    for a in spec.width_attrs:
        _set_dotted(module, a, heads * spec.head_dim)
