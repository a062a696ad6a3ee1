"""The masked-parameter module: one parameter, one mask buffer.

Every targeted parameter of a prepared model lives in exactly one
:class:`MaskedParameter`; the graph calls it where the parameter used to be
read, and its output is the effective weight ``param * mask``.

Why not simply ``param * mask`` every forward (as ``torch.nn.utils.prune``
does)? Because that costs a pass over the weight in the forward as well as
one in the backward. Instead the pruner keeps the *stored* pruned entries at
exactly zero (it re-zeroes them whenever the optimizer touched the tensor).
When the stored tensor is known to be clean -- its autograd version counter
has not moved since the last re-zeroing -- the forward is a free view of the
parameter and only the backward pays for the mask: a gradient hook on that
view zeroes the gradients of pruned entries, whether they are taken by
``backward()`` or ``torch.autograd.grad``. When it may be dirty (after ``optimizer.step()`` and
before the next hook, or under ``torch.compile``), the forward multiplies, so
the effective weight is exact in every case.

Masking uses a float copy of the mask in the parameter's dtype, rebuilt only
when the mask, dtype or device changes: multiplying by a bool tensor converts
it on every call and costs several times more.
"""
from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torch.fx._symbolic_trace import is_fx_symbolic_tracing

__all__ = ["MaskedParameter"]


class MaskedParameter(nn.Module):
    """A parameter together with its keep-mask (``True`` = kept).

    ``param`` is the trainable tensor (the optimizer sees it under the prepared
    model's ``named_parameters()``); ``mask`` is a bool buffer of the same shape.
    Both are in the prepared model's ``state_dict()``. The mask stays ``bool``
    under ``model.to(dtype)`` / ``.half()`` (only floating tensors are
    converted) and follows the parameter under ``model.to(device)``.
    """

    def __init__(self, param: nn.Parameter):
        super().__init__()
        self.param = param
        self.register_buffer("mask", torch.ones_like(param, dtype=torch.bool, device=param.device))
        self._clean_version = -1
        self._has_pruned = False  # all-True mask: the forward is the parameter itself
        self._keep: torch.Tensor | None = None  # float copy of the mask, see keep()
        self._keep_key: tuple | None = None
        self.forward_mask_versions: set[int] = set()  # read and cleared by fxprune.zero_preserving

    def forward(self) -> torch.Tensor:
        # Runs once per weight per forward: plain dict reads instead of nn.Module attribute lookups.
        param, mask = self._parameters["param"], self._buffers["mask"]
        # Compiled or fx-traced graphs always multiply: the version-counter check is eager-only Python state.
        if torch.compiler.is_compiling() or is_fx_symbolic_tracing():
            return param * mask if self._has_pruned else param
        # Which masks the gradients now being built are masked with (a gradient from a forward
        # before a mask update is not zero at the newly pruned entries).
        self.forward_mask_versions.add(mask._version)
        if not self._has_pruned:
            return param
        if param._version == self._clean_version:
            # A view of the parameter whose gradient hook applies the mask (for backward() and
            # torch.autograd.grad alike). A tensor hook that is a C-level callable costs about a
            # third of a Python autograd.Function's per-call overhead: ~1% of an MLP step on CPU.
            weight = param.view_as(param)
            if weight.requires_grad:
                weight.register_hook(partial(torch.mul, other=self.keep()))
            return weight
        return param * self.keep()

    def _any_pruned(self) -> bool:
        # reading the bool mask as bytes is ~40x faster than Tensor.all() on large masks
        return self.mask.numel() > 0 and int(self.mask.view(torch.uint8).amin()) == 0

    def keep(self) -> torch.Tensor:
        """The mask as 0/1 in the parameter's dtype and device (cached)."""
        param, mask = self._parameters["param"], self._buffers["mask"]
        key = (mask._version, mask.data_ptr(), param.dtype, param.device)
        if self._keep is None or self._keep_key != key:
            self._keep = mask.view(torch.uint8).to(dtype=param.dtype, device=param.device)
            self._keep_key = key
        return self._keep

    def mark_clean(self) -> None:
        """Declare the stored pruned entries exactly zero without a pass over them.

        Only for callers that proved it (:mod:`fxprune.zero_preserving`).
        """
        self._clean_version = self._parameters["param"]._version

    def is_clean(self) -> bool:
        """True when the stored pruned entries are known to be exactly zero."""
        return self._parameters["param"]._version == self._clean_version

    @torch.no_grad()
    def apply_mask(self) -> None:
        """Zero the stored pruned entries, unless nothing touched the tensor since the last time.

        Goes through ``.data`` so that it is allowed between forward and
        backward (the seed calls ``on_minibatch_end`` there) and does not bump
        the version counter that :meth:`is_clean` watches.
        """
        if not self._has_pruned or self.is_clean():
            return
        self.param.data.mul_(self.keep())
        self._clean_version = self.param._version

    @torch.no_grad()
    def set_mask(self, mask: torch.Tensor) -> None:
        """Install a new mask and zero the newly pruned entries."""
        self.mask.copy_(mask)
        self._has_pruned = self._any_pruned()
        self._clean_version = -1
        self.apply_mask()

    # Tensor metadata, for Python forwards that read ``self.layer.weight.dtype`` (e.g. HF ViTModel) while
    # the layer runs a graph of its own: the masked module stands where the parameter was.
    @property
    def dtype(self) -> torch.dtype:
        return self.param.dtype

    @property
    def device(self) -> torch.device:
        return self.param.device

    @property
    def shape(self) -> torch.Size:
        return self.param.shape

    def folded(self) -> torch.Tensor:
        """The effective weight as a plain tensor, for :func:`fxprune.convert`."""
        return self.param.detach() * self.keep()

    def _load_from_state_dict(self, *args, **kwargs):  # noqa: D401 - torch hook
        super()._load_from_state_dict(*args, **kwargs)
        self._has_pruned = self._any_pruned()
        self._clean_version = -1

    def __setstate__(self, state):
        # A copied or unpickled tensor has a fresh version counter: never trust the old one.
        super().__setstate__(state)
        self._clean_version = -1
        self._keep = self._keep_key = None

    def extra_repr(self) -> str:
        kept = int(self.mask.sum())
        n = self.mask.numel()
        return f"shape={tuple(self.param.shape)}, sparsity={1 - kept / max(n, 1):.4f}"
