"""``nn.MultiheadAttention`` with heads removed: the module ``convert(physical=True)`` puts in its place.

``nn.MultiheadAttention`` ties its head size to its width: its forward (and
``F.multi_head_attention_forward``) computes ``head_dim = embed_dim //
num_heads`` and requires the query projection to give ``embed_dim``
features. Pruned heads make the projections narrower than the residual
stream they read and write, which no setting of its attributes expresses.
So, where heads were removed, the shrunk model holds a
:class:`PrunedMultiheadAttention` instead: a plain ``nn.Module`` of fxprune
with the same parameters under the same names (``in_proj_weight``,
``in_proj_bias``, ``bias_k``, ``bias_v``, ``out_proj``), the same call
signature and the same return value ``(output, weights or None)``. Its
forward is the textbook computation written out over the kept heads.

What the masked model computes is what this module computes: the channel
analysis masks each removed head's rows of ``in_proj_weight`` and its
columns of ``out_proj.weight``, so a removed head adds nothing to the
output. The attention *weights* (``need_weights=True``) are the exception:
averaged over heads they change when heads go, so the analysis does not
prune the heads of a module whose weights are read. Per-head masks
(``attn_mask`` of shape ``(N * num_heads, L, S)``) are accepted in the
original head count and the kept heads' planes are used.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PrunedMultiheadAttention", "layer_slow_path", "replace_multihead_attention"]


class PrunedMultiheadAttention(nn.Module):
    """Multi-head attention over ``len(kept_heads)`` heads of ``head_dim`` features (see the module docstring).

    Built from an ``nn.MultiheadAttention`` whose tensors were already cut to
    the kept heads; ``kept_heads`` are their indices among the original
    ``original_heads`` (used to read per-head ``attn_mask`` planes).
    """

    def __init__(self, source: nn.MultiheadAttention, kept_heads: list[int], original_heads: int):
        super().__init__()
        if not source._qkv_same_embed_dim:
            raise ValueError("PrunedMultiheadAttention needs a packed in_proj_weight (kdim == vdim == embed_dim)")
        self.num_heads = len(kept_heads)
        self.head_dim = source.head_dim
        self.kept_heads = tuple(int(h) for h in kept_heads)
        self.original_heads = int(original_heads)
        self.batch_first = source.batch_first
        self.dropout = source.dropout
        self.add_zero_attn = source.add_zero_attn
        self.in_proj_weight = source.in_proj_weight
        self.in_proj_bias = source.in_proj_bias
        self.bias_k, self.bias_v = source.bias_k, source.bias_v
        self.out_proj = source.out_proj
        self.embed_dim = self.in_proj_weight.shape[1]  # the width it reads (the stream's)
        self.training = source.training
        # Read by nn.TransformerEncoderLayer / nn.TransformerEncoder: False keeps them off their fused fast path,
        # which assumes embed_dim == num_heads * head_dim.
        self._qkv_same_embed_dim = False

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads} (of {self.original_heads}), "
                f"head_dim={self.head_dim}, batch_first={self.batch_first}")

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batched = query.dim() == 3
        if not batched:  # (L, E): one sequence
            query, key, value = (t.unsqueeze(0) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:  # (L, N, E) -> (N, L, E)
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        n, tgt, _ = query.shape
        width = self.num_heads * self.head_dim
        w, b = self.in_proj_weight, self.in_proj_bias
        wq, wk, wv = w.split(width)
        bq, bk, bv = b.split(width) if b is not None else (None, None, None)
        q, k, v = F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)

        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint (as nn.MultiheadAttention says)")
        key_padding_mask = _as_additive(key_padding_mask, q.dtype)
        # What torch does: here the hint wins over attn_mask, as a causal mask over the whole key sequence
        # (bias_k and zero-attention entries included), built below.
        causal = is_causal and key_padding_mask is None and not need_weights
        mask = None if causal else _as_additive(attn_mask, q.dtype)
        if mask is not None:
            mask = mask[None] if mask.dim() == 2 else self._kept_planes(mask, n)
        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.reshape(1, 1, -1).expand(n, 1, -1)], 1)
            v = torch.cat([v, self.bias_v.reshape(1, 1, -1).expand(n, 1, -1)], 1)
            mask = F.pad(mask, (0, 1)) if mask is not None else None
            key_padding_mask = F.pad(key_padding_mask, (0, 1)) if key_padding_mask is not None else None
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(n, 1, width)], 1)
            v = torch.cat([v, v.new_zeros(n, 1, width)], 1)
            mask = F.pad(mask, (0, 1)) if mask is not None else None
            key_padding_mask = F.pad(key_padding_mask, (0, 1)) if key_padding_mask is not None else None

        if causal:
            mask = _as_additive(torch.ones(tgt, k.shape[1], dtype=torch.bool, device=q.device).triu(1), q.dtype)[None]

        def heads(t: torch.Tensor) -> torch.Tensor:  # (N, S, H*d) -> (N, H, S, d)
            return t.reshape(n, t.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(q), heads(k), heads(v)
        scores = (q * (1.0 / math.sqrt(self.head_dim))) @ k.transpose(-1, -2)  # (N, H, L, S)
        if mask is not None:
            scores = scores + mask
        if key_padding_mask is not None:
            scores = scores + key_padding_mask[:, None, None, :]
        weights = torch.softmax(scores, dim=-1)
        if self.training and self.dropout > 0:
            weights = F.dropout(weights, p=self.dropout)
        out = (weights @ v).transpose(1, 2).reshape(n, tgt, width)
        out = self.out_proj(out)
        if not batched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        weights = weights.mean(1) if average_attn_weights else weights
        return out, (weights if batched else weights.squeeze(0))

    def _kept_planes(self, mask: torch.Tensor, n: int) -> torch.Tensor:
        """A ``(N * original_heads, L, S)`` mask -> ``(N, kept heads, L, S)``."""
        if mask.shape[0] != n * self.original_heads:
            raise RuntimeError(f"The shape of the 3D attn_mask is {tuple(mask.shape)}, but should be "
                               f"({n * self.original_heads}, L, S): per-head masks are given for the "
                               f"{self.original_heads} heads the module had before pruning")
        planes = mask.reshape(n, self.original_heads, *mask.shape[1:])
        return planes[:, list(self.kept_heads)]


def _as_additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Boolean masks (True = not allowed) as ``-inf``/0, float masks as they are (torch's convention)."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    return mask.to(dtype)


def replace_multihead_attention(model: nn.Module, name: str, kept_heads: list[int], original_heads: int) -> None:
    """Put a :class:`PrunedMultiheadAttention` in place of the (already cut) ``nn.MultiheadAttention`` ``name``."""
    prefix, _, child = name.rpartition(".")
    parent = model.get_submodule(prefix) if prefix else model
    source = parent.get_submodule(child)
    new = PrunedMultiheadAttention(source, kept_heads, original_heads)
    for a in [n for n, m in parent._modules.items() if m is source]:  # every name it was registered under
        parent._modules[a] = new


def layer_slow_path(layer: nn.Module) -> Callable[..., torch.Tensor]:
    """The forward of a torch.nn transformer layer (or a container of them) without its fast path.

    Their ``forward`` first decides between a fused kernel and plain Python
    by looking at the input (``src.dim()``, ``is_nested``), which fx cannot
    trace. The channel analysis traces this instead: the same sub-blocks
    (``_sa_block``, ``_mha_block``, ``_ff_block``) and norms in the same order
    as the Python path. The fused path computes the same function; it is
    skipped anyway where it matters (the prepared model's layers carry
    hooks, and :class:`PrunedMultiheadAttention` reports
    ``_qkv_same_embed_dim = False``).
    """
    if isinstance(layer, nn.TransformerEncoderLayer):
        def encoder(src, src_mask=None, src_key_padding_mask=None, is_causal=False):
            x = src
            if layer.norm_first:
                x = x + layer._sa_block(layer.norm1(x), src_mask, src_key_padding_mask, is_causal=is_causal)
                return x + layer._ff_block(layer.norm2(x))
            x = layer.norm1(x + layer._sa_block(x, src_mask, src_key_padding_mask, is_causal=is_causal))
            return layer.norm2(x + layer._ff_block(x))
        return encoder
    if isinstance(layer, nn.TransformerDecoderLayer):
        def decoder(tgt, memory, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
                    memory_key_padding_mask=None, tgt_is_causal=False, memory_is_causal=False):
            x = tgt
            if layer.norm_first:
                x = x + layer._sa_block(layer.norm1(x), tgt_mask, tgt_key_padding_mask, tgt_is_causal)
                x = x + layer._mha_block(layer.norm2(x), memory, memory_mask, memory_key_padding_mask,
                                         memory_is_causal)
                return x + layer._ff_block(layer.norm3(x))
            x = layer.norm1(x + layer._sa_block(x, tgt_mask, tgt_key_padding_mask, tgt_is_causal))
            x = layer.norm2(x + layer._mha_block(x, memory, memory_mask, memory_key_padding_mask, memory_is_causal))
            return layer.norm3(x + layer._ff_block(x))
        return decoder
    if isinstance(layer, (nn.TransformerEncoder, nn.TransformerDecoder, nn.Transformer)):
        return _container_slow_path(layer)
    raise TypeError(f"not a transformer layer: {type(layer).__name__}")


def _container_slow_path(container: nn.Module) -> Callable[..., torch.Tensor]:
    """``nn.TransformerEncoder`` / ``nn.TransformerDecoder`` / ``nn.Transformer`` as the Python loop they run.

    Their ``forward`` canonicalises the masks (branching on a mask's dtype),
    may pack the input into a nested tensor and checks shapes, none of which
    fx can trace and none of which moves a channel: the analysis traces the
    loop over the layers (each through :func:`layer_slow_path`) and the final
    norm, with the masks handed to the layers as given.
    """
    if isinstance(container, nn.TransformerEncoder):
        def encoder(src, mask=None, src_key_padding_mask=None, is_causal=None):
            x = src
            for layer in container.layers:
                x = layer(x, src_mask=mask, src_key_padding_mask=src_key_padding_mask, is_causal=bool(is_causal))
            return x if container.norm is None else container.norm(x)
        return encoder
    if isinstance(container, nn.TransformerDecoder):
        def decoder(tgt, memory, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
                    memory_key_padding_mask=None, tgt_is_causal=None, memory_is_causal=False):
            x = tgt
            for layer in container.layers:
                x = layer(x, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                          tgt_key_padding_mask=tgt_key_padding_mask, memory_key_padding_mask=memory_key_padding_mask,
                          tgt_is_causal=bool(tgt_is_causal), memory_is_causal=memory_is_causal)
            return x if container.norm is None else container.norm(x)
        return decoder

    def transformer(src, tgt, src_mask=None, tgt_mask=None, memory_mask=None, src_key_padding_mask=None,
                    tgt_key_padding_mask=None, memory_key_padding_mask=None, src_is_causal=None,
                    tgt_is_causal=None, memory_is_causal=False):
        memory = container.encoder(src, mask=src_mask, src_key_padding_mask=src_key_padding_mask,
                                   is_causal=src_is_causal)
        return container.decoder(tgt, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                                 tgt_key_padding_mask=tgt_key_padding_mask,
                                 memory_key_padding_mask=memory_key_padding_mask, tgt_is_causal=tgt_is_causal,
                                 memory_is_causal=memory_is_causal)
    return transformer
