"""convert(): fold masks into plain weights and hand back the user's own model class.

The result is the original model object (a deep copy of it, made by
``prepare``) with every masked parameter replaced by a plain ``nn.Parameter``
holding ``param * mask``: no fxprune module, buffer or hook is left, its
``state_dict()`` has exactly the original keys, and tied weights stay tied.
"""
from __future__ import annotations

import copy

from torch import nn

from fxprune.graph_module import PreparedGraphModule, remove_captured_forwards
from fxprune.masked import MaskedParameter
from fxprune.pruner import Pruner
from fxprune.rewrite import LeafMasks, remove_leaf_hooks, restore_parameters

__all__ = ["convert"]


def convert(prepared: PreparedGraphModule, *, inplace: bool = False) -> nn.Module:
    """Return the pruned model as an instance of the original class.

    By default ``prepared`` is left intact (it is deep-copied first), so it can
    still be compared with the result or trained further; ``inplace=True``
    skips that copy to save memory and leaves ``prepared`` unusable.
    """
    if not isinstance(prepared, PreparedGraphModule) or not isinstance(getattr(prepared, "pruner", None), Pruner):
        raise TypeError(f"convert() expects a model returned by fxprune.prepare(), got {type(prepared).__name__}")
    model = prepared if inplace else copy.deepcopy(prepared)
    root = model._fxprune_original.module
    restore_parameters(model.pruner.targets)
    remove_leaf_hooks(root)
    remove_captured_forwards(root)  # children captured on their own get their class's forward back
    # Root-level tensors may have been replaced on the prepared model (e.g. by .to()).
    for name in root._buffers:
        root._buffers[name] = model._buffers.get(name, root._buffers[name])
    for name, p in root._parameters.items():
        if name in model._parameters:
            root._parameters[name] = model._parameters[name]
    root.train(model.training)
    _verify_clean(root)
    return root


def _verify_clean(model: nn.Module) -> None:
    for name, m in model.named_modules():
        assert not isinstance(m, (MaskedParameter, Pruner)), f"fxprune module left at {name!r}"
        for hooks in (m._forward_pre_hooks, m._forward_hooks):
            assert not any(isinstance(getattr(h, "__self__", None), LeafMasks) for h in hooks.values()), name
