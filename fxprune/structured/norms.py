"""Normalizations over a channel stream: recognised by behaviour, computed over the kept channels only.

A LayerNorm / RMSNorm / GroupNorm takes a statistic over the channels it
normalizes, so zeroing a channel's weights does not make the masked model
equal to one without that channel: the mean, variance or RMS would still
count it. What makes a normalized residual stream prunable exactly is to
change the *prepared* model's normalization instead: once a channel of the
stream is pruned, each norm of the stream runs on the kept channels alone --
the very module class, with its per-channel weights and size attributes cut
to the kept channels, on the kept slice of its input -- and writes zeros at
the pruned positions, which no consumer reads (their weight columns are
masked). ``convert(physical=True)`` then leaves exactly that module in place,
so the shrunk model computes what the masked one did.

Which modules qualify is decided by behaviour, not by class name (Hugging
Face has a dozen RMSNorm classes: Llama, Qwen2, Gemma's ``1 + weight``, T5's
no-mean variant): a module without child parameters whose own tensors are
all vectors of one size ``C``, that maps ``(..., C)`` (or ``(N, C, ...)``)
to the same shape, is *equivariant* under a permutation of the channels (of
its input and of its tensors alike) and *mixes* channels (an output channel
moves when another input channel does: a statistic over channels). Those
properties are what the slicing above needs; the formula itself does not
matter, since the masked and the shrunk model run the same code. ``nn.GroupNorm``
is taken by its class (it is equivariant only within its groups): its channels
are cut in equal numbers per group, like a grouped convolution's.

Assumption stated once: a norm's channel dim is the last one, or dim 1 of a
batched ``(N, C, ...)`` input (torchvision's ``LayerNorm2d``, ``GroupNorm``).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["NormSpec", "NormMemo", "norm_spec", "install_masked_norm", "uninstall_masked_norm", "set_kept",
           "resize_norm", "remove_masked_norms", "KEEP"]

#: The buffer a masked norm keeps its kept channels in (bool, one entry per channel; in ``state_dict``).
KEEP = "_fxprune_keep"


@dataclass(frozen=True)
class NormSpec:
    """How one normalization module holds its channels."""

    dim: int  # the channel dim: -1 (channels last) or 1 (``(N, C, ...)``)
    size: int  # channels normalized together
    tensors: tuple[str, ...]  # its own parameters and buffers with one entry per channel
    size_attrs: tuple[str, ...]  # int attributes equal to the channel count (``num_channels``)
    shape_attrs: tuple[str, ...]  # tuple attributes equal to ``(C,)`` (``normalized_shape``)
    groups: int = 1  # GroupNorm: channels are normalized in this many equal blocks


def _own_tensors(m: nn.Module) -> dict[str, torch.Tensor]:
    out = {n: p for n, p in m._parameters.items() if p is not None}
    out.update({n: b for n, b in m._buffers.items() if b is not None and n != KEEP})
    return out


def _size_attributes(m: nn.Module, c: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    sizes, shapes = [], []
    for a, v in vars(m).items():
        if a.startswith("_") or a == "training":
            continue
        if isinstance(v, int) and not isinstance(v, bool) and v == c:
            sizes.append(a)
        elif isinstance(v, (tuple, list, torch.Size)) and tuple(v) == (c,):
            shapes.append(a)
    return tuple(sizes), tuple(shapes)


def resize_norm(m: nn.Module, spec: NormSpec, k: int) -> None:
    """Set the size attributes a norm's forward reads to ``k`` channels (its tensors are the caller's)."""
    for a in spec.size_attrs:
        setattr(m, a, k)
    for a in spec.shape_attrs:
        old = getattr(m, a)
        setattr(m, a, type(old)((k,)) if not isinstance(old, torch.Size) else torch.Size((k,)))


def _shell(m: nn.Module, spec: NormSpec, tensors: dict[str, torch.Tensor], k: int) -> nn.Module:
    """A shallow twin of ``m`` sized for ``k`` channels that reads ``tensors`` (autograd flows to ``m``'s own)."""
    twin = copy.copy(m)
    twin.__dict__ = dict(m.__dict__)
    twin.__dict__.pop("forward", None)
    twin._parameters = {n: tensors.get(n, p) for n, p in m._parameters.items()}
    twin._buffers = {n: tensors.get(n, b) for n, b in m._buffers.items() if n != KEEP}
    resize_norm(twin, spec, k)
    return twin


def _probe_input(dim: int, c: int, like: torch.Tensor | None, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (2, 3, c) if dim == -1 else (2, c, 3, 3)
    x = torch.randn(shape, generator=g) * 2 + 0.5
    return x.to(dtype=like.dtype if like is not None and like.is_floating_point() else torch.float32,
                device=like.device if like is not None else "cpu")


def _close(a: Any, b: Any) -> bool:
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
            and torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5))


def _behaves_like_norm(m: nn.Module, spec: NormSpec) -> bool:
    """The module maps the channel dim onto itself, is permutation equivariant, mixes channels, and a
    copy cut to fewer channels still runs (see the module docstring)."""
    c, dim = spec.size, spec.dim
    own = _own_tensors(m)
    like = next(iter(own.values()), None)
    g = torch.Generator().manual_seed(0)
    values = {n: (torch.rand(c, generator=g) + 0.5).to(t) if t.is_floating_point() else t for n, t in own.items()}
    x = _probe_input(dim, c, like, 0)
    perm = torch.randperm(c, generator=g)
    try:
        with torch.no_grad():
            y = type(m).forward(_shell(m, spec, values, c), x)
            if not isinstance(y, torch.Tensor) or y.shape != x.shape:
                return False
            permuted = {n: v.index_select(0, perm.to(v.device)) for n, v in values.items()}
            y_perm = type(m).forward(_shell(m, spec, permuted, c), x.index_select(dim, perm.to(x.device)))
            if not _close(y_perm, y.index_select(dim, perm.to(y.device))):
                return False
            x2 = x.clone()
            x2.select(dim, 1).add_(3.0)
            y2 = type(m).forward(_shell(m, spec, values, c), x2)
            if _close(y2.select(dim, 0), y.select(dim, 0)):
                return False  # elementwise per channel: not a statistic over channels
            keep = torch.arange(1, c)
            sub = {n: v.index_select(0, keep.to(v.device)) for n, v in values.items()}
            y_sub = type(m).forward(_shell(m, spec, sub, c - 1), x.index_select(dim, keep.to(x.device)))
            return isinstance(y_sub, torch.Tensor) and y_sub.shape[dim] == c - 1 and bool(y_sub.isfinite().all())
    except Exception:  # noqa: BLE001 - whatever cannot be run this way is not a norm we can cut
        return False


def norm_spec(m: nn.Module) -> NormSpec | None:
    """The channel layout of a normalization module, proven by behaviour; None if ``m`` is not one."""
    from fxprune.masked import MaskedParameter  # noqa: PLC0415 - avoid an import cycle
    from fxprune.trace import TRACE_THROUGH_TYPES  # noqa: PLC0415

    if isinstance(m, (MaskedParameter, nn.modules.batchnorm._NormBase, nn.MultiheadAttention,
                      nn.Sequential, nn.ModuleList, nn.ModuleDict) + TRACE_THROUGH_TYPES):
        return None
    if any(True for _ in m.children()):
        return None
    if isinstance(m, nn.GroupNorm) and type(m).forward is nn.GroupNorm.forward:
        tensors = tuple(n for n in ("weight", "bias") if getattr(m, n, None) is not None)
        return NormSpec(1, m.num_channels, tensors, ("num_channels",), (), m.num_groups) \
            if m.num_channels >= 2 else None
    own = _own_tensors(m)
    if own:
        sizes = {tuple(t.shape) for t in own.values()}
        if len(sizes) != 1 or len(next(iter(sizes))) != 1:
            return None
        c = next(iter(sizes))[0]
    else:  # no affine tensors: the size is only in an attribute such as normalized_shape
        shape = getattr(m, "normalized_shape", None)
        if not isinstance(shape, (tuple, list, torch.Size)) or len(shape) != 1:
            return None
        c = int(shape[0])
    if c < 2:
        return None
    sizes_, shapes_ = _size_attributes(m, c)
    for dim in (-1, 1):
        spec = NormSpec(dim, c, tuple(own), sizes_, shapes_)
        if _behaves_like_norm(m, spec):
            return spec
    return None


class NormMemo:
    """:func:`norm_spec` of each module, proven once per analysis (ids kept valid while it runs)."""

    def __init__(self) -> None:
        self._specs: dict[int, NormSpec | None] = {}
        self._alive: list[nn.Module] = []

    def __call__(self, m: nn.Module) -> NormSpec | None:
        key = id(m)
        if key not in self._specs:
            self._specs[key] = norm_spec(m)
            self._alive.append(m)
        return self._specs[key]


class _MaskedNormForward:
    """The forward a prepared model's norm runs: over the kept channels only once any is pruned.

    Installed as the module's instance ``forward`` (so graph ``call_module``
    nodes and Python callers alike reach it); the kept channels live in the
    module's ``_fxprune_keep`` buffer, which the channel pattern sets with
    the masks. The kept indices are cached per version of that buffer.
    """

    def __init__(self, module: nn.Module, spec: NormSpec):
        self.module = module
        self.spec = spec
        self._cache: tuple[Any, torch.Tensor | None] = (None, None)

    def kept_index(self) -> torch.Tensor | None:
        keep = self.module._buffers[KEEP]
        key = (keep.data_ptr(), keep._version, keep.device)
        if self._cache[0] != key:
            idx = None if bool(keep.all()) else keep.nonzero().reshape(-1)
            self._cache = (key, idx)
        return self._cache[1]

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        m, spec = self.module, self.spec
        idx = self.kept_index()
        if idx is None:
            return type(m).forward(m, x, *args, **kwargs)
        tensors = {n: t.index_select(0, idx) for n, t in _own_tensors(m).items()}
        y = type(m).forward(_shell(m, spec, tensors, len(idx)), x.index_select(spec.dim, idx), *args, **kwargs)
        out = torch.zeros(x.shape, dtype=y.dtype, device=y.device)
        return out.index_copy(spec.dim, idx, y)


def install_masked_norm(m: nn.Module, spec: NormSpec) -> None:
    """Give a prepared model's norm its kept-channel buffer (all kept) and the masked forward."""
    like = next(iter(_own_tensors(m).values()), None)
    m.register_buffer(KEEP, torch.ones(spec.size, dtype=torch.bool, device=like.device if like is not None else None))
    m.__dict__["forward"] = _MaskedNormForward(m, spec)


def uninstall_masked_norm(m: nn.Module) -> bool:
    """Remove what :func:`install_masked_norm` added; True if it was installed."""
    if not isinstance(m.__dict__.get("forward"), _MaskedNormForward):
        return False
    del m.__dict__["forward"]
    m._buffers.pop(KEEP, None)
    return True


def set_kept(m: nn.Module, keep: torch.Tensor) -> None:
    """Set a masked norm's kept channels (bool, one per channel)."""
    m._buffers[KEEP].copy_(keep.to(m._buffers[KEEP].device))


def remove_masked_norms(model: nn.Module) -> list[str]:
    """Uninstall every masked norm below ``model``; the names of those that had pruned channels."""
    narrowed = []
    for name, m in model.named_modules():
        keep = m._buffers.get(KEEP)
        if uninstall_masked_norm(m) and keep is not None and not bool(keep.all()):
            narrowed.append(name)
    return narrowed
