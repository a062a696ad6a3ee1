"""Emit 2:4 semi-structured sparse weights for Linear layers (``convert(..., semi_structured=True)``).

NVIDIA sparse tensor cores (Ampere and later) multiply a weight that keeps at
most 2 of every 4 consecutive input weights at up to twice the dense speed.
``torch.sparse.to_sparse_semi_structured`` packs such a weight; it runs on
CUDA only, so this step is explicit and raises on machines without a GPU
instead of silently returning dense weights.
"""
from __future__ import annotations

import torch
from torch import nn

from fxprune.config import nm_ratio
from fxprune.errors import PruningError

__all__ = ["semi_structured_candidates", "check_semi_structured_available", "to_semi_structured"]


def check_semi_structured_available() -> None:
    """Raise a clear error unless CUDA and ``torch.sparse.to_sparse_semi_structured`` are there."""
    if not torch.cuda.is_available():
        raise PruningError(
            "convert(semi_structured=True) packs 2:4 weights with torch.sparse.to_sparse_semi_structured, "
            "which needs a CUDA GPU (sparse tensor cores, compute capability >= 8.0); no CUDA device is "
            "available. Use convert() without semi_structured to get dense weights with the 2:4 zeros"
        )
    if not hasattr(torch.sparse, "to_sparse_semi_structured"):
        raise PruningError(f"torch {torch.__version__} has no torch.sparse.to_sparse_semi_structured")


def semi_structured_candidates(targets, pruner_configs) -> list[str]:
    """Names of pruned weights whose pruner keeps at most 2 of every 4 (``pattern`` N:4 with N <= 2)."""
    fits = {p.name for p in pruner_configs if (nm := nm_ratio(p.pattern)) is not None and nm[1] == 4 and nm[0] <= 2}
    return [t.name for t in targets if t.pruner in fits]


def to_semi_structured(model: nn.Module, names: list[str]) -> list[str]:
    """Replace the ``weight`` of each ``nn.Linear`` named in ``names`` by its semi-structured form.

    Checks the 2:4 pattern on the actual values first (every 4 consecutive
    input weights hold at most 2 non-zeros) and names the parameter if not.
    Returns the converted names. Non-Linear weights in ``names`` are left dense
    and reported by the caller.
    """
    from torch.sparse import to_sparse_semi_structured

    done = []
    for name in names:
        prefix, _, attr = name.rpartition(".")
        module = model.get_submodule(prefix) if prefix else model
        if not isinstance(module, nn.Linear) or attr != "weight":
            continue
        w = module.weight.detach()
        if not w.is_cuda:
            raise PruningError(f"{name}: is on {w.device}; move the model to CUDA before convert(semi_structured=True)")
        if w.shape[1] % 4 or int((w.reshape(-1, 4) != 0).sum(1).max()) > 2:
            raise PruningError(f"{name}: not 2:4 sparse along its input dimension (shape {tuple(w.shape)})")
        try:
            module.weight = nn.Parameter(to_sparse_semi_structured(w), requires_grad=False)
        except (RuntimeError, ValueError) as e:  # dtype/shape limits of the kernels
            raise PruningError(f"{name}: torch.sparse.to_sparse_semi_structured failed: {e}") from None
        done.append(name)
    return done
