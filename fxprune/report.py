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

__all__ = ["ParameterSparsity", "SparsityReport", "sparsity_report", "state_dict_sparsity", "checkpoint_sparsity",
           "PrepareReport"]


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
    """Rows per parameter plus totals; ``str()`` gives a table."""

    rows: tuple[ParameterSparsity, ...]

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
        """Overall sparsity over the pruned parameters only (None for a plain model)."""
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

    def __str__(self) -> str:
        header = ("parameter", "shape", "numel", "zeros", "sparsity", "pruned")
        flag = {True: "yes", False: "no", None: "-"}
        body = [
            (r.name, "x".join(map(str, r.shape)) or "scalar", str(r.numel), str(r.zeros), f"{r.sparsity:.4f}", flag[r.pruned])
            for r in self.rows
        ]
        totals = [("TOTAL", "", str(self.numel), str(self.zeros), f"{self.sparsity:.4f}", "")]
        if self.pruned_sparsity is not None:
            pruned = [r for r in self.rows if r.pruned]
            totals.append(("TOTAL (pruned weights)", "", str(sum(r.numel for r in pruned)),
                           str(sum(r.zeros for r in pruned)), f"{self.pruned_sparsity:.4f}", ""))
        widths = [max(len(row[i]) for row in [header, *body, *totals]) for i in range(len(header))]

        def fmt(row: tuple[str, ...]) -> str:
            return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

        rule = "-" * len(fmt(header))
        return "\n".join([fmt(header), rule, *map(fmt, body), rule, *map(fmt, totals)])


def sparsity_report(model: nn.Module) -> SparsityReport:
    """Sparsity per parameter (by original name, tied parameters once) and overall.

    On a prepared model the effective weight ``param * mask`` is counted, and
    ``pruned`` says which parameters a pruner owns; on any other model the
    parameters are counted as they are.
    """
    rows: list[ParameterSparsity] = []
    seen: set[int] = set()
    prepared = any(isinstance(m, MaskedParameter) for m in model.modules())
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
            rows.append(
                ParameterSparsity(
                    name=f"{prefix}.{attr}" if prefix else attr,
                    shape=tuple(tensor.shape),
                    numel=tensor.numel(),
                    zeros=int((tensor == 0).sum()),
                    pruned=masked if prepared else None,
                )
            )
    return SparsityReport(rows=tuple(rows))


def state_dict_sparsity(state_dict: Mapping[str, Any]) -> SparsityReport:
    """Sparsity per floating-point tensor of a ``state_dict`` (integer buffers such as step counters are left
    out); ``pruned`` is unknown (``None``), as for a plain model."""
    rows = [
        ParameterSparsity(name, tuple(t.shape), t.numel(), int((t == 0).sum()), None)
        for name, t in state_dict.items()
        if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex())
    ]
    return SparsityReport(rows=tuple(rows))


def checkpoint_sparsity(path: str | os.PathLike) -> SparsityReport:
    """The sparsity table of a saved checkpoint: a ``torch.save``-d ``state_dict`` (or a dict holding one under
    ``state_dict`` / ``model``), or a ``.safetensors`` file written by ``fxprune.save_sparse``.

    ``torch.save`` files are read with ``weights_only=True``: no code in the file runs.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    if path.endswith(".safetensors"):
        import fxprune

        load = getattr(fxprune, "load_sparse_state_dict", None)
        if load is None:
            raise PruningError(f"{path}: reading .safetensors needs fxprune.load_sparse_state_dict (fxprune.save_sparse)")
        return state_dict_sparsity(load(path))
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
    return state_dict_sparsity(data)


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
