"""One weight matrix, its input statistics and its pruner's settings -> the pruned matrix, written in place.

The three one-shot policies share the mask patterns of the training path
(:mod:`fxprune.masks`) and, for Wanda, its scoring (:mod:`fxprune.policies.wanda`):

- ``magnitude``: the lowest ``|w|`` (per tensor, or per group of M for N:M);
- ``wanda``: ``|w| * ||x_j||``, ranked within each output row (the paper's
  comparison group), exactly what the training path's Wanda policy scores;
- ``sparsegpt``: :func:`fxprune.oneshot.sparsegpt.sparsegpt_prune`, which
  also updates the weights that stay.

All work on the ``[out, in]`` view a read gives (:meth:`WeightRead.matrix`),
so ``N:M`` groups run along the input features of every layer kind (a
``Conv1D``'s ``[in, out]`` weight included).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fxprune.config import PrunerConfig, nm_ratio
from fxprune.errors import PruningError
from fxprune.masks import count_to_prune, global_unstructured_masks, nm_mask
from fxprune.oneshot.sparsegpt import sparsegpt_prune
from fxprune.oneshot.statistics import InputStatistics
from fxprune.policies.wanda import importance_from, row_ranks

__all__ = ["SolveResult", "prune_matrix", "check_width"]


@dataclass(frozen=True)
class SolveResult:
    zeros: int
    numel: int
    delta_energy: float | None  # ||X dW^T||^2 (None without statistics)
    energy: float | None  # ||X W^T||^2


def check_width(matrix_shape: tuple[int, int], pruner: PrunerConfig, name: str) -> None:
    """An N:M pattern needs the input width divisible by M; raise naming the weight otherwise."""
    nm = nm_ratio(pruner.pattern)
    if nm is not None and matrix_shape[1] % nm[1]:
        raise PruningError(
            f"weight {name!r}: pattern {pruner.pattern!r} (in {pruner.key_path}) needs its input width "
            f"{matrix_shape[1]} (matrix {matrix_shape[0]}x{matrix_shape[1]}) to be divisible by {nm[1]}; "
            "exclude this weight from the pruner or pick another M"
        )


_SLAB = 1024  # output rows scored at a time: temporaries of a slab, not of the whole matrix


def _magnitude_keep(matrix: torch.Tensor, pruner: PrunerConfig, name: str) -> torch.Tensor:
    """The lowest ``|w|`` of the matrix (ties by index), or of every group of M; float32 only per chunk.

    Per tensor the selection is :func:`fxprune.masks.global_unstructured_masks` over one tensor, which
    equals :func:`~fxprune.masks.local_unstructured_mask` but never sorts or copies the whole tensor.
    """
    nm = nm_ratio(pruner.pattern)
    if nm is not None:
        return torch.cat([
            nm_mask(m.abs().to(torch.float32), torch.ones(m.shape, dtype=torch.bool, device=m.device), *nm,
                    pruner.target_sparsity, name)
            for m in matrix.split(_SLAB)
        ])
    scores = matrix.detach().abs()
    ones = torch.ones(matrix.shape, dtype=torch.bool, device=matrix.device)
    return global_unstructured_masks([scores], [ones], pruner.target_sparsity)[0]


def _wanda_keep(matrix: torch.Tensor, sq_sum: torch.Tensor, pruner: PrunerConfig, name: str) -> torch.Tensor:
    """Wanda's mask: the training policy's selection (row ranks of ``|W| * ||x||``, lowest ranks pruned
    across the tensor, ties by flat index), computed a slab of rows at a time.

    Row ranks take each value ``r / in`` exactly once per row, so the ``k`` lowest over the tensor are
    every entry of rank below ``k // out`` plus the entries of rank ``k // out`` in the first
    ``k % out`` rows: no sort of the whole tensor. N:M compares within rows, so slabs are exact too.
    """
    out_f, in_f = matrix.shape
    nm = nm_ratio(pruner.pattern)
    k = count_to_prune(pruner.target_sparsity, matrix.numel())
    full, extra = divmod(k, out_f)
    keep = []
    for lo in range(0, out_f, _SLAB):
        imp = importance_from(matrix[lo : lo + _SLAB], sq_sum[None, :])
        ones = torch.ones(imp.shape, dtype=torch.bool, device=imp.device)
        if nm is not None:
            keep.append(nm_mask(imp, ones, *nm, pruner.target_sparsity, name))
            continue
        ranks = (row_ranks(imp, 0, ones) * in_f).round()  # integer ranks 0 .. in-1, as floats
        del imp
        rows = torch.arange(lo, lo + ranks.shape[0], device=ranks.device)[:, None]
        pruned = (ranks < full) | ((ranks == full) & (rows < extra))
        keep.append(~pruned)
    return torch.cat(keep)


@torch.no_grad()
def prune_matrix(
    matrix: torch.Tensor, pruner: PrunerConfig, stats: InputStatistics | None, name: str, *, last_use: bool = False
) -> SolveResult:
    """Prune ``matrix`` (an ``[out, in]`` view of the parameter) in place per ``pruner``'s policy.

    ``last_use``: no other weight will read ``stats`` afterwards, so SparseGPT may
    factorize its ``H`` in place (``stats`` is unusable after).
    """
    check_width(tuple(matrix.shape), pruner, name)
    policy = pruner.policy
    if policy in ("wanda", "sparsegpt") and stats is None:
        raise PruningError(f"weight {name!r}: {policy} needs calibration inputs")
    energy = delta = None
    if policy == "sparsegpt":
        assert stats is not None
        nm = nm_ratio(pruner.pattern)
        energy = stats.output_energy(matrix)
        live = stats.sq_sum > 0
        result = sparsegpt_prune(
            matrix,
            stats.hessian_sum(),
            pruner.target_sparsity,
            nm=nm,
            block_size=pruner.block_size,
            dampening=pruner.dampening_frac,
            name=name,
            overwrite_hessian=last_use,
        )
        if last_use:
            stats.h_sum = None  # holds the factorization now, not H
        new, _ = result
        # tr(dW H dW^T) = the solver's damped loss minus the damping's share (dead inputs excluded: H is 0 there).
        dw_sq = sum(
            float(torch.linalg.vector_norm((a.to(torch.float32) - b.to(torch.float32))[:, live])) ** 2
            for a, b in zip(matrix.split(_SLAB), new.split(_SLAB))
        )
        delta = max(result.damped_loss - result.damp * dw_sq, 0.0)
        matrix.copy_(new)
        del new, result
    elif policy in ("magnitude", "wanda"):
        if policy == "magnitude":
            keep = _magnitude_keep(matrix, pruner, name)
        else:
            assert stats is not None
            keep = _wanda_keep(matrix, stats.sq_sum, pruner, name)
        if stats is not None:
            energy = stats.output_energy(matrix)
            delta = stats.output_energy(matrix, ~keep)
        matrix.masked_fill_(~keep, 0)
    else:
        raise PruningError(f"weight {name!r}: policy {policy!r} is not a one-shot policy (magnitude, wanda, sparsegpt)")
    zeros = int(matrix.numel() - torch.count_nonzero(matrix))
    return SolveResult(zeros=zeros, numel=matrix.numel(), delta_energy=delta, energy=energy)
