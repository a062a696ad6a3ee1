"""What was done and what was reached: the prepare report and the sparsity report.

Both print as plain-text tables and work on prepared and on converted (or any
plain) models, so "is my model actually pruned?" has a one-line answer at
every stage.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import nn

from fxprune.errors import PruningError

from fxprune.masked import MaskedParameter
from fxprune.rewrite import original_parameter_order
from fxprune.sparse_modules import _SparseWeightModule

__all__ = ["ParameterSparsity", "SparsityReport", "sparsity_report", "PrepareReport", "ScheduleTable", "format_table",
           "PRUNED_RECORD", "state_dict_sparsity", "checkpoint_sparsity"]


def format_table(header: tuple[str, ...], rows: list[tuple[str, ...]], *, right: tuple[int, ...] = (),
                 totals: list[tuple[str, ...]] = ()) -> str:
    """Columns padded to their widest cell, a rule under the header (and above ``totals``)."""
    widths = [max(len(r[i]) for r in [header, *rows, *totals]) for i in range(len(header))]

    def fmt(row: tuple[str, ...]) -> str:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        return "  ".join(cells).rstrip()

    rule = "-" * max(len(fmt(header)), *(len(fmt(r)) for r in rows)) if rows else "-" * len(fmt(header))
    out = [fmt(header), rule, *map(fmt, rows)]
    if totals:
        out += [rule, *map(fmt, totals)]
    return "\n".join(out)


@dataclass(frozen=True)
class ParameterSparsity:
    """One parameter, under its original name."""

    name: str
    shape: tuple[int, ...]
    numel: int
    zeros: int
    pruned: bool | None  # targeted by a pruner; None when unknown (a plain model)

    @property
    def sparsity(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0

    def __getitem__(self, field: str) -> object:
        """``row["sparsity"]`` as well as ``row.sparsity``."""
        if field not in ("name", "shape", "numel", "zeros", "sparsity", "pruned"):
            raise KeyError(field)
        return getattr(self, field)


@dataclass(frozen=True)
class SparsityReport:
    """Rows per parameter plus totals; ``str()`` gives a table.

    ``rows`` always holds every parameter (tied ones once). The table lists
    the pruned weights -- or, where that is not known (a plain model without
    convert's record), the weights fxprune would prune by default -- unless
    the report was made with ``all_parameters=True``.
    """

    rows: tuple[ParameterSparsity, ...]
    all_parameters: bool = False
    listed_by_default: frozenset[str] | None = None  # names the table shows when not all_parameters

    @property
    def numel(self) -> int:
        return sum(r.numel for r in self.rows)

    @property
    def zeros(self) -> int:
        return sum(r.zeros for r in self.rows)

    @property
    def sparsity(self) -> float:
        """Overall sparsity over every parameter."""
        return self.zeros / self.numel if self.numel else 0.0

    @property
    def pruned_sparsity(self) -> float | None:
        """Overall sparsity over the pruned parameters only (None when which ones were pruned is unknown)."""
        rows = [r for r in self.rows if r.pruned]
        if not rows:
            return None
        n = sum(r.numel for r in rows)
        return sum(r.zeros for r in rows) / n

    @property
    def overall(self) -> ParameterSparsity:
        """Totals over every parameter, as one row named ``overall``."""
        return ParameterSparsity("overall", (), self.numel, self.zeros, None)

    def __iter__(self):
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __contains__(self, name: object) -> bool:
        return any(r.name == name for r in self.rows)

    def __getitem__(self, name: str) -> ParameterSparsity:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(name)

    def to_dict(self) -> dict[str, dict[str, object]]:
        return {
            r.name: {"shape": r.shape, "numel": r.numel, "zeros": r.zeros, "sparsity": r.sparsity, "pruned": r.pruned}
            for r in self.rows
        }

    def listed(self) -> list[ParameterSparsity]:
        """The rows the table shows."""
        if self.all_parameters:
            return list(self.rows)
        if any(r.pruned for r in self.rows):
            return [r for r in self.rows if r.pruned]
        names = self.listed_by_default or frozenset()
        return [r for r in self.rows if r.name in names]

    def __str__(self) -> str:
        header = ("parameter", "shape", "numel", "zeros", "sparsity", "pruned")
        flag = {True: "yes", False: "no", None: "-"}
        listed = self.listed()
        body = [
            (r.name, "x".join(map(str, r.shape)) or "scalar", str(r.numel), str(r.zeros), f"{r.sparsity:.4f}", flag[r.pruned])
            for r in listed
        ]
        totals = []
        if self.pruned_sparsity is not None:
            pruned = [r for r in self.rows if r.pruned]
            totals.append(("TOTAL (pruned weights)", "", str(sum(r.numel for r in pruned)),
                           str(sum(r.zeros for r in pruned)), f"{self.pruned_sparsity:.4f}", ""))
        elif not self.all_parameters and listed:
            n, z = sum(r.numel for r in listed), sum(r.zeros for r in listed)
            totals.append(("TOTAL (prunable weights)", "", str(n), str(z), f"{z / n:.4f}", ""))
        totals.append((f"TOTAL (all {len(self.rows)} parameters)", "", str(self.numel), str(self.zeros),
                       f"{self.sparsity:.4f}", ""))
        table = format_table(header, body, right=(1, 2, 3, 4, 5), totals=totals)
        hidden = len(self.rows) - len(listed)
        if hidden:
            table += (f"\n({hidden} other parameters not listed (biases, norms, ...): "
                      "sparsity_report(model, all_parameters=True) lists every one)")
        return table


#: The attribute ``convert`` leaves on a converted model: the names of the weights that were pruned.
#: A plain tuple of strings (no module, buffer or hook), so it survives ``torch.save(model)``, pickling and
#: ``copy.deepcopy``, and is not in ``state_dict()``: a model rebuilt from a state_dict no longer knows it.
PRUNED_RECORD = "_fxprune_pruned_weights"


def sparsity_report(model: nn.Module, *, all_parameters: bool = False) -> SparsityReport:
    """Sparsity per parameter (by original name, tied parameters once) and overall.

    On a prepared model the effective weight ``param * mask`` is counted, and
    ``pruned`` says which parameters a pruner owns; a model returned by
    ``convert`` says the same from the record convert left on it; on any
    other model ``pruned`` is unknown (``-``). ``print()`` shows the pruned
    (else the prunable) weights and the totals; ``all_parameters=True``
    lists every parameter.
    """
    from fxprune.plan import is_default_prunable  # noqa: PLC0415 - plan imports config only; keep report light

    rows: list[ParameterSparsity] = []
    seen: set[int] = set()
    prepared = any(isinstance(m, MaskedParameter) for m in model.modules())
    record = None if prepared else getattr(model, PRUNED_RECORD, None)
    record = set(record) if isinstance(record, (tuple, list, frozenset, set)) else None
    # On a prepared model, list each module's parameters in their original order.
    original_root = getattr(getattr(model, "_fxprune_original", None), "module", None)
    targets = getattr(getattr(model, "pruner", None), "targets", [])
    original_order = {
        id(model) if owner is original_root else key: names
        for key, (owner, names) in original_parameter_order(targets).items()
    }
    dense_weights: list = []
    for prefix, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, MaskedParameter):
            continue
        items = [(a, p, False) for a, p in module._parameters.items() if p is not None]
        items += [(a, m, True) for a, m in module._modules.items() if isinstance(m, MaskedParameter)]
        if isinstance(module, _SparseWeightModule):  # sparse kernels (fxprune.kernels): the weight is a buffer
            dense_weights.append(module.weight)  # kept alive: rows are deduplicated by id()
            items.insert(0, ("weight", dense_weights[-1], False))
        order = original_order.get(id(module), [])
        items.sort(key=lambda item: order.index(item[0]) if item[0] in order else len(order))
        for attr, obj, masked in items:
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            tensor = obj.folded() if masked else obj.detach()
            name = f"{prefix}.{attr}" if prefix else attr
            rows.append(
                ParameterSparsity(
                    name=name,
                    shape=tuple(tensor.shape),
                    numel=tensor.numel(),
                    zeros=int((tensor == 0).sum()),
                    pruned=masked if prepared else (name in record if record is not None else None),
                )
            )
    default = None
    if not prepared and record is None:
        default = frozenset(r.name for r in rows if _safe_prunable(is_default_prunable, model, r.name))
    return SparsityReport(rows=tuple(rows), all_parameters=all_parameters, listed_by_default=default)


def _safe_prunable(rule, model: nn.Module, name: str) -> bool:
    try:
        return bool(rule(model, name))
    except (AttributeError, TypeError):
        return False


class ScheduleTable(list):
    """``pruner.schedule_table(n)``: a list of ``{unit: t, pruner: goal, ...}`` rows that prints as a table."""

    def __init__(self, rows: list[dict[str, float]], unit: str = "epoch"):
        super().__init__(rows)
        self.unit = unit

    def __str__(self) -> str:
        if not self:
            return f"(no {self.unit}s)"
        names = [k for k in self[0] if k != self.unit]
        body = [(str(r[self.unit]), *(f"{r[n]:.4f}" for n in names)) for r in self]
        return format_table((self.unit, *names), body, right=tuple(range(len(names) + 1)))


def state_dict_sparsity(state_dict: Mapping[str, Any], *, all_parameters: bool = False) -> SparsityReport:
    """Sparsity per floating-point tensor of a ``state_dict`` (integer buffers such as step counters are left
    out); ``pruned`` is unknown (``None``), as for a plain model.

    Without the model, which tensors are weights is read from their shapes: the table lists the tensors of two
    or more dimensions (Linear, Conv, Embedding weights), not biases and norm scales;
    ``all_parameters=True`` lists every one.
    """
    rows = [
        ParameterSparsity(name, tuple(t.shape), t.numel(), int((t == 0).sum()), None)
        for name, t in state_dict.items()
        if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex())
    ]
    matrices = frozenset(r.name for r in rows if len(r.shape) >= 2)
    return SparsityReport(rows=tuple(rows), all_parameters=all_parameters, listed_by_default=matrices)


def checkpoint_sparsity(path: str | os.PathLike, *, all_parameters: bool = False) -> SparsityReport:
    """The sparsity table of a saved checkpoint: a ``torch.save``-d ``state_dict`` (or a dict holding one under
    ``state_dict`` / ``model``), or a ``.safetensors`` file written by ``fxprune.save_sparse``.

    ``torch.save`` files are read with ``weights_only=True``: no code in the file runs.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    if path.endswith(".safetensors"):
        from fxprune.checkpoints import load_sparse_state_dict  # its extra is checked (and named) inside

        return state_dict_sparsity(load_sparse_state_dict(path), all_parameters=all_parameters)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, non-tensor objects refused by weights_only, truncated files
        raise PruningError(f"{path}: cannot read as a torch.save'd state_dict ({type(e).__name__}: "
                           f"{' '.join(str(e).split())[:300]})") from None
    for key in ("state_dict", "model"):
        if isinstance(data, Mapping) and isinstance(data.get(key), Mapping):
            data = data[key]
    if not isinstance(data, Mapping) or not any(isinstance(v, torch.Tensor) for v in data.values()):
        raise PruningError(f"{path}: holds no state_dict (a mapping of names to tensors)")
    return state_dict_sparsity(data, all_parameters=all_parameters)


@dataclass
class PrepareReport:
    """How each part of the model was captured and how each pruned weight is masked.

    ``routes`` maps a weight to ``graph`` (a masked-parameter node in the fx
    graph), ``module`` (masked around its leaf module's forward), both, or
    ``unused`` (the forward never reads it; it is masked all the same).
    """

    traced: bool
    fallback_leaves: dict[str, str] = field(default_factory=dict)
    root_error: str | None = None
    routes: dict[str, str] = field(default_factory=dict)
    pruners: dict[str, list[str]] = field(default_factory=dict)
    # per-submodule fallback: module name -> 'graph', 'python (<reason>)', 'leaf (<reason>)' or 'module (<reason>)'
    modules: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = []
        if self.traced:
            lines.append("traced: whole model" if not self.fallback_leaves else
                         f"traced: with {len(self.fallback_leaves)} submodule(s) kept as leaves")
        else:
            lines.append(f"traced: no, the model's own forward is not traceable ({self.root_error}); "
                         + ("its submodules were captured on their own" if self.modules else
                            "every weight is masked at module level"))
        for name, reason in self.fallback_leaves.items():
            lines.append(f"  leaf {name or '<root>'}: {reason}")
        for name, route in self.modules.items():
            lines.append(f"  module {name}: {route}")
        for pruner, names in self.pruners.items():
            lines.append(f"pruner {pruner}: {len(names)} weight(s)")
            for n in names:
                lines.append(f"  {n}: {self.routes.get(n, '?')}")
        return "\n".join(lines)
