"""What one-shot pruners need to know about a weight's inputs, gathered from :mod:`fxprune.observe` reads.

Every solver works on the input rows ``X`` (``[n, in]``) a weight multiplied:
SparseGPT needs ``H = X^T X``, Wanda the per-feature sums of squares (the
diagonal of ``H``), and every method's report needs the reconstruction error
``||X dW^T||^2 / ||X W^T||^2``. This module keeps, per *input group*, the
cheapest form of ``X`` that answers those questions:

- weights that multiply the very same rows (q/k/v projections of one
  attention, gate/up of one MLP) share one group, so ``H`` is computed and
  stored once for them (three to one for q/k/v). Groups are found by
  comparing the rows of the reads of one batch (same tensor, or equal
  values); a group that stops agreeing later is split;
- while a group that needs no ``H`` (Wanda, magnitude) has seen at most
  ``in`` rows, the rows themselves are kept (float32, no larger than ``H``
  would be): the error then costs one ``[n, in] x [in, out]`` product instead
  of ``[out, in] x [in, in]``, and Wanda needs no ``H`` at all. Past ``in``
  rows, or as soon as a member needs ``H`` (SparseGPT), the rows are folded
  into ``H`` and only ``H`` is kept: keeping both would hold one block's
  largest input twice (down_proj of a 1B Llama: 92 MB of rows beside a 127 MB
  ``H``). The error is then computed from ``H``: ``tr(dW H dW^T) / tr(W H W^T)``.

``H`` is the plain sum ``sum_x x x^T`` in float32 (its scale cancels in every
use). Keys are ``(weight name, expert index or None)``: a stacked-experts
parameter has one key per expert, with only the tokens routed to it.
"""
from __future__ import annotations

from typing import Callable, Hashable

import torch

from fxprune.errors import PruningError

__all__ = ["InputStatistics", "InputCollector", "ReadKey"]

ReadKey = tuple[str, "int | None"]


class InputStatistics:
    """Statistics of the rows one group of weights multiplied."""

    def __init__(self, in_features: int, *, hessian: bool, device: torch.device):
        self.in_features = in_features
        self.device = device
        self.n_rows = 0
        self.rows: list[torch.Tensor] | None = []  # kept (float32) while n_rows <= in_features
        self.h_sum: torch.Tensor | None = None
        self.wants_hessian = hessian
        if hessian:
            self.h_sum = self._zeros()

    def _zeros(self) -> torch.Tensor:
        return torch.zeros(self.in_features, self.in_features, dtype=torch.float32, device=self.device)

    def add(self, rows: torch.Tensor) -> None:
        """Fold in one read's rows (``[n, in]`` float32; kept by reference, not copied)."""
        self.n_rows += rows.shape[0]
        if self.h_sum is not None:
            self.h_sum.addmm_(rows.t(), rows)
            self.rows = None
        elif self.rows is not None:
            self.rows.append(rows)
            if self.n_rows > self.in_features:  # H is now the smaller form: keep only it
                self.hessian_sum()

    def without(self, rows: torch.Tensor) -> "InputStatistics":
        """A copy without one earlier :meth:`add` of ``rows`` (to split a group; ``H`` up to float32 rounding)."""
        other = InputStatistics(self.in_features, hessian=False, device=self.device)
        other.wants_hessian = self.wants_hessian
        other.n_rows = self.n_rows - rows.shape[0]
        if self.rows is not None:
            kept = list(self.rows)
            for i in range(len(kept) - 1, -1, -1):
                if kept[i] is rows or (kept[i].shape == rows.shape and torch.equal(kept[i], rows)):
                    del kept[i]
                    break
            other.rows = kept
        else:
            other.rows = None
        if self.h_sum is not None:
            other.h_sum = self.h_sum - rows.t() @ rows
        return other

    def hessian_sum(self) -> torch.Tensor:
        """``sum_x x x^T`` (float32, not a copy); built from the kept rows if it was not accumulated."""
        if self.h_sum is None:
            self.h_sum = self._zeros()
            for r in self.rows or ():
                self.h_sum.addmm_(r.t(), r)
        self.rows = None  # folded in: from now on only H is kept
        return self.h_sum

    @property
    def sq_sum(self) -> torch.Tensor:
        """Per input feature, the sum of squares over all rows (float64): Wanda's ``||x_j||^2``."""
        if self.h_sum is not None:
            return torch.diagonal(self.h_sum).to(torch.float64)
        total = torch.zeros(self.in_features, dtype=torch.float64, device=self.device)
        for r in self.rows or ():
            total += r.square().sum(0, dtype=torch.float64)
        return total

    def output_energy(self, weight: torch.Tensor, keep: torch.Tensor | None = None) -> float:
        """``||X W^T||^2`` for ``weight`` ``[out, in]`` (any dtype; with ``keep``, of ``W * keep``).

        From the kept rows or from ``H``, a slab of output rows at a time so that no float32 copy of the
        whole weight is needed.
        """
        total = 0.0
        for lo in range(0, weight.shape[0], _SLAB):
            w = weight[lo : lo + _SLAB].to(torch.float32)
            if keep is not None:
                w = w * keep[lo : lo + _SLAB]
            if self.rows is not None:
                total += sum(float(torch.linalg.vector_norm(r @ w.t())) ** 2 for r in self.rows)
            else:
                assert self.h_sum is not None
                total += float(torch.vdot((w @ self.h_sum).flatten(), w.flatten()))
        return total


_SLAB = 256  # output rows per float32 slab (two slab-sized temporaries: 6 MB for a 5632-wide input)


class InputCollector:
    """The ``on_read`` callback for :class:`fxprune.observe.WeightInputObserver`: reads -> grouped statistics.

    ``hessian_for(key)`` says whether the weight's solver needs ``H`` (SparseGPT).
    Call :meth:`end_batch` after every forward call of the observed module.
    """

    def __init__(self, hessian_for: Callable[[ReadKey], bool]):
        self.hessian_for = hessian_for
        self.group_of: dict[Hashable, InputStatistics] = {}
        self.reads: dict[Hashable, object] = {}  # key -> one WeightRead, for its matrix() view
        self.rows_seen: dict[Hashable, int] = {}
        self._batch = 0
        self._fed: dict[int, tuple[InputStatistics, torch.Tensor]] = {}  # id(group) -> (group, rows) this batch
        self._created: set[int] = set()  # groups created in this batch
        self._read_now: set[Hashable] = set()

    def members(self, group: InputStatistics) -> list[Hashable]:
        return [k for k, g in self.group_of.items() if g is group]

    def __call__(self, read) -> None:
        key = (read.name, read.expert)
        rows = read.rows()
        if rows.dim() != 2:
            raise PruningError(f"weight {read.name!r}: the observer gave rows of shape {tuple(rows.shape)}, not 2-D")
        self.reads[key] = read
        self.rows_seen[key] = self.rows_seen.get(key, 0) + rows.shape[0]
        group = self.group_of.get(key)
        twice = key in self._read_now
        self._read_now.add(key)
        if group is None:
            for gid, (g, fed_rows) in self._fed.items():
                if gid in self._created and _same_rows(fed_rows, rows):
                    self.group_of[key] = g  # first seen together with this group: share it
                    g.wants_hessian |= self.hessian_for(key)
                    if g.wants_hessian and g.h_sum is None and g.rows is not None:
                        g.hessian_sum()  # materialize so that later batches accumulate it
                    return
            group = InputStatistics(rows.shape[1], hessian=self.hessian_for(key), device=rows.device)
            self.group_of[key] = group
            self._created.add(id(group))
            self._feed(group, rows)
            return
        fed = self._fed.get(id(group))
        if fed is None:
            self._feed(group, rows)
        elif twice or not _same_rows(fed[1], rows):
            # This read differs from the group's this batch (or is a second read): the key gets its own group.
            if len(self.members(group)) > 1 or not twice:
                own = group.without(fed[1]) if not twice else group.without(rows[:0])
                self.group_of[key] = own
                group = own
            self._feed(group, rows)

    def _feed(self, group: InputStatistics, rows: torch.Tensor) -> None:
        # A copy: for a float32 model rows() may be the op's own input, which the model can modify in place later.
        rows = rows.clone()
        group.add(rows)
        self._fed[id(group)] = (group, rows)

    def end_batch(self) -> None:
        """Members of a group fed this batch that were not read themselves get the group minus this batch."""
        for gid, (group, rows) in self._fed.items():
            absent = [k for k in self.members(group) if k not in self._read_now]
            if absent and len(absent) < len(self.members(group)):
                own = group.without(rows)
                for k in absent:
                    self.group_of[k] = own
        self._fed.clear()
        self._created.clear()
        self._read_now.clear()
        self._batch += 1

    def pop_group(self, key: Hashable) -> InputStatistics | None:
        """Forget ``key``; returns its statistics (freed by the caller once no other key holds them)."""
        return self.group_of.pop(key, None)


def _same_rows(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        return False
    return (a.data_ptr() == b.data_ptr() and a.stride() == b.stride()) or torch.equal(a, b)
