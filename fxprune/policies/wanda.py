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
  taken over batch and positions); for a stacked-experts parameter
  (transformers 5 MoE: ``[E, out, in]``, or ``[E, in, out]``) one slice per
  expert, ``[E, 1, in]`` (``[E, in, 1]``), each from the tokens routed to it;
- ``rows``: how many input vectors (tokens, positions) were seen -- a vector
  ``[E]`` (per expert) for stacked experts, a scalar otherwise;
- ``out_dim``: the weight dimension that indexes outputs (the comparison rows;
  for stacked experts each output row of each expert is its own group).

What a weight multiplied is observed by :mod:`fxprune.observe`, whatever op
reads it (``nn.Linear``, ``addmm`` of Hugging Face ``Conv1D``, ``x @ W.T``,
``W @ x``, convolutions, per-expert slices, ``bmm`` / grouped mm over experts).

Difference from the paper's code: activations come from one pass through the
current model, not layer by layer through already-pruned layers.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from fxprune.masked import MaskedParameter
from fxprune.policies.base import Policy, PolicyNotReady, PolicyState

if TYPE_CHECKING:
    from fxprune.weight_read import WeightRead

__all__ = ["WandaPolicy", "WandaState", "wanda_importance", "importance_from", "row_ranks"]


class WandaState(PolicyState):
    """Input-feature statistics of one weight. Empty until :func:`fxprune.calibrate` runs."""

    def __init__(self, device: torch.device | None = None):
        super().__init__()
        # The shape depends on the layer that consumes the weight, known only when calibrating,
        # so sq_sum starts empty and takes the shape of whatever is recorded or loaded.
        self.register_buffer("sq_sum", torch.zeros(0, dtype=torch.float64, device=device))
        self.register_buffer("rows", torch.zeros((), dtype=torch.long, device=device))
        self.register_buffer("out_dim", torch.zeros((), dtype=torch.long, device=device))

    @property
    def per_expert(self) -> bool:
        """True for a stacked-experts weight: statistics (and ``rows``) are kept per expert (dim 0)."""
        return self.rows.dim() == 1

    def seen(self) -> int:
        """Input vectors recorded so far (over all experts)."""
        return int(self.rows.sum())

    @torch.no_grad()
    def reset(self) -> None:
        """Forget every recorded batch."""
        self.sq_sum = torch.zeros(0, dtype=self.sq_sum.dtype, device=self.sq_sum.device)
        self.rows = torch.zeros((), dtype=self.rows.dtype, device=self.rows.device)
        self.out_dim.zero_()

    @torch.no_grad()
    def record(self, sq_sum: torch.Tensor, rows: int, out_dim: int, where: str, expert: int | None = None,
               experts: int = 0) -> None:
        """Add one observed input: ``sq_sum`` in the broadcast layout above, over ``rows`` input vectors.

        For a stacked-experts weight ``[experts, ...]``, ``expert`` says which
        expert the rows went to and ``sq_sum`` is laid out against that
        expert's slice (``[1, in]`` for ``[E, out, in]``). All inputs of one
        weight must agree on the layout; ``where`` names the consumer for the
        error otherwise.
        """
        sq_sum = sq_sum.to(device=self.sq_sum.device, dtype=self.sq_sum.dtype)
        shape = ((experts,) if expert is not None else ()) + tuple(sq_sum.shape)
        if self.seen() == 0:
            self.sq_sum = torch.zeros(shape, dtype=self.sq_sum.dtype, device=self.sq_sum.device)
            self.rows = torch.zeros((experts,) if expert is not None else (), dtype=self.rows.dtype,
                                    device=self.rows.device)
            self.out_dim.fill_(out_dim)
        elif tuple(self.sq_sum.shape) != shape or int(self.out_dim) != out_dim or self.per_expert != (
                expert is not None):
            raise ValueError(
                f"{where} reads this weight with a different layout (input-feature shape {shape}, output dim "
                f"{out_dim}{', per expert' if expert is not None else ''}) than an earlier reader "
                f"({tuple(self.sq_sum.shape)}, output dim {int(self.out_dim)}"
                f"{', per expert' if self.per_expert else ''})"
            )
        if expert is None:
            self.sq_sum.add_(sq_sum)
            self.rows += int(rows)
        else:
            self.sq_sum[expert].add_(sq_sum)
            self.rows[expert] += int(rows)

    @torch.no_grad()
    def record_read(self, read: "WeightRead", where: str) -> None:
        """Add one :class:`~fxprune.observe.WeightRead` of this weight (``read.weight_shape`` is the weight's)."""
        shape = read.weight_shape
        sq = read.feature_sq_sums()
        if read.kind == "conv":
            # Input features are channels; output o of group g reads channels g*in_per_group ... (g+1)*in_per_group-1.
            out, in_per_group = shape[0], shape[1]
            groups = sq.numel() // in_per_group
            grid = sq.reshape(groups, 1, in_per_group).expand(groups, out // groups, in_per_group)
            self.record(grid.reshape(out, in_per_group, *([1] * (len(shape) - 2))), read.n_rows, 0, where)
            return
        expert_shape = shape[1:] if read.expert is not None else shape
        shift = 1 if read.expert is not None else 0
        layout = [1] * len(expert_shape)
        layout[read.in_dim - shift] = expert_shape[read.in_dim - shift]
        self.record(sq.reshape(layout), read.n_rows, read.out_dim, where, read.expert, shape[0])

    def merge_problem(self, other: "WandaState") -> str | None:
        """Why ``other`` cannot be added to these statistics (a different layout), or None."""
        if other.seen() == 0 or self.seen() == 0:
            return None
        if (self.sq_sum.shape != other.sq_sum.shape or self.rows.shape != other.rows.shape
                or int(self.out_dim) != int(other.out_dim)):
            return (f"the new calibration has a different layout ({tuple(other.sq_sum.shape)}, output dim "
                    f"{int(other.out_dim)}) than the statistics already recorded ({tuple(self.sq_sum.shape)}, "
                    f"output dim {int(self.out_dim)})")
        return None

    @torch.no_grad()
    def merge(self, other: "WandaState") -> None:
        """Add the statistics recorded in ``other`` (same layout, see :meth:`merge_problem`) to these."""
        problem = self.merge_problem(other)
        if problem:
            raise ValueError(problem)
        if other.seen() == 0:
            return
        if self.seen() == 0:
            self.sq_sum = other.sq_sum.to(self.sq_sum.device).clone()
            self.rows = other.rows.to(self.rows.device).clone()
            self.out_dim.fill_(int(other.out_dim))
            return
        self.sq_sum.add_(other.sq_sum.to(self.sq_sum.device))
        self.rows += other.rows.to(self.rows.device)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: D401 - torch hook
        for key in ("sq_sum", "rows"):
            loaded, mine = state_dict.get(prefix + key), getattr(self, key)
            if isinstance(loaded, torch.Tensor) and loaded.shape != mine.shape:
                # Take the shape of the calibrated statistics being loaded (a fresh prepare has none yet;
                # a stacked-experts weight keeps rows per expert).
                setattr(self, key, torch.zeros(loaded.shape, dtype=mine.dtype, device=mine.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        experts = f", experts={self.rows.shape[0]}" if self.per_expert else ""
        return f"rows={self.seen()}, features={tuple(self.sq_sum.shape)}{experts}"


def wanda_importance(masked: MaskedParameter) -> torch.Tensor:
    """``|W| * ||X_j||_2`` for every entry (the paper's metric, before the per-row comparison)."""
    state: WandaState = masked.wanda
    if state.seen() == 0:
        raise PolicyNotReady(
            "wanda has no activation statistics: run fxprune.calibrate(prepared, batches) "
            "before the mask update that prunes with wanda"
        )
    if state.per_expert and bool((state.rows == 0).any()):
        unseen = (state.rows == 0).nonzero().reshape(-1).tolist()
        raise PolicyNotReady(
            f"wanda has no activation statistics for expert(s) {unseen} of this stacked-experts weight (no "
            "calibration token was routed to them): calibrate with more batches or exclude the weight"
        )
    return importance_from(masked.param, state.sq_sum)


def importance_from(weight: torch.Tensor, sq_sum: torch.Tensor) -> torch.Tensor:
    """``|W| * sqrt(sq_sum)``, with ``sq_sum`` broadcast against ``weight`` (float32, float64 for float64)."""
    w = weight.detach()
    dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
    return w.abs().to(dtype) * sq_sum.sqrt().to(dtype)


def row_ranks(importance: torch.Tensor, out_dim: int, mask: torch.Tensor,
              expert_dim: int | None = None) -> torch.Tensor:
    """Rank of each entry within its output row, divided by the row length (in ``[0, 1)``).

    Already-pruned entries rank lowest, so a row's pruned entries are the
    first ones counted towards its goal (masks stay monotone). Ties within a
    row go by index. With ``expert_dim`` (stacked experts), a row is one
    output row of one expert.
    """
    groups = [out_dim] if expert_dim is None else [expert_dim, out_dim]
    front = list(range(len(groups)))
    imp = importance.movedim(groups, front)
    shape = imp.shape
    n_groups = math.prod(shape[:len(groups)])
    flat = imp.reshape(n_groups, -1).clone()
    length = flat.shape[1]
    flat = torch.nan_to_num(flat, nan=math.inf)
    flat[~mask.movedim(groups, front).reshape(n_groups, -1)] = -math.inf
    order = torch.argsort(flat, dim=1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(length, device=order.device).expand_as(order))
    return (ranks.to(torch.float32) / length).reshape(shape).movedim(front, groups)


class WandaPolicy(Policy):
    """|W| * ||X||_2, compared within each output row; needs :func:`fxprune.calibrate`."""

    name = "wanda"

    def attach(self, masked: MaskedParameter) -> None:
        masked.add_module("wanda", WandaState(masked.param.device))

    def scores(self, masked: MaskedParameter) -> torch.Tensor:
        state: WandaState = masked.wanda
        return row_ranks(wanda_importance(masked), int(state.out_dim), masked.mask, 0 if state.per_expert else None)
