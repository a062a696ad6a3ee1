"""SparseGPT: prune one weight matrix and update the rest to reconstruct its outputs.

Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately
Pruned in One-Shot" (Algorithm 1). For a layer ``Y = X W^T`` with calibration
inputs ``X`` (``n`` rows, ``in`` features), the squared reconstruction error of
any new weight ``W'`` is ``tr((W - W') H (W - W')^T)`` with ``H = X^T X``.
Removing weight ``w_ij`` costs ``w_ij^2 / [H_F^-1]_jj`` (optimal brain
surgeon, ``F`` the columns not yet processed), and the best compensation
moves the remaining weights of its row along row ``j`` of ``H_F^-1``. Going
through the columns left to right, ``[H_F^-1]`` for every ``F`` is one row of
the upper Cholesky factor ``U`` of ``H^-1`` (``H^-1 = U^T U``), so the whole
matrix is processed with one factorization. Columns are taken in blocks of
``block_size``: inside a block the updates are applied column by column, to
the block only; the rest of the matrix receives the block's accumulated
errors in one matrix product (the paper's lazy batched update).

Mask selection, as the paper and its reference code do it: for unstructured
sparsity the mask of a block is chosen when the block starts, as the lowest
``w^2 / U_jj^2`` of the block (weights already updated by earlier blocks), so
the sparsity adapts column block by column block; the per-block counts add
up to exactly ``sparsity`` of the matrix. For ``N:M`` the ``M - N`` lowest of
each group of ``M`` consecutive input columns are chosen when the group is
reached, with :func:`fxprune.masks.nm_mask` (the block size is rounded up to
a multiple of ``M`` so that no group straddles two blocks).

Details that matter in practice:

- the Hessian's scale does not matter (the mask and the update are invariant
  to it, and dampening is relative): :mod:`fxprune.oneshot.solve` passes the
  plain sum ``sum_x x x^T`` (the paper's ``2/n`` factor would change nothing);
- inputs that are always zero (``H_jj == 0``) carry no information: their
  diagonal is set to 1 and their weights to 0, as in the paper's code;
- dampening adds ``dampening * mean(diag H)`` to the diagonal, so that ``H``
  is invertible when there are fewer calibration rows than features;
- the solve runs in float32 whatever the weight's dtype; the result is
  written back in the weight's dtype.
"""
from __future__ import annotations

import torch

from fxprune.errors import PruningError
from fxprune.masks import count_to_prune, local_unstructured_mask, nm_mask

__all__ = ["SparseGPTResult", "sparsegpt_prune"]


class SparseGPTResult(tuple):
    """``(new_weight, mask)`` plus ``damped_loss``: ``tr(dW (H + damp I) dW^T)`` of the result.

    The loss comes for free from the algorithm: with ``H_d^-1 = U^T U`` each
    row's error is the sum of its squared per-column errors ``(w - q)^2 / U_jj^2``.
    """

    damped_loss: float
    damp: float

    def __new__(cls, weight: torch.Tensor, mask: torch.Tensor, damped_loss: float, damp: float):
        obj = super().__new__(cls, (weight, mask))
        obj.damped_loss, obj.damp = damped_loss, damp
        return obj


def _inverse_cholesky(h: torch.Tensor, name: str) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``h^-1``, computed in ``h``'s own storage (only one ``[in, in]`` matrix).

    Only the upper triangle of the result is meaningful (the lower one holds leftovers).
    """
    info = torch.empty((), dtype=torch.int32, device=h.device)
    torch.linalg.cholesky_ex(h, out=(h, info))
    if int(info) != 0:
        raise PruningError(
            f"{name}: the damped Hessian of its calibration inputs is not positive definite (Cholesky failed at "
            f"column {int(info) - 1}); raise dampening_frac or use more calibration data"
        )
    torch.cholesky_inverse(h, out=h)
    torch.linalg.cholesky_ex(h, upper=True, out=(h, info))
    if int(info) != 0:
        raise PruningError(f"{name}: the inverse Hessian is not positive definite; raise dampening_frac")
    return h


@torch.no_grad()
def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    *,
    nm: tuple[int, int] | None = None,
    block_size: int = 128,
    dampening: float = 0.01,
    name: str = "weight",
    overwrite_hessian: bool = False,
) -> SparseGPTResult:
    """Prune ``weight`` ``[out, in]`` given ``hessian`` ``[in, in]``; returns ``(new_weight, keep_mask)``.

    Neither input is modified, unless ``overwrite_hessian`` (a float32
    ``hessian`` the caller no longer needs): then the factorization is done in
    its storage instead of a copy, one ``[in, in]`` matrix less at the peak
    (127 MB for a 1B Llama's down_proj). ``nm=(n, m)`` selects an N:M pattern
    (at most ``n`` of every ``m`` consecutive inputs kept per row; ``sparsity``
    is then ``1 - n/m``); otherwise exactly ``sparsity`` of the entries are
    pruned. ``name`` is used in error messages.
    """
    out_features, in_features = weight.shape
    if tuple(hessian.shape) != (in_features, in_features):
        raise PruningError(f"{name}: Hessian shape {tuple(hessian.shape)} does not match weight {tuple(weight.shape)}")
    if nm is not None and in_features % nm[1]:
        raise PruningError(f"{name}: pattern {nm[0]}:{nm[1]} needs the input width {in_features} divisible by {nm[1]}")
    # Transposed, so that the inner loop walks contiguous rows (one per input column).
    wt = torch.empty(in_features, out_features, dtype=torch.float32, device=weight.device)
    wt.copy_(weight.detach().t())  # [in, out], one float32 copy
    h = hessian.detach() if overwrite_hessian and hessian.dtype == torch.float32 else hessian.detach().to(torch.float32, copy=True)
    diag = torch.diagonal(h)
    dead = diag == 0
    diag[dead] = 1.0
    wt[dead] = 0.0
    damp = float(dampening * diag.mean())
    diag += damp
    u = _inverse_cholesky(h, name)
    del diag
    if nm is not None:  # a group of M columns must lie inside one block, where updates are applied eagerly
        block_size = -(-block_size // nm[1]) * nm[1]
    keep = torch.ones(in_features, out_features, dtype=torch.bool, device=wt.device)
    numel = weight.numel()
    loss = torch.zeros((), dtype=torch.float64, device=wt.device)
    for i1 in range(0, in_features, block_size):
        i2 = min(i1 + block_size, in_features)
        w1, k1, u1 = wt[i1:i2], keep[i1:i2], u[i1:i2, i1:i2]
        d = torch.diagonal(u1)
        err1 = torch.empty_like(w1)
        if nm is None:  # this block's share of the count, rounded so that the shares add up exactly
            k = count_to_prune(sparsity, i2 * out_features) - count_to_prune(sparsity, i1 * out_features)
            if k:
                scores = w1.square() / d.square()[:, None]
                k1.copy_(local_unstructured_mask(scores, k1, k / scores.numel()))
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                n, m = nm
                scores = (w1[i : i + m].square() / d[i : i + m].square()[:, None]).t()
                k1[i : i + m] = nm_mask(scores, torch.ones_like(scores, dtype=torch.bool), n, m, 1 - n / m, name).t()
            w = w1[i]
            err = torch.where(k1[i], 0.0, w) / d[i]
            w1[i + 1 :].addr_(u1[i, i + 1 :], err, alpha=-1.0)
            w.masked_fill_(~k1[i], 0.0)
            err1[i] = err
        loss += err1.double().square().sum()
        if i2 < in_features:
            wt[i2:].addmm_(u[i1:i2, i2:].t(), err1, alpha=-1.0)
    assert nm is not None or int((~keep).sum()) == count_to_prune(sparsity, numel)
    return SparseGPTResult(wt.t().to(weight.dtype), keep.t().contiguous(), float(loss), damp)
