"""prepare(): load config -> plan -> trace -> rewrite -> attach the Pruner.

The input model is never modified: ``prepare`` works on a deep copy, and
every check that can fail on the config or the weight names runs before the
copy is made. The prepared model is a :class:`~fxprune.graph_module.PreparedGraphModule`
that owns the copy's parameters (so build the optimizer from
``prepared.parameters()``).
"""
from __future__ import annotations

import copy
import os
import warnings
from typing import Any, Iterable, Mapping

from torch import nn
from torch.optim import Optimizer

from fxprune.config import PruningConfig, load_config
from fxprune.errors import TraceError
from fxprune.graph_module import OriginalRoot, PreparedGraphModule, adopt_hierarchy, call_original_graph
from fxprune.plan import make_plan
from fxprune.pruner import Pruner, prepared_parameter_map
from fxprune.report import PrepareReport
from fxprune.rewrite import install_masks
from fxprune.trace import trace_model

__all__ = ["prepare", "TraceFallbackWarning"]

_RESERVED = ("pruner", "_fxprune_original")


class TraceFallbackWarning(UserWarning):
    """Part of the model could not be traced and is masked at module level instead."""


def prepare(
    model: nn.Module,
    config: str | os.PathLike | Mapping[str, Any] | PruningConfig,
    *,
    concrete_args: dict[str, Any] | None = None,
    leaf_modules: Iterable[str | type] | None = None,
    optimizer: Optimizer | None = None,
    steps_per_epoch: int | None = None,
) -> PreparedGraphModule:
    """Return a pruning-ready copy of ``model``: masked parameters plus ``prepared.pruner``.

    ``concrete_args`` is passed to the tracer (specialize inputs such as flags
    used in control flow); ``leaf_modules`` (module names or classes) are kept
    as leaves and masked at module level. Submodules that cannot be traced
    become leaves automatically; see ``prepared.pruner.prepare_report``.

    ``optimizer`` (built on ``model``'s parameters) turns on optimizer mode:
    it is re-pointed to the prepared copy's parameters (state included) and
    attached with ``prepared.pruner.attach(optimizer, steps_per_epoch=...)``,
    so a plain loop prunes with no hook call; see :meth:`fxprune.Pruner.attach`.
    """
    if steps_per_epoch is not None and optimizer is None:
        raise TypeError("steps_per_epoch is only used with optimizer=; or call prepared.pruner.attach(opt, ...)")
    if not isinstance(model, nn.Module):
        raise TypeError(f"prepare() expects an nn.Module, got {type(model).__name__}")
    if isinstance(model, PreparedGraphModule):
        raise TypeError("this model is already prepared; convert() it first or prepare the original")
    cfg = load_config(config)
    plan = make_plan(model, cfg)
    for name in _RESERVED:
        if hasattr(model, name):
            raise TraceError(f"the model already has an attribute {name!r}, which fxprune needs on the prepared model")

    work = copy.deepcopy(model)
    owners = {alias.rpartition(".")[0] for t in plan.targets for alias in t.aliases}
    attrs_before = set(work.__dict__)
    traced = trace_model(work, owners, concrete_args=concrete_args, leaf_modules=leaf_modules)
    class_name = type(model).__name__
    if traced.graph is not None:
        gm = PreparedGraphModule(work, traced.graph, class_name=class_name)
        for name in set(work.__dict__) - attrs_before:  # tensor constants the tracer put on the root
            del work.__dict__[name]
    else:
        gm = PreparedGraphModule({"_fxprune_original": OriginalRoot(work)}, call_original_graph(), class_name=class_name)
        adopt_hierarchy(gm, work)
    gm.__dict__["_fxprune_original"] = OriginalRoot(work)
    targets = install_masks(gm, work, plan, graph=traced.graph is not None)

    report = PrepareReport(
        traced=traced.graph is not None,
        fallback_leaves=dict(traced.fallback_leaves),
        root_error=traced.root_error,
        routes={t.name: t.route for t in targets},
        pruners={p: plan.names_of(p) for p in plan.pruners},
    )
    gm.pruner = Pruner(cfg, plan, targets, report)
    if optimizer is not None:
        gm.pruner.attach(optimizer, steps_per_epoch=steps_per_epoch, replace=prepared_parameter_map(model, gm))
    gm.train(model.training)
    if traced.fallback_leaves or traced.graph is None:
        warnings.warn(f"fxprune: partial trace of {class_name}\n{report}", TraceFallbackWarning, stacklevel=2)
    return gm
