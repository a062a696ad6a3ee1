"""The tracer, its leaf policy, and the per-submodule fallback.

Leaf policy, decided once: torch.nn layers are fx leaves (as in plain
``symbolic_trace``), except the layers whose forward is a single functional
call on their weight -- Linear, Bilinear, Conv*d, ConvTranspose*d, Embedding
-- when they own a parameter we prune. Those are traced through, so that their
weights become ``get_attr`` nodes and can be replaced by masked-parameter
calls in the graph. Layers with training-time behaviour (BatchNorm, Dropout)
or Python-heavy forwards (MultiheadAttention, RNNs) stay leaves; their
parameters are masked at module level by :mod:`fxprune.rewrite`.

Fallback: when tracing raises inside a submodule's forward (data-dependent
control flow, Proxy misuse), that submodule becomes a leaf and tracing starts
again; it is reported with the reason. If the model's own ``forward`` cannot
be traced, the whole model is one leaf: every weight is masked at module
level, nothing is lost but graph-level visibility.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import torch.fx as fx
from torch import nn

__all__ = ["TraceResult", "trace_model", "TRACE_THROUGH_TYPES"]

#: Layers traced through when they own a pruned parameter; all are pure functions of their weights.
TRACE_THROUGH_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Bilinear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Embedding,
)


@dataclass
class TraceResult:
    """The graph (``None`` when the model's own forward is untraceable) and what the fallback did."""

    graph: fx.Graph | None
    fallback_leaves: dict[str, str] = field(default_factory=dict)  # module name -> reason
    root_error: str | None = None


class _Tracer(fx.Tracer):
    def __init__(self, trace_through: set[str], leaves: set[str], leaf_types: tuple[type, ...]):
        super().__init__()
        self._trace_through = trace_through
        self._leaves = leaves
        self._leaf_types = leaf_types
        self.culprit: str | None = None  # innermost traced-through module whose forward raised

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self._leaves or (self._leaf_types and isinstance(m, self._leaf_types)):
            return True
        if qualname in self._trace_through:
            return False
        return super().is_leaf_module(m, qualname)

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        try:
            qualname = self.path_of_module(m)
        except NameError:
            return super().call_module(m, forward, args, kwargs)
        if self.is_leaf_module(m, qualname):
            return super().call_module(m, forward, args, kwargs)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.culprit is None:
                self.culprit = qualname
            raise


def trace_model(
    model: nn.Module,
    target_owners: Iterable[str],
    *,
    concrete_args: dict[str, Any] | None = None,
    leaf_modules: Iterable[str | type] | None = None,
) -> TraceResult:
    """Trace ``model``, turning untraceable submodules into leaves one at a time.

    ``target_owners`` are the names of modules that own pruned parameters;
    those of :data:`TRACE_THROUGH_TYPES` are traced through.
    """
    modules = dict(model.named_modules())
    leaf_types = tuple(x for x in (leaf_modules or ()) if isinstance(x, type))
    leaves = {x for x in (leaf_modules or ()) if isinstance(x, str)}
    unknown = sorted(n for n in leaves if n not in modules)
    if unknown:
        raise ValueError(f"leaf_modules names not found in the model: {', '.join(unknown)}")
    trace_through = {
        n for n in target_owners if n in modules and _is_functional_layer(modules[n])
    }
    result = TraceResult(graph=None)
    for _ in range(len(modules) + 1):
        tracer = _Tracer(trace_through, leaves, leaf_types)
        try:
            result.graph = tracer.trace(model, concrete_args=concrete_args)
            return result
        except Exception as e:  # any failure of symbolic tracing: fall back, and say why
            reason = f"{type(e).__name__}: {e}".splitlines()[0][:300]
            culprit = tracer.culprit
            if not culprit or culprit in leaves:
                result.root_error = reason
                return result
            leaves.add(culprit)
            result.fallback_leaves[culprit] = reason
    raise AssertionError("fallback loop did not converge")  # each round adds a new leaf


def _is_functional_layer(m: nn.Module) -> bool:
    """A trace-through layer whose forward is still the stock one (subclasses may override it)."""
    for base in TRACE_THROUGH_TYPES:
        if isinstance(m, base):
            return type(m).forward is base.forward
    return False
