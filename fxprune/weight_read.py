"""One observed read of a weight: the input vectors it multiplied, and the weight as a matrix against them.

Pruning statistics (Wanda's feature norms, SparseGPT's ``H = X Xᵀ``) are
about a weight *as a matrix* ``[out, in]`` times input vectors ``[in]``. Real
models store and read weights in other shapes -- ``[in, out]`` for Hugging
Face ``Conv1D``, ``[experts, out, in]`` for stacked MoE experts, kernels for
convolutions -- so a read carries both halves of the answer: :meth:`WeightRead.rows`
(the vectors, one per row) and :meth:`WeightRead.matrix` (a view of the
parameter laid out to match them), with ``op output == rows() @ matrix(p).T``
up to the bias.

Rows are computed lazily from the op's own input tensor: a caller that only
needs per-feature norms (:meth:`WeightRead.feature_sq_sums`) never builds the
im2col patches of a convolution. Use a read inside the ``on_read`` callback
that received it; the input tensor it refers to may change afterwards.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from fxprune.errors import PruningError

__all__ = ["WeightRead", "conv_patches", "conv_output_positions"]


@dataclass(frozen=True)
class WeightRead:
    """One op call's use of a watched weight (or of one expert of a stacked-experts weight).

    ``kind`` is ``"matmul"`` (linear, addmm, matmul/bmm, grouped mm) or
    ``"conv"``. ``out_dim`` / ``in_dim`` are the dimensions of the watched
    parameter that index outputs and input features (for a stacked-experts
    parameter, dimension 0 is the expert); ``op`` names the torch function.
    """

    name: str
    expert: int | None
    n_rows: int
    op: str
    kind: str
    out_dim: int
    in_dim: int
    weight_shape: torch.Size
    _rows: Callable[[], torch.Tensor] = field(repr=False, compare=False)
    _sq_sums: Callable[[], torch.Tensor] = field(repr=False, compare=False)

    def rows(self) -> torch.Tensor:
        """The input vectors, ``[n_rows, in]``, detached, float32 (float64 when the input was float64)."""
        return self._rows()

    def feature_sq_sums(self) -> torch.Tensor:
        """Per input feature (per input channel for a convolution), the sum of squares over all rows (float64)."""
        return self._sq_sums()

    def matrix(self, param: torch.Tensor) -> torch.Tensor:
        """``param`` (or its expert slice) as an ``[out, in]`` view matching :meth:`rows`' columns.

        A view wherever the layout allows (always for matmul reads; for a
        convolution when ``param`` is contiguous), so writing into it writes
        the parameter.
        """
        if tuple(param.shape) != tuple(self.weight_shape):
            raise PruningError(
                f"WeightRead.matrix: weight {self.name!r} was read with shape {tuple(self.weight_shape)}, "
                f"got a tensor of shape {tuple(param.shape)}"
            )
        if self.kind == "conv":
            return param.flatten(1)
        out_dim, in_dim = self.out_dim, self.in_dim
        if self.expert is not None:
            param, out_dim, in_dim = param[self.expert], out_dim - 1, in_dim - 1
        return param if (out_dim, in_dim) == (0, 1) else param.t()


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype rows are returned in: float32, or float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def matmul_read(name: str, op: str, expert: int | None, vectors: Callable[[], torch.Tensor], n_rows: int,
                out_dim: int, in_dim: int, weight_shape: torch.Size) -> WeightRead:
    """A read whose rows are ``vectors()`` (``[n_rows, in]``, any float dtype)."""

    def rows() -> torch.Tensor:
        v = vectors().detach()
        return v.to(accumulation_dtype(v.dtype))

    def sq_sums() -> torch.Tensor:
        return rows().pow(2).sum(0).to(torch.float64)

    return WeightRead(name, expert, n_rows, op, "matmul", out_dim, in_dim, torch.Size(weight_shape), rows, sq_sums)


def conv_read(name: str, op: str, x: torch.Tensor, weight_shape: torch.Size, stride, padding, dilation,
              groups: int) -> WeightRead:
    """A convolution's read: im2col patches as rows (groups == 1), per-channel norms for every conv."""
    spatial = len(weight_shape) - 2
    batched = x if x.dim() == spatial + 2 else x.unsqueeze(0)
    positions = conv_output_positions(batched.shape[2:], weight_shape[2:], stride, padding, dilation)
    n_rows = batched.shape[0] * math.prod(positions)

    def rows() -> torch.Tensor:
        if groups != 1:
            raise PruningError(
                f"weight {name!r} is read by a grouped convolution ({op}, groups={groups}): its output channels "
                "see different input channels, so there is no single matrix of input rows; use "
                "feature_sq_sums() (per input channel) instead"
            )
        patches = conv_patches(batched.detach(), weight_shape[2:], stride, padding, dilation)
        return patches.to(accumulation_dtype(patches.dtype))

    def sq_sums() -> torch.Tensor:
        xc = batched.detach().movedim(1, 0).reshape(batched.shape[1], -1)
        return xc.to(accumulation_dtype(xc.dtype)).pow(2).sum(1).to(torch.float64)

    return WeightRead(name, None, n_rows, op, "conv", 0, 1, torch.Size(weight_shape), rows, sq_sums)


def _tuple(value, n: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (int(value),) * n


def _pads(padding, kernel: Sequence[int], dilation: tuple[int, ...]) -> list[tuple[int, int]]:
    """(before, after) padding per spatial dim, as F.convNd applies it (``'same'`` puts the odd one after)."""
    if padding == "valid":
        return [(0, 0)] * len(kernel)
    if padding == "same":
        totals = [d * (k - 1) for d, k in zip(dilation, kernel)]
        return [(t // 2, t - t // 2) for t in totals]
    return [(p, p) for p in _tuple(padding, len(kernel))]


def conv_output_positions(size: Sequence[int], kernel: Sequence[int], stride, padding, dilation) -> list[int]:
    """Output length per spatial dim of F.convNd on an input of spatial ``size``."""
    n = len(kernel)
    stride, dilation = _tuple(stride, n), _tuple(dilation, n)
    pads = _pads(padding, kernel, dilation)
    return [(length + a + b - d * (k - 1) - 1) // s + 1
            for length, (a, b), d, k, s in zip(size, pads, dilation, kernel, stride)]


def conv_patches(x: torch.Tensor, kernel: Sequence[int], stride, padding, dilation) -> torch.Tensor:
    """im2col for 1/2/3-D convolutions: ``[N * positions, C * prod(kernel)]``, columns in ``weight.flatten(1)`` order.

    ``x`` is ``[N, C, *spatial]``. Zero padding as F.convNd does it (other
    padding modes are applied by the module before it calls F.convNd).
    """
    n = len(kernel)
    stride, dilation = _tuple(stride, n), _tuple(dilation, n)
    flat_pads = [p for before_after in reversed(_pads(padding, kernel, dilation)) for p in before_after]
    if any(flat_pads):
        x = F.pad(x, flat_pads)
    for i, (k, s, d) in enumerate(zip(kernel, stride, dilation)):
        x = x.unfold(2 + i, d * (k - 1) + 1, s)  # appends the window as the last dim
        x = x[..., ::d]
    # [N, C, *positions, *kernel] -> [N, *positions, C, *kernel]
    x = x.movedim(1, 1 + n)
    return x.reshape(-1, math.prod(x.shape[1 + n:]))
