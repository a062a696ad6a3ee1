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
from fxprune.masks import local_unstructured_mask, nm_mask
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


def _keep_mask(scores: torch.Tensor, pruner: PrunerConfig, name: str) -> torch.Tensor:
    ones = torch.ones_like(scores, dtype=torch.bool)
    nm = nm_ratio(pruner.pattern)
    if nm is not None:
        return nm_mask(scores, ones, nm[0], nm[1], pruner.target_sparsity, name)
    return local_unstructured_mask(scores, ones, pruner.target_sparsity)


@torch.no_grad()
def prune_matrix(matrix: torch.Tensor, pruner: PrunerConfig, stats: InputStatistics | None, name: str) -> SolveResult:
    """Prune ``matrix`` (an ``[out, in]`` view of the parameter) in place per ``pruner``'s policy."""
    check_width(tuple(matrix.shape), pruner, name)
    policy = pruner.policy
    if policy in ("wanda", "sparsegpt") and stats is None:
        raise PruningError(f"weight {name!r}: {policy} needs calibration inputs")
    energy = delta = None
    if policy == "sparsegpt":
        assert stats is not None
        nm = nm_ratio(pruner.pattern)
        energy = stats.output_energy(matrix)
        result = sparsegpt_prune(
            matrix,
            stats.hessian_sum(),
            pruner.target_sparsity,
            nm=nm,
            block_size=pruner.block_size,
            dampening=pruner.dampening_frac,
            name=name,
        )
        new, _ = result
        # tr(dW H dW^T) = the solver's damped loss minus the damping's share (dead inputs excluded: H is 0 there).
        live = (stats.sq_sum > 0).to(torch.float32)
        dw_sq = float(((matrix.to(torch.float32) - new.to(torch.float32)).square() * live).sum(dtype=torch.float64))
        delta = max(result.damped_loss - result.damp * dw_sq, 0.0)
        matrix.copy_(new)
        del new, result
    elif policy in ("magnitude", "wanda"):
        if policy == "magnitude":
            scores = matrix.detach().abs().to(torch.float32)
        else:
            assert stats is not None
            scores = row_ranks(importance_from(matrix, stats.sq_sum[None, :]), 0, torch.ones(matrix.shape, dtype=torch.bool))
        keep = _keep_mask(scores, pruner, name)
        del scores
        if stats is not None:
            energy = stats.output_energy(matrix)
            delta = stats.output_energy(matrix.to(torch.float32) * ~keep)
        matrix.masked_fill_(~keep, 0)
    else:
        raise PruningError(f"weight {name!r}: policy {policy!r} is not a one-shot policy (magnitude, wanda, sparsegpt)")
    zeros = int(matrix.numel() - torch.count_nonzero(matrix))
    return SolveResult(zeros=zeros, numel=matrix.numel(), delta_energy=delta, energy=energy)
