"""Inference modules that multiply with a sparse weight: ``SparseLinear`` and ``SparseConv2d``.

Why a module of its own: torch's CPU sparse kernels (MKL, behind
``torch.mv`` / ``torch.addmm`` on CSR or BSR tensors) skip the pruned zeros
and, at high sparsity, read far fewer bytes than a dense GEMM; a model only
gains from them if the layer itself computes with the sparse tensor. These
modules do, and otherwise behave like the layer they replace:

* ``state_dict()`` has the original keys (``weight``, ``bias``) with a dense
  ``weight``, so it loads straight back into the dense model, and
  ``load_state_dict`` of a dense ``state_dict`` rebuilds the sparse weight;
* ``torch.save`` / ``torch.load`` of the whole model, ``copy.deepcopy``,
  ``.to(dtype)`` and ``torch.jit.script`` / ``trace`` work (the sparse weight's
  parts are non-persistent buffers);
* they are inference-only: the weight is a fixed buffer, not a parameter, so
  a forward that would train it (``training`` mode with grad enabled) raises
  instead of silently not updating it. Gradients with respect to the input
  and the bias in eval mode are exact.

Indices are stored as int32: MKL works on 32-bit indices, and int64 ones are
converted on every call (measured 1.3-1.6x slower at batch 1).
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SparseLinear", "SparseConv2d", "to_sparse_layout", "SPARSE_DTYPES"]

#: dtypes torch's CPU sparse matmul implements (MKL); fp16/bf16 raise "not implemented" in torch 2.14.
SPARSE_DTYPES = (torch.float32, torch.float64)

def to_sparse_layout(weight2d: Tensor, layout: str, blocksize: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``weight2d`` (a matrix) as CSR or BSR ``(crow_indices, col_indices, values)`` with int32 indices.

    Exact zeros are dropped. The parts are kept as three plain tensors (and the
    sparse tensor is assembled per call, ~6 us) because a sparse CSR tensor
    cannot be deep-copied and TorchScript cannot hold one as an attribute.
    """
    w = weight2d.detach()
    if layout not in ("csr", "bsr"):
        raise ValueError(f"unknown sparse layout {layout!r}; expected 'csr' or 'bsr'")
    if layout == "bsr" and blocksize is None:
        raise ValueError("layout 'bsr' needs a blocksize")
    with warnings.catch_warnings():  # torch's "sparse CSR support is in beta" notice, once per process
        warnings.filterwarnings("ignore", message="Sparse (CSR|BSR) tensor support is in beta")
        s = w.to_sparse_csr() if layout == "csr" else w.to_sparse_bsr((blocksize, blocksize))
    return s.crow_indices().to(torch.int32), s.col_indices().to(torch.int32), s.values()


def _sparse_matmul(crow: Tensor, col: Tensor, values: Tensor, shape: list[int], cols: Tensor,
                   bias: Optional[Tensor] = None) -> Tensor:
    """``W @ cols + bias[:, None]`` for the sparse ``W`` given by its parts and a dense ``cols`` (K, N)."""
    if values.dim() == 1:  # CSR
        weight = torch.sparse_csr_tensor(crow, col, values, shape, dtype=values.dtype, device=values.device)
        # One column: MKL's sparse mv, 2-3x faster than mm, with the bias fused. Not under jit.trace, which would
        # record this branch for every batch size.
        if cols.shape[1] == 1 and not torch.jit.is_tracing():
            vec = cols[:, 0]
            out = torch.mv(weight, vec) if bias is None else torch.addmv(bias, weight, vec)
            return out.unsqueeze(1)
    else:  # BSR: values are (nnz_blocks, b, b)
        weight = torch.sparse_bsr_tensor(crow, col, values, shape, dtype=values.dtype, device=values.device)
    out = torch.mm(weight, cols)
    return out if bias is None else out + bias.unsqueeze(1)


def _eager_compute(module: "_SparseWeightModule", x: Tensor) -> Tensor:
    return module.compute(x)


# torch.compile (dynamo, torch 2.14) cannot trace the assembly of a sparse tensor nor take a view across a
# graph break around it: the whole sparse module runs eagerly, one graph break, the rest of the model compiles.
_eager_compute = torch.compiler.disable(_eager_compute)


class _SparseWeightModule(nn.Module):
    """What both modules share: the sparse buffer, the dense ``weight`` in ``state_dict``, the training guard."""

    __jit_unused_properties__ = ["weight", "nnz"]

    def __init__(self, weight: Tensor, bias: Tensor | None, layout: str, blocksize: int | None) -> None:
        super().__init__()
        self.weight_shape: list[int] = list(weight.shape)
        self.layout = layout
        self.blocksize = blocksize
        self.matrix_shape: list[int] = [int(weight.shape[0]), int(weight.numel() // max(weight.shape[0], 1))]
        crow, col, values = to_sparse_layout(weight.reshape(self.matrix_shape), layout, blocksize)
        self.register_buffer("crow_indices", crow, persistent=False)
        self.register_buffer("col_indices", col, persistent=False)
        self.register_buffer("values", values, persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
        self.measured = ""  # set by fxprune.sparsify_kernels: the timing that chose this module

    @property
    def weight(self) -> Tensor:
        """The dense weight (zeros included), computed from the sparse one: what ``state_dict()`` holds."""
        return self.sparse_weight().to_dense().reshape(self.weight_shape)

    @property
    def nnz(self) -> int:
        """Stored entries (for BSR, every entry of every stored block)."""
        return self.values.numel()

    @torch.jit.unused
    def sparse_weight(self) -> Tensor:
        """The weight as a torch sparse CSR/BSR tensor."""
        make = torch.sparse_csr_tensor if self.layout == "csr" else torch.sparse_bsr_tensor
        return make(self.crow_indices, self.col_indices, self.values, self.matrix_shape)

    def _save_to_state_dict(self, destination, prefix, keep_vars):  # noqa: D401 - torch's hook point
        destination[prefix + "weight"] = self.weight
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "weight"
        if key in state_dict:
            dense = state_dict[key]
            if list(dense.shape) != self.weight_shape:
                error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(dense.shape)}, "
                                  f"the shape in the current model is {tuple(self.weight_shape)}")
            else:
                dense = dense.to(device=self.values.device, dtype=self.values.dtype)
                parts = to_sparse_layout(dense.reshape(self.matrix_shape), self.layout, self.blocksize)
                self.crow_indices, self.col_indices, self.values = parts
        elif strict:
            missing_keys.append(key)
        # The bias (a parameter) is loaded by torch's own logic; 'weight' is consumed above.
        rest = {k: v for k, v in state_dict.items() if k != key}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        if key in unexpected_keys:
            unexpected_keys.remove(key)

    def forward(self, x: Tensor) -> Tensor:
        self._check_inference()
        if torch.jit.is_scripting():
            return self.compute(x)
        if not torch.compiler.is_compiling():  # eager: skip the boundary's own cost (~10 us a call)
            return self.compute(x)
        return _eager_compute(self, x)

    def compute(self, x: Tensor) -> Tensor:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def _check_inference(self) -> None:
        if self.training and torch.is_grad_enabled():
            raise RuntimeError(
                "fxprune's sparse modules compute with a fixed sparse weight (a buffer, not a parameter) and "
                "cannot be trained; call model.eval() or run under torch.no_grad() for inference, or load "
                "model.state_dict() into the dense model (same keys) to train it")

    def extra_repr(self) -> str:
        block = f", blocksize={self.blocksize}" if self.layout == "bsr" else ""
        numel = 1
        for d in self.weight_shape:
            numel *= d
        return (f"weight_shape={tuple(self.weight_shape)}, layout={self.layout}{block}, "
                f"density={self.nnz / max(numel, 1):.3f}, bias={self.bias is not None}"
                + (f", measured={self.measured}" if self.measured else ""))


class SparseLinear(_SparseWeightModule):
    """``nn.Linear`` computing ``x @ W.T + b`` with a CSR/BSR ``W``; inputs of any batch shape ``(..., in)``."""

    def __init__(self, weight: Tensor, bias: Tensor | None = None, layout: str = "csr",
                 blocksize: int | None = None) -> None:
        super().__init__(weight, bias, layout, blocksize)
        self.in_features = int(weight.shape[1])
        self.out_features = int(weight.shape[0])

    @classmethod
    def from_dense(cls, linear: nn.Linear, layout: str = "csr", blocksize: int | None = None) -> "SparseLinear":
        return cls(linear.weight, linear.bias, layout, blocksize)

    def compute(self, x: Tensor) -> Tensor:
        """``forward`` without the training guard and the torch.compile boundary."""
        lead = x.shape[:-1]
        rows = x.reshape(-1, self.in_features)
        out = _sparse_matmul(self.crow_indices, self.col_indices, self.values, self.matrix_shape, rows.t(),
                             self.bias)  # (out, N): one column per input row
        return out.t().reshape(list(lead) + [self.out_features])


class SparseConv2d(_SparseWeightModule):
    """``nn.Conv2d`` (groups 1, zero padding) as a sparse matmul: 1x1 directly, any other kernel via im2col."""

    def __init__(self, weight: Tensor, bias: Tensor | None, stride: tuple[int, int], padding: tuple[int, int],
                 dilation: tuple[int, int], layout: str = "csr", blocksize: int | None = None) -> None:
        super().__init__(weight, bias, layout, blocksize)
        self.out_channels = int(weight.shape[0])
        self.in_channels = int(weight.shape[1])
        self.kernel_size = (int(weight.shape[2]), int(weight.shape[3]))
        self.stride = (int(stride[0]), int(stride[1]))
        self.padding = (int(padding[0]), int(padding[1]))
        self.dilation = (int(dilation[0]), int(dilation[1]))
        self.pointwise = self.kernel_size == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0)

    @staticmethod
    def unsupported(conv: nn.Conv2d) -> str | None:
        """Why ``conv`` cannot be swapped (None if it can)."""
        if conv.groups != 1:
            return f"groups={conv.groups} (grouped/depthwise convolutions stay dense)"
        if conv.padding_mode != "zeros":
            return f"padding_mode={conv.padding_mode!r}"
        if isinstance(conv.padding, str):
            return f"padding={conv.padding!r} (string padding)"
        return None

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, layout: str = "csr", blocksize: int | None = None) -> "SparseConv2d":
        reason = cls.unsupported(conv)
        if reason is not None:
            raise ValueError(f"SparseConv2d cannot replace this Conv2d: {reason}")
        return cls(conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, layout, blocksize)

    def compute(self, x: Tensor) -> Tensor:
        """``forward`` without the training guard and the torch.compile boundary."""
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        n, _, h, w = x.shape
        kh, kw = self.kernel_size
        h_out = (h + 2 * self.padding[0] - self.dilation[0] * (kh - 1) - 1) // self.stride[0] + 1
        w_out = (w + 2 * self.padding[1] - self.dilation[1] * (kw - 1) - 1) // self.stride[1] + 1
        if self.pointwise:
            cols = x.reshape(n, self.in_channels, h * w)
        else:
            cols = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)  # (N, C*kh*kw, L)
        if n == 1 and not torch.jit.is_tracing():  # (a trace would keep this branch for every batch)
            out = _sparse_matmul(self.crow_indices, self.col_indices, self.values, self.matrix_shape,
                                 cols[0], self.bias).unsqueeze(0)
        else:  # one matmul over every image: (K, N*L) columns
            k = cols.shape[1]
            out = _sparse_matmul(self.crow_indices, self.col_indices, self.values, self.matrix_shape,
                                 cols.transpose(0, 1).reshape(k, -1), self.bias)
            out = out.reshape(self.out_channels, n, -1).transpose(0, 1)
        out = out.reshape(n, self.out_channels, h_out, w_out)
        return out[0] if unbatched else out
