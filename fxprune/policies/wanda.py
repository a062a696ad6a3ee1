"""Wanda: pruning by weights and activations (Sun, Liu, Bair & Kolter 2023,
"A Simple and Effective Pruning Approach for Large Language Models").

A weight matters as much as what flows through it: entry ``W[i, j]`` of a
linear layer multiplies input feature ``j``, so Wanda scores it by
``|W[i, j]| * ||X_j||_2``, the L2 norm of feature ``j`` over every token of a
few calibration batches. Language models have a handful of input features
with huge activations; magnitude pruning cuts their small-looking weights,
Wanda keeps them. No retraining and no weight update: one calibration pass,
one mask.

Comparison group: each output row keeps the same fraction of its entries
(the paper's per-output comparison, which it found clearly better than one
threshold per layer). fxprune's mask selection compares scores across a
whole tensor, so :meth:`WandaPolicy.scores` returns each entry's rank within
its output row, divided by the row length. Ranks keep every within-row order
(so ``N:M`` patterns pick the same entries as with the raw products), and a
per-tensor threshold on them prunes the lowest-ranked entries of every row
alike: with ``sparsity * row_length`` an integer, every row loses exactly that
many. :func:`wanda_importance` gives the raw ``|W| * ||X||`` products.

State (``<weight>.wanda.*`` in the prepared model's ``state_dict()``), filled
by :func:`fxprune.calibrate`:

- ``sq_sum``: per-input-feature sum of squares, shaped to broadcast against
  the weight (``[1, in]`` for ``nn.Linear``, ``[in, 1]`` for Hugging Face
  ``Conv1D`` whose weight is ``[in, out]``, ``[out, in/groups, 1, ...]`` for
  convolutions, whose input features are channels: the norm of a channel is
  taken over batch and positions);
- ``rows``: how many input vectors (tokens, positions) were seen;
- ``out_dim``: the weight dimension that indexes outputs (the comparison rows).

Difference from the paper's code: activations come from one pass through the
current model, not layer by layer through already-pruned layers.
"""
from __future__ import annotations

import math

import torch

from fxprune.masked import MaskedParameter
from fxprune.policies.base import Policy, PolicyNotReady, PolicyState

__all__ = ["WandaPolicy", "WandaState", "wanda_importance", "importance_from", "row_ranks", "feature_sq_sums"]


class WandaState(PolicyState):
    """Input-feature statistics of one weight. Empty until :func:`fxprune.calibrate` runs."""

    def __init__(self, device: torch.device | None = None):
        super().__init__()
        # The shape depends on the layer that consumes the weight, known only when calibrating,
        # so sq_sum starts empty and takes the shape of whatever is recorded or loaded.
        self.register_buffer("sq_sum", torch.zeros(0, dtype=torch.float64, device=device))
        self.register_buffer("rows", torch.zeros((), dtype=torch.long, device=device))
        self.register_buffer("out_dim", torch.zeros((), dtype=torch.long, device=device))

    @torch.no_grad()
    def reset(self) -> None:
        """Forget every recorded batch."""
        self.sq_sum = torch.zeros(0, dtype=self.sq_sum.dtype, device=self.sq_sum.device)
        self.rows.zero_()
        self.out_dim.zero_()

    @torch.no_grad()
    def record(self, sq_sum: torch.Tensor, rows: int, out_dim: int, where: str) -> None:
        """Add one observed input: ``sq_sum`` in the broadcast layout above, over ``rows`` input vectors.

        All inputs of one weight must agree on the layout; ``where`` names the
        consumer for the error otherwise.
        """
        if int(self.rows) == 0:
            self.sq_sum = sq_sum.to(self.sq_sum.dtype).clone()
            self.out_dim.fill_(out_dim)
        else:
            if tuple(self.sq_sum.shape) != tuple(sq_sum.shape) or int(self.out_dim) != out_dim:
                raise ValueError(
                    f"{where} reads this weight with a different layout (input-feature shape "
                    f"{tuple(sq_sum.shape)}, output dim {out_dim}) than an earlier reader "
                    f"({tuple(self.sq_sum.shape)}, output dim {int(self.out_dim)})"
                )
            self.sq_sum.add_(sq_sum.to(self.sq_sum.dtype))
        self.rows += int(rows)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: D401 - torch hook
        loaded = state_dict.get(prefix + "sq_sum")
        if isinstance(loaded, torch.Tensor) and loaded.shape != self.sq_sum.shape:
            # Take the shape of the calibrated statistics being loaded (a fresh prepare has none yet).
            self.sq_sum = torch.zeros(loaded.shape, dtype=self.sq_sum.dtype, device=self.sq_sum.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"rows={int(self.rows)}, features={tuple(self.sq_sum.shape)}"


def feature_sq_sums(kind: str, x: torch.Tensor, weight_shape: torch.Size, groups: int = 1) -> tuple[torch.Tensor, int]:
    """Per-input-feature sum of squares of ``x`` in the layout of :class:`WandaState`, and the row count.

    ``kind`` is the consumer: ``linear`` (``x @ W.T``, W ``[out, in]``),
    ``conv1d_hf`` (``x @ W``, W ``[in, out]``, Hugging Face ``Conv1D``), or
    ``conv`` (``F.convNd``, W ``[out, in/groups, *kernel]``, x ``[N, C, *spatial]``
    or unbatched ``[C, *spatial]``).
    """
    acc = torch.promote_types(x.dtype, torch.float32)
    if kind in ("linear", "conv1d_hf"):
        features = x.shape[-1]
        flat = x.detach().reshape(-1, features).to(acc)
        sq = flat.pow(2).sum(0).to(torch.float64)
        return (sq.reshape(1, features) if kind == "linear" else sq.reshape(features, 1)), flat.shape[0]
    if kind == "conv":
        spatial = len(weight_shape) - 2
        channel_dim = 1 if x.dim() == spatial + 2 else 0
        channels = x.shape[channel_dim]
        xc = x.detach().movedim(channel_dim, 0).reshape(channels, -1).to(acc)
        per_channel = xc.pow(2).sum(1).to(torch.float64)
        out, in_per_group = weight_shape[0], weight_shape[1]
        # Output o of group g reads channels g*in_per_group ... (g+1)*in_per_group - 1.
        grid = per_channel.reshape(groups, 1, in_per_group).expand(groups, out // groups, in_per_group)
        return grid.reshape(out, in_per_group, *([1] * spatial)).clone(), xc.shape[1]
    raise ValueError(f"unknown consumer kind {kind!r}")


def wanda_importance(masked: MaskedParameter) -> torch.Tensor:
    """``|W| * ||X_j||_2`` for every entry (the paper's metric, before the per-row comparison)."""
    state: WandaState = masked.wanda
    if int(state.rows) == 0:
        raise PolicyNotReady(
            "wanda has no activation statistics: run fxprune.calibrate(prepared, batches) "
            "before the mask update that prunes with wanda"
        )
    return importance_from(masked.param, state.sq_sum)


def importance_from(weight: torch.Tensor, sq_sum: torch.Tensor) -> torch.Tensor:
    """``|W| * sqrt(sq_sum)``, with ``sq_sum`` broadcast against ``weight`` (float32, float64 for float64)."""
    w = weight.detach()
    dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
    return w.abs().to(dtype) * sq_sum.sqrt().to(dtype)


def row_ranks(importance: torch.Tensor, out_dim: int, mask: torch.Tensor) -> torch.Tensor:
    """Rank of each entry within its output row, divided by the row length (in ``[0, 1)``).

    Already-pruned entries rank lowest, so a row's pruned entries are the
    first ones counted towards its goal (masks stay monotone). Ties within a
    row go by index.
    """
    imp = importance.movedim(out_dim, 0)
    shape = imp.shape
    flat = imp.reshape(shape[0], -1).clone()
    length = flat.shape[1]
    flat = torch.nan_to_num(flat, nan=math.inf)
    flat[~mask.movedim(out_dim, 0).reshape(shape[0], -1)] = -math.inf
    order = torch.argsort(flat, dim=1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(length, device=order.device).expand_as(order))
    return (ranks.to(torch.float32) / length).reshape(shape).movedim(0, out_dim)


class WandaPolicy(Policy):
    """|W| * ||X||_2, compared within each output row; needs :func:`fxprune.calibrate`."""

    name = "wanda"

    def attach(self, masked: MaskedParameter) -> None:
        masked.add_module("wanda", WandaState(masked.param.device))

    def scores(self, masked: MaskedParameter) -> torch.Tensor:
        return row_ranks(wanda_importance(masked), int(masked.wanda.out_dim), masked.mask)
