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

Decoding is what loading costs. Where the optional C kernel was built at
install time (``fxprune/checkpoints/_expand.c``: one pass, AVX-512 expand-loads
where the CPU has them), :func:`decode_bitmask_into` uses it. Otherwise it avoids the
per-element scatter (``masked_scatter_``, 10-20 ns a kept value on CPU): in
steps of :data:`DECODE_STEP` elements (small enough for the step's mask and
ranks to stay in cache), the running count of kept elements (a cumulative sum
of the unpacked mask) is the index of each element's value, one gather
(``index_select``) writes the step, and multiplying by the mask zeroes the
pruned places. It works on the integer view of the dtype, so every bit
pattern (NaN payloads included) is copied, never computed with, and it
writes into memory the caller provides (a model's own parameter), so loading
needs no dense temporary and no second copy.
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
    "decode_bitmask_into",
    "native_expand",
    "count_kept_bits",
    "DECODE_STEP",
    "encode_bitmask_24",
    "encode_csr",
    "decode_csr",
    "decode_csr_into",
    "check_parts",
    "bitmask_nbytes",
    "bitmask_24_nbytes",
    "csr_nbytes",
]

BITMASK_PARTS = ("compressed", "bitmask", "row_offsets", "shape")
BITMASK_24_PARTS = ("compressed", "bitmask", "shape")
CSR_PARTS = ("values", "crow_indices", "col_indices")
# Elements decoded per step (a multiple of 8): small enough for a step's mask and ranks to stay in cache, and
# not above torch's intra-op grain size (32768), so each op runs on the calling thread alone: a loader
# parallelises across tensors instead, and no OpenMP barrier stalls a step when cores are shared.
DECODE_STEP = 1 << 15
_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}

def _rows(t: torch.Tensor) -> torch.Tensor:
    """The tensor as a contiguous ``[rows, cols]`` (a 0-d or 1-D tensor is one row)."""
    return (t.reshape(1, -1) if t.dim() < 2 else t.reshape(t.shape[0], -1)).contiguous()


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

    return torch.from_numpy(numpy.packbits(mask.contiguous().numpy(), axis=-1, bitorder="little"))


def unpack_bits(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: uint8 ``[rows, ceil(cols / 8)]`` -> bool ``[rows, cols]``."""
    import numpy

    bits = numpy.unpackbits(packed.numpy(), axis=-1, count=cols, bitorder="little")
    return torch.from_numpy(bits.view(bool))


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


def _rows_cols(shape: list[int] | torch.Size) -> tuple[int, int]:
    shape = [int(s) for s in shape]
    rows = shape[0] if len(shape) >= 2 else 1
    return rows, (math.prod(shape) // rows if rows else 0)


def count_kept_bits(bitmask: torch.Tensor, cols: int, *, native: bool | None = None) -> int:
    """Number of set bits of a ``[rows, ceil(cols / 8)]`` bitmask, the padding bits of each row aside.

    What a bitmask's ``compressed`` part must hold; checked before a load writes anything.
    ``native`` as for :func:`decode_bitmask_into` (numpy counts where the C kernel is not used).
    """
    import numpy

    packed = bitmask.contiguous().numpy()
    if packed.size == 0:
        return 0
    packed = packed.reshape(packed.shape[0], -1) if packed.ndim else packed.reshape(1, 1)
    count = _native("count") if native is not False else None
    if native and count is None:
        raise RuntimeError("count_kept_bits(native=True): the C kernel fxprune.checkpoints._expand is not built")
    if count is not None:
        return count(packed.reshape(-1), packed.shape[0], cols)
    popcount = getattr(numpy, "bitwise_count", None)  # numpy >= 2; a table below that
    if popcount is None:
        table = numpy.array([bin(i).count("1") for i in range(256)], dtype=numpy.uint8)
        popcount = table.take
    if cols % 8:
        whole = int(popcount(packed[:, :-1]).sum(dtype=numpy.int64))
        return whole + int(popcount(packed[:, -1] & ((1 << (cols % 8)) - 1)).sum(dtype=numpy.int64))
    return int(popcount(packed).sum(dtype=numpy.int64))


def _steps(rows: int, cols: int, step: int):
    """``(first element, elements, bytes of their bits, cols)`` pieces of a bitmask, in element order.

    ``cols`` is None where the piece's bits are one contiguous run (no row padding inside it),
    else the piece is whole rows, unpacked row by row.
    """
    if cols % 8 == 0 or rows == 1:  # the bitmask is one contiguous bit stream
        total = rows * cols
        for start in range(0, total, step):
            yield start, min(step, total - start), slice(start // 8, (min(start + step, total) + 7) // 8), None
    elif cols >= step:  # long padded rows: byte-aligned pieces of each row
        width = (cols + 7) // 8
        for r in range(rows):
            for c in range(0, cols, step):
                n = min(step, cols - c)
                yield r * cols + c, n, slice(r * width + c // 8, r * width + (c + n + 7) // 8), None
    else:  # short padded rows: blocks of whole rows
        per = max(1, step // cols)
        width = (cols + 7) // 8
        for r in range(0, rows, per):
            n_rows = min(per, rows - r)
            yield r * cols, n_rows * cols, slice(r * width, (r + n_rows) * width), cols


def _native(name: str):
    """A function of the C kernel (``fxprune/checkpoints/_expand.c``), or None where it was not built."""
    try:
        from fxprune.checkpoints import _expand
    except ImportError:
        return None
    return getattr(_expand, name)


def native_expand():
    """The C kernel's ``expand``, or None where it was not built."""
    return _native("expand")


def decode_bitmask_into(
    out: torch.Tensor, compressed: torch.Tensor, bitmask: torch.Tensor, *, step: int = DECODE_STEP,
    native: bool | None = None,
) -> torch.Tensor:
    """Write the dense tensor of a bitmask encoding into ``out`` (plain or 2:4) and return ``out``.

    ``out`` is a contiguous CPU tensor of the dense shape and ``compressed``'s
    dtype (a model's parameter, or fresh ``torch.empty``: every element is
    written). The number of values must match the bitmask
    (:func:`count_kept_bits`); a short ``compressed`` raises before the step (or row) it lacks.
    ``native``: None uses the C kernel where it was built, True requires it, False
    decodes with torch ops in steps of ``step`` elements (a multiple of 8); both give
    the same bits. See the module docstring for the method.
    """
    import numpy

    if step < 8 or step % 8:
        raise ValueError(f"decode_bitmask_into: step must be a positive multiple of 8, got {step}")
    if not out.is_contiguous() or out.device.type != "cpu" or out.dtype != compressed.dtype:
        raise ValueError("decode_bitmask_into: out must be a contiguous CPU tensor of the values' dtype")
    rows, cols = _rows_cols(out.shape)
    ints = _INT_OF_SIZE[out.element_size()]
    dst = out.detach().view(-1).view(ints)
    src = compressed.detach().reshape(-1).contiguous().view(ints)
    packed = bitmask.contiguous().numpy().reshape(-1)
    expand = native_expand() if native is not False else None
    if native and expand is None:
        raise RuntimeError("decode_bitmask_into(native=True): the C kernel fxprune.checkpoints._expand is not built")
    if expand is not None and dst.numel():
        expand(dst.numpy(), src.numpy(), packed, rows, cols)
        return out
    ranks_buf = torch.empty(max(1, min(step, rows * cols)), dtype=torch.int32)
    zero = src.new_zeros(1)
    base = 0
    for start, n, byte_range, row_cols in _steps(rows, cols, step):
        bits = packed[byte_range]
        if row_cols is None:
            mask = numpy.unpackbits(bits, count=n, bitorder="little")
        else:
            mask = numpy.unpackbits(bits.reshape(-1, (row_cols + 7) // 8), axis=-1, count=row_cols, bitorder="little")
        mask = torch.from_numpy(mask.reshape(-1))
        ranks = torch.cumsum(mask, 0, dtype=torch.int32, out=ranks_buf[:n])  # 1-based index of each kept value
        kept_here = int(ranks[-1])
        if base + kept_here > src.numel():
            raise ValueError(f"bitmask marks more elements than the {src.numel()} values given")
        piece = dst[start:start + n]
        if kept_here == 0:
            piece.zero_()
        elif kept_here == n:
            piece.copy_(src[base:base + n])
        else:  # ranks index values[base - 1 + rank]; the zero stands in before the first value
            window = src[base - 1:base + kept_here] if base else torch.cat([zero, src[:kept_here]])
            torch.index_select(window, 0, ranks, out=piece)
            piece.mul_(mask.view(torch.int8) if ints is torch.int8 else mask)
        base += kept_here
    return out


def decode_bitmask(compressed: torch.Tensor, bitmask: torch.Tensor, shape: list[int] | torch.Size) -> torch.Tensor:
    """Dense tensor of ``shape`` from a bitmask encoding (plain or 2:4: they decode alike)."""
    shape = [int(s) for s in shape]
    return decode_bitmask_into(torch.empty(shape, dtype=compressed.dtype), compressed, bitmask)


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


def check_parts(layout: str, parts: dict[str, torch.Tensor], shape: list[int] | torch.Size, dtype: torch.dtype) -> None:
    """Raise ValueError unless ``parts`` decode to a tensor of ``shape`` and ``dtype``.

    Checked before anything is decoded, so that loading a damaged file fails
    before it writes into a model. Cheap next to decoding: shapes, one
    popcount of the bitmask, one pass over CSR's indices.
    """
    rows, cols = _rows_cols(shape)
    if layout == "bitmask":
        values, bitmask = parts["compressed"], parts["bitmask"]
        if bitmask.dtype != torch.uint8 or bitmask.numel() != rows * ((cols + 7) // 8):
            raise ValueError(f"bitmask has {bitmask.numel()} {bitmask.dtype} bytes; shape {list(shape)} needs "
                             f"{rows * ((cols + 7) // 8)} uint8 bytes")
        wanted = count_kept_bits(bitmask.reshape(rows, -1) if rows else bitmask, cols)
    elif layout == "csr":
        values, crow, col = parts["values"], parts["crow_indices"], parts["col_indices"]
        crow64 = crow.reshape(-1).to(torch.int64)
        if crow64.numel() != rows + 1 or int(crow64[0]) != 0 or bool((crow64.diff() < 0).any()):
            raise ValueError(f"crow_indices is not {rows + 1} non-decreasing offsets from 0")
        wanted = int(crow64[-1])
        if col.numel() != wanted or (col.numel() and (int(col.min()) < 0 or int(col.max()) >= cols)):
            raise ValueError(f"col_indices must be {wanted} column numbers in [0, {cols})")
    else:
        raise ValueError(f"unknown layout {layout!r}")
    if values.dtype != dtype or values.numel() != wanted:
        raise ValueError(f"{values.numel()} values of {values.dtype}; the {layout} parts need {wanted} of {dtype}")


def decode_csr_into(
    out: torch.Tensor, values: torch.Tensor, crow_indices: torch.Tensor, col_indices: torch.Tensor
) -> torch.Tensor:
    """Write the dense tensor of :func:`encode_csr`'s parts into ``out`` (contiguous CPU, ``values``' dtype)."""
    if not out.is_contiguous() or out.device.type != "cpu" or out.dtype != values.dtype:
        raise ValueError("decode_csr_into: out must be a contiguous CPU tensor of the values' dtype")
    rows, cols = _rows_cols(out.shape)
    ints = _INT_OF_SIZE[out.element_size()]
    dst = out.view(-1).view(ints)
    dst.zero_()
    counts = crow_indices.to(torch.int64).diff()
    row_ids = torch.repeat_interleave(torch.arange(rows, dtype=torch.int64), counts)
    dst[row_ids * cols + col_indices.to(torch.int64)] = values.reshape(-1).view(ints)
    return out


def decode_csr(
    values: torch.Tensor, crow_indices: torch.Tensor, col_indices: torch.Tensor, shape: list[int] | torch.Size
) -> torch.Tensor:
    """Dense tensor of ``shape`` from :func:`encode_csr`'s parts."""
    shape = [int(s) for s in shape]
    return decode_csr_into(torch.empty(shape, dtype=values.dtype), values, crow_indices, col_indices)


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
