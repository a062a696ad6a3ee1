"""The one sparse-tensor codec behind every fxprune checkpoint: bitmask, 2:4 bitmask and CSR.

The bitmask layouts are compressed-tensors' ``sparse-bitmask`` and
``sparse-24-bitmask`` layouts, tensor for tensor, so that one implementation
serves the Hugging Face export (read back by compressed-tensors' own
decompressor, which the tests check) and fxprune's own single-file format:

``sparse-bitmask`` (any tensor, viewed as ``[rows, cols]`` with ``rows = shape[0]``)
    ``compressed``  1-D, the kept values in row-major order, in the tensor's dtype
    ``bitmask``     uint8 ``[rows, ceil(cols / 8)]``, bit ``j % 8`` of byte ``j // 8``
                    (little-endian bit order) set where element ``j`` of the row is kept
    ``row_offsets`` int64 ``[rows]``, where each row starts in ``compressed``
                    (not needed to decode; written where the format asks for it)
    ``shape``       int64, the dense shape
``sparse-24-bitmask`` (2-D, at most 2 non-zeros in every 4 consecutive elements of a row)
    ``compressed``  ``[rows, cols / 2]``: exactly two values per group of four (a group
                    with fewer non-zeros keeps some of its zeros, so every row has the same length)
    ``bitmask``     as above; ``shape`` int64 ``[2, 1]``
CSR (fxprune's own file only, chosen where it is smaller than the bitmask: very sparse tensors)
    ``crow_indices`` int32/int64 ``[rows + 1]``, ``col_indices`` int16/int32 ``[nnz]``, ``values``

What is "kept": every element whose value is not zero. ``-0.0`` counts as zero and
comes back as ``+0.0`` (the two compare equal and give the same products; keeping
the sign of pruned zeros would cost a second mask). Every other bit pattern,
NaN and infinities included, comes back bit for bit. The bits are packed by
numpy's ``packbits`` / ``unpackbits`` (a hundred times faster on CPU than the
same shifts written in torch ops), everything else is torch.
"""
from __future__ import annotations

import math

import torch

__all__ = [
    "BITMASK_PARTS",
    "BITMASK_24_PARTS",
    "CSR_PARTS",
    "kept",
    "is_24_along_rows",
    "pack_bits",
    "unpack_bits",
    "encode_bitmask",
    "decode_bitmask",
    "encode_bitmask_24",
    "encode_csr",
    "decode_csr",
    "bitmask_nbytes",
    "bitmask_24_nbytes",
    "csr_nbytes",
]

BITMASK_PARTS = ("compressed", "bitmask", "row_offsets", "shape")
BITMASK_24_PARTS = ("compressed", "bitmask", "shape")
CSR_PARTS = ("values", "crow_indices", "col_indices")

def _rows(t: torch.Tensor) -> torch.Tensor:
    """The tensor as ``[rows, cols]`` (a 0-d or 1-D tensor is one row)."""
    return t.reshape(1, -1) if t.dim() < 2 else t.reshape(t.shape[0], -1)


def kept(t: torch.Tensor) -> torch.Tensor:
    """Bool mask of the elements the codec stores: ``t != 0`` (NaN is kept, ``-0.0`` is not)."""
    return t != 0


def is_24_along_rows(t: torch.Tensor) -> bool:
    """True if ``t`` is 2-D and every 4 consecutive elements of a row hold at most 2 non-zeros."""
    if t.dim() != 2 or t.shape[1] % 4 or t.numel() == 0:
        return False
    return bool((kept(t).reshape(-1, 4).sum(1) <= 2).all())


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """``[rows, cols]`` bool -> uint8 ``[rows, ceil(cols / 8)]``, little-endian bit order."""
    import numpy  # lazily: numpy comes with the 'compressed' extra

    return torch.from_numpy(numpy.packbits(mask.numpy(), axis=-1, bitorder="little"))


def unpack_bits(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: uint8 ``[rows, ceil(cols / 8)]`` -> bool ``[rows, cols]``."""
    import numpy

    bits = numpy.unpackbits(packed.numpy(), axis=-1, count=cols, bitorder="little")
    return torch.from_numpy(bits.view(bool))


def _zeros(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A zeroed 1-D tensor from calloc'd memory: the kernel hands out zeroed pages, so there is no
    separate zeroing pass (on CPU ``torch.zeros`` of a large tensor costs as much as the decoding)."""
    import numpy

    return torch.from_numpy(numpy.zeros(numel * dtype.itemsize, numpy.uint8)).view(dtype)


def encode_bitmask(t: torch.Tensor, *, row_offsets: bool = True) -> dict[str, torch.Tensor]:
    """Encode ``t`` in the ``sparse-bitmask`` layout (see the module docstring)."""
    rows2d = _rows(t.detach())
    mask = kept(rows2d)
    parts = {"compressed": rows2d[mask], "bitmask": pack_bits(mask)}
    if row_offsets:
        counts = mask.sum(1)
        parts["row_offsets"] = torch.cumsum(counts, 0) - counts
    parts["shape"] = torch.tensor(list(t.shape), dtype=torch.int64)
    return parts


def decode_bitmask(compressed: torch.Tensor, bitmask: torch.Tensor, shape: list[int] | torch.Size) -> torch.Tensor:
    """Dense tensor of ``shape`` from a bitmask encoding (plain or 2:4: they decode alike)."""
    shape = [int(s) for s in shape]
    rows = shape[0] if len(shape) >= 2 else 1
    cols = math.prod(shape) // rows if rows else 0
    dense = _zeros(rows * cols, compressed.dtype).reshape(rows, cols)
    if dense.numel():
        dense.masked_scatter_(unpack_bits(bitmask, cols), compressed.reshape(-1))
    return dense.reshape(shape)


def encode_bitmask_24(t: torch.Tensor) -> dict[str, torch.Tensor]:
    """Encode a 2-D 2:4 tensor (:func:`is_24_along_rows`) in the ``sparse-24-bitmask`` layout."""
    rows, cols = t.shape
    groups = t.detach().reshape(-1, 4)
    # Every non-zero, then the first zeros of its group, until the group has exactly two.
    order = kept(groups).to(torch.int8) * 8 + torch.arange(3, -1, -1, dtype=torch.int8)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, order.topk(2, dim=1).indices, True)
    keep = keep.reshape(rows, cols)
    return {
        "compressed": t.detach()[keep].reshape(rows, cols // 2),
        "bitmask": pack_bits(keep),
        "shape": torch.tensor([rows, cols], dtype=torch.int64).reshape(-1, 1),
    }


def _index_dtype(bound: int, small: torch.dtype) -> torch.dtype:
    return small if bound <= torch.iinfo(small).max else (torch.int32 if bound <= 2**31 - 1 else torch.int64)


def encode_csr(t: torch.Tensor) -> dict[str, torch.Tensor]:
    """Encode ``t`` (viewed as ``[rows, cols]``) as CSR with the narrowest index dtypes that fit."""
    rows2d = _rows(t.detach())
    mask = kept(rows2d)
    counts = mask.sum(1)
    crow = torch.zeros(rows2d.shape[0] + 1, dtype=torch.int64)
    torch.cumsum(counts, 0, out=crow[1:])
    cols = mask.nonzero()[:, 1]
    return {
        "values": rows2d[mask],
        "crow_indices": crow.to(_index_dtype(int(crow[-1]), torch.int32)),
        "col_indices": cols.to(_index_dtype(rows2d.shape[1], torch.int16)),
    }


def decode_csr(
    values: torch.Tensor, crow_indices: torch.Tensor, col_indices: torch.Tensor, shape: list[int] | torch.Size
) -> torch.Tensor:
    """Dense tensor of ``shape`` from :func:`encode_csr`'s parts."""
    shape = [int(s) for s in shape]
    rows = shape[0] if len(shape) >= 2 else 1
    cols = math.prod(shape) // rows if rows else 0
    dense = _zeros(rows * cols, values.dtype)
    counts = crow_indices.to(torch.int64).diff()
    row_ids = torch.repeat_interleave(torch.arange(rows, dtype=torch.int64), counts)
    dense[row_ids * cols + col_indices.to(torch.int64)] = values
    return dense.reshape(shape)


def bitmask_nbytes(t: torch.Tensor, nnz: int, *, row_offsets: bool) -> int:
    """Bytes of :func:`encode_bitmask`'s tensors for ``t`` with ``nnz`` kept elements (``shape`` aside)."""
    rows2d_shape = (1, t.numel()) if t.dim() < 2 else (t.shape[0], t.numel() // max(t.shape[0], 1))
    rows, cols = rows2d_shape
    return nnz * t.element_size() + rows * math.ceil(cols / 8) + (8 * rows if row_offsets else 0)


def bitmask_24_nbytes(t: torch.Tensor) -> int:
    """Bytes of :func:`encode_bitmask_24`'s tensors for a 2-D ``t`` (``shape`` aside)."""
    rows, cols = t.shape
    return rows * cols // 2 * t.element_size() + rows * math.ceil(cols / 8)


def csr_nbytes(t: torch.Tensor, nnz: int) -> int:
    """Bytes of :func:`encode_csr`'s tensors for ``t`` with ``nnz`` kept elements."""
    rows = 1 if t.dim() < 2 else t.shape[0]
    cols = t.numel() // max(rows, 1)
    col_size = _index_dtype(cols, torch.int16).itemsize
    crow_size = _index_dtype(nnz, torch.int32).itemsize
    return nnz * (t.element_size() + col_size) + (rows + 1) * crow_size
