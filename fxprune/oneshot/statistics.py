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
- while a group has seen at most ``in`` rows, the rows themselves are kept
  (in the weight's dtype, so nothing is lost for a bf16 model): the error
  then costs one ``[n, in] x [in, out]`` product instead of ``[out, in] x
  [in, in]``, and Wanda needs no ``H`` at all. Past ``in`` rows the rows are
  folded into ``H`` (smaller from then on) and the error is computed from it:
  ``tr(dW H dW^T) / tr(W H W^T)``.

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

    def __init__(self, in_features: int, *, hessian: bool, store_dtype: torch.dtype, device: torch.device):
        self.in_features = in_features
        self.store_dtype = store_dtype
        self.n_rows = 0
        self.sq_sum = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.rows: list[torch.Tensor] | None = []  # kept while n_rows <= in_features
        self.h_sum: torch.Tensor | None = None
        self.wants_hessian = hessian
        if hessian:
            self.h_sum = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)

    def add(self, rows: torch.Tensor) -> None:
        """Fold in one read's rows (``[n, in]`` float32)."""
        self.n_rows += rows.shape[0]
        self.sq_sum += rows.square().sum(0, dtype=torch.float64)
        if self.h_sum is not None:
            self.h_sum.addmm_(rows.t(), rows)
        if self.rows is not None:
            self.rows.append(rows.to(self.store_dtype))
            if self.n_rows > self.in_features:  # H is now the smaller form: keep only it
                if self.h_sum is None:
                    self.h_sum = torch.zeros(self.in_features, self.in_features, dtype=torch.float32, device=rows.device)
                    for r in self.rows:
                        r32 = r.to(torch.float32)
                        self.h_sum.addmm_(r32.t(), r32)
                self.rows = None

    def without(self, rows: torch.Tensor) -> "InputStatistics":
        """A copy without one earlier :meth:`add` of ``rows`` (to split a group; ``H`` up to float32 rounding)."""
        other = InputStatistics(self.in_features, hessian=False, store_dtype=self.store_dtype, device=self.sq_sum.device)
        other.wants_hessian = self.wants_hessian
        other.n_rows = self.n_rows - rows.shape[0]
        other.sq_sum = self.sq_sum - rows.square().sum(0, dtype=torch.float64)
        if self.rows is not None:
            kept = list(self.rows)
            for i in range(len(kept) - 1, -1, -1):
                if kept[i].shape == rows.shape and torch.equal(kept[i], rows.to(self.store_dtype)):
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
            self.h_sum = torch.zeros(self.in_features, self.in_features, dtype=torch.float32, device=self.sq_sum.device)
            for r in self.rows or ():
                r32 = r.to(torch.float32)
                self.h_sum.addmm_(r32.t(), r32)
        return self.h_sum

    def output_energy(self, weight: torch.Tensor) -> float:
        """``||X W^T||^2`` (``weight`` ``[out, in]``, any dtype), from the kept rows or from ``H``."""
        w = weight.to(torch.float32)
        if self.rows is not None:
            return float(sum(float((r.to(torch.float32) @ w.t()).square().sum(dtype=torch.float64)) for r in self.rows))
        assert self.h_sum is not None
        return float(((w @ self.h_sum) * w).sum(dtype=torch.float64))

    def error(self, old: torch.Tensor, new: torch.Tensor, *, delta_energy: float | None = None) -> float | None:
        """``||X (old - new)^T||^2 / ||X old^T||^2``; ``delta_energy`` given by the solver skips the numerator."""
        den = self.output_energy(old)
        if delta_energy is None:
            delta_energy = self.output_energy(old.to(torch.float32) - new.to(torch.float32))
        return None if den == 0 else max(delta_energy, 0.0) / den


class InputCollector:
    """The ``on_read`` callback for :class:`fxprune.observe.WeightInputObserver`: reads -> grouped statistics.

    ``hessian_for(key)`` says whether the weight's solver needs ``H`` (SparseGPT).
    Call :meth:`end_batch` after every forward call of the observed module.
    """

    def __init__(self, hessian_for: Callable[[ReadKey], bool], dtype_for: Callable[[str], torch.dtype]):
        self.hessian_for = hessian_for
        self.dtype_for = dtype_for
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
            group = InputStatistics(
                rows.shape[1], hessian=self.hessian_for(key), store_dtype=self.dtype_for(read.name), device=rows.device
            )
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
            group.add(rows)
            self._fed[id(group)] = (group, rows)

    def _feed(self, group: InputStatistics, rows: torch.Tensor) -> None:
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
