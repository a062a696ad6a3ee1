"""The dtype a block computes in while it is calibrated, and the temporary cast that gives it.

Why not always the model's dtype: on CPU, bfloat16 and float16 matrix products
are far slower than float32 ones (a 4096x2048 by 2048x5632 product took 17.5 s
in bfloat16 against 1.4 s in float32 on this project's 2-core machine, one
thread), and calibration runs every block twice over all calibration tokens.
Casting *one block* to float32 for its turn costs that block's extra bytes
only (0.04x a 22-block model in bfloat16), never a copy of the model. The
block's outputs are cast back to the model's dtype before the next block reads
them, so every block still receives what the model in its own dtype would hand
it; only the arithmetic inside the block is more precise. The solvers already
work in float32, so a pruned weight is rounded to the model's dtype once, as
before.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import sys
from typing import Any, Iterator

import torch
from torch import nn

__all__ = ["compute_dtype", "computing_in", "release_freed_memory"]

_HALF = (torch.bfloat16, torch.float16)


def compute_dtype(block: nn.Module, setting: str, device: torch.device | None) -> torch.dtype | None:
    """The dtype ``block`` runs in for ``calibration_dtype: setting``; ``None`` means its own (no cast)."""
    if setting == "model":
        return None
    dtypes = {p.dtype for p in block.parameters() if p.is_floating_point()}
    if not dtypes or not dtypes <= set(_HALF):  # only half-precision blocks are cast (never down to float32)
        return None
    if setting == "float32":
        return torch.float32
    where = device if device is not None else next(block.parameters()).device
    return torch.float32 if torch.device(where).type == "cpu" else None


@contextlib.contextmanager
def computing_in(block: nn.Module, dtype: torch.dtype | None) -> Iterator[None]:
    """``block``'s floating parameters and buffers in ``dtype`` inside, their own dtypes restored after.

    The tensors are replaced through ``.data``, one at a time, so that the
    Parameter objects (which the pruning plan holds) stay the same and at most
    one tensor exists in both dtypes at once. Values written inside (the pruned
    weights) are rounded back to the original dtype on exit.
    """
    if dtype is None:
        yield
        return
    tensors = [t for t in _unique(block) if t.is_floating_point() and t.dtype != dtype]
    originals = [t.dtype for t in tensors]
    try:
        for t in tensors:
            t.data = t.data.to(dtype)
        yield
    finally:
        for t, original in zip(tensors, originals):
            t.data = t.data.to(original)


def _unique(block: nn.Module) -> list[torch.Tensor]:
    seen: set[int] = set()
    out = []
    for t in [*block.parameters(), *block.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


_LIBC: Any = None


def release_freed_memory() -> None:
    """Hand memory freed by the last block back to the operating system (glibc's ``malloc_trim``).

    Why: a block's statistics and solver temporaries are tens of MB each, and
    glibc raises its mmap threshold as such chunks are freed, so later ones come
    from the heap and stay resident after ``free``: measured on a 1B Llama, the
    process grew by a few tens of MB per block with nothing alive. Trimming after
    every block keeps the resident size at what is really held. Elsewhere than
    glibc this does nothing.
    """
    global _LIBC
    if not sys.platform.startswith("linux"):
        return
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)
